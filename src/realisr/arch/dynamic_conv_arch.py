"""EA-Adam's fusion network: a dynamic convolution over K expert kernels with per-sample softmax weights.

``DynamicConv2d`` holds the K experts' kernels and biases stacked along a new first dimension (frozen) and a
``fusion`` module that maps the layer's input feature map to weights ``a`` on the simplex; the layer applies
``sum_k a_k W_k`` and ``sum_k a_k b_k`` (one grouped convolution over the batch). Parameter names follow the
official ``Dynamic_conv2d`` / ``Fusion`` (``weight``, ``bias``, ``fusion.ConvNet.*``, ``fusion.MappingNet.*``).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FusionModule", "DynamicConv2d"]


class FusionModule(nn.Module):
    """``Conv5x5(C->nf), LReLU, Conv5x5(nf->nf), LReLU, Conv5x5(nf->num_params), LReLU, global average pool,
    Linear(num_params->hidden), LReLU, Linear(hidden->K), softmax``.

    Args:
        in_ch: channels of the layer input.
        num_experts: K.
        num_feat: conv features (official 64).
        num_params: pooled descriptor size (official 100).
        hidden: hidden units of the mapping (official 15).
        use_bias: bias of the 2nd and 3rd convs (official True).
    """

    def __init__(self, in_ch: int, num_experts: int, *, num_feat: int = 64, num_params: int = 100,
                 hidden: int = 15, use_bias: bool = True):
        super().__init__()
        self.ConvNet = nn.Sequential(
            nn.Conv2d(in_ch, num_feat, 5, 1, 2), nn.LeakyReLU(0.2, True),
            nn.Conv2d(num_feat, num_feat, 5, 1, 2, bias=use_bias), nn.LeakyReLU(0.2, True),
            nn.Conv2d(num_feat, num_params, 5, 1, 2, bias=use_bias), nn.LeakyReLU(0.2, True))
        self.MappingNet = nn.Sequential(nn.Linear(num_params, hidden), nn.LeakyReLU(0.2, True),
                                        nn.Linear(hidden, num_experts), nn.Softmax(dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, C, H, W]`` -> weights ``[N, K]`` (rows sum to 1)."""
        return self.MappingNet(self.ConvNet(x).mean(dim=(2, 3)))


class DynamicConv2d(nn.Module):
    """A convolution whose kernel is a per-sample convex combination of K expert kernels.

    Args:
        weight: ``[K, out, in/groups, kh, kw]`` expert kernels.
        bias: ``[K, out]`` expert biases or ``None``.
        stride, padding, dilation, groups: as ``nn.Conv2d``.
        fusion: the module giving the weights (a :class:`FusionModule` on the layer input).
        train_experts: whether the expert kernels are trainable (official: frozen).

    After a forward pass, ``last_weights`` holds the ``[N, K]`` weights used (detached).
    """

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], *, stride=1, padding=0, dilation=1,
                 groups: int = 1, fusion: nn.Module, train_experts: bool = False):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=train_experts)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=train_experts)
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self.fusion = fusion
        self.last_weights: Optional[torch.Tensor] = None

    @property
    def num_experts(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.fusion(x)  # [N, K]
        self.last_weights = a.detach()
        n, c, h, w = x.shape
        k = self.num_experts
        kern = (a @ self.weight.reshape(k, -1)).reshape(n * self.weight.shape[1], *self.weight.shape[2:])
        b = None if self.bias is None else (a @ self.bias).reshape(-1)
        y = F.conv2d(x.reshape(1, n * c, h, w), kern, b, stride=self.stride, padding=self.padding,
                     dilation=self.dilation, groups=self.groups * n)
        return y.reshape(n, -1, y.shape[-2], y.shape[-1])
