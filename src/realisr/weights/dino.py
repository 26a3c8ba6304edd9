"""The frozen ViTs of CCSR-v2's stage-2 discriminator: DINO ViT-S/16 (features) and DINOv2 ViT-S/14 (the LR
condition), built as timm ``VisionTransformer`` modules.

The official files (``preset/models/dino/dino_deitsmall16_pretrain.pth`` and ``dinov2_vits14_pretrain.pth`` of
CCSR-v2, i.e. facebookresearch/dino and facebookresearch/dinov2 releases) are plain state dicts whose key layout
is timm's (``cls_token``, ``pos_embed``, ``patch_embed.proj.*``, ``blocks.N.{norm1,attn.qkv,attn.proj,norm2,
mlp.fc1,mlp.fc2}``, DINOv2 also ``blocks.N.ls1.gamma`` / ``ls2.gamma``, ``norm.*``; DINOv2's unused
``mask_token`` is dropped). They are read with ``torch.load(weights_only=True)`` and loaded strictly: a missing
or misshapen tensor is a one-line :class:`~realisr.errors.CheckpointError`.

Where they are looked for: the recipe's ``ccsr.dino_weights`` / ``ccsr.dinov2_weights``, else
``<checkpoints>/dino/<official file name>`` (``$REALISR_WEIGHTS/dino/...``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from ..errors import CheckpointError, WeightsNotFoundError

logger = logging.getLogger(__name__)

__all__ = ["DINO_FILE", "DINOV2_FILE", "dino_vits16", "dinov2_vits14", "tiny_vit", "find_dino_file",
           "load_vit_state_dict"]

DINO_FILE = "dino_deitsmall16_pretrain.pth"
DINOV2_FILE = "dinov2_vits14_pretrain.pth"
_URLS = {DINO_FILE: "https://dl.fbaipublicfiles.com/dino/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth",
         DINOV2_FILE: "https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_pretrain.pth"}
_DROP = ("mask_token", "head.weight", "head.bias")


def dino_vits16():
    """DINO ViT-S/16 (224 px, 384 wide, 12 blocks, 6 heads), random weights."""
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6, num_classes=0)


def dinov2_vits14():
    """DINOv2 ViT-S/14 (518 px, LayerScale), random weights."""
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=518, patch_size=14, embed_dim=384, depth=12, num_heads=6, num_classes=0,
                             init_values=1e-5)


def tiny_vit(img_size: int = 32, patch_size: int = 8, embed_dim: int = 32, depth: int = 4, num_heads: int = 2,
             seed: int = 0):
    """A tiny random ViT of the same layout (CPU tests and plumbing checks)."""
    import torch
    from timm.models.vision_transformer import VisionTransformer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return VisionTransformer(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                                 num_heads=num_heads, num_classes=0)


def find_dino_file(name: str, path: Optional[str] = None) -> Path:
    """The official file ``name`` from ``path`` or the checkpoints folder.

    Raises:
        WeightsNotFoundError: naming where to put it and where it comes from.
    """
    from .cache import checkpoints_dir

    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise WeightsNotFoundError(f"{name} not found at {p}: fix the recipe path (ccsr.dino_weights / "
                                       f"ccsr.dinov2_weights); get it from {_URLS[name]}")
        return p
    p = checkpoints_dir() / "dino" / name
    if not p.is_file():
        raise WeightsNotFoundError(f"CCSR stage 2 needs {name}: copy it to {p} (from {_URLS[name]}) or set "
                                   "ccsr.dino_weights / ccsr.dinov2_weights; ccsr.discriminator: tiny runs without")
    return p


def load_vit_state_dict(model, path) -> None:
    """Load an official DINO / DINOv2 state dict into a timm ViT, strictly (``weights_only`` loading).

    Raises:
        CheckpointError: unreadable file, or tensors that do not match the model (one line).
    """
    import torch

    path = Path(path)
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - pickled code or a broken file
        raise CheckpointError(f"{path.name} is not a plain state dict ({type(e).__name__}): use the official "
                              "DINO / DINOv2 .pth files") from e
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path.name} is not a state dict")
    state = {k: v for k, v in state.items() if k not in _DROP}
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    bad = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or bad:
        what = (f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}" if unexpected
                else f"{bad[0]} has shape {tuple(state[bad[0]].shape)}, expected {tuple(own[bad[0]].shape)}")
        raise CheckpointError(f"{path.name} does not fit the ViT ({what}): use {DINO_FILE} / {DINOV2_FILE}")
    model.load_state_dict(state)
    logger.info("loaded %s", path)
