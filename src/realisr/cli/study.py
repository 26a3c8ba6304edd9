"""``realisr study create | serve | results``: blind pairwise user studies (``pip install "realisr[study]"``).

    realisr study create --bench report/ -o study/               # from a `realisr bench` output folder
    realisr study create -M pisa=out/pisa -M osediff=out/osediff --lq lq/ --hq hq/ -o study/
    realisr study serve study/                                   # raters open http://127.0.0.1:8765/
    realisr study results study/ -o results/                     # CSV + HTML (Bradley-Terry, intervals)
"""

from __future__ import annotations

import sys
from pathlib import Path


def add_arguments(p) -> None:
    from .main import common_options

    sub = p.add_subparsers(dest="action", metavar="ACTION")
    c = sub.add_parser("create", help="make a study folder from bench outputs or method folders",
                       parents=[common_options()])
    c.add_argument("-o", "--out", required=True, type=Path, metavar="DIR", help="the study folder to create")
    c.add_argument("--bench", type=Path, default=None, metavar="DIR", help="a `realisr bench` output folder")
    c.add_argument("-M", "--method", action="append", default=[], metavar="NAME=DIR",
                   help="a method's outputs (repeatable), paired with the others by file name")
    c.add_argument("--lq", type=Path, default=None, help="the inputs (raters can show them on demand)")
    c.add_argument("--hq", type=Path, default=None, help="references: gold pairs (reference vs bicubic)")
    c.add_argument("--title", default="", help="shown to raters")
    c.add_argument("--per-rater", type=int, default=None, help="main pairs per rater (default: all)")
    c.add_argument("--repeat-rate", type=float, default=0.07, help="share of repeated pairs (default 0.07)")
    c.add_argument("--gold-rate", type=float, default=0.07, help="share of gold pairs (default 0.07)")
    c.add_argument("--min-gold", type=float, default=0.75, help="flag raters under this gold accuracy")
    c.add_argument("--min-repeat", type=float, default=0.6, help="flag raters under this repeat agreement")
    c.add_argument("--min-repeat-checks", type=int, default=3,
                   help="repeats a rater must have answered before their repeat agreement can flag them")
    c.add_argument("--seed", type=int, default=0)
    s = sub.add_parser("serve", help="run the rating server", parents=[common_options()])
    s.add_argument("study", type=Path)
    s.add_argument("--host", default="127.0.0.1",
                   help="interface to bind (default 127.0.0.1; 0.0.0.0 lets raters on the network in)")
    s.add_argument("--port", type=int, default=8765)
    s.add_argument("--bootstrap", type=int, default=200, help="bootstrap replicates of the results page")
    r = sub.add_parser("results", help="Bradley-Terry scores, intervals, win rates, agreement (CSV + HTML)",
                       parents=[common_options()])
    r.add_argument("study", type=Path)
    r.add_argument("-o", "--out", type=Path, default=None, help="output folder (default: STUDY/results)")
    r.add_argument("--include-flagged", action="store_true", help="keep raters who failed quality control")
    r.add_argument("--bootstrap", type=int, default=1000, help="bootstrap replicates per factor (default 1000)")
    r.add_argument("--level", type=float, default=0.95, help="interval level (default 0.95)")
    r.add_argument("--seed", type=int, default=0)


def _methods(specs: list[str]) -> dict:
    from realisr.study.design import StudyError

    out = {}
    for spec in specs:
        name, sep, folder = spec.partition("=")
        if not sep or not name or not folder:
            raise StudyError(f"-M {spec!r}: use NAME=FOLDER")
        out[name] = Path(folder)
    return out


def run(args) -> int:
    action = getattr(args, "action", None)
    if action not in ("create", "serve", "results"):
        print("usage: realisr study {create,serve,results} ... (see realisr study -h)", file=sys.stderr)
        return 2
    if action == "create":
        from realisr.study.design import create_study

        study, token = create_study(args.out, bench=args.bench, methods=_methods(args.method), lq=args.lq,
                                    hq=args.hq, title=args.title, per_rater=args.per_rater,
                                    repeat_rate=args.repeat_rate, gold_rate=args.gold_rate, seed=args.seed,
                                    min_gold_accuracy=args.min_gold, min_repeat_agreement=args.min_repeat,
                                    min_repeat_checks=args.min_repeat_checks)
        golds = len(study.gold_images())
        print(f"study: {len(study.methods)} methods, {len(study.images)} images, {len(study.items())} pairs, "
              f"gold pairs on {golds} image(s) -> {study.root}")
        print(f"admin token (for the results page; shown only now): {token}")
        return 0
    if action == "serve":
        from realisr.errors import require

        require("fastapi", "study")
        require("uvicorn", "study")
        from realisr.study.server import serve

        if args.host not in ("127.0.0.1", "localhost", "::1"):
            print(f"realisr study: binding {args.host}: raters on other machines can reach it", file=sys.stderr)
        print(f"realisr study: raters open http://{args.host}:{args.port}/ ; results at "
              f"/results?token=ADMIN_TOKEN (Ctrl+C stops)", file=sys.stderr)
        serve(args.study, host=args.host, port=args.port, n_boot=args.bootstrap)
        return 0
    from realisr.study.analysis import analyze
    from realisr.study.design import load_study
    from realisr.study.report import write_results
    from realisr.study.store import VoteStore

    study = load_study(args.study)
    store = VoteStore(study.db_path)
    res = analyze(study, store.votes(), include_flagged=args.include_flagged, n_boot=args.bootstrap,
                  level=args.level, seed=args.seed)
    paths = write_results(study, res, args.out or study.root / "results")
    for r, i in enumerate(res.ranking()):
        print(f"{r + 1}. {res.methods[i]}  {res.score[i]:+.3f}  [{res.low[i]:+.3f}, {res.high[i]:+.3f}]")
    flagged = [q["name"] for q in res.raters.values() if q["flagged"]]
    if flagged:
        print(f"flagged raters ({'kept' if args.include_flagged else 'excluded'}): {', '.join(flagged)}")
    print(f"{res.n_used} votes used of {res.n_votes} -> {paths['results.html'].parent}")
    return 0
