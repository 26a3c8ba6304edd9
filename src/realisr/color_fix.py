"""Colour correction of a restored image against its (upscaled) low-quality source, as the one-step diffusion
SR methods (PiSA-SR, OSEDiff, StableSR lineage) do it after decoding.

Modes:

* ``"adain"`` (default of PiSA-SR/OSEDiff): per-channel mean/std over the whole image; std is
  ``sqrt(unbiased var + 1e-5)``; ``out = (y - mean_y) / std_y * std_x + mean_x``, clamped to ``[0, 1]``.
* ``"wavelet"``: 5-level a-trous decomposition with the 3x3 binomial kernel ``[[1,2,1],[2,4,2],[1,2,1]]/16``
  (depthwise, dilation ``2**i``, replicate padding ``2**i``); the result is the high frequencies of the
  restored image plus the final low-frequency band of the source, clamped to ``[0, 1]``.
* ``"none"`` (the official name is ``"nofix"``; both are accepted).

:func:`color_fix` works on float tensors in ``[0, 1]``. The official scripts run it on 8-bit images and
truncate the result to 8 bits; the diffusion pipelines reproduce that with ``compat="official"``
(:func:`realisr.pipelines.diffusion_common.finish_output_official`).

These few lines are written here rather than imported because the reference implementations live in the
research repositories, not in a library.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from PIL import Image

__all__ = ["COLOR_FIX_MODES", "normalize_mode", "adain_color_fix", "wavelet_color_fix", "color_fix",
           "wavelet_decomposition", "pil_to_tensor01", "to_pil_truncated", "color_fix_pil"]

COLOR_FIX_MODES = ("adain", "wavelet", "none")
_ALIASES = {"adain": "adain", "wavelet": "wavelet", "none": "none", "nofix": "none", None: "none"}

_ADAIN_EPS = 1e-5
_WAVELET_LEVELS = 5


def normalize_mode(mode) -> str:
    """``"adain" | "wavelet" | "none"`` (``"nofix"`` and ``None`` mean ``"none"``).

    Raises:
        ValueError: an unknown mode.
    """
    key = mode.lower() if isinstance(mode, str) else mode
    if key not in _ALIASES:
        raise ValueError(f"unknown color_fix {mode!r}: use one of {', '.join(COLOR_FIX_MODES)}")
    return _ALIASES[key]


def _mean_std(x: "torch.Tensor"):
    b, c = x.shape[:2]
    flat = x.reshape(b, c, -1)
    std = (flat.var(dim=2) + _ADAIN_EPS).sqrt().reshape(b, c, 1, 1)
    mean = flat.mean(dim=2).reshape(b, c, 1, 1)
    return mean, std


def adain_color_fix(target: "torch.Tensor", source: "torch.Tensor") -> "torch.Tensor":
    """AdaIN colour transfer of ``source``'s per-channel statistics onto ``target`` (NCHW, ``[0, 1]``), clamped."""
    t_mean, t_std = _mean_std(target)
    s_mean, s_std = _mean_std(source)
    out = (target - t_mean.expand(target.shape)) / t_std.expand(target.shape)
    return (out * s_std.expand(target.shape) + s_mean.expand(target.shape)).clamp(0.0, 1.0)


def _wavelet_blur(x: "torch.Tensor", radius: int) -> "torch.Tensor":
    import torch
    import torch.nn.functional as F

    k = torch.tensor([[0.0625, 0.125, 0.0625], [0.125, 0.25, 0.125], [0.0625, 0.125, 0.0625]],
                     dtype=x.dtype, device=x.device)
    c = x.shape[1]
    k = k[None, None].repeat(c, 1, 1, 1)
    x = F.pad(x, (radius, radius, radius, radius), mode="replicate")
    return F.conv2d(x, k, groups=c, dilation=radius)


def wavelet_decomposition(x: "torch.Tensor", levels: int = _WAVELET_LEVELS):
    """``(high, low)``: the sum of the a-trous detail bands and the final low-frequency band."""
    import torch

    high = torch.zeros_like(x)
    for i in range(levels):
        low = _wavelet_blur(x, 2 ** i)
        high = high + (x - low)
        x = low
    return high, x


def wavelet_color_fix(target: "torch.Tensor", source: "torch.Tensor") -> "torch.Tensor":
    """High frequencies of ``target`` plus the low frequencies of ``source`` (NCHW, ``[0, 1]``), clamped."""
    if target.shape != source.shape:
        raise ValueError(f"wavelet colour fix needs equal shapes, got {tuple(target.shape)} and "
                         f"{tuple(source.shape)}")
    high, _ = wavelet_decomposition(target)
    _, low = wavelet_decomposition(source)
    return (high + low).clamp(0.0, 1.0)


def color_fix(target: "torch.Tensor", source: "torch.Tensor", mode: str = "adain") -> "torch.Tensor":
    """Colour-correct ``target`` against ``source`` (float NCHW in ``[0, 1]``, same size).

    Args:
        target: the restored image.
        source: the upscaled low-quality image the official code corrects against.
        mode: ``"adain"``, ``"wavelet"`` or ``"none"``.

    Returns:
        A new tensor in ``[0, 1]`` (``target`` clamped when ``mode="none"``).

    Raises:
        ValueError: unknown mode or (wavelet) different sizes.
    """
    mode = normalize_mode(mode)
    if mode == "adain":
        return adain_color_fix(target, source)
    if mode == "wavelet":
        return wavelet_color_fix(target, source)
    return target.clamp(0.0, 1.0)


def pil_to_tensor01(img: "Image.Image") -> "torch.Tensor":
    """torchvision ``ToTensor`` for an 8-bit RGB PIL image: ``[1, 3, H, W]`` float32 ``= uint8 / 255``."""
    import numpy as np
    import torch

    arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    # contiguous, as torchvision's ToTensor: the reduction order of the AdaIN statistics follows the layout
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()[None].float().div(255)


def to_pil_truncated(x: "torch.Tensor") -> "Image.Image":
    """torchvision ``ToPILImage`` for float input: ``uint8(x * 255)`` with truncation (as the official scripts)."""
    from PIL import Image

    t = x[0] if x.ndim == 4 else x
    arr = t.mul(255).byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr, "RGB")


def color_fix_pil(target: "Image.Image", source: "Image.Image", mode: str = "adain") -> "Image.Image":
    """The official scripts' PIL colour fix: 8-bit in, 8-bit out (truncating), ``"none"`` returns ``target``."""
    mode = normalize_mode(mode)
    if mode == "none":
        return target
    return to_pil_truncated(color_fix(pil_to_tensor01(target), pil_to_tensor01(source), mode))
