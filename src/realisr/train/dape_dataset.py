"""Training pairs for DAPE (SeeSR stage 1), as the official ``DAPEDataset``: whole images (no crop) resized to
``image_size`` x ``image_size`` (official 512) with torchvision 0.15's tensor ``Resize`` (bilinear, no
antialiasing); the RAM input (384, ImageNet-normalised) is made from them on the training device.

Two sources:

* :class:`DAPEPairedDataset`: the official pre-made layout, roots with ``gt/`` and ``sr_bicubic/`` (the
  degraded LR upscaled back with bicubic). The official code pairs two unsorted ``glob`` lists and relies on
  the file system returning them in the same order; here the files are paired by name and a missing partner
  is an error.
* :class:`DAPEImageDataset`: HQ images only; the LQ is made on the fly (:class:`realisr.train.data.LQMaker`,
  then bicubic back to ``image_size``, 8-bit rounded like the saved ``sr_bicubic`` PNGs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from realisr.errors import InputImageError
from realisr.train.data import IMAGE_EXTENSIONS, DataError

__all__ = ["DAPEPairedDataset", "DAPEImageDataset", "load_resized", "paired_files"]


def load_resized(path: Path, size: int) -> torch.Tensor:
    """``ToTensor`` then a tensor ``Resize((size, size))`` without antialiasing: ``[3, size, size]`` in [0, 1]."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            arr = np.array(im.convert("RGB"), dtype=np.uint8)
    except (OSError, UnidentifiedImageError) as e:
        raise InputImageError(f"cannot read training image {path}: {e}") from e
    x = torch.from_numpy(arr).permute(2, 0, 1).float().div(255)[None]
    if tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
    return x[0]


def paired_files(roots: Sequence[str]) -> list[tuple[Path, Path]]:
    """``(gt, sr_bicubic)`` pairs of the official layout, sorted, paired by file name.

    Raises:
        DataError: a root without ``gt/`` or ``sr_bicubic/``, no images, or an image without its partner.
    """
    pairs = []
    for root in roots:
        gt_dir, lr_dir = Path(root).expanduser() / "gt", Path(root).expanduser() / "sr_bicubic"
        if not gt_dir.is_dir() or not lr_dir.is_dir():
            raise DataError(f"dape.paired root {root} must hold gt/ and sr_bicubic/ (the official DAPE layout)")
        gts = sorted(p for p in gt_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        lrs = {p.name: p for p in lr_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS}
        if not gts:
            raise DataError(f"{gt_dir} holds no images")
        lonely = [p.name for p in gts if p.name not in lrs]
        if lonely or len(lrs) != len(gts):
            extra = sorted(set(lrs) - {p.name for p in gts})
            raise DataError(f"{root}: gt/ and sr_bicubic/ do not pair by name (e.g. "
                            f"{(lonely or extra)[0]}): give every image the same name in both")
        pairs += [(p, lrs[p.name]) for p in gts]
    return pairs


class DAPEPairedDataset(torch.utils.data.Dataset):
    """Official pre-made pairs: items ``{"hq": [3,S,S], "lq": [3,S,S], "path": str}`` in [0, 1]."""

    def __init__(self, roots: Sequence[str], image_size: int = 512):
        self.pairs = paired_files(roots)
        self.image_size = int(image_size)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict:
        gt, lr = self.pairs[i]
        return {"hq": load_resized(gt, self.image_size), "lq": load_resized(lr, self.image_size), "path": str(gt)}


class DAPEImageDataset(torch.utils.data.Dataset):
    """HQ images only (the LQ is made on the device): items ``{"hq": [3,S,S], "path": str}``."""

    def __init__(self, files: Sequence[Path], image_size: int = 512):
        self.files = [Path(f) for f in files]
        self.image_size = int(image_size)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict:
        return {"hq": load_resized(self.files[i], self.image_size), "path": str(self.files[i])}
