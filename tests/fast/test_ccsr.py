"""CCSR behaviour beyond the official fixtures: schedules (v2 and v1), presets, what ``compat`` changes, the
random draws (generator order, injection), tiling, argument checks, weights folders and the CLI.

The pipeline is the tiny golden-ccsr model loaded through ``realisr.load_pipeline`` (see tests/helpers/ccsr.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import ccsr as H
from helpers.onestep import one_thread

ROOT = H.ccsr_dir()


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_thread():  # the shared 2-core box thrashes with more threads
        yield


@pytest.fixture(scope="module")
def pipe():
    return H.pipeline(ROOT)


@pytest.fixture(scope="module")
def man():
    return H.manifest(ROOT)


def _case(man, cid):
    c = next(c for c in man["cases"] if c["id"] == cid)
    return c, man["inputs"][c["input"]], H.trace(c, ROOT)


def _lq(inp):
    from PIL import Image

    return Image.open(ROOT / H.path_of(inp["files"]["lq_png"])).convert("RGB")


# -- schedules ----------------------------------------------------------------------------------------------
def test_v2_schedule_matches_the_manifest_and_diffusers(pipe, man):
    from realisr.pipelines.ccsr.schedule import leading_timesteps, truncated_schedule

    for case in man["cases"]:
        s = truncated_schedule(case["N"], case["t_max"], case["t_min"])
        assert list(s.timesteps) == case["scheduler_timesteps"]
        assert s.t_tau == case["t_tao"]
        assert list(s.loop) == (case["loop_timesteps"] if case["loop_executed"] else [])
    pipe.scheduler.set_timesteps(6)
    assert [int(t) for t in pipe.scheduler.timesteps] == list(leading_timesteps(6)) == [831, 665, 499, 333, 167, 1]
    s = truncated_schedule(6, 0.6667, 0.3333)
    assert s.prev == (333, 167)  # DDPM steps go t -> t - 1000 // N
    assert truncated_schedule(6, 0.6667, 0.5).network_evaluations == 2
    assert truncated_schedule(1, 0.6666, 0.0).network_evaluations == 1


def test_v1_spaced_schedule_matches_the_reference():
    from realisr.pipelines.ccsr.schedule import space_timesteps, spaced_schedule

    spaced = space_timesteps(1000, 45)
    assert len(spaced) == 45
    assert spaced[:3] == (0, 23, 45) and spaced[15] == 341 and spaced[29] == 658 and spaced[-2:] == (976, 999)
    s = spaced_schedule(45, 0.6667, 0.3333)
    assert s.t_start == 999 and s.t_tau == 658
    assert len(s.loop) == 15 and s.loop[0] == 658 and s.loop[-1] == 341
    assert s.prev[0] == 636 and s.prev[-1] == 318  # ancestral steps along the spaced grid
    assert s.network_evaluations == 16 and s.truncated


def test_v1_spaced_chain_reuses_the_original_alphas(pipe):
    """The respaced betas give back the original alphas_cumprod at the spaced timesteps (IDDPM respacing)."""
    from realisr.pipelines.ccsr.schedule import space_timesteps

    acp = pipe.alphas_cumprod.double()
    ts = space_timesteps(1000, 45)
    last, betas = 1.0, []
    for t in ts:
        betas.append(1 - acp[t].item() / last)
        last = acp[t].item()
    np.testing.assert_allclose(np.cumprod(1 - np.array(betas)), acp[list(ts)].numpy(), rtol=1e-12)
    # SD-2.1 scaled-linear schedule constants (alphas_cumprod at 999 / 658 / 341)
    assert abs(acp[999] - 0.004660) < 1e-6 and abs(acp[658] - 0.110976) < 1e-6 and abs(acp[341] - 0.521540) < 1e-6


@pytest.mark.parametrize("steps,t_max,t_min", [(6, 0.6667, 0.05), (6, 0.5, 0.5), (6, 0.01, 0.0)])
def test_empty_loops_are_refused(pipe, steps, t_max, t_min):
    x = np.zeros((16, 16, 3), np.uint8)
    with pytest.raises(ValueError):
        pipe(x, steps=steps, t_max=t_max, t_min=t_min, process_size=64)


# -- presets and settings -------------------------------------------------------------------------------------
def test_presets_and_explicit_settings(pipe):
    x = np.full((16, 16, 3), 128, np.uint8)
    one = pipe(x, process_size=64, latent_tile=0)
    assert one.info["preset"] == "one-step" and one.info["steps"] == 1 and one.info["network_evaluations"] == 1
    two = pipe(x, preset="two-step", process_size=64, latent_tile=0)
    assert (two.info["steps"], two.info["t_max"], two.info["t_min"], two.info["guidance_scale"]) == (6, 0.6667, 0.5, 4.5)
    assert two.info["loop"] == [499] and two.info["network_evaluations"] == 2
    assert two.info["prompt"] == "clean, high-resolution, 8k"
    assert two.info["negative_prompt"].startswith("blurry, dotted")
    mine = pipe(x, preset="two-step", t_min=0.3333, guidance_scale=2.0, process_size=64, latent_tile=0)
    assert mine.info["loop"] == [499, 333] and mine.info["guidance_scale"] == 2.0 and mine.info["steps"] == 6


@pytest.mark.parametrize("kwargs,msg", [
    (dict(preset="v1"), "preset"), (dict(preset="fast"), "preset"), (dict(compat="strict"), "compat"),
    (dict(steps=0), "steps"), (dict(t_min=0.7, t_max=0.6), "t_min"), (dict(guidance_scale=0.5), "guidance"),
    (dict(conditioning_scale=-1.0), "conditioning_scale"), (dict(start_point="zeros"), "start_point"),
    (dict(noise={"bogus": 1}), "noise"), (dict(prompt=3), "prompt"), (dict(keep_intermediates="yes"), "keep"),
])
def test_bad_arguments_are_one_line_errors(pipe, kwargs, msg):
    x = np.zeros((16, 16, 3), np.uint8)
    with pytest.raises(ValueError) as e:
        pipe(x, process_size=64, **kwargs)
    assert msg in str(e.value) and "\n" not in str(e.value)


def test_injected_noise_of_the_wrong_shape_is_refused(pipe):
    from realisr.pipelines.ccsr.pipeline_ccsr import CCSRNoise

    x = np.zeros((16, 16, 3), np.uint8)
    with pytest.raises(ValueError, match="noise.start has shape"):
        pipe(x, process_size=64, noise=CCSRNoise(start=torch.zeros(1, 4, 4, 4)))
    with pytest.raises(ValueError, match="noise.posterior"):  # CFG needs one posterior draw per half
        pipe(x, preset="two-step", process_size=64, noise=CCSRNoise(posterior=torch.zeros(1, 4, 8, 8)))


# -- random draws ----------------------------------------------------------------------------------------------
def test_generator_draws_in_the_official_order(pipe):
    """start noise, posterior noise (one per CFG half), re-noise, one variance noise per loop step: all from
    ``generator``, in that order; the same seed gives the same image, another seed another one."""
    x = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    kw = dict(preset="two-step", t_min=0.3333, process_size=64, keep_intermediates=True, latent_tile=0)
    out = pipe(x, generator=torch.Generator().manual_seed(5), **kw)
    it = out.extras["intermediates"]
    g = torch.Generator().manual_seed(5)
    expect = [("noise.start", (1, 4, 8, 8)), ("vae_enc.noise", (2, 4, 8, 8)), ("noise.tao", (1, 4, 8, 8)),
              ("step0.noise.variance", (1, 4, 8, 8)), ("step1.noise.variance", (1, 4, 8, 8))]
    for key, shape in expect:
        np.testing.assert_array_equal(it[key].numpy(), torch.randn(shape, generator=g).numpy(), err_msg=key)
    again = pipe(x, generator=torch.Generator().manual_seed(5), **kw)
    np.testing.assert_array_equal(out.pixels, again.pixels)
    other = pipe(x, generator=torch.Generator().manual_seed(6), **kw)
    assert np.abs(out.pixels - other.pixels).max() > 1e-3


def test_injected_noise_reproduces_a_generator_run(pipe):
    from realisr.pipelines.ccsr.pipeline_ccsr import CCSRNoise

    x = np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    kw = dict(preset="two-step", process_size=64, latent_tile=0)
    a = pipe(x, generator=torch.Generator().manual_seed(3), keep_intermediates=True, **kw)
    it = a.extras["intermediates"]
    noise = CCSRNoise(start=it["noise.start"], posterior=it["vae_enc.noise"], renoise=it["noise.tao"],
                      variance=[it["step0.noise.variance"]])
    b = pipe(x, generator=torch.Generator().manual_seed(99), noise=noise, **kw)
    np.testing.assert_array_equal(a.pixels, b.pixels)
    c = pipe(x, noise=dict(start=it["noise.start"], posterior=it["vae_enc.noise"], renoise=it["noise.tao"],
                           variance=[it["step0.noise.variance"]]), **kw)
    np.testing.assert_array_equal(a.pixels, c.pixels)


# -- compat ------------------------------------------------------------------------------------------------------
def test_compat_changes_nothing_without_cfg(pipe, man):
    case, inp, tr = _case(man, "in1/onestep")
    kw = dict(H.call_kwargs(case, inp), noise=H.recorded_noise(case, tr), keep_intermediates=True, color_fix="none")
    d = pipe(_lq(inp), compat="default", **kw).extras["intermediates"]
    o = pipe(_lq(inp), compat="official", **kw).extras["intermediates"]
    for key in ("init.eps", "final.latent", "decode.output"):
        np.testing.assert_array_equal(d[key].numpy(), o[key].numpy(), err_msg=key)


def test_default_conditions_the_one_shot_step_on_the_positive_prompt(pipe, man):
    """Official bug 1: with CFG the t=999 step sees the negative prompt. Officially, a negative prompt equal to
    the positive one therefore gives the default mode's one-shot prediction."""
    case, inp, tr = _case(man, "in0/twostep")
    kw = dict(H.call_kwargs(case, inp), noise=H.recorded_noise(case, tr), keep_intermediates=True, color_fix="none")
    default = pipe(_lq(inp), compat="default", **kw).extras["intermediates"]
    official = pipe(_lq(inp), compat="official", **kw).extras["intermediates"]
    kw_same = dict(kw, negative_prompt=case["prompt"])
    official_pos = pipe(_lq(inp), compat="official", **kw_same).extras["intermediates"]
    np.testing.assert_allclose(default["init.eps"].numpy(), official_pos["init.eps"].numpy(), atol=1e-6)
    assert np.abs(default["init.eps"].numpy() - official["init.eps"].numpy()).max() > 1e-3
    np.testing.assert_allclose(official["init.eps"].numpy(), tr["init.eps"].numpy(), atol=1e-5)


