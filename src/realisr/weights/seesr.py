"""Loading and saving SeeSR's networks (:mod:`realisr.arch.seesr_arch`) in the official layout.

The official release is a folder ``seesr/`` with ``unet/`` and ``controlnet/`` in diffusers layout
(``config.json`` + ``diffusion_pytorch_model.safetensors``; ``.bin`` files are read with
``torch.load(weights_only=True)``). realisr looks for it at, in order: the ``seesr=`` argument (CLI
``--seesr PATH``), ``$REALISR_SEESR``, and ``<checkpoints folder>/seesr`` (``$REALISR_WEIGHTS``).

The backbone is **SD-2-base** (``stabilityai/stable-diffusion-2-base``, not 2.1): its VAE, text encoder,
tokenizer and scheduler (``--sd`` or ``$REALISR_SD2``). The SD-turbo variant takes those parts and the UNet
from ``stabilityai/sd-turbo`` (``$REALISR_SD_TURBO``) and only the ``image_attentions`` from ``seesr/unet``,
as the official ``test_seesr_turbo.py`` does.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Callable, Optional

from ..errors import CheckpointError, WeightsNotFoundError

logger = logging.getLogger(__name__)

__all__ = ["SEESR_ENV", "SD2_BASE", "SD2_ENV", "SD_TURBO", "SD_TURBO_ENV", "IMAGE_ATTENTION_KEY", "find_seesr_dir",
           "resolve_seesr_dir", "read_model_weights", "load_seesr_unet", "load_seesr_controlnet",
           "seesr_unet_from_sd", "save_seesr_folder", "weights_status"]

SEESR_ENV = "REALISR_SEESR"
SD2_BASE = "stabilityai/stable-diffusion-2-base"
SD2_ENV = "REALISR_SD2"
SD_TURBO = "stabilityai/sd-turbo"
SD_TURBO_ENV = "REALISR_SD_TURBO"
#: substring of every parameter name that belongs to SeeSR's image attentions.
IMAGE_ATTENTION_KEY = "image_attentions"
_PARTS = ("unet", "controlnet")
_HOWTO = ("get the official SeeSR weights (README of cswry/SeeSR: preset/models/seesr) and pass --seesr PATH, "
          f"set {SEESR_ENV}, or copy the folder to <checkpoints>/seesr (REALISR_WEIGHTS); see docs/seesr.md")
_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def _part_ok(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any((folder / f).is_file() for f in _WEIGHT_FILES)


def find_seesr_dir(seesr=None) -> Optional[Path]:
    """The SeeSR folder (holding ``unet/`` and ``controlnet/``) or ``None``; no loading, no network."""
    from .cache import checkpoints_dir

    for cand in (seesr, os.environ.get(SEESR_ENV), checkpoints_dir() / "seesr"):
        if cand and all(_part_ok(Path(cand).expanduser() / p) for p in _PARTS):
            return Path(cand).expanduser()
    return None


def resolve_seesr_dir(seesr=None) -> Path:
    """Like :func:`find_seesr_dir`, but raises.

    Raises:
        WeightsNotFoundError: an explicit folder lacks parts (named), or nothing was found.
    """
    explicit = seesr or os.environ.get(SEESR_ENV)
    if explicit:
        p = Path(explicit).expanduser()
        missing = [f"{part}/" for part in _PARTS if not _part_ok(p / part)]
        if missing:
            origin = "--seesr" if seesr else SEESR_ENV
            raise WeightsNotFoundError(f"SeeSR folder {p} ({origin}) is missing {', '.join(missing)} "
                                       f"(config.json + diffusion_pytorch_model.safetensors): {_HOWTO}")
        return p
    found = find_seesr_dir(None)
    if found is None:
        raise WeightsNotFoundError(f"SeeSR weights (seesr/unet, seesr/controlnet) not found: {_HOWTO}")
    return found


def read_model_weights(folder, keep: Callable[[str], bool] = lambda k: True) -> dict:
    """The tensors of a diffusers model folder whose names pass ``keep`` (safetensors, else a .bin read with
    ``weights_only=True``)."""
    folder = Path(folder)
    st = folder / _WEIGHT_FILES[0]
    if st.is_file():
        from safetensors import safe_open

        with safe_open(str(st), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys() if keep(k)}
    import torch

    sd = torch.load(str(folder / _WEIGHT_FILES[1]), map_location="cpu", weights_only=True)
    return {k: v for k, v in sd.items() if keep(k)}


def load_seesr_unet(seesr_dir, *, base_unet_dir=None):
    """The SeeSR UNet (fp32, CPU, eval, frozen).

    Args:
        seesr_dir: the official ``seesr`` folder.
        base_unet_dir: for the SD-turbo variant, the turbo model's ``unet`` folder: its configuration and weights
            are used, and only the ``image_attentions`` come from ``seesr_dir/unet``.

    Raises:
        CheckpointError: the files do not fit the architecture (missing or unexpected tensors).
    """
    from ..arch.seesr_arch import SeeSRUNet2DConditionModel

    unet_dir = Path(seesr_dir) / "unet"
    try:
        if base_unet_dir is None:
            unet = SeeSRUNet2DConditionModel.from_pretrained(str(unet_dir))
        else:
            unet = _turbo_unet(Path(base_unet_dir), unet_dir)
    except (OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"cannot load the SeeSR UNet from {unet_dir}: {str(e).splitlines()[0]}") from e
    return unet.requires_grad_(False).eval()


def _turbo_unet(base_dir: Path, seesr_unet_dir: Path):
    from ..arch.seesr_arch import SeeSRUNet2DConditionModel

    config = json.loads((base_dir / "config.json").read_text(encoding="utf-8"))
    config["use_image_cross_attention"] = True
    unet = SeeSRUNet2DConditionModel.from_config(config)
    state = read_model_weights(base_dir, lambda k: IMAGE_ATTENTION_KEY not in k)
    image = read_model_weights(seesr_unet_dir, lambda k: IMAGE_ATTENTION_KEY in k)
    if not image:
        raise ValueError(f"{seesr_unet_dir} holds no image_attentions tensors")
    state.update(image)
    missing, unexpected = unet.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"weights do not fit the SD-turbo UNet + SeeSR image attentions "
                         f"(e.g. {(missing or unexpected)[0]})")
    return unet


def load_seesr_controlnet(seesr_dir):
    """The SeeSR ControlNet (fp32, CPU, eval, frozen) from ``seesr_dir/controlnet``.

    Raises:
        CheckpointError: the files do not fit the architecture.
    """
    from ..arch.seesr_arch import SeeSRControlNetModel

    folder = Path(seesr_dir) / "controlnet"
    try:
        net = SeeSRControlNetModel.from_pretrained(str(folder))
    except (OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"cannot load the SeeSR ControlNet from {folder}: {str(e).splitlines()[0]}") from e
    return net.requires_grad_(False).eval()


def seesr_unet_from_sd(unet):
    """A SeeSR UNet holding an SD UNet's weights and newly initialised ``image_attentions`` (training start,
    as the official ``UNet2DConditionModel.from_pretrained(sd, use_image_cross_attention=True)``)."""
    from ..arch.seesr_arch import SeeSRUNet2DConditionModel

    config = {k: v for k, v in unet.config.items() if not k.startswith("_")}
    config["use_image_cross_attention"] = True
    seesr = SeeSRUNet2DConditionModel.from_config(config)
    missing, unexpected = seesr.load_state_dict(unet.state_dict(), strict=False)
    if unexpected or any(IMAGE_ATTENTION_KEY not in k for k in missing):
        raise CheckpointError("the SD UNet does not fit the SeeSR UNet "
                              f"(e.g. {(unexpected or [k for k in missing if IMAGE_ATTENTION_KEY not in k])[0]})")
    return seesr


_OFFICIAL_CLASS = {"unet": "UNet2DConditionModel", "controlnet": "ControlNetModel"}


def save_seesr_folder(unet, controlnet, out) -> Path:
    """Write ``out/unet`` and ``out/controlnet`` in the official layout (safetensors; ``config.json`` with the
    official class names and ``use_image_cross_attention: true``), written to a temporary folder first.

    The result loads with :func:`load_seesr_unet` / :func:`load_seesr_controlnet` and with the official code.
    """
    import shutil

    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for name, model in (("unet", unet), ("controlnet", controlnet)):
        model.save_pretrained(str(tmp / name), safe_serialization=True)
        cfg_path = tmp / name / "config.json"
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        cfg["_class_name"] = _OFFICIAL_CLASS[name]
        cfg["use_image_cross_attention"] = True
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def weights_status(spec) -> tuple[bool, str]:
    """``(available, detail)`` for ``seesr`` / ``seesr-turbo``: the SeeSR folder, the backbone and the tagger.

    No network access and no loading.
    """
    from ..models.backbone import backbone_status

    turbo = spec.options.get("variant") == "turbo"
    default_id, env = (SD_TURBO, SD_TURBO_ENV) if turbo else (SD2_BASE, SD2_ENV)
    components = ("unet", "vae", "text_encoder", "tokenizer", "scheduler") if turbo else \
        ("vae", "text_encoder", "tokenizer", "scheduler")
    parts = []
    folder = find_seesr_dir()
    ok = folder is not None
    parts.append(f"SeeSR: {folder}" if ok else f"SeeSR weights not found: {_HOWTO}")
    ok_sd, sd_detail = backbone_status(None, components, default_id=default_id, env=env)
    parts.append(sd_detail)
    from ..tagging import tagger_status

    ok_tag, tag_detail = tagger_status("dape")
    parts.append(tag_detail)
    return ok and ok_sd and ok_tag, "; ".join(parts)
