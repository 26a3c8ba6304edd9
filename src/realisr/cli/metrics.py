"""``realisr metrics``: the metric registry with conventions and whether each metric runs here; or measure
one SR/HQ pair (``--sr A.png --ref B.png``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def add_arguments(p) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--markdown", action="store_true", help="a Markdown table (used for docs/metrics.md)")
    p.add_argument("--sr", type=Path, metavar="IMAGE", help="measure this image ...")
    p.add_argument("--ref", type=Path, metavar="IMAGE", help="... against this reference (full-reference metrics)")
    p.add_argument("--metrics", default=None, help="comma-separated ids for --sr (default: all available)")
    p.add_argument("--crop-border", type=int, default=0, help="border crop in pixels for --sr (default 0)")


def rows() -> list[dict]:
    from realisr.metrics.registry import list_metrics, metric_status

    out = []
    for spec in list_metrics():
        st = metric_status(spec)
        out.append({"id": spec.id, "label": spec.label, "kind": spec.kind,
                    "higher_is_better": spec.higher_is_better, "color_space": spec.color_space,
                    "crop_border": spec.crop_border, "data_range": spec.data_range, "backend": spec.backend,
                    "license": spec.license, "convention": spec.convention,
                    "weights": [w.name for w in spec.weights], "available": st.available, "detail": st.detail})
    return out


def markdown_table() -> str:
    """The metric table of docs/metrics.md, generated from the registry."""
    from realisr.metrics.registry import list_metrics

    lines = ["| id | kind | better | colour space | backend | weight file (torch hub subfolder) | licence |",
             "|---|---|---|---|---|---|---|"]
    for s in list_metrics():
        files = ", ".join(f"`{w.name}` (`{w.hub_subdir}/`)" for w in s.weights) or "none"
        lines.append(f"| `{s.id}` | {s.kind} | {s.arrow} | {s.color_space} | {s.backend} | {files} | {s.license} |")
    return "\n".join(lines)


def _measure(args) -> int:
    from realisr.bench.runner import read_rgb
    from realisr.metrics.registry import MetricUnavailableError, create_metric, get_metric_spec, list_metrics

    sr = read_rgb(args.sr)
    ref = read_rgb(args.ref) if args.ref else None
    ids = [m.strip() for m in args.metrics.split(",")] if args.metrics else [s.id for s in list_metrics()]
    result = {}
    for mid in ids:
        spec = get_metric_spec(mid)
        if spec.kind == "set" or (spec.needs_reference and ref is None):
            continue
        try:
            m = create_metric(mid, border=args.crop_border)
            result[mid] = m(sr, ref) if spec.needs_reference else m(sr)
        except MetricUnavailableError as e:
            if args.metrics:
                print(f"realisr metrics: {e}", file=sys.stderr)
    if args.json:
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
    else:
        for k, v in result.items():
            print(f"{k:<8} {v:.4f}")
    return 0


def run(args) -> int:
    if args.sr:
        return _measure(args)
    if args.markdown:
        sys.stdout.write(markdown_table() + "\n")
        return 0
    data = rows()
    if args.json:
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
        return 0
    print(f"{'id':<8} {'kind':<14} {'dir':<3} {'backend':<12} {'avail':<5} detail")
    for r in data:
        print(f"{r['id']:<8} {r['kind']:<14} {'↑' if r['higher_is_better'] else '↓':<3} {r['backend']:<12} "
              f"{'yes' if r['available'] else 'no':<5} {r['detail']}")
    return 0
