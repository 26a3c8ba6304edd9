"""Shared helpers of the training tests: a folder of real-photo HQ crops and stand-in LPIPS VGG16 weights."""

from __future__ import annotations

from pathlib import Path


def photo_dir(root: Path, size: int = 64, names=("astronaut",)) -> Path:
    """``root/hq`` with scikit-image photos resized to ``size`` x ``size``."""
    import skimage.data
    from PIL import Image

    folder = Path(root) / "hq"
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        Image.fromarray(getattr(skimage.data, n)()).resize((size, size), Image.BICUBIC).save(folder / f"{n}.png")
    return folder


def stand_in_vgg(root: Path) -> Path:
    """A random torchvision VGG16 feature state dict saved under the official file name (LPIPS plumbing)."""
    import torch
    from torchvision.models.vgg import cfgs, make_layers

    torch.manual_seed(0)
    path = Path(root) / "vgg16-397923af.pth"
    torch.save({f"features.{k}": v for k, v in make_layers(cfgs["D"]).state_dict().items()}, path)
    return path
