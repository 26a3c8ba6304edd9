"""``realisr bench-data build --out DIR``: build the offline real-photo benchmark (see realisr.bench.data)."""

from __future__ import annotations

import sys
from pathlib import Path


def add_arguments(p) -> None:
    from .main import common_options

    sub = p.add_subparsers(dest="action", metavar="ACTION")
    b = sub.add_parser("build", help="fetch the photos, make HQ crops and LQ inputs, write manifest.json",
                       parents=[common_options()])
    b.add_argument("-o", "--out", required=True, type=Path, metavar="DIR", help="output folder")
    b.add_argument("--sources", default="skimage,mate-backgrounds,plasma-workspace-wallpapers",
                   help="comma-separated: skimage, mate-backgrounds, plasma-workspace-wallpapers (default: all)")
    b.add_argument("--hq-size", type=int, default=256, help="side of the HQ crops (default 256)")
    b.add_argument("--scale", type=int, default=4, help="LQ downscaling factor (default 4)")
    b.add_argument("--crops-per-image", type=int, default=1)
    b.add_argument("--max-images", type=int, default=None, help="at most N photos per source")
    b.add_argument("--degradations", default="bicubic,bnj,realesrgan",
                   help="comma-separated: bicubic, bnj (blur+noise+JPEG), realesrgan (default: all)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--split", choices=("all", "eval", "train"), default="all",
                   help="all: benchmark of every photo (default); eval: benchmark of the eval photos only; train: "
                        "the full-resolution training photos in OUT/train/ (a fixed split, see realisr.bench.data)")


def run(args) -> int:
    if getattr(args, "action", None) != "build":
        print("usage: realisr bench-data build --out DIR", file=sys.stderr)
        return 2
    from realisr.bench.data import build_benchmark_data
    from realisr.progress import TqdmProgress

    progress = TqdmProgress(disable=getattr(args, "quiet", False))
    try:
        m = build_benchmark_data(
            args.out, sources=[s.strip() for s in args.sources.split(",") if s.strip()], hq_size=args.hq_size,
            scale=args.scale, crops_per_image=args.crops_per_image, seed=args.seed, max_images=args.max_images,
            degradations=[d.strip() for d in args.degradations.split(",") if d.strip()], split=args.split,
            callback=progress)
    finally:
        progress.close()
    if not getattr(args, "quiet", False):
        for note in m["notes"]:
            print(note)
        if m.get("split") == "train":
            print(f"{len(m['images'])} training photos in {args.out / 'train'}; manifest {args.out / 'manifest.json'}")
            return 0
        print(f"{len(m['images'])} HQ crops in {args.out / 'HQ'}; LQ folders: "
              + ", ".join(v for k, v in m["folders"].items() if k != "HQ") + f"; manifest {args.out / 'manifest.json'}")
    return 0
