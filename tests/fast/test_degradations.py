"""Tests of realisr.train.degradations: presets = official configs, sampled ranges, seeding, measurable effects
(JPEG blocks, noise std, kernel moments, sinc cut-off), sizes, CPU/CUDA, and the `realisr degrade` CLI."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

from realisr.errors import RealisrError
from realisr.train.degradations import (
    PRESETS,
    Degrader,
    bivariate_kernel,
    circular_lowpass_kernel,
    gaussian_noise,
    get_preset,
    jpeg_compress,
    poisson_noise,
    sample_kernels,
    sample_params,
    usm_sharp,
)
from realisr.train.degradations.kernels import KERNEL_TYPES

PI = math.pi
KPROB = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)

# The official values, typed in from the official configs (PiSA-SR src/datasets/params.yml, OSEDiff
# params_realesrgan.yml, CCSR params_ccsr.yml, SeeSR utils_data/make_paired_data.py; the table "Presets" in
# docs/degradations.md). Keys: (sigma1, betag1, betap1, resize_range1, noise1, poisson1, jpeg1,
# second_blur_prob, sigma2, betag2, betap2, resize_range2, noise2, poisson2, jpeg2, usm)
OFFICIAL = {
    "pisa-sr": ((0.2, 3), (0.5, 4), (1, 2), (0.3, 1.5), (1, 15), (0.05, 2.0), (60, 95),
                0.5, (0.2, 1.5), (0.5, 4), (1, 2), (0.6, 1.2), (1, 12), (0.05, 1.0), (60, 100), False),
    "osediff": ((0.2, 3), (0.5, 4), (1, 2), (0.15, 1.5), (1, 30), (0.05, 3.0), (30, 95),
                0.8, (0.2, 1.5), (0.5, 4), (1, 2), (0.3, 1.2), (1, 25), (0.05, 2.5), (30, 95), False),
    "ccsr": ((0.2, 1.5), (0.5, 2), (1, 1.5), (0.3, 1.5), (1, 15), (0.05, 2.0), (60, 95),
             0.5, (0.2, 1.0), (0.5, 2), (1, 1.5), (0.6, 1.2), (1, 12), (0.05, 1.0), (60, 100), False),
    "seesr": ((0.2, 3), (0.5, 4), (1, 2), (0.15, 1.5), (1, 30), (0.05, 3.0), (30, 95),
              0.8, (0.2, 1.5), (0.5, 4), (1, 2), (0.3, 1.2), (1, 25), (0.05, 2.5), (30, 95), True),
}


def _smooth_image(n=1, h=64, w=64, seed=0):
    """A smooth colour image (low-frequency random field) in [0.1, 0.9]."""
    g = torch.Generator().manual_seed(seed)
    small = torch.rand(n, 3, h // 16 + 1, w // 16 + 1, generator=g)
    img = torch.nn.functional.interpolate(small, size=(h, w), mode="bicubic", align_corners=True)
    return (0.1 + 0.8 * img).clamp(0, 1)


def _photo(h=96, w=96):
    from skimage import data

    im = data.astronaut()[100:100 + h, 150:150 + w]
    return torch.from_numpy(im.copy()).permute(2, 0, 1)[None].float() / 255.0


# --------------------------------------------------------------------------------------------- presets


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_preset_values_equal_official_configs(name):
    p = get_preset(name)
    (s1, bg1, bp1, rr1, n1, po1, j1, sb2, s2, bg2, bp2, rr2, n2, po2, j2, usm) = OFFICIAL[name]
    assert p.scale == 4
    assert tuple(p.kernel_range) == (7, 9, 11, 13, 15, 17, 19, 21) and p.kernel_pad_to == 21
    assert tuple(p.kernel_list) == KERNEL_TYPES and tuple(p.kernel_list2) == KERNEL_TYPES
    assert tuple(p.kernel_prob) == KPROB and tuple(p.kernel_prob2) == KPROB
    assert p.sinc_prob == 0.1 and p.sinc_prob2 == 0.1 and p.final_sinc_prob == 0.8
    assert tuple(p.blur_sigma) == s1 and tuple(p.betag_range) == bg1 and tuple(p.betap_range) == bp1
    assert tuple(p.resize_prob) == (0.2, 0.7, 0.1) and tuple(p.resize_range) == rr1
    assert p.gaussian_noise_prob == 0.5 and tuple(p.noise_range) == n1 and tuple(p.poisson_scale_range) == po1
    assert p.gray_noise_prob == 0.4 and tuple(p.jpeg_range) == j1
    assert p.second_blur_prob == sb2
    assert tuple(p.blur_sigma2) == s2 and tuple(p.betag_range2) == bg2 and tuple(p.betap_range2) == bp2
    assert tuple(p.resize_prob2) == (0.3, 0.4, 0.3) and tuple(p.resize_range2) == rr2
    assert p.gaussian_noise_prob2 == 0.5 and tuple(p.noise_range2) == n2 and tuple(p.poisson_scale_range2) == po2
    assert p.gray_noise_prob2 == 0.4 and tuple(p.jpeg_range2) == j2
    assert tuple(p.resize_modes) == ("area", "bilinear", "bicubic")
    assert p.usm_sharpen is usm
    assert tuple(p.rotation_range) == pytest.approx((-PI, PI))


def test_unknown_preset_is_a_user_error():
    with pytest.raises(RealisrError, match="osediff"):
        get_preset("nope")


# --------------------------------------------------------------------------------------------- sampled ranges


def _check_kernel_params(prm, prefix, sigma, betag, betap, sinc_prob, n):
    ks = prm[f"{prefix}_kernel_size"]
    assert set(ks.tolist()) <= {7, 9, 11, 13, 15, 17, 19, 21} and len(set(ks.tolist())) == 8
    sinc = prm[f"{prefix}_sinc"]
    assert abs(sinc.float().mean().item() - sinc_prob) < 0.04
    om = prm[f"{prefix}_omega_c"][sinc]
    small = ks[sinc] < 13
    assert (om[small] >= PI / 3).all() and (om[~small] >= PI / 5).all() and (om <= PI).all()
    assert (om[~small] < PI / 3).any()  # the wider range is used for large kernels
    kt = prm[f"{prefix}_kernel_type"][~sinc]
    freq = torch.bincount(kt, minlength=6).double() / len(kt)
    assert torch.allclose(freq, torch.tensor(KPROB, dtype=torch.float64), atol=0.05)
    sx, sy, th, beta = (prm[f"{prefix}_{k}"][~sinc] for k in ("sigma_x", "sigma_y", "theta", "beta"))
    for s in (sx, sy):
        assert (s >= sigma[0]).all() and (s <= sigma[1]).all()
    iso = torch.tensor([KERNEL_TYPES[i].endswith("_iso") or KERNEL_TYPES[i] == "iso" for i in kt.tolist()])
    assert torch.equal(sx[iso], sy[iso]) and (th[iso] == 0).all()
    assert (th[~iso].abs() <= PI).all() and (sx[~iso] != sy[~iso]).all()
    gen = (kt == 2) | (kt == 3)
    plat = (kt == 4) | (kt == 5)
    assert (beta[gen] >= betag[0]).all() and (beta[gen] <= betag[1]).all()
    assert (beta[plat] >= betap[0]).all() and (beta[plat] <= betap[1]).all()
    assert ((beta[gen] < 1).float().mean() - 0.5).abs() < 0.1  # half from [b0, 1), half from [1, b1)
    assert torch.isnan(beta[(kt == 0) | (kt == 1)]).all()


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_sampled_parameters_stay_in_configured_ranges(name):
    p = get_preset(name)
    n = 1500
    prm = sample_params(p, n, torch.Generator().manual_seed(123))
    _check_kernel_params(prm, "k1", p.blur_sigma, p.betag_range, p.betap_range, p.sinc_prob, n)
    _check_kernel_params(prm, "k2", p.blur_sigma2, p.betag_range2, p.betap_range2, p.sinc_prob2, n)
    for key in ("kernel1", "kernel2", "sinc_kernel"):
        k = prm[key]
        assert k.shape == (n, 21, 21)
        assert torch.allclose(k.sum((1, 2)), torch.ones(n), atol=1e-5)
    # kernels are zero outside their size
    ks = prm["k1_kernel_size"]
    small = torch.nonzero(ks == 7).flatten()[:5]
    assert (prm["kernel1"][small][:, :7, :].abs().sum() == 0) and (prm["kernel1"][small][:, 7:14, 7:14].sum(
        (1, 2)) - 1).abs().max() < 1e-5
    assert abs(prm["sinc_sinc"].float().mean().item() - p.final_sinc_prob) < 0.04
    assert ((prm["sinc_omega_c"][prm["sinc_sinc"]] - 2 * PI / 3).abs() <= PI / 3 + 1e-9).all()
    for stage, probs, rng in ((1, p.resize_prob, p.resize_range), (2, p.resize_prob2, p.resize_range2)):
        t, s = prm[f"resize{stage}_type"], prm[f"resize{stage}_scale"]
        freq = torch.bincount(t, minlength=3).double() / n
        assert torch.allclose(freq, torch.tensor(probs, dtype=torch.float64), atol=0.05)
        assert ((s[t == 0] >= 1) & (s[t == 0] <= rng[1])).all()
        assert ((s[t == 1] >= rng[0]) & (s[t == 1] <= 1)).all()
        assert (s[t == 2] == 1).all()
        assert set(prm[f"resize{stage}_mode"].tolist()) == {0, 1, 2}
    for stage, gp, nr, pr, gray, jr in ((1, p.gaussian_noise_prob, p.noise_range, p.poisson_scale_range,
                                         p.gray_noise_prob, p.jpeg_range),
                                        (2, p.gaussian_noise_prob2, p.noise_range2, p.poisson_scale_range2,
                                         p.gray_noise_prob2, p.jpeg_range2)):
        g = prm[f"noise{stage}_gaussian"]
        assert abs(g.float().mean().item() - gp) < 0.05
        sig = prm[f"noise{stage}_sigma"][g]
        ps = prm[f"noise{stage}_poisson_scale"][~g]
        assert (sig >= nr[0]).all() and (sig <= nr[1]).all() and sig.max() > nr[0] + 0.9 * (nr[1] - nr[0])
        assert (ps >= pr[0]).all() and (ps <= pr[1]).all()
        assert abs(prm[f"noise{stage}_gray"].float().mean().item() - gray) < 0.05
        q = prm[f"jpeg{stage}_quality"]
        assert (q >= jr[0]).all() and (q <= jr[1]).all() and q.min() < jr[0] + 1 and q.max() > jr[1] - 1
    assert abs(prm["blur2_apply"].float().mean().item() - p.second_blur_prob) < 0.05
    assert abs(prm["final_order"].float().mean().item() - 0.5) < 0.05


def test_shared_resize_draws_once_per_batch():
    prm = sample_params(get_preset("osediff"), 8, torch.Generator().manual_seed(0), shared_resize=True)
    for k in ("resize1_scale", "resize1_mode", "resize2_scale", "final_order", "final_mode"):
        assert (prm[k] == prm[k][0]).all()
    assert len(set(prm["jpeg1_quality"].tolist())) == 8  # the rest stays per sample


# --------------------------------------------------------------------------------------------- kernels


def _formula_kernel(kind, size, sx, sy, th, beta=None, wc=None, pad_to=21):
    """Straightforward per-pixel evaluation of BasicSR's kernel formulas (numpy/math), zero-padded."""
    from scipy.special import j1

    c, s = math.cos(th), math.sin(th)
    r = np.array([[c, -s], [s, c]])
    inv = np.linalg.inv(r @ np.diag([sx * sx, sy * sy]) @ r.T) if kind != "sinc" else None
    k = np.zeros((size, size))
    half = size // 2
    for i in range(size):
        for j in range(size):
            x, y = j - half, i - half  # x: column offset, y: row offset
            if kind != "sinc":
                q = inv[0, 0] * x * x + (inv[0, 1] + inv[1, 0]) * x * y + inv[1, 1] * y * y
            if kind == "gaussian":
                k[i, j] = math.exp(-0.5 * q)
            elif kind == "generalized":
                k[i, j] = math.exp(-0.5 * q**beta)
            elif kind == "plateau":
                k[i, j] = 1.0 / (q**beta + 1)
            else:
                rad = math.hypot(x, y)
                k[i, j] = wc**2 / (4 * math.pi) if rad == 0 else wc * j1(wc * rad) / (2 * math.pi * rad)
    k /= k.sum()
    p = (pad_to - size) // 2
    return np.pad(k, p)


