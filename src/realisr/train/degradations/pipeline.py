"""The two-stage Real-ESRGAN degradation, batched in torch, seeded by a ``torch.Generator``.

Order of operations (``realesrgan.py`` of PiSA-SR / OSEDiff, ``RealESRGANModel.feed_data`` of Real-ESRGAN):

1. optional USM sharpening of the HQ (SeeSR);
2. stage 1: blur with kernel 1 -> random resize (up / down / keep, scale factor, random mode) -> Gaussian or
   Poisson noise (colour or grey), clamp -> clamp, JPEG (quality ``jpeg_range``);
3. stage 2: with ``second_blur_prob`` blur with kernel 2 -> resize to ``H/scale * s2`` (random mode) ->
   noise, clamp -> with p 0.5 either [resize to ``H/scale`` + final sinc filter, clamp, JPEG] or
   [clamp, JPEG, resize to ``H/scale`` + final sinc filter];
4. ``clamp(round(255 x), 0, 255) / 255``; optionally resize back to ``H x W`` with a random mode and round
   again (``resize_bak=True`` of PiSA-SR / OSEDiff / CCSR training).

Every random choice is made per sample (as the official datasets do, which degrade one image at a time). The
official ``RealESRGANModel`` draws the resize and order choices once per batch instead; ``shared_resize=True``
does that and then runs the whole batch in one go (faster on a GPU). Samples whose resize choices coincide
are always processed together.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from .jpeg import jpeg_compress
from .kernels import pulse_kernel, sample_blur_kernels, sample_sinc_kernels
from .noise import add_noise
from .presets import DegradationPreset, get_preset

__all__ = ["Degrader", "degrade", "sample_kernels", "sample_params", "filter2d", "usm_sharp", "UPDOWN"]

#: Names of the resize types, in the order of ``resize_prob``.
UPDOWN = ("up", "down", "keep")


def _dev(generator: Optional[torch.Generator]):
    return generator.device if generator is not None else "cpu"


def _rand(n: int, generator: Optional[torch.Generator]) -> torch.Tensor:
    """``[n]`` float64 U[0, 1) drawn on the generator's device, returned on the CPU."""
    return torch.rand(n, generator=generator, device=_dev(generator), dtype=torch.float64).cpu()


def _choice(n: int, probs: Sequence[float], generator: Optional[torch.Generator]) -> torch.Tensor:
    p = torch.as_tensor(list(probs), dtype=torch.float64, device=_dev(generator))
    return torch.multinomial(p, n, replacement=True, generator=generator).cpu()


def _randint(n: int, high: int, generator: Optional[torch.Generator]) -> torch.Tensor:
    return torch.randint(0, high, (n,), generator=generator, device=_dev(generator)).cpu()


def sample_kernels(preset: DegradationPreset, n: int, generator: Optional[torch.Generator] = None) -> dict:
    """Sample the three kernels of ``n`` samples, as the official dataset does per item.

    Args:
        preset: the degradation preset.
        n: number of samples.
        generator: torch generator (any device) or ``None`` for the global RNG.

    Returns:
        dict with ``kernel1``, ``kernel2``, ``sinc_kernel`` (``[n, P, P]`` float32 CPU, ``P =
        preset.kernel_pad_to``) and their sampled parameters as ``[n]`` tensors under ``k1_*``, ``k2_*`` and
        ``sinc_*`` (see :func:`realisr.train.degradations.kernels.sample_blur_kernels`).
    """
    p = preset
    k1, p1 = sample_blur_kernels(n, generator, kernel_list=p.kernel_list, kernel_prob=p.kernel_prob,
                                 sigma_range=p.blur_sigma, betag_range=p.betag_range, betap_range=p.betap_range,
                                 sinc_prob=p.sinc_prob, kernel_range=p.kernel_range,
                                 rotation_range=p.rotation_range, pad_to=p.kernel_pad_to)
    k2, p2 = sample_blur_kernels(n, generator, kernel_list=p.kernel_list2, kernel_prob=p.kernel_prob2,
                                 sigma_range=p.blur_sigma2, betag_range=p.betag_range2,
                                 betap_range=p.betap_range2, sinc_prob=p.sinc_prob2, kernel_range=p.kernel_range,
                                 rotation_range=p.rotation_range, pad_to=p.kernel_pad_to)
    ks, ps = sample_sinc_kernels(n, generator, prob=p.final_sinc_prob, kernel_range=p.kernel_range,
                                 pad_to=p.kernel_pad_to)
    out = {"kernel1": k1, "kernel2": k2, "sinc_kernel": ks}
    out.update({f"k1_{k}": v for k, v in p1.items()})
    out.update({f"k2_{k}": v for k, v in p2.items()})
    out.update({f"sinc_{k}": v for k, v in ps.items()})
    return out


