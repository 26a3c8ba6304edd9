"""PiSA-SR pipeline behaviour on the tiny fixture model: the dials, re-dial, tiling, sizes, argument checks.

Parity with the official code is in test_golden_parity.py; here the properties the official code does not
have (or the README states) are checked: (1,1) == default, (0,0) == VAE reconstruction, constant map ==
scalar, spatial maps are local, re-dial == fresh run without a UNet pass, tiled vs untiled, exact 4x sizes.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("peft")

from helpers import onestep  # noqa: E402

PS = 32  # process_size: short sides >= 8 px are not resized up


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with onestep.one_thread():
        yield


@pytest.fixture(scope="module")
def pipe():
    return onestep.pisa_pipeline()


def _image(h, w, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([np.sin(xx / 4) + np.cos(yy / 5), np.cos(xx / 7 + 1), np.sin((xx + yy) / 5)], -1) * 0.25 + 0.5
    return np.clip(base + rng.normal(0, 0.03, (h, w, 3)), 0, 1).astype(np.float32)


def _count_unet_calls(pipe):
    calls = []
    handle = pipe.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    return calls, handle


def test_one_one_equals_default(pipe):
    img = _image(16, 14)
    d = pipe(img, process_size=PS, color_fix="none", default_mode=True)
    a = pipe(img, process_size=PS, color_fix="none", lambda_pix=1.0, lambda_sem=1.0, default_mode=False)
    assert d.info["mode"] == "default" and a.info["mode"] == "adjustable"
    assert np.abs(d.pixels - a.pixels).max() <= 1e-5
    # default_mode=None picks the one-pass default for exactly (1, 1)
    auto = pipe(img, process_size=PS, color_fix="none")
    assert auto.info["mode"] == "default"
    np.testing.assert_array_equal(auto.pixels, d.pixels)


def test_zero_zero_is_vae_reconstruction(pipe):
    img = _image(16, 14, seed=1)  # 64x56 after x4: no resize, multiple of 8
    out = pipe(img, process_size=PS, color_fix="none", lambda_pix=0.0, lambda_sem=0.0)
    x = torch.from_numpy(img).permute(2, 0, 1)[None]
    up = pipe.preprocess(x, process_size=PS).image  # the bicubic x4 LQ the model sees
    with torch.no_grad():
        lat = pipe.vae.encode(up * 2 - 1).latent_dist.mode()
        ref = pipe.vae.decode(lat).sample.clamp(-1, 1) * 0.5 + 0.5
    ref = ref[0].permute(1, 2, 0).numpy()
    assert out.pixels.shape == ref.shape == (64, 56, 3)
    assert np.abs(out.pixels - ref).max() <= 1e-5
    # and it is not the (1, 1) result
    assert np.abs(pipe(img, process_size=PS, color_fix="none").pixels - ref).max() > 1e-2


def test_constant_map_equals_scalar(pipe):
    from PIL import Image

    from realisr.pipelines.diffusion_common import dial_to_latent

    img = _image(15, 13, seed=2)
    ref = pipe(img, process_size=PS, lambda_pix=0.7, lambda_sem=128 / 255)
    maps = [
        (np.full((15, 13), 0.7, np.float32), Image.fromarray(np.full((15, 13), 128, np.uint8), "L")),
        (torch.full((1, 1, 40, 33), 0.7), np.full((7, 9), 128, np.uint8)),  # other resolutions are resized
    ]
    for lp, ls in maps:
        # the resized map is the constant to float precision (bilinear weights sum to 1 up to rounding) ...
        for m, c in ((lp, 0.7), (ls, 128 / 255)):
            lat = dial_to_latent(m, (7, 6), name="map")
            assert lat.shape == (1, 1, 7, 6) and (lat - c).abs().max() <= 1e-6
        # ... and so is the result (the decoder amplifies the last-bit differences a little)
        out = pipe(img, process_size=PS, lambda_pix=lp, lambda_sem=ls)
        assert np.abs(out.pixels - ref.pixels).max() <= 1e-5


def test_spatial_map_is_local(pipe):
    from realisr.pipelines.diffusion_common import dial_to_latent

    img = _image(16, 16, seed=3)
    x = torch.from_numpy(img).permute(2, 0, 1)[None]
    pre = pipe.preprocess(x, process_size=PS)
    z = pipe.encode(pre.image)
    preds = pipe.predict(z, adjustable=True)
    h, w = z.shape[-2:]
    m = np.zeros((h, w), np.float32)
    m[:, w // 2:] = 1.0
    lam = dial_to_latent(m, (h, w), name="lambda_pix")
    eps = pipe.combine(preds["eps_pix"], preds["eps_sem"], lam, lam)
    z_h = z - eps
    # left half: (0, 0) -> z_L untouched; right half: (1, 1) -> z_L - eps_PiSA
    assert torch.equal(z_h[..., : w // 2], z[..., : w // 2])
    full = z - (preds["eps_pix"] + preds["eps_sem"])
    assert (z_h[..., w // 2:] - full[..., w // 2:]).abs().max() <= 1e-6


def test_redial_equals_fresh_run_without_unet(pipe):
    img = _image(14, 17, seed=4)
    first = pipe(img, process_size=PS, keep_predictions=True, outscale=2)
    assert first.info["mode"] == "adjustable"  # the kept predictions need both passes
    state = first.extras["redial_state"]
    calls, handle = _count_unet_calls(pipe)
    try:
        again = pipe.redial(state, lambda_pix=0.4, lambda_sem=1.6)
        grad = pipe.redial(state, lambda_pix=np.linspace(0, 1.5, 17, dtype=np.float32)[None].repeat(14, 0),
                           lambda_sem=0.9, color_fix="wavelet")
    finally:
        handle.remove()
    assert calls == []
    fresh = pipe(img, process_size=PS, lambda_pix=0.4, lambda_sem=1.6, outscale=2)
    assert again.pixels.shape == fresh.pixels.shape == (28, 34, 3)
    assert np.abs(again.pixels - fresh.pixels).max() <= 1e-6
    fresh_map = pipe(img, process_size=PS, lambda_pix=np.linspace(0, 1.5, 17, dtype=np.float32)[None].repeat(14, 0),
                     lambda_sem=0.9, color_fix="wavelet", outscale=2)
    assert np.abs(grad.pixels - fresh_map.pixels).max() <= 1e-6
    # re-dial at (1, 1) gives the original result
    assert np.abs(pipe.redial(state).pixels - first.pixels).max() <= 1e-6


def test_tiling_machinery_is_exact_for_a_local_predictor():
    """The official Gaussian blend is a partition of unity: a per-pixel predictor gives the untiled result."""
    from realisr.pipelines.diffusion_common import latent_tile_plan, tiled_latent_predict

    z = torch.randn(1, 4, 23, 37, generator=torch.Generator().manual_seed(0))

    def fn(t):
        return torch.tanh(t) * 0.7 + t ** 2

    for flavor in ("pisa", "osediff"):
        for tile, ov in ((8, 4), (12, 5), (96, 32)):
            out = tiled_latent_predict(fn, z, tile=tile, overlap=ov, flavor=flavor)
            assert (out - fn(z)).abs().max() <= 1e-5, (flavor, tile, ov)
    assert latent_tile_plan(23, 37, 8, 4) == (8, 4)
    assert latent_tile_plan(23, 37, 96, 32) is None  # 23*37 <= 96^2: one pass, as the official rule
    assert latent_tile_plan(5, 400, 40, 4) == (5, 4)  # thin image: the square tile is clamped to the short side


@pytest.mark.parametrize("h, w, tile, overlap, words", [
    (23, 37, 10, 12, ["latent_overlap 12", "latent tile 10"]),
    (23, 37, 10, 10, ["latent_overlap 10", "latent tile 10"]),
    (5, 400, 40, 32, ["latent tile 5", "short side, 5"]),  # officially an endless loop; no longer reduced quietly
])
def test_latent_overlap_not_smaller_than_the_tile_is_refused(h, w, tile, overlap, words):
    from realisr.pipelines.diffusion_common import latent_tile_plan, tiled_latent_predict

    with pytest.raises(ValueError) as e:
        latent_tile_plan(h, w, tile, overlap)
    assert all(word in str(e.value) for word in words), str(e.value)
    with pytest.raises(ValueError, match="latent_overlap"):
        tiled_latent_predict(lambda t: t, torch.zeros(1, 4, h, w), tile=tile, overlap=overlap, flavor="pisa")


def test_explicit_latent_overlap_not_smaller_than_latent_tile_fails_before_any_work(pipe, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the check must come first")

    monkeypatch.setattr(pipe, "encode", boom)
    with pytest.raises(ValueError, match="latent_overlap 12 must be smaller than latent_tile 12"):
        pipe(_image(20, 20, seed=1), process_size=PS, latent_tile=12, latent_overlap=12)
    # from the pixel arguments: tile 32 px -> 16 latents, tile_pad 40 px -> 20 latents
    with pytest.raises(ValueError, match=r"latent overlap 20 must be smaller than latent tile 16 \(from tile 32 px "
                                         r"and tile_pad 40 px\)"):
        pipe(_image(20, 20, seed=1), process_size=PS, tile=32, tile_pad=40)


def _official_tile_starts(n: int, t: int, overlap: int) -> list[int]:
    """The official loop: origins i * (t - overlap) while the tile ends before ``n``, the last one snapped."""
    starts, o = [], 0
    while o + t < n:
        starts.append(o)
        o += t - overlap
    return sorted(set(starts + [n - t]))


def _official_gaussian(t: int) -> np.ndarray:
    """PiSA-SR's tile weights (float64): exp(-(i - (t-1)/2)^2 / t^2 / (2 * 0.01)) / sqrt(2 pi 0.01), outer product."""
    i = np.arange(t, dtype=np.float64)
    g = np.exp(-((i - (t - 1) / 2) ** 2) / (t * t) / 0.02) / np.sqrt(2 * np.pi * 0.01)
    return np.outer(g, g)


