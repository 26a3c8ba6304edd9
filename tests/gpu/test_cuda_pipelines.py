"""CUDA checks of the one-step pipelines: what only a GPU shows (fp16/bf16 numerics, device placement).

Skipped without CUDA (``tests/conftest.py``). On a GPU machine: ``python -m pytest -m gpu tests -q``, or
``bash benchmarks/gpu_session.sh``, which also runs the GPU benchmarks. The pipelines run on the golden fixture's
tiny SD-2.1-shaped model with the official-format checkpoints; the fp16 VAE check builds the full-size VAE.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from helpers.onestep import golden_dir, osediff_pipeline, pisa_pipeline, sd_dir  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("exact_fp32")]


def _image(h=40, w=56, seed=0):
    rng = np.random.default_rng(seed)
    small = rng.random((h // 8 + 2, w // 8 + 2, 3)).astype(np.float32)
    t = torch.nn.functional.interpolate(torch.from_numpy(small).permute(2, 0, 1)[None], size=(h, w), mode="bicubic")
    return (t[0].permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)


def _pisa_cuda(dtype):
    from realisr.pipelines.pisa_sr.pipeline_pisa_sr import PiSASRPipeline
    from realisr.registry import get_spec

    return PiSASRPipeline.from_spec(get_spec("pisa-sr"), device="cuda", dtype=dtype, sd=str(sd_dir()),
                                    checkpoint=str(golden_dir() / "pisa_sr.pkl"))


def _osediff_cuda(dtype):
    from realisr.pipelines.osediff.pipeline_osediff import OSEDiffPipeline
    from realisr.registry import get_spec

    return OSEDiffPipeline.from_spec(get_spec("osediff"), device="cuda", dtype=dtype, sd=str(sd_dir()),
                                     checkpoint=str(golden_dir() / "osediff.pkl"))


KW = dict(process_size=64)


def test_auto_dtype_on_cuda_is_bf16_with_a_bf16_vae():
    pipe = _pisa_cuda("auto")
    expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    assert pipe.dtype == expected
    assert next(pipe.unet.parameters()).device.type == "cuda"
    assert pipe.vae_dtype == (torch.bfloat16 if expected == torch.bfloat16 else torch.float32)


@pytest.mark.parametrize("kind", ["pisa-default", "pisa-adjustable", "osediff"])
def test_cuda_fp32_matches_cpu(kind):
    img = _image()
    args = dict(KW, lambda_pix=0.7, lambda_sem=1.3) if kind == "pisa-adjustable" else dict(KW)
    if kind.startswith("pisa"):
        cpu, gpu = pisa_pipeline(), _pisa_cuda("fp32")
    else:
        cpu, gpu = osediff_pipeline(), _osediff_cuda("fp32")
    gpu.processing = "host"  # the networks' numerics; the device pre/post has its own test (test_cuda_batch.py)
    with torch.inference_mode():
        a, b = cpu(img, **args).pixels, gpu(img, **args).pixels
    assert a.shape == b.shape == (160, 224, 3)
    assert np.abs(a - b).max() < 1e-3


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("kind", ["pisa-default", "pisa-adjustable", "osediff"])
def test_half_dtypes_close_to_fp32(kind, dtype):
    if dtype == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("no bf16 on this GPU")
    img = _image(seed=1)
    args = dict(KW, lambda_pix=0.7, lambda_sem=1.3) if kind == "pisa-adjustable" else dict(KW)
    make = _pisa_cuda if kind.startswith("pisa") else _osediff_cuda
    ref, half = make("fp32"), make(dtype)
    if dtype == "fp16":
        assert half.vae_dtype == torch.float32  # the SD VAE decoder can overflow fp16: it stays in fp32
    with torch.inference_mode():
        a, b = ref(img, **args).pixels, half(img, **args).pixels
    assert np.isfinite(b).all()
    diff = np.abs(a - b)
    # Bounds from the same comparison on the CPU (2026-11-26; PiSA-SR, adain, the worst case): fp16 mean 0.0010,
    # q99 0.012; bf16 mean 0.022, q99 0.24. The tiny random model amplifies rounding, and bf16 (8-bit mantissa,
    # bf16 VAE) rounds ~20x more than fp16 (11 bits, fp32 VAE). A wrong scale, dtype or NaN path gives far more.
    mean_max, q99_max = (0.005, 0.05) if dtype == "fp16" else (0.05, 0.4)
    assert diff.mean() < mean_max and np.quantile(diff, 0.99) < q99_max, (diff.mean(), np.quantile(diff, 0.99))


def test_redial_on_cuda_equals_a_fresh_run():
    pipe = _pisa_cuda("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    img = _image(64, 72, seed=2)
    with torch.inference_mode():
        out = pipe(img, keep_predictions=True, **KW)
        fresh = pipe(img, lambda_pix=0.4, lambda_sem=1.6, **KW).pixels
        re = pipe.redial(out.extras["redial_state"], 0.4, 1.6).pixels
    assert np.abs(fresh - re).max() < 2e-2  # the same half-precision passes; kept predictions are float32


def test_latent_and_vae_tiling_on_cuda_match_the_cpu():
    img = _image(64, 72, seed=3)
    args = dict(KW, latent_tile=12, latent_overlap=6, vae_tile=8, lambda_pix=0.8, lambda_sem=1.1)
    gpu = _pisa_cuda("fp32")
    gpu.processing = "host"
    with torch.inference_mode():
        a, b = pisa_pipeline()(img, **args), gpu(img, **args)
    assert b.info["latent_tiles"] == (12, 6)
    assert np.abs(a.pixels - b.pixels).max() < 1e-3


def test_full_size_vae_decode_stays_finite_in_the_half_pipelines():
    """The fp16 pipelines decode in fp32 (the SD VAE can overflow fp16 on some images); bf16 has fp32's range.
    Random weights rarely overflow, so the decoder's convs are scaled up and the latents made large; whether a
    plain fp16 decode of the same latents overflowed is printed for the record, not asserted."""
    from diffusers import AutoencoderKL

    from realisr.pipelines.diffusion_common import vae_decode, vae_dtype_for

    cfg = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
               block_out_channels=(128, 256, 512, 512), down_block_types=["DownEncoderBlock2D"] * 4,
               up_block_types=["UpDecoderBlock2D"] * 4, sample_size=768, scaling_factor=0.18215)
    torch.manual_seed(0)
    vae = AutoencoderKL(**cfg).eval().cuda()
    with torch.no_grad():  # make the decoder's activations large, as in the known fp16 overflow
        for m in vae.decoder.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.mul_(3.0)
    z = torch.randn(1, 4, 64, 64, device="cuda") * 4
    with torch.inference_mode():
        raw16 = vae.half().decode((z / 0.18215).half()).sample
        overflow = not bool(torch.isfinite(raw16).all())
        for name in ("fp16", "bf16"):
            dt = vae_dtype_for(getattr(torch, {"fp16": "float16", "bf16": "bfloat16"}[name]))
            y = vae_decode(vae.to(dt), z, device="cuda", dtype=dt)
            assert y.is_cuda and torch.isfinite(y).all() and 0 <= float(y.min()) and float(y.max()) <= 1
    print(f"plain fp16 decode of these latents overflowed: {overflow}")
