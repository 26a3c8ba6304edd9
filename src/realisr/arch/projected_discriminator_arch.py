"""The projected discriminator of CCSR-v2's stage 2 (StyleGAN-T / ADD design): a frozen ViT feature network and
small trainable heads, conditioned on an embedding of the LR image by projection.

* Features: the patch tokens of a frozen ViT (DINO ViT-S/16 officially) after the patch embedding and after
  the blocks ``hooks`` ([2, 5, 8, 11]), as ``[B, C, L]`` sequences: one head per feature (5 officially).
* Head: ``x + f(x)`` blocks of spectral-normalised Conv1d (kernel 1, then a residual kernel-9 block, circular
  padding), GroupNorm and LeakyReLU(0.2); a spectral-normalised Conv1d to ``cmap_dim`` channels whose output is
  projected on ``mapper(c)`` and scaled by ``1 / sqrt(cmap_dim)`` (a conditional projection logit per token).
* Condition ``c``: ``[B, c_dim]``, the CLS token of a second frozen ViT (DINOv2 ViT-S/14 officially) on the LR
  image; computed outside (it does not depend on the image being judged).

The output is ``[B, sum of token counts]`` logits (hinge loss outside). Input: ImageNet-normalised images at
the backbone's size (224); resizing, cropping and DiffAugment happen in the training code.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

__all__ = ["ProjectedDiscriminator", "DiscriminatorHead"]


def _sn_conv1d(cin: int, cout: int, kernel: int) -> nn.Module:
    conv = nn.Conv1d(cin, cout, kernel, padding=kernel // 2, padding_mode="circular")
    return nn.utils.parametrizations.spectral_norm(conv)


def _groups(channels: int) -> int:
    for g in (32, 16, 8, 4, 2):
        if channels % g == 0:
            return g
    return 1


class _Block(nn.Sequential):
    def __init__(self, channels: int, kernel: int):
        super().__init__(_sn_conv1d(channels, channels, kernel), nn.GroupNorm(_groups(channels), channels),
                         nn.LeakyReLU(0.2))


class _Residual(nn.Module):
    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return (x + self.fn(x)) / math.sqrt(2)


class DiscriminatorHead(nn.Module):
    """One head over a ``[B, channels, L]`` feature sequence, conditioned on ``c`` ``[B, c_dim]`` by projection.

    Args:
        channels: feature channels.
        c_dim: condition size (0: unconditional, one logit channel).
        cmap_dim: projection size (64 officially).
    """

    def __init__(self, channels: int, c_dim: int, cmap_dim: int = 64):
        super().__init__()
        self.c_dim, self.cmap_dim = c_dim, cmap_dim
        self.main = nn.Sequential(_Block(channels, 1), _Residual(_Block(channels, 9)))
        if c_dim > 0:
            self.mapper = nn.Linear(c_dim, cmap_dim)
            self.cls = _sn_conv1d(channels, cmap_dim, 1)
        else:
            self.cls = _sn_conv1d(channels, 1, 1)

    def forward(self, x: torch.Tensor, c: torch.Tensor = None) -> torch.Tensor:
        out = self.cls(self.main(x))
        if self.c_dim > 0:
            cmap = self.mapper(c).unsqueeze(-1)
            out = (out * cmap).sum(dim=1, keepdim=True) / math.sqrt(self.cmap_dim)
        return out


class ProjectedDiscriminator(nn.Module):
    """Heads on the features of a frozen ViT (timm ``VisionTransformer`` layout: ``patch_embed``, ``blocks``).

    Args:
        backbone: the feature ViT; frozen here (``requires_grad=False``, eval mode kept).
        hooks: indices of the blocks whose outputs are judged (with the patch embedding first).
        c_dim: condition size (the conditioning ViT's width; 0 = unconditional).
        cmap_dim: projection size.
    """

    def __init__(self, backbone: nn.Module, hooks: Sequence[int] = (2, 5, 8, 11), c_dim: int = 384,
                 cmap_dim: int = 64):
        super().__init__()
        self.backbone = backbone.requires_grad_(False).eval()
        self.hooks = tuple(int(h) for h in hooks)
        width = int(backbone.embed_dim)
        self.heads = nn.ModuleList([DiscriminatorHead(width, c_dim, cmap_dim) for _ in range(len(self.hooks) + 1)])

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()  # frozen features: no dropout / norm statistics updates
        return self

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Patch-token features ``[B, C, L]``: after the patch embedding and after each hooked block."""
        bb = self.backbone
        tokens = bb.patch_embed(x)
        feats = [tokens]
        h = bb._pos_embed(tokens)
        h = bb.norm_pre(h) if hasattr(bb, "norm_pre") else h
        skip = h.shape[1] - tokens.shape[1]  # class / register tokens in front
        for i, block in enumerate(bb.blocks):
            h = block(h)
            if i in self.hooks:
                feats.append(h[:, skip:])
            if i >= max(self.hooks):
                break
        return [f.transpose(1, 2) for f in feats]

    def forward(self, x: torch.Tensor, c: torch.Tensor = None) -> torch.Tensor:
        """Logits ``[B, L_total]`` for images ``x`` (normalised, backbone size) and conditions ``c``."""
        logits = [head(f, c).flatten(1) for head, f in zip(self.heads, self.features(x))]
        return torch.cat(logits, dim=1)
