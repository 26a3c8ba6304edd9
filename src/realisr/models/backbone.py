"""Stable Diffusion 2.1-base, the backbone of PiSA-SR and OSEDiff, in diffusers layout.

Where it is looked for, in order:

1. ``sd=`` (``--sd PATH_OR_ID`` on the CLI): a local folder with ``unet/ vae/ text_encoder/ tokenizer/
   scheduler/`` (``model_index.json`` optional), or a Hugging Face hub id.
2. The environment variable ``REALISR_SD`` (same forms).
3. The Hugging Face cache (``HF_HUB_CACHE`` / ``HF_HOME``) snapshot of ``stabilityai/stable-diffusion-2-1-base``.
4. The hub itself (download into the HF cache) unless offline (``HF_HUB_OFFLINE=1``).

When none has it, :class:`~realisr.errors.WeightsNotFoundError` names the missing parts and how to get them.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from ..errors import WeightsNotFoundError

logger = logging.getLogger(__name__)

__all__ = ["SD21_BASE", "SD_ENV", "COMPONENTS", "Backbone", "resolve_sd", "missing_components",
           "backbone_status", "load_backbone", "encode_prompt"]

SD21_BASE = "stabilityai/stable-diffusion-2-1-base"
SD_ENV = "REALISR_SD"
COMPONENTS: tuple[str, ...] = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
_HOWTO = (f"download {SD21_BASE} in diffusers layout (e.g. `huggingface-cli download {SD21_BASE}`) "
          f"and pass --sd PATH (or set {SD_ENV}); see docs/weights.md")


def _howto(default_id: str, env: str) -> str:
    if default_id == SD21_BASE and env == SD_ENV:
        return _HOWTO
    return (f"download {default_id} in diffusers layout (e.g. `huggingface-cli download {default_id}`) "
            f"and pass --sd PATH (or set {env}); see docs/weights.md")


@dataclass
class Backbone:
    """The loaded SD-2.1 components (any may be ``None`` if not requested)."""

    unet: Any = None
    vae: Any = None
    text_encoder: Any = None
    tokenizer: Any = None
    scheduler: Any = None
    source: str = ""


def missing_components(folder, components: Sequence[str] = COMPONENTS) -> list[str]:
    """The parts of a diffusers folder that are missing (``"unet/"``, ...); an empty list when complete."""
    folder = Path(folder)
    missing = []
    for name in components:
        sub = folder / name
        if name == "tokenizer":
            ok = sub.is_dir() and any((sub / f).is_file() for f in ("vocab.json", "tokenizer.json"))
        elif name == "scheduler":
            ok = (sub / "scheduler_config.json").is_file()
        else:
            ok = (sub / "config.json").is_file() and any(
                p.suffix in (".safetensors", ".bin") for p in sub.glob("*") if p.is_file())
        if not ok:
            missing.append(name + "/")
    return missing


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def resolve_sd(sd: Optional[str] = None, components: Sequence[str] = COMPONENTS, *, default_id: str = SD21_BASE,
               env: str = SD_ENV) -> tuple[Optional[Path], str]:
    """Find the backbone locally. Returns ``(folder or None, hub id or description)`` without network access.

    ``(folder, source)`` when a complete local folder was found; ``(None, hub_id)`` when only a hub id is known.
    ``default_id`` / ``env``: the hub id and environment variable of the backbone (SD-2.1-base and
    ``REALISR_SD`` unless a method needs another one, e.g. SeeSR's SD-2-base).

    Raises:
        WeightsNotFoundError: an explicit local folder (argument or env) lacks components.
    """
    from ..weights.cache import find_hf_snapshot

    howto = _howto(default_id, env)
    explicit = sd or os.environ.get(env)
    origin = "--sd" if sd else env
    if explicit:
        p = Path(str(explicit)).expanduser()
        # a hub id is "org/name"; anything else (or an existing path) is a folder
        looks_local = p.exists() or str(explicit).startswith((".", "/", "~")) or str(explicit).count("/") != 1
        if looks_local:
            if not p.is_dir():
                raise WeightsNotFoundError(f"SD backbone folder {p} ({origin}) does not exist: {howto}")
            missing = missing_components(p, components)
            if missing:
                raise WeightsNotFoundError(
                    f"SD backbone folder {p} ({origin}) is missing {', '.join(missing)}: {howto}")
            return p, str(p)
        snap = find_hf_snapshot(str(explicit))
        if snap is not None and not missing_components(snap, components):
            return snap, f"{explicit} (HF cache)"
        return None, str(explicit)
    snap = find_hf_snapshot(default_id)
    if snap is not None and not missing_components(snap, components):
        return snap, f"{default_id} (HF cache)"
    return None, default_id


def backbone_status(sd: Optional[str] = None, components: Sequence[str] = COMPONENTS, *,
                    default_id: str = SD21_BASE, env: str = SD_ENV) -> tuple[bool, str]:
    """``(available locally, detail)`` without network access (``default_id``/``env``: see :func:`resolve_sd`)."""
    howto = _howto(default_id, env)
    try:
        folder, source = resolve_sd(sd, components, default_id=default_id, env=env)
    except WeightsNotFoundError as e:
        return False, str(e)
    if folder is not None:
        return True, f"SD backbone: {source}"
    from ..weights.cache import find_hf_snapshot

    snap = find_hf_snapshot(source)
    if snap is not None:
        missing = missing_components(snap, components)
        return False, f"SD backbone {source} in the HF cache is missing {', '.join(missing)}: {howto}"
    return False, f"SD backbone {source} not found locally (HF cache or {env}): {howto}"


def load_backbone(sd: Optional[str] = None, *, components: Sequence[str] = COMPONENTS, device=None,
                  dtype=None, vae_dtype=None, default_id: str = SD21_BASE, env: str = SD_ENV) -> Backbone:
    """Load SD-2.1-base components with diffusers/transformers.

    Args:
        sd: local folder or hub id (default: ``REALISR_SD``, the HF cache, then the hub when online).
        components: which parts to load.
        device, dtype: where the UNet and text encoder go (default CPU, float32).
        vae_dtype: the VAE's dtype (default ``dtype``).
        default_id, env: the backbone's hub id and environment variable (see :func:`resolve_sd`).

    Returns:
        :class:`Backbone` (models in eval mode, ``requires_grad=False``).

    Raises:
        WeightsNotFoundError: not found locally and offline or the download failed (the message lists the
            missing parts and how to get them).
    """
    import torch

    howto = _howto(default_id, env)
    folder, source = resolve_sd(sd, components, default_id=default_id, env=env)
    where = str(folder) if folder is not None else source
    if folder is None:
        if _offline():
            raise WeightsNotFoundError(
                f"SD backbone {source} not found locally and HF_HUB_OFFLINE is set "
                f"(needs {', '.join(c + '/' for c in components)}): {howto}")
        logger.info("SD backbone not found locally; downloading %s from the Hugging Face hub", source)
    kw: dict = {}
    dtype = dtype or torch.float32
    vae_dtype = vae_dtype or dtype
    bb = Backbone(source=source)
    try:
        if "unet" in components:
            from diffusers import UNet2DConditionModel

            bb.unet = UNet2DConditionModel.from_pretrained(where, subfolder="unet", torch_dtype=dtype, **kw)
        if "vae" in components:
            from diffusers import AutoencoderKL

            bb.vae = AutoencoderKL.from_pretrained(where, subfolder="vae", torch_dtype=vae_dtype, **kw)
        if "text_encoder" in components:
            from transformers import CLIPTextModel
            from transformers.utils import logging as hf_logging

            bar = hf_logging.is_progress_bar_enabled()
            hf_logging.disable_progress_bar()  # the library never prints; progress goes through callbacks
            try:
                bb.text_encoder = CLIPTextModel.from_pretrained(where, subfolder="text_encoder", torch_dtype=dtype)
            finally:
                if bar:
                    hf_logging.enable_progress_bar()
        if "tokenizer" in components:
            from transformers import CLIPTokenizer

            bb.tokenizer = CLIPTokenizer.from_pretrained(where, subfolder="tokenizer")
        if "scheduler" in components:
            from diffusers import DDPMScheduler

            bb.scheduler = DDPMScheduler.from_pretrained(where, subfolder="scheduler")
    except (OSError, ValueError) as e:
        if folder is not None:
            raise WeightsNotFoundError(f"cannot load the SD backbone from {folder}: {str(e).splitlines()[0]}") from e
        raise WeightsNotFoundError(
            f"SD backbone {source} is not available locally and could not be downloaded "
            f"({type(e).__name__}): {howto}") from e
    logger.info("SD backbone loaded from %s (%s)", where, ", ".join(components))
    for m in (bb.unet, bb.vae, bb.text_encoder):
        if m is not None:
            m.requires_grad_(False)
            m.eval()
            if device is not None:
                m.to(device)
    return bb


def encode_prompt(tokenizer, text_encoder, prompt: str):
    """The official prompt embedding: tokenise (pad to ``model_max_length``, truncate), ``text_encoder(ids)[0]``.

    Returns:
        ``[1, 77, C]`` tensor on the text encoder's device and dtype.
    """
    import torch

    ids = tokenizer(prompt, max_length=tokenizer.model_max_length, padding="max_length", truncation=True,
                    return_tensors="pt").input_ids
    dev = next(text_encoder.parameters()).device
    with torch.no_grad():
        return text_encoder(ids.to(dev))[0]
