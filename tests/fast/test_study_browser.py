"""`realisr study` in a real browser: two simulated raters vote through the rating pages with the keyboard,
the server (a `realisr study serve` process) is killed and restarted mid-study, and no vote is lost; rater
pages never show a method or file name; the results need the admin token; the careless rater is flagged."""

import hashlib
import json
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="pip install 'realisr[study]'")
pytest.importorskip("uvicorn", reason="pip install 'realisr[study]'")
pytest.importorskip("evalica", reason="pip install 'realisr[study]'")

from helpers.browser import browser, free_port, wait_http, wait_until  # noqa: E402

from realisr.cli.main import main  # noqa: E402
from realisr.study.design import load_study  # noqa: E402
from realisr.study.store import VoteStore  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
T = 60_000
QUALITY = {"alpha-net": 3, "beta-gan": 2, "gamma-bicubic": 1}  # the truth the good rater sees


def _make_method_folders(root: Path):
    """Three 'methods' on three real photo crops (scikit-image), plus LQ and HQ, as `realisr bench` users have."""
    import skimage.data
    from PIL import Image, ImageFilter

    photos = {"astronaut": skimage.data.astronaut(), "coffee": skimage.data.coffee(), "chelsea": skimage.data.chelsea()}
    folders = {k: root / k for k in (*QUALITY, "lq", "hq")}
    for f in folders.values():
        f.mkdir(parents=True)
    for name, arr in photos.items():
        hq = Image.fromarray(arr[100:164, 100:164])
        lq = hq.resize((16, 16), Image.BICUBIC)
        hq.save(folders["hq"] / f"{name}.png")
        lq.save(folders["lq"] / f"{name}.png")
        hq.filter(ImageFilter.GaussianBlur(0.6)).save(folders["alpha-net"] / f"{name}.png")
        hq.filter(ImageFilter.GaussianBlur(1.6)).save(folders["beta-gan"] / f"{name}.png")
        lq.resize((64, 64), Image.NEAREST).save(folders["gamma-bicubic"] / f"{name}.png")
    return folders


