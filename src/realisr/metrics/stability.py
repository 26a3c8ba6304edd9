"""CCSR's stability metrics for stochastic (diffusion) methods run N times with different noise.

As computed by CCSR's ``cal_iqa`` scripts (see ``docs/metrics.md``):

* **G-STD** of a metric: for each image the population standard deviation (``ddof=0``) of that metric over
  the N runs, then the mean over images. The value reported next to it is the mean over images and runs.
* **L-STD**: for each image stack the N outputs (RGB in ``[0, 1]``, 4-pixel border cropped), take the
  per-pixel, per-channel population std across runs, average over pixels and channels, then over images.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np

from .functional import as_float_rgb, crop_border

__all__ = ["g_std", "l_std", "l_std_image"]


def g_std(scores: Mapping[str, Sequence[float]]) -> tuple[float, float]:
    """Mean and G-STD of one metric.

    Args:
        scores: image name -> the metric's value for each of the N runs (N >= 1, same N for all images).

    Returns:
        ``(mean over images and runs, mean over images of the per-image population std)``.

    Raises:
        ValueError: no images, or images with different numbers of runs.
    """
    if not scores:
        raise ValueError("g_std needs at least one image")
    arr = [np.asarray(v, dtype=np.float64) for v in scores.values()]
    if len({a.size for a in arr}) != 1 or arr[0].size == 0:
        raise ValueError("every image needs the same (non-zero) number of runs")
    m = np.stack(arr)
    # std is shift-invariant: centring on run 0 first keeps identical runs at exactly 0 (no mean round-off)
    return float(m.mean()), float((m - m[:, :1]).std(axis=1, ddof=0).mean())


def l_std_image(runs: Sequence, border: int = 4) -> float:
    """L-STD of one image: mean over pixels and channels of the per-pixel population std across runs.

    Args:
        runs: the N outputs of the same input, ``[H, W, 3]`` uint8 or float in ``[0, 1]``.
        border: pixels cropped on each side (CCSR: 4).
    """
    if len(runs) < 1:
        raise ValueError("l_std needs at least one run")
    stack = np.stack([crop_border(as_float_rgb(r), border) for r in runs])
    return float((stack - stack[:1]).std(axis=0, ddof=0).mean())  # centred on run 0: identical runs give 0


def l_std(images: Iterable[Sequence], border: int = 4) -> float:
    """L-STD of a set: the mean over images of :func:`l_std_image`."""
    vals = [l_std_image(r, border) for r in images]
    if not vals:
        raise ValueError("l_std needs at least one image")
    return float(np.mean(vals))
