"""Batched JPEG compression in torch (the "DiffJPEG" the Real-ESRGAN degradation uses).

The JPEG baseline path without the entropy coder (which is lossless and so changes nothing in the pixels):
RGB -> YCbCr (JFIF), 4:2:0 chroma subsampling by 2x2 averaging, 8x8 block DCT-II, division by the quality
scaled quantisation tables, rounding, and the inverse path. A different quality per sample, any device,
optionally differentiable (``round(x) + (x - round(x))^3``, as DiffJPEG).

Written here because no maintained library does batched per-sample-quality JPEG on tensors on the GPU:
Pillow / OpenCV / torchvision.io encode one uint8 image at a time on the CPU (and round the input to 8 bit).

Matches BasicSR's ``DiffJPEG`` choices so that our LQ statistics equal the official training data:
* the image is zero-padded at the bottom/right to a multiple of 16 and cropped back;
* quality is a float; factor = ``5000/q`` below 50, else ``200 - 2q``, divided by 100;
* the luminance table is used **transposed** with respect to the IJG/Annex K table (DiffJPEG's layout), so
  horizontal and vertical frequencies get each other's steps. ``standard_tables=True`` uses the standard
  orientation instead (the chroma table is symmetric, so only luminance differs);
* the output is clamped to [0, 255] / 255 and not rounded to 8 bit.
"""

from __future__ import annotations

import math
from typing import Union

import torch
import torch.nn.functional as F

__all__ = ["jpeg_compress", "quality_to_factor", "Y_TABLE", "C_TABLE"]

# ITU-T T.81 Annex K quantisation tables, row = vertical frequency, column = horizontal frequency.
Y_TABLE = (
    (16, 11, 10, 16, 24, 40, 51, 61),
    (12, 12, 14, 19, 26, 58, 60, 55),
    (14, 13, 16, 24, 40, 57, 69, 56),
    (14, 17, 22, 29, 51, 87, 80, 62),
    (18, 22, 37, 56, 68, 109, 103, 77),
    (24, 35, 55, 64, 81, 104, 113, 92),
    (49, 64, 78, 87, 103, 121, 120, 101),
    (72, 92, 95, 98, 112, 100, 103, 99),
)
C_TABLE = (
    (17, 18, 24, 47, 99, 99, 99, 99),
    (18, 21, 26, 66, 99, 99, 99, 99),
    (24, 26, 56, 99, 99, 99, 99, 99),
    (47, 66, 99, 99, 99, 99, 99, 99),
) + ((99,) * 8,) * 4

# JFIF RGB -> YCbCr (full range, offset 128 on chroma) and its inverse.
_RGB2YCC = ((0.299, 0.587, 0.114), (-0.168736, -0.331264, 0.5), (0.5, -0.418688, -0.081312))
_YCC2RGB = ((1.0, 0.0, 1.402), (1.0, -0.344136, -0.714136), (1.0, 1.772, 0.0))

# Qualities at or above 99.95 would divide by a zero step; a step of 1e-3 (grey levels) is lossless anyway.
_MIN_FACTOR = 1e-3


def quality_to_factor(quality: torch.Tensor) -> torch.Tensor:
    """Scale of the quantisation tables for a JPEG quality in (0, 100] (IJG convention)."""
    q = quality.to(torch.float32)
    f = torch.where(q < 50, 5000.0 / q, 200.0 - 2.0 * q) / 100.0
    return f.clamp_min(_MIN_FACTOR)


def _dct_matrix(device, dtype) -> torch.Tensor:
    """Orthonormal 8-point DCT-II matrix ``C[u, x] = a(u)/2 cos((2x+1) u pi / 16)``, ``a(0) = 1/sqrt(2)``."""
    u = torch.arange(8, dtype=torch.float64).view(8, 1)
    x = torch.arange(8, dtype=torch.float64).view(1, 8)
    c = torch.cos((2 * x + 1) * u * math.pi / 16) / 2
    c[0] /= math.sqrt(2)
    return c.to(device=device, dtype=dtype)


