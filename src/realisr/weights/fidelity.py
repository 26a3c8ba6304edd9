"""Fidelity deltas shipped with realisr: ``W_fid - W`` of a registered GAN model, read by the ``fidelity`` dial.

A delta is a safetensors file (``realisr/weights/deltas/``, package data) whose tensors carry the base model's
parameter names and whose metadata holds its provenance (``format``, ``base_model``, ``base_fingerprint`` of
the base tensors it was trained from, the recipe, the training photos, the licence). The registry names it in
``ModelSpec.options["fidelity_delta"]``. Training: :mod:`realisr.train.trainer_fidelity`.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Optional

from ..errors import CheckpointError, WeightsNotFoundError
from ..registry import ModelSpec

__all__ = ["DELTA_FORMAT", "delta_path", "load_delta", "base_fingerprint"]

logger = logging.getLogger(__name__)

DELTA_FORMAT = "realisr-fidelity-delta-1"


def base_fingerprint(tensors: dict) -> str:
    """SHA-256 (first 16 hex digits) over the sorted names and float32 bytes of ``tensors``."""
    import torch

    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].detach().to(torch.float32).cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def delta_path(spec: ModelSpec) -> Optional[Path]:
    """The delta file of ``spec``: a file name in the packaged ``deltas/`` folder, or an absolute path
    (``None`` when the model has no fidelity dial)."""
    name = spec.options.get("fidelity_delta")
    if not name:
        return None
    p = Path(name)
    return p if p.is_absolute() else Path(__file__).with_name("deltas") / name


def load_delta(spec: ModelSpec, state: dict) -> dict:
    """The delta of ``spec`` as float32 CPU tensors, checked against the model's ``state`` (names, shapes,
    and the base weights it was trained from).

    Raises:
        WeightsNotFoundError: the model has no delta, or the file is missing from the installation.
        CheckpointError: the file is unreadable or does not fit the model.
    """
    import torch
    from safetensors import SafetensorError, safe_open

    path = delta_path(spec)
    if path is None:
        raise WeightsNotFoundError(f"{spec.id} has no fidelity dial (no delta registered)")
    if not path.is_file():
        raise WeightsNotFoundError(f"the fidelity delta of {spec.id} is missing ({path}): reinstall realisr")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k).to(torch.float32) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"cannot read the fidelity delta {path}: {e}") from e
    if meta.get("format") != DELTA_FORMAT:
        raise CheckpointError(f"{path} is not a realisr fidelity delta (format {meta.get('format')!r})")
    for k, v in tensors.items():
        if k not in state or tuple(state[k].shape) != tuple(v.shape):
            raise CheckpointError(f"{path} does not fit {spec.id} ({k}): reinstall realisr")
    want = meta.get("base_fingerprint")
    if want and base_fingerprint({k: state[k] for k in tensors}) != want:
        logger.warning("the %s weights differ from those the fidelity delta was trained on (%s): the dial still "
                       "works, its F=1 end is no longer the trained model", spec.id, want)
    return tensors
