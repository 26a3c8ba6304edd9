"""The results of a study: Bradley–Terry scores with bootstrap confidence intervals over raters and images,
the win-rate matrix, rater quality control and agreement.

Scores are Bradley–Terry log-strengths (natural log; centred to mean 0), fitted by evalica (Newman's
iteration; a tie counts half a win each way), with ``prior`` virtual ties between every two methods so that a
method that never lost (or never won) keeps a finite score.

Intervals: votes are clustered by rater and by image, crossed. Resampling raters and images together (the
"pigeonhole" bootstrap) counts the vote-level noise about three times and over-covers; resampling one factor
misses the other's variance. Following McCullagh (2000) and Owen (2007), realisr runs three bootstraps --
over raters, over images, over votes -- and combines their variances as ``var_raters + var_images -
var_votes`` (never below either one-factor variance), which is about unbiased for crossed random effects and
for independent votes alike; each bootstrap variance is scaled by ``g / (g - 1)`` for its ``g`` clusters (a
cluster bootstrap's variance is short by that factor, which matters with few raters). The interval is
``score ± z * sqrt(var)``.

Quality control: a rater's gold accuracy (the reference must beat its bicubic upscale; a tie is a miss) and
repeat agreement (the same preference, or a tie both times, when a pair comes back). A rater is flagged
under the study's gold threshold, or under its repeat threshold once they answered ``min_repeat_checks``
repeats (an honest rater can flip a close pair once); flagged raters are, by default, left out of the scores.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from .design import Study
from .store import Vote

__all__ = ["fit_bradley_terry", "bootstrap_intervals", "rater_quality", "analyze", "StudyResults",
           "win_matrix", "agreement"]


def _require_evalica():
    from ..errors import require

    return require("evalica", "study")


def _pack(a: np.ndarray, b: np.ndarray, outcome: np.ndarray, k: int):
    """Votes -> index of their unique (a, b, outcome) triple (the fit depends only on these counts)."""
    code = (a * k + b) * 3 + outcome
    uniq, inv = np.unique(code, return_inverse=True)
    ua, rest = np.divmod(uniq, 3 * k)
    ub, uo = np.divmod(rest, 3)
    return ua, ub, uo, inv


class _Fitter:
    """Bradley–Terry fits of one set of votes under many weightings (bootstrap replicates)."""

    def __init__(self, a, b, outcome, k: int, prior: float):
        import pandas as pd

        ev = _require_evalica()
        self.ev = ev
        self.k = k
        ua, ub, uo, self.inv = _pack(np.asarray(a), np.asarray(b), np.asarray(outcome), k)
        pa, pb = np.triu_indices(k, 1)
        self.n_votes = len(self.inv)
        self.prior_w = np.full(len(pa), float(prior))
        self.xs = np.concatenate([ua, pa]).astype(np.int64)
        self.ys = np.concatenate([ub, pb]).astype(np.int64)
        win = {0: ev.Winner.X, 1: ev.Winner.Y, 2: ev.Winner.Draw}
        self.winners = [win[int(o)] for o in uo] + [ev.Winner.Draw] * len(pa)
        self.index = pd.Index(range(k))
        self.n_unique = len(ua)

    def fit(self, vote_weights: Optional[np.ndarray] = None) -> np.ndarray:
        w = (np.ones(self.n_votes) if vote_weights is None else np.asarray(vote_weights, dtype=np.float64))
        counts = np.bincount(self.inv, weights=w, minlength=self.n_unique)
        weights = np.concatenate([counts, self.prior_w])
        res = self.ev.bradley_terry(self.xs, self.ys, self.winners, index=self.index, weights=weights,
                                    tolerance=1e-8, limit=1000)
        s = res.scores.reindex(self.index).to_numpy(dtype=np.float64)
        logs = np.log(np.maximum(s, 1e-300))
        return logs - logs.mean()


def fit_bradley_terry(a: Sequence[int], b: Sequence[int], outcome: Sequence[int], k: int, *,
                      prior: float = 0.25, weights: Optional[np.ndarray] = None) -> np.ndarray:
    """Bradley–Terry log-strengths (centred) of ``k`` methods.

    Args:
        a, b: the two methods of each vote (indices).
        outcome: 0 = ``a`` won, 1 = ``b`` won, 2 = tie.
        prior: virtual ties between every two methods (keeps scores finite).
        weights: per-vote weights (default 1).
    """
    return _Fitter(a, b, outcome, k, prior).fit(weights)


def bootstrap_intervals(a, b, outcome, rater, image, k: int, *, n_boot: int = 200, level: float = 0.95,
                        prior: float = 0.25, seed: int = 0) -> dict:
    """Scores with intervals from bootstraps over raters, images and votes (see the module docstring).

    Returns:
        ``{"score", "se", "low", "high", "var": {"raters", "images", "votes"}}``, arrays of length ``k``.
    """
    from statistics import NormalDist

    f = _Fitter(a, b, outcome, k, prior)
    score = f.fit()
    rng = np.random.default_rng(seed)
    rater = np.asarray(rater)
    image = np.asarray(image)
    var = {}
    for name, groups in (("raters", rater), ("images", image), ("votes", np.arange(len(rater)))):
        uniq, idx = np.unique(groups, return_inverse=True)
        g = len(uniq)
        reps = np.empty((n_boot, k))
        for r in range(n_boot):
            mult = np.bincount(rng.integers(0, g, size=g), minlength=g).astype(np.float64)
            reps[r] = f.fit(mult[idx])
        # g / (g - 1): the bootstrap variance of a mean over g clusters is short by that factor
        var[name] = reps.var(axis=0, ddof=1) * g / (g - 1) if g > 1 else np.zeros(k)
    combined = np.maximum(var["raters"] + var["images"] - var["votes"], np.maximum(var["raters"], var["images"]))
    se = np.sqrt(combined)
    z = NormalDist().inv_cdf(0.5 + level / 2)
    return {"score": score, "se": se, "low": score - z * se, "high": score + z * se, "var": var, "level": level}


def win_matrix(a, b, outcome, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(rate, n)``: ``rate[i, j]`` = share of votes between i and j that i won (ties half), ``n[i, j]`` votes."""
    score = np.zeros((k, k))
    n = np.zeros((k, k))
    for x, y, o in zip(a, b, outcome):
        n[x, y] += 1
        n[y, x] += 1
        sx = 1.0 if o == 0 else (0.0 if o == 1 else 0.5)
        score[x, y] += sx
        score[y, x] += 1.0 - sx
    with np.errstate(invalid="ignore", divide="ignore"):
        rate = np.where(n > 0, score / np.maximum(n, 1), np.nan)
    return rate, n


