"""Parity with the official CCSR-v2 inference code: one test per case of the golden-ccsr manifest.

The fixture folder comes from ``REALISR_GOLDEN_CCSR_DIR`` (default: the vendored ``tests/fixtures/golden-ccsr``);
every setting (steps, t_max, t_min, CFG, prompts, process size, tiles) and every random draw is read from
``manifest.json`` and the case's trace, so any set of the same format is checked the same way. A missing set
is a failure, not a skip.

Everything runs through the public call, ``realisr.load_pipeline("ccsr")(image, ..., compat="official",
noise=CCSRNoise(...recorded draws...), keep_intermediates=True)``. Tolerances (issue 10): preprocessing exact;
network outputs (eps, ControlNet residuals) and the decoder output <= 1e-5; latents <= 1e-4; the colour fix's
float core <= 1e-6; PNGs within 1 level on <= 0.1 % of the values.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from helpers import ccsr as H
from helpers.onestep import one_thread

ROOT = H.ccsr_dir()
_MISSING = "golden-ccsr-fixtures-missing"

TOL_EPS = 1e-5
TOL_LATENT = 1e-4
TOL_DECODER = 1e-5
TOL_EMBEDS = 1e-5
TOL_COLOR_FLOAT = 1e-6
PNG_MAX_LEVEL = 1
PNG_MAX_FRACTION = 0.001
LATENT_KEYS = ("z_T", "init.x0", "init.z_tao", "final.latent")


def _case_ids() -> list[str]:
    try:
        return [c["id"] for c in H.manifest(ROOT)["cases"]] or [_MISSING]
    except (OSError, ValueError, KeyError):
        return [_MISSING]


CASE_IDS = _case_ids()
ERRORS: dict = {}  # case -> {quantity: max abs error}, printed at the end (-s) for the record


@pytest.fixture(scope="module")
def manifest():
    try:
        return H.manifest(ROOT)
    except (OSError, ValueError):
        return None


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_thread():  # the shared 2-core box thrashes with more threads
        yield
    if ERRORS:
        print("\nCCSR parity, max abs errors:\n" + json.dumps(ERRORS, indent=1))


def _err(a, b) -> float:
    a = a.detach().double().cpu().numpy() if hasattr(a, "detach") else np.asarray(a, dtype=np.float64)
    b = b.detach().double().cpu().numpy() if hasattr(b, "detach") else np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, f"shape {a.shape} != official {b.shape}"
    return float(np.abs(a - b).max())


def _png(path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB")).astype(np.int16)


def _png_close(ours: np.ndarray, ref: np.ndarray, what: str, rec: dict) -> None:
    assert ours.shape == ref.shape, f"{what}: size {ours.shape} != official {ref.shape}"
    diff = np.abs(ours.astype(np.int16) - ref)
    frac = float((diff > 0).mean())
    rec[f"png {what}"] = f"max {int(diff.max())} level, {frac:.3%}"
    assert diff.max() <= PNG_MAX_LEVEL, f"{what}: max level difference {diff.max()}"
    assert frac <= PNG_MAX_FRACTION, f"{what}: {frac:.4%} of the values differ"


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_ccsr_golden_case(case_id, manifest):
    import torch
    from PIL import Image

    from realisr.color_fix import color_fix

    if case_id == _MISSING or manifest is None:
        pytest.fail(f"no golden-ccsr cases at {ROOT} (missing or empty manifest.json; set REALISR_GOLDEN_CCSR_DIR)")
    case = next(c for c in manifest["cases"] if c["id"] == case_id)
    inp = manifest["inputs"][case["input"]]
    tr = H.trace(case, ROOT)
    pipe = H.pipeline(ROOT)
    rec = ERRORS.setdefault(case_id, {})
    lq = Image.open(ROOT / H.path_of(inp["files"]["lq_png"])).convert("RGB")
    np.testing.assert_array_equal(np.asarray(lq, dtype=np.float32).transpose(2, 0, 1)[None] / 255,
                                  np.load(ROOT / H.path_of(inp["files"]["lq_npy"])))
    kwargs = H.call_kwargs(case, inp)
    noise = H.recorded_noise(case, tr)

    # the network calls, as the official script made them (order, timesteps, shapes, ControlNet residuals)
    calls: list = []

    def hook(module, args, kw, out):
        down, mid = out
        calls.append({"t": kw["timestep"] if "timestep" in kw else args[1], "sample": (kw.get("sample", args[0] if args else None)),
                      "cond": kw["controlnet_cond"], "down": [d.detach().clone() for d in down], "mid": mid.detach().clone()})

    handle = pipe.controlnet.register_forward_hook(hook, with_kwargs=True)
    try:
        out = pipe(lq, compat="official", noise=noise, keep_intermediates=True, color_fix="none", **kwargs)
    finally:
        handle.remove()
    it = out.extras["intermediates"]

    # -- preprocessing (exact) and prompts --------------------------------------------------------------
    pre_ref = np.load(ROOT / H.path_of(inp["files"]["preproc_npy"]))
    np.testing.assert_array_equal(it["preproc"].numpy(), pre_ref)
    np.testing.assert_array_equal((it["preproc"] * 2 - 1).numpy(), tr["vae_enc.input"][0:1].numpy())
    assert list(out.info["processed_size"]) == list(case["preproc_shape"][-2:])
    ids = pipe.tokenizer(case["prompt"], max_length=pipe.tokenizer.model_max_length, padding="max_length",
                         truncation=True).input_ids
    assert list(ids) == case["token_ids"]["positive"]
    rec["prompt_embeds"] = _err(it["prompt_embeds"], tr["prompt_embeds"])
    assert rec["prompt_embeds"] <= TOL_EMBEDS

    # -- schedule -------------------------------------------------------------------------------------------
    assert out.info["timesteps"] == case["scheduler_timesteps"]
    assert out.info["t_tau"] == case["t_tao"]
    assert out.info["loop"] == (case["loop_timesteps"] if case["loop_executed"] else [])

    # -- calls ----------------------------------------------------------------------------------------------
    assert len(calls) == case["n_network_calls"] == len(case["calls"])
    for k, (ours, ref) in enumerate(zip(calls, case["calls"])):
        assert [int(v) for v in torch.as_tensor(ours["t"]).flatten()[:1]] == ref["t"][:1], f"call {k}: timestep"
        assert list(ours["cond"].shape) == list(tr[f"call{k:02d}.ctrl.cond"].shape)
        rec.setdefault("ctrl.cond", 0.0)
        rec["ctrl.cond"] = max(rec["ctrl.cond"], _err(ours["cond"], tr[f"call{k:02d}.ctrl.cond"]))
        err = max([_err(d, tr[f"call{k:02d}.ctrl.down{j:02d}"]) for j, d in enumerate(ours["down"])]
                  + [_err(ours["mid"], tr[f"call{k:02d}.ctrl.mid"])])
        rec["ctrl.residuals"] = max(rec.get("ctrl.residuals", 0.0), err)
    assert rec["ctrl.residuals"] <= TOL_EPS
    assert rec["ctrl.cond"] <= TOL_LATENT

    # -- tensors ----------------------------------------------------------------------------------------
    for key in ("vae_enc.mean", "vae_enc.std", "vae_enc.sample"):
        rec[key] = _err(it[key], tr[key])
        assert rec[key] <= TOL_DECODER, key
    for key in ("init.eps",):
        rec[key] = _err(it[key], tr[key])
        assert rec[key] <= TOL_EPS, key
    for key in LATENT_KEYS:
        if key in tr:
            rec[key] = _err(it[key], tr[key])
            assert rec[key] <= TOL_LATENT, key
    if case["loop_executed"]:
        for i in range(len(case["loop_timesteps"])):
            assert int(it[f"step{i}.t"]) == int(tr[f"step{i}.t"])
            for key in ("eps_raw", "eps"):
                rec[f"step{i}.{key}"] = _err(it[f"step{i}.{key}"], tr[f"step{i}.{key}"])
                assert rec[f"step{i}.{key}"] <= TOL_EPS, (i, key)
            for key in ("latent", "prev_sample"):
                rec[f"step{i}.{key}"] = _err(it[f"step{i}.{key}"], tr[f"step{i}.{key}"])
                assert rec[f"step{i}.{key}"] <= TOL_LATENT, (i, key)
    else:  # N = 1: the output is x0_T (the re-noised latent is discarded)
        np.testing.assert_array_equal(it["final.latent"].numpy(), it["init.x0"].numpy())
    rec["decode.output"] = _err(it["decode.output"], tr["decode.output"])
    assert rec["decode.output"] <= TOL_DECODER

    # -- the colour fix's float core (the library functions realisr uses) ------------------------------------
    from safetensors.torch import load_file

    for mode in ("adain", "wavelet"):
        cf = load_file(str(ROOT / case["files"][f"colorfix_{mode}"]))
        rec[f"colorfix {mode}"] = _err(color_fix(cf["target"], cf["source"], mode), cf["out_float"].clamp(0, 1))
        assert rec[f"colorfix {mode}"] <= TOL_COLOR_FLOAT, mode

    # -- PNGs as the official script writes them, through the public call ------------------------------------
    W, H_ = case["final_png_size_WxH"]
    assert out.pixels.shape == (H_, W, 3)
    _png_close(np.asarray(out.to_pil()), _png(ROOT / case["files"]["out_nofix_png"]), "nofix", rec)
    for mode in ("adain", "wavelet"):
        o = pipe(lq, compat="official", noise=noise, color_fix=mode, **kwargs)
        _png_close(np.asarray(o.to_pil()), _png(ROOT / case["files"][f"out_{mode}_png"]), mode, rec)