def test_conditioning_scale_is_honoured_by_default_and_ignored_officially(pipe, man):
    case, inp, tr = _case(man, "in0/onestep")
    kw = dict(H.call_kwargs(case, inp), noise=H.recorded_noise(case, tr), keep_intermediates=True)
    kw.pop("conditioning_scale")
    ref = pipe(_lq(inp), compat="default", **kw).extras["intermediates"]["init.eps"]
    half = pipe(_lq(inp), compat="default", conditioning_scale=0.5, **kw)
    zero = pipe(_lq(inp), compat="default", conditioning_scale=0.0, **kw).extras["intermediates"]["init.eps"]
    off = pipe(_lq(inp), compat="official", conditioning_scale=0.5, **kw).extras["intermediates"]["init.eps"]
    assert half.info["conditioning_scale"] == 0.5
    assert np.abs(half.extras["intermediates"]["init.eps"].numpy() - ref.numpy()).max() > 1e-3
    # scale 0: the UNet without control (the ControlNet's residuals are all multiplied by 0)
    np.testing.assert_array_equal(off.numpy(), ref.numpy())
    emb = pipe.prompt_embeds(case["prompt"])
    z = pipe(_lq(inp), compat="default", **kw).extras["intermediates"]["z_T"]
    with torch.no_grad():
        plain = pipe.unet(z, torch.tensor([999]), encoder_hidden_states=emb).sample
    np.testing.assert_allclose(zero.numpy(), plain.numpy(), atol=1e-5)


