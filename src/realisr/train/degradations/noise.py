"""Gaussian and Poisson noise of the Real-ESRGAN degradation (colour or grey), batched, seedable.

Random numbers are drawn on the generator's device and moved to the image's device, so a CPU generator
gives the same noise whether the images sit on the CPU or a GPU.
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["gaussian_noise", "poisson_noise", "add_noise", "rgb_to_gray"]


def rgb_to_gray(img: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma ``0.2989 R + 0.587 G + 0.114 B`` (torchvision's weights), ``[N, 1, H, W]``."""
    w = torch.tensor([0.2989, 0.587, 0.114], dtype=img.dtype, device=img.device).view(1, 3, 1, 1)
    return (img * w).sum(1, keepdim=True)


def _randn(shape, generator: Optional[torch.Generator], like: torch.Tensor) -> torch.Tensor:
    dev = generator.device if generator is not None else like.device
    return torch.randn(shape, generator=generator, device=dev, dtype=torch.float32).to(like.device, like.dtype)


def _poisson(rate: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    dev = generator.device if generator is not None else rate.device
    return torch.poisson(rate.to(dev, torch.float32), generator=generator).to(rate.device, rate.dtype)


def _view(t, n: int, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(t, dtype=like.dtype).to(like.device).reshape(-1).expand(n).view(n, 1, 1, 1)


def gaussian_noise(img: torch.Tensor, sigma, gray, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Zero-mean Gaussian noise with std ``sigma / 255``.

    Args:
        img: ``[N, 3, H, W]`` image (only its shape, dtype and device are used).
        sigma: float or ``[N]`` std on the 0..255 scale.
        gray: bool or ``[N]`` flags: one noise plane shared by the three channels for those samples.
        generator: torch generator, or ``None`` for the global RNG.

    Returns:
        ``[N, 3, H, W]`` noise (not added).
    """
    n, c, h, w = img.shape
    s = _view(sigma, n, img) / 255.0
    g = _view(gray, n, img)
    colour = _randn((n, c, h, w), generator, img)
    grey = _randn((n, 1, h, w), generator, img)
    return (colour * (1 - g) + grey * g) * s


def _pow2_levels(img: torch.Tensor) -> torch.Tensor:
    """Per sample, the number of distinct 8-bit levels rounded up to a power of two (``[N, 1, 1, 1]``)."""
    vals = [float(2 ** torch.ceil(torch.log2(torch.tensor(float(torch.unique(img[i]).numel())))).item())
            for i in range(img.shape[0])]
    return torch.tensor(vals, dtype=img.dtype, device=img.device).view(-1, 1, 1, 1)


def poisson_noise(img: torch.Tensor, scale, gray, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Poisson (shot) noise as Real-ESRGAN models it.

    The image is quantised to 8 bit, the photon count per level is the number of distinct levels rounded up
    to a power of two (``vals``), the noise is ``Poisson(img * vals) / vals - img``, times ``scale``. Grey
    noise is computed on the luma and shared by the channels.

    Args:
        img: ``[N, 3, H, W]`` image in [0, 1].
        scale: float or ``[N]`` noise multipliers.
        gray: bool or ``[N]`` flags for grey noise.
        generator: torch generator, or ``None`` for the global RNG.

    Returns:
        ``[N, 3, H, W]`` noise (not added).
    """
    n = img.shape[0]
    g = _view(gray, n, img)
    q = torch.clamp((img * 255.0).round(), 0, 255) / 255.0
    vals = _pow2_levels(q)
    noise = _poisson(q * vals, generator) / vals - q
    if bool((g > 0).any()):
        qg = torch.clamp((rgb_to_gray(img) * 255.0).round(), 0, 255) / 255.0
        vg = _pow2_levels(qg)
        noise_g = (_poisson(qg * vg, generator) / vg - qg).expand_as(noise)
        noise = noise * (1 - g) + noise_g * g
    return noise * _view(scale, n, img)


def add_noise(
    img: torch.Tensor,
    *,
    gaussian: torch.Tensor,
    sigma: torch.Tensor,
    poisson_scale: torch.Tensor,
    gray: torch.Tensor,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Add Gaussian noise to the samples where ``gaussian`` is true and Poisson noise to the others; clamp to
    [0, 1] (the official ``clip=True, rounds=False``).

    Args:
        img: ``[N, 3, H, W]`` in [0, 1].
        gaussian: ``[N]`` bool, Gaussian (true) or Poisson (false) per sample.
        sigma: ``[N]`` Gaussian std on the 0..255 scale.
        poisson_scale: ``[N]`` Poisson noise scale.
        gray: ``[N]`` bool, grey noise.
        generator: torch generator, or ``None``.

    Returns:
        ``[N, 3, H, W]`` noisy image in [0, 1].
    """
    gaussian = torch.as_tensor(gaussian).reshape(-1).bool().cpu()
    out = img.clone()
    gi = torch.nonzero(gaussian).flatten()
    pi = torch.nonzero(~gaussian).flatten()
    gray_f = torch.as_tensor(gray).reshape(-1).float().cpu()
    sigma = torch.as_tensor(sigma).reshape(-1).float().cpu()
    poisson_scale = torch.as_tensor(poisson_scale).reshape(-1).float().cpu()
    if len(gi):
        gd = gi.to(img.device)
        out[gd] = img[gd] + gaussian_noise(img[gd], sigma[gi], gray_f[gi], generator)
    if len(pi):
        pd = pi.to(img.device)
        out[pd] = img[pd] + poisson_noise(img[pd], poisson_scale[pi], gray_f[pi], generator)
    return out.clamp(0.0, 1.0)
