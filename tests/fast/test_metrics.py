"""PSNR/SSIM on Y against the published formulas (written here, independently), NIQE against basicsr's own
output, the CCSR stability metrics, and the registry's declared conventions / unavailability reports."""

import json
from pathlib import Path

import numpy as np
import pytest

from realisr.metrics import (
    METRICS,
    MetricUnavailableError,
    create_metric,
    g_std,
    l_std,
    l_std_image,
    list_metrics,
    metric_status,
    psnr_y,
    ssim_y,
)

DATA = Path(__file__).resolve().parents[1] / "data"


# -- an independent, straightforward implementation of the published formulas ----------------------------
def _y_reference(rgb_uint8):
    """ITU-R BT.601 luma, 'MATLAB rgb2ycbcr' scaling: Y = 16 + (65.481 R + 128.553 G + 24.966 B) / 255."""
    r, g, b = (rgb_uint8[..., i].astype(np.float64) for i in range(3))
    return 16.0 + (65.481 * r + 128.553 * g + 24.966 * b) / 255.0


def _psnr_reference(x, y, border):
    if border:
        x, y = x[border:-border, border:-border], y[border:-border, border:-border]
    mse = np.mean((x - y) ** 2)
    return 10 * np.log10(255.0 ** 2 / mse)


def _ssim_reference(x, y, border, clamp_cs=False):
    """Wang et al. 2004: 11x11 Gaussian window (sigma 1.5) as a 2-D array, explicit local statistics over
    every fully-contained window, mean of the SSIM map (pyiqa: contrast-structure term clamped at 0)."""
    if border:
        x, y = x[border:-border, border:-border], y[border:-border, border:-border]
    c = np.arange(11) - 5.0
    w = np.exp(-(c[:, None] ** 2 + c[None, :] ** 2) / (2 * 1.5 ** 2))
    w /= w.sum()
    wx = np.lib.stride_tricks.sliding_window_view(x, (11, 11))
    wy = np.lib.stride_tricks.sliding_window_view(y, (11, 11))
    mx = (wx * w).sum(axis=(-2, -1))
    my = (wy * w).sum(axis=(-2, -1))
    vx = (w * (wx - mx[..., None, None]) ** 2).sum(axis=(-2, -1))
    vy = (w * (wy - my[..., None, None]) ** 2).sum(axis=(-2, -1))
    cxy = (w * (wx - mx[..., None, None]) * (wy - my[..., None, None])).sum(axis=(-2, -1))
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    cs = (2 * cxy + c2) / (vx + vy + c2)
    if clamp_cs:
        cs = np.maximum(cs, 0)
    s = (2 * mx * my + c1) / (mx ** 2 + my ** 2 + c1) * cs
    return s.mean()


