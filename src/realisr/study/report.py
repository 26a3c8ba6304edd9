"""The results of a study as CSV files and one self-contained HTML page, in the style of the ``realisr bench``
report: scores with intervals (and an inline SVG of them), the win-rate matrix, raters and agreement."""

from __future__ import annotations

import csv
import html
import io
import math
from pathlib import Path

from ..bench.report import REPORT_CSS
from ..io.text import atomic_write_text
from .analysis import StudyResults
from .design import Study

__all__ = ["render_html", "write_results", "results_json"]


def _f(v, d: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return f"{v:.{d}f}" if isinstance(v, float) else html.escape(str(v))


def results_json(res: StudyResults) -> dict:
    order = res.ranking()
    return {
        "ranking": [{"rank": r + 1, "method": res.methods[i], "score": float(res.score[i]), "se": float(res.se[i]),
                     "low": float(res.low[i]), "high": float(res.high[i])} for r, i in enumerate(order)],
        "level": res.level, "votes": res.n_votes, "votes_used": res.n_used, "images": res.images,
        "win_rate": {res.methods[i]: {res.methods[j]: (None if math.isnan(res.win_rate[i, j]) else
                                                       float(res.win_rate[i, j]))
                                      for j in range(len(res.methods)) if j != i} for i in range(len(res.methods))},
        "raters": {str(k): v for k, v in res.raters.items()}, "excluded": [str(r) for r in res.excluded],
        "agreement": res.agreement,
    }


def _svg(res: StudyResults, width: int = 560) -> str:
    order = res.ranking()
    row, ml, mr = 24, 190, 24
    height = row * len(order) + 40
    lo = min(float(min(res.low)), -0.5)
    hi = max(float(max(res.high)), 0.5)
    pw = width - ml - mr

    def sx(v):
        return ml + (v - lo) / (hi - lo) * pw

    out = [f'<svg id="scores-plot" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'role="img" aria-label="Bradley-Terry scores"><rect width="{width}" height="{height}" fill="#fff"/>',
           f'<line x1="{sx(0):.1f}" y1="8" x2="{sx(0):.1f}" y2="{height - 28}" stroke="#ccc"/>']
    for r, i in enumerate(order):
        y = 18 + r * row
        out.append(f'<text x="{ml - 8}" y="{y + 4}" text-anchor="end">{html.escape(res.methods[i])}</text>'
                   f'<line x1="{sx(res.low[i]):.1f}" y1="{y}" x2="{sx(res.high[i]):.1f}" y2="{y}" stroke="#1f77b4" '
                   f'stroke-width="2"/><circle class="point" cx="{sx(res.score[i]):.1f}" cy="{y}" r="4" '
                   f'fill="#1f77b4"/>')
    out.append(f'<text x="{ml + pw / 2}" y="{height - 8}" text-anchor="middle">Bradley–Terry score '
               f'(log-strength) with {res.level:.0%} interval</text></svg>')
    return "".join(out)


def render_html(study: Study, res: StudyResults) -> str:
    e = html.escape
    order = res.ranking()
    h = ["<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
         f"<title>{e(study.title)}: results</title><style>{REPORT_CSS}</style></head><body>",
         f"<h1>{e(study.title)}</h1>",
         f"<div class='meta'>{res.n_used} votes used of {res.n_votes} (main pairs of unflagged raters) · "
         f"{len(res.raters)} raters, {len(res.excluded)} excluded · {res.images} images · "
         "Bradley–Terry (evalica) with bootstrap intervals over raters and images</div>",
         "<h2>Ranking</h2><table id='ranking'><thead><tr><th>rank</th><th class='l'>method</th><th>score</th>"
         f"<th>{res.level:.0%} low</th><th>{res.level:.0%} high</th><th>s.e.</th><th>win rate</th></tr></thead><tbody>"]
    k = len(res.methods)
    for r, i in enumerate(order):
        tot_w = sum((res.win_rate[i, j] * res.n_pairs[i, j]) for j in range(k) if j != i and res.n_pairs[i, j])
        tot_n = sum(res.n_pairs[i, j] for j in range(k) if j != i)
        wr = tot_w / tot_n if tot_n else None
        best = " class='best'" if r == 0 else ""
        h.append(f"<tr><td>{r + 1}</td><td class='l'>{e(res.methods[i])}</td><td{best}>{_f(float(res.score[i]))}</td>"
                 f"<td>{_f(float(res.low[i]))}</td><td>{_f(float(res.high[i]))}</td><td>{_f(float(res.se[i]))}</td>"
                 f"<td>{_f(wr)}</td></tr>")
    h.append("</tbody></table>" + _svg(res))
    h.append("<h2>Win rates</h2><div class='meta'>row beats column (ties count half); votes in brackets</div>"
             "<table id='win-rate'><thead><tr><th class='l'></th>")
    h.extend(f"<th>{e(res.methods[j])}</th>" for j in order)
    h.append("</tr></thead><tbody>")
    for i in order:
        h.append(f"<tr><td class='l'>{e(res.methods[i])}</td>")
        for j in order:
            if i == j:
                h.append("<td class='na'>–</td>")
            else:
                n = int(res.n_pairs[i, j])
                h.append(f"<td>{_f(float(res.win_rate[i, j]), 2) if n else '–'} <span class='meta'>({n})</span></td>")
        h.append("</tr>")
    h.append("</tbody></table>")
    ag = res.agreement
    h.append("<h2>Agreement</h2><table id='agreement'><tbody>"
             f"<tr><td class='l'>items rated by two or more raters</td><td>{ag['items_shared']}</td></tr>"
             f"<tr><td class='l'>percent agreement (pairs of raters)</td><td>{_f(ag['percent_agreement'])}</td></tr>"
             f"<tr><td class='l'>Krippendorff's alpha (ordinal)</td><td>{_f(ag['krippendorff_alpha'])}</td></tr>"
             "</tbody></table>")
    h.append("<h2>Raters</h2><table id='raters'><thead><tr><th class='l'>rater</th><th>votes</th><th>gold</th>"
             "<th>repeats agree</th><th>median s</th><th class='l'>flag</th></tr></thead><tbody>")
    for rid, q in sorted(res.raters.items()):
        gold = f"{q['gold_ok']}/{q['gold']}" if q["gold"] else "–"
        rep = f"{q['repeat_ok']}/{q['repeats']}" if q["repeats"] else "–"
        med = _f(q["median_ms"] / 1000, 1) if q["median_ms"] is not None else "–"
        flag = ("excluded: " if rid in res.excluded else "flagged: ") + e(q["why"]) if q["flagged"] else ""
        cls = " class='fail'" if q["flagged"] else ""
        h.append(f"<tr{cls}><td class='l'>{e(q['name'])}</td><td>{q['votes']}</td><td>{gold}</td><td>{rep}</td>"
                 f"<td>{med}</td><td class='l'>{flag}</td></tr>")
    h.append("</tbody></table></body></html>")
    return "".join(h)


def _atomic_write(path: Path, write) -> None:
    buf = io.StringIO(newline="")
    write(buf)
    atomic_write_text(path, buf.getvalue())


def write_results(study: Study, res: StudyResults, out_dir) -> dict:
    """Write ``results.csv`` (ranking), ``win_rate.csv``, ``raters.csv`` and ``results.html``; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    order = res.ranking()
    paths = {}

    def ranking(f):
        w = csv.writer(f)
        w.writerow(["rank", "method", "score", "low", "high", "se", "level"])
        for r, i in enumerate(order):
            w.writerow([r + 1, res.methods[i], f"{res.score[i]:.6f}", f"{res.low[i]:.6f}", f"{res.high[i]:.6f}",
                        f"{res.se[i]:.6f}", res.level])

    def wins(f):
        w = csv.writer(f)
        w.writerow(["method", "opponent", "win_rate", "votes"])
        for i in order:
            for j in order:
                if i != j and res.n_pairs[i, j]:
                    w.writerow([res.methods[i], res.methods[j], f"{res.win_rate[i, j]:.6f}", int(res.n_pairs[i, j])])

    def raters(f):
        w = csv.writer(f)
        w.writerow(["rater", "votes", "gold", "gold_correct", "repeats", "repeats_agree", "median_ms", "flagged",
                    "excluded", "why"])
        for rid, q in sorted(res.raters.items()):
            w.writerow([q["name"], q["votes"], q["gold"], q["gold_ok"], q["repeats"], q["repeat_ok"],
                        "" if q["median_ms"] is None else int(q["median_ms"]), int(q["flagged"]),
                        int(rid in res.excluded), q["why"]])

    for name, fn in (("results.csv", ranking), ("win_rate.csv", wins), ("raters.csv", raters)):
        _atomic_write(out / name, fn)
        paths[name] = out / name
    page = render_html(study, res)
    _atomic_write(out / "results.html", lambda f: f.write(page))
    paths["results.html"] = out / "results.html"
    return paths
