"""Training losses of PiSA-SR and OSEDiff: L2, LPIPS(VGG), CSD, VSD and the fake-UNet diffusion loss.

All latents here are VAE latents already multiplied by the scaling factor (0.18215 for SD-2.x); images are in
[-1, 1]. Score-distillation losses follow the DMD/ProlificDreamer "stop-gradient MSE" trick: a loss whose
gradient with respect to the generator latent ``z`` is ``2 * g / z.numel()`` for a chosen direction ``g``.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F

from realisr.errors import WeightsNotFoundError, require

__all__ = [
    "l2_loss",
    "LPIPSLoss",
    "VGG16_WEIGHTS_NAME",
    "find_lpips_vgg_weights",
    "load_lpips",
    "predict_x0",
    "score_distillation_loss",
    "sample_timesteps",
    "csd_loss",
    "vsd_loss",
    "diffusion_loss",
    "adapters_disabled",
    "BaseModelView",
]

logger = logging.getLogger(__name__)

#: torchvision's file name of the ImageNet VGG16 weights that LPIPS(VGG) is built on.
VGG16_WEIGHTS_NAME = "vgg16-397923af.pth"

# LPIPS keeps torchvision's vgg16.features indices, split into five slices.
_LPIPS_VGG_SLICES = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))


def l2_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error (the official ``F.mse_loss(..., reduction="mean")``)."""
    return F.mse_loss(pred.float(), target.float(), reduction="mean")


# ---------------------------------------------------------------------------------------------------------
# LPIPS(VGG)


def _lpips_search_paths() -> list[Path]:
    from realisr.weights.cache import checkpoints_dir

    paths = [checkpoints_dir() / VGG16_WEIGHTS_NAME, checkpoints_dir() / "lpips" / VGG16_WEIGHTS_NAME]
    try:
        paths.append(Path(torch.hub.get_dir()) / "checkpoints" / VGG16_WEIGHTS_NAME)
    except Exception:  # pragma: no cover - torch.hub always has a dir
        pass
    return paths


def find_lpips_vgg_weights(path: Optional[str | os.PathLike] = None) -> Path:
    """Locate the ImageNet VGG16 weights LPIPS(VGG) needs, without any download.

    Args:
        path: an explicit file; otherwise ``$REALISR_WEIGHTS/vgg16-397923af.pth`` (or ``.../lpips/``), then
            torch's hub cache ``$TORCH_HOME/hub/checkpoints/vgg16-397923af.pth``.

    Returns:
        The path of the weights file.

    Raises:
        WeightsNotFoundError: none of the places holds the file.
    """
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise WeightsNotFoundError(f"LPIPS VGG16 weights not found at {p}: fix loss.lpips_vgg_weights, or "
                                       "run without LPIPS explicitly (--no-lpips / --set loss.lpips=0)")
        return p
    candidates = _lpips_search_paths()
    for p in candidates:
        if p.is_file():
            return p
    raise WeightsNotFoundError(
        f"LPIPS(VGG) needs torchvision's ImageNet weights '{VGG16_WEIGHTS_NAME}': run `realisr weights fetch dists` "
        f"(the same file), copy it to {candidates[0]} or {candidates[-1]}, or set loss.lpips_vgg_weights, or run "
        "without LPIPS explicitly (--no-lpips)")


class LPIPSLoss(torch.nn.Module):
    """LPIPS(VGG) v0.1 (the ``lpips`` package) on images in [-1, 1], frozen, averaged over the batch.

    Build it with :func:`load_lpips`; the linear heads ship with the ``lpips`` package, the VGG16 backbone
    comes from the user's cache (no download).
    """

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net.eval().requires_grad_(False)

    def train(self, mode: bool = True):  # always eval (dropout off), like the official training code
        return super().train(False)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.net(pred.float(), target.float()).mean()