def _pairs():
    """Real photos (scikit-image) with two real distortions: x4 bicubic down/up and JPEG q=30."""
    import io

    import skimage.data
    from PIL import Image

    out = []
    for name, box in (("astronaut", (100, 60, 260, 260)), ("coffee", (150, 200, 330, 360)),
                      ("chelsea", (60, 120, 220, 300))):
        img = getattr(skimage.data, name)()[box[0]:box[2], box[1]:box[3]]
        pil = Image.fromarray(img)
        h, w = img.shape[:2]
        blurry = np.asarray(pil.resize((w // 4, h // 4), Image.BICUBIC).resize((w, h), Image.BICUBIC))
        buf = io.BytesIO()
        pil.save(buf, "JPEG", quality=30)
        jpeg = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
        out += [(f"{name}-bicubic", blurry, img), (f"{name}-jpeg", jpeg, img)]
    return out


@pytest.mark.parametrize("border", [0, 4])
def test_psnr_ssim_y_match_published_formulas_on_real_photos(border):
    for name, sr, hq in _pairs():
        ref_psnr = _psnr_reference(_y_reference(sr), _y_reference(hq), border)
        ref_ssim = _ssim_reference(_y_reference(sr), _y_reference(hq), border)
        # the papers' (pyiqa) convention: Y rounded to integers, contrast-structure map clamped at 0
        ref_ssim_pyiqa = _ssim_reference(np.round(_y_reference(sr)), np.round(_y_reference(hq)), border, True)
        assert abs(psnr_y(sr, hq, border) - ref_psnr) < 1e-4, name
        assert abs(ssim_y(sr, hq, border, convention="basicsr") - ref_ssim) < 1e-5, name
        assert abs(ssim_y(sr, hq, border) - ref_ssim_pyiqa) < 1e-5, name
        assert create_metric("ssim", border=border)(sr, hq) == ssim_y(sr, hq, border)
        assert create_metric("ssim-basicsr", border=border)(sr, hq) == ssim_y(sr, hq, border, convention="basicsr")
        # float [0, 1] input (what pipelines return) gives the same numbers as uint8
        assert abs(psnr_y(sr / 255.0, hq.astype(np.float32) / 255, border) - ref_psnr) < 1e-4
        assert 15 < ref_psnr < 45 and 0.3 < ref_ssim < 1.0


def test_default_ssim_is_pyiqas_ycbcr_ssim_the_papers_ran():
    """OSEDiff/PiSA-SR/SeeSR/CCSR report pyiqa ssim(test_y_channel=True, color_space='ycbcr')."""
    pyiqa = pytest.importorskip("pyiqa", reason="pyiqa (the papers' metric tool) is not installed")
    import torch

    ref_metric = pyiqa.create_metric("ssim", test_y_channel=True, color_space="ycbcr", device="cpu")
    gaps = []
    for name, sr, hq in _pairs():
        def t(a):
            return torch.from_numpy(a.astype(np.float32) / 255).permute(2, 0, 1)[None]
        theirs = float(ref_metric(t(sr), t(hq)))
        assert abs(ssim_y(sr, hq) - theirs) < 2e-5, name
        gaps.append(abs(ssim_y(sr, hq, convention="basicsr") - theirs))
    assert max(gaps) > 2e-4  # the convention matters at the 4 decimals papers print


def test_psnr_ssim_registry_objects_and_edge_cases(photo):
    psnr, ssim = create_metric("psnr"), create_metric("ssim", border=4)
    assert psnr.border == 0 and ssim.border == 4
    assert psnr(photo, photo) == float("inf") and ssim(photo, photo) == pytest.approx(1.0)
    other = photo[::-1].copy()
    assert psnr(photo, other) == pytest.approx(psnr_y(photo, other))
    with pytest.raises(ValueError, match="sizes differ"):
        psnr(photo, photo[:100])
    with pytest.raises(ValueError, match="needs a reference"):
        ssim(photo)
    # Y weighs R and B differently: swapping them must show up
    assert psnr(photo, photo[..., ::-1].copy()) < 40


# The official MATLAB NIQE values (original release script on rgb2gray) of pyiqa's five calibration images, as
# pyiqa 0.1.16 records them in ResultsCalibra/results_official.csv (row "niqe"; the sdist on PyPI has the CSV).
OFFICIAL_NIQE = {"I03": 15.7536293917814, "I04": 3.65492152353770, "I06": 3.23547743716998,
                 "I08": 3.18403333858339, "I19": 8.63519663862637}


def _calibration_images() -> dict:
    """pyiqa's calibration images (TID2013 distortions of Kodak photos, not redistributable here): the pyiqa
    wheel installs them as ``site-packages/ResultsCalibra/dist_dir/*.bmp``."""
    import importlib.metadata

    try:
        files = importlib.metadata.files("pyiqa") or []
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("pyiqa is not installed: its wheel carries the NIQE calibration images "
                    "(pip install --no-deps pyiqa==0.1.16)")
    found = {f.stem: Path(f.locate()) for f in files if "ResultsCalibra/dist_dir" in str(f).replace("\\", "/")}
    if set(found) < set(OFFICIAL_NIQE):
        pytest.skip(f"the installed pyiqa lacks ResultsCalibra/dist_dir (found {sorted(found)})")
    return found


def test_niqe_matches_the_official_matlab_values_on_pyiqa_calibration_images():
    """The default NIQE (MATLAB rgb2gray convention, the papers') is within 1% of the official MATLAB script."""
    from PIL import Image

    from realisr.metrics import niqe

    images = _calibration_images()
    metric = create_metric("niqe")
    basicsr_y = create_metric("niqe-y")
    worst_y = 0.0
    for name, official in OFFICIAL_NIQE.items():
        rgb = np.asarray(Image.open(images[name]).convert("RGB"))
        ours = metric(rgb)
        assert abs(ours - official) / official < 0.01, (name, ours, official)
        assert niqe(rgb) == ours  # the function and the registry metric are the same computation
        worst_y = max(worst_y, abs(basicsr_y(rgb) - official) / official)
    # BasicSR's Y-of-YCbCr variant is kept as a named metric; it is the one that is several percent off
    assert worst_y > 0.03


def test_niqe_reproduces_basicsr_reference_values():
    """Both conventions against basicsr's own calculate_niqe (tests/data/make_niqe_reference.py)."""
    import skimage.data

    from realisr.metrics import niqe

    ref = json.loads((DATA / "niqe_reference.json").read_text())
    assert "basicsr" in ref["source"] and "pip download basicsr==1.4.2" in ref["command"]
    for name in ("astronaut", "chelsea", "camera"):
        img = getattr(skimage.data, name)()
        if img.ndim == 2:
            img = np.stack([img] * 3, axis=2)
        want = ref["values"][name]
        assert abs(niqe(img, convert_to="y") - want["niqe_y"]) < 1e-6, name
        assert abs(niqe(img, border=4, convert_to="y") - want["niqe_y_crop4"]) < 1e-6, name
        assert abs(niqe(img) - want["niqe_gray"]) < 1e-6, name
        assert abs(niqe(img, border=4) - want["niqe_gray_crop4"]) < 1e-6, name
    # float input in [0, 1] is the same image
    img = skimage.data.chelsea()
    assert abs(niqe(img.astype(np.float32) / 255) - ref["values"]["chelsea"]["niqe_gray"]) < 1e-6
    assert abs(niqe(img.astype(np.float32) / 255, convert_to="y") - ref["values"]["chelsea"]["niqe_y"]) < 1e-6
    with pytest.raises(ValueError, match="96x96"):
        niqe(img[:90, :200])
    with pytest.raises(ValueError, match="convert_to"):
        niqe(img, convert_to="yiq")


def test_niqe_parameters_ship_with_realisr_and_nothing_is_downloaded(tmp_path, monkeypatch):
    """No pip, no socket: the official parameters are package data (or a file the user names)."""
    import shutil
    import socket
    import subprocess

    import skimage.data

    from realisr.errors import WeightsNotFoundError
    from realisr.metrics import niqe_core
    from realisr.weights.cache import sha256_file

    def forbidden(*args, **kwargs):
        raise AssertionError(f"NIQE tried to run or reach something: {args[:2]}")

    monkeypatch.setattr(subprocess, "run", forbidden)
    monkeypatch.setattr(subprocess, "Popen", forbidden)
    monkeypatch.setattr(socket.socket, "connect", forbidden)
    monkeypatch.setenv("REALISR_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("REALISR_WEIGHTS", str(tmp_path / "empty-weights"))
    monkeypatch.delenv("REALISR_NIQE_PARAMS", raising=False)
    niqe_core._load_npz.cache_clear()
    path = niqe_core.find_niqe_parameters()
    assert path.parent.name == "data" and path.parent.parent.name == "metrics"
    assert sha256_file(path) == niqe_core.NIQE_NPZ_SHA256
    assert "BasicSR 1.4.2" in (path.parent / "NOTICE").read_text() and "LIVE" in (path.parent / "NOTICE").read_text()
    assert metric_status("niqe").available
    img = skimage.data.chelsea()
    score = create_metric("niqe")(img)
    assert 1 < score < 10
    # a file the user names replaces the shipped one; a wrong name is a clear error, not a fetch
    mine = tmp_path / "mine.npz"
    shutil.copy(path, mine)
    monkeypatch.setenv("REALISR_NIQE_PARAMS", str(mine))
    assert niqe_core.find_niqe_parameters() == mine
    assert create_metric("niqe")(img) == score
    monkeypatch.setenv("REALISR_NIQE_PARAMS", str(tmp_path / "missing.npz"))
    with pytest.raises(WeightsNotFoundError, match="REALISR_NIQE_PARAMS"):
        niqe_core.niqe_parameters()
    assert not metric_status("niqe").available
    assert not (tmp_path / "empty-cache").exists()


def test_from_realisr_metrics_import_niqe_is_the_function():
    import importlib

    import realisr.metrics as m

    importlib.reload(m)
    from realisr.metrics import niqe

    assert callable(niqe) and niqe.__name__ == "niqe" and "niqe" in m.__all__
    core = importlib.import_module("realisr.metrics.niqe_core")  # importing the module must not rebind the name
    from realisr.metrics import niqe as again

    assert again is niqe is core.niqe


def test_g_std_and_l_std_follow_ccsr():
    mean, gstd = g_std({"a": [1.0, 3.0], "b": [2.0, 2.0]})
    assert mean == pytest.approx(2.0) and gstd == pytest.approx(0.5)  # population std: (1, 0) -> mean 0.5
    with pytest.raises(ValueError):
        g_std({"a": [1.0, 2.0], "b": [1.0]})
    black = np.zeros((20, 20, 3), np.uint8)
    white = np.full((20, 20, 3), 255, np.uint8)
    assert l_std_image([black, white]) == pytest.approx(0.5)
    assert l_std_image([black, black, black]) == 0.0
    border_only = black.copy()
    border_only[:4] = 255
    assert l_std_image([black, border_only], border=4) == 0.0  # the 4-pixel crop removes the difference
    assert l_std_image([black, border_only], border=0) > 0
    assert l_std([[black, white], [black, black]]) == pytest.approx(0.25)


def test_every_metric_declares_its_conventions():
    assert {"psnr", "ssim", "ssim-basicsr", "lpips", "dists", "fid", "niqe", "niqe-y", "musiq", "maniqa",
            "clipiqa"} <= set(METRICS)
    for spec in list_metrics():
        assert spec.kind in ("full-reference", "no-reference", "set")
        assert spec.color_space and spec.data_range and spec.convention and spec.license
        assert spec.backend in ("realisr", "torchmetrics", "pyiqa")
        assert isinstance(spec.higher_is_better, bool) and spec.crop_border == 0
        for wf in spec.weights:
            assert wf.name and wf.url.startswith("https://") and wf.hub_subdir
    assert METRICS["lpips"].weights[0].name == "alexnet-owt-7be5be79.pth"  # LPIPS is the AlexNet version
    assert METRICS["musiq"].options["pyiqa_name"] == "musiq"  # KonIQ model
    assert METRICS["maniqa"].options["pyiqa_name"] == "maniqa-pipal"


@pytest.mark.parametrize("metric_id", ["lpips", "dists", "fid", "musiq", "maniqa", "clipiqa"])
def test_missing_weights_are_reported_with_file_and_place(metric_id, tmp_path, monkeypatch):
    monkeypatch.setenv("REALISR_WEIGHTS", str(tmp_path / "weights"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    spec = METRICS[metric_id]
    st = metric_status(metric_id)
    assert not st.available
    assert spec.weights[0].name in st.detail and str(tmp_path / "weights") in st.detail
    with pytest.raises(MetricUnavailableError, match=spec.weights[0].name):
        create_metric(metric_id)


def test_docs_table_is_generated_from_the_registry():
    from realisr.cli.metrics import markdown_table

    docs = (Path(__file__).resolve().parents[2] / "docs" / "metrics.md").read_text()
    assert markdown_table() in docs, "regenerate the table with `realisr metrics --markdown`"
