"""Contract of the shared tiling utility (realisr.tiling)."""

import pytest
import torch
import torch.nn as nn

from realisr.tiling import (blend_window, is_oom_error, run_with_oom_retry, tile_grid, tile_starts,
                            tiled_forward)


@pytest.mark.parametrize("length,tile,overlap", [(100, 32, 8), (64, 64, 8), (65, 64, 8), (10, 32, 4),
                                                 (97, 16, 0), (50, 20, 19)])
def test_tile_starts_cover_and_snap(length, tile, overlap):
    starts = tile_starts(length, tile, overlap)
    t = min(tile, length)
    covered = torch.zeros(length, dtype=torch.bool)
    for s in starts:
        assert 0 <= s and s + t <= length
        covered[s:s + t] = True
    assert covered.all()
    assert starts[0] == 0 and starts[-1] == length - t
    for a, b in zip(starts, starts[1:]):
        assert b - a <= t - overlap  # at least the requested overlap


@pytest.mark.parametrize("overlap", [16, 20, -1])
def test_tiled_forward_refuses_an_overlap_outside_the_tile(overlap):
    """Refused, not quietly clamped to tile - 1 (or 0)."""
    import torch

    with pytest.raises(ValueError, match="overlap"):
        tiled_forward(lambda t: t, torch.zeros(1, 1, 40, 40), tile=16, overlap=overlap)
    if overlap >= 0:  # one tile covering the image: the overlap does not matter
        assert tiled_forward(lambda t: t + 1, torch.zeros(1, 1, 10, 10), tile=16, overlap=overlap).min() == 1


def test_tile_starts_rejects_bad_overlap():
    with pytest.raises(ValueError, match="overlap"):
        tile_starts(100, 16, 16)


def test_blend_window_ramps_only_towards_neighbours():
    w = blend_window(16, 16, (False, True, True, False), (0, 4, 6, 0))
    assert w[0, 15] == 1.0  # corner with no neighbour: full weight
    assert (w[:, :6][:, 0] < w[:, :6][:, 5]).all()  # ramps up from the left neighbour
    assert (w > 0).all()


@pytest.mark.parametrize("window", ["cosine", "linear", "box"])
def test_identity_is_exact(window):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, 45, 70, generator=g)
    y = tiled_forward(lambda t: t, x, tile=16, overlap=5, pad=0, window=window)
    assert torch.allclose(y, x, atol=1e-6)


def _net(seed=0, layers=2, scale=2):
    torch.manual_seed(seed)
    mods = []
    for _ in range(layers):
        mods += [nn.Conv2d(3, 3, 3, padding=1), nn.LeakyReLU(0.2)]
    mods += [nn.Upsample(scale_factor=scale, mode="nearest"), nn.Conv2d(3, 3, 3, padding=1)]
    return nn.Sequential(*mods).eval()


def test_pad_covering_receptive_field_gives_untiled_result():
    net = _net(layers=2, scale=2)  # receptive field radius: 2 at input res + 1 output px (< 1 input px)
    x = torch.rand(1, 3, 37, 53, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = net(x)
        y = tiled_forward(net, x, scale=2, tile=16, overlap=4, pad=4)
    assert y.shape == ref.shape
    assert (y - ref).abs().max() < 1e-5


def test_no_seam_band_when_receptive_field_exceeds_pad():
    net = _net(layers=6, scale=1)
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = net(x)
        y = tiled_forward(net, x, scale=1, tile=24, overlap=8, pad=1)
    err = (y - ref).abs().mean(dim=(0, 1, 2))  # per column
    assert err.max() < 0.05
    # The error is spread smoothly over the overlap instead of jumping at a hard seam: the largest
    # column-to-column change of the error is small compared with the error itself.
    assert (err[1:] - err[:-1]).abs().max() < 0.5 * err.max() + 1e-6


def test_streaming_only_current_tile_reaches_fn():
    seen = []

    def fn(t):
        seen.append(tuple(t.shape[-2:]))
        return t * 2

    x = torch.rand(1, 3, 100, 100)
    y = tiled_forward(fn, x, tile=32, overlap=8, pad=4)
    assert max(max(s) for s in seen) <= 32 + 2 * 4
    assert len(seen) == len(tile_grid(100, 100, 32, 8))
    assert torch.allclose(y, 2 * x, atol=1e-6)


def test_size_multiple_pads_and_crops():
    def fn(t):
        assert t.shape[-2] % 8 == 0 and t.shape[-1] % 8 == 0
        return torch.nn.functional.interpolate(t, scale_factor=2, mode="nearest")

    x = torch.rand(1, 3, 29, 41)
    y = tiled_forward(fn, x, scale=2, tile=20, overlap=4, pad=2, size_multiple=8)
    assert y.shape == (1, 3, 58, 82)
    assert torch.allclose(y, torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest"), atol=1e-6)


def test_progress_events():
    events = []
    tiled_forward(lambda t: t, torch.rand(1, 1, 40, 40), tile=16, overlap=4, callback=events.append)
    n = len(tile_grid(40, 40, 16, 4))
    assert events[0].current == 0 and events[0].total == n
    assert events[-1].current == n and len(events) == n + 1


def test_oom_retry_halves_tile():
    calls = []

    def run(tile):
        calls.append(tile)
        if tile > 40:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return tiled_forward(lambda t: t + 1, x, tile=tile, overlap=4)

    x = torch.rand(1, 3, 64, 64)
    y, used = run_with_oom_retry(run, 128)
    assert calls == [128, 64, 32] and used == 32
    assert torch.allclose(y, x + 1, atol=1e-6)


def test_non_oom_errors_propagate():
    assert not is_oom_error(RuntimeError("shape mismatch"))

    def run(tile):
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape"):
        run_with_oom_retry(run, 64)


@pytest.mark.parametrize("h,w,max_tile,overlap", [(512, 512, 440, 16), (1000, 300, 256, 16), (2048, 2048, 512, 32),
                                                  (100, 90, 64, 8)])
def test_balanced_tile_needs_no_more_tiles_and_wastes_less(h, w, max_tile, overlap):
    from realisr.tiling import balanced_tile

    t = balanced_tile(h, w, max_tile, overlap)
    assert 0 < t <= max_tile and t % 8 == 0
    n_bal = len(tile_grid(h, w, t, overlap))
    n_max = len(tile_grid(h, w, max_tile, overlap))
    assert n_bal == n_max
    assert n_bal * t * t <= n_max * max_tile * max_tile


def test_balanced_tile_zero_when_image_fits():
    from realisr.tiling import balanced_tile

    assert balanced_tile(300, 200, 512, 16) == 0
