"""The command line a photographer meets first (issue 9, section 5): bad numbers refused before any model loads,
-q, -o semantics, --sd/--seed, corrupt checkpoints, --quality, 16-bit to WebP, the bundled x2/x3 models,
progress inside a tile, PiSA-SR without its weights and without a network, CLI words in errors, and
``realisr.upscale`` with method arguments."""

import logging
import socket

import numpy as np
import pytest
from PIL import Image

from realisr.cli.main import main


@pytest.fixture
def img(tmp_path, photo):
    d = tmp_path / "in"
    d.mkdir()
    Image.fromarray(photo[100:132, 200:240]).save(d / "a.png")
    Image.fromarray(photo[300:324, 50:90]).save(d / "b.png")
    return d


@pytest.fixture
def no_model_load(monkeypatch):
    import realisr.api

    def refuse(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(realisr.api, "load_pipeline", refuse)


@pytest.mark.parametrize("argv, flag", [
    (["-s", "-2"], "-s/--outscale"), (["-s", "0"], "-s/--outscale"), (["-s", "nan"], "-s/--outscale"),
    (["-t", "3"], "-t/--tile"), (["-t", "-1"], "-t/--tile"), (["--tile-pad", "-4"], "--tile-pad"),
    (["--quality", "0"], "--quality"), (["--quality", "101"], "--quality"), (["--lambda-pix", "inf"], "--lambda-pix"),
    (["--process-size", "4"], "--process-size"), (["--latent-tile", "2"], "--latent-tile"),
    (["--max-pixels", "-1"], "--max-pixels"),
])
def test_bad_numbers_are_rejected_before_the_model_loads(img, tmp_path, capsys, no_model_load, argv, flag):
    with pytest.raises(SystemExit) as e:
        main(["upscale", "-i", str(img / "a.png"), "-o", str(tmp_path / "o"), "-m", "realesrgan-x4plus", *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err and "Traceback" not in err


def test_quiet_prints_nothing_but_errors(img, tmp_path, capsys):
    assert main(["-q", "upscale", "-i", str(img), "-o", str(tmp_path / "o"), "-m", "bicubic"]) == 0
    cap = capsys.readouterr()
    assert cap.out == "" and cap.err == ""
    (img / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    assert main(["-q", "upscale", "-i", str(img), "-o", str(tmp_path / "o2"), "-m", "bicubic"]) == 1
    cap = capsys.readouterr()
    assert cap.out == "" and cap.err.strip().startswith("failed:") and "broken.png" in cap.err
    assert len(cap.err.strip().splitlines()) == 1
    assert main(["-q", "convert", "realesr-animevideov3-x4", str(tmp_path / "av3.safetensors")]) == 0
    assert capsys.readouterr() == ("", "")


def test_an_existing_folder_is_a_folder_whatever_its_name(img, tmp_path):
    out = tmp_path / "results.png"
    out.mkdir()
    assert main(["-q", "upscale", "-i", str(img / "a.png"), "-o", str(out), "-m", "bicubic"]) == 0
    assert Image.open(out / "a_out.png").size == (160, 128)
    # a trailing separator names a folder too, even before it exists
    assert main(["-q", "upscale", "-i", str(img / "a.png"), "-o", str(tmp_path / "new.png") + "/", "-m",
                 "bicubic"]) == 0
    assert (tmp_path / "new.png" / "a_out.png").is_file()


def test_one_output_file_for_several_inputs_is_an_error(img, tmp_path, capsys, no_model_load):
    assert main(["upscale", "-i", str(img), "-o", str(tmp_path / "x.png"), "-m", "bicubic"]) == 1
    err = capsys.readouterr().err
    assert "x.png names one output file but there are 2 inputs" in err and "give a folder" in err
    assert not (tmp_path / "x.png").exists()


def test_outputs_inside_the_input_folder_are_not_upscaled_again(img, tmp_path, capsys):
    for _ in range(2):
        assert main(["upscale", "-i", str(img), "-o", str(img / "out"), "-m", "bicubic", "--recursive"]) == 0
    cap = capsys.readouterr()
    assert sorted(p.name for p in (img / "out").iterdir()) == ["a_out.png", "b_out.png"]
    assert "0 written, 2 skipped" in cap.out and "left out 2 file(s)" in cap.err
    # the same folder as the input: a second run does not make a_out_out.png
    for _ in range(2):
        assert main(["-q", "upscale", "-i", str(img), "-o", str(img), "-m", "bicubic"]) == 0
    assert sorted(p.name for p in img.glob("*.png")) == ["a.png", "a_out.png", "b.png", "b_out.png"]


def test_sd_and_seed_are_ignored_with_a_note_for_models_without_a_backbone(img, tmp_path, capsys):
    rc = main(["upscale", "-i", str(img / "a.png"), "-o", str(tmp_path / "o"), "-m", "bicubic", "--sd",
               str(tmp_path / "sd"), "--seed", "3"])
    cap = capsys.readouterr()
    assert rc == 0 and "Traceback" not in cap.err
    assert "--sd is ignored: bicubic" in cap.err and "--seed is ignored: bicubic" in cap.err
    assert (tmp_path / "o" / "a_out.png").is_file()


@pytest.mark.parametrize("case", ["int-keys", "random-bytes", "truncated"])
def test_a_corrupt_checkpoint_is_a_one_line_error(img, tmp_path, capsys, case):
    import torch

    path = tmp_path / "model.pth"
    if case == "int-keys":
        torch.save({1: torch.zeros(3)}, path)
    elif case == "random-bytes":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    else:
        torch.save({"conv_first.weight": torch.zeros(64, 3, 3, 3)}, path)
        path.write_bytes(path.read_bytes()[:300])
    assert main(["upscale", "-i", str(img / "a.png"), "-o", str(tmp_path / "o"), "-m", str(path)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model.pth" in err and "Traceback" not in err


def test_quality_for_jpeg_and_webp(img, tmp_path):
    sizes = {}
    for q in (20, 95):
        for ext in ("jpg", "webp"):
            out = tmp_path / f"q{q}"
            assert main(["-q", "upscale", "-i", str(img / "a.png"), "-o", str(out), "-m", "bicubic", "--ext", ext,
                         "--quality", str(q)]) == 0
            sizes[(q, ext)] = (out / f"a_out.{ext}").stat().st_size
    assert sizes[(20, "jpg")] < sizes[(95, "jpg")] and sizes[(20, "webp")] < sizes[(95, "webp")]


def test_sixteen_bit_input_written_as_webp_says_it_drops_to_8_bits(tmp_path, caplog):
    from realisr.io import ImageData, write_image

    src = tmp_path / "deep.png"
    ramp = np.linspace(0, 1, 24 * 20 * 3, dtype=np.float32).reshape(20, 24, 3)
    write_image(src, ImageData(pixels=ramp, bit_depth=16))
    with caplog.at_level(logging.WARNING):
        assert main(["upscale", "-i", str(src), "-o", str(tmp_path / "o"), "-m", "bicubic", "--ext", "webp"]) == 0
    assert "16-bit" in caplog.text and "8" in caplog.text and "WEBP" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert main(["upscale", "-i", str(src), "-o", str(tmp_path / "p"), "-m", "bicubic"]) == 0  # PNG keeps 16
    assert "16-bit" not in caplog.text


def test_errors_speak_cli(tmp_path):
    from realisr.errors import OutputExistsError
    from realisr.io import ImageData, write_image

    path = tmp_path / "x.png"
    write_image(path, ImageData(pixels=np.zeros((4, 4, 3), np.float32)))
    with pytest.raises(OutputExistsError) as e:
        write_image(path, ImageData(pixels=np.zeros((4, 4, 3), np.float32)))
    assert "--overwrite" in str(e.value) and "overwrite=True" not in str(e.value)


@pytest.mark.parametrize("scale", [2, 3])
def test_the_bundled_animevideov3_x2_x3_match_the_ncnn_runtime(scale):
    """The wheel's x2/x3 files are the x4 network plus an ncnn Interp (bicubic) resize: registered, and equal to
    the ncnn runtime through the pipeline a user calls."""
    pytest.importorskip("ncnn")
    import skimage.data
    from helpers.ncnn_runtime import run_ncnn
    import torch

    import realisr
    from realisr.registry import get_spec
    from realisr.weights.status import ncnn_files

    crop = skimage.data.astronaut()[100:124, 200:228].astype(np.float32) / 255
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = realisr.load_pipeline(f"realesr-animevideov3-x{scale}", device="cpu")(crop, tile=0).pixels
    finally:
        torch.set_num_threads(threads)
    param, binf, _ = ncnn_files(get_spec(f"realesr-animevideov3-x{scale}"))
    ref = np.clip(run_ncnn(param, binf, crop.transpose(2, 0, 1)), 0, 1).transpose(1, 2, 0)
    assert out.shape == ref.shape == (24 * scale, 28 * scale, 3)
    assert np.abs(out - ref).max() < 1e-4 and ref.std() > 0.05


def test_progress_inside_one_tile_and_a_note_on_the_first_conversion(img, tmp_path, monkeypatch, capsys):
    import realisr

    monkeypatch.setenv("REALISR_CACHE", str(tmp_path / "fresh-cache"))
    argv = ["upscale", "-i", str(img / "a.png"), "-m", "realesr-animevideov3-x4", "-t", "0"]
    assert main([*argv, "-o", str(tmp_path / "o1")]) == 0
    assert "converting the realesr-animevideov3-x4 weights" in capsys.readouterr().err
    assert main([*argv, "-o", str(tmp_path / "o2")]) == 0
    assert "converting" not in capsys.readouterr().err  # cached: said only the first time
    events = []
    realisr.load_pipeline("realesr-animevideov3-x4")(np.asarray(Image.open(img / "a.png")), tile=0,
                                                      callback=events.append)
    tiles = [e for e in events if e.stage == "tiles"]
    blocks = [(e.current, e.total) for e in events if e.stage == "blocks"]
    assert [(e.current, e.total) for e in tiles] == [(0, 1), (1, 1)]  # one tile ...
    assert len(blocks) >= 10 and blocks == [(i, blocks[0][1]) for i in range(1, blocks[0][1] + 1)]  # ... and inside


def test_pisa_sr_without_weights_names_everything_and_never_touches_the_network(img, tmp_path, monkeypatch,
                                                                                capsys):
    def no_network(self, address):
        raise AssertionError(f"tried to reach {address}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setenv("REALISR_WEIGHTS", str(tmp_path / "weights"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.delenv("REALISR_SD", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert main(["upscale", "-i", str(img / "a.png"), "-o", str(tmp_path / "o"), "-m", "pisa-sr"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    for needed in ("pisa_sr.pkl", "realisr weights fetch pisa-sr", "stabilityai/stable-diffusion-2-1-base",
                   "unet/", "text_encoder/", "realisr weights fetch sd-2.1-base", "hf download"):
        assert needed in err, needed
    assert "checkpoint=" not in err and "sd=" not in err  # CLI words, not API words


torch_ = pytest.importorskip("torch")


@pytest.fixture
def pisa_env(tmp_path, monkeypatch):
    pytest.importorskip("diffusers")
    from helpers.onestep import golden_dir, sd_dir

    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "pisa_sr.pkl").symlink_to(golden_dir() / "pisa_sr.pkl")
    monkeypatch.setenv("REALISR_WEIGHTS", str(weights))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.delenv("REALISR_SD", raising=False)
    rng = np.random.default_rng(0)
    arr = (rng.random((24, 28, 3)) * 255).astype(np.uint8)
    src = tmp_path / "in.png"
    Image.fromarray(arr).save(src)
    return src, sd_dir(), arr


def test_auto_honours_sd_and_realisr_sd(pisa_env, tmp_path, monkeypatch, capsys):
    from realisr.api import resolve_model_id

    src, sd, _ = pisa_env
    assert resolve_model_id("auto") == "realesrgan-x4plus"  # the checkpoint alone is not enough
    assert resolve_model_id("auto", sd=str(sd)) == "pisa-sr"
    monkeypatch.setenv("REALISR_SD", str(sd))
    assert resolve_model_id("auto") == "pisa-sr"
    monkeypatch.delenv("REALISR_SD")
    assert main(["upscale", "-i", str(src), "-o", str(tmp_path / "o"), "--sd", str(sd), "--process-size",
                 "64"]) == 0
    assert "using model pisa-sr" in capsys.readouterr().err


def test_seed_samples_the_vae_posterior_reproducibly(pisa_env, tmp_path):
    src, sd, _ = pisa_env
    outs = {}
    for name, extra in (("s1", ["--seed", "1"]), ("s1b", ["--seed", "1"]), ("s2", ["--seed", "2"])):
        dst = tmp_path / f"{name}.png"
        assert main(["-q", "upscale", "-i", str(src), "-o", str(dst), "-m", "pisa-sr", "--sd", str(sd),
                     "--process-size", "64", *extra]) == 0
        outs[name] = np.asarray(Image.open(dst), dtype=int)
    assert np.array_equal(outs["s1"], outs["s1b"])  # the same seed, the same image
    assert not np.array_equal(outs["s1"], outs["s2"])  # without the sampling the seed changed nothing


def test_upscale_shortcut_takes_method_arguments(pisa_env):
    import realisr

    from helpers.onestep import pisa_pipeline

    src, sd, arr = pisa_env
    out = realisr.upscale(arr, "pisa-sr", sd=str(sd), lambda_pix=0.5, process_size=64, device="cpu")
    pipe = pisa_pipeline()  # the same checkpoint and tiny SD model, loaded once per session
    ref = pipe(arr, lambda_pix=0.5, process_size=64)
    assert out.pixels.shape == (96, 112, 3) and np.array_equal(out.pixels, ref.pixels)
    assert not np.array_equal(ref.pixels, pipe(arr, process_size=64).pixels)  # the dial was really applied


def test_backbone_reads_safetensors_only_and_local_files(monkeypatch):
    """SD components load with use_safetensors=True where the folder has safetensors, never from the hub."""
    pytest.importorskip("diffusers")
    import diffusers
    import transformers
    from helpers.onestep import sd_dir

    from realisr.models.backbone import load_backbone

    seen = {}

    def spy(cls, name):
        real = getattr(cls, "from_pretrained").__func__

        def wrapped(klass, *args, **kwargs):
            seen[name] = kwargs
            return real(klass, *args, **kwargs)
        monkeypatch.setattr(cls, "from_pretrained", classmethod(wrapped))

    spy(diffusers.UNet2DConditionModel, "unet")
    spy(diffusers.AutoencoderKL, "vae")
    spy(transformers.CLIPTextModel, "text_encoder")
    load_backbone(str(sd_dir()), components=("unet", "vae", "text_encoder"))
    for part in ("unet", "vae", "text_encoder"):
        assert seen[part].get("use_safetensors") is True and seen[part].get("local_files_only") is True, part
    seen.clear()
    from realisr.train.trainer_base import load_sd_components  # training loads the same way

    load_sd_components(str(sd_dir()))
    for part in ("unet", "vae", "text_encoder"):
        assert seen[part].get("use_safetensors") is True and seen[part].get("local_files_only") is True, part
