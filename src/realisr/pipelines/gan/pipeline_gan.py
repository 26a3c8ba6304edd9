"""Feed-forward SR networks (Real-ESRGAN, RealSR, any spandrel-supported checkpoint) with shared tiling.

Models whose registry entry names a fidelity delta (``options["fidelity_delta"]``, e.g. Real-ESRGAN x4plus)
take a ``fidelity`` dial in [0, 1]: the network runs with ``W(F) = W + F * delta`` (weight-space
interpolation between the released GAN weights at F=0 and realisr's fidelity-tuned weights at F=1; one forward
pass, no cost over the plain model). F=0 restores the released weights bit for bit. A per-pixel map runs one
pass per level of a 0.25 grid that the map touches and blends neighbouring levels linearly per pixel.
"""

from __future__ import annotations

import logging
import math
from typing import Optional

from ...dials import Dial, ModelDials
from ...progress import report
from ...registry import ModelSpec, WeightSource
from ...tiling import auto_tile_size, balanced_tile, run_with_oom_retry, tiled_forward
from ..base import SRPipeline

logger = logging.getLogger(__name__)

__all__ = ["GANPipeline"]

# Peak working memory per input pixel, measured for RRDBNet x4 in fp32 on CPU (activations of the
# 64-channel trunk at input resolution plus the x4 upsampling head); compact nets need less.
_BYTES_PER_PIXEL = {"RRDBNet": 24_000, "SRVGGNetCompact": 6_000}  # ~2x the measured working memory


def _progress_blocks(model) -> list:
    """The repeated blocks of a network (RRDB blocks, the convolutions of a compact net, Swin stages...): the
    largest run of same-type children of one ``Sequential``/``ModuleList``, at least 4; ``[]`` if none."""
    from collections import Counter

    import torch.nn as nn

    best: list = []
    for mod in model.modules():
        if not isinstance(mod, (nn.Sequential, nn.ModuleList)):
            continue
        kids = list(mod.children())
        if len(kids) < 4:
            continue
        cls, n = Counter(type(k) for k in kids).most_common(1)[0]
        if n >= 4 and n > len(best):
            best = [k for k in kids if type(k) is cls]
    return best


