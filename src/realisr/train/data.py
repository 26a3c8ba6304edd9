"""Training data: HQ images from folders or txt lists (with repeat weights), random crops and flips, optional
captions, and LQ images made on the fly with the Real-ESRGAN degradation.

The dataset returns HQ crops only; the degradation runs batched on the training device
(:class:`LQMaker`), like the official code's ``resize_bak=True`` path: LQ at ``crop/scale``, resized back to
``crop`` with a random choice of area/bilinear/bicubic, clamped and rounded to 8 bit.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from realisr.errors import InputImageError, RealisrError

__all__ = ["IMAGE_EXTENSIONS", "DataError", "list_sources", "load_captions", "HQCropDataset", "PairedSRDataset",
           "paired_files", "LQMaker", "to_model_range"]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


class DataError(RealisrError, ValueError):
    """Training data is missing or malformed."""


def _source_entries(sources: Sequence[Union[str, dict]]) -> list[tuple[Path, int]]:
    out = []
    for s in sources:
        if isinstance(s, dict):
            if "path" not in s:
                raise DataError(f"data.hq entry {s!r} needs a 'path' key")
            repeat = s.get("repeat", 1)
            if not isinstance(repeat, int) or repeat < 0:
                raise DataError(f"data.hq entry {s['path']}: repeat must be an integer >= 0, got {repeat!r}")
            out.append((Path(str(s["path"])).expanduser(), repeat))
        else:
            out.append((Path(str(s)).expanduser(), 1))
    return out


def _list_one(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if path.is_file() and path.suffix.lower() == ".txt":
        files = []
        for line in path.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            p = Path(line).expanduser()
            files.append(p if p.is_absolute() else path.parent / p)
        return files
    if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
        return [path]
    raise DataError(f"data source {path} is not a folder, a .txt list or an image: fix data.hq")


def list_sources(sources: Sequence[Union[str, dict]]) -> list[Path]:
    """Expand HQ sources into the list of training images (each image repeated ``repeat`` times).

    Args:
        sources: folders (searched recursively), ``.txt`` lists (one path per line, relative to the list) or
            images; each a string or ``{"path": ..., "repeat": N}``.

    Returns:
        Image paths, repeats included, in a deterministic order.

    Raises:
        DataError: a source does not exist or no image was found.
    """
    if not sources:
        raise DataError("no training images: set data.hq to folders or txt lists of HQ images")
    files: list[Path] = []
    for path, repeat in _source_entries(sources):
        found = _list_one(path)
        if not found:
            raise DataError(f"data source {path} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        files.extend(found * repeat)
    if not files:
        raise DataError("no training images after applying the repeat factors in data.hq")
    return files


def load_captions(path: Optional[Union[str, os.PathLike]]) -> dict[str, str]:
    """Read a captions file: JSON ``{name: caption}`` or lines ``name<TAB>caption``.

    Names are matched against an image's path as given, its file name and its stem, in that order.

    Raises:
        DataError: the file is missing or malformed.
    """
    if path is None:
        return {}
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"captions file {p} not found: fix data.captions or set it to null")
    text = p.read_text(encoding="utf-8")
    if p.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"captions file {p}: invalid JSON ({e.msg} at line {e.lineno})") from e
        if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
            raise DataError(f"captions file {p}: expected a JSON object of name -> caption strings")
        return dict(data)
    out = {}
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        name, sep, caption = line.partition("\t")
        if not sep:
            raise DataError(f"captions file {p} line {i}: expected 'name<TAB>caption'")
        out[name.strip()] = caption.strip()
    return out


class HQCropDataset(torch.utils.data.Dataset):
    """Random HQ crops with flips and captions.

    Items are dicts ``{"hq": float tensor [3, crop, crop] in [0, 1], "caption": str, "path": str}``. Images
    whose short side is below ``crop_size`` are upscaled (bicubic) to it first, with a warning: the official
    RandomCrop would fail on them.

    Args:
        files: image paths (see :func:`list_sources`).
        crop_size: crop side.
        hflip: random horizontal flip with probability 0.5.
        captions: name -> caption (see :func:`load_captions`).
        random: ``False`` gives centre crops without flips (validation).
        seed: with a seed, item ``i`` of epoch ``e`` (:meth:`set_epoch`) draws its crop and flip from a generator
            seeded by ``(seed, e, i)``: the same in any process or data worker, so a resumed run (which skips the
            batches it already used) sees exactly the crops of an uninterrupted one. Without one, the global RNG.
    """

    def __init__(self, files: Sequence[Path], crop_size: int = 512, hflip: bool = True,
                 captions: Optional[dict[str, str]] = None, random: bool = True, seed: Optional[int] = None):
        self.files = [Path(f) for f in files]
        self.crop_size = int(crop_size)
        self.hflip = hflip
        self.captions = captions or {}
        self.random = random
        self.seed = seed
        self.epoch = 0
        self._warned_small = False

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose crops and flips :meth:`__getitem__` draws (with ``seed``)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.files)

    def caption_for(self, path: Path) -> str:
        for key in (str(path), path.name, path.stem):
            if key in self.captions:
                return self.captions[key]
        return ""

    def _load(self, path: Path) -> torch.Tensor:
        import numpy as np
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
                arr = np.asarray(im, dtype=np.uint8).copy()
        except (OSError, UnidentifiedImageError) as e:
            raise InputImageError(f"cannot read training image {path}: {e}") from e
        return torch.from_numpy(arr).permute(2, 0, 1).float().div_(255.0)

    def __getitem__(self, index: int) -> dict:
        path = self.files[index]
        img = self._load(path)
        c = self.crop_size
        h, w = img.shape[-2:]
        if min(h, w) < c:
            if not self._warned_small:
                logger.warning("training image %s is smaller than the %d crop: upscaling it (bicubic)", path, c)
                self._warned_small = True
            s = c / min(h, w)
            nh, nw = max(c, round(h * s)), max(c, round(w * s))
            img = F.interpolate(img[None], size=(nh, nw), mode="bicubic", align_corners=False)[0].clamp_(0, 1)
            h, w = nh, nw
        g = None
        if self.seed is not None:
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch * 7919 + index) % (2**62))
        if self.random:
            top = int(torch.randint(0, h - c + 1, (), generator=g).item())
            left = int(torch.randint(0, w - c + 1, (), generator=g).item())
        else:
            top, left = (h - c) // 2, (w - c) // 2
        img = img[:, top:top + c, left:left + c]
        if self.random and self.hflip and torch.rand((), generator=g).item() < 0.5:
            img = img.flip(-1)
        return {"hq": img.contiguous(), "caption": self.caption_for(path), "path": str(path)}


def paired_files(roots: Sequence[Union[str, os.PathLike]], hq: str = "gt", lq: str = "sr_bicubic",
                 tags: str = "tag") -> list[tuple[Path, Path, Optional[Path]]]:
    """Training pairs in the layout of SeeSR's ``make_paired_data.py``: ``<root>/<hq>/NAME.png`` with
    ``<root>/<lq>/NAME.png`` and, when the folder exists, ``<root>/<tags>/NAME.txt``.

    Files are matched by name (the official dataset zips three ``glob`` results and relies on the file system
    returning them in the same order); the result is sorted.

    Raises:
        DataError: a folder is missing, holds no images, or a name has no partner (the first one is named).
    """
    out: list[tuple[Path, Path, Optional[Path]]] = []
    for root in roots:
        root = Path(root).expanduser()
        hq_dir, lq_dir, tag_dir = root / hq, root / lq, root / tags
        for d in (hq_dir, lq_dir):
            if not d.is_dir():
                raise DataError(f"paired data root {root} has no {d.name}/ folder (expected {hq}/, {lq}/, [{tags}/])")
        hqs = {p.stem: p for p in sorted(hq_dir.iterdir()) if p.suffix.lower() in IMAGE_EXTENSIONS}
        lqs = {p.stem: p for p in sorted(lq_dir.iterdir()) if p.suffix.lower() in IMAGE_EXTENSIONS}
        if not hqs:
            raise DataError(f"{hq_dir} holds no images")
        for a, b, name_a, name_b in ((hqs, lqs, hq, lq), (lqs, hqs, lq, hq)):
            lonely = sorted(set(a) - set(b))
            if lonely:
                raise DataError(f"{root}: {name_a}/{lonely[0]} has no partner in {name_b}/ "
                                f"({len(lonely)} unpaired); pairs are matched by file name")
        for stem in sorted(hqs):
            tag = tag_dir / f"{stem}.txt"
            if tag_dir.is_dir() and not tag.is_file():
                raise DataError(f"{root}: {hq}/{hqs[stem].name} has no {tags}/{stem}.txt")
            out.append((hqs[stem], lqs[stem], tag if tag_dir.is_dir() else None))
    if not out:
        raise DataError("no paired training images: set seesr.paired_roots to folders with gt/ and sr_bicubic/")
    return out


class PairedSRDataset(HQCropDataset):
    """Pre-made HQ / LQ pairs (see :func:`paired_files`), used whole (the official pairs are 512 crops).

    Items are dicts ``{"hq", "lq": float tensors [3, H, W] in [0, 1], "caption": the tag file's text or "",
    "path": str}``.
    """

    def __init__(self, pairs: Sequence[tuple[Path, Path, Optional[Path]]]):
        super().__init__([p[0] for p in pairs], crop_size=1, hflip=False, random=False)
        self.pairs = list(pairs)

    def __getitem__(self, index: int) -> dict:
        hq_path, lq_path, tag_path = self.pairs[index]
        hq, lq = self._load(hq_path), self._load(lq_path)
        if hq.shape != lq.shape:
            raise DataError(f"{hq_path.name}: HQ {tuple(hq.shape[1:])} and LQ {tuple(lq.shape[1:])} differ in size "
                            "(the LQ must be bicubic-upsampled to the HQ size)")
        caption = tag_path.read_text(encoding="utf-8").strip() if tag_path is not None else ""
        return {"hq": hq, "lq": lq, "caption": caption, "path": str(hq_path)}


def to_model_range(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> [-1, 1]."""
    return x * 2.0 - 1.0