def test_tiled_vs_untiled(pipe):
    """VAE tiling (GroupNorm statistics over all tiles) agrees with the untiled VAE to <= 1e-3.

    Latent tiling cannot agree with the untiled run on the tiny random UNet (its prediction depends on the whole
    tile: measured, tile 12 / overlap 6 moves eps by 70 % of its mean size and the image by 0.08 on average), so
    it is checked against its definition instead: the official tiles, each one a plain UNet pass (the pipeline's
    untiled ``predict`` on that tile), blended with the official Gaussian weights, computed here in float64.
    The only difference left is float32 accumulation: <= 1e-5."""
    img = _image(36, 40, seed=5)  # latent 18 x 20 > 12 x 12
    ref = pipe(img, process_size=PS, latent_tile=0, vae_tile=0, color_fix="none")
    vae_tiled = pipe(img, process_size=PS, latent_tile=0, vae_tile=8, color_fix="none")
    assert np.abs(vae_tiled.pixels - ref.pixels).max() <= 1e-3

    t, ov = 12, 6
    lat = pipe(img, process_size=PS, latent_tile=t, latent_overlap=ov, vae_tile=0, color_fix="none",
               lambda_pix=0.7, lambda_sem=1.2, keep_predictions=True)
    assert lat.info["latent_tiles"] == (t, ov)
    st = lat.extras["redial_state"]
    z = st.z_L
    h, w = z.shape[-2:]
    ys, xs = _official_tile_starts(h, t, ov), _official_tile_starts(w, t, ov)
    assert (ys, xs) == ([0, 6], [0, 6, 8])
    acc = {k: np.zeros(z.shape, np.float64) for k in ("eps_pix", "eps_sem")}
    wsum = np.zeros((h, w), np.float64)
    g = _official_gaussian(t)
    for y0 in ys:
        for x0 in xs:
            tile = pipe.predict(z[..., y0:y0 + t, x0:x0 + t], adjustable=True, latent_tile=0)
            for k in acc:
                acc[k][..., y0:y0 + t, x0:x0 + t] += tile[k].double().numpy() * g
            wsum[y0:y0 + t, x0:x0 + t] += g
    for k in acc:
        assert np.abs(getattr(st, k).double().numpy() - acc[k] / wsum).max() <= 1e-5, k
    # the image is the decode of z_L minus those predictions mixed by the dials (144 x 160: no resize here)
    eps = 0.7 * acc["eps_pix"] / wsum + 1.2 * acc["eps_sem"] / wsum
    y = pipe.decode(z - torch.from_numpy(eps).float(), vae_tile=0)
    assert np.abs(lat.pixels - y[0].permute(1, 2, 0).numpy()).max() <= 1e-4