@pytest.mark.parametrize("kind,size,sx,sy,th,beta", [
    ("gaussian", 21, 2.5, 2.5, 0.0, None),
    ("gaussian", 15, 2.7, 0.6, 0.7, None),
    ("generalized", 13, 1.8, 0.9, -2.1, 0.6),
    ("generalized", 21, 1.2, 1.2, 0.0, 3.5),
    ("plateau", 9, 1.1, 2.4, 1.3, 1.7),
    ("plateau", 21, 2.0, 2.0, 0.0, 1.0),
])
def test_kernels_match_the_formula(kind, size, sx, sy, th, beta):
    def t(v):
        return torch.tensor(v, dtype=torch.float64)

    ours = bivariate_kernel(kind, t([sx]), t([sy]), t([th]), None if beta is None else t([beta]),
                            kernel_size=torch.tensor([size]), pad_to=21)[0].numpy()
    np.testing.assert_allclose(ours, _formula_kernel(kind, size, sx, sy, th, beta), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("size,wc", [(7, 2.5), (13, 1.0), (21, PI / 3)])
def test_sinc_kernel_matches_the_formula(size, wc):
    ours = circular_lowpass_kernel(torch.tensor([wc], dtype=torch.float64), torch.tensor([size]), pad_to=21)[0].numpy()
    # torch's float64 J1 is a rational approximation good to ~1e-6 relative (scipy's is exact to 1e-15)
    np.testing.assert_allclose(ours, _formula_kernel("sinc", size, 0, 0, 0, wc=wc), rtol=1e-5, atol=1e-10)


def test_gaussian_kernels_have_the_configured_second_moments():
    """Sampled iso/aniso kernels sum to 1 and their covariance is R diag(sx^2, sy^2) R^T."""
    prm = sample_kernels(get_preset("osediff"), 400, torch.Generator().manual_seed(5))
    ax = torch.arange(21, dtype=torch.float64) - 10
    yy, xx = torch.meshgrid(ax, ax, indexing="ij")
    checked = 0
    for i in range(400):
        if prm["k1_sinc"][i] or int(prm["k1_kernel_type"][i]) not in (0, 1):
            continue
        sx, sy, th = (float(prm[f"k1_{k}"][i]) for k in ("sigma_x", "sigma_y", "theta"))
        size = int(prm["k1_kernel_size"][i])
        if min(sx, sy) < 0.8 or 3.2 * max(sx, sy) > size // 2:  # discretisation / truncation would bias
            continue
        k = prm["kernel1"][i].double()
        assert abs(k.sum().item() - 1) < 1e-5
        m = torch.tensor([[(k * xx * xx).sum(), (k * xx * yy).sum()], [(k * xx * yy).sum(), (k * yy * yy).sum()]])
        c, s = math.cos(th), math.sin(th)
        expect = torch.tensor([[c * c * sx * sx + s * s * sy * sy, c * s * (sx * sx - sy * sy)],
                               [c * s * (sx * sx - sy * sy), s * s * sx * sx + c * c * sy * sy]])
        assert torch.allclose(m.double(), expect.double(), atol=0.03 * max(sx, sy) ** 2), (sx, sy, th, size)
        checked += 1
    assert checked >= 20


@pytest.mark.parametrize("wc", [PI / 3, PI / 2, 2.0])
def test_sinc_filter_cuts_off_at_omega_c(wc):
    k = circular_lowpass_kernel(torch.tensor([wc], dtype=torch.float64), 21)[0]
    ax = torch.arange(21, dtype=torch.float64) - 10

    def response(w, direction):
        px, py = math.cos(direction), math.sin(direction)
        yy, xx = torch.meshgrid(ax, ax, indexing="ij")
        return (k * torch.cos(w * (px * xx + py * yy))).sum().item()

    for d in (0.0, PI / 4):
        assert abs(response(0.0, d) - 1) < 1e-9
        assert abs(response(0.5 * wc, d) - 1) < 0.12  # pass band
        assert 0.35 < response(wc, d) < 0.65  # the cut-off (half amplitude)
        assert abs(response(1.5 * wc, d)) < 0.15  # stop band


# --------------------------------------------------------------------------------------------- JPEG


def _block_ratio(img):
    """Mean |horizontal + vertical gradient| across 8x8 block boundaries / within blocks."""
    dx = (img[..., :, 1:] - img[..., :, :-1]).abs()
    dy = (img[..., 1:, :] - img[..., :-1, :]).abs()
    bx = torch.zeros(dx.shape[-1], dtype=torch.bool)
    bx[7::8] = True
    by = torch.zeros(dy.shape[-2], dtype=torch.bool)
    by[7::8] = True
    across = torch.cat([dx[..., bx].flatten(), dy[..., by, :].flatten()]).mean()
    within = torch.cat([dx[..., ~bx].flatten(), dy[..., ~by, :].flatten()]).mean()
    return (across / within).item()


def test_jpeg_blockiness_appears_at_low_quality():
    x = _smooth_image(2, 64, 64)
    assert _block_ratio(x) < 1.1
    low = jpeg_compress(x, torch.tensor([10.0, 15.0]))
    high = jpeg_compress(x, 95.0)
    assert _block_ratio(low) > 1.5
    assert _block_ratio(high) < _block_ratio(low)
    assert (low - x).abs().mean() > (high - x).abs().mean()
    assert low.shape == x.shape and low.min() >= 0 and low.max() <= 1


def test_jpeg_close_to_a_real_encoder():
    """With the standard table orientation our JPEG is within a fraction of PIL's own coding error."""
    from PIL import Image

    x = _photo(96, 96)
    im = (x[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    for q in (20, 60):
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, "JPEG", quality=q, subsampling=2)
        pil = torch.from_numpy(np.array(Image.open(buf))).permute(2, 0, 1)[None].float() / 255
        ours = jpeg_compress(x, float(q), standard_tables=True)
        assert (ours - pil).abs().mean() < 0.4 * (pil - x).abs().mean()


def test_jpeg_handles_sizes_that_are_not_multiples_of_16():
    x = _smooth_image(1, 37, 50)
    y = jpeg_compress(x, 50.0)
    assert y.shape == x.shape and (y - x).abs().mean() < 0.05


def test_differentiable_jpeg_passes_gradients():
    x = _smooth_image(1, 32, 32).requires_grad_(True)
    y = jpeg_compress(x, 30.0, differentiable=True)
    y.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    # the hard-rounding version has the same forward pass up to the cubic correction
    assert (y.detach() - jpeg_compress(x.detach(), 30.0)).abs().max() < 0.02


# --------------------------------------------------------------------------------------------- noise


def test_gaussian_noise_std_matches_sigma_on_a_flat_image():
    p = get_preset("osediff")
    prm = sample_params(p, 64, torch.Generator().manual_seed(3))
    g = prm["noise1_gaussian"]
    sig = prm["noise1_sigma"][g]
    gray = prm["noise1_gray"][g]
    flat = torch.full((len(sig), 3, 96, 96), 0.5)
    noise = gaussian_noise(flat, sig, gray, torch.Generator().manual_seed(0))
    std = noise.std(dim=(1, 2, 3)) * 255
    assert ((std >= p.noise_range[0] * 0.9) & (std <= p.noise_range[1] * 1.1)).all()
    assert torch.allclose(std, sig.float(), rtol=0.05)
    # grey noise is the same in the three channels, colour noise is not
    same = (noise[:, 0] == noise[:, 1]).flatten(1).all(1) & (noise[:, 1] == noise[:, 2]).flatten(1).all(1)
    assert torch.equal(same, gray)


def test_pipeline_noise_only_on_a_flat_image_has_configured_std():
    """Noise as the pipeline applies it (add_noise, with clamping), on a flat mid-grey image."""
    from realisr.train.degradations import add_noise

    p = get_preset("pisa-sr")
    n = 24
    prm = sample_params(p, n, torch.Generator().manual_seed(9))
    flat = torch.full((n, 3, 64, 64), 0.5)
    out = add_noise(flat, gaussian=torch.ones(n, dtype=torch.bool), sigma=prm["noise1_sigma"].nan_to_num(8.0),
                    poisson_scale=prm["noise1_poisson_scale"], gray=prm["noise1_gray"],
                    generator=torch.Generator().manual_seed(1))
    std = (out - flat).std(dim=(1, 2, 3)) * 255
    assert ((std >= p.noise_range[0] * 0.9) & (std <= p.noise_range[1] * 1.1)).all()
    assert out.min() >= 0 and out.max() <= 1


def test_poisson_noise_variance_follows_the_signal():
    """Real-ESRGAN's shot noise: var = img / vals * scale^2 with vals = 256 for an image with 256 levels."""
    ramp = torch.arange(256, dtype=torch.float32).div(255).repeat(64, 1)  # [64, 256], all 256 levels
    img = ramp.expand(3, -1, -1)[None].repeat(2, 1, 1, 1).contiguous()
    scale = torch.tensor([0.5, 2.0])
    noise = poisson_noise(img, scale, torch.tensor([False, True]), torch.Generator().manual_seed(0))
    expect = img[:, 0].mean(dim=(1, 2)) / 256 * scale**2
    var = noise.var(dim=(1, 2, 3))
    assert torch.allclose(var, expect, rtol=0.1)
    assert (noise[1, 0] == noise[1, 2]).all() and not (noise[0, 0] == noise[0, 2]).all()
    assert noise.mean().abs() < 0.01


# --------------------------------------------------------------------------------------------- pipeline


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_output_size_range_and_8bit_rounding(name):
    hq = _smooth_image(2, 64, 48)
    lq, prm = Degrader(get_preset(name))(hq, generator=torch.Generator().manual_seed(1))
    assert lq.shape == (2, 3, 16, 12) and lq.dtype == torch.float32
    assert lq.min() >= 0 and lq.max() <= 1
    assert torch.equal(lq * 255, (lq * 255).round())
    assert (lq - torch.nn.functional.interpolate(hq, size=(16, 12), mode="area")).abs().mean() < 0.25
    assert prm["kernel1"].shape == (2, 21, 21)


def test_resize_back_gives_hq_size():
    hq = _smooth_image(1, 64, 64)
    lq, _ = Degrader("pisa-sr")(hq, generator=torch.Generator().manual_seed(0), resize_back=True)
    assert lq.shape == hq.shape and torch.equal(lq * 255, (lq * 255).round())


def test_seed_reproduces_the_batch_bit_exactly_and_seeds_differ():
    hq = _smooth_image(3, 64, 64)
    deg = Degrader(get_preset("osediff"), device="cpu")
    a, pa = deg(hq, generator=torch.Generator().manual_seed(7))
    b, pb = deg(hq, generator=torch.Generator().manual_seed(7))
    c, pc = deg(hq, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    for k in pa:
        assert torch.equal(pa[k].nan_to_num(-1), pb[k].nan_to_num(-1)), k
    assert not torch.equal(a, c)
    assert not torch.equal(pa["jpeg1_quality"], pc["jpeg1_quality"])
    # samples of one batch are degraded differently
    assert not torch.equal(a[0], a[1])


def test_given_params_and_kernels_are_used():
    hq = _smooth_image(2, 64, 64)
    deg = Degrader("ccsr")
    prm = deg.sample_params(2, torch.Generator().manual_seed(0))
    a, _ = deg(hq, torch.Generator().manual_seed(5), params=prm)
    b, _ = deg(hq, torch.Generator().manual_seed(5), params=prm)
    assert torch.equal(a, b)
    ks = sample_kernels(get_preset("ccsr"), 2, torch.Generator().manual_seed(1))
    c, used = deg(hq, torch.Generator().manual_seed(5), params=prm, kernels=ks)
    assert torch.equal(used["kernel1"], ks["kernel1"]) and not torch.equal(a, c)


def test_shared_resize_batch_matches_official_model_style():
    hq = _smooth_image(4, 64, 64)
    lq, prm = Degrader("osediff", shared_resize=True)(hq, generator=torch.Generator().manual_seed(2))
    assert lq.shape == (4, 3, 16, 16) and (prm["resize2_scale"] == prm["resize2_scale"][0]).all()


def test_usm_sharpening_raises_edge_contrast_and_keeps_flat_areas():
    x = torch.full((1, 3, 64, 64), 0.3)
    x[..., 32:] = 0.7
    y = usm_sharp(x)
    assert y[..., 31].mean() < 0.3 - 0.01 and y[..., 32].mean() > 0.7 + 0.01
    flat = torch.full((1, 3, 64, 64), 0.4)
    assert torch.allclose(usm_sharp(flat), flat)


def test_too_small_input_is_rejected():
    with pytest.raises(ValueError, match="at least"):
        Degrader("pisa-sr")(torch.rand(1, 3, 8, 8))


@pytest.mark.gpu
def test_cuda_matches_cpu_with_a_cpu_generator():
    hq = _smooth_image(3, 96, 96)
    cpu, pc = Degrader("pisa-sr", device="cpu")(hq, generator=torch.Generator().manual_seed(4))
    gpu, pg = Degrader("pisa-sr", device="cuda")(hq.cuda(), generator=torch.Generator().manual_seed(4))
    assert gpu.is_cuda and gpu.shape == cpu.shape
    assert torch.equal(pc["jpeg2_quality"], pg["jpeg2_quality"])
    diff = (gpu.cpu() - cpu).abs()
    assert diff.mean() < 2 / 255 and (diff <= 3 / 255).float().mean() > 0.99
    # a CUDA generator works too and is reproducible
    g1, _ = Degrader("seesr", device="cuda")(hq.cuda(), generator=torch.Generator("cuda").manual_seed(1))
    g2, _ = Degrader("seesr", device="cuda")(hq.cuda(), generator=torch.Generator("cuda").manual_seed(1))
    assert torch.equal(g1, g2)


# --------------------------------------------------------------------------------------------- CLI


def test_cli_degrade_writes_lq_and_grid(tmp_path):
    from PIL import Image

    from realisr.cli.main import main

    hq_dir = tmp_path / "hq"
    hq_dir.mkdir()
    for i, (w, h) in enumerate([(64, 48), (56, 64)]):
        arr = (_smooth_image(1, h, w, seed=i)[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(arr).save(hq_dir / f"img{i}.png")
    (hq_dir / "notes.txt").write_text("not an image")
    out1, out2 = tmp_path / "lq1", tmp_path / "lq2"
    grid = tmp_path / "grid.png"
    rc = main(["-q", "degrade", "-i", str(hq_dir), "-o", str(out1), "--preset", "pisa-sr", "--seed", "0",
               "--grid", str(grid), "--grid-samples", "2", "--grid-cell", "32"])
    assert rc == 0
    files = sorted(p.name for p in out1.iterdir())
    assert files == ["img0.png", "img1.png"]
    assert Image.open(out1 / "img0.png").size == (16, 12)
    assert Image.open(out1 / "img1.png").size == (14, 16)
    assert Image.open(grid).size == (3 * 32, 2 * 32)  # rows: images; columns: HQ, written LQ, one more sample
    assert main(["-q", "degrade", "-i", str(hq_dir), "-o", str(out2), "--preset", "pisa-sr", "--seed", "0"]) == 0
    for name in files:
        assert np.array_equal(np.array(Image.open(out1 / name)), np.array(Image.open(out2 / name)))
    assert main(["-q", "degrade", "-i", str(hq_dir), "-o", str(out2), "--preset", "nope"]) == 1
    # existing outputs are skipped without --overwrite (as `realisr upscale`: a rerun resumes); a too small image
    # is a one-line user error
    stamp = {p.name: p.stat().st_mtime_ns for p in out2.iterdir()}
    assert main(["-q", "degrade", "-i", str(hq_dir), "-o", str(out2), "--preset", "pisa-sr", "--seed", "5"]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in out2.iterdir()} == stamp
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "tiny.png")
    assert main(["-q", "degrade", "-i", str(tmp_path / "tiny.png"), "-o", str(tmp_path / "t")]) == 1


def test_cli_module_and_train_package_import_without_torch():
    import subprocess
    import sys

    code = "import sys, realisr.train, realisr.cli.degrade; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