def _blocks(x: torch.Tensor) -> torch.Tensor:
    """``[N, H, W]`` -> ``[N, H/8, W/8, 8, 8]``."""
    n, h, w = x.shape
    return x.view(n, h // 8, 8, w // 8, 8).permute(0, 1, 3, 2, 4)


def _unblocks(b: torch.Tensor) -> torch.Tensor:
    n, bh, bw, _, _ = b.shape
    return b.permute(0, 1, 3, 2, 4).reshape(n, bh * 8, bw * 8)


def _code_plane(plane: torch.Tensor, table: torch.Tensor, factor: torch.Tensor, dct: torch.Tensor,
                differentiable: bool) -> torch.Tensor:
    """DCT, quantise, round, dequantise and invert one plane (values 0..255) of every sample.

    ``dct`` is the 64x64 2-D DCT matrix ``kron(C, C)`` acting on row-major flattened 8x8 blocks.
    """
    b = _blocks(plane - 128.0)
    shape = b.shape
    # One GEMM on flattened blocks: vec(C X C^T) = kron(C, C) vec(X) (row-major vec).
    coef = (b.reshape(-1, 64) @ dct.T).view(shape[0], -1, 64)
    step = table.reshape(1, 1, 64) * factor.view(-1, 1, 1)
    q = coef / step
    r = torch.round(q)
    if differentiable:
        r = r + (q - r) ** 3
    rec = ((r * step).reshape(-1, 64) @ dct).view(shape)
    return _unblocks(rec) + 128.0


def jpeg_compress(
    img: torch.Tensor,
    quality: Union[float, torch.Tensor],
    *,
    differentiable: bool = False,
    standard_tables: bool = False,
) -> torch.Tensor:
    """JPEG-compress and decompress a batch.

    Args:
        img: ``[N, 3, H, W]`` RGB in [0, 1] (any size; padded internally to a multiple of 16).
        quality: a float or ``[N]`` tensor of qualities in (0, 100]; floats are allowed, as the official code.
        differentiable: use DiffJPEG's differentiable rounding instead of ``torch.round``.
        standard_tables: use the luminance table in the standard orientation (see the module docstring).

    Returns:
        ``[N, 3, H, W]`` decompressed RGB in [0, 1], same dtype and device.

    Raises:
        ValueError: if ``img`` is not ``[N, 3, H, W]``.
    """
    if img.dim() != 4 or img.shape[1] != 3:
        raise ValueError(f"jpeg_compress expects [N, 3, H, W], got {tuple(img.shape)}")
    n, _, h, w = img.shape
    dtype, device = img.dtype, img.device
    work = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    x = img.to(work) * 255.0
    ph, pw = (-h) % 16, (-w) % 16
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="constant", value=0.0)
    quality = torch.as_tensor(quality, device=device).reshape(-1).expand(n)
    factor = quality_to_factor(quality).to(work)

    m = torch.tensor(_RGB2YCC, dtype=work, device=device)
    ycc = torch.einsum("ij,njhw->nihw", m, x)
    y = ycc[:, 0]
    cb = F.avg_pool2d(ycc[:, 1:2] + 128.0, 2).squeeze(1)
    cr = F.avg_pool2d(ycc[:, 2:3] + 128.0, 2).squeeze(1)

    c = _dct_matrix(device, work)
    dct = torch.kron(c, c)  # [64, 64]
    yt = torch.tensor(Y_TABLE, dtype=work, device=device)
    if not standard_tables:
        yt = yt.T
    ct = torch.tensor(C_TABLE, dtype=work, device=device)
    y = _code_plane(y, yt, factor, dct, differentiable)
    cb = _code_plane(cb, ct, factor, dct, differentiable)
    cr = _code_plane(cr, ct, factor, dct, differentiable)

    # Nearest-neighbour chroma upsampling (each chroma sample covers 2x2 pixels).
    cb = cb.repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1)
    cr = cr.repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1)
    ycc = torch.stack([y, cb - 128.0, cr - 128.0], dim=1)
    rgb = torch.einsum("ij,njhw->nihw", torch.tensor(_YCC2RGB, dtype=work, device=device), ycc)
    rgb = rgb.clamp(0.0, 255.0) / 255.0
    return rgb[:, :, :h, :w].to(dtype)