class StudyServer:
    def __init__(self, study: Path, port: int, log: Path):
        self.study, self.port, self.log = study, port, log
        self.proc = None

    def start(self):
        env = dict(os.environ, PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen([sys.executable, "-m", "realisr", "study", "serve", str(self.study),
                                      "--port", str(self.port), "--bootstrap", "50"],
                                     stdout=self.log.open("a"), stderr=subprocess.STDOUT, env=env)
        wait_http(f"http://127.0.0.1:{self.port}/favicon.ico", proc=self.proc)

    def kill(self):
        self.proc.kill()  # SIGKILL: no shutdown handler runs
        self.proc.wait(timeout=30)

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


class Rater:
    """A simulated rater in their own browser context: answers by the true quality (good) or against it
    (careless), learning which image is which by comparing the bytes the page loaded with the study files."""

    def __init__(self, chrome, url: str, name: str, study: Path, good: bool, seen: list):
        self.ctx = chrome.new_context(viewport={"width": 1200, "height": 800})
        self.page = self.ctx.new_page()
        self.page.set_default_timeout(T)
        self.page.on("response", self._response)
        self.seen, self.good, self.url, self.name = seen, good, url, name
        self.study = load_study(study)
        self.by_hash = {}
        for iid, im in self.study.images.items():
            for mid, rel in im["outputs"].items():
                self.by_hash[self._hash((study / rel).read_bytes())] = self.study.methods[mid]
            self.by_hash[self._hash((study / im["hq"]).read_bytes())] = "reference"
            self.by_hash[self._hash((study / im["bicubic"]).read_bytes())] = "bicubic"
        self.answers = {}  # assignment id -> answer pressed

    @staticmethod
    def _hash(b: bytes) -> str:
        return hashlib.sha256(b).hexdigest()

    def _response(self, resp):
        try:
            ctype = resp.headers.get("content-type", "")
            if "json" in ctype or "html" in ctype or "javascript" in ctype:
                self.seen.append(resp.text())
        except Exception:  # noqa: BLE001 - a response of a closed page
            pass

    def join(self):
        self.page.goto(self.url)
        self.page.fill("#name", self.name)
        self.page.click("#start")
        self.page.wait_for_function("document.body.dataset.state === 'ready'", timeout=T)
        return self.page.url

    def _label(self, side: str) -> str:
        src = self.page.eval_on_selector(f"#img-{side}", "e => e.src")
        body = self.page.request.get(src).body()
        return self.by_hash[self._hash(body)]

    def decide(self) -> tuple[str, str]:
        """The key this rater presses for the pair on screen (asks the server for the image bytes)."""
        aid = self.page.evaluate("document.body.dataset.assignment")
        a, b = self._label("a"), self._label("b")
        rank = dict(QUALITY, reference=10, bicubic=0)
        better_a = rank[a] > rank[b]
        return aid, ("1" if better_a else "2") if self.good else ("2" if better_a else "1")

    def vote(self, wait: bool = True, decided=None) -> str:
        aid, key = decided or self.decide()
        self.answers[int(aid)] = {"1": "left", "2": "right"}[key]
        self.page.keyboard.press(key)
        if wait:
            self.page.wait_for_function(
                f"document.body.dataset.assignment !== '{aid}' && "
                "['ready', 'done'].includes(document.body.dataset.state)", timeout=T)
        return aid

    def finish(self):
        while self.page.evaluate("document.body.dataset.state") != "done":
            self.vote()


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, ""


def test_two_raters_vote_through_the_browser_and_a_killed_server_loses_nothing(tmp_path):
    folders = _make_method_folders(tmp_path / "data")
    study = tmp_path / "study"
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["study", "create", "-o", str(study), "--lq", str(folders["lq"]), "--hq", str(folders["hq"]),
                     "--seed", "3", *sum((["-M", f"{k}={folders[k]}"] for k in QUALITY), [])]) == 0
    token = re.search(r"admin token.*: (\S+)", buf.getvalue()).group(1)
    s = load_study(study)
    assert len(s.items()) == 9 and len(s.gold_images()) == 3
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    server = StudyServer(study, port, tmp_path / "server.log")
    server.start()
    seen: list = []
    try:
        with browser() as chrome:
            ann = Rater(chrome, url, "ann", study, good=True, seen=seen)
            bob = Rater(chrome, url, "bob", study, good=False, seen=seen)
            ann.join()
            bob_link = bob.join()
            for _ in range(3):
                ann.vote()
            for _ in range(2):
                bob.vote()
            assert ann.page.evaluate("document.body.dataset.done") == "3"

            decided = ann.decide()
            server.kill()
            lost = ann.vote(wait=False, decided=decided)  # answered while the server is down: kept, retried
            ann.page.wait_for_function("document.body.dataset.state === 'offline'", timeout=T)
            assert VoteStore(study / "votes.sqlite").count_votes() == 5
            server.start()
            ann.page.wait_for_function(f"document.body.dataset.assignment !== '{lost}' && "
                                       "document.body.dataset.state === 'ready'", timeout=T)
            bob.page.goto(bob_link)  # a rater comes back to their link: resumes where they were
            bob.page.wait_for_function("document.body.dataset.state === 'ready'", timeout=T)
            assert bob.page.evaluate("document.body.dataset.done") == "2"
            # the zoom is shared by both images (wheel on A zooms B too)
            box = bob.page.locator("#pane-a").bounding_box()
            bob.page.mouse.move(box["x"] + 50, box["y"] + 50)
            bob.page.mouse.wheel(0, -400)
            wait_until(lambda: float(bob.page.evaluate("document.body.dataset.zoom")) > 1.0, what="a zoom")
            assert bob.page.eval_on_selector("#img-a", "e => e.style.transform") == \
                bob.page.eval_on_selector("#img-b", "e => e.style.transform")
            bob.page.keyboard.press("l")  # the input on demand
            wait_until(lambda: bob.page.eval_on_selector("#img-a", "e => e.src").endswith("/lq"),
                       what="the input shown")
            bob.page.keyboard.press("l")
            bob.page.keyboard.press("f")  # flicker: one pane alternating A and B
            shown = set()
            wait_until(lambda: shown.add(bob.page.eval_on_selector("#img-a", "e => e.src")[-2:]) or
                       {"/a", "/b"} <= shown, timeout=10, interval=0.1, what="A and B alternating")
            assert not bob.page.is_visible("#pane-b")
            bob.page.keyboard.press("f")
            assert bob.page.is_visible("#pane-b")
            ann.finish()
            bob.finish()
    finally:
        server.stop()

    store = VoteStore(study / "votes.sqlite")
    votes = store.votes()
    expected = {**ann.answers, **bob.answers}
    assert {v.assignment: v.answer for v in votes} == expected  # every vote, once, as pressed
    per_rater = {}
    for v in votes:
        per_rater.setdefault(v.rater_name, []).append(v)
    assert {k: len(v) for k, v in per_rater.items()} == {"ann": len(ann.answers), "bob": len(bob.answers)}
    assert len(ann.answers) == 9 + 1 + 1  # 9 pairs, 1 repeat, 1 gold (7% rounded, at least one each)
    assert {v.kind for v in per_rater["ann"]} == {"main", "repeat", "gold"}

    labels = list(QUALITY) + [n for im in s.images.values() for n in (im["name"],)]
    rater_text = "\n".join(seen)
    assert rater_text and not any(lab in rater_text for lab in labels)  # rater pages: no method or file names

    # results: only with the admin token; the careless rater fails gold and repeats, and is left out
    server.start()
    try:
        assert _get(f"{url}results")[0] == 403 and _get(f"{url}results?token=wrong")[0] == 403
        status, page = _get(f"{url}results?token={token}")
        assert status == 200 and "bob" in page and "excluded" in page
        status, body = _get(f"{url}results.json?token={token}")
        res = json.loads(body)
        assert [r["method"] for r in res["ranking"]] == ["alpha-net", "beta-gan", "gamma-bicubic"]
    finally:
        server.stop()
    out = tmp_path / "results"
    assert main(["study", "results", str(study), "-o", str(out), "--bootstrap", "100"]) == 0
    rows = (out / "results.csv").read_text().splitlines()
    assert [r.split(",")[1] for r in rows[1:]] == ["alpha-net", "beta-gan", "gamma-bicubic"]
    raters = (out / "raters.csv").read_text()
    assert re.search(r"^bob,.*,1,1,", raters, re.M) and re.search(r"^ann,.*,0,0,", raters, re.M)
    assert np.isfinite([float(r.split(",")[2]) for r in rows[1:]]).all()
