"""`realisr bench` as a new user meets it: each unavailable metric said once, NIQE's minimum size said before
the run, and a no-reference metric plotted when it is all there is."""

import logging

import numpy as np
import pytest

from realisr.bench.report import pd_axes, svg_plot
from realisr.cli.main import main


@pytest.fixture()
def lq_folder(tmp_path, monkeypatch):
    import skimage.data
    from PIL import Image

    lq = tmp_path / "lq"
    lq.mkdir()
    big = Image.fromarray(skimage.data.astronaut())
    big.resize((64, 64), Image.BICUBIC).save(lq / "astronaut.png")  # x4: 256x256, two 96-px blocks and more
    big.resize((40, 30), Image.BICUBIC).save(lq / "tiny.png")  # x4: 160x120, fewer than two blocks
    monkeypatch.setenv("REALISR_WEIGHTS", str(tmp_path / "weights"))  # no pyiqa weights here
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return lq


def test_bench_says_each_thing_once_and_niqe_size_before_the_run(lq_folder, tmp_path, caplog, capsys,
                                                                    monkeypatch):
    import realisr.bench.runner as runner

    seen_before_work = []
    real = runner._run_method

    def spy(*args, **kwargs):
        seen_before_work.append(caplog.text)
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "_run_method", spy)
    with caplog.at_level(logging.WARNING):
        rc = main(["bench", "--lq", str(lq_folder), "-m", "bicubic", "--metrics", "niqe,musiq", "-o",
                   str(tmp_path / "run"), "--no-report"])
    assert rc == 0
    text = caplog.text + capsys.readouterr().err
    assert len([line for line in text.splitlines() if "musiq_koniq_ckpt" in line]) == 1, text
    assert text.count("192x96") == 1, text
    assert "tiny" in text and "1 of 2" in text
    # both were said before any image was upscaled
    assert "musiq is unavailable" in seen_before_work[0] and "192x96" in seen_before_work[0]


def _summary(means, seconds=None, kinds=None):
    kinds = kinds or {}
    metrics = {m: {"available": True, "label": m.upper(), "higher_is_better": m not in ("niqe", "lpips"),
                   "kind": kinds.get(m, "no-reference")} for m in means[0]}
    methods = [{"label": f"m{i}", "slug": f"m{i}", "means": dict(v),
                "seconds_per_image": None if seconds is None else seconds[i]} for i, v in enumerate(means)]
    return {"metrics": metrics, "methods": methods}


def test_a_lone_no_reference_metric_is_plotted():
    # NIQE only, and no timings (every SR output came from the cache): plotted against the method order
    s = _summary([{"niqe": 7.5}, {"niqe": 6.9}])
    axes = pd_axes(s)
    assert axes == ("method", "niqe")
    svg = svg_plot(s, *axes)
    assert svg.count('class="point"') == 2 and "no values to plot" not in svg
    # a metric without any value (images below NIQE's minimum size) gives way to one with values
    s = _summary([{"niqe": None, "musiq": 60.0}, {"niqe": None, "musiq": 65.0}], seconds=[0.1, 0.2])
    assert pd_axes(s) == ("musiq", "seconds")
    assert svg_plot(s, *pd_axes(s)).count('class="point"') == 2
    # with references, PSNR against the first perceptual metric that has values
    s = _summary([{"psnr": 25.0, "lpips": None, "niqe": 7.0}, {"psnr": 24.0, "lpips": None, "niqe": 6.0}],
                 kinds={"psnr": "full-reference", "lpips": "full-reference"})
    assert pd_axes(s) == ("psnr", "niqe")
    assert np.isfinite(len(svg_plot(s, *pd_axes(s))))