def _sample_resize(n, probs, rng, generator, shared):
    """Resize type (up/down/keep) and factor: up ``U[1, hi)``, down ``U[lo, 1)``, keep 1 (official)."""
    m = 1 if shared else n
    kind = _choice(m, probs, generator)
    u = _rand(m, generator)
    lo, hi = rng
    scale = torch.where(kind == 0, 1.0 + (hi - 1.0) * u,
                        torch.where(kind == 1, lo + (1.0 - lo) * u, torch.ones_like(u)))
    return kind.expand(n).clone(), scale.expand(n).clone()


def _sample_noise(n, gprob, sigma_rng, poisson_rng, gray_prob, generator):
    gauss = _rand(n, generator) < gprob
    sigma = sigma_rng[0] + (sigma_rng[1] - sigma_rng[0]) * _rand(n, generator)
    pscale = poisson_rng[0] + (poisson_rng[1] - poisson_rng[0]) * _rand(n, generator)
    gray = _rand(n, generator) < gray_prob
    nan = torch.full_like(sigma, float("nan"))
    return gauss, torch.where(gauss, sigma, nan), torch.where(gauss, nan, pscale), gray


def sample_params(
    preset: DegradationPreset,
    n: int,
    generator: Optional[torch.Generator] = None,
    *,
    shared_resize: bool = False,
) -> dict:
    """Sample every random choice of the degradation for ``n`` samples.

    Args:
        preset: the degradation preset.
        n: batch size.
        generator: torch generator (any device) or ``None`` for the global RNG.
        shared_resize: draw the resize types/scales/modes, the final order and the resize-back mode once for the
            batch (Real-ESRGAN's ``RealESRGANModel``) instead of per sample.

    Returns:
        dict of CPU tensors with first dimension ``n``: the kernels and kernel parameters of
        :func:`sample_kernels`; ``resize1_type`` (index into :data:`UPDOWN`), ``resize1_scale``,
        ``resize1_mode`` (index into ``preset.resize_modes``); ``noise1_gaussian`` (bool), ``noise1_sigma``
        (0..255 scale, NaN for Poisson samples), ``noise1_poisson_scale`` (NaN for Gaussian samples),
        ``noise1_gray`` (bool); ``jpeg1_quality``; ``blur2_apply`` (bool); ``resize2_*``; ``noise2_*``;
        ``jpeg2_quality``; ``final_order`` (0: resize + sinc then JPEG, 1: JPEG then resize + sinc),
        ``final_mode``; ``back_mode`` (mode of the optional resize back).
    """
    p = preset
    out = sample_kernels(p, n, generator)
    nm = len(p.resize_modes)
    m = 1 if shared_resize else n
    out["resize1_type"], out["resize1_scale"] = _sample_resize(n, p.resize_prob, p.resize_range, generator,
                                                               shared_resize)
    out["resize1_mode"] = _randint(m, nm, generator).expand(n).clone()
    (out["noise1_gaussian"], out["noise1_sigma"], out["noise1_poisson_scale"],
     out["noise1_gray"]) = _sample_noise(n, p.gaussian_noise_prob, p.noise_range, p.poisson_scale_range,
                                         p.gray_noise_prob, generator)
    out["jpeg1_quality"] = p.jpeg_range[0] + (p.jpeg_range[1] - p.jpeg_range[0]) * _rand(n, generator)
    out["blur2_apply"] = _rand(n, generator) < p.second_blur_prob
    out["resize2_type"], out["resize2_scale"] = _sample_resize(n, p.resize_prob2, p.resize_range2, generator,
                                                               shared_resize)
    out["resize2_mode"] = _randint(m, nm, generator).expand(n).clone()
    (out["noise2_gaussian"], out["noise2_sigma"], out["noise2_poisson_scale"],
     out["noise2_gray"]) = _sample_noise(n, p.gaussian_noise_prob2, p.noise_range2, p.poisson_scale_range2,
                                         p.gray_noise_prob2, generator)
    out["jpeg2_quality"] = p.jpeg_range2[0] + (p.jpeg_range2[1] - p.jpeg_range2[0]) * _rand(n, generator)
    out["final_order"] = (_rand(m, generator) >= 0.5).long().expand(n).clone()
    out["final_mode"] = _randint(m, nm, generator).expand(n).clone()
    out["back_mode"] = _randint(m, nm, generator).expand(n).clone()
    return out