@pytest.mark.parametrize("hw", [(13, 11), (7, 5), (9, 16)])
def test_output_is_exactly_4x(pipe, hw):
    h, w = hw
    img = _image(h, w, seed=6)
    for mode in ("official", "pad"):
        out = pipe(img, process_size=PS, resize_mode=mode)
        assert out.pixels.shape == (4 * h, 4 * w, 3), mode
    rgba = np.concatenate([img, np.full((h, w, 1), 0.5, np.float32)], axis=2)
    out = pipe(rgba, process_size=64, lambda_sem=0.5)  # 64 // 4 = 16 > short side: the resize_flag path
    assert out.info["resize_flag"] and out.to_numpy().shape == (4 * h, 4 * w, 4)


def test_compat_official_output(pipe):
    """compat="official": the official script's output size (the processed size, or x4 after its 8-bit resize-back
    when the input was resized up) and 8-bit values; re-dial keeps the setting; 16-bit input is taken as 8-bit."""
    img = _image(13, 11, seed=6)
    out = pipe(img, process_size=PS, compat="official", lambda_sem=0.5, keep_predictions=True)
    assert out.info["compat"] == "official" and not out.info["resize_flag"]
    assert out.pixels.shape == (48, 40, 3)  # 52 x 44 resized (LANCZOS) to multiples of 8, and kept
    np.testing.assert_allclose(out.pixels * 255, np.rint(out.pixels * 255), atol=1e-3)
    again = pipe.redial(out.extras["redial_state"], 1.0, 0.5)
    assert again.info["compat"] == "official"
    np.testing.assert_array_equal(again.pixels, out.pixels)
    flagged = pipe(img, process_size=64, compat="official", color_fix="wavelet")  # 13 x 11 < 16: resize_flag
    assert flagged.info["resize_flag"] and flagged.pixels.shape == (52, 44, 3)
    np.testing.assert_allclose(flagged.pixels * 255, np.rint(flagged.pixels * 255), atol=1e-3)
    img16 = (img * 65535).round().astype(np.uint16)
    img8 = (img16 / 257.0).round().astype(np.uint8)
    np.testing.assert_array_equal(pipe(img16, process_size=PS, compat="official").pixels,
                                  pipe(img8, process_size=PS, compat="official").pixels)
    assert pipe(img, process_size=PS).pixels.shape == (52, 44, 3)  # the default: exactly 4x