def test_tile_weights_midpoint_fixed_by_default(pipe, man):
    """Official quirk: y midpoint h/2. Default: (h-1)/2 on both axes, a symmetric window."""
    from realisr.pipelines.diffusion_common import gaussian_tile_weights

    case, inp, tr = _case(man, "in2/onestep")
    official = gaussian_tile_weights(8, 8, "osediff")
    np.testing.assert_allclose(official.numpy(), tr["tile_weight"][0, 0].numpy(), rtol=1e-6)  # built in float32
    fixed = gaussian_tile_weights(8, 8, "pisa").numpy()
    np.testing.assert_allclose(fixed, fixed[::-1, :])
    np.testing.assert_allclose(fixed, fixed.T)
    assert np.abs(official.numpy() - official.numpy()[::-1, :]).max() > 1e-3  # the quirk: not symmetric in y
    kw = dict(H.call_kwargs(case, inp), noise=H.recorded_noise(case, tr), keep_intermediates=True, color_fix="none")
    d = pipe(_lq(inp), compat="default", **kw).extras["intermediates"]["init.eps"]
    o = pipe(_lq(inp), compat="official", **kw).extras["intermediates"]["init.eps"]
    diff = np.abs(d.numpy() - o.numpy())
    assert 0 < diff.max() < 0.5


