"""The fidelity delta shipped with realisr on the real Real-ESRGAN x4plus: file, provenance, the dial through
the API and the CLI."""

import json

import numpy as np
from PIL import Image
from safetensors import safe_open

import realisr
from realisr.cli.main import main
from realisr.registry import get_spec
from realisr.weights.fidelity import DELTA_FORMAT, delta_path


def test_packaged_delta_is_small_and_documented():
    path = delta_path(get_spec("realesrgan-x4plus"))
    assert path.is_file() and path.stat().st_size < 5_000_000
    assert (path.parent / "NOTICE").is_file() and "BSD 3-Clause" in (path.parent / "NOTICE").read_text()
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        names = list(f.keys())
    assert meta["format"] == DELTA_FORMAT and meta["base_model"] == "realesrgan-x4plus"
    assert "BSD-3-Clause" in meta["license"]
    recipe = json.loads(meta["recipe"])
    assert recipe["method"] == "realesrgan-fidelity" and recipe["data"]["degradation"] == "pisa-sr"
    photos = json.loads(meta["training_photos"])
    assert photos and not {"mate-bac-raindrops.png", "plasma-w-autumn.png"} & set(photos)  # eval-split photos
    assert all(n.startswith(("model.1.sub.21.", "model.1.sub.22.", "model.1.sub.23.", "model.3.", "model.6.",
                             "model.8.", "model.10.")) for n in names)


def test_realesrgan_dial_through_the_api(photo):
    pipe = realisr.load_pipeline("realesrgan-x4plus", device="cpu")
    img = photo[180:196, 200:216]
    plain = pipe(img, tile=0).pixels
    assert np.array_equal(pipe(img, tile=0, fidelity=0).pixels, plain)
    one = pipe(img, tile=0, fidelity=1.0).pixels
    half = pipe(img, tile=0, fidelity=0.5).pixels
    d1, dh = np.abs(one - plain).mean(), np.abs(half - plain).mean()
    assert d1 > 1e-3 and 0 < dh < d1
    assert np.array_equal(pipe(img, tile=0).pixels, plain)


def test_fidelity_from_the_cli(tmp_path, photo, capsys):
    Image.fromarray(photo[180:196, 200:216]).save(tmp_path / "in.png")
    rc = main(["-q", "upscale", "-i", str(tmp_path / "in.png"), "-o", str(tmp_path / "a"), "-m", "realesrgan-x4plus",
               "--fidelity", "0.5", "-t", "0"])
    assert rc == 0 and Image.open(tmp_path / "a" / "in_out.png").size == (64, 64)
    mask = np.zeros((16, 16), np.uint8)
    mask[:, 8:] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    rc = main(["-q", "upscale", "-i", str(tmp_path / "in.png"), "-o", str(tmp_path / "b"), "-m", "realesrgan-x4plus",
               "--fidelity", str(tmp_path / "mask.png"), "-t", "0"])
    assert rc == 0 and (tmp_path / "b" / "in_out.png").is_file()
    capsys.readouterr()
    rc = main(["-q", "upscale", "-i", str(tmp_path / "in.png"), "-o", str(tmp_path / "c"), "-m", "bicubic",
               "--fidelity", "0.5"])
    assert rc == 1 and "--fidelity needs a model with a fidelity dial" in capsys.readouterr().err
