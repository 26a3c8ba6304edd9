"""What a run will cost, shown before it starts: output size, tile grid, time and memory on this device, and
the limits that refuse a run with the reason.

Times come from runs measured on this server (seconds per output megapixel, per model and device) once there
is one; before that from the rough priors in the model's dial description (measured on 2 CPU cores; GPU
priors are guesses), and the estimate says which. Memory is the loaded weights plus the model's working memory
per output pixel for the largest piece that runs at once (a tile, or the whole image).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from ..dials import ModelDials
from ..registry import ModelSpec

__all__ = ["Limits", "Estimate", "estimate_run", "format_bytes", "steps_of"]


@dataclass(frozen=True)
class Limits:
    """What a server accepts.

    Attributes:
        max_pixels: largest input (width x height).
        max_output_pixels: largest output.
        max_upload_mb: largest uploaded file.
        max_files: most files in one upload (the batch tab).
        memory_fraction: the share of the free memory a run may plan to use.
        check_memory: refuse runs whose estimate exceeds that share (off: only the pixel limits refuse).
    """

    max_pixels: int = 4_000_000
    max_output_pixels: int = 64_000_000
    max_upload_mb: float = 50.0
    max_files: int = 32
    memory_fraction: float = 0.9
    check_memory: bool = True


def format_bytes(n: float) -> str:
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{int(n)} B"


def _fmt_seconds(s: float) -> str:
    if s < 1:
        return "under a second"
    if s < 90:
        return f"about {s:.0f} s"
    if s < 5400:
        return f"about {s / 60:.0f} min"
    return f"about {s / 3600:.1f} h"


@dataclass
class Estimate:
    """The plan of one run.

    Attributes:
        in_size, out_size: ``(width, height)``.
        grid: ``(rows, columns, tile side, unit)`` where unit is ``"px"`` or ``"latent"``; ``None``: one piece.
        seconds: expected run time; ``measured``: from a run on this device (else a rough prior).
        peak_bytes: expected peak memory; ``available_bytes``: free memory on the device.
        refused: why the run is refused, or ``None``.
    """

    in_size: tuple[int, int]
    out_size: tuple[int, int]
    grid: Optional[tuple[int, int, int, str]]
    seconds: float
    measured: bool
    peak_bytes: float
    available_bytes: Optional[int]
    device: str
    refused: Optional[str] = None

    def markdown(self) -> str:
        w, h = self.in_size
        ow, oh = self.out_size
        grid = "whole image in one piece" if self.grid is None else (
            f"{self.grid[0]} x {self.grid[1]} tiles of {self.grid[2]} {self.grid[3]}")
        src = "measured on this device" if self.measured else "rough prior, not yet measured here"
        avail = "" if self.available_bytes is None else f" of {format_bytes(self.available_bytes)} free"
        lines = [f"**Output** {ow} x {oh} (input {w} x {h}) · **tiles** {grid}",
                 f"**Time** {_fmt_seconds(self.seconds)} ({src}) · **memory** about "
                 f"{format_bytes(self.peak_bytes)}{avail} on {self.device}"]
        if self.refused:
            lines.append(f"**Refused:** {self.refused}")
        return "\n\n".join(lines)


def _grid_pixel(h: int, w: int, tile: Optional[int], pad: int, bytes_per_in: float, device, fraction: float):
    from ..tiling import auto_tile_size, balanced_tile, tile_grid

    if tile is None:
        biggest = auto_tile_size(device, bytes_per_in, maximum=2048, fraction=min(0.5, fraction))
        tile = balanced_tile(h, w, max(64, biggest - 2 * pad), min(pad, biggest // 4))
    if not tile or tile >= max(h, w):
        return None, h * w
    t = min(int(tile), h, w)
    overlap = min(pad, max(0, t // 4))
    boxes = tile_grid(h, w, t, overlap if overlap < t else 0)
    rows = len({b[0] for b in boxes})
    cols = len({b[2] for b in boxes})
    return (rows, cols, t, "px"), (t + 2 * pad) ** 2


def _grid_latent(spec: ModelSpec, h: int, w: int, values: dict):
    from ..pipelines.diffusion_common import latent_tile_plan, official_sizes, resolve_latent_tiling
    from ..tiling import tile_grid

    ps = values.get("process_size") or spec.options.get("process_size", 512)
    _flag, _size, _up, (fw, fh) = official_sizes(w, h, spec.scale, int(ps))
    lh, lw = max(1, fh // 8), max(1, fw // 8)
    tile = values.get("tile")
    lt, lo = resolve_latent_tiling(spec.options, spec.scale, None if tile is None else int(tile))  # as the pipeline
    plan = latent_tile_plan(lh, lw, lt, lo)
    if plan is None:
        return None, fw * fh
    t, ov = plan
    boxes = tile_grid(lh, lw, t, ov)
    return (len({b[0] for b in boxes}), len({b[2] for b in boxes}), t, "latent"), (t * 8) ** 2


def steps_of(spec: ModelSpec, dials: ModelDials, values: dict) -> float:
    """The factor the time scales with: the value of the description's ``per_step`` dial (else 1)."""
    if not dials.per_step:
        return 1.0
    v = values.get(dials.per_step)
    if v is None:
        v = spec.options.get(dials.per_step, 1)
    try:
        return max(1.0, float(v))
    except (TypeError, ValueError):
        return 1.0


