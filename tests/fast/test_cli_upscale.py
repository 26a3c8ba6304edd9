"""`realisr upscale` end to end: batch with a bad file, resume, overwrite, naming, formats, errors."""

import numpy as np
import pytest
from PIL import Image

from realisr.cli.main import main


@pytest.fixture
def folder(tmp_path, photo):
    d = tmp_path / "in"
    d.mkdir()
    Image.fromarray(photo[100:132, 200:240]).save(d / "a.png")
    Image.fromarray(photo[300:324, 50:90]).save(d / "b.jpg", quality=95)
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)  # corrupt
    (d / "notes.txt").write_text("not an image")  # ignored: not an image extension
    sub = d / "sub"
    sub.mkdir()
    Image.fromarray(photo[:20, :30]).save(sub / "c.png")
    return d


def test_batch_with_bad_file_continues_and_fails(folder, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["upscale", "-i", str(folder), "-o", str(out), "-m", "bicubic"])
    cap = capsys.readouterr()
    assert rc == 1
    assert (out / "a_out.png").is_file() and (out / "b_out.jpg").is_file()
    assert not (out / "broken_out.png").exists()
    assert "broken.png" in cap.err and "2 written" in cap.out and "1 failed" in cap.out
    assert Image.open(out / "a_out.png").size == (160, 128)
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*"))  # no temp files left
    assert not (out / "sub").exists()  # not recursive


def test_resume_skips_existing_and_overwrite_redoes(folder, tmp_path, capsys):
    out = tmp_path / "out"
    main(["-q", "upscale", "-i", str(folder / "a.png"), str(folder / "b.jpg"), "-o", str(out), "-m", "bicubic"])
    first = (out / "a_out.png").stat().st_mtime_ns
    capsys.readouterr()
    rc = main(["upscale", "-i", str(folder / "a.png"), str(folder / "b.jpg"), "-o", str(out), "-m", "bicubic"])
    cap = capsys.readouterr()
    assert rc == 0 and "0 written, 2 skipped" in cap.out
    assert (out / "a_out.png").stat().st_mtime_ns == first
    rc = main(["-q", "upscale", "-i", str(folder / "a.png"), "-o", str(out), "-m", "bicubic", "--overwrite"])
    assert rc == 0 and (out / "a_out.png").stat().st_mtime_ns != first


def test_recursive_keeps_subfolders_and_glob(folder, tmp_path):
    out = tmp_path / "out"
    rc = main(["-q", "upscale", "-i", str(folder), "-o", str(out), "-m", "bicubic", "--recursive",
               "--suffix", "", "--ext", "webp"])
    assert rc == 1  # the broken file
    assert (out / "sub" / "c.webp").is_file() and (out / "a.webp").is_file()
    out2 = tmp_path / "out2"
    rc = main(["-q", "upscale", "-i", str(folder / "*.png"), "-o", str(out2), "-m", "bicubic", "-s", "2"])
    assert rc == 1 and Image.open(out2 / "a_out.png").size == (80, 64)


def test_single_file_to_named_output(folder, tmp_path):
    dst = tmp_path / "x" / "result.tif"
    assert main(["-q", "upscale", "-i", str(folder / "a.png"), "-o", str(dst), "-m", "lanczos", "-s", "1.5"]) == 0
    assert Image.open(dst).size == (60, 48)


@pytest.mark.parametrize("argv,msg", [
    (["-i", "/nonexistent/x.png"], "input not found"),
    (["-i", "IN", "-m", "no-such-model"], "unknown model"),
    (["-i", "IN", "-m", "bicubic", "--lambda-pix", "0.5"], "--lambda-pix not supported"),
    (["-i", "IN", "-m", "bicubic", "--lambda-grid", "0,1"], "--lambda-grid needs"),
    (["-i", "IN", "-m", "/tmp/does/not/exist.pth"], "not found"),
])
def test_clear_errors_without_traceback(folder, tmp_path, capsys, argv, msg):
    argv = [a.replace("IN", str(folder / "a.png")) for a in argv]
    rc = main(["-q", "upscale", *argv, "-o", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc != 0 and msg in err and "Traceback" not in err


def test_sample_input(tmp_path):
    out = tmp_path / "o"
    assert main(["-q", "upscale", "-i", "sample:coffee", "-o", str(out), "-m", "bicubic", "-s", "0.25"]) == 0
    assert Image.open(out / "coffee_out.png").size == (150, 100)


def test_models_listing(capsys):
    import json

    assert main(["models", "--json"]) == 0
    rows = {r["id"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["bicubic"]["available"] is True
    assert {"realesrgan-x4plus", "realsr-df2k-x4", "lanczos"} <= set(rows)


def test_flags_after_subcommand_and_convert_bundled_model(folder, tmp_path, capsys):
    """`realisr convert ID OUT.safetensors` writes weights that `-m OUT.safetensors` runs like the registry id."""
    st = tmp_path / "av3.safetensors"
    assert main(["convert", "realesr-animevideov3-x4", str(st)]) == 0
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["upscale", "-q", "-i", str(folder / "a.png"), "-o", str(a), "-m", str(st), "-t", "0"]) == 0
    assert main(["upscale", "-q", "-i", str(folder / "a.png"), "-o", str(b), "-m", "realesr-animevideov3-x4",
                 "-t", "0"]) == 0
    x = np.asarray(Image.open(a / "a_out.png"), dtype=int)
    y = np.asarray(Image.open(b / "a_out.png"), dtype=int)
    assert x.shape == (128, 160, 3) and np.abs(x - y).max() == 0
    assert main(["convert", "realesr-animevideov3-x4", str(st)]) == 1  # exists, no --overwrite
    assert "--overwrite" in capsys.readouterr().err


@pytest.mark.parametrize("argv, quiet, verbose", [
    (["-q", "bench-data", "build", "-o", "x"], True, None),
    (["bench-data", "-q", "build", "-o", "x"], True, None),
    (["bench-data", "build", "-o", "x", "-q"], True, None),
    (["bench-data", "build", "-vv", "-o", "x"], None, 2),
    (["upscale", "-i", "a.png", "-q"], True, None),
    (["-v", "upscale", "-i", "a.png"], None, 1),
])
def test_verbosity_flags_work_after_any_command_word(argv, quiet, verbose):
    from realisr.cli.main import build_parser

    args = build_parser().parse_args(argv)
    assert getattr(args, "quiet", None) == quiet and getattr(args, "verbose", None) == verbose
