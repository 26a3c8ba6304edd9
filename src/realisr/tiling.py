"""The one tiling utility shared by every backend: pixel-space GAN tiles, latent UNet tiles and VAE tiles.

Contract of :func:`tiled_forward`:

* The image is cut into tiles of ``tile`` x ``tile`` (clamped to the image) whose starts are
  ``0, tile-overlap, 2(tile-overlap), ...``; the last tile of a row/column is snapped to end at the border, so
  every tile has the full size and no tile is a thin sliver.
* Each tile is run with ``pad`` extra pixels of real image context on every side that has some (clamped at
  the border); the context is cut off the tile's output again. A model whose receptive field fits in
  ``pad`` gives exactly the untiled result; larger ones differ only slightly.
* Overlapping tile outputs are blended with a smooth window (raised cosine by default) that ramps only across
  the overlap on sides that have a neighbour, and the sum of windows is divided out, so the blend is a
  partition of unity: a constant output stays constant and no seam band appears.
* Streaming: only the current tile is moved to ``device``/``dtype``; the input and the accumulated output stay
  where the caller keeps them (normally CPU, float32), so the full image never has to sit on the device.
* ``tile=None`` (or a tile not smaller than the image) runs the whole image as one tile through the same path.
* :func:`run_with_oom_retry` halves the tile size on an out-of-memory error and tries again.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from typing import Callable, Optional, Sequence, Union

from .progress import report

logger = logging.getLogger(__name__)

__all__ = [
    "tile_starts",
    "tile_grid",
    "blend_window",
    "tiled_forward",
    "pad_to_multiple",
    "auto_tile_size",
    "balanced_tile",
    "available_memory_bytes",
    "is_oom_error",
    "run_with_oom_retry",
]

WindowFn = Callable[[int, int, tuple[bool, bool, bool, bool], tuple[int, int, int, int]], "object"]


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of size ``tile`` covering ``[0, length)`` with at least ``overlap`` overlap.

    The last tile is snapped to ``length - tile``. When ``tile >= length`` there is a single tile at 0.
    """
    if length <= 0:
        raise ValueError("length must be positive")
    if tile <= 0:
        raise ValueError("tile must be positive")
    if tile >= length:
        return [0]
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in [0, tile): got overlap={overlap}, tile={tile}")
    stride = tile - overlap
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)
    return sorted(set(starts))


