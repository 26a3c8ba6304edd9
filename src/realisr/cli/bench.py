"""``realisr bench``: benchmark methods/settings on paired (LQ + HQ) or unpaired (LQ only) folders.

Examples::

    realisr bench --lq bench/LQ/bicubic_x4 --hq bench/HQ -m bicubic -m realesrgan-x4plus -o runs/x4
    realisr bench --lq my_photos -m realesrgan-x4plus -m realsr-df2k-x4 -o runs/mine     # no reference
    realisr bench --lq LQ --hq HQ -m "pisa-sr:lambda_pix=0:1:0.25,lambda_sem=1.0" -o runs/dial
"""

from __future__ import annotations

import sys
from pathlib import Path


def add_arguments(p) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--lq", required=True, type=Path, metavar="DIR", help="folder of low-quality inputs")
    g.add_argument("--hq", type=Path, metavar="DIR",
                   help="folder of references, matched to LQ by file name (omit: no-reference metrics only)")
    g.add_argument("--pair-by", choices=("name", "order"), default="name",
                   help="match LQ/HQ by name (LR/HR tags ignored) or by sorted order (default: name)")
    g.add_argument("--limit", type=int, metavar="N", help="only the first N images")
    g = p.add_argument_group("methods")
    g.add_argument("-m", "--method", action="append", required=True, metavar="SPEC",
                   help="registry id or checkpoint path, with optional settings: ID:key=value,...; grids "
                        "key=a|b|c or key=start:stop:step (drawn as curves); repeat -m for several methods")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: best available)")
    g.add_argument("--dtype", default=None, help="auto, fp32, fp16, bf16")
    g.add_argument("--tile", type=int, default=None, help="tile size passed to the pipelines")
    g.add_argument("--seed", type=int, default=0, help="generator seed for sampling methods (default 0)")
    g.add_argument("--seeds", type=int, default=1, metavar="N",
                   help="stability: run stochastic methods N times per image (seeds SEED..SEED+N-1) and report "
                        "G-STD of every metric and L-STD (CCSR's protocol: N=10); deterministic methods run once")
    g.add_argument("--rerun-deterministic", action="store_true",
                   help="with --seeds: run deterministic methods N times too (e.g. to measure GPU non-determinism)")
    g = p.add_argument_group("metrics")
    g.add_argument("--metrics", default=None,
                   help="comma-separated metric ids (default: all; see `realisr metrics`)")
    g.add_argument("--crop-border", type=int, default=None,
                   help="pixels cropped on each side before measuring (default 0 = OSEDiff/PiSA-SR protocol)")
    g.add_argument("--protocol", choices=("osediff", "ccsr"), default="osediff",
                   help="osediff: no border crop (also PiSA-SR); ccsr: 4-pixel crop (also SeeSR)")
    g.add_argument("--metric-device", default=None, help="device for learned metrics (default: best available)")
    g = p.add_argument_group("output")
    g.add_argument("-o", "--out", required=True, type=Path, metavar="DIR",
                   help="output folder (SR outputs are cached there; rerun to resume)")
    g.add_argument("--crops", type=int, default=8, help="images with zoomed crops in the report (default 8)")
    g.add_argument("--no-report", action="store_true", help="skip report.html")


def run(args) -> int:
    from realisr.bench.runner import BenchConfig, run_benchmark
    from realisr.cpu import keep_freed_memory
    from realisr.progress import TqdmProgress

    keep_freed_memory()  # inference on the CPU re-allocates big activations per layer: reuse them (docs/cpu.md)

    border = args.crop_border if args.crop_border is not None else (4 if args.protocol == "ccsr" else 0)
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None
    if args.seeds < 1:
        from realisr.errors import RealisrError

        raise RealisrError(f"--seeds must be >= 1, got {args.seeds}")
    cfg = BenchConfig(lq_dir=args.lq, hq_dir=args.hq, out_dir=args.out, methods=args.method, metrics=metrics,
                      border=border, pair_by=args.pair_by, limit=args.limit, device=args.device,
                      dtype=args.dtype, tile=args.tile, seed=args.seed, seeds=args.seeds,
                      rerun_deterministic=args.rerun_deterministic, report=not args.no_report,
                      crops=args.crops, metric_device=args.metric_device)
    progress = TqdmProgress(disable=getattr(args, "quiet", False))
    try:
        summary = run_benchmark(cfg, callback=progress)
    finally:
        progress.close()
    quiet = getattr(args, "quiet", False)
    avail = [m for m, i in summary["metrics"].items() if i["available"]]
    if not quiet:
        labels = [summary["metrics"][m]["label"] + ("↑" if summary["metrics"][m]["higher_is_better"] else "↓")
                  for m in avail]
        w = max(len(m["label"]) for m in summary["methods"])
        print(f"{'method':<{w}}  " + "  ".join(f"{lab:>9}" for lab in labels) + "  s/image")
        for m in summary["methods"]:
            vals = []
            for mid in avail:
                v = m["means"].get(mid)
                vals.append(f"{v:9.4f}" if isinstance(v, float) else f"{'-':>9}")
            sp = m.get("seconds_per_image")
            print(f"{m['label']:<{w}}  " + "  ".join(vals) + (f"  {sp:.3f}" if sp is not None else "  -"))
        if args.seeds > 1:
            print(f"stability over {args.seeds} seeds (mean / G-STD; L-STD):")
            for m in summary["methods"]:
                if m.get("runs", 1) <= 1:
                    print(f"  {m['label']:<{w}}  {m.get('stability', 'one run')}")
                    continue
                parts = [f"{summary['metrics'][mid]['label']} {m['means'][mid]:.4f}/{g:.4f}"
                         for mid, g in m.get("gstd", {}).items() if m["means"].get(mid) is not None]
                lstd = m.get("lstd")
                print(f"  {m['label']:<{w}}  " + "  ".join(parts) + (f"  L-STD {lstd:.4f}" if lstd is not None else ""))
        missing = [mid for mid, i in summary["metrics"].items() if not i["available"]]
        if missing:  # each was explained once before the run; here only the list
            print(f"not measured: {', '.join(missing)} (why: summary.json or `realisr metrics`)", file=sys.stderr)
        if summary["failures"]:
            print(f"{len(summary['failures'])} failure(s), listed in {args.out / 'summary.json'}", file=sys.stderr)
        print(f"wrote {args.out / 'results.csv'}, {args.out / 'summary.json'}"
              + (f", {args.out / 'stability.csv'}" if args.seeds > 1 else "")
              + ("" if args.no_report else f", {args.out / 'report.html'}"))
    ok = any(m["n_ok"] for m in summary["methods"])
    return 0 if ok else 1
