"""Feed-forward SR networks (Real-ESRGAN, RealSR, any spandrel-supported checkpoint) with shared tiling."""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Optional

from ...registry import ModelSpec, WeightSource
from ...tiling import auto_tile_size, run_with_oom_retry, tiled_forward
from ..base import SRPipeline, resolve_dtype

logger = logging.getLogger(__name__)

__all__ = ["GANPipeline"]

# Peak working memory per input pixel, measured for RRDBNet x4 in fp32 on CPU (activations of the
# 64-channel trunk at input resolution plus the x4 upsampling head); compact nets need less.
_BYTES_PER_PIXEL = {"RRDBNet": 60_000, "SRVGGNetCompact": 12_000}


class GANPipeline(SRPipeline):
    """A feed-forward network loaded through spandrel.

    Args:
        spec: registry entry (for files passed with ``-m path``, a spec is made from the detected architecture).
        descriptor: a spandrel ``ImageModelDescriptor`` (loaded from ``spec`` when ``None``).
        channels_last: run convolutions in channels-last memory format (faster on CPU and tensor cores).
    """

    default_tile_pad = 16

    def __init__(self, spec: ModelSpec, device=None, dtype=None, descriptor=None, channels_last: bool = True):
        super().__init__(spec, device=device, dtype=dtype)
        import torch

        if descriptor is None:
            from ...weights.gan import load_gan_descriptor

            descriptor = load_gan_descriptor(spec)
        self.descriptor = descriptor
        self.model = descriptor.model.eval().requires_grad_(False).to(self.device, self.dtype)
        self.channels_last = channels_last
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.size_multiple = max(1, int(getattr(descriptor.size_requirements, "multiple_of", 1) or 1),
                                 spec.size_multiple)

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

    def _forward(self, x):
        import torch

        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x)

    def _upscale_rgb(self, x, *, tile: Optional[int], tile_pad: Optional[int], callback, generator, extras,
                     **kwargs):
        import torch

        pad = self.default_tile_pad if tile_pad is None else int(tile_pad)
        if tile is None:
            bpp = _BYTES_PER_PIXEL.get(self.spec.arch or "", 60_000) * (0.5 if self.dtype != torch.float32 else 1)
            tile = auto_tile_size(self.device, bpp, maximum=1024)
            if tile >= max(x.shape[-2:]):
                tile = 0
        overlap = min(pad, max(0, (tile or 1) // 4))

        def run(t):
            return tiled_forward(self._forward, x, scale=self.scale, tile=t, overlap=overlap if t else 0, pad=pad,
                                 size_multiple=self.size_multiple, device=self.device, dtype=self.dtype,
                                 callback=callback, stage="tiles")

        with torch.inference_mode():
            if tile:
                y, used = run_with_oom_retry(run, tile, device=self.device)
            else:
                y, used = run(0), 0
        extras["info"] = {"tile": used, "tile_pad": pad}
        return y.clamp(0.0, 1.0)  # out of place: y may be an inference-mode tensor