def filter2d(x: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Convolve every sample with its own kernel, reflect padding (BasicSR ``filter2D``).

    Args:
        x: ``[N, C, H, W]``.
        kernels: ``[N, k, k]`` (or ``[k, k]`` for all), ``k`` odd.

    Returns:
        ``[N, C, H, W]``. Images too small for reflect padding (``k//2 >= H`` or ``W``) use replicate padding.
    """
    n, c, h, w = x.shape
    kernels = kernels.to(device=x.device, dtype=x.dtype)
    if kernels.dim() == 2:
        kernels = kernels.expand(n, -1, -1)
    k = kernels.shape[-1]
    pad = k // 2
    mode = "reflect" if pad < h and pad < w else "replicate"
    xp = F.pad(x, (pad, pad, pad, pad), mode=mode)
    weight = kernels.unsqueeze(1).repeat_interleave(c, dim=0)  # [N*C, 1, k, k]
    # conv2d correlates, as BasicSR's filter2D; every kernel here is point-symmetric (k(p) = k(-p)), so this
    # is also the convolution.
    y = F.conv2d(xp.reshape(1, n * c, h + 2 * pad, w + 2 * pad), weight, groups=n * c)
    return y.view(n, c, h, w)


def _gaussian_kernel_1d(size: int, sigma: float) -> torch.Tensor:
    if sigma <= 0:  # OpenCV's rule for sigma from the size
        sigma = 0.3 * ((size - 1) * 0.5 - 1) + 0.8
    ax = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(ax**2) / (2 * sigma**2))
    return g / g.sum()


def _separable_blur(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``filter2d`` with the kernel ``outer(g, g)``, done as two 1-D passes (the 51x51 USM kernel is slow)."""
    n, c, h, w = x.shape
    pad = len(g) // 2
    mode = "reflect" if pad < h and pad < w else "replicate"
    xp = F.pad(x, (pad, pad, pad, pad), mode=mode).reshape(n * c, 1, h + 2 * pad, w + 2 * pad)
    g = g.to(x.device)
    xp = F.conv2d(xp, g.view(1, 1, -1, 1))
    xp = F.conv2d(xp, g.view(1, 1, 1, -1))
    return xp.view(n, c, h, w)


def usm_sharp(img: torch.Tensor, weight: float = 0.5, radius: int = 50, threshold: float = 10) -> torch.Tensor:
    """Unsharp masking as Real-ESRGAN's ``USMSharp`` (Gaussian blur of size ``radius`` (+1 if even), OpenCV's
    sigma for that size, soft mask where the residual exceeds ``threshold`` grey levels).

    Args:
        img: ``[N, 3, H, W]`` in [0, 1].

    Returns:
        sharpened ``[N, 3, H, W]`` in [0, 1].
    """
    if radius % 2 == 0:
        radius += 1
    g = _gaussian_kernel_1d(radius, 0).to(img.dtype)
    blur = _separable_blur(img, g)
    residual = img - blur
    mask = (residual.abs() * 255 > threshold).to(img.dtype)
    soft = _separable_blur(mask, g)
    sharp = (img + weight * residual).clamp(0, 1)
    return soft * sharp + (1 - soft) * img


def _resize(x: torch.Tensor, mode: str, *, size=None, scale_factor=None) -> torch.Tensor:
    kw = {} if mode == "area" else {"align_corners": False}
    return F.interpolate(x, size=size, scale_factor=scale_factor, mode=mode, **kw)


def _round8(x: torch.Tensor) -> torch.Tensor:
    return torch.clamp((x * 255.0).round(), 0, 255) / 255.0


class Degrader:
    """The two-stage Real-ESRGAN degradation for one preset.

    Example::

        deg = Degrader(get_preset("pisa-sr"), device="cpu")
        lq, params = deg(hq, generator=torch.Generator().manual_seed(0))

    Args:
        preset: a :class:`DegradationPreset` or a preset name.
        device: where the images are processed (``"cpu"``, ``"cuda"``, a ``torch.device``).
        shared_resize: draw resize choices once per batch (see :func:`sample_params`).
    """

    def __init__(self, preset: Union[DegradationPreset, str], device: Union[str, torch.device] = "cpu", *,
                 shared_resize: bool = False):
        self.preset = get_preset(preset) if isinstance(preset, str) else preset
        self.device = torch.device(device)
        self.shared_resize = shared_resize

    def sample_params(self, n: int, generator: Optional[torch.Generator] = None) -> dict:
        """Sample the random choices of ``n`` samples (see :func:`sample_params`)."""
        return sample_params(self.preset, n, generator, shared_resize=self.shared_resize)

    @torch.no_grad()
    def __call__(
        self,
        hq: torch.Tensor,
        generator: Optional[torch.Generator] = None,
        *,
        params: Optional[dict] = None,
        kernels: Optional[dict] = None,
        resize_back: bool = False,
    ) -> tuple[torch.Tensor, dict]:
        """Degrade a batch.

        Args:
            hq: ``[N, 3, H, W]`` float in [0, 1] on any device (moved to ``self.device``).
            generator: seeds every random choice and the noise; the same seed gives the same batch. A CPU
                generator gives the same parameters and noise on CPU and CUDA. ``None``: global RNG.
            params: parameters from :meth:`sample_params` to reuse instead of sampling.
            kernels: ``kernel1`` / ``kernel2`` / ``sinc_kernel`` tensors (e.g. from :func:`sample_kernels`
                in a dataset worker) that replace the sampled ones.
            resize_back: resize the LQ back to ``H x W`` with a random mode and round to 8 bit again, as the
                PiSA-SR / OSEDiff / CCSR training data (``preset.official_resize_back``).

        Returns:
            ``(lq, params)``: ``[N, 3, H // scale, W // scale]`` (or ``[N, 3, H, W]`` with ``resize_back``)
            float32 in [0, 1] on ``self.device``, multiples of 1/255; and the dict of per-sample parameters.

        Raises:
            ValueError: bad shape, or an image smaller than ``4 * scale`` pixels on a side.
        """
        if hq.dim() != 4 or hq.shape[1] != 3:
            raise ValueError(f"expected hq of shape [N, 3, H, W], got {tuple(hq.shape)}")
        n, _, h, w = hq.shape
        s = self.preset.scale
        if min(h, w) < 4 * s:
            raise ValueError(f"images must be at least {4 * s} pixels on each side for scale {s}, got {h}x{w}")
        if params is None:
            params = self.sample_params(n, generator)
        if kernels:
            params = {**params, **{k: v for k, v in kernels.items() if k in ("kernel1", "kernel2", "sinc_kernel")}}
        x = hq.to(self.device, torch.float32)
        lq = torch.empty(n, 3, h if resize_back else h // s, w if resize_back else w // s, device=self.device)
        for idx in self._groups(params):
            sel = idx.to(self.device)
            lq[sel] = self._degrade_group(x[sel], params, idx, generator, resize_back)
        return lq, params

    @staticmethod
    def _groups(params: dict) -> list[torch.Tensor]:
        keys = ("resize1_scale", "resize1_mode", "resize2_scale", "resize2_mode", "final_order", "final_mode",
                "back_mode")
        n = params["resize1_scale"].shape[0]
        groups: dict[tuple, list[int]] = {}
        for i in range(n):
            groups.setdefault(tuple(float(params[k][i]) for k in keys), []).append(i)
        return [torch.tensor(v, dtype=torch.long) for v in groups.values()]

    def _degrade_group(self, x: torch.Tensor, prm: dict, idx: torch.Tensor, generator, resize_back: bool):
        p = self.preset
        modes = p.resize_modes
        i0 = int(idx[0])
        _, _, h, w = x.shape
        if p.usm_sharpen:
            x = usm_sharp(x)
        # ---- stage 1
        out = filter2d(x, prm["kernel1"][idx])
        s1 = float(prm["resize1_scale"][i0])
        out = _resize(out, modes[int(prm["resize1_mode"][i0])], scale_factor=s1)
        out = add_noise(out, gaussian=prm["noise1_gaussian"][idx], sigma=prm["noise1_sigma"][idx],
                        poisson_scale=prm["noise1_poisson_scale"][idx], gray=prm["noise1_gray"][idx],
                        generator=generator)
        out = jpeg_compress(out.clamp(0, 1), prm["jpeg1_quality"][idx].float().to(out.device))
        # ---- stage 2
        apply2 = prm["blur2_apply"][idx]
        if bool(apply2.any()):
            k2 = torch.where(apply2.view(-1, 1, 1), prm["kernel2"][idx],
                             pulse_kernel(len(idx), prm["kernel2"].shape[-1]).float())
            out = filter2d(out, k2)
        s2 = float(prm["resize2_scale"][i0])
        size2 = (max(1, int(h / p.scale * s2)), max(1, int(w / p.scale * s2)))
        out = _resize(out, modes[int(prm["resize2_mode"][i0])], size=size2)
        out = add_noise(out, gaussian=prm["noise2_gaussian"][idx], sigma=prm["noise2_sigma"][idx],
                        poisson_scale=prm["noise2_poisson_scale"][idx], gray=prm["noise2_gray"][idx],
                        generator=generator)
        q2 = prm["jpeg2_quality"][idx].float().to(out.device)
        final_size = (h // p.scale, w // p.scale)
        fmode = modes[int(prm["final_mode"][i0])]
        if int(prm["final_order"][i0]) == 0:
            out = _resize(out, fmode, size=final_size)
            out = filter2d(out, prm["sinc_kernel"][idx])
            out = jpeg_compress(out.clamp(0, 1), q2)
        else:
            out = jpeg_compress(out.clamp(0, 1), q2)
            out = _resize(out, fmode, size=final_size)
            out = filter2d(out, prm["sinc_kernel"][idx])
        lq = _round8(out)
        if resize_back:
            lq = _round8(_resize(lq, modes[int(prm["back_mode"][i0])], size=(h, w)))
        return lq


def degrade(hq: torch.Tensor, preset: Union[str, DegradationPreset] = "pisa-sr", *, seed: Optional[int] = None,
            resize_back: bool = False) -> torch.Tensor:
    """One-call convenience: degrade ``hq`` ``[N, 3, H, W]`` with ``preset`` on its device.

    Args:
        hq: batch in [0, 1].
        preset: preset name or object.
        seed: seed of a CPU generator (``None``: global RNG).
        resize_back: see :meth:`Degrader.__call__`.

    Returns:
        the LQ batch.
    """
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    lq, _ = Degrader(preset, device=hq.device)(hq, generator=g, resize_back=resize_back)
    return lq