def load_lpips(vgg_weights: Optional[str | os.PathLike] = None) -> LPIPSLoss:
    """Build LPIPS(VGG) from local weights only.

    Args:
        vgg_weights: torchvision ``vgg16-397923af.pth`` (a state dict with ``features.N.*`` keys); ``None``
            searches the caches (see :func:`find_lpips_vgg_weights`).

    Returns:
        A frozen :class:`LPIPSLoss` on CPU.

    Raises:
        WeightsNotFoundError: the VGG16 weights are not available.
        MissingExtraError: the ``lpips`` package is not installed.
        CheckpointError: the weights file lacks VGG16 feature tensors.
    """
    from realisr.errors import CheckpointError

    path = find_lpips_vgg_weights(vgg_weights)
    lpips = require("lpips", "train")
    import warnings

    with warnings.catch_warnings():  # lpips passes torchvision's deprecated `pretrained=` argument
        warnings.simplefilter("ignore")
        # pnet_rand: do not let torchvision download the backbone; we load it from `path` below.
        net = lpips.LPIPS(net="vgg", version="0.1", pretrained=True, pnet_rand=True, verbose=False)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    mapped = {}
    for k, v in state.items():
        parts = k.split(".")
        if len(parts) == 3 and parts[0] == "features":
            idx = int(parts[1])
            for s, (lo, hi) in enumerate(_LPIPS_VGG_SLICES):
                if lo <= idx < hi:
                    mapped[f"slice{s + 1}.{idx}.{parts[2]}"] = v
    expected = set(net.net.state_dict())
    if set(mapped) != expected:
        missing = sorted(expected - set(mapped))
        raise CheckpointError(f"{path} is not a torchvision VGG16 state dict (missing e.g. "
                              f"features.{missing[0].split('.', 1)[1] if missing else '?'}): use "
                              f"{VGG16_WEIGHTS_NAME}")
    net.net.load_state_dict(mapped)
    logger.info("LPIPS(VGG) backbone loaded from %s", path)
    return LPIPSLoss(net)


# ---------------------------------------------------------------------------------------------------------
# diffusion helpers


def predict_x0(z_t: torch.Tensor, eps: torch.Tensor, alphas_cumprod: torch.Tensor,
               t: torch.Tensor) -> torch.Tensor:
    """x0 = (z_t - sqrt(1 - a_t) * eps) / sqrt(a_t) for an epsilon-prediction model, per sample ``t``."""
    a = alphas_cumprod.to(device=z_t.device, dtype=torch.float32)[t.long()].view(-1, 1, 1, 1)
    return (z_t.float() - (1 - a).sqrt() * eps.float()) / a.sqrt()


def sample_timesteps(batch: int, t_range: Sequence[int], device, generator=None) -> torch.Tensor:
    """Integer timesteps uniformly in [t_range[0], t_range[1]) (the official ``randint``)."""
    return torch.randint(int(t_range[0]), int(t_range[1]), (batch,), device=device, generator=generator).long()


def score_distillation_loss(z: torch.Tensor, x0_target: torch.Tensor, x0_other: torch.Tensor) -> torch.Tensor:
    """DMD-style distillation loss whose gradient with respect to ``z`` is ``2 * g / z.numel()``.

    ``g = (x0_other - x0_target) / w`` with ``w = mean_{C,H,W} |z - x0_target|`` per sample, so gradient
    descent moves ``z`` from ``x0_other`` towards ``x0_target``. ``x0_*`` carry no gradient.

    Args:
        z: generator latent (with grad).
        x0_target: x0 predicted by the "real" score (CFG-guided frozen UNet).
        x0_other: x0 predicted by the "fake" score (unconditional branch for CSD, LoRA UNet for VSD).

    Returns:
        Scalar loss ``MSE(z, stopgrad(z - g))``.
    """
    zf = z.float()
    x0_target = x0_target.detach().float()
    x0_other = x0_other.detach().float()
    w = (zf.detach() - x0_target).abs().mean(dim=tuple(range(1, z.ndim)), keepdim=True)
    g = (x0_other - x0_target) / w
    g = torch.nan_to_num(g)
    target = (zf - g).detach()
    return F.mse_loss(zf, target, reduction="mean")


