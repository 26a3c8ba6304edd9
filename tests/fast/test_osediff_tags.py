"""OSEDiff with its official prompt: the DAPE tags of the processed LQ, ``"<tags>, <user prompt>,"``, when the
tagger files are in the checkpoints folder (the tiny RAM + DAPE of the golden-seesr set, the tiny SD and
``osediff.pkl`` of the golden set); ``--no-tags``; without the files one message that it runs untagged."""

from __future__ import annotations

import logging

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("peft")

from helpers import onestep  # noqa: E402
from helpers.fixtures import fixture_set  # noqa: E402

from realisr.cli.main import main  # noqa: E402
from realisr.io import read_image  # noqa: E402

PS = 64
RAM_DIR = fixture_set("golden-seesr") / "ram"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with onestep.one_thread():
        yield


@pytest.fixture()
def setup(tmp_path, monkeypatch):
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "osediff.pkl").symlink_to(onestep.golden_dir() / "osediff.pkl")
    monkeypatch.setenv("REALISR_WEIGHTS", str(weights))
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:20, 0:24]
    base = np.stack([np.cos(xx / 3) + np.sin(yy / 4), np.sin(xx / 6), np.cos((xx - yy) / 5)], -1) * 0.25 + 0.5
    arr = (np.clip(base + rng.normal(0, 0.03, base.shape), 0, 1) * 255).round().astype(np.uint8)
    from PIL import Image

    src = tmp_path / "in.png"
    Image.fromarray(arr).save(src)
    return tmp_path, weights, src, arr


def _official_processed_lq(arr: np.ndarray) -> np.ndarray:
    """test_osediff.py's geometry with PIL: short side to process_size/4 (bicubic), x4 bicubic, LANCZOS to a
    multiple of 8; the image DAPE sees."""
    from PIL import Image

    im = Image.fromarray(arr)
    w, h = im.size
    if w < PS // 4 or h < PS // 4:
        s = (PS // 4) / min(w, h)
        im = im.resize((int(s * w), int(s * h)))
    im = im.resize((im.size[0] * 4, im.size[1] * 4))
    im = im.resize((im.size[0] - im.size[0] % 8, im.size[1] - im.size[1] % 8), Image.LANCZOS)
    return np.asarray(im)


def test_default_prompt_is_built_from_the_dape_tags(setup):
    from realisr import load_pipeline
    from realisr.tagging import load_tagger

    tmp, weights, src, arr = setup
    (weights / "ram").symlink_to(RAM_DIR)
    pipe = load_pipeline("osediff", sd=str(onestep.sd_dir()), device="cpu", dtype="fp32")
    assert pipe.tagger is not None and pipe.tagger.kind == "dape"
    tags = load_tagger("dape", root=RAM_DIR, device="cpu").prompt(_official_processed_lq(arr))
    assert tags  # the tiny model tags this image
    with torch.inference_mode():
        out = pipe(arr, process_size=PS, color_fix="none")
        user = pipe(arr, process_size=PS, color_fix="none", prompt="a photo")
        no_tags = pipe(arr, process_size=PS, color_fix="none", tags=False)
    assert out.info["tags"] == tags
    assert out.info["prompt"] == f"{tags}, ,"  # the official f"{tags}, {user_prompt}," (cf. "cat, dog, grass, ,")
    assert user.info["prompt"] == f"{tags}, a photo,"
    assert no_tags.info["prompt"] == "" and no_tags.info["tags"] is None
    # the prompt reaches the UNet: same output as the untagged pipeline given that text
    plain = onestep.osediff_pipeline(True)
    with torch.inference_mode():
        ref = plain(arr, process_size=PS, color_fix="none", prompt=f"{tags}, ,")
    assert np.abs(out.pixels - ref.pixels).max() <= 1e-5
    assert np.abs(out.pixels - no_tags.pixels).max() > 1e-4


def test_cli_tags_no_tags_and_untagged_message(setup, caplog):
    tmp, weights, src, arr = setup
    src2 = tmp / "in2.png"
    src2.write_bytes(src.read_bytes())

    def run(*args):
        return main(["upscale", "--sd", str(onestep.sd_dir()), "--process-size", str(PS), "-m", "osediff",
                     "--color-fix", "none", *map(str, args)])

    # without the tagger files: one message for the whole folder, the images still made
    folder = tmp / "folder"
    folder.mkdir()
    for p in (src, src2):
        (folder / p.name).write_bytes(p.read_bytes())
    with caplog.at_level(logging.WARNING):
        assert run("-i", folder, "-o", tmp / "untagged") == 0
    msgs = [r.getMessage() for r in caplog.records if "runs untagged" in r.getMessage()]
    assert len(msgs) == 1 and "DAPE.pth" in msgs[0]
    assert len(list((tmp / "untagged").glob("*.png"))) == 2
    # with them: tagged by default, --no-tags gives the untagged result
    (weights / "ram").symlink_to(RAM_DIR)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert run("-i", src, "-o", tmp / "tagged.png") == 0
        assert run("-i", src, "-o", tmp / "notags.png", "--no-tags") == 0
    assert not [r for r in caplog.records if "runs untagged" in r.getMessage()]
    tagged, notags = read_image(tmp / "tagged.png").pixels, read_image(tmp / "notags.png").pixels
    untagged = read_image(tmp / "untagged" / "in_out.png").pixels
    assert np.abs(notags - untagged).max() == 0
    assert np.abs(tagged - notags).max() > 1 / 255


def test_bench_records_the_tags(setup):
    import csv
    import json

    from PIL import Image

    from realisr.bench.runner import BenchConfig, run_benchmark

    tmp, weights, src, arr = setup
    (weights / "ram").symlink_to(RAM_DIR)
    lq, hq = tmp / "lq", tmp / "hq"
    lq.mkdir()
    hq.mkdir()
    Image.fromarray(arr).save(lq / "a.png")
    Image.fromarray(arr).resize((arr.shape[1] * 4, arr.shape[0] * 4), Image.BICUBIC).save(hq / "a.png")
    method = f"osediff:load.sd={onestep.sd_dir()},process_size={PS},color_fix=none"
    s = run_benchmark(BenchConfig(lq_dir=lq, hq_dir=hq, out_dir=tmp / "bench", methods=[method], metrics=["psnr"],
                                  device="cpu", dtype="fp32", report=False))
    from realisr.tagging import load_tagger

    tags = load_tagger("dape", root=RAM_DIR, device="cpu").prompt(_official_processed_lq(arr))
    (entry,) = s["methods"]
    assert list(entry["tags"].values()) == [tags]
    assert json.loads((tmp / "bench" / "summary.json").read_text())["methods"][0]["tags"] == entry["tags"]
    with open(tmp / "bench" / "results.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert row["tags"] == tags
