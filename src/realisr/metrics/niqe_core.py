"""NIQE (Mittal et al. 2013) with the official pristine parameters, as the papers report it.

Two colour conventions, both with the official parameters and the official algorithm (96x96 blocks, two
scales, MATLAB ``imresize`` by 1/2):

* ``convert_to="gray"`` (the default, registry metric ``niqe``): the official MATLAB script's input,
  ``rgb2gray`` of the 8-bit image (``0.298936 R + 0.587043 G + 0.114021 B``, rounded to 8 bits). This is the
  convention of the official values pyiqa calibrates against (``ResultsCalibra/results_official.csv``) and
  of pyiqa's ``niqe`` (which OSEDiff, PiSA-SR, SeeSR and CCSR use); realisr agrees with the official MATLAB
  values to 0.6% on pyiqa's calibration images (``tests/fast/test_metrics.py``).
* ``convert_to="y"`` (registry metric ``niqe-y``): BasicSR's ``calculate_niqe(convert_to='y')``, the BT.601 Y
  of YCbCr, reproduced to 1e-12 (``tests/data/niqe_reference.json``).

The pristine parameters ship with realisr as package data (``metrics/data/niqe_pris_params.npz``: byte for
byte BasicSR 1.4.2's copy of the official release's model, see ``metrics/data/NOTICE``). Another copy can be
named with ``$REALISR_NIQE_PARAMS``. Nothing is ever downloaded.

Why hand-written: basicsr cannot be imported on current torchvision, and pyiqa is non-commercial. The steps
keep basicsr's float32 stages (rounding of the grey/Y plane, MATLAB bicubic /2 with the same summation
layout): the AGGD grid search is sensitive to the last bit.
"""

from __future__ import annotations

import logging
import math
import os
from functools import lru_cache
from pathlib import Path
from typing import Optional

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["niqe", "niqe_y_image", "niqe_gray_image", "niqe_parameters", "find_niqe_parameters",
           "NIQE_NPZ", "NIQE_NPZ_SHA256", "NIQE_PARAMS_ENV", "MATLAB_GRAY_WEIGHTS", "CONVERSIONS",
           "matlab_imresize", "niqe_min_size"]

NIQE_NPZ = "niqe_pris_params.npz"
NIQE_NPZ_SHA256 = "2a7c182a68c9e7f1b2e2e5ec723279d6f65d912b6fcaf37eb2bf03d7367c4296"
NIQE_PARAMS_ENV = "REALISR_NIQE_PARAMS"
# MATLAB rgb2gray: the luma row of the inverse of the NTSC (YIQ) matrix, as MATLAB computes it.
MATLAB_GRAY_WEIGHTS = np.array([0.298936021293775, 0.587043074451121, 0.114020904255103])
CONVERSIONS = ("gray", "y")


def find_niqe_parameters() -> Path:
    """The parameter file: ``$REALISR_NIQE_PARAMS`` if set, else the copy shipped with realisr.

    Raises:
        WeightsNotFoundError: ``$REALISR_NIQE_PARAMS`` names no file, or the package data is missing (a broken
            install).
    """
    from ..errors import WeightsNotFoundError

    env = os.environ.get(NIQE_PARAMS_ENV)
    if env:
        p = Path(env).expanduser()
        if not p.is_file():
            raise WeightsNotFoundError(f"{NIQE_PARAMS_ENV}={env} is not a file: point it at an npz with "
                                       "mu_pris_param, cov_pris_param and gaussian_window, or unset it")
        return p
    p = Path(__file__).with_name("data") / NIQE_NPZ
    if not p.is_file():
        raise WeightsNotFoundError(f"{p} is missing from the realisr installation: reinstall realisr")
    return p


@lru_cache(maxsize=4)
def _load_npz(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from ..errors import CheckpointError

    try:
        with np.load(path, allow_pickle=False) as d:
            mu, cov, window = d["mu_pris_param"], d["cov_pris_param"], d["gaussian_window"]
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path} is not a NIQE parameter file ({type(e).__name__}: {e}): it needs "
                              "mu_pris_param [1,36], cov_pris_param [36,36], gaussian_window [7,7]") from e
    if mu.shape != (1, 36) or cov.shape != (36, 36) or window.ndim != 2:
        raise CheckpointError(f"{path}: NIQE parameters of shapes {mu.shape}, {cov.shape}, {window.shape}; "
                              "expected (1, 36), (36, 36), (k, k)")
    return mu, cov, window


