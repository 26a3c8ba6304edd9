"""The SeeSR pipeline beyond parity: the fixes of the default mode, argument checks, seeds, bypassing the tagger,
missing weights, the SD-turbo variant and ``realisr upscale -m seesr``, on the golden-seesr tiny models."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from helpers.fixtures import fixture_set, tiny_sd_dir  # noqa: E402

ROOT = fixture_set("golden-seesr")
SD = tiny_sd_dir(ROOT)


@pytest.fixture(scope="module")
def pipe():
    import realisr

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    p = realisr.load_pipeline("seesr", device="cpu", dtype="fp32", sd=str(SD), seesr=str(ROOT / "seesr"),
                              tagger_root=str(ROOT / "ram"))
    yield p
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def lq():
    from PIL import Image

    return Image.open(ROOT / "inputs/in0/lq.png").convert("RGB")  # 16x16 -> 64x64 at process_size 64


def _unet_timesteps(pipe):
    seen = []
    hook = pipe.unet.register_forward_pre_hook(
        lambda m, a, k: seen.append((int(a[1]), a[0].shape[0])), with_kwargs=True)
    return seen, hook


def test_prompt_fix_and_official_prompt():
    from realisr.pipelines.seesr.pipeline_seesr import seesr_prompt

    assert seesr_prompt("arch, arch bridge", "", compat="official") == "arch, arch bridge, ,clean, high-resolution, 8k"
    assert seesr_prompt("arch, arch bridge", "a photo", compat="official") == \
        "arch, arch bridge, a photo,clean, high-resolution, 8k"
    assert seesr_prompt("arch, arch bridge") == "arch, arch bridge, clean, high-resolution, 8k"
    assert seesr_prompt("arch", " a photo ") == "arch, a photo, clean, high-resolution, 8k"
    assert seesr_prompt("", "") == "clean, high-resolution, 8k"


def test_timesteps_official_leading_default_trailing(pipe):
    assert pipe.timesteps(4, "official") == [751, 501, 251, 1]
    assert pipe.timesteps(50, "official")[:2] == [981, 961]
    assert pipe.timesteps(4) == [999, 749, 499, 249]
    ts = pipe.timesteps(50)
    assert ts[0] == 999 and ts[-1] == 19 and len(ts) == 50


def test_default_mode_first_step_at_999_and_fixed_prompt(pipe, lq):
    seen, hook = _unet_timesteps(pipe)
    try:
        out = pipe(lq, steps=4, process_size=64, generator=torch.Generator().manual_seed(0))
    finally:
        hook.remove()
    assert seen == [(999, 2), (749, 2), (499, 2), (249, 2)]  # CFG batch [negative, positive]
    assert out.info["prompt"].endswith(", clean, high-resolution, 8k") and ", ," not in out.info["prompt"]
    assert out.info["tags"] == "apple, apple tree, applesauce, approach, aquarium, arcade, arch, arch bridge"
    assert out.pixels.shape == (64, 64, 3) and np.isfinite(out.pixels).all()
    assert out.info["tagger_seconds"] > 0


def test_no_tags_keeps_the_soft_prompt(pipe, lq):
    out = pipe(lq, tags=False, steps=1, process_size=64, generator=torch.Generator().manual_seed(0))
    assert out.info["tags"] == "" and out.info["prompt"] == "clean, high-resolution, 8k"
    assert out.info["tagger_seconds"] > 0  # the soft prompt still comes from DAPE
    from realisr.registry import get_spec

    assert get_spec("seesr").pipeline_class().is_stochastic(get_spec("seesr"))  # realisr bench --seeds runs it N times


def test_tile_weights_symmetric_by_default_official_y_midpoint(pipe, monkeypatch):
    """Latent tiling blends with the symmetric Gaussian by default and with the official y midpoint T/2 under
    compat='official'."""
    from PIL import Image

    import realisr.pipelines.diffusion_common as dc

    flavors = []
    real = dc.gaussian_tile_weights
    monkeypatch.setattr(dc, "gaussian_tile_weights", lambda h, w, flavor="pisa": flavors.append(flavor) or
                        real(h, w, flavor))
    img = Image.open(ROOT / "inputs/in2/lq.png").convert("RGB")  # latents 11x13 -> 6 tiles of 8
    kw = dict(steps=1, process_size=64, latent_tile=8, latent_overlap=4, generator=torch.Generator().manual_seed(0))
    pipe(img, **kw)
    assert set(flavors) == {"pisa"} and len(flavors) == 6
    flavors.clear()
    pipe(img, compat="official", **kw)
    assert set(flavors) == {"osediff"} and len(flavors) == 6
    w = real(8, 8, "pisa").numpy()
    np.testing.assert_allclose(w, w[::-1, ::-1])  # symmetric; the official one is not
    assert not np.allclose(real(8, 8, "osediff").numpy(), real(8, 8, "osediff").numpy()[::-1])


def test_seed_reproducible_and_noise_arguments(pipe, lq):
    kw = dict(steps=2, process_size=64)
    a = pipe(lq, generator=torch.Generator().manual_seed(3), **kw).pixels
    b = pipe(lq, generator=torch.Generator().manual_seed(3), **kw).pixels
    c = pipe(lq, generator=torch.Generator().manual_seed(4), **kw).pixels
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).mean() > 1e-4
    # the generator's draws, given as arguments, give the same image (draw order: start, posterior, steps)
    g = torch.Generator().manual_seed(3)
    start, post = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    steps = torch.stack([torch.randn(1, 4, 8, 8, generator=g) for _ in range(2)])
    d = pipe(lq, latents=start, posterior_noise=post, step_noise=steps, **kw).pixels
    np.testing.assert_allclose(d, a, atol=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    ({"compat": "strict"}, "compat must be one of"),
    ({"compat": "official", "resize_mode": "pad"}, "resize_mode='official'"),
    ({"steps": 0}, "steps must be an integer"),
    ({"guidance_scale": -1.0}, "guidance_scale must be"),
    ({"guidance_scale": float("nan")}, "guidance_scale must be"),
    ({"start_point": "middle"}, "start_point must be one of"),
    ({"tags": 3}, "tags must be a string"),
    ({"image_embeds": torch.zeros(1, 145, 32)}, r"image_embeds must be .*\[1, N, 512\]"),
    ({"prompt": 1}, "prompt must be a string"),
    ({"latent_tile": 2}, "latent_tile must be"),
    ({"colour": "adain"}, "unexpected argument"),
])
def test_bad_arguments_raise_before_any_work(pipe, lq, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        pipe(lq, **kwargs)


def test_wrong_noise_shape_names_the_expected_shape(pipe, lq):
    with pytest.raises(ValueError, match=r"latents must be \[1, 4, 8, 8\]"):
        pipe(lq, steps=1, process_size=64, latents=torch.zeros(1, 4, 9, 9))
    with pytest.raises(ValueError, match=r"step_noise must be \[2, 1, 4, 8, 8\]"):
        pipe(lq, steps=2, process_size=64, step_noise=torch.zeros(3, 1, 4, 8, 8))


def _components(pipe, **kw):
    from realisr.pipelines.seesr.pipeline_seesr import SeeSRPipeline

    return SeeSRPipeline(pipe.spec, unet=pipe.unet, controlnet=pipe.controlnet, vae=pipe.vae,
                         text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, scheduler=pipe.scheduler,
                         device="cpu", dtype="fp32", **kw)


def test_tags_and_soft_prompt_bypass_the_tagger(pipe, lq):
    bare = _components(pipe, tagger=False)
    soft = np.load(ROOT / "ram_outputs/in0/dape_image_embeds.npy")
    kw = dict(steps=2, process_size=64)
    out = bare(lq, tags=["arch", "arch bridge"], image_embeds=soft, generator=torch.Generator().manual_seed(1), **kw)
    assert out.info["tags"] == "arch, arch bridge" and out.info["tagger_seconds"] == 0.0
    with pytest.raises(ValueError, match="pass tags= and image_embeds="):
        bare(lq, tags="arch", **kw)
    # the same soft prompt and tags as the tagger's give the tagger's image
    tags = "apple, apple tree, applesauce, approach, aquarium, arcade, arch, arch bridge"
    a = bare(lq, tags=tags, image_embeds=soft, generator=torch.Generator().manual_seed(1), **kw).pixels
    b = pipe(lq, generator=torch.Generator().manual_seed(1), **kw).pixels
    assert np.abs(a - b).max() < 1e-3


def test_missing_tagger_weights_say_what_to_do(pipe, lq, tmp_path, monkeypatch):
    from realisr.errors import WeightsNotFoundError

    monkeypatch.setenv("REALISR_WEIGHTS", str(tmp_path))
    p = _components(pipe)
    with pytest.raises(WeightsNotFoundError, match=r"DAPE\.pth.*tags= and image_embeds="):
        p(lq, steps=1, process_size=64)


def test_missing_seesr_weights_name_the_parts(tmp_path, monkeypatch):
    import realisr
    from realisr.errors import WeightsNotFoundError

    (tmp_path / "seesr" / "unet").mkdir(parents=True)
    with pytest.raises(WeightsNotFoundError, match=r"missing unet/, controlnet/"):
        realisr.load_pipeline("seesr", device="cpu", sd=str(SD), seesr=str(tmp_path / "seesr"))
    monkeypatch.setenv("REALISR_WEIGHTS", str(tmp_path / "none"))
    monkeypatch.delenv("REALISR_SEESR", raising=False)
    from realisr.registry import get_spec
    from realisr.weights.status import weights_status

    ok, why = weights_status(get_spec("seesr"))
    assert not ok and "SeeSR weights not found" in why and "DAPE.pth" in why


def test_turbo_variant_takes_the_base_unet_and_seesr_image_attentions(pipe, lq):
    """seesr-turbo: UNet from the backbone folder (here the tiny SD, whose weights the fixture's SeeSR UNet
    holds unchanged) plus SeeSR's image attentions; 2 steps without CFG."""
    import realisr

    turbo = realisr.load_pipeline("seesr-turbo", device="cpu", dtype="fp32", sd=str(SD), seesr=str(ROOT / "seesr"),
                                  tagger_root=str(ROOT / "ram"))
    ref = pipe.unet.state_dict()
    got = turbo.unet.state_dict()
    assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref)
    seen, hook = _unet_timesteps(turbo)
    try:
        out = turbo(lq, process_size=64, generator=torch.Generator().manual_seed(0))
    finally:
        hook.remove()
    assert seen == [(999, 1), (499, 1)]  # trailing timesteps, batch 1 (no guidance)
    assert out.info["negative_prompt"] is None and out.pixels.shape == (64, 64, 3)


