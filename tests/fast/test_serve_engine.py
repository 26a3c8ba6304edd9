"""The work behind `realisr serve` without a browser: recipes and `realisr upscale --recipe`, the estimate
shown before a run (its tile grid is the number of UNet calls the run makes), limits, cancelling."""

import json

import numpy as np
import pytest

from realisr.cli.main import main
from realisr.recipe import Recipe, RecipeError, decode_mask, encode_mask, region_map


def test_recipe_round_trip_and_maps(tmp_path):
    mask = np.zeros((6, 8), np.uint8)
    mask[2:4, 5:8] = 255
    mask[2, 4] = 128
    r = Recipe(model="pisa-sr", args={"lambda_sem": 1.0, "lambda_pix": 0.5, "outscale": 2.0, "default_mode": False},
               seed=3, maps={"lambda_sem": {"mask_png": encode_mask(mask), "inside": 0.0}}, ext="tif")
    p = r.save(tmp_path / "r.json")
    back = Recipe.load(p)
    assert back.to_json() == r.to_json() and back.seed == 3 and back.ext == "tif"
    base, method = back.split_call((6, 8))
    assert base == {"outscale": 2.0} and method["lambda_pix"] == 0.5 and method["default_mode"] is False
    m = method["lambda_sem"]
    assert m.dtype == np.float32 and m.shape == (6, 8)
    assert m[0, 0] == 1.0 and m[3, 6] == 0.0 and abs(m[2, 4] - (1 - 128 / 255)) < 1e-6  # soft edges blend
    assert np.array_equal(decode_mask(r.maps["lambda_sem"]["mask_png"]), mask)
    assert np.allclose(region_map(mask, 2.0, 1.0)[2:4, 5:8], 2.0)
    with pytest.raises(RecipeError, match="belongs to the image it was painted on"):
        back.call_kwargs((7, 8))
    assert back.generator().initial_seed() == 3


@pytest.mark.parametrize("obj, msg", [
    ({"model": "x"}, "is not a realisr recipe"),
    ({"format": "realisr-recipe/1", "model": ""}, "must be a model id"),
    ({"format": "realisr-recipe/1", "model": "x", "args": {"a": [1]}}, "must be a number"),
    ({"format": "realisr-recipe/1", "model": "x", "args": {"a": float("nan")}}, "must be a number"),
    ({"format": "realisr-recipe/1", "model": "x", "maps": {"a": {"mask_png": "", "inside": 1}}}, "outside"),
    ({"format": "realisr-recipe/1", "model": "x", "seed": 1.5}, "seed"),
])
def test_bad_recipes_are_refused_with_a_reason(obj, msg):
    with pytest.raises(RecipeError, match=msg):
        Recipe.from_json(obj)


def test_upscale_recipe_refuses_flags_it_would_override(tmp_path, capsys):
    r = Recipe(model="bicubic", args={"outscale": 2.0}).save(tmp_path / "r.json")
    from PIL import Image

    Image.new("RGB", (8, 6), (10, 200, 30)).save(tmp_path / "in.png")
    assert main(["upscale", "-q", "--recipe", str(r), "-i", str(tmp_path / "in.png"), "-s", "3",
                 "-o", str(tmp_path / "o.png")]) == 1
    assert "--recipe replays its own settings: drop --outscale" in capsys.readouterr().err
    assert not (tmp_path / "o.png").exists()
    (tmp_path / "bad.json").write_text("{not json")
    assert main(["upscale", "-q", "--recipe", str(tmp_path / "bad.json"), "-i", str(tmp_path / "in.png")]) == 1
    assert "is not valid JSON" in capsys.readouterr().err
    # a recipe alone: model, outscale and format from it
    r2 = Recipe(model="bicubic", args={"outscale": 2.0}, ext="tif").save(tmp_path / "r2.json")
    assert main(["upscale", "-q", "--recipe", str(r2), "-i", str(tmp_path / "in.png"), "-o", str(tmp_path)]) == 0
    from realisr.io import read_image

    assert read_image(tmp_path / "in_out.tif").pixels.shape == (12, 16, 3)