def test_one_tile_covering_the_latent_equals_no_tiling(pipe):
    x = np.random.default_rng(2).integers(0, 256, (32, 40, 3), dtype=np.uint8)
    kw = dict(process_size=64, generator=None, noise=None)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    a = pipe(x, latent_tile=0, **{**kw, "generator": g()})
    b = pipe(x, latent_tile=20, **{**kw, "generator": g()})  # 16x20 latent: one tile
    assert b.info["latent_tiles"] is None
    np.testing.assert_array_equal(a.pixels, b.pixels)
    c = pipe(x, latent_tile=8, latent_overlap=4, **{**kw, "generator": g()})
    assert c.info["latent_tiles"] == (8, 4)
    assert np.abs(a.pixels - c.pixels).mean() < 0.05


def test_tiled_vae_matches_the_whole_vae(pipe):
    x = np.random.default_rng(3).integers(0, 256, (32, 40, 3), dtype=np.uint8)
    a = pipe(x, process_size=64, latent_tile=0, vae_tile=0, generator=torch.Generator().manual_seed(1))
    b = pipe(x, process_size=64, latent_tile=0, vae_tile=8, generator=torch.Generator().manual_seed(1))
    assert np.abs(a.pixels - b.pixels).max() < 0.02


def test_output_geometry_alpha_grey_and_outscale(pipe):
    from realisr.io import ImageData

    rgb = np.random.default_rng(4).random((13, 19, 3)).astype(np.float32)
    alpha = np.linspace(0, 1, 13 * 19, dtype=np.float32).reshape(13, 19)
    out = pipe(ImageData(pixels=rgb, alpha=alpha, bit_depth=16), process_size=64)
    assert out.pixels.shape == (52, 76, 3) and out.image.alpha.shape == (52, 76) and out.image.bit_depth == 16
    assert np.isfinite(out.pixels).all() and 0 <= out.pixels.min() and out.pixels.max() <= 1
    grey = pipe(np.full((16, 16), 90, np.uint8), process_size=64, outscale=2)
    assert grey.pixels.shape == (32, 32, 1)
    pad = pipe(rgb, process_size=64, resize_mode="pad")
    assert pad.pixels.shape == (52, 76, 3)