def _pref(v: Vote) -> tuple:
    """A vote as (unordered pair, preferred method or None for a tie)."""
    pair = tuple(sorted((v.left, v.right)))
    if v.answer == "tie":
        return pair, None
    return pair, v.left if v.answer == "left" else v.right


def rater_quality(votes: list[Vote], study: Study) -> dict:
    """Per rater: votes, gold accuracy, repeat agreement, and whether the rater is flagged (and why)."""
    from .design import HQ

    by_id = {v.assignment: v for v in votes}
    out: dict = {}
    for v in votes:
        q = out.setdefault(v.rater, {"name": v.rater_name, "votes": 0, "gold": 0, "gold_ok": 0, "repeats": 0,
                                     "repeat_ok": 0, "median_ms": None, "_ms": []})
        q["votes"] += 1
        if v.ms is not None:
            q["_ms"].append(v.ms)
        if v.kind == "gold":
            q["gold"] += 1
            won = v.left if v.answer == "left" else (v.right if v.answer == "right" else None)
            q["gold_ok"] += int(won == HQ)
        elif v.kind == "repeat" and v.repeats in by_id:
            q["repeats"] += 1
            q["repeat_ok"] += int(_pref(v)[1] == _pref(by_id[v.repeats])[1])
    min_gold = float(study.qc.get("min_gold_accuracy", 0.75))
    min_rep = float(study.qc.get("min_repeat_agreement", 0.6))
    min_rep_n = int(study.qc.get("min_repeat_checks", 3))  # an honest rater may flip one close pair
    for q in out.values():
        ms = q.pop("_ms")
        q["median_ms"] = float(np.median(ms)) if ms else None
        q["gold_accuracy"] = q["gold_ok"] / q["gold"] if q["gold"] else None
        q["repeat_agreement"] = q["repeat_ok"] / q["repeats"] if q["repeats"] else None
        why = []
        if q["gold_accuracy"] is not None and q["gold_accuracy"] < min_gold:
            why.append(f"gold {q['gold_ok']}/{q['gold']} < {min_gold:.0%}")
        if q["repeats"] >= min_rep_n and q["repeat_agreement"] < min_rep:
            why.append(f"repeats {q['repeat_ok']}/{q['repeats']} < {min_rep:.0%}")
        q["flagged"] = bool(why)
        q["why"] = "; ".join(why)
    return out


