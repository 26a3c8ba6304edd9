"""The web server of a study (FastAPI + uvicorn; ``pip install "realisr[study]"``).

Rater pages show two anonymous images, A and B, and never a method name, a file name or a result: images are
served per assignment (``/img/<rater token>/<assignment>/a``). A rater joins with a name, gets a private link
(also kept in a cookie) and can come back to it at any time; the page keeps unsent votes in the browser's
local storage and retries until the server acknowledges them, so a restart loses nothing. The results page
needs the study's admin token.
"""

from __future__ import annotations

import html
import json
import logging
import threading
from pathlib import Path
from typing import Optional

from ..errors import MissingExtraError
from .design import BICUBIC, HQ, Study, load_study, make_plan
from .store import VoteStore

try:  # the rating server (imported only by `realisr study serve` and tests)
    import fastapi
    from fastapi import Request
    from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
except ImportError as e:  # pragma: no cover - depends on the environment
    raise MissingExtraError("study", "fastapi") from e

logger = logging.getLogger(__name__)

__all__ = ["build_app", "serve"]

_COOKIE = "realisr_rater"
_STATIC = Path(__file__).with_name("static")


def _page(name: str) -> str:
    return (_STATIC / name).read_text(encoding="utf-8")


def build_app(study: Study, *, store: Optional[VoteStore] = None, n_boot: int = 200):
    """The FastAPI app of ``study`` (votes in ``study.db_path``)."""
    store = store or VoteStore(study.db_path)
    app = fastapi.FastAPI(title="realisr study", docs_url=None, redoc_url=None, openapi_url=None)
    join_lock = threading.Lock()
    title = html.escape(study.title)

    def rater_of(token: str):
        r = store.rater(token)
        if r is None:
            raise fastapi.HTTPException(status_code=404, detail="unknown rater link: join again from the start page")
        return r

    @app.get("/", response_class=HTMLResponse)
    def start(request: Request):
        token = request.cookies.get(_COOKIE)
        if token and store.rater(token):
            return RedirectResponse(f"/r/{token}", status_code=303)
        return _page("join.html").replace("{{title}}", title)

    @app.post("/join")
    async def join(request: Request):
        form = await request.body()
        from urllib.parse import parse_qs

        name = (parse_qs(form.decode("utf-8", "replace")).get("name") or [""])[0].strip()[:60]
        if not name:
            return HTMLResponse(_page("join.html").replace("{{title}}", title), status_code=400)
        with join_lock:  # sequences are balanced against the ones handed out before
            _rid, token = store.add_rater(name, lambda rid, counts: make_plan(study, rid, counts))
        resp = RedirectResponse(f"/r/{token}", status_code=303)
        resp.set_cookie(_COOKIE, token, max_age=90 * 24 * 3600, httponly=True, samesite="lax")
        return resp

    @app.get("/r/{token}", response_class=HTMLResponse)
    def rate(token: str):
        rater_of(token)
        return _page("rate.html").replace("{{title}}", title)

    @app.get("/api/r/{token}/next")
    def next_pair(token: str):
        rid, _name = rater_of(token)
        done, total = store.progress(rid)
        a = store.next_assignment(rid)
        if a is None:
            return {"done": True, "progress": [done, total]}
        im = study.images[a.image]
        base = f"/img/{token}/{a.id}"
        return {"done": False, "progress": [done, total],
                "assignment": {"id": a.id, "a": f"{base}/a", "b": f"{base}/b",
                               "lq": f"{base}/lq" if im.get("lq") else None}}

    @app.post("/api/r/{token}/vote")
    async def vote(token: str, request: Request):
        rid, _name = rater_of(token)
        try:
            body = json.loads(await request.body())
            aid = int(body["assignment"])
            answer = {"a": "left", "b": "right", "tie": "tie"}[body["answer"]]
            ms = body.get("ms")
            ms = int(ms) if isinstance(ms, (int, float)) and 0 <= ms < 3.6e7 else None
        except (ValueError, KeyError, TypeError):
            return JSONResponse({"error": "send {assignment, answer: a|b|tie, ms}"}, status_code=400)
        try:
            new = store.record_vote(rid, aid, answer, ms)
        except ValueError as e:
            return JSONResponse({"error": str(e)}, status_code=400)
        return {"ok": True, "new": new}

    @app.get("/img/{token}/{aid}/{which}")
    def image(token: str, aid: int, which: str):
        rid, _name = rater_of(token)
        a = store.assignment(rid, aid)
        if a is None or which not in ("a", "b", "lq"):
            raise fastapi.HTTPException(status_code=404)
        im = study.images[a.image]
        if which == "lq":
            rel = im.get("lq")
        else:
            m = a.left if which == "a" else a.right
            rel = im["hq"] if m == HQ else im["bicubic"] if m == BICUBIC else im["outputs"][m]
        if not rel:
            raise fastapi.HTTPException(status_code=404)
        return FileResponse(study.path(rel), media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})

    def _admin(token: Optional[str]):
        if not study.check_admin(token):
            raise fastapi.HTTPException(status_code=403, detail="the results need the study's admin token (?token=)")

    @app.get("/results", response_class=HTMLResponse)
    def results(token: Optional[str] = None, include_flagged: bool = False):
        _admin(token)
        from .analysis import analyze
        from .design import StudyError
        from .report import render_html

        try:
            res = analyze(study, store.votes(), include_flagged=include_flagged, n_boot=n_boot)
        except StudyError as e:
            return HTMLResponse(f"<!doctype html><p>{html.escape(str(e))}</p>", status_code=200)
        return render_html(study, res)

    @app.get("/results.json")
    def results_json(token: Optional[str] = None, include_flagged: bool = False):
        _admin(token)
        from .analysis import analyze
        from .report import results_json as to_json

        return to_json(analyze(study, store.votes(), include_flagged=include_flagged, n_boot=n_boot))

    @app.get("/favicon.ico")
    def favicon():
        return Response(status_code=204)

    app.state.store = store
    return app


def serve(study_dir, *, host: str = "127.0.0.1", port: int = 8765, n_boot: int = 200) -> None:
    """Run the study's server until interrupted."""
    from ..errors import require

    uvicorn = require("uvicorn", "study")
    study = load_study(study_dir)
    app = build_app(study, n_boot=n_boot)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
