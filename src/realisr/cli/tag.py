"""``realisr tag``: the RAM / DAPE tags of images (the prompt OSEDiff and SeeSR build), one line per file.

    realisr tag -i photo.jpg                    apple, apple tree, arch bridge
    realisr tag -i photos/ --json               [{"file": ..., "tags": [...], "text": ..., "scores": {...}}, ...]
    realisr tag -i photo.jpg -m ram --chinese   plain RAM, Chinese tag names

A bad file does not stop a folder: it is listed at the end and the exit code is 1.
"""

from __future__ import annotations

import json
import logging
import sys

__all__ = ["add_arguments", "run"]

logger = logging.getLogger(__name__)


def add_arguments(p) -> None:
    p.add_argument("-i", "--input", nargs="+", required=True, metavar="PATH",
                   help="image files, folders or glob patterns ('sample:NAME': a scikit-image photo)")
    p.add_argument("--recursive", action="store_true", help="descend into sub-folders")
    p.add_argument("-m", "--model", default="dape", choices=["dape", "ram"],
                   help="dape: RAM + SeeSR's DAPE LoRA (the prompt of OSEDiff and SeeSR; default); ram: plain RAM")
    p.add_argument("--json", action="store_true",
                   help="print JSON: per file the tags, the official tag string and every tag's probability above "
                        "threshold")
    p.add_argument("--threshold", type=float, default=None,
                   help="one threshold for every tag (default: the per-class thresholds of the threshold file)")
    p.add_argument("--chinese", action="store_true", help="Chinese tag names (needs ram_tag_list_chinese.txt)")
    g = p.add_argument_group("files (default: searched in --ram-dir, $REALISR_WEIGHTS/ram/, $REALISR_WEIGHTS/)")
    g.add_argument("--ram", default=None, metavar="PATH", help="ram_swin_large_14m.pth")
    g.add_argument("--dape", default=None, metavar="PATH", help="DAPE.pth")
    g.add_argument("--tag-list", default=None, metavar="PATH", help="ram_tag_list.txt")
    g.add_argument("--thresholds", default=None, metavar="PATH", help="ram_tag_list_threshold.txt")
    g.add_argument("--ram-dir", default=None, metavar="DIR",
                   help="a folder holding the files (e.g. SeeSR's ram/ or preset/models/)")
    g.add_argument("--download", action="store_true",
                   help="download the RAM weights from the Hugging Face hub if they are not found")
    g = p.add_argument_group("device")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: best available)")
    g.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                   help="auto: fp16 on CUDA (as the official scripts), fp32 on the CPU")


def run(args) -> int:
    from realisr.cli.upscale import collect_inputs
    from realisr.errors import RealisrError
    from realisr.io import read_image
    from realisr.tagging import load_tagger

    inputs = [path for path, _ in collect_inputs(args.input, args.recursive)]
    if not inputs:
        print("realisr tag: no images found in the given inputs", file=sys.stderr)
        return 1
    tagger = load_tagger(args.model, ram=args.ram, dape=args.dape, tag_list=args.tag_list, device=args.device,
                         dtype=args.dtype, thresholds=args.thresholds, threshold=args.threshold,
                         chinese=args.chinese, root=args.ram_dir, download=args.download)
    several = len(inputs) > 1
    records, failures = [], []
    for path in inputs:
        try:
            data = read_image(path)
            res = tagger(data.pixels)
        except RealisrError as e:
            failures.append((path, str(e)))
            continue
        except (ValueError, OSError, RuntimeError) as e:
            failures.append((path, f"{type(e).__name__}: {e}"))
            continue
        if args.json:
            probs = res.probs[0].tolist()
            records.append({"file": str(path), "tags": res.tags[0], "text": res.text[0],
                            "scores": {tagger.tag_names[i].strip(): round(probs[i], 6) for i in res.indices[0]}})
        elif several:
            print(f"{path}\t{res.text[0]}", flush=True)
        else:
            print(res.text[0], flush=True)
    if args.json:
        print(json.dumps(records if several else (records[0] if records else None), ensure_ascii=False, indent=1))
    for path, why in failures:
        print(f"  failed: {path}: {why}", file=sys.stderr)
    return 1 if failures else 0
