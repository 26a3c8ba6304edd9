"""CCSR-v2 training losses (docs/ccsr.md, Training) and the discriminator's input processing.

Latents are VAE latents times the scaling factor; images are in ``[-1, 1]``. ``net(z_t, t)`` is the
ControlNet-steered UNet's epsilon prediction for the batch's condition (a closure).

* ControlNet pre-training: ``MSE(net(z_t, t), noise)``, ``z_t = add_noise(z_gt, noise, t)``, ``t ~ U[0, 1000)``.
* Stage 1 (:func:`stage1_losses`): ``l_ori`` (the same with ``t ~ U[0, t_tau)``) + ``l_x0T`` + ``l_x0tau``:
  ``x_T = add_noise(z_start, e2, 999)`` (``z_start = z_gt``; ``z_LR`` with ``is_start_lr``),
  ``x0_T = x0(x_T, net(x_T, 999))``, ``l_x0T = MSE(x0_T, z_gt)``; ``x_tau = add_noise(x0_T, e3, t_tau)`` with
  gradients through ``x0_T``, ``l_x0tau = MSE(x0(x_tau, net(x_tau, t_tau)), z_gt)``. ``t_tau = round(1000 t_max)``.
* Stage 2: generator ``l2 MSE(x, gt) + lpips LPIPS(x, gt) + disc (-mean D(x))`` (LPIPS and GAN from
  ``begin_disc``); discriminator hinge ``w [mean relu(1 - D(gt)) + mean relu(1 + D(x))]``.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

__all__ = ["add_noise", "predict_x0", "eps_loss", "stage1_losses", "hinge_d_loss", "generator_adv_loss",
           "disc_input", "diff_augment", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _abar(alphas_cumprod: torch.Tensor, t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return alphas_cumprod.to(ref.device, torch.float32)[t.long().to(ref.device)].view(-1, *([1] * (ref.ndim - 1)))


def add_noise(z: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``sqrt(abar_t) z + sqrt(1 - abar_t) noise`` per sample (keeps gradients of ``z``)."""
    a = _abar(alphas_cumprod, t, z)
    return a.sqrt() * z.float() + (1 - a).sqrt() * noise.float()


def predict_x0(z_t: torch.Tensor, eps: torch.Tensor, alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``(z_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)`` per sample."""
    a = _abar(alphas_cumprod, t, z_t)
    return (z_t.float() - (1 - a).sqrt() * eps.float()) / a.sqrt()


def eps_loss(net: Callable, z_gt: torch.Tensor, alphas_cumprod: torch.Tensor, t: torch.Tensor,
             noise: torch.Tensor) -> torch.Tensor:
    """The standard epsilon-prediction MSE at timesteps ``t``."""
    z_t = add_noise(z_gt, noise, alphas_cumprod, t)
    return F.mse_loss(net(z_t, t).float(), noise.float(), reduction="mean")


def stage1_losses(net: Callable, z_gt: torch.Tensor, z_start: torch.Tensor, alphas_cumprod: torch.Tensor, *,
                  t_ori: torch.Tensor, noise_ori: torch.Tensor, noise_T: torch.Tensor, noise_tau: torch.Tensor,
                  t_tau: int = 667, t_start: int = 999) -> dict:
    """CCSR stage 1's three latent losses (see the module docstring).

    Returns:
        ``{"ori": ..., "x0T": ..., "x0tau": ...}`` scalar tensors (their sum is the training loss).
    """
    n = z_gt.shape[0]
    ori = eps_loss(net, z_gt, alphas_cumprod, t_ori, noise_ori)
    tT = torch.full((n,), t_start, dtype=torch.long, device=z_gt.device)
    x_T = add_noise(z_start, noise_T, alphas_cumprod, tT)
    x0_T = predict_x0(x_T, net(x_T, tT), alphas_cumprod, tT)
    l_T = F.mse_loss(x0_T, z_gt.float(), reduction="mean")
    tt = torch.full((n,), t_tau, dtype=torch.long, device=z_gt.device)
    x_tau = add_noise(x0_T, noise_tau, alphas_cumprod, tt)
    x0_tau = predict_x0(x_tau, net(x_tau, tt), alphas_cumprod, tt)
    l_tau = F.mse_loss(x0_tau, z_gt.float(), reduction="mean")
    return {"ori": ori, "x0T": l_T, "x0tau": l_tau}


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor, weight: float = 0.5) -> torch.Tensor:
    """``weight * [mean relu(1 - D(real)) + mean relu(1 + D(fake))]``."""
    return weight * (F.relu(1 - real_logits.float()).mean() + F.relu(1 + fake_logits.float()).mean())


def generator_adv_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """``-mean D(fake)``."""
    return -fake_logits.float().mean()


def diff_augment(x: torch.Tensor, generator: Optional[torch.Generator] = None, translation: float = 0.125,
                 cutout: float = 0.5) -> torch.Tensor:
    """DiffAugment's ``translation`` (zero-padded shifts up to ``translation`` of the size) and ``cutout`` (a
    zeroed square of ``cutout`` of the size), per sample, differentiable in ``x``."""
    b, _, h, w = x.shape
    dev = x.device

    def rint(lo, hi):
        return torch.randint(lo, hi + 1, (b,), generator=generator, device=generator.device if generator else dev).to(dev)

    sh, sw = int(h * translation + 0.5), int(w * translation + 0.5)
    ty, tx = rint(-sh, sh), rint(-sw, sw)
    gy = torch.arange(h, device=dev)[None, :, None] - ty[:, None, None]
    gx = torch.arange(w, device=dev)[None, None, :] - tx[:, None, None]
    valid = ((gy >= 0) & (gy < h) & (gx >= 0) & (gx < w)).unsqueeze(1)
    idx = (gy.clamp(0, h - 1) * w + gx.clamp(0, w - 1)).flatten(1)
    x = x.flatten(2).gather(2, idx.unsqueeze(1).expand(-1, x.shape[1], -1)).view_as(x) * valid
    ch, cw = int(h * cutout + 0.5), int(w * cutout + 0.5)
    if ch > 0 and cw > 0:
        cy, cx = rint(0, h - 1), rint(0, w - 1)
        yy = torch.arange(h, device=dev)[None, :, None]
        xx = torch.arange(w, device=dev)[None, None, :]
        keep = ~(((yy - cy[:, None, None]).abs() <= ch // 2) & ((xx - cx[:, None, None]).abs() <= cw // 2))
        x = x * keep.unsqueeze(1)
    return x


def disc_input(x: torch.Tensor, size: int, *, generator: Optional[torch.Generator] = None, augment: bool = True,
               crop_prob: float = 0.5) -> torch.Tensor:
    """An image in ``[-1, 1]`` as the discriminator's ViT sees it: (larger than ``size``: a random ``size`` crop
    with probability ``crop_prob``, else) area-resized to ``size``, DiffAugment (translation, cutout), ImageNet
    normalisation."""
    b, _, h, w = x.shape
    if augment and (h > size or w > size):
        if torch.rand((), generator=generator, device=generator.device if generator else "cpu").item() < crop_prob:
            dev = generator.device if generator else "cpu"
            y0 = int(torch.randint(0, max(1, h - size + 1), (), generator=generator, device=dev))
            x0 = int(torch.randint(0, max(1, w - size + 1), (), generator=generator, device=dev))
            x = x[:, :, y0:y0 + size, x0:x0 + size]
    if tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x.float(), size=(size, size), mode="area")
    if augment:
        x = diff_augment(x, generator)
    x01 = (x.float() + 1) / 2
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x01 - mean) / std
