"""`realisr study` without a browser: rater sequences, the vote store, quality control, and the Bradley–Terry
results on synthetic votes drawn from known strengths (order recovered, intervals cover the truth at about
their nominal rate)."""

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("evalica", reason="pip install 'realisr[study]'")

from realisr.cli.main import main  # noqa: E402
from realisr.study.analysis import bootstrap_intervals, fit_bradley_terry  # noqa: E402
from realisr.study.design import BICUBIC, HQ, StudyError, create_study, load_study, make_plan  # noqa: E402
from realisr.study.store import VoteStore  # noqa: E402

TRUTH = np.array([-0.6, -0.2, 0.1, 0.7])  # log-strengths, centred


def _simulate(rng, truth, raters: int, images: int):
    """Every rater votes once on every pair of methods on every image, sides at random, BT outcomes."""
    k = len(truth)
    pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
    rows = []
    for r in range(raters):
        for m in range(images):
            for i, j in pairs:
                x, y = (i, j) if rng.random() < 0.5 else (j, i)
                p = 1.0 / (1.0 + np.exp(-(truth[x] - truth[y])))
                rows.append((x, y, 0 if rng.random() < p else 1, r, m))
    return [np.array(c) for c in zip(*rows)]


def test_intervals_cover_the_truth_at_about_their_nominal_rate():
    truth = TRUTH - TRUTH.mean()
    covered = total = right = 0
    widths = []
    studies = 24
    for s in range(studies):
        a, b, o, r, m = _simulate(np.random.default_rng(100 + s), truth, raters=8, images=10)
        ci = bootstrap_intervals(a, b, o, r, m, len(truth), n_boot=100, level=0.9, seed=s)
        covered += int(((ci["low"] <= truth) & (truth <= ci["high"])).sum())
        total += len(truth)
        right += int(np.array_equal(np.argsort(ci["score"]), np.argsort(truth)))
        widths.append(float(np.mean(ci["high"] - ci["low"])))
    rate = covered / total
    # nominal 0.9; 96 (correlated) events: a band that an interval of the wrong width cannot hit
    # (resampling raters and images together would cover ~0.99; a vote bootstrap with 8 raters ~0.85 or less)
    assert 0.8 <= rate <= 0.97, rate
    assert right >= 0.8 * studies  # 480 votes per study, neighbours 0.3-0.6 apart
    # the width shrinks as 1/sqrt(votes): 4x the raters, half the width
    a, b, o, r, m = _simulate(np.random.default_rng(7), truth, raters=32, images=10)
    big = bootstrap_intervals(a, b, o, r, m, len(truth), n_boot=100, level=0.9, seed=1)
    assert 0.35 < float(np.mean(big["high"] - big["low"])) / np.mean(widths) < 0.7
    assert np.array_equal(np.argsort(big["score"]), np.argsort(truth))  # 1920 votes: the order is right


def test_fit_recovers_strengths_and_ties_count_half():
    rng = np.random.default_rng(0)
    a, b, o, _r, _m = _simulate(rng, TRUTH, raters=60, images=10)
    s = fit_bradley_terry(a, b, o, 4, prior=0.0)
    assert np.abs(s - (TRUTH - TRUTH.mean())).max() < 0.15  # 3600 votes: s.e. about 0.02-0.05
    # only ties: equal scores; a method that never loses stays finite (the prior)
    ties = fit_bradley_terry([0, 1, 2], [1, 2, 0], [2, 2, 2], 3)
    assert np.allclose(ties, 0, atol=1e-6)
    never_lost = fit_bradley_terry([0] * 5, [1] * 5, [0] * 5, 3)
    assert np.isfinite(never_lost).all() and never_lost[0] > never_lost[1]


