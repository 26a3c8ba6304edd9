"""Blur kernels of the Real-ESRGAN degradation, batched in torch.

Gaussian (isotropic / anisotropic), generalized Gaussian, plateau and circular low-pass ("sinc") kernels, as
BasicSR defines them, evaluated for many samples at once. A kernel of odd size ``k`` zero-padded to ``pad_to``
equals the same formula evaluated on the ``pad_to`` grid, masked to the central ``k x k`` window and
normalised there; that is how different sizes share one batched tensor.

Written here rather than imported from BasicSR: BasicSR builds one numpy kernel at a time with the global
numpy RNG (not seedable per call, not batched) and its import pulls in the whole training framework.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

__all__ = [
    "KERNEL_TYPES",
    "mesh_grid",
    "sigma_matrix",
    "bivariate_kernel",
    "circular_lowpass_kernel",
    "pulse_kernel",
    "sample_blur_kernels",
    "sample_sinc_kernels",
]

#: Kernel type names in the order of the official ``kernel_list``.
KERNEL_TYPES: tuple[str, ...] = (
    "iso",
    "aniso",
    "generalized_iso",
    "generalized_aniso",
    "plateau_iso",
    "plateau_aniso",
)
_FAMILY = {"iso": "gaussian", "aniso": "gaussian", "generalized_iso": "generalized",
           "generalized_aniso": "generalized", "plateau_iso": "plateau", "plateau_aniso": "plateau"}


def mesh_grid(size: int, *, dtype=torch.float64, device=None) -> torch.Tensor:
    """Integer pixel offsets of an odd ``size x size`` kernel around its centre.

    Returns:
        ``[size, size, 2]`` tensor; ``[..., 0]`` is the column (x) offset, ``[..., 1]`` the row (y) offset.
    """
    ax = torch.arange(-(size // 2), size // 2 + 1, dtype=dtype, device=device)
    yy, xx = torch.meshgrid(ax, ax, indexing="ij")
    return torch.stack([xx, yy], dim=-1)


def sigma_matrix(sigma_x: torch.Tensor, sigma_y: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Covariance ``R diag(sx^2, sy^2) R^T`` with ``R`` the rotation by ``theta``.

    Args:
        sigma_x, sigma_y, theta: ``[N]`` tensors (theta in radians).

    Returns:
        ``[N, 2, 2]`` covariance matrices.
    """
    c, s = torch.cos(theta), torch.sin(theta)
    rot = torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)
    d = torch.diag_embed(torch.stack([sigma_x**2, sigma_y**2], -1))
    return rot @ d @ rot.transpose(-1, -2)