def test_thin_image_tiles(pipe):
    """A latent side below the tile while h*w > tile^2: the official PiSA-SR code crashes (weights built for
    the unclamped tile); here the square tile is clamped to the short side and blended with matching weights."""
    img = _image(10, 72, seed=10)  # x4 = 40 x 288 px -> latent 5 x 36 > 8 x 8
    out = pipe(img, process_size=PS, latent_tile=8, latent_overlap=2, lambda_sem=0.8)
    assert out.info["latent_tiles"] == (5, 2)
    assert out.pixels.shape == (40, 288, 3) and np.isfinite(out.pixels).all()


def test_sample_posterior_is_seeded(pipe):
    img = _image(12, 12, seed=7)

    def run(seed):
        return pipe(img, process_size=PS, sample_posterior=True,
                    generator=torch.Generator().manual_seed(seed)).pixels
    a, b, c = run(1), run(1), run(2)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 0
    assert np.abs(a - pipe(img, process_size=PS).pixels).max() > 0


def test_fused_lora_matches_and_adjustable_still_works(pipe):
    img = _image(12, 10, seed=8)
    ref = pipe(img, process_size=PS, color_fix="none")
    adj = pipe(img, process_size=PS, color_fix="none", lambda_sem=0.5)
    pipe.fuse_lora()
    try:
        assert np.abs(pipe(img, process_size=PS, color_fix="none").pixels - ref.pixels).max() <= 1e-5
        assert np.abs(pipe(img, process_size=PS, color_fix="none", lambda_sem=0.5).pixels - adj.pixels).max() <= 1e-5
    finally:
        pipe.unfuse_lora()


