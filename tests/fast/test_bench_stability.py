"""``realisr bench --seeds N``: CCSR's stability protocol (G-STD of every metric, L-STD, best / worst run per
image) in the CSV, JSON and HTML outputs, and deterministic methods reported as such.

* a hand-computed example: cached outputs of known constant grey levels, so that PSNR (BT.601 Y, black
  reference: ``20 log10(255^2 / (219 L))``), its population std over runs and L-STD (``std(L) / 255``) have
  closed forms;
* the tiny models: PiSA-SR, whose output does not depend on the seed, has G-STD = L-STD = 0 when re-run;
  CCSR, which samples, does not.
"""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from PIL import Image

from helpers import ccsr as H
from helpers.onestep import one_thread
from helpers.fixtures import fixture_set, tiny_sd_dir


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_thread():  # the shared 2-core box thrashes with more threads
        yield


def _grey(path, level: int, size: int = 16):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), level, np.uint8)).save(path)


LEVELS = {"a": [10, 20, 40], "b": [30, 30, 60]}  # grey level of run k (seed k) per image


def _psnr_black(level: int) -> float:
    return 20 * math.log10(255.0 ** 2 / (219.0 * level))


def test_hand_computed_g_std_and_l_std(tmp_path):
    from realisr.cli.main import main

    lq, hq, out = tmp_path / "LQ", tmp_path / "HQ", tmp_path / "run"
    for name, levels in LEVELS.items():
        _grey(lq / f"{name}.png", 50, 4)
        _grey(hq / f"{name}.png", 0)
        for k, level in enumerate(levels):  # `ccsr` samples: its 3 runs are cached, no weights needed
            _grey(out / "sr" / "ccsr" / (f"{name}.png" if k == 0 else f"seed-{k}/{name}.png"), level)
    rc = main(["-q", "bench", "--lq", str(lq), "--hq", str(hq), "-m", "ccsr", "-m", "bicubic", "--metrics", "psnr",
               "--protocol", "ccsr", "--seeds", "3", "-o", str(out)])
    assert rc == 0
    s = json.loads((out / "summary.json").read_text())
    ccsr, bic = s["methods"]
    psnr = {n: [_psnr_black(v) for v in lv] for n, lv in LEVELS.items()}
    mean = float(np.mean([v for vs in psnr.values() for v in vs]))
    gstd = float(np.mean([np.std(vs) for vs in psnr.values()]))
    lstd = float(np.mean([np.std(lv) / 255.0 for lv in LEVELS.values()]))
    assert ccsr["runs"] == 3 and ccsr["stochastic"]
    assert ccsr["means"]["psnr"] == pytest.approx(mean, abs=1e-9)
    assert ccsr["gstd"]["psnr"] == pytest.approx(gstd, abs=1e-9)
    assert ccsr["lstd"] == pytest.approx(lstd, abs=1e-12)
    a = ccsr["per_image"]["a"]
    assert a["lstd"] == pytest.approx(np.std([10, 20, 40]) / 255.0, abs=1e-12)
    assert (a["best"]["seed"], a["worst"]["seed"]) == (0, 2)
    assert a["best"]["psnr"] == pytest.approx(_psnr_black(10)) and a["std"]["psnr"] == pytest.approx(np.std(psnr["a"]))
    assert ccsr["per_image"]["b"]["worst"]["seed"] == 2
    assert bic["runs"] == 1 and not bic["stochastic"] and bic["stability"].startswith("deterministic")
    # CSV: one row per run in results.csv; stability.csv per image and for the set
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted((r["image"], r["seed"]) for r in rows if r["method"] == "ccsr") == \
        [(n, str(k)) for n in ("a", "b") for k in range(3)]
    with open(out / "stability.csv") as f:
        st = {(r["method"], r["image"]): r for r in csv.DictReader(f)}
    assert float(st[("ccsr", "*")]["psnr_std"]) == pytest.approx(gstd, abs=1e-6)
    assert float(st[("ccsr", "*")]["lstd"]) == pytest.approx(lstd, abs=1e-6)
    assert st[("ccsr", "a")]["best_seed"] == "0" and st[("ccsr", "a")]["worst_seed"] == "2"
    assert st[("bicubic", "*")]["lstd"] == "deterministic"
    html = (out / "report.html").read_text()
    assert "id='stability'" in html and "Stability over 3 seeds" in html
    assert "ccsr best: seed 0" in html and "ccsr worst: seed 2" in html
    assert "deterministic: the output does not depend on the seed" in html


def _tiny_pairs(root):
    """Two 64x64 crops of a real photo (HQ) and their bicubic /4 (LQ)."""
    from skimage import data

    photo = data.astronaut()
    (root / "HQ").mkdir(parents=True)
    (root / "LQ").mkdir()
    for name, (y, x) in {"x": (40, 180), "y": (250, 300)}.items():
        hq = Image.fromarray(photo[y:y + 64, x:x + 64])
        hq.save(root / "HQ" / f"{name}.png")
        hq.resize((16, 16), Image.BICUBIC).save(root / "LQ" / f"{name}.png")
    return root / "LQ", root / "HQ"


def test_tiny_models_seed_independent_is_zero_and_ccsr_is_not(tmp_path, capsys):
    from realisr.cli.main import main

    golden = fixture_set("golden")
    lq, hq = _tiny_pairs(tmp_path / "data")
    sd = tiny_sd_dir(golden)
    pisa = f"pisa-sr:load.sd={sd},load.checkpoint={golden / 'pisa_sr.pkl'},load.device=cpu,process_size=64"
    ccsr = f"ccsr:load.sd={sd},load.weights={H.weights_dir()},load.device=cpu,process_size=64"
    out = tmp_path / "run"
    rc = main(["bench", "--lq", str(lq), "--hq", str(hq), "-m", pisa, "-m", ccsr, "--metrics", "psnr,ssim",
               "--protocol", "ccsr", "--seeds", "3", "--rerun-deterministic", "-o", str(out), "--crops", "1"])
    assert rc == 0
    printed = capsys.readouterr().out
    s = json.loads((out / "summary.json").read_text())
    p, c = s["methods"]
    assert p["runs"] == 3 and not p["stochastic"]  # re-run on request although it does not sample
    assert p["lstd"] == 0.0 and p["gstd"] == {"psnr": 0.0, "ssim": 0.0}
    assert c["runs"] == 3 and c["stochastic"]
    assert c["lstd"] > 1e-3 and c["gstd"]["psnr"] > 0 and c["gstd"]["ssim"] > 0
    assert not s["failures"], s["failures"]
    assert "L-STD" in printed
    print(f"\ntiny-model stability (3 seeds, 2 crops 16x16 -> 64x64): pisa-sr {p['gstd']} L-STD {p['lstd']}; "
          f"ccsr mean {c['means']} G-STD {c['gstd']} L-STD {c['lstd']:.5f}")
