"""The CLI's progress display: bars on a terminal, plain throttled lines of the outermost stage elsewhere."""

import io

from realisr.progress import ProgressEvent, TqdmProgress


def _events():
    yield ProgressEvent("files", 0, 2)
    for f, name in enumerate(("a.png", "b.png")):
        for t in range(4):
            yield ProgressEvent("tiles", t, 3)
        yield ProgressEvent("files", f + 1, 2, name)


def test_log_output_has_one_line_per_outer_step_and_no_nested_bars():
    out = io.StringIO()
    p = TqdmProgress(interactive=False, interval=0, stream=out)
    for e in _events():
        p(e)
    lines = out.getvalue().splitlines()
    assert [ln.split(" (")[0] for ln in lines] == ["files 1/2 a.png", "files 2/2 b.png"]
    assert "\x1b" not in out.getvalue() and "\r" not in out.getvalue()


def test_log_output_is_throttled_but_always_reports_completion():
    out = io.StringIO()
    p = TqdmProgress(interactive=False, interval=3600, stream=out)
    p(ProgressEvent("train", 0, 100))
    for i in range(1, 101):
        p(ProgressEvent("train", i, 100, f"loss {1 / i:.3f}"))
    # the next stage to start becomes the outer one
    p(ProgressEvent("save", 0, 1))
    p(ProgressEvent("save", 1, 1))
    assert [ln.split(" (")[0] for ln in out.getvalue().splitlines()] == ["train 100/100 loss 0.010", "save 1/1"]


def test_terminal_output_draws_bars_and_quiet_draws_nothing():
    out = io.StringIO()
    p = TqdmProgress(interactive=True, stream=out)
    for e in _events():
        p(e)
    p.close()
    text = out.getvalue()
    assert "files" in text and "tiles" in text and "2/2" in text
    silent = io.StringIO()
    q = TqdmProgress(disable=True, interactive=True, stream=silent)
    for e in _events():
        q(e)
    assert silent.getvalue() == ""
