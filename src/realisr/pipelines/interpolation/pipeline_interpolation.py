"""Interpolation baselines (bicubic, Lanczos) with Pillow, as the papers compute them."""

from __future__ import annotations

import numpy as np

from ..base import SRPipeline

__all__ = ["InterpolationPipeline"]


class InterpolationPipeline(SRPipeline):
    """Bicubic / Lanczos upscaling by the registry entry's scale with Pillow on float32 planes
    (no 8-bit rounding in between)."""

    supports_batch = True

    def _upscale_rgb(self, x, *, tile, tile_pad, callback, generator, extras):
        import torch
        from PIL import Image

        resample = {"bicubic": Image.BICUBIC, "lanczos": Image.LANCZOS}[self.spec.options["method"]]
        n, c, h, w = x.shape
        size = (w * self.scale, h * self.scale)
        out = [np.stack([np.asarray(Image.fromarray(x[k, i].numpy(), "F").resize(size, resample)) for i in range(c)])
               for k in range(n)]
        return torch.from_numpy(np.clip(np.stack(out), 0.0, 1.0))