def agreement(votes: list[Vote]) -> dict:
    """Between raters on the same item (image and pair; each rater's first answer): pairwise percent
    agreement and Krippendorff's alpha (ordinal: first method better / tie / second better), by evalica."""
    import pandas as pd

    first: dict = {}
    for v in votes:
        if v.kind != "main":
            continue
        pair, pref = _pref(v)
        code = 0 if pref is None else (-1 if pref == pair[0] else 1)
        first.setdefault((v.image, pair), {}).setdefault(v.rater, code)
    shared = {k: r for k, r in first.items() if len(r) >= 2}
    agree = total = 0
    for r in shared.values():
        codes = list(r.values())
        for i in range(len(codes)):
            for j in range(i + 1, len(codes)):
                total += 1
                agree += int(codes[i] == codes[j])
    out = {"items_shared": len(shared), "pairs_of_raters": total,
           "percent_agreement": agree / total if total else None, "krippendorff_alpha": None}
    if shared:
        raters = sorted({r for m in shared.values() for r in m})
        units = list(shared)
        table = pd.DataFrame(np.nan, index=raters, columns=range(len(units)))
        for j, u in enumerate(units):
            for r, c in shared[u].items():
                table.loc[r, j] = c
        try:
            a = _require_evalica().alpha(table, distance="ordinal")
            out["krippendorff_alpha"] = float(a.alpha)
        except Exception:  # noqa: BLE001 - alpha is undefined when every answer is the same
            out["krippendorff_alpha"] = None
    return out


@dataclass
class StudyResults:
    methods: list  # labels, in index order
    score: np.ndarray
    se: np.ndarray
    low: np.ndarray
    high: np.ndarray
    level: float
    win_rate: np.ndarray
    n_pairs: np.ndarray
    raters: dict
    agreement: dict
    n_votes: int
    n_used: int
    excluded: list = field(default_factory=list)
    images: int = 0

    def ranking(self) -> list[int]:
        return sorted(range(len(self.methods)), key=lambda i: -self.score[i])


def analyze(study: Study, votes: list[Vote], *, include_flagged: bool = False, n_boot: int = 200,
            level: float = 0.95, prior: float = 0.25, seed: int = 0) -> StudyResults:
    """Scores, intervals, win rates, quality control and agreement of a study's votes.

    Main votes of unflagged raters enter the scores (repeats and gold pairs are quality checks only).

    Raises:
        StudyError: no usable votes.
    """
    from .design import StudyError

    ids = sorted(study.methods)
    pos = {m: i for i, m in enumerate(ids)}
    quality = rater_quality(votes, study)
    excluded = [] if include_flagged else sorted(r for r, q in quality.items() if q["flagged"])
    used = [v for v in votes if v.kind == "main" and v.rater not in excluded]
    if not used:
        raise StudyError("no votes to analyse yet" + (" (every rater is flagged: --include-flagged keeps them)"
                                                       if votes and excluded else ""))
    a = np.array([pos[v.left] for v in used])
    b = np.array([pos[v.right] for v in used])
    o = np.array([0 if v.answer == "left" else 1 if v.answer == "right" else 2 for v in used])
    rater = np.array([v.rater for v in used])
    image = np.array([int(v.image[1:]) if v.image[1:].isdigit() else hash(v.image) for v in used])
    ci = bootstrap_intervals(a, b, o, rater, image, len(ids), n_boot=n_boot, level=level, prior=prior, seed=seed)
    rate, n = win_matrix(a, b, o, len(ids))
    return StudyResults(methods=[study.methods[m] for m in ids], score=ci["score"], se=ci["se"], low=ci["low"],
                        high=ci["high"], level=level, win_rate=rate, n_pairs=n, raters=quality,
                        agreement=agreement(votes), n_votes=len(votes), n_used=len(used), excluded=excluded,
                        images=len({v.image for v in used}))