def estimate_run(spec: ModelSpec, dials: ModelDials, width: int, height: int, values: dict, *, device,
                 limits: Limits, rate: Optional[float] = None, available: Optional[int] = None,
                 weights_loaded: bool = False) -> Estimate:
    """Plan a run of ``spec`` on a ``width x height`` input with dial ``values``.

    Args:
        rate: measured seconds per output megapixel on this device (``None``: the description's prior).
        available: free memory in bytes (default: measured now on ``device``).
        weights_loaded: the model is loaded already (its weights are not part of the free memory any more).
    """
    import torch

    from ..tiling import available_memory_bytes

    dev = torch.device(device)
    outscale = values.get("outscale")
    scale = float(outscale) if outscale else float(spec.scale)
    out_w, out_h = max(1, round(width * scale)), max(1, round(height * scale))
    if available is None:
        available = available_memory_bytes(dev)
    native_px = width * height * spec.scale ** 2
    if dials.grid == "latent":
        grid, piece = _grid_latent(spec, height, width, values)
        piece = min(native_px, max(piece, 1024 * 1024))  # the VAE decodes whole images up to 1024x1024
    else:
        bpi = dials.bytes_per_out_pixel * spec.scale ** 2
        grid, piece_in = _grid_pixel(height, width, values.get("tile"), int(values.get("tile_pad") or 16), bpi,
                                     dev, limits.memory_fraction)
        piece = piece_in * spec.scale ** 2
    buffers = 3 * 4 * (native_px + out_w * out_h) * 2  # float32 RGB: model output, resized output, copies
    peak = (0.0 if weights_loaded else dials.model_bytes) + dials.bytes_per_out_pixel * piece + buffers
    measured = rate is not None
    per_mp = rate if measured else dials.seconds_per_mp.get(dev.type, dials.seconds_per_mp.get("cpu", 30.0))
    seconds = per_mp * native_px / 1e6 * steps_of(spec, dials, values)
    est = Estimate(in_size=(width, height), out_size=(out_w, out_h), grid=grid, seconds=seconds, measured=measured,
                   peak_bytes=peak, available_bytes=available, device=str(dev))
    if width * height > limits.max_pixels:
        est.refused = (f"the input is {width} x {height} = {width * height:,} pixels, over this server's limit of "
                       f"{limits.max_pixels:,} pixels: use a smaller image (the limit is realisr serve "
                       f"--max-pixels)")
    elif out_w * out_h > limits.max_output_pixels:
        est.refused = (f"the output would be {out_w} x {out_h} = {out_w * out_h:,} pixels, over this server's limit "
                       f"of {limits.max_output_pixels:,}: lower the output scale")
    elif limits.check_memory and available and peak > available * limits.memory_fraction:
        hint = "set a smaller tile (Advanced)" if dials.grid == "pixel" or grid is None else "use a smaller image"
        est.refused = (f"it needs about {format_bytes(peak)} of memory and {dev} has "
                       f"{format_bytes(available)} free: {hint} or a smaller output scale")
    if not math.isfinite(est.seconds):
        est.seconds = 0.0
    return est
