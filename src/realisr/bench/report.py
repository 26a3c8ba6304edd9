"""The self-contained HTML report of ``realisr bench``: inline CSS, inline SVG plot, base64 PNG crops; it
loads nothing from anywhere (open it offline, attach it to an issue)."""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

__all__ = ["write_report", "render_report", "pd_axes", "svg_plot", "REPORT_CSS"]

_CSS = """
body{font:14px/1.4 system-ui,-apple-system,'Segoe UI',sans-serif;margin:24px;color:#1b1b1b;background:#fff}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:6px 0}th,td{border:1px solid #d0d0d0;padding:3px 8px;text-align:right}
th{background:#f2f4f7}td.l,th.l{text-align:left}td.best{font-weight:700;background:#e3f4e1}
td.best::after{content:' \\2605';color:#2e7d32}.meta{color:#555;font-size:12px}.na{color:#999}
.crops{display:flex;flex-wrap:wrap;gap:6px;margin:6px 0 14px}.crop{text-align:center;font-size:11px}
.crop img{width:192px;height:192px;image-rendering:pixelated;border:1px solid #ccc;display:block}
svg text{font:11px system-ui,sans-serif}.fail td{background:#fff3f3}
"""
REPORT_CSS = _CSS  # shared with the `realisr study` results page