def _tiny_study(tmp_path: Path, n_methods=3, n_images=4, **kw):
    from PIL import Image

    rng = np.random.default_rng(0)
    folders = {}
    for k in range(n_methods):
        f = tmp_path / f"method{k}"
        f.mkdir()
        folders[f"method{k}"] = f
    lq, hq = tmp_path / "lq", tmp_path / "hq"
    lq.mkdir()
    hq.mkdir()
    for i in range(n_images):
        for f in folders.values():
            Image.fromarray((rng.random((16, 16, 3)) * 255).astype(np.uint8)).save(f / f"img{i}.png")
        Image.fromarray((rng.random((16, 16, 3)) * 255).astype(np.uint8)).save(hq / f"img{i}_HR.png")
        Image.fromarray((rng.random((4, 4, 3)) * 255).astype(np.uint8)).save(lq / f"img{i}x4.png")
    return create_study(tmp_path / "study", methods=folders, lq=lq, hq=hq, **kw)


def test_rater_sequences_are_randomised_balanced_and_checked(tmp_path):
    study, token = _tiny_study(tmp_path, per_rater=None, repeat_rate=0.1, gold_rate=0.1, seed=5)
    assert len(study.items()) == 4 * 3 and study.gold_images() == sorted(study.images)  # names paired (x4, _HR)
    assert study.check_admin(token) and not study.check_admin("nope")
    assert token not in (study.root / "study.json").read_text()  # only its hash is stored
    plans = [make_plan(study, r, {}) for r in (1, 2, 3)]
    for plan in plans:
        main = [p for p in plan if p[3] == "main"]
        assert sorted((im, *sorted((le, ri))) for im, le, ri, _, _ in main) == sorted(study.items())
        reps = [(pos, p) for pos, p in enumerate(plan) if p[3] == "repeat"]
        assert len(reps) == 1
        pos, (im, le, ri, _, orig) = reps[0]
        assert pos >= orig + 2 and plan[orig][3] == "main" and plan[orig][0] == im
        assert {le, ri} == {plan[orig][1], plan[orig][2]}
        golds = [p for p in plan if p[3] == "gold"]
        assert len(golds) == 1 and {golds[0][1], golds[0][2]} == {HQ, BICUBIC}
    orders = [[(p[0], p[1], p[2]) for p in plan if p[3] == "main"] for plan in plans]
    assert orders[0] != orders[1] != orders[2]  # order and sides differ per rater
    lefts = {p[1] for plan in plans for p in plan if p[3] == "main"}
    assert lefts == set(study.methods)  # every method appears on the left somewhere
    # balancing: with 5 items per rater, the next rater gets the items given least so far
    study.per_rater = 5
    counts = {}
    for r in range(12):
        for im, le, ri, kind, _ in make_plan(study, r, counts):
            if kind == "main":
                key = (im, *sorted((le, ri)))
                counts[key] = counts.get(key, 0) + 1
    assert max(counts.values()) - min(counts.values()) <= 1 and len(counts) == 12


def test_vote_store_is_idempotent_and_per_rater(tmp_path):
    study, _ = _tiny_study(tmp_path)
    store = VoteStore(study.db_path)
    r1, t1 = store.add_rater("ann", lambda rid, c: make_plan(study, rid, c))
    r2, _t2 = store.add_rater("bob", lambda rid, c: make_plan(study, rid, c))
    assert store.rater(t1) == (r1, "ann") and store.rater("forged") is None
    a = store.next_assignment(r1)
    assert store.record_vote(r1, a.id, "left", 900) is True
    assert store.record_vote(r1, a.id, "right", 100) is False  # a retried request is not a second vote
    with pytest.raises(ValueError):
        store.record_vote(r2, a.id, "left")  # not bob's
    with pytest.raises(ValueError):
        store.record_vote(r1, store.next_assignment(r1).id, "maybe")
    assert store.next_assignment(r1).seq == a.seq + 1
    store.close()
    again = VoteStore(study.db_path)  # a new process sees the same votes
    assert [(v.answer, v.ms) for v in again.votes()] == [("left", 900)]
    assert again.progress(r1)[0] == 1


