"""Shared helpers of the CCSR tests: the golden-ccsr fixture set, a pipeline on its tiny model (loaded once per
session through the public ``load_pipeline``) and the recorded random draws of a case as a ``CCSRNoise``."""

from __future__ import annotations

import functools
import json
from pathlib import Path

from helpers.fixtures import fixture_set, tiny_sd_dir


def ccsr_dir() -> Path:
    """``REALISR_GOLDEN_CCSR_DIR``, else the vendored ``tests/fixtures/golden-ccsr``."""
    return fixture_set("golden-ccsr")


def manifest(root: Path = None) -> dict:
    root = root or ccsr_dir()
    return json.loads((root / "manifest.json").read_text())


def weights_dir(root: Path = None) -> Path:
    """The fixture's release folder (``controlnet/``, ``vae/``)."""
    return (root or ccsr_dir()) / "ccsr"


def pipeline(root: Path = None, model: str = "ccsr"):
    """``realisr.load_pipeline(model)`` on the fixture's tiny model, fp32 CPU, shared per folder."""
    root = Path(root or ccsr_dir()).resolve()
    return _load(model, str(weights_dir(root)), str(tiny_sd_dir(root).resolve()))


@functools.lru_cache(maxsize=None)
def _load(model: str, weights: str, sd: str):
    import realisr

    return realisr.load_pipeline(model, device="cpu", dtype="fp32", sd=sd, weights=weights)


def trace(case: dict, root: Path = None) -> dict:
    from safetensors.torch import load_file

    return load_file(str((root or ccsr_dir()) / case["files"]["trace"]))


def recorded_noise(case: dict, tr: dict):
    """The case's recorded random draws, in the public ``CCSRNoise`` form."""
    from realisr.pipelines.ccsr.pipeline_ccsr import CCSRNoise

    n = len(case["loop_timesteps"]) if case.get("loop_executed") else 0
    return CCSRNoise(start=tr["noise.start"], posterior=tr["vae_enc.noise"], renoise=tr["noise.tao"],
                     variance=[tr[f"step{i}.noise.variance"] for i in range(n)])


def call_kwargs(case: dict, inp: dict) -> dict:
    """The settings of a case as ``pipe(...)`` arguments (settings read from the manifest)."""
    kw = dict(steps=case["N"], t_max=case["t_max"], t_min=case["t_min"], guidance_scale=case["guidance_scale"],
              prompt=case["prompt"], negative_prompt=case["negative_prompt"], start_point=case["start_point"],
              conditioning_scale=case.get("conditioning_scale", 1.0), process_size=inp["process_size"])
    if case.get("tiled"):
        kw.update(latent_tile=case["tile_latent"], latent_overlap=case["tile_latent"] - case["tile_stride_latent"])
    else:
        kw.update(latent_tile=0)
    return kw


def path_of(entry: str) -> str:
    """Manifest file entries may carry a note after the path (``"inputs/x.npy (float32 ...)"``)."""
    return entry.split(" ")[0]
