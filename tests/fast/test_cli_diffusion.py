"""`realisr upscale` with the one-step diffusion models, end to end on the golden fixture's tiny SD model and
official-format checkpoints (found in REALISR_WEIGHTS, as a user's would be)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from helpers.onestep import golden_dir, osediff_pipeline, pisa_pipeline, sd_dir  # noqa: E402

from realisr.cli.main import main  # noqa: E402
from realisr.io import read_image  # noqa: E402


@pytest.fixture()
def setup(tmp_path, monkeypatch):
    weights = tmp_path / "weights"
    weights.mkdir()
    for name in ("pisa_sr.pkl", "osediff.pkl"):
        (weights / name).symlink_to(golden_dir() / name)
    monkeypatch.setenv("REALISR_WEIGHTS", str(weights))
    rng = np.random.default_rng(0)
    small = torch.from_numpy(rng.random((6, 7, 3)).astype(np.float32)).permute(2, 0, 1)[None]
    img = torch.nn.functional.interpolate(small, size=(36, 44), mode="bicubic").clamp(0, 1)[0].permute(1, 2, 0)
    arr = (img.numpy() * 255).round().astype(np.uint8)
    from PIL import Image

    src = tmp_path / "in.png"
    Image.fromarray(arr).save(src)
    return tmp_path, src, arr


def _run(*args):
    return main(["upscale", "-q", "--sd", str(sd_dir()), "--process-size", "64", *map(str, args)])


def test_pisa_default_and_dials_match_the_api(setup):
    tmp, src, arr = setup
    assert _run("-m", "pisa-sr", "-i", src, "-o", tmp / "default.png") == 0
    assert _run("-m", "pisa-sr", "-i", src, "-o", tmp / "dial.png", "--lambda-pix", "0.5", "--lambda-sem", "1.5") == 0
    pipe = pisa_pipeline()
    with torch.inference_mode():
        ref_default = pipe(arr, process_size=64).pixels
        ref_dial = pipe(arr, process_size=64, lambda_pix=0.5, lambda_sem=1.5).pixels
    for name, ref in (("default.png", ref_default), ("dial.png", ref_dial)):
        got = read_image(tmp / name).pixels
        assert got.shape == (144, 176, 3)  # exactly 4x the input
        assert np.abs(got - ref).max() <= 1.5 / 255  # 8-bit rounding (+ the fused-LoRA default mode)
    assert np.abs(read_image(tmp / "default.png").pixels - read_image(tmp / "dial.png").pixels).mean() > 1e-3


def test_lambda_grid_writes_cells_and_a_contact_sheet(setup, monkeypatch):
    import gc
    import weakref
    from pathlib import Path

    import realisr.io

    tmp, src, arr = setup
    # each full-size cell is written as it comes and dropped: when a file is written, no earlier cell is still
    # held (the contact sheet keeps thumbnails)
    real_write = realisr.io.write_image
    cell_refs, held = [], []

    def spy(path, image, **kw):
        real_write(path, image, **kw)
        gc.collect()
        held.append(sum(r() is not None for r in cell_refs))
        if "_pix" in Path(path).name:
            cell_refs.append(weakref.ref(image.pixels))

    monkeypatch.setattr(realisr.io, "write_image", spy)
    assert _run("-m", "pisa-sr", "-i", src, "-o", tmp / "out.png", "--lambda-grid", "0,1;0.5,1,1.5") == 0
    assert len(cell_refs) == 6 and len(held) == 7 and max(held) == 0, held
    cells = sorted(p.name for p in tmp.glob("out_pix*_sem*.png"))
    assert cells == sorted(f"out_pix{p}_sem{s}.png" for p in ("0", "1") for s in ("0.5", "1", "1.5"))
    sheet = read_image(tmp / "out_grid.png").pixels
    assert sheet.shape[1] == 3 * 176 and sheet.shape[0] == 2 * (144 + 18)  # 2 rows x 3 columns + labels
    pipe = pisa_pipeline()
    with torch.inference_mode():
        ref = pipe(arr, process_size=64, lambda_pix=0.0, lambda_sem=1.5).pixels
    assert np.abs(read_image(tmp / "out_pix0_sem1.5.png").pixels - ref).max() <= 1.5 / 255
    # (1, 1) in the grid is the default mode's image
    with torch.inference_mode():
        default = pipe(arr, process_size=64).pixels
    assert np.abs(read_image(tmp / "out_pix1_sem1.png").pixels - default).max() <= 1.5 / 255


def test_contact_sheet_holds_thumbnails():
    from realisr.cli.upscale import ContactSheet

    sheet = ContactSheet([0.0, 1.0], [0.5], thumb_width=100)
    for lp in (0.0, 1.0):
        sheet.add(lp, 0.5, np.full((300, 400, 3), lp, np.float32))
    assert {t.size for t in sheet.thumbs.values()} == {(100, 75)}
    img = np.asarray(sheet.render())
    assert img.shape == (2 * (75 + ContactSheet.label), 100, 3)
    assert img[ContactSheet.label + 10, 50].tolist() == [0, 0, 0]
    assert img[2 * ContactSheet.label + 75 + 10, 50].tolist() == [255, 255, 255]


def test_osediff_with_a_prompt(setup):
    tmp, src, arr = setup
    assert _run("-m", "osediff", "-i", src, "-o", tmp / "a.png", "--prompt", "a photo") == 0
    assert _run("-m", "osediff", "-i", src, "-o", tmp / "b.png") == 0
    a, b = read_image(tmp / "a.png").pixels, read_image(tmp / "b.png").pixels
    assert a.shape == b.shape == (144, 176, 3)
    pipe = osediff_pipeline(True)  # the CLI merges the LoRAs, as this one
    with torch.inference_mode():
        ref_a = pipe(arr, process_size=64, prompt="a photo").pixels
        ref_b = pipe(arr, process_size=64).pixels
    # each file is the API's result for its own prompt (8-bit rounding), and the two prompts differ by far more
    assert np.abs(a - ref_a).max() <= 0.5 / 255 + 1e-6 and np.abs(b - ref_b).max() <= 0.5 / 255 + 1e-6
    assert np.abs(ref_a - ref_b).max() > 10 / 255


@pytest.mark.parametrize("model, case_id, mode", [("pisa-sr", "pisa/in1/default", "adain"),
                                                  ("osediff", "osediff/in1/merged", "nofix")])
def test_compat_official_writes_the_official_png(setup, model, case_id, mode):
    """`--compat official`: the file the CLI writes is the official script's PNG (its size included: PiSA-SR
    resizes back to 4x in 8 bits, OSEDiff keeps the processed size) up to float noise: <= 0.1 % of the pixels
    differ, by one level (see test_golden_parity.py for why not zero)."""
    import json

    from PIL import Image

    tmp, _, _ = setup
    root = golden_dir()
    m = json.loads((root / "manifest.json").read_text())
    case = next(c for c in m["cases"] if c["id"] == case_id)
    inp = m["inputs"][case["input"]]
    out = tmp / "official.png"
    assert main(["upscale", "-q", "--sd", str(sd_dir()), "-m", model, "-i", str(root / inp["lq_png"]), "-o", str(out),
                 "--process-size", str(inp["process_size"]), "--compat", "official", "--color-fix",
                 {"nofix": "none"}.get(mode, mode), *(("--prompt", case["prompt"]) if model == "osediff" else ())]) == 0
    ours = np.asarray(Image.open(out).convert("RGB")).astype(int)
    ref = np.asarray(Image.open(root / case["files"][f"out_{mode}_png"]).convert("RGB")).astype(int)
    assert ours.shape == ref.shape == (case["final_png_size_WxH"][1], case["final_png_size_WxH"][0], 3)
    diff = np.abs(ours - ref)
    assert diff.max() <= 1 and (diff > 0).any(axis=2).mean() <= 0.001


def test_compat_is_refused_where_it_means_nothing(setup, capsys):
    tmp, src, _ = setup
    assert main(["upscale", "-q", "-m", "bicubic", "-i", str(src), "-o", str(tmp / "b.png"), "--compat",
                 "official"]) != 0
    assert "--compat not supported by model bicubic" in capsys.readouterr().err
    assert not (tmp / "b.png").exists()


def test_dial_flags_are_refused_for_osediff(setup, capsys):
    tmp, src, _ = setup
    assert _run("-m", "osediff", "-i", src, "-o", tmp / "a.png", "--lambda-pix", "0.5") != 0
    assert "--lambda-pix not supported by model osediff" in capsys.readouterr().err
    assert not (tmp / "a.png").exists()
