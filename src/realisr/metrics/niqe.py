"""NIQE (Mittal et al. 2013) with the official pristine parameters, reproducing basicsr's implementation.

The parameters (the multivariate Gaussian fitted on the pristine image set, and the 7x7 window) are not
committed. Their declared source is the basicsr 1.4.2 sdist on PyPI, which ships them as
``basicsr/metrics/niqe_pris_params.npz``; :func:`niqe_parameters` finds them in this order:

1. ``<checkpoints_dir>/niqe_pris_params.npz`` (a file the user placed, see :func:`realisr.weights.cache.checkpoints_dir`);
2. ``<cache_dir>/metrics/niqe_pris_params.npz`` (fetched earlier);
3. an installed ``basicsr`` package (found without importing it);
4. ``pip download basicsr==1.4.2 --no-deps --no-binary :all:`` into a temporary folder, the npz is extracted
   into the cache and checked against its SHA-256.

Why hand-written: basicsr cannot be imported on current torchvision, pyiqa's NIQE defaults to another colour
conversion (YIQ) and is non-commercial. The steps below follow basicsr ``calculate_niqe(convert_to='y')``
including its float32 stages, so that the integer rounding of Y and the AGGD grid search land on the same
values (tested against basicsr's own output in ``tests/data/niqe_reference.json``).
"""

from __future__ import annotations

import logging
import math
import shutil
import subprocess
import sys
import tarfile
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Optional

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["niqe", "niqe_y_image", "niqe_parameters", "find_niqe_parameters", "NIQE_NPZ", "NIQE_NPZ_SHA256",
           "BASICSR_SDIST", "matlab_imresize"]

NIQE_NPZ = "niqe_pris_params.npz"
NIQE_NPZ_SHA256 = "2a7c182a68c9e7f1b2e2e5ec723279d6f65d912b6fcaf37eb2bf03d7367c4296"
BASICSR_SDIST = "basicsr==1.4.2"
_SDIST_MEMBER = "basicsr-1.4.2/basicsr/metrics/niqe_pris_params.npz"


def _cached_npz() -> Path:
    from ..weights.cache import cache_dir

    return cache_dir() / "metrics" / NIQE_NPZ


def find_niqe_parameters() -> Optional[Path]:
    """The npz file if it is on this machine (no network), else ``None``."""
    import importlib.util

    from ..weights.cache import checkpoints_dir

    for p in (checkpoints_dir() / NIQE_NPZ, _cached_npz()):
        if p.is_file():
            return p
    spec = importlib.util.find_spec("basicsr")
    if spec is not None and spec.submodule_search_locations:
        p = Path(list(spec.submodule_search_locations)[0]) / "metrics" / NIQE_NPZ
        if p.is_file():
            return p
    return None


def _fetch_from_sdist() -> Path:
    """Download the basicsr sdist with pip and extract the npz into the cache (verified by SHA-256)."""
    from ..errors import WeightsNotFoundError
    from ..weights.cache import sha256_file

    dest = _cached_npz()
    with tempfile.TemporaryDirectory(prefix="realisr-basicsr-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", BASICSR_SDIST, "--no-deps", "--no-binary", ":all:",
               "--no-build-isolation", "--quiet", "-d", tmp]
        logger.info("fetching the NIQE parameters: %s", " ".join(cmd[2:]))
        proc = subprocess.run(cmd, capture_output=True, text=True)
        sdists = list(Path(tmp).glob("basicsr-*.tar.gz"))
        if not sdists:
            raise WeightsNotFoundError(
                f"NIQE needs {NIQE_NPZ} from the basicsr 1.4.2 sdist and `pip download {BASICSR_SDIST}` failed "
                f"({(proc.stderr or '').strip().splitlines()[-1:] or 'no output'}): extract "
                f"basicsr/metrics/{NIQE_NPZ} from that sdist into {dest.parent}")
        with tarfile.open(sdists[0]) as tar:
            member = tar.extractfile(tar.getmember(_SDIST_MEMBER))
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp_npz = Path(tmp) / NIQE_NPZ
            with open(tmp_npz, "wb") as f:
                shutil.copyfileobj(member, f)
        digest = sha256_file(tmp_npz)
        if digest != NIQE_NPZ_SHA256:
            raise WeightsNotFoundError(f"{NIQE_NPZ} from {sdists[0].name} has SHA-256 {digest}, expected "
                                       f"{NIQE_NPZ_SHA256}: place the official file in {dest.parent}")
        shutil.move(str(tmp_npz), dest)
    return dest