def _window_mask(kernel_size: torch.Tensor, grid_size: int, device=None) -> torch.Tensor:
    """``[N, G, G]`` bool mask of the central ``kernel_size x kernel_size`` window of a ``G x G`` grid."""
    g = mesh_grid(grid_size, device=device)
    half = (kernel_size.to(device=device, dtype=torch.float64) // 2).view(-1, 1, 1)
    return (g[..., 0].abs() <= half) & (g[..., 1].abs() <= half)


def bivariate_kernel(
    family: str,
    sigma_x: torch.Tensor,
    sigma_y: torch.Tensor,
    theta: torch.Tensor,
    beta: Optional[torch.Tensor] = None,
    *,
    kernel_size: torch.Tensor | int = 21,
    pad_to: int = 21,
) -> torch.Tensor:
    """Normalised bivariate kernels of one family, batched.

    With the quadratic form ``q = p^T Sigma^-1 p`` of the pixel offset ``p``:
    ``gaussian``: ``exp(-q/2)``; ``generalized``: ``exp(-q^beta/2)``; ``plateau``: ``1/(q^beta + 1)``.

    Args:
        family: ``"gaussian"``, ``"generalized"`` or ``"plateau"``.
        sigma_x, sigma_y, theta: ``[N]`` tensors.
        beta: ``[N]`` shape parameters (not used by ``gaussian``).
        kernel_size: odd kernel size(s), an int or an ``[N]`` tensor; each kernel is zero outside its window.
        pad_to: side of the returned kernels (>= every kernel size, odd).

    Returns:
        ``[N, pad_to, pad_to]`` float64 kernels that sum to 1.

    Raises:
        ValueError: unknown family, or a kernel size that is even or larger than ``pad_to``.
    """
    sigma_x, sigma_y, theta = (torch.as_tensor(t, dtype=torch.float64) for t in (sigma_x, sigma_y, theta))
    n = sigma_x.shape[0]
    device = sigma_x.device
    ks = torch.as_tensor(kernel_size, device=device).expand(n) if not torch.is_tensor(kernel_size) or \
        kernel_size.dim() == 0 else kernel_size.to(device)
    if bool(((ks % 2) == 0).any()) or bool((ks > pad_to).any()) or pad_to % 2 == 0:
        raise ValueError(f"kernel sizes must be odd and <= pad_to={pad_to} (odd), got {ks.tolist()}")
    inv = torch.linalg.inv(sigma_matrix(sigma_x, sigma_y, theta))  # [N,2,2]
    grid = mesh_grid(pad_to, device=device)  # [G,G,2]
    q = torch.einsum("hwi,nij,hwj->nhw", grid, inv, grid)
    if family == "gaussian":
        k = torch.exp(-0.5 * q)
    elif family in ("generalized", "plateau"):
        if beta is None:
            raise ValueError(f"the {family} kernel needs beta")
        b = torch.as_tensor(beta, dtype=torch.float64, device=device).view(-1, 1, 1)
        k = torch.exp(-0.5 * q.pow(b)) if family == "generalized" else 1.0 / (q.pow(b) + 1.0)
    else:
        raise ValueError(f"unknown kernel family {family!r}")
    k = k * _window_mask(ks, pad_to, device)
    return k / k.sum(dim=(-1, -2), keepdim=True)


def circular_lowpass_kernel(cutoff: torch.Tensor, kernel_size: torch.Tensor | int, pad_to: int = 21) -> torch.Tensor:
    """2-D sinc (ideal circular low-pass) kernels: ``wc * J1(wc r) / (2 pi r)``, centre ``wc^2 / (4 pi)``.

    Args:
        cutoff: ``[N]`` cut-off angular frequencies ``omega_c`` in radians/pixel (pi = Nyquist).
        kernel_size: odd size(s) of the support, an int or ``[N]`` tensor.
        pad_to: side of the returned kernels.

    Returns:
        ``[N, pad_to, pad_to]`` float64 kernels that sum to 1.
    """
    wc = torch.as_tensor(cutoff, dtype=torch.float64)
    n = wc.shape[0]
    device = wc.device
    ks = torch.as_tensor(kernel_size, device=device).expand(n) if not torch.is_tensor(kernel_size) or \
        kernel_size.dim() == 0 else kernel_size.to(device)
    grid = mesh_grid(pad_to, device=device)
    r = grid.pow(2).sum(-1).sqrt().unsqueeze(0)  # [1,G,G]
    w = wc.view(-1, 1, 1)
    r_safe = torch.where(r > 0, r, torch.ones_like(r))
    k = w * torch.special.bessel_j1(w * r_safe) / (2 * math.pi * r_safe)
    k = torch.where(r > 0, k, w**2 / (4 * math.pi))
    k = k * _window_mask(ks, pad_to, device)
    return k / k.sum(dim=(-1, -2), keepdim=True)


def pulse_kernel(n: int, pad_to: int = 21) -> torch.Tensor:
    """``[n, pad_to, pad_to]`` identity kernels (a 1 in the centre)."""
    k = torch.zeros(n, pad_to, pad_to, dtype=torch.float64)
    k[:, pad_to // 2, pad_to // 2] = 1.0
    return k


def _uniform(n: int, lo: float, hi: float, generator: Optional[torch.Generator]) -> torch.Tensor:
    """``[n]`` float64 draws from U[lo, hi), drawn on the generator's device and returned on the CPU."""
    dev = generator.device if generator is not None else "cpu"
    u = torch.rand(n, generator=generator, device=dev, dtype=torch.float64).cpu()
    return lo + (hi - lo) * u


def _split_beta(u_side: torch.Tensor, u_val: torch.Tensor, beta_range: Sequence[float]) -> torch.Tensor:
    """BasicSR's shape-parameter draw: with p 0.5 from U[b0, 1), else from U[1, b1)."""
    b0, b1 = beta_range
    low = b0 + (1.0 - b0) * u_val
    high = 1.0 + (b1 - 1.0) * u_val
    return torch.where(u_side < 0.5, low, high)


def sample_blur_kernels(
    n: int,
    generator: Optional[torch.Generator],
    *,
    kernel_list: Sequence[str],
    kernel_prob: Sequence[float],
    sigma_range: Sequence[float],
    betag_range: Sequence[float],
    betap_range: Sequence[float],
    sinc_prob: float,
    kernel_range: Sequence[int] = tuple(range(7, 22, 2)),
    rotation_range: Sequence[float] = (-math.pi, math.pi),
    pad_to: int = 21,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sample the first- or second-stage blur kernels of the Real-ESRGAN dataset, one per sample.

    Per sample: a size from ``kernel_range``; with probability ``sinc_prob`` a sinc kernel with
    ``omega_c ~ U[pi/3, pi]`` (size < 13) or ``U[pi/5, pi]``; otherwise a kernel type from ``kernel_list`` with
    ``kernel_prob``, ``sigma_x ~ U(sigma_range)``, for anisotropic types ``sigma_y ~ U(sigma_range)`` and
    ``theta ~ U(rotation_range)`` (isotropic: ``sigma_y = sigma_x``, ``theta = 0``), and for generalized /
    plateau types ``beta`` drawn as BasicSR does (half from ``[b0, 1)``, half from ``[1, b1)``).
    The same number of random values is drawn whatever the branches, so a seed always gives the same batch.

    Args:
        n: number of kernels.
        generator: torch generator (any device) or ``None`` for the global RNG.
        kernel_list, kernel_prob: type names (see :data:`KERNEL_TYPES`) and their probabilities.
        sigma_range, betag_range, betap_range: parameter ranges.
        sinc_prob: probability of a sinc kernel instead.
        kernel_range: the odd sizes to choose from uniformly.
        rotation_range: range of the anisotropic rotation angle.
        pad_to: side of the returned kernels.

    Returns:
        ``(kernels, params)``: ``[n, pad_to, pad_to]`` float32 CPU kernels summing to 1, and a dict of
        ``[n]`` CPU tensors: ``kernel_size``, ``kernel_type`` (index into ``kernel_list``, -1 for sinc),
        ``sinc`` (bool), ``omega_c``, ``sigma_x``, ``sigma_y``, ``theta``, ``beta`` (NaN where unused).

    Raises:
        ValueError: unknown kernel type names or mismatched probabilities.
    """
    unknown = [t for t in kernel_list if t not in _FAMILY]
    if unknown or len(kernel_list) != len(kernel_prob):
        raise ValueError(f"bad kernel_list/kernel_prob: {list(kernel_list)} / {list(kernel_prob)}")
    dev = generator.device if generator is not None else "cpu"
    sizes_t = torch.as_tensor(list(kernel_range), dtype=torch.long)
    size_idx = torch.randint(0, len(sizes_t), (n,), generator=generator, device=dev).cpu()
    ksize = sizes_t[size_idx]
    probs = torch.as_tensor(list(kernel_prob), dtype=torch.float64, device=dev)
    ktype = torch.multinomial(probs, n, replacement=True, generator=generator).cpu()
    is_sinc = _uniform(n, 0, 1, generator) < sinc_prob
    u_omega = _uniform(n, 0, 1, generator)
    omega_lo = torch.where(ksize < 13, torch.full((n,), math.pi / 3, dtype=torch.float64),
                           torch.full((n,), math.pi / 5, dtype=torch.float64))
    omega_c = omega_lo + (math.pi - omega_lo) * u_omega
    sx = _uniform(n, sigma_range[0], sigma_range[1], generator)
    sy_aniso = _uniform(n, sigma_range[0], sigma_range[1], generator)
    th_aniso = _uniform(n, rotation_range[0], rotation_range[1], generator)
    u_side, u_beta = _uniform(n, 0, 1, generator), _uniform(n, 0, 1, generator)

    families = ("gaussian", "generalized", "plateau")
    aniso = torch.tensor([t.endswith("aniso") for t in kernel_list], dtype=torch.bool)[ktype]
    fam = torch.tensor([families.index(_FAMILY[t]) for t in kernel_list], dtype=torch.long)[ktype]
    sy = torch.where(aniso, sy_aniso, sx)
    th = torch.where(aniso, th_aniso, torch.zeros_like(sx))
    beta_g = _split_beta(u_side, u_beta, betag_range)
    beta_p = _split_beta(u_side, u_beta, betap_range)
    is_g, is_p = fam == 1, fam == 2
    beta = torch.where(is_g, beta_g, torch.where(is_p, beta_p, torch.full_like(sx, float("nan"))))

    kernels = torch.empty(n, pad_to, pad_to, dtype=torch.float64)
    for f, family in enumerate(families):
        idx = torch.nonzero((fam == f) & ~is_sinc).flatten()
        if len(idx):
            kernels[idx] = bivariate_kernel(family, sx[idx], sy[idx], th[idx],
                                            None if family == "gaussian" else beta[idx],
                                            kernel_size=ksize[idx], pad_to=pad_to)
    sidx = torch.nonzero(is_sinc).flatten()
    if len(sidx):
        kernels[sidx] = circular_lowpass_kernel(omega_c[sidx], ksize[sidx], pad_to=pad_to)

    nan = torch.full_like(sx, float("nan"))
    params = {
        "kernel_size": ksize,
        "kernel_type": torch.where(is_sinc, torch.full_like(ktype, -1), ktype),
        "sinc": is_sinc,
        "omega_c": torch.where(is_sinc, omega_c, nan),
        "sigma_x": torch.where(is_sinc, nan, sx),
        "sigma_y": torch.where(is_sinc, nan, sy),
        "theta": torch.where(is_sinc, nan, th),
        "beta": torch.where(is_sinc, nan, beta),
    }
    return kernels.float(), params


def sample_sinc_kernels(
    n: int,
    generator: Optional[torch.Generator],
    *,
    prob: float,
    kernel_range: Sequence[int] = tuple(range(7, 22, 2)),
    omega_range: Sequence[float] = (math.pi / 3, math.pi),
    pad_to: int = 21,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sample the final sinc filters: with probability ``prob`` a sinc kernel (size from ``kernel_range``,
    ``omega_c ~ U[pi/3, pi]`` whatever the size, as the official code), otherwise the identity pulse.

    Returns:
        ``(kernels, params)``: ``[n, pad_to, pad_to]`` float32 CPU kernels and ``[n]`` tensors ``sinc``
        (bool), ``kernel_size`` and ``omega_c`` (NaN / 1 where the identity is used).
    """
    dev = generator.device if generator is not None else "cpu"
    sizes_t = torch.as_tensor(list(kernel_range), dtype=torch.long)
    ksize = sizes_t[torch.randint(0, len(sizes_t), (n,), generator=generator, device=dev).cpu()]
    use = _uniform(n, 0, 1, generator) < prob
    omega_c = _uniform(n, omega_range[0], omega_range[1], generator)
    kernels = pulse_kernel(n, pad_to)
    idx = torch.nonzero(use).flatten()
    if len(idx):
        kernels[idx] = circular_lowpass_kernel(omega_c[idx], ksize[idx], pad_to=pad_to)
    params = {
        "sinc": use,
        "kernel_size": torch.where(use, ksize, torch.ones_like(ksize)),
        "omega_c": torch.where(use, omega_c, torch.full_like(omega_c, float("nan"))),
    }
    return kernels.float(), params