def niqe_parameters() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(mu_pris_param [1, 36], cov_pris_param [36, 36], gaussian_window [7, 7])``, from
    :func:`find_niqe_parameters` (no network).

    Raises:
        WeightsNotFoundError, CheckpointError: see :func:`find_niqe_parameters`; a malformed file.
    """
    return _load_npz(str(find_niqe_parameters()))


def niqe_min_size(block_size: int = 96, border: int = 0) -> tuple[int, int]:
    """The smallest ``(height, width)`` NIQE accepts: two blocks side by side (or stacked), plus the border."""
    return block_size + 2 * border, 2 * block_size + 2 * border


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


def _rgb(img) -> Optional[np.ndarray]:
    """``[H, W, 3]`` (grey replicated) or ``None`` for an ``[H, W]`` plane; float input checked for range."""
    a = np.asarray(img)
    if a.ndim == 2:
        return None
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4):
        raise ValueError(f"NIQE takes an [H, W, 3] RGB image or an [H, W] plane, got shape {a.shape}")
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    return a[..., :3]


def niqe_y_image(img) -> np.ndarray:
    """The integer-rounded BT.601 Y plane (BasicSR's ``convert_to='y'``), with basicsr's float32 steps.

    Args:
        img: ``[H, W, 3]`` RGB uint8 / uint16, or float in ``[0, 1]``; ``[H, W]`` is taken as the plane in
            ``[0, 255]``.
    """
    a = _rgb(img)
    if a is None:
        return np.round(np.asarray(img).astype(np.float32))
    if a.dtype == np.uint16:
        a = a.astype(np.float32) / np.float32(65535.0) * np.float32(255.0)
    f = a.astype(np.float32) if a.dtype == np.uint8 else (a.astype(np.float32) * np.float32(255.0))
    f = f / np.float32(255.0)
    y = (f @ np.array([65.481, 128.553, 24.966]) + 16.0) / 255.0
    y = y.astype(np.float32) * np.float32(255.0)
    return np.round(y)


def niqe_gray_image(img) -> np.ndarray:
    """MATLAB ``rgb2gray`` of the 8-bit image, the input of the official NIQE script, as float32.

    Float (``[0, 1]``) and 16-bit inputs are first quantised to 8 bits, as the file a paper's script reads;
    ``rgb2gray`` of a uint8 image rounds to uint8 (half away from zero, as MATLAB).

    Args:
        img: ``[H, W, 3]`` RGB uint8 / uint16, or float in ``[0, 1]``; ``[H, W]`` is taken as the grey plane in
            ``[0, 255]``.
    """
    a = _rgb(img)
    if a is None:
        return np.round(np.asarray(img).astype(np.float32))
    if a.dtype == np.uint8:
        q = a.astype(np.float64)
    else:
        peak = 65535.0 if a.dtype == np.uint16 else 1.0
        f = a.astype(np.float64) / peak
        if f.size and (np.nanmin(f) < -1e-3 or np.nanmax(f) > 1 + 1e-3):
            raise ValueError("float images must be in [0, 1]")
        q = np.floor(np.clip(f, 0.0, 1.0) * 255.0 + 0.5)
    return np.floor(q @ MATLAB_GRAY_WEIGHTS + 0.5).astype(np.float32)


def niqe(img, border: int = 0, block_size: int = 96, params=None, convert_to: str = "gray") -> float:
    """NIQE of an image (lower is better).

    Args:
        img: ``[H, W, 3]`` RGB (uint8, uint16 or float in ``[0, 1]``), or an ``[H, W]`` plane in ``[0, 255]``.
        border: pixels cropped on each side (after the conversion).
        block_size: side of the non-overlapping blocks (96, the official value).
        params: ``(mu, cov, window)``; default :func:`niqe_parameters`.
        convert_to: ``"gray"``: MATLAB ``rgb2gray``, the official script's (and pyiqa's) convention;
            ``"y"``: BasicSR's BT.601 Y of YCbCr.

    Returns:
        The NIQE score.

    Raises:
        ValueError: the image holds fewer than two blocks (see :func:`niqe_min_size`), or a bad ``convert_to``.
        WeightsNotFoundError: the pristine parameters are not available.
    """
    if convert_to not in CONVERSIONS:
        raise ValueError(f"convert_to must be one of {CONVERSIONS}, got {convert_to!r}")
    from scipy.ndimage import convolve

    mu_p, cov_p, window = params if params is not None else niqe_parameters()
    y = niqe_gray_image(img) if convert_to == "gray" else niqe_y_image(img)
    if border > 0:
        y = y[border:-border, border:-border]
    nh, nw = y.shape[0] // block_size, y.shape[1] // block_size
    if nh * nw < 2:  # one block has no covariance: the score would be NaN
        raise ValueError(f"NIQE needs at least two {block_size}x{block_size} blocks (an image of at least "
                         f"{2 * block_size}x{block_size} pixels after a {border}-pixel border crop), got "
                         f"{y.shape[1]}x{y.shape[0]}")
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