def test_no_second_unet_copy(pipe):
    """The UNet holds the base weights (with the pixel LoRA merged) plus the semantic LoRA only."""
    from diffusers import UNet2DConditionModel

    from realisr.models import lora

    plain = UNet2DConditionModel.from_pretrained(str(onestep.sd_dir()), subfolder="unet")
    n_plain = sum(p.numel() for p in plain.parameters())
    sem = lora.lora_state_dict(pipe.unet)
    assert sem and all(k.split(".lora_")[1].split(".")[1].endswith("_sem") for k in sem)
    n_sem = sum(v.numel() for v in sem.values())
    assert sum(p.numel() for p in pipe.unet.parameters()) == n_plain + n_sem
    assert sum(b.numel() for b in pipe.unet.buffers()) == sum(b.numel() for b in plain.buffers())


def test_check_inputs(pipe):
    img = _image(8, 8)
    bad = [dict(color_fix="sharpen"), dict(default_mode=True, lambda_pix=0.5),
           dict(default_mode=True, keep_predictions=True), dict(lambda_pix="high"), dict(lambda_sem=float("nan")),
           dict(resize_mode="crop"), dict(process_size=0), dict(latent_tile=-1), dict(latent_overlap=-2),
           dict(lambda_pix=np.zeros((2, 3, 4), np.float32)), dict(compat="exact"), dict(compat=None),
           dict(compat="official", resize_mode="pad")]
    for kw in bad:
        with pytest.raises(ValueError):
            pipe(img, **kw)
    with pytest.raises(TypeError):
        pipe(img, prompt="a cat")
    with pytest.raises(ValueError):
        pipe.redial(object())


def test_reduced_precision(pipe):
    """dtype: fp32 on CPU by default; bf16 runs (UNet and VAE bf16) and stays close to fp32; fp16 pipelines
    keep the VAE in fp32 so the decoder cannot overflow into NaN/black images."""
    from realisr.pipelines.diffusion_common import vae_dtype_for
    from realisr.pipelines.pisa_sr.pipeline_pisa_sr import PiSASRPipeline
    from realisr.registry import get_spec

    assert pipe.dtype == torch.float32 and pipe.vae_dtype == torch.float32
    assert vae_dtype_for(torch.float16) == torch.float32 and vae_dtype_for(torch.bfloat16) == torch.bfloat16
    bf = PiSASRPipeline.from_spec(get_spec("pisa-sr"), device="cpu", dtype="bf16", sd=str(onestep.sd_dir()),
                                  checkpoint=str(onestep.golden_dir() / "pisa_sr.pkl"))
    assert bf.dtype == torch.bfloat16 and next(bf.unet.parameters()).dtype == torch.bfloat16
    img = _image(12, 12, seed=9)
    a = pipe(img, process_size=PS, lambda_sem=0.5).pixels
    b = bf(img, process_size=PS, lambda_sem=0.5).pixels
    assert np.isfinite(b).all() and b.shape == a.shape
    assert np.abs(a - b).mean() < 0.05
