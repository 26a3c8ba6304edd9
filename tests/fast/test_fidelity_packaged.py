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
    assert recipe["fidelity"]["objective"] == "lowpass-l1" and meta["steps"] == "800"  # docs/fidelity-dial.md
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


def test_fidelity_refusals_before_loading(tmp_path, capsys):
    """A model without a delta (a GAN one included) is refused before anything loads; bad values at parsing."""
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "in.png")
    rc = main(["-q", "upscale", "-i", str(tmp_path / "in.png"), "-o", str(tmp_path / "o"), "-m", "realsr-df2k-x4",
               "--fidelity", "0.5"])
    err = capsys.readouterr().err
    assert rc == 1 and "--fidelity needs a model with a fidelity dial (realesrgan-x4plus), not realsr-df2k-x4" in err
    assert not (tmp_path / "o").exists()
    for bad in ("1.5", "-0.1", "nan", "no-such-map.png"):
        try:
            main(["-q", "upscale", "-i", str(tmp_path / "in.png"), "-m", "realesrgan-x4plus", "--fidelity", bad])
        except SystemExit as e:
            assert e.code == 2
        else:
            raise AssertionError(f"--fidelity {bad} was accepted")
        assert "--fidelity" in capsys.readouterr().err


def test_a_fidelity_map_goes_through_the_batch_settings(tmp_path, monkeypatch):
    """--fidelity MAP reaches the call as a float array (white = 1) and the job key follows the map's content."""
    from realisr.cli import upscale

    mask = np.zeros((40, 60), np.uint8)
    mask[:, 30:] = 255
    Image.fromarray(mask).save(tmp_path / "m.png")
    mask[20, 10] = 255  # inside: a printed (summarised) array would not show it
    Image.fromarray(mask).save(tmp_path / "m2.png")
    seen = []
    parser = __import__("argparse").ArgumentParser()
    upscale.add_arguments(parser)
    for name in ("m.png", "m2.png", "0.25"):
        value = str(tmp_path / name) if name.endswith(".png") else name
        args = parser.parse_args(["-i", "x.png", "-m", "realesrgan-x4plus", "--fidelity", value])
        seen.append(upscale._settings(args, lambda msg: None))
    fmap = seen[0].call_args["fidelity"]
    assert fmap.dtype == np.float32 and fmap.shape == (40, 60)
    assert np.array_equal(fmap, np.where(np.arange(60) >= 30, 1.0, 0.0)[None].repeat(40, 0).astype(np.float32))
    assert seen[2].call_args["fidelity"] == 0.25
    keys = [json.dumps(s.job_key_fields(), sort_keys=True, default=str) for s in seen]
    assert len(set(keys)) == 3


def test_fidelity_dial_in_the_web_app_engine_and_its_recipe(tmp_path, photo):
    """`realisr serve`'s engine shows the fidelity dial for realesrgan-x4plus, renders a value and a painted region
    as the pipeline does, and `realisr upscale --recipe` replays the painted one to the same pixels."""
    from realisr.io import ImageData, read_image, write_image
    from realisr.ui.engine import Engine
    from realisr.ui.estimate import Limits

    eng = Engine(["realesrgan-x4plus"], device="cpu", root=tmp_path / "s", limits=Limits(check_memory=False))
    try:
        assert eng.dials("realesrgan-x4plus").get("fidelity").spatial
        img = photo[180:196, 200:216]
        write_image(tmp_path / "in.png", ImageData(pixels=img.astype(np.float32) / 255), overwrite=True)
        s = eng.session("t")
        (up,) = eng.add_uploads(s, [(str(tmp_path / "in.png"), "in.png")])
        pipe = realisr.load_pipeline("realesrgan-x4plus", device="cpu")
        res = eng.render(s, up.key, eng.recipe("realesrgan-x4plus", {"fidelity": 0.5, "tile": 0}))
        assert res.kind == "full"
        assert np.array_equal(res.output.pixels, pipe(read_image(up.path), tile=0, fidelity=0.5).pixels)
        mask = np.zeros((16, 16), np.uint8)
        mask[:, 8:] = 255  # painted (the app's brush: 255 inside)
        recipe = eng.recipe("realesrgan-x4plus", {"fidelity": 0.0, "tile": 0}, mask=mask, brush_dial="fidelity",
                            brush_value=1.0)
        painted = eng.render(s, up.key, recipe)
        want = pipe(read_image(up.path), tile=0, fidelity=mask.astype(np.float32) / 255).pixels
        assert np.array_equal(painted.output.pixels, want)
        assert not np.array_equal(want, pipe(read_image(up.path), tile=0).pixels)
        dl, r = eng.write_result(s), eng.write_recipe(s)
        assert main(["upscale", "-q", "--recipe", str(r), "-i", str(up.path), "-o", str(tmp_path / "cli.png")]) == 0
        assert np.array_equal(read_image(tmp_path / "cli.png").pixels, read_image(dl).pixels)
    finally:
        eng.close()
