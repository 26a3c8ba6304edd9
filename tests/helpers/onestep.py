"""Shared helpers of the PiSA-SR / OSEDiff tests: the golden fixture folder and pipelines on its tiny SD model,
built once per test session (loading is cheap, importing diffusers is not)."""

from __future__ import annotations

import functools
import json
from pathlib import Path

from helpers.fixtures import fixture_set, tiny_sd_dir

REPO = Path(__file__).resolve().parents[2]


def golden_dir() -> Path:
    """The PiSA-SR / OSEDiff fixture set: ``REALISR_GOLDEN_DIR``, else the vendored ``tests/fixtures/golden``."""
    return fixture_set("golden")


def manifest(root: Path = None) -> dict:
    root = root or golden_dir()
    return json.loads((root / "manifest.json").read_text())


def sd_dir(root: Path = None) -> Path:
    root = root or golden_dir()
    try:
        return root / manifest(root)["model"]["dir"]
    except (OSError, KeyError, ValueError):
        return tiny_sd_dir(root)


def pisa_pipeline(checkpoint: str = None, root: str = None):
    """A PiSA-SR pipeline on the tiny fixture model (fp32, CPU), shared per (checkpoint, fixture folder)."""
    root = Path(root) if root else golden_dir()
    return _pisa(str(Path(checkpoint or root / "pisa_sr.pkl").resolve()), str(sd_dir(root).resolve()))


def osediff_pipeline(merge_lora: bool = True, checkpoint: str = None, root: str = None):
    """An OSEDiff pipeline on the tiny fixture model (fp32, CPU), shared per (merged, checkpoint, folder)."""
    root = Path(root) if root else golden_dir()
    return _osediff(bool(merge_lora), str(Path(checkpoint or root / "osediff.pkl").resolve()),
                    str(sd_dir(root).resolve()))


@functools.lru_cache(maxsize=None)
def _pisa(ckpt: str, sd: str):
    from realisr.pipelines.pisa_sr.pipeline_pisa_sr import PiSASRPipeline
    from realisr.registry import get_spec

    return PiSASRPipeline.from_spec(get_spec("pisa-sr"), device="cpu", dtype="fp32", sd=sd, checkpoint=ckpt)


@functools.lru_cache(maxsize=None)
def _osediff(merge_lora: bool, ckpt: str, sd: str):
    from realisr.pipelines.osediff.pipeline_osediff import OSEDiffPipeline
    from realisr.registry import get_spec

    # untagged: the golden cases record fixed prompts (a DAPE tagger in the user's REALISR_WEIGHTS must not
    # prepend its tags)
    return OSEDiffPipeline.from_spec(get_spec("osediff"), device="cpu", dtype="fp32", sd=sd, checkpoint=ckpt,
                                     merge_lora=merge_lora, tagger=None)


def one_thread():
    """Context for a module fixture: torch on one thread (the shared 2-core box thrashes with more)."""
    import contextlib

    import torch

    @contextlib.contextmanager
    def ctx():
        n = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(n)
    return ctx()
