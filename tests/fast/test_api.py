"""The public Python API and the shared pipeline behaviour (inputs, alpha, grey, outscale, errors)."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import realisr
from realisr.errors import UnknownModelError
from realisr.io import ImageData


def test_import_is_light():
    code = ("import sys, realisr, realisr.registry, realisr.cli.main; "
            "heavy = [m for m in ('torch', 'diffusers', 'peft', 'gradio', 'transformers', 'spandrel') "
            "if m in sys.modules]; print(heavy); sys.exit(1 if heavy else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.fixture(scope="module")
def pipe():
    return realisr.load_pipeline("bicubic")


def test_accepts_pil_numpy_torch_and_agree(pipe, photo):
    crop = photo[:24, :30]
    a = pipe(Image.fromarray(crop)).pixels
    b = pipe(crop).pixels
    c = pipe(torch.from_numpy(crop).permute(2, 0, 1).float() / 255).pixels
    d = pipe(crop.astype(np.float32) / 255).pixels
    assert a.shape == (96, 120, 3)
    for other in (b, c, d):
        assert np.abs(a - other).max() < 1e-6


def test_bicubic_matches_pillow(pipe, photo):
    crop = photo[50:90, 60:110]
    ours = pipe(crop).to_numpy()
    ref = np.stack([np.asarray(Image.fromarray(crop[..., i]).resize((200, 160), Image.BICUBIC))
                    for i in range(3)], axis=2)
    diff = np.abs(ours.astype(int) - ref.astype(int))
    assert diff.max() <= 1


def test_alpha_is_upscaled_separately_and_reattached(pipe, photo):
    rgba = np.dstack([photo[:20, :20], np.zeros((20, 20), np.uint8)])
    rgba[5:15, 5:15, 3] = 255
    out = pipe(Image.fromarray(rgba, "RGBA"))
    assert out.image.alpha is not None and out.image.alpha.shape == (80, 80)
    assert out.image.alpha[40, 40] == pytest.approx(1.0, abs=1e-6)
    assert out.image.alpha[2, 2] == pytest.approx(0.0, abs=1e-6)
    assert out.to_pil().mode == "RGBA"


def test_grey_stays_grey(pipe, photo):
    grey = np.asarray(Image.fromarray(photo[:16, :16]).convert("L"))
    out = pipe(grey)
    assert out.pixels.shape == (64, 64, 1) and out.to_pil().mode == "L"


def test_outscale_any_float_and_exact_size(pipe):
    x = np.random.default_rng(0).random((17, 23, 3), dtype=np.float32)
    for s, size in [(2.5, (42, 58)), (1.0, (17, 23)), (0.5, (8, 12)), (3.3, (56, 76))]:
        out = pipe(x, outscale=s)
        assert out.pixels.shape[:2] == size


def test_metadata_survives(pipe):
    data = ImageData(pixels=np.full((8, 8, 3), 0.5, np.float32), bit_depth=16, icc_profile=b"icc", exif=b"ex")
    out = pipe(data)
    assert out.image.bit_depth == 16 and out.image.icc_profile == b"icc" and out.image.exif == b"ex"


@pytest.mark.parametrize("bad,exc,msg", [
    (np.zeros((4, 4, 5), np.uint8), ValueError, "1-4 channels"),
    (np.full((4, 4, 3), 2.0, np.float32), ValueError, r"\[0, 1\]"),
    (torch.zeros(2, 3, 4, 4), ValueError, "batch"),
    ("not an image", TypeError, "unsupported image type"),
])
def test_bad_inputs(pipe, bad, exc, msg):
    with pytest.raises(exc, match=msg):
        pipe(bad)


@pytest.mark.parametrize("kw,msg", [({"outscale": -1}, "outscale"), ({"tile": 3}, "tile"),
                                    ({"lambda_pix": 1.0}, "unexpected")])
def test_bad_arguments(pipe, kw, msg):
    with pytest.raises((ValueError, TypeError), match=msg):
        pipe(np.zeros((4, 4, 3), np.uint8), **kw)


def test_unknown_model():
    with pytest.raises(UnknownModelError, match="realisr models"):
        realisr.load_pipeline("nope")


def test_upscale_shortcut(photo):
    out = realisr.upscale(photo[:8, :8], model="lanczos", outscale=2)
    assert out.pixels.shape == (16, 16, 3)
