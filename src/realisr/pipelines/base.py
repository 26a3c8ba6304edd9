"""What every realisr pipeline shares: input conversion, alpha and grey handling, ``outscale``, device and
dtype resolution, and the output object.

A pipeline subclass implements :meth:`SRPipeline._upscale_rgb` (an NCHW float32 RGB tensor in ``[0, 1]`` to
the same ``spec.scale`` times larger) and, if it takes extra arguments (a dial, a prompt), extends
``check_inputs``. Everything else (PIL/numpy/torch inputs, alpha, grey, 16-bit metadata, outscale) is here.

Alpha: the alpha channel is upscaled separately with bicubic interpolation (antialiased on downscale),
clamped to ``[0, 1]``, and re-attached. Alpha masks are mostly smooth or hard edges, for which bicubic is
faithful; a generative model would invent texture in a mask.
Grey inputs are replicated to RGB, upscaled, and converted back with ITU-R 601 luma weights (as Pillow's "L").
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Optional, Sequence, Union

import numpy as np

from ..io.types import ImageData
from ..progress import ProgressEvent
from ..registry import ModelSpec

logger = logging.getLogger(__name__)

__all__ = ["SRPipeline", "SROutput", "to_image_data", "resolve_device", "resolve_dtype", "resize_float"]

if TYPE_CHECKING:  # pragma: no cover
    import PIL.Image
    import torch

ImageInput = Union["PIL.Image.Image", np.ndarray, "torch.Tensor", ImageData]


@dataclass
class SROutput:
    """The result of a pipeline call.

    Attributes:
        image: the restored image with the input's metadata (ICC, EXIF, bit depth); ``image.pixels`` is
            float32 ``[H, W, C]`` in ``[0, 1]``.
        scale: the total scale applied (native scale times ``outscale / native``).
        info: what was run: model id, device, dtype, tile size used, seconds.
        extras: method-specific tensors (e.g. PiSA-SR's kept predictions for instant re-dial).
    """

    image: ImageData
    scale: float
    info: dict = field(default_factory=dict)
    extras: dict = field(default_factory=dict)

    @property
    def pixels(self) -> np.ndarray:
        return self.image.pixels

    def to_pil(self):
        """A PIL image (8-bit RGB/RGBA/L/LA)."""
        from PIL import Image

        px = self.image.pixels
        arr = np.clip(np.rint(px * 255.0), 0, 255).astype(np.uint8)
        if self.image.alpha is not None:
            a = np.clip(np.rint(self.image.alpha * 255.0), 0, 255).astype(np.uint8)[..., None]
            arr = np.concatenate([arr, a], axis=2)
        if arr.shape[2] == 1:
            return Image.fromarray(arr[..., 0], "L")
        if arr.shape[2] == 2:
            return Image.fromarray(arr, "LA")
        return Image.fromarray(arr, "RGBA" if arr.shape[2] == 4 else "RGB")

    def to_numpy(self, dtype=np.uint8) -> np.ndarray:
        """``[H, W, C]`` array (alpha appended) as uint8, uint16 or float32."""
        px = self.image.pixels
        if self.image.alpha is not None:
            px = np.concatenate([px, self.image.alpha[..., None]], axis=2)
        if dtype == np.float32:
            return px.astype(np.float32)
        peak = np.iinfo(dtype).max
        return np.clip(np.rint(px * peak), 0, peak).astype(dtype)


def to_image_data(image: ImageInput) -> ImageData:
    """Convert a PIL image, numpy array, torch tensor or :class:`ImageData` to :class:`ImageData`.

    numpy: ``[H, W]``, ``[H, W, C]`` with C in 1..4; uint8, uint16 or float in ``[0, 1]``.
    torch: ``[C, H, W]`` or ``[1, C, H, W]`` float in ``[0, 1]`` (or uint8).
    PIL: any mode; decoded as :func:`realisr.io.image_io.pil_to_image_data` does (alpha, palette, CMYK...).
    """
    if isinstance(image, ImageData):
        return image
    mod = type(image).__module__
    if mod.startswith("PIL."):
        from ..io.image_io import pil_to_image_data

        return pil_to_image_data(image)
    if mod.startswith("torch"):
        t = image.detach().cpu()
        if t.ndim == 4:
            if t.shape[0] != 1:
                raise ValueError(f"expected one image, got a batch of {t.shape[0]}: call the pipeline per image")
            t = t[0]
        if t.ndim != 3:
            raise ValueError(f"expected a [C,H,W] tensor, got shape {tuple(image.shape)}")
        arr = t.permute(1, 2, 0).numpy()
        if arr.dtype not in (np.uint8, np.uint16):
            arr = arr.astype(np.float32)
        return _array_to_image_data(arr)
    if isinstance(image, np.ndarray):
        return _array_to_image_data(image)
    raise TypeError(f"unsupported image type {type(image).__name__}: pass a PIL image, numpy array, "
                    "torch tensor or realisr.io.ImageData")


def _array_to_image_data(arr: np.ndarray) -> ImageData:
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 2, 3, 4):
        raise ValueError(f"expected an [H,W,C] array with 1-4 channels, got shape {arr.shape}")
    bit_depth = 16 if arr.dtype == np.uint16 else 8
    if arr.dtype == np.uint8:
        f = arr.astype(np.float32) / 255.0
    elif arr.dtype == np.uint16:
        f = arr.astype(np.float32) / 65535.0
    elif np.issubdtype(arr.dtype, np.floating):
        f = arr.astype(np.float32)
        if f.size and (np.nanmin(f) < -1e-3 or np.nanmax(f) > 1 + 1e-3):
            raise ValueError("float images must be in [0, 1]")
        f = np.clip(f, 0.0, 1.0)
    else:
        raise ValueError(f"unsupported array dtype {arr.dtype}: use uint8, uint16 or float in [0, 1]")
    alpha = None
    if f.shape[2] in (2, 4):
        alpha = np.ascontiguousarray(f[..., -1])
        f = f[..., :-1]
    return ImageData(pixels=np.ascontiguousarray(f), alpha=alpha, bit_depth=bit_depth,
                     mode={1: "L", 3: "RGB"}[f.shape[2]] + ("A" if alpha is not None else ""))


def resolve_device(device=None):
    """``None``/``"auto"`` -> CUDA if available, else MPS, else CPU."""
    import torch

    if device is None or device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(device)


_DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16", "half": "float16",
           "bfloat16": "bfloat16", "bf16": "bfloat16"}


def resolve_dtype(dtype, device, supported: tuple[str, ...] = ("float32",), prefer: str = "float16"):
    """``"auto"`` -> float32 on CPU; on CUDA ``prefer`` (bf16 only where the GPU supports it) if the model
    supports it, else float32. An explicit dtype must be one the model supports."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    dev = torch.device(device)
    if dtype is None or dtype == "auto":
        if dev.type != "cuda":
            return torch.float32
        if prefer == "bfloat16" and not torch.cuda.is_bf16_supported():
            prefer = "float16"
        return getattr(torch, prefer) if prefer in supported else torch.float32
    name = _DTYPES.get(str(dtype).lower())
    if name is None:
        raise ValueError(f"unknown dtype {dtype!r}: use auto, fp32, fp16 or bf16")
    if name not in supported:
        raise ValueError(f"this model supports {', '.join(supported)}, not {name}")
    return getattr(torch, name)


def resize_float(x, size: tuple[int, int], mode: str = "bicubic"):
    """Resize an NCHW float tensor to ``(h, w)`` (antialiased when shrinking), clamped to ``[0, 1]``."""
    import torch.nn.functional as F

    if tuple(x.shape[-2:]) == tuple(size):
        return x
    down = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    y = F.interpolate(x, size=size, mode=mode, align_corners=False, antialias=down and mode in ("bicubic", "bilinear"))
    return y.clamp_(0.0, 1.0)


class SRPipeline:
    """Base class of all pipelines (see the module docstring).

    Subclasses set ``self.spec`` and implement ``_upscale_rgb``. The public call is the same everywhere:
    ``pipe(image, outscale=None, tile=None, tile_pad=None, callback=None, generator=None, **method_args)``.
    """

    spec: ModelSpec
    #: ``_upscale_rgb`` takes ``[N, 3, H, W]`` (same-size images) in one pass and returns ``[N, 3, sH, sW]``;
    #: per-image extras go to ``extras["per_image"]`` (a list of dicts). Otherwise a list is run image by image.
    supports_batch: bool = False

    def __init__(self, spec: ModelSpec, device=None, dtype=None):
        self.spec = spec
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device, spec.dtypes)

    # -- to implement -----------------------------------------------------------------------------------
    def _upscale_rgb(self, x, *, tile: Optional[int], tile_pad: Optional[int], callback, generator, **kwargs):
        """Upscale ``x`` (``[1, 3, H, W]`` float32 CPU, ``[0, 1]``; ``[N, ...]`` with :attr:`supports_batch`) by
        ``spec.scale``; return float32 CPU."""
        raise NotImplementedError

    # -- shared -------------------------------------------------------------------------------------------
    @property
    def scale(self) -> int:
        return self.spec.scale

    def check_inputs(self, image: ImageData, outscale: Optional[float], tile: Optional[int],
                     tile_pad: Optional[int], **kwargs) -> None:
        """Validate arguments; raises ``ValueError`` naming the bad argument."""
        if outscale is not None and not (outscale > 0 and np.isfinite(outscale)):
            raise ValueError(f"outscale must be a positive number, got {outscale!r}")
        if tile is not None and tile != 0 and tile < 8:
            raise ValueError(f"tile must be 0 (no tiling) or at least 8 pixels, got {tile}")
        if tile_pad is not None and tile_pad < 0:
            raise ValueError(f"tile_pad must be >= 0, got {tile_pad}")
        if image.height < 1 or image.width < 1:
            raise ValueError("the image is empty")
        unknown = [k for k in kwargs]
        if unknown:
            raise TypeError(f"{type(self).__name__} got unexpected argument(s): {', '.join(unknown)}")

    def __call__(self, image: Union[ImageInput, Sequence[ImageInput]], *, outscale: Optional[float] = None,
                 tile: Optional[int] = None, tile_pad: Optional[int] = None,
                 callback: Optional[Callable[[ProgressEvent], None]] = None, generator=None,
                 **kwargs) -> Union[SROutput, list[SROutput]]:
        """Restore and upscale one image, or a list of images.

        Args:
            image: PIL image, numpy array, torch tensor or :class:`~realisr.io.ImageData`; or a list of them,
                which returns a list of outputs. Images of the same size go through the network as one batch
                where the pipeline supports it (:attr:`supports_batch`), each with the result it would have alone
                (to float rounding); others are processed one by one.
            outscale: final scale relative to the input (any positive float); the model runs at its native
                scale and the result is resized (Lanczos-like bicubic with antialiasing). Default: native.
            tile: tile size in input pixels (``None``: the pipeline's default; ``0``: no tiling).
            tile_pad: context around each tile in input pixels.
            callback: progress callback (see :mod:`realisr.progress`).
            generator: ``torch.Generator`` for pipelines that sample; for a list of images, one generator or a
                list with one per image (then each image draws as it would alone).
            **kwargs: method-specific arguments (e.g. ``lambda_pix``), validated by ``check_inputs``; the same
                for every image of a list.

        Returns:
            :class:`SROutput`, or a list of them for a list of images.
        """
        if isinstance(image, (list, tuple)):
            gens = generator if isinstance(generator, (list, tuple)) else None
            if gens is not None and len(gens) != len(image):
                raise ValueError(f"{len(gens)} generators for {len(image)} images: give one per image or one")
            datas = [to_image_data(im) for im in image]
            for d in datas:
                self.check_inputs(d, outscale, tile, tile_pad, **kwargs)
            groups: dict = {}
            for i, d in enumerate(datas):  # same-size images share a batch
                key = (d.height, d.width) if self.supports_batch else i
                groups.setdefault(key, []).append(i)
            outs: list = [None] * len(datas)
            for idx in groups.values():
                gen = [gens[i] for i in idx] if gens is not None else generator
                if gens is not None and len(idx) == 1:
                    gen = gen[0]
                for i, o in zip(idx, self._run_batch([datas[i] for i in idx], outscale, tile, tile_pad, callback,
                                                     gen, kwargs)):
                    outs[i] = o
            return outs
        data = to_image_data(image)
        self.check_inputs(data, outscale, tile, tile_pad, **kwargs)
        return self._run_batch([data], outscale, tile, tile_pad, callback, generator, kwargs)[0]

    def _run_batch(self, datas: list, outscale, tile, tile_pad, callback, generator, kwargs) -> list:
        """One ``_upscale_rgb`` call on same-size images (checked already), then each image's own finish."""
        import torch

        t0 = time.perf_counter()
        xs, greys = [], []
        for data in datas:
            x = torch.from_numpy(np.ascontiguousarray(data.pixels.transpose(2, 0, 1)))[None].float()
            greys.append(x.shape[1] == 1)
            xs.append(x.expand(-1, 3, -1, -1) if greys[-1] else x)
        x = torch.cat(xs).contiguous() if len(xs) > 1 else xs[0].contiguous()
        extras: dict = {}
        y = self._upscale_rgb(x, tile=tile, tile_pad=tile_pad, callback=callback, generator=generator,
                              extras=extras, **kwargs)
        native_hw = (y.shape[-2], y.shape[-1])
        per_image = extras.pop("per_image", None)
        info_common = extras.pop("info", {})
        seconds = time.perf_counter() - t0
        outs = []
        for i, data in enumerate(datas):
            own = dict(per_image[i]) if per_image is not None else dict(extras)
            info = {"model": self.spec.id, "device": str(self.device), "dtype": str(self.dtype).replace("torch.", ""),
                    "seconds": seconds, "native_size": native_hw}
            if len(datas) > 1:
                info["batch"] = len(datas)
            info.update(info_common)
            info.update(own.pop("info", {}))
            outs.append(self._finish_image(data, y[i:i + 1], greys[i], outscale, info, own))
        return outs

    def _finish_image(self, data: ImageData, y, grey: bool, outscale, info: dict, extras: dict) -> SROutput:
        """The output of one image: ``outscale``, grey, alpha, metadata."""
        import torch

        target = (y.shape[-2], y.shape[-1])
        if outscale is not None:
            target = (max(1, round(data.height * outscale)), max(1, round(data.width * outscale)))
        y = resize_float(y.float(), target)
        if grey:
            w = torch.tensor([0.299, 0.587, 0.114], dtype=y.dtype).view(1, 3, 1, 1)
            y = (y * w).sum(1, keepdim=True)
        alpha = None
        if data.alpha is not None:
            a = torch.from_numpy(data.alpha)[None, None].float()
            alpha = resize_float(a, target)[0, 0].numpy()
        out = data.with_pixels(y[0].permute(1, 2, 0).contiguous().numpy(), alpha)
        return SROutput(image=out, scale=target[1] / data.width, info=info, extras=extras)

    @classmethod
    def is_stochastic(cls, spec: ModelSpec, **call_kwargs) -> bool:
        """Whether a call with these arguments samples (its output depends on ``generator``): the registry
        entry's ``options["stochastic"]``; pipelines with optional sampling extend this."""
        return bool(spec.options.get("stochastic", False))

    @classmethod
    def from_spec(cls, spec: ModelSpec, device=None, dtype=None, **kwargs) -> "SRPipeline":
        """Build the pipeline for a registry entry (loading its weights)."""
        return cls(spec, device=device, dtype=dtype, **kwargs)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model={self.spec.id!r}, device={self.device}, dtype={self.dtype})"
