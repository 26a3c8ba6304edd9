"""VGG19 feature extractor for perceptual losses (BasicSR ``VGGFeatureExtractor``), layer names as BasicSR.

The layers keep torchvision's ``vgg19.features`` indices, so torchvision's ImageNet weights
(``vgg19-dcbb9e9d.pth``, keys ``features.N.*``) load into ``features``. ``width`` scales every stage (1.0 =
VGG19; tests build tiny random ones).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["VGG19Features", "VGG19_LAYER_NAMES"]

#: BasicSR's names of vgg19.features, in order (conv/relu/pool).
VGG19_LAYER_NAMES = (
    "conv1_1", "relu1_1", "conv1_2", "relu1_2", "pool1",
    "conv2_1", "relu2_1", "conv2_2", "relu2_2", "pool2",
    "conv3_1", "relu3_1", "conv3_2", "relu3_2", "conv3_3", "relu3_3", "conv3_4", "relu3_4", "pool3",
    "conv4_1", "relu4_1", "conv4_2", "relu4_2", "conv4_3", "relu4_3", "conv4_4", "relu4_4", "pool4",
    "conv5_1", "relu5_1", "conv5_2", "relu5_2", "conv5_3", "relu5_3", "conv5_4", "relu5_4", "pool5",
)
_STAGE_CHANNELS = (64, 128, 256, 512, 512)


class VGG19Features(nn.Module):
    """Features of named VGG19 layers (e.g. ``conv5_4``: before its ReLU), on inputs in [0, 1].

    Args:
        layers: names from :data:`VGG19_LAYER_NAMES` whose outputs are returned.
        use_input_norm: normalise with the ImageNet mean/std first (BasicSR default).
        range_norm: map inputs from [-1, 1] to [0, 1] first.
        width: channel multiplier (1.0 = VGG19).
    """

    def __init__(self, layers, *, use_input_norm: bool = True, range_norm: bool = False, width: float = 1.0):
        super().__init__()
        unknown = [n for n in layers if n not in VGG19_LAYER_NAMES]
        if unknown:
            raise ValueError(f"unknown VGG19 layer(s) {unknown}: use names like conv5_4")
        self.layers = tuple(layers)
        self.use_input_norm = use_input_norm
        self.range_norm = range_norm
        last = max(VGG19_LAYER_NAMES.index(n) for n in self.layers)
        mods, cin = [], 3
        for name in VGG19_LAYER_NAMES[: last + 1]:
            if name.startswith("conv"):
                cout = max(1, round(_STAGE_CHANNELS[int(name[4]) - 1] * width))
                mods.append(nn.Conv2d(cin, cout, 3, 1, 1))
                cin = cout
            elif name.startswith("relu"):
                mods.append(nn.ReLU(inplace=False))
            else:
                mods.append(nn.MaxPool2d(2, 2))
        self.features = nn.Sequential(*mods)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.range_norm:
            x = (x + 1) / 2
        if self.use_input_norm:
            x = (x - self.mean) / self.std
        out = {}
        for name, layer in zip(VGG19_LAYER_NAMES, self.features):
            x = layer(x)
            if name in self.layers:
                out[name] = x
        return out
