"""The bf16 bounds of the registry: every model ``dtype="auto"`` may run in bf16 on a CPU keeps its promise.

``bf16_psnr_db`` is the PSNR of a model's bf16 output against its fp32 output that the registry states. GAN
models are checked on real photos (24x24 crops of five scikit-image photos, at their own resolution: what a
user feeds), the diffusion models on the golden tiny models and inputs. bf16 arithmetic runs on any CPU (emulated
and slower without AMX), so these tests run everywhere; only the speed needs the units.
"""

from __future__ import annotations

import numpy as np
import pytest

from helpers.onestep import one_thread
from realisr.registry import list_models

SPECS = list_models()
# the GAN models whose weights ship with realisr (measurable here); user-brought ones (EA-Adam) state no bound
# and run fp32 under auto
GAN = [s for s in SPECS if s.pipeline.endswith(":GANPipeline") and s.weights.kind != "user"]
DIFFUSION = [s for s in SPECS if s.weights.kind == "user" and s.bf16_psnr_db is not None]


def _pooled_psnr(a: list, b: list) -> float:
    d = np.concatenate([(x.astype(np.float64) - y.astype(np.float64)).ravel() for x, y in zip(a, b)])
    return float(10 * np.log10(1.0 / np.mean(d * d)))


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_thread():  # the shared 2-core box thrashes with more threads
        yield


@pytest.mark.parametrize("spec", SPECS, ids=[s.id for s in SPECS])
def test_bound_is_declared_where_bf16_is_possible(spec):
    """A bound needs bf16 support, and every bundled GAN model has one (so auto can use the units)."""
    if spec.bf16_psnr_db is not None:
        assert "bfloat16" in spec.dtypes and spec.bf16_psnr_db > 0
    if spec in GAN:
        assert spec.bf16_psnr_db is not None and spec.bf16_psnr_db >= 45.0, \
            f"{spec.id}: GAN models state a bf16 bound of at least 45 dB"


def _photo_crops(side: int = 24) -> list:
    import skimage.data

    camera = np.repeat(skimage.data.camera()[..., None], 3, axis=2)
    boxes = [(skimage.data.astronaut(), 100, 200), (skimage.data.coffee(), 140, 240),
             (skimage.data.chelsea(), 100, 190), (skimage.data.rocket(), 190, 240), (camera, 120, 240)]
    return [np.ascontiguousarray(a[y:y + side, x:x + side, :3]) for a, y, x in boxes]


@pytest.mark.parametrize("spec", GAN, ids=[s.id for s in GAN])
def test_gan_bf16_within_bound_on_real_photos(spec):
    import realisr
    from realisr.weights.status import weights_status

    ok, why = weights_status(spec)
    if not ok:
        pytest.fail(f"{spec.id}: weights of a bundled model are missing: {why}")
    crops = _photo_crops()
    fp32 = realisr.load_pipeline(spec.id, device="cpu", dtype="fp32")
    bf16 = realisr.load_pipeline(spec.id, device="cpu", dtype="bf16")
    a = [fp32(c, tile=0).pixels for c in crops]
    outs = [bf16(c, tile=0) for c in crops]
    assert {o.info["dtype"] for o in outs} == {"bfloat16"}
    b = [o.pixels for o in outs]
    assert all(np.isfinite(x).all() for x in b)
    psnr = _pooled_psnr(a, b)
    assert psnr >= spec.bf16_psnr_db, f"{spec.id}: bf16 is {psnr:.1f} dB from fp32, bound {spec.bf16_psnr_db}"
    # bf16 is not fp32 in disguise: the outputs differ (a cast that silently ran fp32 would give inf dB)
    assert psnr < 90


# -- diffusion: golden tiny models ------------------------------------------------------------------------
_GOLDEN_INPUTS = {"in0": dict(process_size=64), "in1": dict(process_size=96),
                  "in2": dict(process_size=64, latent_tile=8, latent_overlap=4)}  # as the golden cases ran


def _golden_runs(spec):
    pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    from helpers import onestep

    root = onestep.golden_dir()
    lqs = {k: np.load(root / "inputs" / k / "lq.npy")[0].transpose(1, 2, 0) for k in _GOLDEN_INPUTS}
    if spec.id == "pisa-sr":
        pipes = {dt: onestep.pisa_pipeline(dtype=dt) for dt in ("fp32", "bf16")}
        settings = [dict(), dict(lambda_pix=0.5, lambda_sem=1.5)]  # default mode and the adjustable mode
    elif spec.id == "osediff":
        pipes = {dt: onestep.osediff_pipeline(dtype=dt) for dt in ("fp32", "bf16")}
        settings = [dict(prompt="cat, dog, grass, ,")]
    else:
        pytest.fail(f"{spec.id}: declares a bf16 bound but this test has no golden inputs for it")
    return pipes, lqs, settings


@pytest.mark.parametrize("spec", DIFFUSION, ids=[s.id for s in DIFFUSION])
def test_diffusion_bf16_finite_and_within_bound_on_golden_models(spec):
    import torch

    pipes, lqs, settings = _golden_runs(spec)
    bf = pipes["bf16"]
    assert next(bf.unet.parameters()).dtype == torch.bfloat16
    assert next(bf.vae.encoder.parameters()).dtype == torch.bfloat16
    assert bf.vae_dtype in (torch.bfloat16, torch.float32)  # the decoder never runs in fp16 (overflow)
    assert bf.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)  # where it pays: CPU bf16
    for extra in settings:
        a, b = [], []
        for name, lq in lqs.items():
            kw = dict(_GOLDEN_INPUTS[name], color_fix="adain", **extra)
            a.append(pipes["fp32"](lq, **kw).pixels)
            out = pipes["bf16"](lq, **kw)
            assert out.info["dtype"] == "bfloat16"
            assert np.isfinite(out.pixels).all()
            b.append(out.pixels)
        psnr = _pooled_psnr(a, b)
        assert spec.bf16_psnr_db <= psnr < 90, (spec.id, extra, psnr)
