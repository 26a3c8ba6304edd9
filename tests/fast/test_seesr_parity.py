"""Parity of the SeeSR pipeline with the official ``test_seesr.py``, one test per case of the ``golden-seesr``
manifest (case x colour fix), through the public path: ``realisr.load_pipeline("seesr", ...)`` on the fixture's
tiny models, the pipeline called on the LR PNG with ``compat="official"``, its DAPE tagger loaded from the
fixture's ``ram/`` files, and the official run's random draws given as call arguments (``latents``,
``posterior_noise``, ``step_noise``).

Checked (fixture README, "What a re-implementation must match"): the prompt string, tags and timesteps exactly;
the processed LR exactly; the soft prompt within 1e-5 (+1e-6 for DAPE, the tagger's own tolerance); the
prompt embeddings, ``z_lr``, ``z_T``, every step's input latent, CFG-combined eps and output latent, the final
latent and the decoder output within 1e-4; the number and shapes of the UNet and ControlNet calls (the tile
grid); and the PNG the script wrote within 1 level on <= 0.1 % of the values.

The fixture folder comes from ``REALISR_GOLDEN_SEESR_DIR`` (default: the vendored copy); every setting is read
from ``manifest.json``. A missing set fails.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from helpers.fixtures import fixture_set, tiny_sd_dir

ROOT = fixture_set("golden-seesr")
_MISSING = "golden-seesr-missing"
TOL = 1e-4
TOL_SOFT_PROMPT = 1e-5 + 1e-6
PNG_MAX_LEVEL = 1
PNG_MAX_FRACTION = 0.001


def _manifest():
    try:
        return json.loads((ROOT / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _case_ids() -> list[str]:
    m = _manifest()
    try:
        return [f"{c['id']}/{c['align_method']}" for c in m["cases"]] or [_MISSING]
    except (TypeError, KeyError):
        return [_MISSING]


CASE_IDS = _case_ids()


@pytest.fixture(scope="module")
def pipe():
    import torch

    import realisr

    assert (ROOT / "manifest.json").is_file(), f"golden-seesr fixture set missing at {ROOT} (REALISR_GOLDEN_SEESR_DIR)"
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    p = realisr.load_pipeline("seesr", device="cpu", dtype="fp32", sd=str(tiny_sd_dir(ROOT)),
                              seesr=str(ROOT / "seesr"), tagger_root=str(ROOT / "ram"))
    yield p
    torch.set_num_threads(n)


def _maxerr(ours, ref) -> float:
    a = ours.detach().cpu().numpy() if hasattr(ours, "detach") else np.asarray(ours)
    assert a.shape == ref.shape, f"shape {a.shape} != official {ref.shape}"
    return float(np.abs(a.astype(np.float64) - ref.astype(np.float64)).max())


def _png(path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB")).astype(np.int16)


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_seesr_case(case_id, pipe):
    from PIL import Image

    m = _manifest()
    if case_id == _MISSING or m is None:
        pytest.fail(f"no golden-seesr cases at {ROOT} (missing or empty manifest.json; set REALISR_GOLDEN_SEESR_DIR)")
    cid, align = case_id.split("/")
    case = next(c for c in m["cases"] if c["id"] == cid and c["align_method"] == align)
    inp = m["inputs"][case["input"]]
    out_dir = ROOT / "outputs" / cid / align

    def ref(name):
        return np.load(out_dir / f"{name}.npy")

    calls = {"unet": [], "controlnet": []}
    hooks = [getattr(pipe, name).register_forward_pre_hook(
        lambda mod, a, k, name=name: calls[name].append(tuple((a[0] if a else k["sample"]).shape)), with_kwargs=True)
        for name in calls]
    lq = Image.open(ROOT / f"inputs/{case['input']}/lq.png").convert("RGB")
    try:
        out = pipe(lq, compat="official", prompt="", steps=case["num_inference_steps"],
                   guidance_scale=case["guidance_scale"], conditioning_scale=case["conditioning_scale"],
                   start_point=case["start_point"], color_fix=align, process_size=inp["process_size"],
                   latent_tile=case["latent_tiled_size"], latent_overlap=case["latent_tiled_overlap"],
                   latents=ref("init_noise"), posterior_noise=ref("vae_post_noise")[0:1],
                   step_noise=ref("steps_variance_noise"), keep_intermediates=True)
    finally:
        for h in hooks:
            h.remove()
    rec = out.extras["intermediates"]

    # -- prompt, tags, soft prompt, schedule -----------------------------------------------------------------
    assert out.info["tags"] == inp["ram"]["dape_tags"]
    assert out.info["prompt"] == case["prompt"]
    assert out.info["negative_prompt"] == case["negative_prompt"]
    assert out.info["timesteps"] == case["timesteps"]
    soft = np.load(ROOT / "ram_outputs" / case["input"] / "dape_image_embeds.npy")
    assert _maxerr(rec["image_embeds"], soft) <= TOL_SOFT_PROMPT
    assert _maxerr(rec["prompt_embeds"], ref("prompt_embeds_neg_pos")) <= TOL

    # -- geometry: the processed LR (ControlNet condition, colour-fix source) exactly ------------------------------
    np.testing.assert_array_equal(np.rint(rec["processed"][0].permute(1, 2, 0).numpy() * 255).astype(np.int16),
                                  _png(out_dir / "preproc_u8.png"))
    assert _maxerr(rec["processed"] * 2 - 1, ref("vae_enc_in")[0:1]) == 0.0

    # -- LR embedding and every DDPM step ---------------------------------------------------------------------------
    assert _maxerr(rec["z_lr"], ref("z_lr")) <= TOL
    assert _maxerr(rec["z_T"], ref("z_T")) <= TOL
    assert _maxerr(rec["latents_in"], ref("steps_latent_in")) <= TOL
    assert _maxerr(rec["eps"], ref("steps_eps_cfg")) <= TOL
    assert _maxerr(rec["latents_out"], ref("steps_latent_out")) <= TOL
    assert _maxerr(rec["z_final"], ref("z_final")) <= TOL
    assert _maxerr(rec["decoded"], ref("out_raw")) <= TOL

    # -- the same network calls as the official run: one per tile (CFG batch of 2) and step --------------------------
    for name, key in (("unet", "unet_input_shapes"), ("controlnet", "unet_input_shapes")):
        assert len(calls[name]) == case[f"n_{name}_calls"], name
        assert {str(list(s)) for s in calls[name]} == set(case[key]), name

    # -- the file the script wrote ----------------------------------------------------------------------------------
    ours = np.asarray(out.to_pil()).astype(np.int16)
    official = _png(out_dir / f"final_{align}.png")
    assert ours.shape == official.shape, f"size {ours.shape} != official {official.shape}"
    diff = np.abs(ours - official)
    assert diff.max() <= PNG_MAX_LEVEL, f"max level difference {diff.max()}"
    assert (diff > 0).mean() <= PNG_MAX_FRACTION, f"{(diff > 0).mean():.4%} of the values differ"
