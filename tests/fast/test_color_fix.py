"""Colour fix: the float functions against the official float outputs in the golden fixtures, and the defining
properties. (The official 8-bit path, truncation included, is checked against the official PNGs through the
pipelines' ``compat="official"`` in test_golden_parity.py.)"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from helpers import onestep  # noqa: E402

from realisr.color_fix import (adain_color_fix, color_fix, normalize_mode, wavelet_color_fix,  # noqa: E402
                               wavelet_decomposition)

GOLDEN = onestep.golden_dir()


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with onestep.one_thread():
        yield


def _rand(seed, shape=(1, 3, 24, 20), lo=0.2, hi=0.8):
    g = torch.Generator().manual_seed(seed)
    return lo + (hi - lo) * torch.rand(shape, generator=g)


def test_adain_matches_the_formula():
    """(y - mean_y) / std_y * std_x + mean_x with std = sqrt(unbiased var + 1e-5), computed here in float64."""
    y, x = _rand(0, lo=0.3, hi=0.6), _rand(1)
    yn, xn = y.double().numpy()[0], x.double().numpy()[0]
    ref = np.empty_like(yn)
    for c in range(3):
        sy, sx = np.sqrt(yn[c].var(ddof=1) + 1e-5), np.sqrt(xn[c].var(ddof=1) + 1e-5)
        ref[c] = (yn[c] - yn[c].mean()) / sy * sx + xn[c].mean()
    out = adain_color_fix(y, x)
    assert np.abs(out[0].numpy() - np.clip(ref, 0, 1)).max() <= 1e-5
    # the result takes the source's statistics (no clamping happens for these ranges)
    assert torch.allclose(out.mean((2, 3)), x.mean((2, 3)), atol=1e-5)


def test_wavelet_takes_high_from_target_and_low_from_source():
    y, x = _rand(2), _rand(3)
    out = wavelet_color_fix(y, x)
    hy, _ = wavelet_decomposition(y)
    _, lx = wavelet_decomposition(x)
    assert torch.allclose(out, (hy + lx).clamp(0, 1))
    # decomposition is exact: high + low reconstructs the image
    h, lo = wavelet_decomposition(y)
    assert (h + lo - y).abs().max() <= 1e-6
    # a constant image has no high frequencies; the blur keeps constants (replicate padding)
    c = torch.full((1, 3, 9, 7), 0.25)
    h, lo = wavelet_decomposition(c)
    assert h.abs().max() <= 1e-7 and (lo - 0.25).abs().max() <= 1e-7
    with pytest.raises(ValueError):
        wavelet_color_fix(y, x[..., :10])


def test_modes():
    assert normalize_mode("nofix") == normalize_mode(None) == "none"
    assert normalize_mode("AdaIN") == "adain"
    with pytest.raises(ValueError):
        normalize_mode("histogram")
    y = _rand(4, lo=-0.2, hi=1.2)
    assert torch.equal(color_fix(y, y, "none"), y.clamp(0, 1))


def test_against_the_official_float_outputs():
    from PIL import Image

    m = json.loads((GOLDEN / "manifest.json").read_text())  # a missing fixture set fails here
    checked = 0
    for case in m["cases"]:
        f = case["files"]
        inp = m["inputs"][case["input"]]
        y = torch.from_numpy(np.clip(np.load(GOLDEN / f["out_raw"]) * 0.5 + 0.5, 0, 1))
        src = np.asarray(Image.open(GOLDEN / inp["preproc_png"]).convert("RGB"))
        src = torch.from_numpy(src.transpose(2, 0, 1).copy())[None].float().div(255)  # torchvision ToTensor
        for mode in ("adain", "wavelet"):
            if f"out_{mode}_float" in f:
                ref = np.load(GOLDEN / f[f"out_{mode}_float"])
                assert np.abs(color_fix(y, src, mode).numpy() - ref).max() <= 1e-6, (case["id"], mode)
                checked += 1
    assert checked > 0
