"""Feed-forward SR networks (Real-ESRGAN, RealSR, any spandrel-supported checkpoint) with shared tiling."""

from __future__ import annotations

import logging
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

    ``dtype="auto"`` on a CPU with AMX-BF16 units runs the models that declare a tested bf16 bound (all
    registered GAN models: ``bf16_psnr_db`` in the registry) in bf16, ~4x faster than fp32 there; see
    :mod:`realisr.cpu`. Channels-last pays on the CPU in both dtypes (Real-ESRGAN x4plus at 96 px, one
    thread: fp32 0.70x, bf16 0.47x the time of the default layout) and is the default.
    """

    default_tile_pad = 16
    supports_batch = True  # the network takes [N, 3, H, W]; tiles cut all images of a batch alike

    def __init__(self, spec: ModelSpec, device=None, dtype=None, descriptor=None,
                 channels_last: bool = True, compile: bool = False,
                 num_threads: Optional[int] = None):
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
        Dial("fidelity", "Fidelity (0 = released GAN, 1 = L1-tuned)", "float", default=0.0, minimum=0.0,
             maximum=1.0, step=0.05, spatial=True, requires=("fidelity_delta",),
             help="weight-space interpolation towards fidelity; fewer GAN artefacts, less invented detail"),
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

    def _upscale_rgb(self, x, *, tile: Optional[int], tile_pad: Optional[int], callback, generator, extras):
        import torch

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
        return y.clamp(0.0, 1.0)  # out of place: y may be an inference-mode tensor