def test_cli_upscale_seesr_matches_the_api(pipe, tmp_path, monkeypatch):
    from realisr.cli.main import main
    from realisr.io import read_image

    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "ram").symlink_to(ROOT / "ram")
    monkeypatch.setenv("REALISR_WEIGHTS", str(weights))
    src = ROOT / "inputs/in1/lq.png"  # 20x14
    args = ["upscale", "-q", "-m", "seesr", "--sd", str(SD), "--seesr", str(ROOT / "seesr"), "--process-size", "64",
            "--steps", "2", "--guidance-scale", "3", "--seed", "5", "-i", str(src)]
    assert main([*args, "-o", str(tmp_path / "a.png")]) == 0
    assert main([*args, "-o", str(tmp_path / "b.png"), "--compat", "official"]) == 0
    from PIL import Image

    ref = pipe(Image.open(src), steps=2, guidance_scale=3.0, process_size=64,
               generator=torch.Generator().manual_seed(5)).pixels
    a, b = read_image(tmp_path / "a.png").pixels, read_image(tmp_path / "b.png").pixels
    assert a.shape == b.shape == (56, 80, 3)  # exactly 4x the input
    assert np.abs(a - ref).max() <= 0.6 / 255  # 8-bit rounding of the file
    assert np.abs(a - b).mean() > 1e-3  # --compat reaches the pipeline


def test_cli_refuses_seesr_folder_for_other_models(tmp_path, capsys):
    from realisr.cli.main import main

    src = ROOT / "inputs/in0/lq.png"
    assert main(["upscale", "-q", "-m", "bicubic", "--seesr", str(tmp_path), "-i", str(src),
                 "-o", str(tmp_path / "x.png")]) == 1
    assert "--seesr is for -m seesr" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