@lru_cache(maxsize=4)
def _load_npz(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    with np.load(path, allow_pickle=False) as d:
        return d["mu_pris_param"], d["cov_pris_param"], d["gaussian_window"]


def niqe_parameters(fetch: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(mu_pris_param [1, 36], cov_pris_param [36, 36], gaussian_window [7, 7])``.

    Args:
        fetch: download the basicsr sdist with pip when the file is nowhere on this machine.

    Raises:
        WeightsNotFoundError: not found (and not fetched); the message says where to put the file.
    """
    from ..errors import WeightsNotFoundError

    path = find_niqe_parameters()
    if path is None:
        if not fetch:
            raise WeightsNotFoundError(f"NIQE needs {NIQE_NPZ} (from the {BASICSR_SDIST} sdist on PyPI): "
                                       f"put it in {_cached_npz().parent}")
        path = _fetch_from_sdist()
    return _load_npz(str(path))


# -- the algorithm ------------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _aggd_table() -> tuple[np.ndarray, np.ndarray]:
    from scipy.special import gamma

    gam = np.arange(0.2, 10.001, 0.001)
    r_gam = gamma(2.0 / gam) ** 2 / (gamma(1.0 / gam) * gamma(3.0 / gam))
    return gam, r_gam


def _aggd(x: np.ndarray) -> tuple[float, float, float]:
    """Asymmetric generalised Gaussian fit by moment matching on the 0.001 grid: ``(alpha, beta_l, beta_r)``."""
    from scipy.special import gamma

    gam, r_gam = _aggd_table()
    x = x.ravel()
    left = np.sqrt(np.mean(x[x < 0] ** 2))
    right = np.sqrt(np.mean(x[x > 0] ** 2))
    g_hat = left / right
    r_hat = np.mean(np.abs(x)) ** 2 / np.mean(x ** 2)
    r_norm = r_hat * (g_hat ** 3 + 1) * (g_hat + 1) / (g_hat ** 2 + 1) ** 2
    alpha = gam[np.argmin((r_gam - r_norm) ** 2)]
    k = np.sqrt(gamma(1.0 / alpha) / gamma(3.0 / alpha))
    return alpha, left * k, right * k


def _block_features(block: np.ndarray) -> list[float]:
    """18 features: the AGGD of the MSCN block, and of its products with 4 shifted copies."""
    from scipy.special import gamma

    alpha, bl, br = _aggd(block)
    feats = [alpha, (bl + br) / 2]
    for shift in ((0, 1), (1, 0), (1, 1), (1, -1)):
        alpha, bl, br = _aggd(block * np.roll(block, shift, axis=(0, 1)))
        feats += [alpha, (br - bl) * gamma(2.0 / alpha) / gamma(1.0 / alpha), bl, br]
    return feats


def _resize_taps(n_in: int, scale: float):
    """Taps of MATLAB ``imresize`` (bicubic, antialiased when shrinking) along one axis.

    Returns ``(weights [n_out, taps], rows [n_out, taps])`` with 0-based source indices mirrored at the
    borders (MATLAB's symmetric padding). Computed with float32 torch ops in the same order as basicsr's
    ``matlab_functions.imresize``: NIQE rounds nothing after this step, but its AGGD grid search is
    sensitive to the last bit, and this is what makes the scores agree to 1e-12 rather than 1e-3.
    """
    import torch

    n_out = math.ceil(n_in * scale)
    width = 4.0 / scale if scale < 1 else 4.0
    x = torch.linspace(1, n_out, n_out)
    u = x / scale + 0.5 * (1 - 1 / scale)
    left = torch.floor(u - width / 2)
    taps = math.ceil(width) + 2
    idx = left.view(n_out, 1).expand(n_out, taps) + torch.linspace(0, taps - 1, taps).view(1, taps)
    d = u.view(n_out, 1).expand(n_out, taps) - idx
    if scale < 1:
        d = d * scale
    ad = torch.abs(d)
    cubic = ((1.5 * ad ** 3 - 2.5 * ad ** 2 + 1) * (ad <= 1).type_as(ad)
             + (-0.5 * ad ** 3 + 2.5 * ad ** 2 - 4 * ad + 2) * ((ad > 1) * (ad <= 2)).type_as(ad))
    w = scale * cubic if scale < 1 else cubic
    w = w / torch.sum(w, 1).view(n_out, 1).expand(n_out, taps)
    zeros = torch.sum(w == 0, 0)
    if int(zeros[0]) != 0:  # drop an all-but-unused first/last tap column, as MATLAB does
        idx, w = idx[:, 1:], w[:, 1:]
    if int(zeros[-1]) != 0:
        idx, w = idx[:, :-1], w[:, :-1]
    return w.contiguous(), idx.long() - 1


def _mirror(j, n: int):
    j = j.clone()
    j[j < 0] = -j[j < 0] - 1
    j[j >= n] = 2 * n - 1 - j[j >= n]
    return j


def matlab_imresize(img: np.ndarray, scale: float) -> np.ndarray:
    """MATLAB ``imresize(img, scale)`` (bicubic, antialiased) of a float plane (rows first, then columns),
    float32, unclipped. Used by NIQE (scale 0.5) and for the bicubic LQ inputs of the offline benchmark.

    The plane is padded by mirroring and each output line is one ``mv`` over a strided slice of the padded
    plane, the memory layout basicsr uses (a gathered copy changes the BLAS summation order by 1e-7).
    """
    import torch

    t = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))
    h, w = t.shape
    wh, ih = _resize_taps(h, scale)
    lo, hi = int(ih.min()), int(ih.max())
    aug = t[_mirror(torch.arange(lo, hi + 1), h)]
    kh = wh.shape[1]
    rows = torch.empty(wh.shape[0], w)
    for i in range(wh.shape[0]):
        s0 = int(ih[i, 0]) - lo
        rows[i, :] = aug[s0:s0 + kh, :].transpose(0, 1).mv(wh[i])
    ww, iw = _resize_taps(w, scale)
    lo, hi = int(iw.min()), int(iw.max())
    aug = torch.empty(rows.shape[0], hi - lo + 1)
    aug.copy_(rows[:, _mirror(torch.arange(lo, hi + 1), w)])
    kw = ww.shape[1]
    out = torch.empty(rows.shape[0], ww.shape[0])
    for i in range(ww.shape[0]):
        s0 = int(iw[i, 0]) - lo
        out[:, i] = aug[:, s0:s0 + kw].mv(ww[i])
    return out.numpy()


def niqe_y_image(img) -> np.ndarray:
    """The integer-rounded BT.601 Y plane NIQE scores, computed with basicsr's float32 steps.

    Args:
        img: ``[H, W, 3]`` RGB uint8, or float in ``[0, 1]``; ``[H, W]`` is taken as the Y/grey plane in
            ``[0, 255]``.
    """
    a = np.asarray(img)
    if a.ndim == 2:
        return np.round(a.astype(np.float32))
    if a.ndim == 3 and a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    f = a.astype(np.float32) if a.dtype == np.uint8 else (a.astype(np.float32) * np.float32(255.0))
    f = f / np.float32(255.0)
    y = (f @ np.array([65.481, 128.553, 24.966]) + 16.0) / 255.0
    y = y.astype(np.float32) * np.float32(255.0)
    return np.round(y)


def niqe(img, border: int = 0, block_size: int = 96, params=None) -> float:
    """NIQE of an image (lower is better), basicsr ``calculate_niqe(convert_to='y')`` convention.

    Args:
        img: ``[H, W, 3]`` RGB (uint8 or float in ``[0, 1]``), or an ``[H, W]`` plane in ``[0, 255]``.
        border: pixels cropped on each side (after the Y conversion, before rounding, as basicsr).
        block_size: side of the non-overlapping blocks (96, the official value).
        params: ``(mu, cov, window)``; default :func:`niqe_parameters`.

    Returns:
        The NIQE score.

    Raises:
        ValueError: the image holds fewer than two blocks.
        WeightsNotFoundError: the pristine parameters are not available.
    """
    from scipy.ndimage import convolve

    mu_p, cov_p, window = params if params is not None else niqe_parameters()
    y = niqe_y_image(img)
    if border > 0:
        y = y[border:-border, border:-border]
    nh, nw = y.shape[0] // block_size, y.shape[1] // block_size
    if nh * nw < 2:  # one block has no covariance: the score would be NaN
        raise ValueError(f"NIQE needs at least two {block_size}x{block_size} blocks, got {y.shape[1]}x{y.shape[0]} "
                         "pixels")
    y = y[: nh * block_size, : nw * block_size]
    feats = []
    for scale in (1, 2):
        mu = convolve(y, window, mode="nearest")
        sigma = np.sqrt(np.abs(convolve(np.square(y), window, mode="nearest") - np.square(mu)))
        mscn = (y - mu) / (sigma + 1)
        b = block_size // scale
        rows = [_block_features(mscn[i * b:(i + 1) * b, j * b:(j + 1) * b]) for j in range(nw) for i in range(nh)]
        feats.append(np.array(rows))
        if scale == 1:
            y = matlab_imresize(y / 255.0, 0.5) * 255.0
    dist = np.concatenate(feats, axis=1)
    mu_d = np.nanmean(dist, axis=0)
    cov_d = np.cov(dist[~np.isnan(dist).any(axis=1)], rowvar=False)
    d = mu_p - mu_d
    q = d @ np.linalg.pinv((cov_p + cov_d) / 2) @ d.T
    return float(np.sqrt(np.squeeze(q)))