@contextmanager
def adapters_disabled(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Run ``model`` (a module with peft LoRA layers) as its base model, then restore everything.

    peft's per-layer disable/enable also rewrite ``requires_grad`` of adapter weights (enabling re-activates
    training of every *active* adapter), which would silently unfreeze frozen LoRAs, so the flags are saved
    and restored.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    flags = {p: p.requires_grad for p in model.parameters()}
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield model
    finally:
        for m in layers:
            m.enable_adapters(True)
        for p, f in flags.items():
            p.requires_grad_(f)


class BaseModelView:
    """A callable that runs a LoRA-carrying model with its adapters disabled (the frozen base model).

    Lets one UNet serve as both the frozen SD UNet and a LoRA UNet, instead of keeping two copies.
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def __call__(self, *args, **kwargs):
        with adapters_disabled(self.model):
            return self.model(*args, **kwargs)


def _noise_latent(z: torch.Tensor, alphas_cumprod: torch.Tensor, t_range: Sequence[int],
                  generator: Optional[torch.Generator], timesteps: Optional[torch.Tensor],
                  noise: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward diffusion of the detached latent: ``(t, noise, z_t)``, ``z_t = sqrt(abar_t) z + sqrt(1 - abar_t) noise``
    (timesteps drawn first, then the noise, from ``generator`` unless given)."""
    z = z.detach().float()
    t = timesteps if timesteps is not None else sample_timesteps(z.shape[0], t_range, z.device, generator)
    noise = (noise if noise is not None else torch.randn(z.shape, device=z.device, generator=generator)).float()
    a = alphas_cumprod.to(z.device, torch.float32)[t].view(-1, 1, 1, 1)
    return t, noise, a.sqrt() * z + (1 - a).sqrt() * noise


