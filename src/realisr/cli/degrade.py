"""``realisr degrade``: make LQ training/test images from HQ images with the Real-ESRGAN degradation.

Image ``i`` of the sorted input list is degraded with a CPU generator seeded ``seed + i``, so one image's
result does not depend on the others and a run is reproducible on any device. Outputs are PNG (lossless, the
LQ is already 8-bit). ``--grid`` writes a contact sheet: per image, the HQ and several degradations of it.
"""

from __future__ import annotations

import logging
from pathlib import Path

logger = logging.getLogger(__name__)

PRESET_NAMES = "pisa-sr, osediff, ccsr, seesr"
_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}


def add_arguments(p) -> None:
    p.add_argument("-i", "--input", required=True, metavar="HQ",
                   help="folder of HQ images (sorted; sub-folders are not visited) or one image file")
    p.add_argument("-o", "--output", required=True, metavar="LQ_DIR", help="output folder for the LQ PNGs")
    p.add_argument("--preset", default="pisa-sr", help=f"degradation preset: {PRESET_NAMES} (default pisa-sr)")
    p.add_argument("--seed", type=int, default=0, help="seed; image i (sorted) uses seed + i (default 0)")
    p.add_argument("--resize-back", action="store_true",
                   help="resize the LQ back to the HQ size with a random mode, as the diffusion training data")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing outputs (default: skip them, as `realisr upscale`: a rerun resumes)")
    p.add_argument("--grid", default=None, metavar="PNG", help="also write a grid of samples to look at")
    p.add_argument("--grid-images", type=int, default=8, help="images (rows) in the grid (default 8)")
    p.add_argument("--grid-samples", type=int, default=4, help="degradations per image in the grid (default 4)")
    p.add_argument("--grid-cell", type=int, default=192, help="grid cell size in pixels (default 192)")


def _inputs(spec: str) -> list[Path]:
    from realisr.errors import InputImageError

    path = Path(spec)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise InputImageError(f"input {spec!r} is neither an image file nor a folder; check the path")
    files = sorted(f for f in path.iterdir() if f.is_file() and f.suffix.lower() in _EXTS)
    if not files:
        raise InputImageError(f"no images ({', '.join(sorted(_EXTS))}) in {spec!r}; point -i at a folder of images")
    return files


def _read_rgb(path: Path):
    """``[1, 3, H, W]`` float32 in [0, 1] (alpha dropped, grey expanded)."""
    import numpy as np
    import torch

    from realisr.io.image_io import read_image

    px = np.asarray(read_image(path).pixels, dtype=np.float32)
    if px.ndim == 2:
        px = px[..., None]
    if px.shape[2] == 1:
        px = np.repeat(px, 3, axis=2)
    return torch.from_numpy(np.ascontiguousarray(px[..., :3])).permute(2, 0, 1)[None]


def _to_uint8(x):
    import numpy as np

    return (x.clamp(0, 1) * 255).round().to("cpu").byte().permute(1, 2, 0).numpy().astype(np.uint8)


def _write_png(path: Path, arr, overwrite: bool) -> None:
    from realisr.io import ImageData
    from realisr.io.image_io import write_image

    write_image(path, ImageData(pixels=arr.astype("float32") / 255.0), overwrite=overwrite, fmt="png")


def _cell(img, size: int, nearest: bool):
    """Centre-crop to a square and resize to ``size`` (nearest for LQ so its pixels stay visible)."""
    import torch.nn.functional as F

    _, _, h, w = img.shape
    s = min(h, w)
    t, l = (h - s) // 2, (w - s) // 2
    sq = img[:, :, t:t + s, l:l + s]
    if nearest:
        return F.interpolate(sq, size=(size, size), mode="nearest")
    return F.interpolate(sq, size=(size, size), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)


def run(args) -> int:
    import torch

    from realisr.errors import InputImageError
    from realisr.progress import TqdmProgress, report
    from realisr.train.degradations import Degrader, get_preset

    preset = get_preset(args.preset)
    files = _inputs(args.input)
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    deg = Degrader(preset, device=args.device)
    quiet = getattr(args, "quiet", False)
    callback = None if quiet else TqdmProgress()
    rows = []
    written = skipped = 0
    report(callback, "files", 0, len(files))
    for i, src in enumerate(files):
        dst = out_dir / (src.stem + ".png")
        exists = dst.exists() and not args.overwrite
        if exists and not (args.grid and len(rows) < args.grid_images):
            skipped += 1  # image i always gets seed + i: the existing file is what this run would write
            logger.info("skip %s: %s exists", src, dst)
            report(callback, "files", i + 1, len(files), src.name)
            continue
        hq = _read_rgb(src)
        try:
            lq, _ = deg(hq, generator=torch.Generator().manual_seed(args.seed + i), resize_back=args.resize_back)
        except ValueError as e:  # e.g. an image too small for the scale
            raise InputImageError(f"{src}: {e}") from None
        if exists:
            skipped += 1
        else:
            _write_png(dst, _to_uint8(lq[0]), args.overwrite)
            written += 1
            logger.info("%s -> %s (%dx%d)", src, dst, lq.shape[-1], lq.shape[-2])
        if args.grid and len(rows) < args.grid_images:
            cells = [_cell(hq, args.grid_cell, nearest=False), _cell(lq.cpu(), args.grid_cell, nearest=True)]
            for k in range(1, args.grid_samples):
                g = torch.Generator().manual_seed(args.seed + i + 1_000_003 * k)
                extra, _ = deg(hq, generator=g, resize_back=args.resize_back)
                cells.append(_cell(extra.cpu(), args.grid_cell, nearest=True))
            rows.append(torch.cat(cells, dim=-1))
        report(callback, "files", i + 1, len(files), src.name)
    if args.grid and rows:
        import torch.nn.functional as F

        width = max(r.shape[-1] for r in rows)
        grid = torch.cat([F.pad(r, (0, width - r.shape[-1])) for r in rows], dim=-2)
        _write_png(Path(args.grid), _to_uint8(grid[0]), overwrite=True)
        logger.info("grid of %d images x %d samples -> %s", len(rows), max(args.grid_samples, 1), args.grid)
    if callback is not None:
        callback.close()
    if not quiet:
        hint = " (outputs exist; --overwrite redoes them)" if skipped else ""
        print(f"realisr: {len(files)} image(s) with preset {args.preset}: {written} written, {skipped} skipped{hint} "
              f"-> {out_dir}")
    return 0
