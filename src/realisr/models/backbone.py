"""Stable Diffusion 2.1-base, the backbone of PiSA-SR and OSEDiff, in diffusers layout.

Where it is looked for, in order:

1. ``sd=`` (``--sd PATH_OR_ID`` on the CLI): a local folder with ``unet/ vae/ text_encoder/ tokenizer/
   scheduler/`` (``model_index.json`` optional), or a Hugging Face hub id.
2. The environment variable ``REALISR_SD`` (same forms).
3. The Hugging Face cache (``HF_HUB_CACHE`` / ``HF_HOME``) snapshot of ``stabilityai/stable-diffusion-2-1-base``
   (or of the hub id given in 1./2.).

Nothing is downloaded here (the hub is never contacted, whatever ``HF_HUB_OFFLINE`` says): when none has
it, :class:`~realisr.errors.WeightsNotFoundError` names the missing parts and the command that gets them
(``realisr weights fetch sd-2.1-base`` or ``hf download``). Weights are read from safetensors files where the
folder has them (``use_safetensors=True``).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from ..errors import WeightsNotFoundError

logger = logging.getLogger(__name__)

__all__ = ["SD21_BASE", "SD_ENV", "COMPONENTS", "HF_INCLUDE", "Backbone", "resolve_sd", "missing_components",
           "backbone_status", "load_backbone", "encode_prompt", "hf_download_command"]

SD21_BASE = "stabilityai/stable-diffusion-2-1-base"
SD_ENV = "REALISR_SD"
COMPONENTS: tuple[str, ...] = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
HF_INCLUDE: tuple[str, ...] = ("unet/*", "vae/*", "text_encoder/*", "tokenizer/*", "scheduler/*", "model_index.json")


def hf_download_command(repo_id: str = SD21_BASE) -> str:
    """The ``hf download`` command line that fetches the diffusers folders realisr reads."""
    include = " ".join(f'"{p}"' for p in HF_INCLUDE)
    return f"hf download {repo_id} --include {include} --exclude \"*.bin\" \"*.ckpt\""


def _howto(repo_id: str = SD21_BASE, env: str = SD_ENV) -> str:
    fetch = "`realisr weights fetch sd-2.1-base`" if repo_id == SD21_BASE else f"`{hf_download_command(repo_id)}`"
    return (f"get it with {fetch} (or `{hf_download_command(repo_id)}`), or pass --sd PATH to a local "
            f"diffusers folder (or set {env}); see docs/weights.md")



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


def resolve_sd(sd: Optional[str] = None, components: Sequence[str] = COMPONENTS, *, default_id: str = SD21_BASE,
               env: str = SD_ENV) -> tuple[Optional[Path], str]:
    """Find the backbone locally. Returns ``(folder or None, hub id or description)`` without network access.

    ``(folder, source)`` when a complete local folder was found; ``(None, hub_id)`` when only a hub id is known.
    ``default_id`` / ``env``: the hub id and environment variable of the backbone (SD-2.1-base and
    ``REALISR_SD`` by default; SeeSR uses SD-2-base and ``REALISR_SD2``).

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
        return False, f"SD backbone {source} in the HF cache is missing {', '.join(missing)}: {_howto(source, env)}"
    return False, (f"SD backbone {source} ({', '.join(c + '/' for c in components)}) not found locally "
                   f"(HF cache or {env}): {_howto(source, env)}")


def _has_safetensors(folder: Path, sub: str) -> bool:
    d = folder / sub
    return d.is_dir() and any(p.suffix == ".safetensors" for p in d.iterdir())


def load_backbone(sd: Optional[str] = None, *, components: Sequence[str] = COMPONENTS, device=None,
                  dtype=None, vae_dtype=None, default_id: str = SD21_BASE, env: str = SD_ENV) -> Backbone:
    """Load SD-2.1-base components with diffusers/transformers from a local folder (never the network).

    Args:
        sd: local folder or hub id (default: ``REALISR_SD``, then the HF cache of SD-2.1-base); a hub id is
            looked up in the HF cache only.
        components: which parts to load.
        device, dtype: where the UNet and text encoder go (default CPU, float32).
        vae_dtype: the VAE's dtype (default ``dtype``).
        default_id, env: the backbone's hub id and environment variable (see :func:`resolve_sd`).

    Returns:
        :class:`Backbone` (models in eval mode, ``requires_grad=False``).

    Raises:
        WeightsNotFoundError: not found locally (the message lists the missing parts and the command that
            gets them).
    """
    import torch

    folder, source = resolve_sd(sd, components, default_id=default_id, env=env)
    if folder is None:
        ok, detail = backbone_status(sd, components, default_id=default_id, env=env)
        raise WeightsNotFoundError(detail)
    where = str(folder)
    dtype = dtype or torch.float32
    vae_dtype = vae_dtype or dtype
    bb = Backbone(source=source)

    def kw(sub: str) -> dict:
        # safetensors where the folder has them (no pickle); the .bin fallback loads with weights_only=True
        return {"local_files_only": True, **({"use_safetensors": True} if _has_safetensors(folder, sub) else {})}

    try:
        if "unet" in components:
            from diffusers import UNet2DConditionModel

            bb.unet = UNet2DConditionModel.from_pretrained(where, subfolder="unet", torch_dtype=dtype, **kw("unet"))
        if "vae" in components:
            from diffusers import AutoencoderKL

            bb.vae = AutoencoderKL.from_pretrained(where, subfolder="vae", torch_dtype=vae_dtype, **kw("vae"))
        if "text_encoder" in components:
            from transformers import CLIPTextModel
            from transformers.utils import logging as hf_logging

            bar = hf_logging.is_progress_bar_enabled()
            hf_logging.disable_progress_bar()  # the library never prints; progress goes through callbacks
            try:
                bb.text_encoder = CLIPTextModel.from_pretrained(where, subfolder="text_encoder", torch_dtype=dtype,
                                                                **kw("text_encoder"))
            finally:
                if bar:
                    hf_logging.enable_progress_bar()
        if "tokenizer" in components:
            from transformers import CLIPTokenizer

            bb.tokenizer = CLIPTokenizer.from_pretrained(where, subfolder="tokenizer", local_files_only=True)
        if "scheduler" in components:
            from diffusers import DDPMScheduler

            bb.scheduler = DDPMScheduler.from_pretrained(where, subfolder="scheduler", local_files_only=True)
    except (OSError, ValueError) as e:
        raise WeightsNotFoundError(f"cannot load the SD backbone from {folder}: {str(e).splitlines()[0]}") from e
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