# -- weights --------------------------------------------------------------------------------------------------------
def test_missing_and_wrong_weights_give_one_line_errors(tmp_path):
    import shutil

    from realisr.errors import CheckpointError, WeightsNotFoundError
    from realisr.weights.ccsr import load_ccsr_weights, resolve_ccsr_weights

    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        resolve_ccsr_weights(tmp_path / "nope")
    half = tmp_path / "half"
    shutil.copytree(H.weights_dir(ROOT) / "controlnet", half / "controlnet")
    with pytest.raises(WeightsNotFoundError) as e:
        resolve_ccsr_weights(half)
    assert "missing vae/" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(WeightsNotFoundError, match="checkpoints folder"):
        resolve_ccsr_weights(None)  # the test cache's checkpoints folder has no ccsr/
    plain = tmp_path / "plain"
    shutil.copytree(H.weights_dir(ROOT), plain)
    cfg = (plain / "controlnet" / "config.json").read_text().replace('"use_vae_encode_condition": true',
                                                                         '"use_vae_encode_condition": false')
    (plain / "controlnet" / "config.json").write_text(cfg)
    with pytest.raises(CheckpointError, match="not a CCSR ControlNet"):
        load_ccsr_weights(plain)


def test_checkpoints_folder_release_folder_and_saved_copy_load(tmp_path, monkeypatch, pipe):
    """The release is found in REALISR_WEIGHTS/ccsr; a folder path works as a model; ``save_ccsr_release`` writes
    the official layout (``ControlNetModel`` config with ``use_vae_encode_condition``) that loads back equal."""
    import json

    import realisr
    from realisr.registry import get_spec
    from realisr.weights.ccsr import save_ccsr_release, weights_status

    saved = save_ccsr_release(tmp_path / "w" / "ccsr", controlnet=pipe.controlnet, vae=pipe.vae)
    cfg = json.loads((saved / "controlnet" / "config.json").read_text())
    assert cfg["_class_name"] == "ControlNetModel" and cfg["use_vae_encode_condition"] is True
    monkeypatch.setenv("REALISR_WEIGHTS", str(tmp_path / "w"))
    monkeypatch.setenv("REALISR_SD", str(H.tiny_sd_dir(ROOT)))
    ok, detail = weights_status(get_spec("ccsr"))
    assert ok, detail
    a = realisr.load_pipeline("ccsr", device="cpu")
    b = realisr.load_pipeline(str(saved), device="cpu")
    x = np.random.default_rng(5).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    ref = pipe(x, process_size=64, generator=torch.Generator().manual_seed(0)).pixels
    for p in (a, b):
        np.testing.assert_array_equal(p(x, process_size=64, generator=torch.Generator().manual_seed(0)).pixels, ref)


# -- CLI -------------------------------------------------------------------------------------------------------------
def test_cli_upscale_with_ccsr(tmp_path, capsys):
    from PIL import Image

    from realisr.cli.main import main

    src = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(6).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(src)
    args = ["upscale", "-q", "-i", str(src), "-m", "ccsr", "--ccsr", str(H.weights_dir(ROOT)), "--sd",
            str(H.tiny_sd_dir(ROOT)), "--process-size", "64", "--seed", "1", "--device", "cpu"]
    assert main(args + ["-o", str(tmp_path / "a.png"), "--preset", "two-step", "--compat", "official"]) == 0
    assert main(args + ["-o", str(tmp_path / "b.png"), "--steps", "6", "--t-max", "0.6667", "--t-min", "0.5",
                        "--guidance-scale", "4.5", "--compat", "official"]) == 0
    a, b = (np.asarray(Image.open(tmp_path / f)) for f in ("a.png", "b.png"))
    assert a.shape == (64, 64, 3)
    np.testing.assert_array_equal(a, b)  # the preset is exactly those settings
    assert main(args + ["-o", str(tmp_path / "c.png"), "--preset", "bogus"]) == 1
    assert "preset" in capsys.readouterr().err
    assert not (tmp_path / "c.png").exists()
    assert main(["upscale", "-q", "-i", str(src), "-m", "bicubic", "--ccsr", "x", "-o", str(tmp_path / "d.png")]) == 1
    assert "--ccsr is for" in capsys.readouterr().err


def test_models_lists_ccsr(capsys):
    from realisr.cli.main import main

    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "ccsr " in out and "ccsr-v1" in out
