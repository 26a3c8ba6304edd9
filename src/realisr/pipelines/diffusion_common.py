"""What the one-step diffusion SR pipelines (PiSA-SR, OSEDiff) share: pre/post-processing as the official test
scripts do it, latent tiling of the UNet with the official Gaussian blending, VAE encode/decode (optionally
tiled) and per-pixel dial maps.

Pre-processing, ``resize_mode="official"`` (``test_pisasr.py`` / ``test_osediff.py``):

1. If a side is shorter than ``process_size // scale``, resize so that the short side is exactly that
   (``s = (process_size // scale) / min(W, H)``, new size ``(int(s*W), int(s*H))``, PIL bicubic);
   this is the official ``resize_flag``.
2. Upscale by ``scale`` with PIL bicubic.
3. Resize (LANCZOS) to ``(W - W % 8, H - H % 8)``.

On 8-bit data this runs on uint8 PIL images exactly as the scripts do (bit-exact); on 16-bit or float data it
runs the same Pillow filters on float planes (no 8-bit rounding). After the model, the colour fix runs at the
processed size against the processed LQ, and the result is resized (PIL bicubic, float) to exactly
``scale x`` the input size. The official scripts only resize back when ``resize_flag`` is set (PiSA-SR) or
never (OSEDiff drops the result of its resize): realisr always returns ``scale x`` the input size.

``compat="official"`` reproduces the official scripts' *output path* exactly instead (see
:func:`finish_output_official` and ``docs/pisa-sr-osediff.md``): the input is taken as 8-bit RGB, the decoded
image is quantised to uint8 by truncation (torchvision ``ToPILImage``), colour-fixed as an 8-bit image against
the processed LQ and truncated again, resized back in 8 bits (PiSA-SR, only with ``resize_flag``), and returned
at the official size (the processed size unless PiSA-SR resized back; OSEDiff never does). Its values are
multiples of 1/255, so realisr's writer stores exactly the official 8-bit PNG.

``resize_mode="pad"``: bicubic x``scale`` only, then the image is padded (reflect) on the bottom/right to a
multiple of 8 and the output cropped; no other resampling, so pixel geometry is kept exactly, but tiny
inputs are processed at their own size (no minimum of ``process_size``).

Latent tiling (official rule, both repos): tiling runs when ``h * w > tile**2`` (latent units). The tile is
square, ``T = min(tile, h, w)``; origins per axis are ``0, T - overlap, 2(T - overlap), ...`` while
``origin + T < size``, and the last tile is snapped to ``size - T``. Each tile is one UNet call; the
predictions are blended with the separable Gaussian ``exp(-(x - m)^2 / (2 * 0.01 * T^2)) / sqrt(2 pi 0.01)``
(float64), ``m = (T - 1) / 2`` (OSEDiff uses ``m = T / 2`` on the y axis: ``flavor="osediff"``). Fixes over
the official code: the weights are built for the clamped tile (PiSA-SR crashes on thin images), and an
overlap not smaller than the clamped tile (an infinite loop officially) is an error naming both sizes.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

if TYPE_CHECKING:  # pragma: no cover
    from collections import OrderedDict

import numpy as np

logger = logging.getLogger(__name__)

__all__ = [
    "RESIZE_MODES",
    "PROCESSING_MODES",
    "COMPAT_MODES",
    "COMMON_ARGS",
    "resolve_latent_tiling",
    "Preprocessed",
    "preprocess",
    "official_sizes",
    "pil_resize",
    "finish_output",
    "preprocess_on_device",
    "finish_output_on_device",
    "finish_output_official",
    "latent_tile_plan",
    "gaussian_tile_weights",
    "gaussian_window",
    "tiled_latent_predict",
    "ddpm_step",
    "vae_posterior",
    "vae_encode",
    "vae_decode",
    "cached_prompt_embeds",
    "dial_to_latent",
    "vae_dtype_for",
    "move_module",
    "OneStepDiffusionPipeline",
]

RESIZE_MODES = ("official", "pad")
PROCESSING_MODES = ("auto", "host", "device")
#: ``compat`` values shared by the diffusion pipelines: ``"default"`` (realisr's fixes) or ``"official"`` (the
#: official scripts' behaviour, their bugs included; documented per method in ``docs/``).
COMPAT_MODES = ("default", "official")


@dataclass
class Preprocessed:
    """The model input and what is needed to undo the geometry.

    Attributes:
        image: ``[1, 3, H, W]`` float32 in ``[0, 1]``: the processed LQ (what the VAE encodes, after ``*2-1``;
            also the colour-fix source).
        input_size: ``(h, w)`` of the original input.
        out_size: ``(scale*h, scale*w)``: the size the pipeline returns.
        mode: ``"official"`` or ``"pad"``.
        resize_flag: the official short-side resize happened.
        pad: ``(pad_h, pad_w)`` added at the bottom/right (``"pad"`` mode).
        exact_8bit: the input was 8-bit and the uint8 PIL path was used.
    """

    image: "object"
    input_size: tuple[int, int]
    out_size: tuple[int, int]
    mode: str
    resize_flag: bool = False
    pad: tuple[int, int] = (0, 0)
    exact_8bit: bool = False

    @property
    def size(self) -> tuple[int, int]:
        return tuple(self.image.shape[-2:])

    @property
    def content_size(self) -> tuple[int, int]:
        """``(H, W)`` of the processed image without padding."""
        h, w = self.size
        return h - self.pad[0], w - self.pad[1]


def official_sizes(width: int, height: int, scale: int, process_size: int):
    """The official geometry: ``(resize_flag, size after short-side resize, size after xscale, final size)``,
    sizes as ``(W, H)`` like PIL."""
    short = process_size // scale
    flag = False
    size = (width, height)
    if width < short or height < short:
        s = short / min(width, height)
        size = (int(s * width), int(s * height))
        flag = True
    up = (size[0] * scale, size[1] * scale)
    final = (up[0] - up[0] % 8, up[1] - up[1] % 8)
    return flag, size, up, final


def _is_8bit(x) -> bool:
    v = x.numpy() * 255.0
    return bool(np.abs(v - np.rint(v)).max() < 1e-3)


def pil_resize(x, size_wh: tuple[int, int], resample, *, exact_8bit: bool):
    """Resize ``[N, 3, H, W]`` float ``[0, 1]`` with Pillow: through uint8 RGB (``exact_8bit``, as the official
    scripts) or per float plane. Returns float32 ``[N, 3, h, w]`` in ``[0, 1]``."""
    import torch
    from PIL import Image

    if tuple(size_wh) == (x.shape[-1], x.shape[-2]):
        return x
    if x.shape[0] > 1:  # Pillow resizes one image at a time
        return torch.cat([pil_resize(x[i:i + 1], size_wh, resample, exact_8bit=exact_8bit)
                          for i in range(x.shape[0])])
    if exact_8bit:
        arr = np.rint(x[0].permute(1, 2, 0).numpy() * 255.0).clip(0, 255).astype(np.uint8)
        out = np.asarray(Image.fromarray(arr, "RGB").resize(tuple(size_wh), resample))
        return torch.from_numpy(out.copy()).permute(2, 0, 1)[None].float().div(255)
    planes = [np.asarray(Image.fromarray(x[0, c].numpy().astype(np.float32), "F").resize(tuple(size_wh), resample))
              for c in range(x.shape[1])]
    return torch.from_numpy(np.clip(np.stack(planes), 0.0, 1.0))[None].float()


def preprocess(x, *, scale: int = 4, process_size: int = 512, mode: str = "official",
               multiple_filter: str = "lanczos", force_8bit: bool = False) -> Preprocessed:
    """Pre-process an LQ image as the official scripts do (see the module docstring).

    Args:
        x: ``[N, 3, h, w]`` float32 CPU tensor in ``[0, 1]``.
        scale: the upscaling factor (4 for the released models).
        process_size: the official ``--process_size`` (512).
        mode: ``"official"`` or ``"pad"``.
        multiple_filter: the PIL filter of step 3 (the resize to a multiple of 8): ``"lanczos"`` (PiSA-SR,
            OSEDiff) or ``"bicubic"`` (SeeSR, whose script calls ``resize`` with PIL's default).
        force_8bit: resample through rounded uint8 images even when ``x`` has finer levels (16-bit or float
            input), as the official scripts' ``convert("RGB")`` does (``compat="official"``).

    Raises:
        ValueError: unknown mode or bad sizes.
    """
    import torch.nn.functional as F
    from PIL import Image

    if mode not in RESIZE_MODES:
        raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {mode!r}")
    if x.shape[0] > 1:  # a batch of same-size images: each as it would be alone
        import dataclasses

        import torch

        pres = [preprocess(x[i:i + 1], scale=scale, process_size=process_size, mode=mode,
                           multiple_filter=multiple_filter, force_8bit=force_8bit) for i in range(x.shape[0])]
        return dataclasses.replace(pres[0], image=torch.cat([p.image for p in pres]),
                                   exact_8bit=all(p.exact_8bit for p in pres))
    h, w = x.shape[-2:]
    exact = _is_8bit(x)
    if force_8bit and not exact:
        logger.info("compat='official': the input is reduced to 8 bits per channel, as the official scripts do")
        exact = True
    out_size = (h * scale, w * scale)
    if mode == "official":
        flag, size, up, final = official_sizes(w, h, scale, process_size)
        if min(final) < 8:
            raise ValueError(f"image of {w}x{h} is too small for x{scale}: it needs at least 8 output pixels per side")
        y = pil_resize(x, size, Image.BICUBIC, exact_8bit=exact)
        y = pil_resize(y, up, Image.BICUBIC, exact_8bit=exact)
        if multiple_filter not in ("lanczos", "bicubic"):
            raise ValueError(f"multiple_filter must be 'lanczos' or 'bicubic', got {multiple_filter!r}")
        y = pil_resize(y, final, Image.LANCZOS if multiple_filter == "lanczos" else Image.BICUBIC, exact_8bit=exact)
        return Preprocessed(y, (h, w), out_size, mode, resize_flag=flag, exact_8bit=exact)
    y = pil_resize(x, (w * scale, h * scale), Image.BICUBIC, exact_8bit=exact)
    ph, pw = (-y.shape[-2]) % 8, (-y.shape[-1]) % 8
    if ph or pw:
        pad_mode = "reflect" if ph < y.shape[-2] and pw < y.shape[-1] else "replicate"
        y = F.pad(y, (0, pw, 0, ph), mode=pad_mode)
    return Preprocessed(y.contiguous(), (h, w), out_size, mode, pad=(ph, pw), exact_8bit=exact)


def finish_output(y, pre: Preprocessed, color_fix: str = "adain"):
    """Colour-fix a decoded image and bring it to ``pre.out_size``.

    Args:
        y: ``[1, 3, H, W]`` float in ``[0, 1]`` at the processed size (decoder output ``*0.5+0.5``, clamped).
        pre: the pre-processing record.
        color_fix: ``"adain"``, ``"wavelet"`` or ``"none"``.

    Returns:
        ``[1, 3, scale*h, scale*w]`` float32 CPU in ``[0, 1]``. The colour fix runs on ``y``'s device (one
        copy of the final image to the host, not two of the full-size float images).
    """
    from PIL import Image

    from ..color_fix import color_fix as _fix

    y = y.float()
    src = pre.image.to(y.device)
    if pre.mode == "pad":
        ch, cw = pre.content_size
        y, src = y[..., :ch, :cw], src[..., :ch, :cw]
    y = _fix(y, src, color_fix).cpu()
    if tuple(y.shape[-2:]) != tuple(pre.out_size):
        y = pil_resize(y.contiguous(), (pre.out_size[1], pre.out_size[0]), Image.BICUBIC, exact_8bit=False)
    return y.contiguous()


def preprocess_on_device(x, *, scale: int = 4, process_size: int = 512, mode: str = "official",
                         device=None) -> Preprocessed:
    """:func:`preprocess` on ``device`` (the default mode's path on a GPU): the same geometry and Pillow's
    filters as matrices (:func:`realisr.resample.pil_resize_tensor`), with 8-bit inputs rounded to 8-bit levels
    after each pass as Pillow's uint8 path does. Equal to :func:`preprocess` within one 8-bit level (at a few
    values in ten thousand where Pillow's fixed-point weights round the other way), 16-bit and float inputs to
    float32 rounding. Only the small LQ image is copied to the device.

    Raises:
        ValueError: unknown mode or bad sizes.
    """
    import torch
    import torch.nn.functional as F

    from ..resample import pil_resize_tensor

    if mode not in RESIZE_MODES:
        raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {mode!r}")
    n, _, h, w = x.shape
    flags = [_is_8bit(x[i:i + 1]) for i in range(n)]
    exact = torch.tensor(flags) if len(set(flags)) > 1 else flags[0]
    y = x.to(device=device, dtype=torch.float32, non_blocking=True)
    out_size = (h * scale, w * scale)
    if mode == "official":
        flag, size, up, final = official_sizes(w, h, scale, process_size)
        if min(final) < 8:
            raise ValueError(f"image of {w}x{h} is too small for x{scale}: it needs at least 8 output pixels per side")
        for (sw, sh), name in ((size, "bicubic"), (up, "bicubic"), (final, "lanczos")):
            if (sh, sw) != tuple(y.shape[-2:]):
                y = pil_resize_tensor(y, (sh, sw), name, round_8bit=exact)
        return Preprocessed(y.contiguous(), (h, w), out_size, mode, resize_flag=flag, exact_8bit=all(flags))
    y = pil_resize_tensor(y, (h * scale, w * scale), "bicubic", round_8bit=exact)
    ph, pw = (-y.shape[-2]) % 8, (-y.shape[-1]) % 8
    if ph or pw:
        pad_mode = "reflect" if ph < y.shape[-2] and pw < y.shape[-1] else "replicate"
        y = F.pad(y, (0, pw, 0, ph), mode=pad_mode)
    return Preprocessed(y.contiguous(), (h, w), out_size, mode, pad=(ph, pw), exact_8bit=all(flags))


def finish_output_on_device(y, pre: Preprocessed, color_fix: str = "adain"):
    """:func:`finish_output` with the final resize on ``y``'s device too (Pillow's bicubic as matrices, float):
    one copy to the host, of the final image. Equal to :func:`finish_output` to float32 rounding."""
    from ..color_fix import color_fix as _fix
    from ..resample import pil_resize_tensor

    y = y.float()
    src = pre.image.to(y.device)
    if pre.mode == "pad":
        ch, cw = pre.content_size
        y, src = y[..., :ch, :cw], src[..., :ch, :cw]
    y = _fix(y, src, color_fix)
    if tuple(y.shape[-2:]) != tuple(pre.out_size):
        y = pil_resize_tensor(y, pre.out_size, "bicubic")
    return y.cpu().contiguous()


def _truncate_u8(y):
    """torchvision ``ToPILImage`` on a float tensor in ``[0, 1]``: ``(y * 255).byte()``, truncating (not rounding)."""
    import torch

    return y.mul(255).to(torch.uint8)


def finish_output_official(y, pre: Preprocessed, color_fix: str = "adain", *, resize_back: bool):
    """The official test scripts' output path, bit for bit (``compat="official"``).

    1. ``ToPILImage(y)``: uint8 by truncation of ``y * 255``;
    2. colour fix of that 8-bit image against the processed LQ (``ToTensor`` of both, the float fix, clamp,
       ``ToPILImage`` again: truncation);
    3. with ``resize_back`` and the official ``resize_flag``: 8-bit PIL bicubic resize to ``scale x`` the input
       size (PiSA-SR); otherwise the processed size is kept (the official output size: the input times
       ``scale`` made a multiple of 8 by resizing; OSEDiff also keeps it when ``resize_flag`` is set, because
       its script drops the result of its resize).

    Args:
        y: ``[N, 3, H, W]`` float in ``[0, 1]`` at the processed size (decoder output ``*0.5+0.5``, clamped);
            a batch is finished image by image, each as it would be alone.
        pre: the pre-processing record (``pre.image`` must be the 8-bit processed LQ: ``force_8bit``).
        color_fix: ``"adain"``, ``"wavelet"`` or ``"none"``.
        resize_back: resize back when ``pre.resize_flag`` is set (PiSA-SR: True; OSEDiff: False).

    Returns:
        float32 CPU ``[N, 3, h, w]`` whose values are exactly ``k / 255``.
    """
    import dataclasses

    import torch
    from PIL import Image

    from ..color_fix import color_fix as _fix
    from ..color_fix import normalize_mode

    if pre.mode != "official" or not pre.exact_8bit:
        raise ValueError("compat='official' needs resize_mode='official' and the 8-bit pre-processing")
    if y.shape[0] > 1:
        return torch.cat([finish_output_official(y[i:i + 1], dataclasses.replace(pre, image=pre.image[i:i + 1]),
                                                 color_fix, resize_back=resize_back) for i in range(y.shape[0])])
    q = _truncate_u8(y.float())
    mode = normalize_mode(color_fix)
    if mode != "none":
        q = _truncate_u8(_fix(q.float().div(255), pre.image.to(q.device), mode))
    arr = q[0].permute(1, 2, 0).cpu().numpy()
    if resize_back and pre.resize_flag:
        h, w = pre.out_size
        arr = np.asarray(Image.fromarray(arr, "RGB").resize((w, h), Image.BICUBIC))
    return torch.from_numpy(np.array(arr, copy=True)).permute(2, 0, 1)[None].float().div(255)


# ------------------------------------------------------------------------------------------------------------
# Latent tiling
def resolve_latent_tiling(options: dict, scale: int, tile=None, tile_pad=None, latent_tile=None,
                          latent_overlap=None) -> tuple[int, int]:
    """The latent tile/overlap of a call: explicit ``latent_*`` args, else the base ``tile``/``tile_pad`` (input
    pixels) converted to latents (a tile of at least 8 latents), else the registry defaults ``options``
    (96 / 32; a tile smaller than the default overlap gets a third of itself as its default overlap).

    Raises:
        ValueError: the overlap is not smaller than the tile (naming the arguments it came from).
    """
    opts = options
    given = []
    if latent_tile is None:
        if tile is not None:
            latent_tile = 0 if tile == 0 else max(8, int(tile) * scale // 8)
            given.append(f"tile {tile} px")
        else:
            latent_tile = int(opts.get("latent_tile", 96))
    if latent_overlap is None:
        if tile_pad is not None:
            latent_overlap = int(tile_pad) * scale // 8
            given.append(f"tile_pad {tile_pad} px")
        else:
            latent_overlap = int(opts.get("latent_overlap", 32))
            if latent_tile and latent_overlap >= latent_tile:
                # the default overlap does not fit a small tile the user chose: the default's ratio (96/32)
                latent_overlap = int(latent_tile) // 3
    if latent_tile and latent_overlap >= latent_tile:
        src = f" (from {' and '.join(given)})" if given else ""
        raise ValueError(f"latent overlap {latent_overlap} must be smaller than latent tile {latent_tile}{src}: "
                         "use a smaller --tile-pad / --latent-overlap or a larger --tile / --latent-tile")
    return int(latent_tile), int(latent_overlap)


def latent_tile_plan(h: int, w: int, tile: Optional[int], overlap: int) -> Optional[tuple[int, int]]:
    """``(T, overlap)`` when the official rule tiles an ``h x w`` latent, else ``None`` (one pass).

    Raises:
        ValueError: ``overlap`` is negative or not smaller than the tile ``T = min(tile, h, w)`` (the
            official code loops forever there; realisr does not guess another overlap).
    """
    if not tile or h * w <= tile * tile:
        return None
    t = min(int(tile), h, w)
    ov = int(overlap)
    if ov < 0 or ov >= t:
        clamped = f" (the tile is clamped to the latent's short side, {min(h, w)})" if t < int(tile) else ""
        raise ValueError(f"latent_overlap {ov} must be >= 0 and smaller than the latent tile {t}{clamped}: "
                         f"pass a smaller latent_overlap (--latent-overlap), e.g. {t // 2}")
    return t, ov


def gaussian_tile_weights(height: int, width: int, flavor: str = "pisa"):
    """The official ``[height, width]`` float64 Gaussian tile weights (sigma = 0.1 * side).

    ``flavor="osediff"`` puts the y midpoint at ``height / 2`` (the official asymmetry); ``"pisa"`` at
    ``(height - 1) / 2``.
    """
    import torch

    var = 0.01

    def probs(n: int, mid: float):
        return [math.exp(-(i - mid) * (i - mid) / (n * n) / (2 * var)) / math.sqrt(2 * math.pi * var)
                for i in range(n)]

    x = probs(width, (width - 1) / 2)
    y = probs(height, height / 2 if flavor == "osediff" else (height - 1) / 2)
    return torch.from_numpy(np.outer(y, x))


def gaussian_window(flavor: str) -> Callable:
    """A :func:`realisr.tiling.tiled_forward` window callable giving :func:`gaussian_tile_weights`."""
    def window(h, w, neighbours, overlaps):
        return gaussian_tile_weights(h, w, flavor)
    return window


def tiled_latent_predict(fn: Callable, z, *, tile: Optional[int], overlap: int, flavor: str,
                         callback=None, out_channels: Optional[int] = None, context=None, context_scale: int = 8):
    """Run ``fn`` (latent tile -> prediction) on ``z`` with the official tiling and Gaussian blending.

    Args:
        fn: maps ``[1, 4, t, t]`` latents to an NCHW prediction of the same spatial size; with ``context``,
            ``fn(z_tile, context_tile)``.
        z: ``[1, 4, h, w]`` latents (device and dtype as ``fn`` wants them).
        tile, overlap: the official ``latent_tiled_size`` / ``latent_tiled_overlap``; ``tile`` 0/None: no tiling.
        flavor: ``"pisa"`` or ``"osediff"`` (the Gaussian's y midpoint).
        out_channels: channels of ``fn``'s output (default: as ``z``).
        context: an optional NCHW tensor covering the same area at ``context_scale`` times the latent
            resolution (e.g. a ControlNet's pixel-space condition); each call gets the crop under its tile.
        context_scale: pixels of ``context`` per latent (8 for an SD VAE).

    Returns:
        The blended prediction, float32, on ``z``'s device.
    """
    import torch
    import torch.nn.functional as F

    from ..progress import report
    from ..tiling import tiled_forward

    h, w = z.shape[-2:]
    run, inp = fn, z
    if context is not None:
        if tuple(context.shape[-2:]) != (h * context_scale, w * context_scale):
            raise ValueError(f"context of {tuple(context.shape[-2:])} does not cover latents of {(h, w)} "
                             f"at scale {context_scale}")
        # the context rides along as extra channels (space-to-depth: an exact rearrangement), so the tiler
        # crops it with each tile
        nz = z.shape[1]
        inp = torch.cat([z, F.pixel_unshuffle(context.to(device=z.device, dtype=z.dtype), context_scale)], dim=1)

        def unpack_and_run(packed):
            return fn(packed[:, :nz], F.pixel_shuffle(packed[:, nz:], context_scale))

        run = unpack_and_run
        out_channels = out_channels or nz
    plan = latent_tile_plan(h, w, tile, overlap)
    if plan is None:
        report(callback, "unet", 0, 1)
        out = run(inp)
        report(callback, "unet", 1, 1)
        return out.float()
    t, ov = plan
    logger.debug("latent tiling %dx%d: tile %d overlap %d", w, h, t, ov)
    return tiled_forward(run, inp, scale=1, tile=t, overlap=ov, pad=0, window=gaussian_window(flavor),
                         out_channels=out_channels, out_device=z.device, callback=callback, stage="unet")


def ddpm_step(z, eps, alphas_cumprod, t: int, prev_t: int, noise=None):
    """One DDPM ancestral step ``z_t -> z_{prev_t}`` for an epsilon-predicting model with the "fixed_small"
    variance, in float32 and in the order of diffusers' ``DDPMScheduler.step``:

    ``x0 = (z - sqrt(1 - abar_t) eps) / sqrt(abar_t)``, ``alpha = abar_t / abar_prev``,
    ``mean = sqrt(abar_prev) (1 - alpha) / (1 - abar_t) x0 + sqrt(alpha) (1 - abar_prev) / (1 - abar_t) z``,
    ``z_prev = mean + sqrt(max((1 - abar_prev) / (1 - abar_t) (1 - alpha), 1e-20)) noise`` (no noise at
    ``t == 0``), with ``abar_prev = 1`` when ``prev_t < 0``.

    Unlike ``DDPMScheduler.step`` the noise is an argument, so a caller can draw it (or replay recorded draws).
    CCSR and SeeSR both step with it.

    Args:
        z: the current sample; eps: the predicted noise (same shape).
        alphas_cumprod: the scheduler's ``alphas_cumprod`` (1-D).
        t, prev_t: this and the next timestep of the schedule (``prev_t < 0`` after the last one).
        noise: standard normal noise like ``z`` (required when ``t > 0``).

    Returns:
        ``(z_prev, x0)``, float32.
    """
    import torch

    a = alphas_cumprod.to(device=z.device, dtype=torch.float32)
    one = torch.ones((), device=z.device, dtype=torch.float32)
    a_t = a[int(t)] if t >= 0 else one
    a_prev = a[int(prev_t)] if prev_t >= 0 else one
    beta_t, beta_prev = 1 - a_t, 1 - a_prev
    alpha = a_t / a_prev
    z, eps = z.float(), eps.float()
    x0 = (z - beta_t ** 0.5 * eps) / a_t ** 0.5
    prev = (a_prev ** 0.5 * (1 - alpha)) / beta_t * x0 + alpha ** 0.5 * beta_prev / beta_t * z
    if t > 0:
        if noise is None:
            raise ValueError("ddpm_step: a step with t > 0 needs its variance noise")
        var = (beta_prev / beta_t * (1 - alpha)).clamp(min=1e-20)
        prev = prev + var ** 0.5 * noise.to(device=z.device, dtype=torch.float32)
    return prev, x0


# ------------------------------------------------------------------------------------------------------------
# VAE
def vae_dtype_for(dtype):
    """The VAE's dtype for a pipeline dtype: fp16 pipelines keep the VAE in fp32 (the SD VAE can overflow fp16
    into NaN/black images); bf16 has fp32's range and is kept."""
    import torch

    return torch.float32 if dtype == torch.float16 else dtype


def move_module(module, device, dtype):
    """Move a module; cast only when the dtype changes (diffusers warns on every ``.to(dtype)``)."""
    module.to(device)
    if next(module.parameters()).dtype != dtype:
        module.to(dtype=dtype)
    return module


def _auto_vae_tile(latent_h: int, latent_w: int, vae_tile: Optional[int]) -> Optional[int]:
    if vae_tile is None:  # auto: tile beyond 1024x1024 output pixels
        return 128 if latent_h * latent_w > 128 * 128 else None
    return int(vae_tile) or None


def vae_posterior(vae, image01, *, vae_tile: Optional[int] = None, device=None, dtype=None, callback=None):
    """The VAE posterior of ``image01`` (``[N, 3, H, W]`` in ``[0, 1]``, H and W multiples of 8): a diffusers
    ``DiagonalGaussianDistribution`` (``.mean``, ``.std``, ``.mode()``), not scaled by ``scaling_factor``.

    ``vae_tile``: decoder-side tile in latents (encoder tiles are 8x that in pixels); ``None``: automatic
    (tiles beyond 1024x1024 pixels, :func:`realisr.models.tiled_vae.tiled_encode`); ``0``: never.
    """
    import torch

    x = image01 * 2.0 - 1.0
    lh, lw = x.shape[-2] // 8, x.shape[-1] // 8
    tile = _auto_vae_tile(lh, lw, vae_tile)
    with torch.no_grad():
        if tile is not None:
            from ..models.tiled_vae import tiled_encode

            return tiled_encode(vae, x, tile=tile * 8, callback=callback, device=device, dtype=dtype)
        from ..progress import report

        report(callback, "vae_encode", 0, 1)
        dist = vae.encode(x.to(device=device, dtype=dtype)).latent_dist
        report(callback, "vae_encode", 1, 1)
        return dist


def vae_encode(vae, image01, *, sample: bool = False, generator=None, vae_tile: Optional[int] = None,
               device=None, dtype=None, callback=None):
    """``vae.encode(2x - 1)`` posterior mode (or a sample), times ``scaling_factor``: float32 latents on ``device``.

    Args:
        image01: ``[N, 3, H, W]`` in ``[0, 1]`` (H, W multiples of 8).
        sample: sample the posterior (as the official scripts do) instead of taking its mode.
        generator: ``torch.Generator`` for sampling (on the CPU; the sample is drawn there), or one per image.
        vae_tile: see :func:`vae_posterior`.
    """
    import torch

    sf = vae.config.scaling_factor
    dist = vae_posterior(vae, image01, vae_tile=vae_tile, device=device, dtype=dtype, callback=callback)
    with torch.no_grad():
        if sample:
            mean, std = dist.mean.float().cpu(), dist.std.float().cpu()
            if isinstance(generator, (list, tuple)):  # one per image: each draws as it would alone
                noise = torch.cat([torch.randn(mean[i:i + 1].shape, generator=g, dtype=torch.float32)
                                   for i, g in enumerate(generator)])
            else:
                noise = torch.randn(mean.shape, generator=generator, dtype=torch.float32)
            z = mean + std * noise
        else:
            z = dist.mode().float()
    return (z * sf).to(device)


def vae_decode(vae, z_scaled, *, vae_tile: Optional[int] = None, device=None, dtype=None, callback=None,
               raw: bool = False):
    """``clamp(vae.decode(z / scaling_factor), -1, 1) * 0.5 + 0.5``: float32 ``[1, 3, 8h, 8w]`` in ``[0, 1]``
    (``raw=True``: the decoder output itself, float32, unclamped, in about ``[-1, 1]``).

    The result stays where the decoder ran (on a GPU, the colour fix then runs there too and only the final
    image is copied to the host); tiled decoding streams its tiles to the CPU and returns a CPU tensor.

    Raises:
        RealisrError: the decoder produced NaN/inf (an fp16 overflow): the message says which dtype to use.
    """
    import torch

    from ..progress import report

    z = z_scaled.float() / vae.config.scaling_factor
    tile = _auto_vae_tile(z.shape[-2], z.shape[-1], vae_tile)
    with torch.no_grad():
        if tile is not None:
            from ..models.tiled_vae import tiled_decode

            out = tiled_decode(vae, z.cpu(), tile=tile, callback=callback, device=device, dtype=dtype)
        else:
            report(callback, "vae_decode", 0, 1)
            out = vae.decode(z.to(device=device, dtype=dtype)).sample
            report(callback, "vae_decode", 1, 1)
        out = out.float()
        if not bool(torch.isfinite(out).all()):
            from ..errors import RealisrError

            raise RealisrError("the VAE decoder produced NaN/inf values: run with --dtype fp32 (or bf16)")
        if raw:
            return out
        return (out.clamp(-1.0, 1.0) * 0.5 + 0.5).clamp(0.0, 1.0)


# ------------------------------------------------------------------------------------------------------------
# Prompts
def cached_prompt_embeds(cache: "OrderedDict", tokenizer, text_encoder, prompt: str, size: int = 8):
    """The CLIP embedding ``[1, 77, C]`` of ``prompt`` (``encode_prompt``), kept in ``cache`` (an ``OrderedDict``
    holding the last ``size`` prompts): a pipeline re-encodes a prompt only when it changes."""
    from ..models.backbone import encode_prompt

    if prompt in cache:
        cache.move_to_end(prompt)
        return cache[prompt]
    emb = encode_prompt(tokenizer, text_encoder, prompt)
    cache[prompt] = emb
    while len(cache) > size:
        cache.popitem(last=False)
    return emb


# ------------------------------------------------------------------------------------------------------------
# Dials
def dial_to_latent(value, size: tuple[int, int], *, name: str, content: Optional[tuple[int, int]] = None):
    """A dial (``lambda_pix``/``lambda_sem``) as a float or a ``[1, 1, h, w]`` float32 CPU map on the latent grid.

    Args:
        value: a number, or a per-pixel map covering the whole input image: PIL image (grey levels / 255),
            numpy array (``[H, W]`` or ``[H, W, 1]``; uint8 / 255, uint16 / 65535, float as is) or torch tensor
            (``[H, W]``, ``[1, H, W]`` or ``[1, 1, H, W]``). Maps are resized (bilinear, antialiased) to the
            latent grid.
        size: ``(h, w)`` of the latent grid.
        content: ``(h, w)`` of the part of the grid covered by the image (pad mode); the rest is edge-padded.

    Raises:
        ValueError: not a number/map, non-finite values, or a bad shape.
    """
    import torch
    import torch.nn.functional as F

    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        v = float(value)
        if not math.isfinite(v):
            raise ValueError(f"{name} must be finite, got {value!r}")
        return v
    mod = type(value).__module__
    if mod.startswith("PIL."):
        arr = np.asarray(value.convert("F") if value.mode not in ("I;16", "I") else value, dtype=np.float32)
        peak = 65535.0 if value.mode in ("I;16", "I") else 255.0
        t = torch.from_numpy(arr / peak)
    elif isinstance(value, np.ndarray):
        arr = value
        if arr.ndim == 3 and arr.shape[2] == 1:
            arr = arr[..., 0]
        if arr.ndim != 2:
            raise ValueError(f"{name} map must be [H, W] (or [H, W, 1]), got shape {value.shape}")
        if arr.dtype == np.uint8:
            arr = arr.astype(np.float32) / 255.0
        elif arr.dtype == np.uint16:
            arr = arr.astype(np.float32) / 65535.0
        t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
    elif mod.startswith("torch"):
        t = value.detach().float().cpu()
        while t.ndim > 2 and t.shape[0] == 1:
            t = t[0]
        if t.ndim != 2:
            raise ValueError(f"{name} map must be [H, W], [1, H, W] or [1, 1, H, W], got {tuple(value.shape)}")
    else:
        raise ValueError(f"{name} must be a number or a map (PIL image, numpy array, torch tensor), "
                         f"got {type(value).__name__}")
    if t.numel() == 0 or not torch.isfinite(t).all():
        raise ValueError(f"{name} map must be non-empty and finite")
    t = t[None, None].float()
    target = content or size
    if tuple(t.shape[-2:]) != tuple(target):
        down = target[0] < t.shape[-2] or target[1] < t.shape[-1]
        t = F.interpolate(t, size=target, mode="bilinear", align_corners=False, antialias=down)
    if tuple(target) != tuple(size):
        t = F.pad(t, (0, size[1] - target[1], 0, size[0] - target[0]), mode="replicate")
    return t.contiguous()


# ------------------------------------------------------------------------------------------------------------
# Shared pipeline base
#: The call arguments every one-step diffusion pipeline takes (validated in ``_check_common``).
COMMON_ARGS = ("color_fix", "process_size", "resize_mode", "latent_tile", "latent_overlap", "vae_tile",
               "sample_posterior", "compat")


class OneStepDiffusionPipeline:
    """Mixin with what PiSA-SR and OSEDiff share (argument checks, geometry, VAE, tiling).

    Subclasses also derive from :class:`realisr.pipelines.base.SRPipeline` and set ``unet``, ``vae``,
    ``vae_dtype``, ``flavor`` (``"pisa"``/``"osediff"``) and ``timestep``.
    """

    flavor = "pisa"
    timestep = 1
    #: Where pre/post-processing run: ``"auto"`` (on the pipeline's device when it is a GPU, else on the host),
    #: ``"host"`` (Pillow on the CPU, the official scripts' path exactly) or ``"device"``
    #: (:func:`preprocess_on_device` / :func:`finish_output_on_device`: Pillow's filters as matrices, within one
    #: 8-bit level of the host path). Set it on the pipeline object.
    processing = "auto"

    def device_processing(self) -> bool:
        """Whether this pipeline's pre/post-processing runs on its device (see :attr:`processing`)."""
        if self.processing not in PROCESSING_MODES:
            raise ValueError(f"processing must be one of {PROCESSING_MODES}, got {self.processing!r}")
        return self.processing == "device" or (self.processing == "auto" and self.device.type == "cuda")

    def _vae_tiled(self, x, process_size, resize_mode, vae_tile) -> bool:
        """Whether the VAE would tile the processed ``x`` (then a batch runs image by image)."""
        h, w = x.shape[-2:]
        ps = process_size if process_size is not None else self.spec.options.get("process_size", 512)
        if resize_mode == "pad":
            ph, pw = -(-h * self.scale // 8) * 8, -(-w * self.scale // 8) * 8
        else:
            (pw, ph) = official_sizes(w, h, self.scale, ps)[3]
        return _auto_vae_tile(ph // 8, pw // 8, vae_tile) is not None

    def _one_by_one(self, x, extras: dict, generator, **kwargs):
        """``_upscale_rgb`` per image of a batch (each with its own generator if a list is given)."""
        import torch

        ys, per = [], []
        for i in range(x.shape[0]):
            e: dict = {}
            g = generator[i] if isinstance(generator, (list, tuple)) else generator
            ys.append(self._upscale_rgb(x[i:i + 1], generator=g, extras=e, **kwargs))
            per.append(e)
        extras["per_image"] = per
        return torch.cat(ys)

    def _init_dtypes(self, dtype) -> None:
        from .base import resolve_dtype

        # bf16 where the GPU has it (fp32 range: no overflow), else fp16 with an fp32 VAE
        self.dtype = resolve_dtype(dtype, self.device, self.spec.dtypes, prefer="bfloat16")
        self.vae_dtype = vae_dtype_for(self.dtype)

    def _check_common(self, kwargs: dict) -> None:
        from ..color_fix import normalize_mode

        normalize_mode(kwargs.get("color_fix", self.spec.color_fix))
        ps = kwargs.get("process_size", self.spec.options.get("process_size", 512))
        if isinstance(ps, bool) or not isinstance(ps, int) or ps < 8:
            raise ValueError(f"process_size must be an integer >= 8, got {ps!r}")
        mode = kwargs.get("resize_mode", "official")
        if mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {mode!r}")
        for key in ("latent_tile", "vae_tile"):
            v = kwargs.get(key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0 or 0 < v < 4):
                raise ValueError(f"{key} must be None, 0 (off) or an integer >= 4, got {v!r}")
        ov = kwargs.get("latent_overlap")
        if ov is not None and (isinstance(ov, bool) or not isinstance(ov, int) or ov < 0):
            raise ValueError(f"latent_overlap must be an integer >= 0, got {ov!r}")
        lt = kwargs.get("latent_tile")
        if lt and ov is not None and ov >= lt:
            raise ValueError(f"latent_overlap {ov} must be smaller than latent_tile {lt}")
        if not isinstance(kwargs.get("sample_posterior", False), bool):
            raise ValueError("sample_posterior must be True or False")
        compat = kwargs.get("compat", "default")
        if compat not in COMPAT_MODES:
            raise ValueError(f"compat must be one of {COMPAT_MODES}, got {compat!r}")
        if compat == "official" and mode != "official":
            raise ValueError("compat='official' reproduces the official scripts, which resize: use "
                             "resize_mode='official' (--resize-mode official), not 'pad'")

    @classmethod
    def is_stochastic(cls, spec, **call_kwargs) -> bool:
        """Sampling the VAE posterior (``sample_posterior=True``) makes a call depend on ``generator``."""
        return bool(spec.options.get("stochastic", False) or call_kwargs.get("sample_posterior", False))

    def _latent_tiling(self, tile, tile_pad, latent_tile, latent_overlap) -> tuple[int, int]:
        """The latent tile/overlap of a call: :func:`resolve_latent_tiling` with this model's defaults."""
        return resolve_latent_tiling(self.spec.options, self.scale, tile, tile_pad, latent_tile, latent_overlap)

    def preprocess(self, x, *, process_size: Optional[int] = None, resize_mode: str = "official",
                   compat: str = "default") -> Preprocessed:
        """The official pre-processing of ``x`` (``[N, 3, h, w]`` float ``[0, 1]``): see :func:`preprocess`
        (in the default mode on the device: :func:`preprocess_on_device`, see :attr:`processing`).
        ``compat="official"`` always takes Pillow's 8-bit path on the host, as the official scripts do."""
        ps = process_size if process_size is not None else self.spec.options.get("process_size", 512)
        if compat != "official" and self.device_processing():
            return preprocess_on_device(x, scale=self.scale, process_size=ps, mode=resize_mode, device=self.device)
        return preprocess(x, scale=self.scale, process_size=ps, mode=resize_mode, force_8bit=compat == "official")

    def finish(self, y, pre: Preprocessed, color_fix: str, compat: str = "default"):
        """Colour fix and output size: realisr's float path (:func:`finish_output`; on the device:
        :func:`finish_output_on_device`) or, with ``compat="official"``, the official scripts' 8-bit path on the
        host (:func:`finish_output_official`; only PiSA-SR's script resizes back)."""
        if compat == "official":
            return finish_output_official(y, pre, color_fix, resize_back=self.flavor == "pisa")
        if self.device_processing():
            return finish_output_on_device(y, pre, color_fix)
        return finish_output(y, pre, color_fix)

    def encode(self, image01, *, sample_posterior: bool = False, generator=None, vae_tile=None, callback=None):
        """``z_L``: the VAE posterior mode (or a sample) of the processed LQ, times ``scaling_factor``, float32."""
        return vae_encode(self.vae, image01, sample=sample_posterior, generator=generator, vae_tile=vae_tile,
                          device=self.device, dtype=self.vae_dtype, callback=callback)

    def decode(self, z_h, *, vae_tile=None, callback=None):
        """``clamp(decode(z_H / sf), -1, 1) * 0.5 + 0.5``: float32 in ``[0, 1]`` (on the decoder's device)."""
        return vae_decode(self.vae, z_h, vae_tile=vae_tile, device=self.device, dtype=self.vae_dtype,
                          callback=callback)

    def _unet(self, z, embeds, *, batch: int = 1):
        """One UNet call at ``self.timestep``; ``z`` float32 ``[N, 4, h, w]`` -> float32 prediction; ``embeds``
        ``[1, 77, D]`` (one prompt) or ``[N, 77, D]``; ``batch`` repeats the whole batch (``[batch * N, ...]``)."""
        import torch

        t = torch.tensor([self.timestep], device=self.device, dtype=torch.long)
        zz = z.to(device=self.device, dtype=self.dtype)
        emb = embeds.to(device=self.device, dtype=self.dtype)
        if emb.shape[0] != zz.shape[0]:  # one prompt for a batch of images
            emb = emb.expand(zz.shape[0], -1, -1)
        if batch > 1:
            zz = torch.cat([zz] * batch)
            emb = torch.cat([emb] * batch)
        return self.unet(zz, t, encoder_hidden_states=emb, return_dict=False)[0].float()
