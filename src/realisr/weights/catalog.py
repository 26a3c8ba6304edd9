"""Weight files that realisr's *training* recipes need and users bring (never downloaded by realisr).

One declarative table, in the metric registry's :class:`~realisr.metrics.registry.WeightFile` format, so a
weights listing (``realisr weights``) can show them next to the metrics' files. Each file is looked for in
:func:`realisr.weights.cache.checkpoints_dir` and in the torch hub folder ``<hub_subdir>``.
"""

from __future__ import annotations

from ..metrics.registry import WeightFile

__all__ = ["TRAINING_WEIGHTS"]

_TV = "https://download.pytorch.org/models"

#: name -> file, with what needs it.
TRAINING_WEIGHTS: dict[str, WeightFile] = {
    "vgg19": WeightFile("vgg19-dcbb9e9d.pth", "checkpoints", f"{_TV}/vgg19-dcbb9e9d.pth",
                        "torchvision ImageNet VGG19: perceptual loss of `realisr train ea-adam*` (BSD-3-Clause)"),
    "vgg16-lpips": WeightFile("vgg16-397923af.pth", "checkpoints", f"{_TV}/vgg16-397923af.pth",
                              "torchvision ImageNet VGG16: LPIPS loss of `realisr train pisa-sr` / `osediff`"),
}