def _unet_eps(unet: Callable, z_t: torch.Tensor, t: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    out = unet(z_t, t, encoder_hidden_states=emb)
    return (out.sample if hasattr(out, "sample") else out[0] if isinstance(out, tuple) else out).float()


def _cfg_eps(unet_fix: Callable, z_t, t, emb, neg_emb, cfg_scale: float, dtype=None) -> torch.Tensor:
    """eps_u + cfg * (eps_c - eps_u) from one batched pass of the frozen UNet over [neg, cond]."""
    n = z_t.shape[0]
    if neg_emb.shape[0] != n:
        neg_emb = neg_emb.expand(n, *neg_emb.shape[1:])
    if emb.shape[0] != n:
        emb = emb.expand(n, *emb.shape[1:])
    dtype = dtype or z_t.dtype
    eps = _unet_eps(unet_fix, torch.cat([z_t, z_t]).to(dtype), torch.cat([t, t]),
                    torch.cat([neg_emb, emb]).to(dtype))
    eps_u, eps_c = eps.chunk(2)
    return eps_u, eps_u + cfg_scale * (eps_c - eps_u)


def csd_loss(z: torch.Tensor, unet_fix: Callable, alphas_cumprod: torch.Tensor, emb: torch.Tensor,
             neg_emb: torch.Tensor, *, cfg_scale: float = 7.5, t_range: Sequence[int] = (20, 500),
             generator: Optional[torch.Generator] = None, timesteps: Optional[torch.Tensor] = None,
             noise: Optional[torch.Tensor] = None, unet_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """PiSA-SR classifier score distillation on the generator latent ``z``.

    ``z_t = sqrt(a_t) z + sqrt(1 - a_t) n`` with ``t ~ U[t_range)``; the frozen UNet gives ``eps_u``
    (negative prompt) and ``eps_c`` (prompt); real = x0(eps_u + cfg (eps_c - eps_u)), fake = x0(eps_u);
    the loss pushes ``z`` along ``real - fake`` normalised by ``mean |z - real|``.

    Args:
        z: generator latent [N,4,h,w] (with grad).
        unet_fix: the frozen SD UNet (called under ``no_grad``).
        alphas_cumprod: the DDPM scheduler's cumulative alphas.
        emb: prompt embeddings [N or 1, 77, C]; neg_emb: negative-prompt embeddings.
        cfg_scale: classifier-free guidance scale (official 7.5).
        t_range: [min, max) of the timesteps (official [20, 500)).
        generator: RNG for timesteps and noise; timesteps/noise: explicit values (tests).
        unet_dtype: dtype to run the frozen UNet in.

    Returns:
        Scalar loss.
    """
    with torch.no_grad():
        t, _, z_t = _noise_latent(z, alphas_cumprod, t_range, generator, timesteps, noise)
        eps_u, eps_cfg = _cfg_eps(unet_fix, z_t, t, emb, neg_emb, cfg_scale, unet_dtype)
        real = predict_x0(z_t, eps_cfg, alphas_cumprod, t)
        fake = predict_x0(z_t, eps_u, alphas_cumprod, t)
    return score_distillation_loss(z, real, fake)


def vsd_loss(z: torch.Tensor, unet_fix: Callable, unet_fake: Callable, alphas_cumprod: torch.Tensor,
             emb: torch.Tensor, neg_emb: torch.Tensor, *, cfg_scale: float = 7.5,
             t_range: Sequence[int] = (20, 980), generator: Optional[torch.Generator] = None,
             timesteps: Optional[torch.Tensor] = None, noise: Optional[torch.Tensor] = None,
             unet_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """OSEDiff variational score distillation on the generator latent ``z``.

    real = x0 of the frozen UNet with CFG (negative prompt vs prompt); fake = x0 of the LoRA "fake" UNet on
    the prompt (no CFG). The loss pushes ``z`` along ``real - fake`` normalised by ``mean |z - real|``, i.e.
    along ``eps_fake - eps_real`` in x0 space (ProlificDreamer/DMD).

    Args:
        z: generator latent (with grad).
        unet_fix: frozen UNet; unet_fake: the fake UNet (both called under ``no_grad``).
        alphas_cumprod, emb, neg_emb, cfg_scale, generator, timesteps, noise, unet_dtype: as :func:`csd_loss`.
        t_range: [min, max) of the timesteps (official [20, 980)).

    Returns:
        Scalar loss.
    """
    n = z.shape[0]
    with torch.no_grad():
        t, _, z_t = _noise_latent(z, alphas_cumprod, t_range, generator, timesteps, noise)
        dtype = unet_dtype or z_t.dtype
        e = emb if emb.shape[0] == n else emb.expand(n, *emb.shape[1:])
        eps_fake = _unet_eps(unet_fake, z_t.to(dtype), t, e.to(dtype))
        fake = predict_x0(z_t, eps_fake, alphas_cumprod, t)
        _, eps_cfg = _cfg_eps(unet_fix, z_t, t, emb, neg_emb, cfg_scale, dtype)
        real = predict_x0(z_t, eps_cfg, alphas_cumprod, t)
    return score_distillation_loss(z, real, fake)


def diffusion_loss(z: torch.Tensor, unet_fake: Callable, alphas_cumprod: torch.Tensor, emb: torch.Tensor, *,
                   generator: Optional[torch.Generator] = None, num_train_timesteps: int = 1000,
                   timesteps: Optional[torch.Tensor] = None, noise: Optional[torch.Tensor] = None
                   ) -> torch.Tensor:
    """Epsilon-MSE of the fake UNet on the detached generator latent, t ~ U{0..999} (OSEDiff ``diff_loss``).

    Args:
        z: generator latent (detached here).
        unet_fake: the trainable fake UNet.
        alphas_cumprod: cumulative alphas; emb: prompt embeddings (no CFG, no null-prompt drop).
        generator, timesteps, noise: RNG or explicit values.

    Returns:
        Scalar loss.
    """
    n = z.shape[0]
    t, noise, z_t = _noise_latent(z, alphas_cumprod, (0, num_train_timesteps), generator, timesteps, noise)
    e = emb if emb.shape[0] == n else emb.expand(n, *emb.shape[1:])
    eps = _unet_eps(unet_fake, z_t, t, e)
    return F.mse_loss(eps, noise, reduction="mean")