def test_estimate_refuses_with_the_reason():
    from realisr.dials import dials_for
    from realisr.registry import get_spec
    from realisr.ui.estimate import Limits, estimate_run

    spec = get_spec("realesrgan-x4plus")
    d = dials_for(spec)
    e = estimate_run(spec, d, 300, 200, {}, device="cpu", limits=Limits(max_pixels=50_000), available=10**11)
    assert e.out_size == (1200, 800) and "over this server's limit of 50,000 pixels" in e.refused
    e = estimate_run(spec, d, 300, 200, {"outscale": 2.0}, device="cpu", limits=Limits(max_output_pixels=100_000),
                     available=10**11)
    assert e.out_size == (600, 400) and "output would be 600 x 400" in e.refused
    e = estimate_run(spec, d, 300, 200, {"tile": 0}, device="cpu", limits=Limits(), available=10**8)
    assert e.grid is None and "of memory and cpu has 100.0 MB free" in e.refused and "smaller tile" in e.refused
    e = estimate_run(spec, d, 300, 200, {"tile": 128}, device="cpu", limits=Limits(), available=10**11)
    assert e.refused is None and e.grid[:3] == (2, 3, 128) and not e.measured and "rough prior" in e.markdown()


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    pytest.importorskip("diffusers")
    import os
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from helpers.onestep import golden_dir, one_thread, sd_dir

    from realisr.ui.engine import Engine
    from realisr.ui.estimate import Limits

    root = tmp_path_factory.mktemp("engine")
    (root / "w").mkdir()
    (root / "w" / "pisa_sr.pkl").symlink_to(golden_dir() / "pisa_sr.pkl")
    saved = {k: os.environ.get(k) for k in ("REALISR_WEIGHTS", "REALISR_SD")}
    os.environ.update(REALISR_WEIGHTS=str(root / "w"), REALISR_SD=str(sd_dir()))
    # memory refusals depend on what the shared machine has free right now: tested with fixed numbers above
    eng = Engine(["pisa-sr"], device="cpu", root=root / "s", limits=Limits(check_memory=False))
    eng.pipeline("pisa-sr")  # loaded: the estimate no longer counts the weights as memory still to find
    with one_thread():
        yield eng
    eng.close()
    for k, v in saved.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def _upload(engine, tmp_path, size):
    from realisr.io import ImageData, write_image

    rng = np.random.default_rng(0)
    p = tmp_path / "up" / "photo.png"
    write_image(p, ImageData(pixels=rng.random((*size, 3)).astype(np.float32)), overwrite=True)
    s = engine.session("t")
    (up,) = engine.add_uploads(s, [(str(p), "photo.png")])
    return s, up


def test_estimate_grid_is_the_number_of_unet_calls(engine, tmp_path):
    s, up = _upload(engine, tmp_path, (80, 96))
    values = {"process_size": 64, "tile": "64"}  # 64 input px = 32 latents; the 40x48 latent needs 2x2 tiles
    est = engine.estimate("pisa-sr", up, values)
    assert est.grid == (2, 2, 32, "latent") and est.out_size == (384, 320) and est.refused is None
    pipe = engine.pipeline("pisa-sr")
    calls, forward = [], pipe.unet.forward
    pipe.unet.forward = lambda *a, **k: calls.append(1) or forward(*a, **k)
    try:
        res = engine.render(s, up.key, engine.recipe("pisa-sr", values))
        assert res.kind == "full" and len(calls) == 4  # one batched call per latent tile
        assert (res.output.image.width, res.output.image.height) == est.out_size
        again = engine.render(s, up.key, engine.recipe("pisa-sr", {**values, "lambda_pix": 0.3}))
        assert again.kind == "redial" and len(calls) == 4
        moved = engine.render(s, up.key, engine.recipe("pisa-sr", {**values, "process_size": 72}))
        assert moved.kind == "full" and len(calls) > 4  # a full-run dial runs the model again
    finally:
        pipe.unet.forward = forward
    engine.close_session("t")


