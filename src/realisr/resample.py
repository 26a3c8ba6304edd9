"""Pillow's resampling (``Image.resize`` with BICUBIC or LANCZOS) as two matrix products, on any device.

Pillow resamples separably, horizontal pass first: output pixel ``i`` of an axis is ``sum_j k_i(j) in[j]`` with
the filter centred at ``(i + 0.5) * in/out``, stretched by ``in/out`` when shrinking (antialiasing), and each
row of weights normalised to sum 1 (``precompute_coeffs`` in Pillow's ``Resample.c``). This module builds those
weights in float64 exactly as Pillow does and applies them as ``W_v @ x @ W_h^T``: the result equals Pillow's
float (``"F"`` mode) resize to float32 rounding, and runs where the tensor is (a GPU: no copy to the host and
back). ``round_8bit=True`` also rounds to 8-bit levels after each pass, as Pillow's uint8 path does (it equals
that path except where its 22-bit fixed-point weights round a value the other way: within one 8-bit level).

Used for the pre/post-processing of the one-step diffusion pipelines on the GPU
(:func:`realisr.pipelines.diffusion_common.preprocess_on_device`).
"""

from __future__ import annotations

import functools
import math

import numpy as np

__all__ = ["pil_weights", "pil_resize_tensor", "FILTERS"]


def _bicubic(x: float) -> float:
    a = -0.5  # Pillow's bicubic
    x = abs(x)
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    if x < 2.0:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


def _sinc(x: float) -> float:
    if x == 0.0:
        return 1.0
    x = x * math.pi
    return math.sin(x) / x


def _lanczos(x: float) -> float:
    if -3.0 <= x < 3.0:
        return _sinc(x) * _sinc(x / 3)
    return 0.0


#: name -> (filter, support), as Pillow's ``Resample.c``.
FILTERS = {"bicubic": (_bicubic, 2.0), "lanczos": (_lanczos, 3.0)}


@functools.lru_cache(maxsize=64)
def _weights64(in_size: int, out_size: int, name: str) -> np.ndarray:
    fn, support0 = FILTERS[name]
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = support0 * filterscale
    ss = 1.0 / filterscale
    w = np.zeros((out_size, in_size), dtype=np.float64)
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size) - xmin
        k = np.array([fn((x + xmin - center + 0.5) * ss) for x in range(xmax)], dtype=np.float64)
        total = k.sum()
        if total != 0.0:
            k = k / total
        w[xx, xmin:xmin + xmax] = k
    return w


def pil_weights(in_size: int, out_size: int, name: str = "bicubic", *, device=None, dtype=None):
    """The ``[out_size, in_size]`` resampling matrix of one axis (Pillow's weights, computed in float64)."""
    import torch

    return torch.from_numpy(_weights64(int(in_size), int(out_size), name)).to(device=device,
                                                                            dtype=dtype or torch.float32)


def pil_resize_tensor(x, size_hw: tuple[int, int], name: str = "bicubic", *, round_8bit=False):
    """Resize NCHW ``x`` (float in ``[0, 1]``, any device) to ``size_hw`` as Pillow would, clamped to ``[0, 1]``.

    Args:
        x: ``[N, C, H, W]`` float tensor.
        size_hw: ``(height, width)`` of the output.
        name: ``"bicubic"`` or ``"lanczos"``.
        round_8bit: round to 8-bit levels after each pass (Pillow's uint8 path); a bool, or a ``[N]`` bool
            tensor choosing it per image.

    Returns:
        ``[N, C, h, w]`` float32 on ``x``'s device.
    """
    import torch

    h, w = int(size_hw[0]), int(size_hw[1])
    y = x.float()
    mask = None
    if isinstance(round_8bit, torch.Tensor):
        mask = round_8bit.to(device=y.device).view(-1, 1, 1, 1)
    elif round_8bit:
        mask = True

    def rounded(t):
        if mask is None:
            return t
        q = torch.round(t * 255.0).clamp_(0.0, 255.0) / 255.0
        return q if mask is True else torch.where(mask, q, t)

    if w != y.shape[-1]:  # horizontal pass first, as Pillow
        wh = pil_weights(y.shape[-1], w, name, device=y.device)
        y = rounded(torch.matmul(y, wh.t()))
    if h != y.shape[-2]:
        wv = pil_weights(y.shape[-2], h, name, device=y.device)
        y = rounded(torch.matmul(wv, y))
    return y.clamp(0.0, 1.0)