def _fmt(v, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "inf" if isinstance(v, float) and v == float("inf") else "–"
    if isinstance(v, float):
        a = abs(v)
        return f"{v:.2f}" if a >= 10 else f"{v:.{digits}f}"
    return html.escape(str(v))


def _best(values: list, higher: bool) -> Optional[float]:
    vals = [v for v in values if v is not None and isinstance(v, (int, float)) and math.isfinite(v)]
    if len(vals) < 2:
        return None
    return max(vals) if higher else min(vals)


def _has_values(summary: dict, mid: str) -> bool:
    return any(isinstance(v := _value(m, mid), (int, float)) and math.isfinite(v) for m in summary["methods"])


def pd_axes(summary: dict) -> Optional[tuple[str, str]]:
    """The perception-distortion plot's ``(x metric, y metric)``: PSNR vs LPIPS (or the next perceptual metric)
    with references, NIQE vs MUSIQ/MANIQA/CLIPIQA without; a metric is used only when some method has a value
    for it, and a lone metric is plotted against the seconds per image (or against the method order)."""
    avail = [m for m, i in summary["metrics"].items() if i.get("available") and _has_values(summary, m)]
    no_ref = [m for m in avail if summary["metrics"][m].get("kind") == "no-reference"]
    second = "seconds" if _has_values(summary, "seconds") else None
    if "psnr" in avail:
        for y in ("lpips", "dists", *no_ref, "ssim"):
            if y in avail:
                return "psnr", y
        return ("psnr", second) if second else ("method", "psnr")
    preferred = ("niqe", "musiq", "maniqa", "clipiqa")
    order = [m for m in preferred if m in no_ref] + [m for m in no_ref if m not in preferred]
    rest = [m for m in avail if m not in order and summary["metrics"][m].get("kind") != "set"]
    for x in order + rest:
        for y in order + rest:
            if y != x:
                return x, y
        return (x, second) if second else ("method", x)
    return None


def _axis_label(summary: dict, mid: str) -> str:
    if mid == "seconds":
        return "seconds / image ↓"
    if mid == "method":
        return "method (order of -m)"
    info = summary["metrics"][mid]
    return f"{info['label']} {'↑' if info['higher_is_better'] else '↓'}"


def _value(method: dict, mid: str, index: int = 0):
    if mid == "method":
        return float(index + 1)
    return method.get("seconds_per_image") if mid == "seconds" else method["means"].get(mid)


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = min((s * mag for s in (1, 2, 2.5, 5, 10) if s * mag >= raw), default=raw)
    start = math.ceil(lo / step) * step
    return [start + i * step for i in range(int((hi - start) / step + 1e-9) + 1)]


def svg_plot(summary: dict, x: str, y: str, width: int = 640, height: int = 420) -> str:
    """An inline SVG scatter plot, one point per method setting; grid sweeps are joined as curves."""
    pts = [(m, _value(m, x, i), _value(m, y, i)) for i, m in enumerate(summary["methods"])]
    pts = [(m, a, b) for m, a, b in pts if a is not None and b is not None and math.isfinite(a) and math.isfinite(b)]
    ml, mr, mt, mb = 64, 20, 20, 48
    out = [f'<svg id="pd-plot" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" aria-label="perception-distortion plot">',
           f'<rect x="0" y="0" width="{width}" height="{height}" fill="#fff"/>']
    if not pts:
        out.append(f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle">no values to plot</text></svg>')
        return "".join(out)
    xs = [a for _, a, _ in pts]
    ys = [b for _, _, b in pts]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    padx = (x1 - x0) * 0.08 or max(abs(x0) * 0.05, 0.01)
    pady = (y1 - y0) * 0.08 or max(abs(y0) * 0.05, 0.01)
    x0, x1, y0, y1 = x0 - padx, x1 + padx, y0 - pady, y1 + pady
    pw, ph = width - ml - mr, height - mt - mb

    def sx(v):
        return ml + (v - x0) / (x1 - x0) * pw

    def sy(v):
        return mt + ph - (v - y0) / (y1 - y0) * ph

    out.append(f'<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" fill="none" stroke="#888"/>')
    for t in _ticks(x0, x1):
        out.append(f'<line x1="{sx(t):.1f}" y1="{mt + ph}" x2="{sx(t):.1f}" y2="{mt + ph + 4}" stroke="#888"/>'
                   f'<text x="{sx(t):.1f}" y="{mt + ph + 16}" text-anchor="middle">{t:g}</text>'
                   f'<line x1="{sx(t):.1f}" y1="{mt}" x2="{sx(t):.1f}" y2="{mt + ph}" stroke="#eee"/>')
    for t in _ticks(y0, y1):
        out.append(f'<line x1="{ml - 4}" y1="{sy(t):.1f}" x2="{ml}" y2="{sy(t):.1f}" stroke="#888"/>'
                   f'<text x="{ml - 6}" y="{sy(t) + 4:.1f}" text-anchor="end">{t:.4g}</text>'
                   f'<line x1="{ml}" y1="{sy(t):.1f}" x2="{ml + pw}" y2="{sy(t):.1f}" stroke="#eee"/>')
    out.append(f'<text class="axis-label" x="{ml + pw / 2}" y="{height - 10}" text-anchor="middle">'
               f'{html.escape(_axis_label(summary, x))}</text>')
    out.append(f'<text class="axis-label" transform="translate(14,{mt + ph / 2}) rotate(-90)" '
               f'text-anchor="middle">{html.escape(_axis_label(summary, y))}</text>')
    palette = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2"]
    groups: dict = {}
    for m, a, b in pts:
        if m.get("group"):
            groups.setdefault(m["group"], []).append((m, a, b))
    colours = {}
    for i, g in enumerate(list(groups) + [m["label"] for m, _, _ in pts if not m.get("group")]):
        colours[g] = palette[i % len(palette)]
    for g, members in groups.items():
        members.sort(key=lambda t: (t[0].get("sweep_value") is None, t[0].get("sweep_value")))
        path = " ".join(f"{sx(a):.1f},{sy(b):.1f}" for _, a, b in members)
        out.append(f'<polyline class="sweep" points="{path}" fill="none" stroke="{colours[g]}" stroke-width="1.5">'
                   f'<title>{html.escape(g)}</title></polyline>')
    for m, a, b in pts:
        c = colours[m.get("group") or m["label"]]
        label = (f"{m['sweep_key']}={m['sweep_value']}" if m.get("group") else m["label"])
        out.append(f'<circle class="point" cx="{sx(a):.1f}" cy="{sy(b):.1f}" r="5" fill="{c}" '
                   f'data-method="{html.escape(m["label"])}"><title>{html.escape(m["label"])}: '
                   f'{_fmt(a)}, {_fmt(b)}</title></circle>'
                   f'<text x="{sx(a) + 7:.1f}" y="{sy(b) - 6:.1f}" fill="{c}">{html.escape(label)}</text>')
    if groups:
        ly = mt + 14
        for g in groups:
            out.append(f'<text x="{ml + 8}" y="{ly}" fill="{colours[g]}">— {html.escape(g)}</text>')
            ly += 14
    out.append("</svg>")
    return "".join(out)


def _png_b64(arr: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _u8(a: np.ndarray) -> np.ndarray:
    return a if a.dtype == np.uint8 else np.clip(np.rint(a * 255), 0, 255).astype(np.uint8)


def _crop_window(img: np.ndarray, size: int) -> tuple[int, int]:
    """Top-left corner of the most detailed ``size`` x ``size`` window (gradient energy on a coarse grid)."""
    g = img.astype(np.float32).mean(axis=2)
    e = np.abs(np.diff(g, axis=0))[:, :-1] + np.abs(np.diff(g, axis=1))[:-1, :]
    h, w = e.shape
    best, where = -1.0, (0, 0)
    stride = max(1, size // 2)
    for y in range(0, max(1, h - size + 1), stride):
        for x in range(0, max(1, w - size + 1), stride):
            v = float(e[y:y + size, x:x + size].sum())
            if v > best:
                best, where = v, (y, x)
    return where


def _crops_html(out_dir: Path, summary: dict, pairs: Sequence, n_crops: int) -> str:
    from .runner import read_rgb

    parts = []
    for p in list(pairs)[:n_crops]:
        srs = []
        for m in summary["methods"]:
            f = out_dir / "sr" / m["slug"] / f"{p.name}.png"
            if f.is_file():
                srs.append((m["label"], _u8(read_rgb(f))))
        if not srs:
            continue
        ref = _u8(read_rgb(p.hq)) if p.hq is not None else None
        base = ref if ref is not None and ref.shape[:2] == srs[0][1].shape[:2] else srs[0][1]
        h, w = base.shape[:2]
        size = max(8, min(96, h // 2, w // 2))
        y, x = _crop_window(base, size)
        lq = _u8(read_rgb(p.lq))
        s = w / lq.shape[1]
        ly, lx, ls = int(y / s), int(x / s), max(1, int(round(size / s)))
        lq_crop = lq[ly:ly + ls, lx:lx + ls]
        rep = max(1, size // max(1, lq_crop.shape[0]))
        lq_crop = np.repeat(np.repeat(lq_crop, rep, axis=0), rep, axis=1)[:size, :size]
        tiles = [("LQ (nearest)", lq_crop)] + [(lab, a[y:y + size, x:x + size]) for lab, a in srs
                                               if a.shape[:2] == base.shape[:2]]
        if ref is not None and ref.shape[:2] == base.shape[:2]:
            tiles.append(("HQ", ref[y:y + size, x:x + size]))
        cells = "".join(f'<div class="crop"><img alt="{html.escape(lab)}" src="{_png_b64(np.ascontiguousarray(t))}">'
                        f'{html.escape(lab)}</div>' for lab, t in tiles)
        parts.append(f'<h3>{html.escape(p.name)} <span class="meta">crop {size}px at ({x}, {y})</span></h3>'
                     f'<div class="crops">{cells}</div>')
    return "".join(parts)


def _run_file(out_dir: Path, summary: dict, method: dict, image: str, seed: int) -> Path:
    folder = out_dir / "sr" / method["slug"]
    return folder / f"{image}.png" if seed == summary.get("seed", 0) else folder / f"seed-{seed}" / f"{image}.png"


def _stability_crops_html(out_dir: Path, summary: dict, pairs: Sequence, n_crops: int) -> str:
    """Best and worst run of each image (zoomed crops at the same place), for every method run several times."""
    from .runner import read_rgb

    parts = []
    for p in list(pairs)[:n_crops]:
        tiles = []
        for m in summary["methods"]:
            e = m.get("per_image", {}).get(p.name)
            if not e or "best" not in e:
                continue
            best = _run_file(out_dir, summary, m, p.name, e["best"]["seed"])
            worst = _run_file(out_dir, summary, m, p.name, e["worst"]["seed"])
            if not (best.is_file() and worst.is_file()):
                continue
            a, b = _u8(read_rgb(best)), _u8(read_rgb(worst))
            size = max(8, min(96, a.shape[0] // 2, a.shape[1] // 2))
            y, x = _crop_window(a, size)
            rk = e["rank_metric"]
            tiles.append((f"{m['label']} best: seed {e['best']['seed']} ({rk} {_fmt(e['best'][rk])})",
                          a[y:y + size, x:x + size]))
            tiles.append((f"{m['label']} worst: seed {e['worst']['seed']} ({rk} {_fmt(e['worst'][rk])})",
                          b[y:y + size, x:x + size]))
        if tiles:
            cells = "".join(f'<div class="crop"><img alt="{html.escape(lab)}" '
                            f'src="{_png_b64(np.ascontiguousarray(t))}">{html.escape(lab)}</div>' for lab, t in tiles)
            parts.append(f'<h3>{html.escape(p.name)}</h3><div class="crops">{cells}</div>')
    return "".join(parts)


def _stability_html(summary: dict, avail: list) -> str:
    """G-STD per metric and L-STD per method; deterministic methods are named as such."""
    if summary.get("seeds", 1) <= 1:
        return ""
    e = html.escape
    metrics = summary["metrics"]
    cols = [mid for mid in avail if metrics[mid].get("kind", "") != "set"]
    h = [f"<h2>Stability over {summary['seeds']} seeds</h2><div class='meta'>CCSR's protocol: mean over images "
         "and runs / G-STD (mean over images of the population std over runs); L-STD: per-pixel std over runs, "
         "4-px border cropped, averaged</div><table id='stability'><thead><tr><th class='l'>method</th>"
         "<th>runs</th>"]
    h += [f"<th>{e(metrics[m]['label'])} mean / G-STD</th>" for m in cols]
    h.append("<th>L-STD ↓</th></tr></thead><tbody>")
    for m in summary["methods"]:
        h.append(f"<tr><td class='l'>{e(m['label'])}</td><td>{m.get('runs', 1)}</td>")
        if m.get("runs", 1) <= 1:
            h.append(f"<td class='l na' colspan='{len(cols) + 1}'>{e(m.get('stability', 'one run'))}</td></tr>")
            continue
        for mid in cols:
            g = m.get("gstd", {}).get(mid)
            h.append(f"<td>{_fmt(m['means'].get(mid))} / {_fmt(g)}</td>")
        h.append(f"<td>{_fmt(m.get('lstd'))}</td></tr>")
    h.append("</tbody></table>")
    rows = [(img, m, ent) for m in summary["methods"] for img, ent in m.get("per_image", {}).items()]
    if rows:
        h.append("<table id='runs'><thead><tr><th class='l'>image</th><th class='l'>method</th><th>L-STD</th>"
                 "<th>best run</th><th>worst run</th></tr></thead><tbody>")
        for img, m, ent in rows:
            rk = ent.get("rank_metric")
            best = f"seed {ent['best']['seed']}: {_fmt(ent['best'][rk])}" if rk else "–"
            worst = f"seed {ent['worst']['seed']}: {_fmt(ent['worst'][rk])}" if rk else "–"
            h.append(f"<tr><td class='l'>{e(img)}</td><td class='l'>{e(m['label'])}</td><td>{_fmt(ent['lstd'])}</td>"
                     f"<td>{e(best)}</td><td>{e(worst)}</td></tr>")
        h.append("</tbody></table>")
    return "".join(h)


def render_report(summary: dict, rows: list, crops_html: str = "", stability_crops: str = "") -> str:
    """The report as one HTML string (see :func:`write_report`)."""
    metrics = summary["metrics"]
    avail = [m for m, i in metrics.items() if i.get("available")]
    e = html.escape
    h = ["<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
         "<title>realisr bench report</title>", f"<style>{_CSS}</style></head><body>",
         "<h1>realisr benchmark</h1>",
         f"<div class='meta'>{e(summary['created'])} · LQ <code>{e(summary['lq_dir'])}</code>"
         + (f" · HQ <code>{e(summary['hq_dir'])}</code>" if summary.get("hq_dir") else " · no reference")
         + f" · {len(summary['images'])} images · border crop {summary['border']} px · "
           f"{e(summary['protocol'])}</div>"]
    # summary table
    h.append("<h2>Summary</h2><table id='summary'><thead><tr><th class='l'>method</th>")
    for mid in avail:
        i = metrics[mid]
        h.append(f"<th title='{e(i['convention'])}'>{e(i['label'])} {'↑' if i['higher_is_better'] else '↓'}</th>")
    h.append("<th>s / image ↓</th><th>images ok</th></tr></thead><tbody>")
    bests = {mid: _best([m["means"].get(mid) for m in summary["methods"]], metrics[mid]["higher_is_better"])
             for mid in avail}
    best_s = _best([m.get("seconds_per_image") for m in summary["methods"]], False)
    for m in summary["methods"]:
        h.append(f"<tr><td class='l'>{e(m['label'])}</td>")
        for mid in avail:
            v = m["means"].get(mid)
            cls = " class='best'" if v is not None and bests[mid] is not None and v == bests[mid] else ""
            h.append(f"<td{cls}>{_fmt(v)}</td>")
        sp = m.get("seconds_per_image")
        cls = " class='best'" if sp is not None and best_s is not None and sp == best_s else ""
        h.append(f"<td{cls}>{_fmt(sp, 3)}</td><td>{m['n_ok']}/{m['n_images']}</td></tr>")
    h.append("</tbody></table>")
    na = {mid: i for mid, i in metrics.items() if not i.get("available")}
    if na:
        h.append("<table id='unavailable'><thead><tr><th class='l'>unavailable metric</th><th class='l'>why / what "
                 "to do</th></tr></thead><tbody>")
        for mid, i in na.items():
            h.append(f"<tr><td class='l'>{e(i['label'])}</td><td class='l na'>{e(i.get('detail', ''))}</td></tr>")
        h.append("</tbody></table>")
    # plot
    axes = pd_axes(summary)
    h.append("<h2>Perception–distortion</h2>")
    if axes:
        h.append("<div class='meta'>one point per method setting; sweeps of a setting are joined as curves</div>")
        h.append(svg_plot(summary, *axes))
    else:
        h.append("<p class='na'>no metric available to plot</p>")
    # crops
    if crops_html:
        h.append("<h2>Crops</h2>" + crops_html)
    h.append(_stability_html(summary, avail))
    if stability_crops:
        h.append("<h3>Best and worst run per image</h3>" + stability_crops)
    # per-image
    h.append("<h2>Per image</h2><table id='per-image'><thead><tr><th class='l'>image</th><th class='l'>method</th>")
    per_cols = [mid for mid in avail if any(mid in r for r in rows)]
    for mid in per_cols:
        i = metrics[mid]
        h.append(f"<th>{e(i['label'])} {'↑' if i['higher_is_better'] else '↓'}</th>")
    h.append("<th>s</th></tr></thead><tbody>")
    by_image: dict = {}
    for r in rows:
        by_image.setdefault(r["image"], []).append(r)
    for img in summary["images"]:
        rs = by_image.get(img, [])
        ib = {mid: _best([r.get(mid) for r in rs], metrics[mid]["higher_is_better"]) for mid in per_cols}
        for r in rs:
            label = r["method"] + (f" (seed {r['seed']})" if summary.get("seeds", 1) > 1 and "seed" in r else "")
            h.append(f"<tr><td class='l'>{e(img)}</td><td class='l'>{e(label)}</td>")
            for mid in per_cols:
                v = r.get(mid)
                cls = " class='best'" if v is not None and ib[mid] is not None and v == ib[mid] else ""
                h.append(f"<td{cls}>{_fmt(v)}</td>")
            h.append(f"<td>{_fmt(r.get('seconds'), 3)}</td></tr>")
    h.append("</tbody></table>")
    # failures
    h.append(f"<h2>Failures ({len(summary['failures'])})</h2>")
    if summary["failures"]:
        h.append("<table id='failures'><thead><tr><th class='l'>method</th><th class='l'>image</th>"
                 "<th class='l'>stage</th><th class='l'>error</th></tr></thead><tbody>")
        for f in summary["failures"]:
            h.append(f"<tr class='fail'><td class='l'>{e(f['method'])}</td><td class='l'>{e(f['image'])}</td>"
                     f"<td class='l'>{e(f['stage'])}</td><td class='l'>{e(f['error'])}</td></tr>")
        h.append("</tbody></table>")
    else:
        h.append("<p>none</p>")
    h.append("<h2>Settings</h2><table id='settings'><tbody>")
    for m in summary["methods"]:
        h.append(f"<tr><td class='l'>{e(m['label'])}</td><td class='l'><code>{e(m['model'])}</code> "
                 f"call {e(str(m['call_kwargs']))} load {e(str(m['load_kwargs']))}</td></tr>")
    vers = ", ".join(f"{k} {v}" for k, v in summary.get("versions", {}).items())
    h.append(f"</tbody></table><p class='meta'>{e(vers)}</p></body></html>")
    return "".join(h)


def write_report(out_dir: Path, summary: dict, rows: list, pairs: Sequence = (), n_crops: int = 8) -> Path:
    """Write ``out_dir/report.html`` (self-contained) and return its path."""
    out_dir = Path(out_dir)
    crops = _crops_html(out_dir, summary, pairs, n_crops) if n_crops > 0 else ""
    stab = _stability_crops_html(out_dir, summary, pairs, n_crops) if n_crops > 0 else ""
    path = out_dir / "report.html"
    tmp = path.with_suffix(".html.tmp")
    tmp.write_text(render_report(summary, rows, crops, stab), encoding="utf-8")
    tmp.replace(path)
    return path