def test_cancel_stops_the_run(engine, tmp_path):
    from realisr.ui.engine import Cancelled

    s, up = _upload(engine, tmp_path, (36, 44))
    stages = []

    def progress(ev):
        stages.append(ev.stage)
        s.cancel.set()  # the Cancel button, pressed during the run

    with pytest.raises(Cancelled):
        engine.render(s, up.key, engine.recipe("pisa-sr", {"process_size": 64}), progress)
    assert stages and s.last is None and s.state is None
    res = engine.render(s, up.key, engine.recipe("pisa-sr", {"process_size": 64}),
                        lambda ev: stages.append(ev.stage))
    assert res.kind == "full" and {"vae_encode", "unet", "vae_decode"} <= set(stages)
    engine.close_session("t")


def test_messages_hide_server_paths(engine, tmp_path):
    from realisr.ui.engine import redact

    assert redact("cannot read /srv/data/x.png now") == "cannot read x.png now"
    assert redact("input image /home/u/.cache/a/in.png is 9x9") == "input image in.png is 9x9"
    s = engine.session("p")
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(Exception) as e:
        engine.add_uploads(s, [(str(bad), "broken.png")])
    assert str(tmp_path) not in str(e.value) and "broken.png" in str(e.value)
    ok, detail = engine.status("pisa-sr")
    assert ok and str(tmp_path) not in detail and "/" not in json.dumps(detail).replace("\\/", "")
    engine.close_session("p")


def test_ccsr_dials_from_its_description_render_and_replay(tmp_path):
    """CCSR gets its controls from its dial description (preset, steps, seed...): a run through the engine and
    `realisr upscale --recipe` on the recipe give the same image (the seed makes the sampler repeatable)."""
    pytest.importorskip("diffusers")
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from helpers import ccsr as H
    from helpers.onestep import one_thread

    from realisr.io import read_image
    from realisr.ui.engine import Engine
    from realisr.ui.estimate import Limits

    weights, sd = str(H.weights_dir(H.ccsr_dir())), str(H.tiny_sd_dir(H.ccsr_dir()))
    eng = Engine(["ccsr"], device="cpu", load_kwargs={"ccsr": {"weights": weights, "sd": sd}},
                 limits=Limits(check_memory=False), root=tmp_path / "s")
    try:
        names = eng.dials("ccsr").names()
        assert {"preset", "steps", "seed", "prompt", "guidance_scale"} <= set(names)
        s, up = _upload(eng, tmp_path, (16, 16))
        recipe = eng.recipe("ccsr", {"preset": "two-step", "steps": "4", "seed": 3, "process_size": 64,
                                     "prompt": ""})
        assert recipe.seed == 3 and recipe.args["preset"] == "two-step" and recipe.args["steps"] == 4
        assert "prompt" not in recipe.args  # empty: the preset's prompt
        with one_thread():
            res = eng.render(s, up.key, recipe)
            dl = eng.write_result(s)
            r = eng.write_recipe(s)
            assert main(["upscale", "-q", "--recipe", str(r), "--ccsr", weights, "--sd", sd, "-i", str(up.path),
                         "-o", str(tmp_path / "cli.png")]) == 0
        assert res.kind == "full" and res.output.image.width == 64
        assert np.array_equal(read_image(tmp_path / "cli.png").pixels, read_image(dl).pixels)
        other = eng.recipe("ccsr", {"preset": "two-step", "steps": "4", "seed": 4, "process_size": 64})
        with one_thread():
            assert not np.array_equal(eng.render(s, up.key, other).output.pixels, res.output.pixels)
    finally:
        eng.close()