def tile_grid(height: int, width: int, tile: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """Tiles as ``(y0, y1, x0, x1)`` boxes, row-major."""
    th, tw = min(tile, height), min(tile, width)
    return [(y, y + th, x, x + tw)
            for y in tile_starts(height, th, overlap if th < height else 0)
            for x in tile_starts(width, tw, overlap if tw < width else 0)]


def _ramp(n: int, kind: str):
    """Weights rising from near 0 to near 1 over ``n`` samples (strictly positive, symmetric pairs sum to 1)."""
    import torch

    t = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    if kind == "linear":
        return t
    if kind == "cosine":
        return 0.5 - 0.5 * torch.cos(math.pi * t)
    raise ValueError(f"unknown blend window {kind!r}: use 'cosine', 'linear' or a callable")


def blend_window(height: int, width: int, neighbours: tuple[bool, bool, bool, bool],
                 overlaps: tuple[int, int, int, int], kind: str = "cosine"):
    """A ``[height, width]`` float64 blending window for one tile.

    Args:
        neighbours: whether the tile has a neighbour on its (top, bottom, left, right) side.
        overlaps: how many output pixels it shares with that neighbour, per side.
        kind: ``"cosine"`` (raised cosine), ``"linear"`` or ``"box"`` (all ones: plain averaging).
    """
    import torch

    wy = torch.ones(height, dtype=torch.float64)
    wx = torch.ones(width, dtype=torch.float64)
    if kind != "box":
        top, bottom, left, right = neighbours
        ot, ob, ol, orr = (min(o, n) for o, n in zip(overlaps, (height, height, width, width)))
        if top and ot > 0:
            wy[:ot] *= _ramp(ot, kind)
        if bottom and ob > 0:
            wy[height - ob:] *= _ramp(ob, kind).flip(0)
        if left and ol > 0:
            wx[:ol] *= _ramp(ol, kind)
        if right and orr > 0:
            wx[width - orr:] *= _ramp(orr, kind).flip(0)
    return wy[:, None] * wx[None, :]


def pad_to_multiple(x, multiple: int, mode: str = "reflect"):
    """Pad an NCHW tensor on the bottom/right so both sides are multiples of ``multiple``.

    Returns:
        ``(padded, (pad_h, pad_w))``. Crop the output with the returned amounts times the scale.
    """
    import torch.nn.functional as F

    if multiple <= 1:
        return x, (0, 0)
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph == 0 and pw == 0:
        return x, (0, 0)
    if mode == "reflect" and (ph >= h or pw >= w):
        mode = "replicate"  # reflect needs pad < size
    return F.pad(x, (0, pw, 0, ph), mode=mode), (ph, pw)


def tiled_forward(
    fn: Callable,
    x,
    *,
    scale: int = 1,
    tile: Optional[int] = None,
    overlap: int = 0,
    pad: int = 0,
    window: Union[str, WindowFn] = "cosine",
    size_multiple: int = 1,
    out_channels: Optional[int] = None,
    device=None,
    dtype=None,
    out_device="cpu",
    callback=None,
    stage: str = "tiles",
):
    """Run ``fn`` over tiles of ``x`` and blend the results (see the module docstring for the contract).

    Args:
        fn: maps an NCHW tile (on ``device``/``dtype``) to an NCHW output ``scale`` times larger.
        x: NCHW input tensor (any device; tiles are copied to ``device``).
        scale: output/input size ratio of ``fn``.
        tile: tile side in input pixels; ``None`` or ``0``: one tile (the whole image).
        overlap: overlap between neighbouring tiles in input pixels, ``0 <= overlap < tile``.
        pad: extra context in input pixels around each tile, cut off again after ``fn``.
        window: ``"cosine"``, ``"linear"``, ``"box"``, or ``callable(h, w, neighbours, overlaps)`` returning a
            ``[h, w]`` weight tensor in output pixels.
        size_multiple: each tile input is padded (reflect) to a multiple of this, and the output cropped.
        out_channels: channels of the output (default: as the input).
        device, dtype: where and in which dtype ``fn`` runs (default: those of ``x``).
        out_device: where the blended output is accumulated (float32).
        callback: progress callback, receives ``stage`` events per tile.

    Returns:
        The blended float32 output, NCHW, ``scale`` times the input size, on ``out_device``.

    Raises:
        ValueError: an overlap outside ``[0, tile)`` (it is not quietly changed), or a tile function with the
            wrong output shape.
    """
    import torch

    if x.ndim != 4:
        raise ValueError(f"expected an NCHW tensor, got shape {tuple(x.shape)}")
    n, c, h, w = x.shape
    device = x.device if device is None else torch.device(device)
    dtype = x.dtype if dtype is None else dtype
    tile = int(tile) if tile else max(h, w)
    overlap = int(overlap)
    if overlap < 0 or (overlap >= tile and tile < max(h, w)):
        raise ValueError(f"tile overlap must be in [0, tile): got overlap={overlap}, tile={tile}")
    boxes = tile_grid(h, w, tile, overlap)
    single = len(boxes) == 1
    out = acc_w = None
    report(callback, stage, 0, len(boxes))
    for i, (y0, y1, x0, x1) in enumerate(boxes):
        py0, py1 = max(0, y0 - pad), min(h, y1 + pad)
        px0, px1 = max(0, x0 - pad), min(w, x1 + pad)
        inp = x[:, :, py0:py1, px0:px1].to(device=device, dtype=dtype)
        inp, (ph, pw) = pad_to_multiple(inp, size_multiple)
        with torch.inference_mode() if not torch.is_grad_enabled() else contextlib.nullcontext():
            res = fn(inp)
        if res.ndim != 4:
            raise ValueError(f"tile function returned shape {tuple(res.shape)}, expected NCHW")
        th, tw = (py1 - py0) * scale, (px1 - px0) * scale
        if res.shape[-2] < th or res.shape[-1] < tw:
            raise ValueError(f"tile function returned {tuple(res.shape[-2:])}, expected at least {(th, tw)}; "
                             f"is scale={scale} right?")
        oy, ox = (y0 - py0) * scale, (x0 - px0) * scale
        res = res[:, :, oy:oy + (y1 - y0) * scale, ox:ox + (x1 - x0) * scale]
        if single:
            report(callback, stage, 1, 1)
            return res.to(device=out_device, dtype=torch.float32)
        if out is None:
            oc = out_channels or res.shape[1]
            out = torch.zeros(n, oc, h * scale, w * scale, dtype=torch.float32, device=out_device)
            acc_w = torch.zeros(1, 1, h * scale, w * scale, dtype=torch.float64, device=out_device)
        neighbours = (y0 > 0, y1 < h, x0 > 0, x1 < w)
        overlaps = _overlaps(boxes, i, scale)
        if callable(window):
            wgt = window(res.shape[-2], res.shape[-1], neighbours, overlaps)
        else:
            wgt = blend_window(res.shape[-2], res.shape[-1], neighbours, overlaps, window)
        wgt = torch.as_tensor(wgt, dtype=torch.float64, device=out_device)
        ys, xs = slice(y0 * scale, y1 * scale), slice(x0 * scale, x1 * scale)
        out[:, :, ys, xs] += (res.to(device=out_device, dtype=torch.float64) * wgt).float()
        acc_w[:, :, ys, xs] += wgt
        del inp, res
        report(callback, stage, i + 1, len(boxes))
    return (out / acc_w).float()


def _overlaps(boxes: Sequence[tuple[int, int, int, int]], i: int, scale: int) -> tuple[int, int, int, int]:
    """Largest overlap (in output pixels) of tile ``i`` with a neighbour on each side."""
    y0, y1, x0, x1 = boxes[i]
    top = bottom = left = right = 0
    for j, (b0, b1, a0, a1) in enumerate(boxes):
        if j == i:
            continue
        same_row = a0 < x1 and a1 > x0 and b0 == y0
        same_col = b0 < y1 and b1 > y0 and a0 == x0
        if same_col and b0 < y0 < b1:
            top = max(top, b1 - y0)
        if same_col and b0 < y1 < b1:
            bottom = max(bottom, y1 - b0)
        if same_row and a0 < x0 < a1:
            left = max(left, a1 - x0)
        if same_row and a0 < x1 < a1:
            right = max(right, x1 - a0)
    return top * scale, bottom * scale, left * scale, right * scale


def available_memory_bytes(device=None) -> int:
    """Free memory on ``device`` (CUDA: ``mem_get_info``; CPU: available physical memory)."""
    import torch

    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda":
        free, _total = torch.cuda.mem_get_info(dev)
        return int(free)
    if dev.type == "mps":  # pragma: no cover - no MPS here
        return int(torch.mps.recommended_max_memory() - torch.mps.current_allocated_memory())
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 4 << 30


def auto_tile_size(device, bytes_per_input_pixel: float, *, fraction: float = 0.5, minimum: int = 64,
                   maximum: int = 2048, multiple: int = 8) -> int:
    """Largest square tile whose estimated working memory fits in ``fraction`` of the free memory.

    ``bytes_per_input_pixel`` is the model's peak working memory per input pixel (activations included),
    as measured for that model.
    """
    budget = available_memory_bytes(device) * fraction
    side = int(math.sqrt(max(budget, 1) / max(bytes_per_input_pixel, 1e-9)))
    side = max(minimum, min(maximum, side))
    return max(multiple, side - side % multiple)


def balanced_tile(height: int, width: int, max_tile: int, overlap: int, multiple: int = 8) -> int:
    """The smallest tile (a multiple of ``multiple``, at most ``max_tile``) that covers the image with as few
    tiles as ``max_tile`` would, so no work is wasted on a thin last tile; ``0`` when one tile covers the image.

    Example: a 512-px side with ``max_tile=440`` needs 2 tiles per side either way; balanced tiles of 272
    (with 32 px of overlap) cost 4 x 272^2 pixels instead of 4 x 440^2.
    """
    longest = max(height, width)
    if max_tile >= longest:
        return 0
    overlap = min(overlap, max_tile // 2)
    n = math.ceil((longest - overlap) / (max_tile - overlap))
    tile = math.ceil((longest - overlap) / n) + overlap
    tile += (-tile) % multiple
    return min(tile, max_tile)


def is_oom_error(err: BaseException) -> bool:
    """Whether an exception is an out-of-memory error from torch (CUDA, MPS or CPU allocator)."""
    import torch

    if isinstance(err, getattr(torch, "OutOfMemoryError", ())) or isinstance(err, MemoryError):
        return True
    msg = str(err).lower()
    return isinstance(err, RuntimeError) and ("out of memory" in msg or "can't allocate memory" in msg
                                              or "not enough memory" in msg)


def run_with_oom_retry(run: Callable[[int], "object"], tile: int, *, minimum: int = 32, device=None):
    """Call ``run(tile)``; on out-of-memory, halve ``tile`` and retry down to ``minimum``.

    Returns:
        ``(result, tile_used)``.
    """
    import torch

    while True:
        try:
            return run(tile), tile
        except Exception as err:  # noqa: BLE001 - re-raised unless it is an OOM
            if not is_oom_error(err) or tile // 2 < minimum:
                raise
            new = tile // 2
            logger.warning("out of memory with tile %d; retrying with tile %d", tile, new)
            tile = new
            if device is not None and torch.device(device).type == "cuda":
                torch.cuda.empty_cache()