def test_results_from_known_strengths_through_the_cli(tmp_path, capsys):
    """Raters vote (through the store, as the server does) from known strengths; one careless rater fails the
    gold pairs and is excluded; `realisr study results` recovers the order and covers the truth."""
    study, _ = _tiny_study(tmp_path, n_methods=3, n_images=6, seed=1)
    truth = {"method0": 0.8, "method1": 0.0, "method2": -0.8}
    store = VoteStore(study.db_path)
    rng = np.random.default_rng(3)
    for r in range(10):
        careless = r == 9
        rid, _ = store.add_rater(f"rater{r}", lambda i, c: make_plan(study, i, c))
        while (a := store.next_assignment(rid)) is not None:
            if a.kind == "gold":
                ans = ("right" if a.left == HQ else "left") if careless else ("left" if a.left == HQ else "right")
            else:
                lv, rv = truth[study.methods[a.left]], truth[study.methods[a.right]]
                p = 1 / (1 + np.exp(-(lv - rv)))
                ans = "left" if (rng.random() < p) != careless else "right"
            store.record_vote(rid, a.id, ans)
    out = tmp_path / "res"
    assert main(["study", "results", str(study.root), "-o", str(out), "--bootstrap", "200", "--level", "0.9"]) == 0
    printed = capsys.readouterr().out
    assert "flagged raters (excluded): rater9" in printed
    rows = [r.split(",") for r in (out / "results.csv").read_text().splitlines()[1:]]
    assert [r[1] for r in rows] == ["method0", "method1", "method2"]
    centred = {k: v - np.mean(list(truth.values())) for k, v in truth.items()}
    for r in rows:
        assert float(r[3]) <= centred[r[1]] <= float(r[4]), r  # low <= truth <= high
    html = (out / "results.html").read_text()
    assert "id='ranking'" in html and "id='win-rate'" in html and "Krippendorff" in html and 'id="scores-plot"' in html
    wins = (out / "win_rate.csv").read_text()
    assert wins.startswith("method,opponent,win_rate,votes")


def test_create_refuses_bad_inputs(tmp_path):
    a = tmp_path / "a"
    a.mkdir()
    with pytest.raises(StudyError, match="at least two methods"):
        create_study(tmp_path / "s", methods={"a": a})
    b = tmp_path / "b"
    b.mkdir()
    from PIL import Image

    Image.new("RGB", (4, 4)).save(a / "x.png")
    Image.new("RGB", (4, 4)).save(b / "y.png")
    with pytest.raises(StudyError, match="no image name is common"):
        create_study(tmp_path / "s", methods={"a": a, "b": b})
    with pytest.raises(StudyError, match="not a study folder"):
        load_study(tmp_path)
    assert main(["study", "results", str(tmp_path)]) == 1  # one line, no traceback


def test_create_from_a_bench_output_folder(tmp_path, capsys):
    """`realisr bench` on two models, then a study of its outputs (methods = its settings, LQ/HQ from its
    summary, so gold pairs come with it)."""
    from PIL import Image

    lq, hq = tmp_path / "lq", tmp_path / "hq"
    lq.mkdir()
    hq.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        big = (rng.random((32, 32, 3)) * 255).astype(np.uint8)
        Image.fromarray(big).save(hq / f"p{i}.png")
        Image.fromarray(big).resize((8, 8), Image.BICUBIC).save(lq / f"p{i}.png")
    report = tmp_path / "report"
    assert main(["bench", "-q", "--lq", str(lq), "--hq", str(hq), "-m", "bicubic", "-m", "lanczos", "--metrics",
                 "psnr", "-o", str(report), "--no-report"]) == 0
    assert main(["study", "create", "--bench", str(report), "-o", str(tmp_path / "study")]) == 0
    assert "admin token" in capsys.readouterr().out
    s = load_study(tmp_path / "study")
    assert sorted(s.methods.values()) == ["bicubic", "lanczos"] and len(s.images) == 2
    assert len(s.gold_images()) == 2 and all(im["lq"] for im in s.images.values())