_RESIZE_MODES = ("area", "bilinear", "bicubic")


class LQMaker:
    """Degrade HQ batches into LQ inputs resized back to the HQ size (the official ``resize_bak`` path).

    Args:
        preset: degradation preset name (``pisa-sr``, ``osediff``, ...) of :mod:`realisr.train.degradations`,
            or ``bicubic`` (plain antialiased bicubic downscaling, no degradation).
        scale: the degradation's scale factor (4).
        device: where the degradation runs.
        resize_back: resize the LQ back to the HQ size (official); ``False`` returns the small LQ.
    """

    def __init__(self, preset: str = "pisa-sr", scale: int = 4, device: Union[str, torch.device] = "cpu",
                 resize_back: bool = True):
        self.preset = preset
        self.scale = scale
        self.device = torch.device(device)
        self.degrader = None
        if preset != "bicubic":  # "bicubic": plain downscaling, for debugging and tests
            from realisr.train.degradations import Degrader, get_preset

            cfg = get_preset(preset)
            if getattr(cfg, "scale", scale) != scale:
                import dataclasses

                cfg = dataclasses.replace(cfg, scale=scale)
            self.degrader = Degrader(cfg, device=self.device)
        self.resize_back = resize_back

    @torch.no_grad()
    def __call__(self, hq: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """HQ [N,3,H,W] in [0,1] -> LQ in [0,1], 8-bit quantised, [N,3,H,W] (or [N,3,H/s,W/s])."""
        hq = hq.to(self.device, torch.float32)
        if self.degrader is None:
            h, w = hq.shape[-2:]
            lq = F.interpolate(hq, size=(h // self.scale, w // self.scale), mode="bicubic", align_corners=False,
                               antialias=True)
        else:
            lq, _ = self.degrader(hq, generator=generator)
        if self.resize_back:
            # one random mode per image, as the official per-image degradation does
            gdev = generator.device if generator is not None else torch.device("cpu")
            picks = torch.randint(0, len(_RESIZE_MODES), (lq.shape[0],), generator=generator, device=gdev).tolist()
            out = torch.empty(lq.shape[0], lq.shape[1], *hq.shape[-2:], device=lq.device, dtype=lq.dtype)
            for m, mode in enumerate(_RESIZE_MODES):
                idx = [i for i, p in enumerate(picks) if p == m]
                if idx:
                    kwargs = {} if mode == "area" else {"align_corners": False}
                    out[idx] = F.interpolate(lq[idx], size=hq.shape[-2:], mode=mode, **kwargs)
            lq = out
        return (lq.clamp(0, 1) * 255.0).round() / 255.0
