"""Pixel metrics with the SR papers' conventions: PSNR and SSIM on the BT.601 Y channel.

Why hand-written (see ``docs/metrics.md``): the diffusion-SR papers (OSEDiff, PiSA-SR, SeeSR, CCSR) report
pyiqa's ``psnr``/``ssim`` with ``test_y_channel=True, color_space='ycbcr'``, and BasicSR-era papers BasicSR's
``calculate_psnr/ssim(test_y_channel=True)``; pyiqa is under a non-commercial licence and BasicSR does not
import on current torchvision; torchmetrics has no Y conversion and its SSIM averages a reflect-padded map (a
5e-3 gap). These few lines are the published formulas with those choices (float64, Y in ``[16, 235]`` on the
``[0, 255]`` scale, 11x11 Gaussian window with sigma 1.5, mean over the valid region). The two SSIM
conventions differ by up to 1.2e-3: pyiqa rounds Y to integers (as MATLAB's uint8 images) and clamps the
contrast-structure map at 0; BasicSR does neither (``ssim_y(..., convention=...)``).
"""

from __future__ import annotations

import numpy as np

__all__ = ["rgb_to_y", "crop_border", "psnr_y", "ssim_y", "gaussian_window_1d", "as_float_rgb",
           "SSIM_CONVENTIONS"]

SSIM_CONVENTIONS = ("pyiqa", "basicsr")

# ITU-R BT.601 "MATLAB rgb2ycbcr" luma for R, G, B in [0, 1]; Y in [16, 235].
_Y_WEIGHTS = np.array([65.481, 128.553, 24.966], dtype=np.float64)


def as_float_rgb(img) -> np.ndarray:
    """``[H, W, 3]`` float64 RGB in ``[0, 1]`` from uint8 / uint16 / float input (grey is replicated)."""
    a = np.asarray(img)
    if a.ndim == 2:
        a = a[..., None]
    if a.dtype == np.uint8:
        f = a.astype(np.float64) / 255.0
    elif a.dtype == np.uint16:
        f = a.astype(np.float64) / 65535.0
    else:
        f = a.astype(np.float64)
    if f.shape[2] == 1:
        f = np.repeat(f, 3, axis=2)
    if f.shape[2] != 3:
        raise ValueError(f"expected an RGB image [H, W, 3], got shape {a.shape}")
    return f


def rgb_to_y(img) -> np.ndarray:
    """BT.601 Y (``16 + 65.481 R + 128.553 G + 24.966 B``) on the ``[0, 255]`` scale, float64, unrounded.

    Args:
        img: ``[H, W, 3]`` RGB, uint8 or float in ``[0, 1]``.

    Returns:
        ``[H, W]`` float64 in ``[16, 235]``.
    """
    return as_float_rgb(img) @ _Y_WEIGHTS + 16.0


def crop_border(img: np.ndarray, border: int) -> np.ndarray:
    """Drop ``border`` pixels on each side (``0``: unchanged)."""
    if border <= 0:
        return img
    if img.shape[0] <= 2 * border or img.shape[1] <= 2 * border:
        raise ValueError(f"image {img.shape[1]}x{img.shape[0]} is too small for a {border}-pixel border crop")
    return img[border:-border, border:-border]


def _check_pair(sr, ref) -> None:
    if np.shape(sr)[:2] != np.shape(ref)[:2]:
        raise ValueError(f"SR and reference sizes differ: {np.shape(sr)[:2]} vs {np.shape(ref)[:2]}")


def psnr_y(sr, ref, border: int = 0) -> float:
    """PSNR in dB on the Y channel, peak 255, float64 (basicsr ``calculate_psnr(test_y_channel=True)``).

    Args:
        sr: restored image ``[H, W, 3]`` RGB (uint8 or float in ``[0, 1]``).
        ref: reference image, same size.
        border: pixels cropped on each side before measuring (OSEDiff/PiSA-SR: 0; CCSR/SeeSR: 4).

    Returns:
        PSNR in dB (``inf`` for identical images).

    Raises:
        ValueError: the sizes differ or the crop leaves nothing.
    """
    _check_pair(sr, ref)
    a = crop_border(rgb_to_y(sr), border)
    b = crop_border(rgb_to_y(ref), border)
    mse = float(np.mean((a - b) ** 2))
    if mse == 0.0:
        return float("inf")
    return float(10.0 * np.log10(255.0 * 255.0 / mse))


def gaussian_window_1d(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    """Normalised 1-D Gaussian (as ``cv2.getGaussianKernel(size, sigma)``)."""
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    g = np.exp(-(x * x) / (2.0 * sigma * sigma))
    return g / g.sum()


def _filter_valid(img: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Separable correlation with ``g`` keeping only the fully-covered ("valid") region."""
    from scipy.ndimage import correlate1d

    r = len(g) // 2
    out = correlate1d(correlate1d(img, g, axis=0, mode="constant"), g, axis=1, mode="constant")
    return out[r:-r, r:-r]


def ssim_y(sr, ref, border: int = 0, convention: str = "pyiqa") -> float:
    """SSIM on the Y channel (Wang et al. 2004) in the papers' convention.

    11x11 Gaussian window (sigma 1.5), ``C1 = (0.01 * 255)^2``, ``C2 = (0.03 * 255)^2``, float64, mean of the
    SSIM map over the valid region (5 pixels lost on each side after the border crop), no downsampling.

    Args:
        sr: restored image ``[H, W, 3]`` RGB (uint8 or float in ``[0, 1]``).
        ref: reference image, same size.
        border: pixels cropped on each side before measuring.
        convention: ``"pyiqa"`` (default; pyiqa ``ssim(test_y_channel=True, color_space='ycbcr')``, what
            OSEDiff/PiSA-SR/SeeSR/CCSR report): Y rounded to integers, contrast-structure map clamped at 0;
            ``"basicsr"``: BasicSR ``calculate_ssim(test_y_channel=True)``, unrounded Y, no clamp.

    Returns:
        SSIM in ``[-1, 1]``.

    Raises:
        ValueError: the sizes differ, the image is smaller than the window, or an unknown convention.
    """
    if convention not in SSIM_CONVENTIONS:
        raise ValueError(f"convention must be one of {SSIM_CONVENTIONS}, got {convention!r}")
    _check_pair(sr, ref)
    a = crop_border(rgb_to_y(sr), border)
    b = crop_border(rgb_to_y(ref), border)
    if convention == "pyiqa":
        a, b = np.round(a), np.round(b)
    if min(a.shape) < 11:
        raise ValueError(f"SSIM needs at least 11x11 pixels after cropping, got {a.shape[1]}x{a.shape[0]}")
    c1 = (0.01 * 255.0) ** 2
    c2 = (0.03 * 255.0) ** 2
    g = gaussian_window_1d(11, 1.5)
    mu1 = _filter_valid(a, g)
    mu2 = _filter_valid(b, g)
    s11 = _filter_valid(a * a, g) - mu1 * mu1
    s22 = _filter_valid(b * b, g) - mu2 * mu2
    s12 = _filter_valid(a * b, g) - mu1 * mu2
    cs_map = (2 * s12 + c2) / (s11 + s22 + c2)
    if convention == "pyiqa":
        cs_map = np.maximum(cs_map, 0.0)
    ssim_map = (2 * mu1 * mu2 + c1) / (mu1 * mu1 + mu2 * mu2 + c1) * cs_map
    return float(ssim_map.mean())
