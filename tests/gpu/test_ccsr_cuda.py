"""CUDA checks of the CCSR pipeline on the golden-ccsr tiny model: CUDA fp32 equals the CPU (the random draws
come from the CPU generator, so both see the same noise), fp16/bf16 stay close to fp32 with a VAE precision
that cannot overflow, and latent tiling / the CFG batch work on the device. Skipped without CUDA."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from helpers import ccsr as H  # noqa: E402
from helpers.fixtures import tiny_sd_dir  # noqa: E402

pytestmark = pytest.mark.gpu
KW = dict(process_size=64)


def _cuda(dtype):
    import realisr

    root = H.ccsr_dir()
    return realisr.load_pipeline("ccsr", device="cuda", dtype=dtype, sd=str(tiny_sd_dir(root)),
                                 weights=str(H.weights_dir(root)))


def _image(h=32, w=40, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture(autouse=True)
def _exact_fp32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def test_auto_dtype_and_placement():
    pipe = _cuda("auto")
    expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    assert pipe.dtype == expected
    for m in (pipe.unet, pipe.controlnet, pipe.vae):
        assert next(m.parameters()).device.type == "cuda"
    assert pipe.vae_dtype == (torch.bfloat16 if expected == torch.bfloat16 else torch.float32)


@pytest.mark.parametrize("preset,tile", [("one-step", 0), ("two-step", 0), ("two-step", 8)])
def test_cuda_fp32_matches_cpu(preset, tile):
    img = _image()
    args = dict(KW, preset=preset, latent_tile=tile, latent_overlap=4)
    with torch.inference_mode():
        a = H.pipeline()(img, generator=torch.Generator().manual_seed(0), **args)
        b = _cuda("fp32")(img, generator=torch.Generator().manual_seed(0), **args)
    assert a.pixels.shape == b.pixels.shape == (128, 160, 3)
    assert b.info["latent_tiles"] == ((8, 4) if tile else None)
    # x0 at t=999 multiplies eps errors by ~14.6: a slightly looser bound than the one-step pipelines'
    assert np.abs(a.pixels - b.pixels).max() < 3e-3


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("preset", ["one-step", "two-step"])
def test_half_dtypes_close_to_fp32(dtype, preset):
    if dtype == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("no bf16 on this GPU")
    img = _image(seed=1)
    ref, half = _cuda("fp32"), _cuda(dtype)
    if dtype == "fp16":
        assert half.vae_dtype == torch.float32  # the SD VAE can overflow fp16: encode and decode stay fp32
    with torch.inference_mode():
        a = ref(img, preset=preset, generator=torch.Generator().manual_seed(0), **KW).pixels
        b = half(img, preset=preset, generator=torch.Generator().manual_seed(0), **KW).pixels
    assert np.isfinite(b).all()
    diff = np.abs(a - b)
    # The same comparison on the CPU (tiny model, this image, both presets): fp16 mean 0.0001, q99 0.0005, max
    # 0.0012; bf16 mean 0.0023, q99 0.0095, max 0.024. Bounds with ~10x margin; a wrong dtype path, scale or NaN
    # gives far more.
    mean_max, q99_max = (0.002, 0.01) if dtype == "fp16" else (0.02, 0.1)
    assert diff.mean() < mean_max and np.quantile(diff, 0.99) < q99_max, (diff.mean(), np.quantile(diff, 0.99))
