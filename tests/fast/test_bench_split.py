"""`realisr bench-data build --split`: a fixed train/eval split of the source photos, so that realisr's own
training (the fidelity delta) never sees a benchmark image."""

import json

import pytest
from PIL import Image

from realisr.bench.data import BenchDataError, build_benchmark_data, photo_split
from realisr.cli.main import main


def test_split_rule_is_fixed():
    # the rule: eval iff crc32("<source>/<name>") % 3 == 0 (these are the photos of the built benchmark)
    assert [photo_split("skimage", n) for n in ("astronaut", "chelsea", "coffee", "rocket", "stereo_motorcycle")] \
        == ["train"] * 5
    assert photo_split("mate-backgrounds", "RainDrops") == "eval"
    assert photo_split("plasma-workspace-wallpapers", "Autumn") == "eval"
    assert photo_split("mate-backgrounds", "Aqua") == "train"


def test_train_split_writes_full_photos_only(tmp_path):
    build_benchmark_data(tmp_path / "b", sources=("skimage",), split="train")
    files = sorted(p.name for p in (tmp_path / "b" / "train").glob("*.png"))
    assert files == ["skimage-astronaut.png", "skimage-chelsea.png", "skimage-coffee.png", "skimage-rocket.png",
                     "skimage-stereo_motorcycle.png"]
    assert Image.open(tmp_path / "b" / "train" / "skimage-astronaut.png").size == (512, 512)  # full resolution
    assert not (tmp_path / "b" / "HQ").exists() and not (tmp_path / "b" / "LQ").exists()
    saved = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert saved["split"] == "train" and len(saved["images"]) == 5
    assert all(e["split"] == "train" for e in saved["images"])
    with pytest.raises(BenchDataError, match="eval split"):  # no scikit-image photo is in the eval split
        build_benchmark_data(tmp_path / "c", sources=("skimage",), split="eval")


def test_split_from_the_cli(tmp_path, capsys):
    rc = main(["-q", "bench-data", "build", "-o", str(tmp_path / "t"), "--sources", "skimage", "--split", "train"])
    assert rc == 0 and len(list((tmp_path / "t" / "train").glob("*.png"))) == 5
