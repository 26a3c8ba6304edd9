"""Losses of feed-forward SR training (EA-Adam, the Real-ESRGAN fidelity delta): L1, BasicSR's VGG19
perceptual loss and the vanilla GAN loss.

The perceptual loss needs torchvision's ImageNet VGG19 weights, which users bring (``vgg19-dcbb9e9d.pth``,
declared in :data:`realisr.weights.catalog.TRAINING_WEIGHTS`); tests build a tiny random VGG with
:class:`PerceptualLoss` directly.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from realisr.errors import CheckpointError, WeightsNotFoundError

__all__ = ["PerceptualLoss", "find_vgg19_weights", "load_perceptual_loss", "gan_loss", "VGG19_WEIGHTS_NAME"]

logger = logging.getLogger(__name__)

VGG19_WEIGHTS_NAME = "vgg19-dcbb9e9d.pth"  # = realisr.weights.catalog.TRAINING_WEIGHTS["vgg19"].name


class PerceptualLoss(nn.Module):
    """BasicSR ``PerceptualLoss`` (style weight 0): ``sum_l w_l * L1(phi_l(x), phi_l(gt))``, features before
    ReLU, inputs in [0, 1] ImageNet-normalised by the extractor.

    Args:
        vgg: a :class:`realisr.arch.vgg_arch.VGG19Features` extracting the layers of ``layer_weights``.
        layer_weights: layer name -> weight (SRResNet: ``{conv5_4: 1}``; RRDB: conv1_2/conv2_2 0.1,
            conv3_4/conv4_4/conv5_4 1).
    """

    def __init__(self, vgg: nn.Module, layer_weights: dict[str, float]):
        super().__init__()
        self.vgg = vgg.eval().requires_grad_(False)
        self.layer_weights = dict(layer_weights)

    def train(self, mode: bool = True):  # the VGG never trains
        return super().train(False)

    def forward(self, x: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
        fx = self.vgg(x)
        with torch.no_grad():
            fg = self.vgg(gt.detach())
        return sum(w * F.l1_loss(fx[k], fg[k]) for k, w in self.layer_weights.items())


def find_vgg19_weights(path: Optional[str | os.PathLike] = None) -> Path:
    """Locate torchvision's ImageNet VGG19 weights without any download.

    Args:
        path: an explicit file; otherwise the catalog entry ``TRAINING_WEIGHTS["vgg19"]`` is looked for in
            ``$REALISR_WEIGHTS`` and in torch's hub cache (``$TORCH_HOME/hub/checkpoints/``).

    Raises:
        WeightsNotFoundError: none of the places holds the file.
    """
    from realisr.metrics.registry import find_weight_file, torch_hub_dir
    from realisr.weights.cache import checkpoints_dir
    from realisr.weights.catalog import TRAINING_WEIGHTS

    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise WeightsNotFoundError(f"VGG19 weights not found at {p}: fix loss.vgg_weights")
        return p
    wf = TRAINING_WEIGHTS["vgg19"]
    found = find_weight_file(wf)
    if found is None:
        raise WeightsNotFoundError(
            f"the perceptual loss needs torchvision's ImageNet weights '{wf.name}' ({wf.url}): copy it to "
            f"{checkpoints_dir()} or {torch_hub_dir() / wf.hub_subdir}, or set loss.vgg_weights")
    return found


def load_perceptual_loss(layer_weights: dict[str, float], path: Optional[str | os.PathLike] = None
                         ) -> PerceptualLoss:
    """The perceptual loss on real VGG19 weights (torchvision ``vgg19-dcbb9e9d.pth``, read weights-only).

    Raises:
        WeightsNotFoundError: the file is missing.
        CheckpointError: the file is not a torchvision VGG19 state dict.
    """
    from realisr.arch.vgg_arch import VGG19Features

    p = find_vgg19_weights(path)
    vgg = VGG19Features(list(layer_weights))
    state = torch.load(str(p), map_location="cpu", weights_only=True)
    want = {f"features.{k}": v for k, v in vgg.features.state_dict().items()}
    got = {k: v for k, v in state.items() if k in want} if isinstance(state, dict) else {}
    bad = [k for k in want if k not in got or got[k].shape != want[k].shape]
    if bad:
        raise CheckpointError(f"{p} is not torchvision's VGG19 (e.g. {bad[0]} missing or of another shape): use "
                              f"{VGG19_WEIGHTS_NAME}")
    vgg.features.load_state_dict({k[len("features."):]: v for k, v in got.items()})
    logger.info("VGG19 perceptual loss loaded from %s (%s)", p, ", ".join(layer_weights))
    return PerceptualLoss(vgg, layer_weights)


def gan_loss(logits: torch.Tensor, real: bool) -> torch.Tensor:
    """Vanilla GAN loss: ``BCEWithLogits(logits, 1 if real else 0)`` (BasicSR ``GANLoss('vanilla')``)."""
    target = torch.ones_like(logits) if real else torch.zeros_like(logits)
    return F.binary_cross_entropy_with_logits(logits, target)
