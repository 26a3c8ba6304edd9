"""EA-Adam's official checkpoint layouts (csslc/EA-Adam), read and written safely.

Every official file is ``torch.save`` of a dict whose ``model_state_dict`` holds the network:

* population members ``model_x4_<epoch>_<i>.pt`` and the released ``EA-Adam-srresnet.pt``: MSRResNet keys
  with the ``module.`` prefix of ``nn.DataParallel``, plus ``epoch`` / ``optimizer_state_dict`` /
  ``scheduler_state_dict`` for training files;
* RRDB models: BasicSR ``RRDBNet`` keys (``conv_first``, ``body.N.rdbM.convK``, ``conv_body``, ``conv_up1``,
  ``conv_up2``, ``conv_hr``, ``conv_last``) without the prefix (the official ``test.py`` loads them as is);
* the SwinIR model (``final_model_swinIR_EAdam_*.pt``): official SwinIR keys with ``module.``;
* discriminators ``model_d_x4_<epoch>_<i>.pt`` (the fusion stage's ``--resume_d``) and the fusion network:
  ``module.``-prefixed, the fusion network's layers holding ``[K, ...]`` expert kernels plus
  ``<layer>.fusion.ConvNet.*`` / ``<layer>.fusion.MappingNet.*``.

realisr trains RRDB as spandrel's ``RRDBNet`` (old ESRGAN key layout, ``model.1.sub.N.RDBM.convK.0``);
:func:`rrdb_to_basicsr` / :func:`rrdb_from_basicsr` map the names both ways (spandrel's own loader maps
BasicSR names to the same layout, which the tests check). Loading goes through ``torch.load(weights_only=True)``
only; the released models load with ``realisr upscale -m FILE`` like any spandrel checkpoint.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

__all__ = ["rrdb_to_basicsr", "rrdb_from_basicsr", "official_model_dict", "save_official", "load_official",
           "official_state_dict", "backbone_of", "find_released", "weights_status"]

_OLD_TO_NEW = [
    (re.compile(r"^model\.0\."), "conv_first."),
    (re.compile(r"^model\.1\.sub\.(\d+)\.RDB(\d)\.conv(\d)\.0\."), r"body.\1.rdb\2.conv\3."),
    (re.compile(r"^model\.3\."), "conv_up1."),
    (re.compile(r"^model\.6\."), "conv_up2."),
    (re.compile(r"^model\.8\."), "conv_hr."),
    (re.compile(r"^model\.10\."), "conv_last."),
]
_NEW_TO_OLD = [
    (re.compile(r"^conv_first\."), "model.0."),
    (re.compile(r"^body\.(\d+)\.rdb(\d)\.conv(\d)\."), r"model.1.sub.\1.RDB\2.conv\3.0."),
    (re.compile(r"^conv_up1\."), "model.3."),
    (re.compile(r"^conv_up2\."), "model.6."),
    (re.compile(r"^conv_hr\."), "model.8."),
    (re.compile(r"^conv_last\."), "model.10."),
]


def _num_blocks(keys, pattern: str) -> int:
    found = [int(m.group(1)) for k in keys for m in [re.match(pattern, k)] if m]
    return max(found) + 1 if found else 0


def rrdb_to_basicsr(state: dict) -> dict:
    """spandrel ``RRDBNet`` x4 names (``model.1.sub.N.RDBM.convK.0.*``) -> BasicSR ``RRDBNet`` names.

    Works on any tensor under a layer path (e.g. a fusion network's ``<layer>.fusion.*`` entries).

    Raises:
        ValueError: a key outside the x4 RRDBNet layout.
    """
    nb = _num_blocks(state, r"^model\.1\.sub\.(\d+)\.RDB")
    body = re.compile(rf"^model\.1\.sub\.{nb}\.")
    out = {}
    for k, v in state.items():
        new = body.sub("conv_body.", k) if body.match(k) else None
        for pat, rep in _OLD_TO_NEW:
            if new is None and pat.match(k):
                new = pat.sub(rep, k)
        if new is None:
            raise ValueError(f"{k} is not a key of spandrel's x4 RRDBNet")
        out[new] = v
    return out


def rrdb_from_basicsr(state: dict) -> dict:
    """BasicSR ``RRDBNet`` x4 names -> spandrel ``RRDBNet`` names (inverse of :func:`rrdb_to_basicsr`).

    Raises:
        ValueError: a key outside the x4 RRDBNet layout.
    """
    nb = _num_blocks(state, r"^body\.(\d+)\.rdb")
    out = {}
    for k, v in state.items():
        new = f"model.1.sub.{nb}." + k[len("conv_body."):] if k.startswith("conv_body.") else None
        for pat, rep in _NEW_TO_OLD:
            if new is None and pat.match(k):
                new = pat.sub(rep, k)
        if new is None:
            raise ValueError(f"{k} is not a key of BasicSR's x4 RRDBNet")
        out[new] = v
    return out


def official_state_dict(state: dict, backbone: str) -> dict:
    """realisr's state dict of a ``backbone`` network (``srresnet``, ``rrdb``, ``discriminator``, or
    ``swinir``) in the official key layout (see the module docstring)."""
    if backbone == "rrdb":
        return rrdb_to_basicsr(state)
    if backbone in ("srresnet", "swinir", "discriminator"):
        return {"module." + k: v for k, v in state.items()}
    raise ValueError(f"unknown EA-Adam backbone {backbone!r}: use srresnet, rrdb, swinir or discriminator")


def official_model_dict(state: dict, backbone: str, *, epoch: Optional[int] = None,
                        optimizer_state: Optional[dict] = None, scheduler_state: Optional[dict] = None) -> dict:
    """The official file content: ``{"model_state_dict": ..., ["epoch", "optimizer_state_dict",
    "scheduler_state_dict"]}`` with tensors moved to the CPU."""
    sd = {k: v.detach().cpu().contiguous() for k, v in official_state_dict(state, backbone).items()}
    out: dict = {}
    if epoch is not None:
        out["epoch"] = int(epoch)
    out["model_state_dict"] = sd
    if optimizer_state is not None:
        out["optimizer_state_dict"] = optimizer_state
    if scheduler_state is not None:
        out["scheduler_state_dict"] = scheduler_state
    return out


def save_official(content: dict, path) -> Path:
    """``torch.save`` atomically (temp file in the same folder, then rename)."""
    import os
    import tempfile

    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(content, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_official(path, backbone: str) -> dict:
    """The network state dict of an official EA-Adam file, in realisr's layout (no ``module.``; spandrel
    names for RRDB).

    Raises:
        WeightsNotFoundError: no such file.
        CheckpointError: not a readable weights-only checkpoint, or no ``model_state_dict``.
    """
    import pickle

    import torch

    from ..errors import CheckpointError, WeightsNotFoundError

    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsNotFoundError(f"EA-Adam checkpoint not found: {path}")
    try:
        ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: refused to load (it contains objects other than tensors)") from e
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint") from e
    sd = ckpt.get("model_state_dict", ckpt.get("params")) if isinstance(ckpt, dict) else None
    if not isinstance(sd, dict):
        sd = ckpt if isinstance(ckpt, dict) and ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()) \
            else None
    if sd is None:
        raise CheckpointError(f"{path} has no model_state_dict: not an EA-Adam / BasicSR checkpoint")
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    if backbone == "rrdb" and any(k.startswith("conv_first.") for k in sd):
        sd = rrdb_from_basicsr(sd)
    return sd


def backbone_of(model) -> str:
    """``srresnet`` / ``rrdb`` for a realisr MSRResNet or a spandrel RRDBNet module."""
    name = type(model).__name__
    if name == "MSRResNet":
        return "srresnet"
    if name == "RRDBNet":
        return "rrdb"
    raise ValueError(f"EA-Adam trains MSRResNet or RRDBNet backbones, not {name}")


def find_released(spec) -> Optional[Path]:
    """The released EA-Adam file of a registry entry (``weights.files``) in
    :func:`realisr.weights.cache.checkpoints_dir`, or ``None``."""
    from .cache import checkpoints_dir

    for name in spec.weights.files:
        p = checkpoints_dir() / name
        if p.is_file():
            return p
    return None


def weights_status(spec) -> tuple[bool, str]:
    """``(available, detail)`` of a released EA-Adam model (no loading)."""
    from .cache import checkpoints_dir

    p = find_released(spec)
    if p is None:
        return False, (f"{spec.weights.files[0]} not found in {checkpoints_dir()} (set REALISR_WEIGHTS or copy it "
                       f"there; get it from {spec.weights.url}; or pass the file with -m)")
    return True, str(p)
