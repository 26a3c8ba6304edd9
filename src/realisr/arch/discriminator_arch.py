"""BasicSR's VGG-style discriminator (SRGAN / ESRGAN / EA-Adam), parameter names as BasicSR."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["VGGStyleDiscriminator"]


class VGGStyleDiscriminator(nn.Module):
    """Five stride-2 stages (conv 3x3 + conv 4x4/2, batch norm after all but the first conv), then
    ``linear1`` (to 100) and ``linear2`` (to one logit).

    Args:
        num_in_ch: input channels.
        num_feat: base features (official 64).
        input_size: side of the square inputs, a multiple of 32 (official 128; 256 adds a sixth stage as
            BasicSR does; other sizes, e.g. 32 for tests, keep five stages and a smaller ``linear1``).
    """

    def __init__(self, *, num_in_ch: int = 3, num_feat: int = 64, input_size: int = 128):
        super().__init__()
        if input_size % 32:
            raise ValueError(f"input_size must be a multiple of 32, got {input_size}")
        self.input_size = input_size
        nf = num_feat
        self.conv0_0 = nn.Conv2d(num_in_ch, nf, 3, 1, 1, bias=True)
        self.conv0_1 = nn.Conv2d(nf, nf, 4, 2, 1, bias=False)
        self.bn0_1 = nn.BatchNorm2d(nf, affine=True)
        chans = [(nf, nf * 2), (nf * 2, nf * 4), (nf * 4, nf * 8), (nf * 8, nf * 8)]
        if input_size == 256:
            chans.append((nf * 8, nf * 8))
        for i, (cin, cout) in enumerate(chans, start=1):
            setattr(self, f"conv{i}_0", nn.Conv2d(cin, cout, 3, 1, 1, bias=False))
            setattr(self, f"bn{i}_0", nn.BatchNorm2d(cout, affine=True))
            setattr(self, f"conv{i}_1", nn.Conv2d(cout, cout, 4, 2, 1, bias=False))
            setattr(self, f"bn{i}_1", nn.BatchNorm2d(cout, affine=True))
        self.num_stages = len(chans)
        side = input_size // 2 ** (len(chans) + 1)
        self.linear1 = nn.Linear(nf * 8 * side * side, 100)
        self.linear2 = nn.Linear(100, 1)
        self.lrelu = nn.LeakyReLU(negative_slope=0.2, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
            raise ValueError(f"the discriminator takes {self.input_size}x{self.input_size} inputs, got "
                             f"{x.shape[-2]}x{x.shape[-1]}")
        feat = self.lrelu(self.conv0_0(x))
        feat = self.lrelu(self.bn0_1(self.conv0_1(feat)))
        for i in range(1, self.num_stages + 1):
            feat = self.lrelu(getattr(self, f"bn{i}_0")(getattr(self, f"conv{i}_0")(feat)))
            feat = self.lrelu(getattr(self, f"bn{i}_1")(getattr(self, f"conv{i}_1")(feat)))
        feat = self.lrelu(self.linear1(feat.flatten(1)))
        return self.linear2(feat)