class GANPipeline(SRPipeline):
    """A feed-forward network loaded through spandrel.

    Args:
        spec: registry entry (for files passed with ``-m path``, a spec is made from the detected architecture).
        descriptor: a spandrel ``ImageModelDescriptor`` (loaded from ``spec`` when ``None``).
        channels_last: run the spandrel model in channels-last memory format (faster on CPU and tensor cores;
            see benchmarks/bench_gan.py). Default: on.
        compile: wrap the model in ``torch.compile`` (inductor, frozen weights). Off by default: compiling
            RRDBNet takes minutes on CPU for a gain of ~15%.
        num_threads: CPU threads during a call (``torch.set_num_threads``, restored afterwards); default:
            PyTorch's setting capped at the physical cores this process may use. On a CPU shared with other
            work, 1 can be much faster than contended threads.
        fidelity_delta: a fidelity delta file to use instead of the registered one (e.g. one just trained by
            ``realisr train realesrgan-fidelity``; see docs/fidelity-dial.md). Default: the registry's.

    ``dtype="auto"`` on a CPU with AMX-BF16 units runs the models that declare a tested bf16 bound (all
    registered GAN models: ``bf16_psnr_db`` in the registry) in bf16, ~4x faster than fp32 there; see
    :mod:`realisr.cpu`. Channels-last pays on the CPU in both dtypes (Real-ESRGAN x4plus at 96 px, one
    thread: fp32 0.70x, bf16 0.47x the time of the default layout) and is the default.
    """

    default_tile_pad = 16
    supports_batch = True  # the network takes [N, 3, H, W]; tiles cut all images of a batch alike
    #: spacing of the fidelity levels a per-pixel fidelity map is rendered at (one forward pass per level used).
    fidelity_map_step = 0.25

    def __init__(self, spec: ModelSpec, device=None, dtype=None, descriptor=None,
                 channels_last: bool = True, compile: bool = False,
                 num_threads: Optional[int] = None, fidelity_delta=None):
        if fidelity_delta is not None:
            from dataclasses import replace
            from pathlib import Path

            from ...errors import WeightsNotFoundError

            path = Path(fidelity_delta).expanduser().resolve()
            if not path.is_file():
                raise WeightsNotFoundError(f"fidelity_delta {fidelity_delta}: no such file (a delta written by "
                                           "`realisr train realesrgan-fidelity`)")
            spec = replace(spec, options={**spec.options, "fidelity_delta": str(path)})
        super().__init__(spec, device=device, dtype=dtype, num_threads=num_threads)
        import torch

        if descriptor is None:
            from ...weights.gan import load_gan_descriptor

            descriptor = load_gan_descriptor(spec)
        self.descriptor = descriptor
        self.model = descriptor.model.eval().requires_grad_(False).to(self.device, self.dtype)
        self.channels_last = bool(channels_last)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self._call = self.model
        if compile:
            self._call = torch.compile(self.model, options={"freezing": True})
        self.size_multiple = max(1, int(getattr(descriptor.size_requirements, "multiple_of", 1) or 1),
                                 spec.size_multiple)
        # Models whose published graph resizes the network's output (animevideov3 x2/x3: the x4 network, then
        # a bicubic resize, as the ncnn files do), applied per tile like the ncnn graph.
        self.network_scale = int(descriptor.scale)
        self._blocks = [] if compile else _progress_blocks(self.model)
        self._block_callback = None
        for i, block in enumerate(self._blocks):
            block.register_forward_hook(self._block_hook(i))
        self._compiled = bool(compile)
        self._delta = None  # name -> float32 delta (loaded on first use of the dial)
        self._base = None  # name -> the released weights of the tensors the delta touches
        self._fidelity = 0.0

    @property
    def fidelity_available(self) -> bool:
        """Whether this model has a fidelity dial (a registered delta)."""
        return bool(self.spec.options.get("fidelity_delta"))

    def set_fidelity(self, fidelity: float) -> None:
        """Put ``W + fidelity * delta`` into the network (``0`` restores the released weights exactly).

        Raises:
            ValueError: the model has no dial, or ``fidelity`` is outside [0, 1].
        """
        import torch

        f = float(fidelity)
        if not 0.0 <= f <= 1.0:
            raise ValueError(f"fidelity must be in [0, 1], got {fidelity!r}")
        if f == self._fidelity:
            return
        if not self.fidelity_available:
            raise ValueError(f"{self.spec.id} has no fidelity dial (only models with a fidelity delta, e.g. "
                             "realesrgan-x4plus)")
        if self._compiled:
            raise ValueError("the fidelity dial needs the plain model: load it with compile=False")
        params = dict(self.model.named_parameters())
        if self._delta is None:
            from ...weights.fidelity import load_delta

            delta = load_delta(self.spec, {k: v.detach().float().cpu() for k, v in params.items()})
            self._base = {k: params[k].detach().clone() for k in delta}
            self._delta = {k: v.to(self.device) for k, v in delta.items()}
        with torch.no_grad():
            for k, base in self._base.items():
                if f == 0.0:
                    params[k].copy_(base)
                else:
                    params[k].copy_((base.float() + f * self._delta[k]).to(base.dtype))
        self._fidelity = f

    @classmethod
    def from_file(cls, path, device=None, dtype=None, **kwargs) -> "GANPipeline":
        """Load any spandrel-supported checkpoint (``.pth``, ``.safetensors``, ``.ckpt``) as a pipeline."""
        from ...weights.gan import load_spandrel_file

        desc = load_spandrel_file(path)
        arch = desc.architecture.name if hasattr(desc.architecture, "name") else str(desc.architecture)
        spec = ModelSpec(id=str(path), family="spandrel", scale=int(desc.scale), license="user-provided",
                         weights=WeightSource("user", files=(str(path),)),
                         pipeline="realisr.pipelines.gan.pipeline_gan:GANPipeline", arch=arch,
                         dtypes=("float32",) + (("float16",) if desc.supports_half else ())
                         + (("bfloat16",) if desc.supports_bfloat16 else ()),
                         description=f"{arch} loaded from {path}")
        return cls(spec, device=device, dtype=dtype, descriptor=desc, **kwargs)

    def _block_hook(self, i: int):
        def hook(module, inputs, output):
            cb = self._block_callback
            if cb is not None:
                cb(i + 1, len(self._blocks))
        return hook

    # What `realisr serve` shows: the generic dials, and the fidelity dial of models whose registry entry names a
    # fidelity delta (every change is a full pass; a painted map runs one pass per level it touches).
    dials = ModelDials(dials=(
        Dial("fidelity", "Fidelity (0 = released GAN, 1 = fidelity-tuned)", "float", default=0.0, minimum=0.0,
             maximum=1.0, step=0.05, spatial=True, requires=("fidelity_delta",),
             help="weight-space interpolation towards fidelity: structure and colour closer to the photo"),
    ), seconds_per_mp={"cpu": 29.0, "cuda": 0.3}, bytes_per_out_pixel=1500.0, model_bytes=7e7)

    def _forward(self, x):
        import torch
        import torch.nn.functional as F

        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = self._call(x)
        if self.network_scale != self.scale:
            size = (x.shape[-2] * self.scale, x.shape[-1] * self.scale)
            y = F.interpolate(y, size=size, mode="bicubic", align_corners=False)
        return y

    def check_inputs(self, image, outscale, tile, tile_pad, fidelity=0.0, **kwargs) -> None:
        """Also validates ``fidelity``: a number or a per-pixel map (see :func:`realisr.pipelines.
        diffusion_common.dial_to_latent`) with values in [0, 1]; non-zero only for models with a delta."""
        super().check_inputs(image, outscale, tile, tile_pad, **kwargs)
        if isinstance(fidelity, (int, float)) and not isinstance(fidelity, bool) and float(fidelity) == 0.0:
            return
        if not self.fidelity_available:
            raise ValueError(f"{self.spec.id} has no fidelity dial (only models with a fidelity delta, e.g. "
                             "realesrgan-x4plus)")
        from ..diffusion_common import dial_to_latent

        m = dial_to_latent(fidelity, (8, 8), name="fidelity")
        lo, hi = (float(m), float(m)) if isinstance(m, float) else (float(m.min()), float(m.max()))
        if lo < -1e-6 or hi > 1.0 + 1e-6:  # (resampling a 0/1 map may round a hair outside)
            raise ValueError(f"fidelity must be in [0, 1], got values in [{lo:g}, {hi:g}]")

    def _fidelity_map(self, x, fidelity, **kw):
        """A per-pixel fidelity map: one pass per grid level it touches, blended per pixel."""
        from ..diffusion_common import dial_to_latent

        fmap = dial_to_latent(fidelity, (x.shape[-2] * self.scale, x.shape[-1] * self.scale), name="fidelity")
        fmap = fmap.clamp(0.0, 1.0)
        step = self.fidelity_map_step
        lo = math.floor(float(fmap.min()) / step + 1e-9)
        hi = math.ceil(float(fmap.max()) / step - 1e-9)
        y = None
        for j in range(lo, hi + 1):
            level = min(1.0, j * step)
            tent = (1.0 - (fmap - level).abs() / step).clamp_(min=0.0)  # piecewise-linear interpolation weights
            if not bool((tent > 0).any()):
                continue
            out = self._upscale_rgb(x, fidelity=level, **kw)
            y = tent * out if y is None else y + tent * out
        self.set_fidelity(0.0)
        kw["extras"]["info"]["fidelity"] = "map"
        kw["extras"]["info"]["fidelity_levels"] = [min(1.0, j * step) for j in range(lo, hi + 1)]
        return y.clamp(0.0, 1.0)

    def _upscale_rgb(self, x, *, tile: Optional[int], tile_pad: Optional[int], callback, generator, extras,
                     fidelity=0.0):
        import numpy as np
        import torch

        if not isinstance(fidelity, (int, float, np.integer, np.floating)) or isinstance(fidelity, bool):
            return self._fidelity_map(x, fidelity, tile=tile, tile_pad=tile_pad, callback=callback,
                                      generator=generator, extras=extras)
        self.set_fidelity(float(fidelity))

        pad = self.default_tile_pad if tile_pad is None else int(tile_pad)
        if tile is None:
            bpp = _BYTES_PER_PIXEL.get(self.spec.arch or "", 24_000) * (0.5 if self.dtype != torch.float32 else 1)
            biggest = auto_tile_size(self.device, bpp * x.shape[0], maximum=2048)
            # Tiles carry 2*pad of context; when the whole image fits, run it in one piece (no overlap work).
            tile = balanced_tile(x.shape[-2], x.shape[-1], max(64, biggest - 2 * pad), min(pad, biggest // 4))
        overlap = min(pad, max(0, (tile or 1) // 4))

        def run(t):
            return tiled_forward(self._forward, x, scale=self.scale, tile=t, overlap=overlap if t else 0, pad=pad,
                                 size_multiple=self.size_multiple, device=self.device, dtype=self.dtype,
                                 callback=callback, stage="tiles")

        if callback is not None and self._blocks:  # progress inside a tile: one event per block of the network
            def blocks(done: int, total: int) -> None:
                report(callback, "blocks", done, total)
            self._block_callback = blocks

        try:
            with torch.inference_mode():
                y, used = (run_with_oom_retry(run, tile, device=self.device) if tile else (run(0), 0))
        finally:
            self._block_callback = None
        extras["info"] = {"tile": used, "tile_pad": pad}
        if self.fidelity_available:
            extras["info"]["fidelity"] = float(fidelity)
        return y.clamp(0.0, 1.0)  # out of place: y may be an inference-mode tensor
