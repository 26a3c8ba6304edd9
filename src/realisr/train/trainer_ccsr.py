"""CCSR-v2 training (docs/ccsr.md and docs/training.md), one stage per run (``ccsr.stage``):

* ``controlnet``: the "pre-trained ControlNet" (``train_controlnet.py``): a ControlNet made from the UNet
  (``CCSRControlNetModel.from_unet``, ``condition_conv_in`` with PyTorch's default init) learns the standard
  epsilon-MSE with ``t ~ U[0, 1000)``, steering the frozen SD UNet with the VAE latent of the LR image.
* ``stage1`` (``train_ccsr_stage1.py``): from the pre-trained ControlNet (``model.init_checkpoint``), the
  ControlNet learns ``l_ori + l_x0T + l_x0tau`` (:func:`realisr.train.ccsr_losses.stage1_losses`).
* ``stage2`` (``train_ccsr_stage2.py``): everything frozen but the VAE **decoder** (``post_quant_conv`` stays
  frozen, as in v2). Under ``no_grad`` the stage-1 model maps the LR to ``x0`` with the truncated sampler
  (``x_T = add_noise(z_LR, e, 999)``; ``inference_steps = 1``: the one-shot ``x0_T``); the decoder learns
  ``l2 MSE + lpips LPIPS + disc_weight (-mean D)`` (LPIPS and GAN from ``begin_disc``) against a projected
  discriminator (:class:`realisr.arch.projected_discriminator_arch.ProjectedDiscriminator`) on frozen DINO
  ViT-S/16 features, conditioned on the DINOv2 ViT-S/14 CLS token of the LR, trained with the hinge loss.

Latents are VAE posterior samples (``model.latent_sample``) times the scaling factor; the prompt is "" (the
official training captions). Checkpoints (``checkpoints/step-N/``) are release folders: ``controlnet/``
(official ``config.json`` with ``use_vae_encode_condition``) and ``vae/``, loadable with ``realisr upscale -m
ccsr --ccsr checkpoints/step-N`` or ``load_pipeline("checkpoints/step-N")``, and as ``model.init_checkpoint`` of
the next stage.
"""

from __future__ import annotations

import logging
from pathlib import Path
import torch

from realisr.errors import CheckpointError
from realisr.train.ccsr_losses import (add_noise, disc_input, eps_loss, generator_adv_loss, hinge_d_loss,
                                       predict_x0, stage1_losses)
from realisr.train.losses import l2_loss
from realisr.train.trainer_base import BaseTrainer

__all__ = ["CCSRNetwork", "CCSRTrainer"]

logger = logging.getLogger(__name__)

_T_START = 999


class CCSRNetwork(torch.nn.Module):
    """The ControlNet-steered SD UNet as one module (for DDP): ``eps = UNet(z_t, t, c, ControlNet(z_t, t, c, z_LR))``."""

    def __init__(self, unet, controlnet):
        super().__init__()
        self.unet = unet
        self.controlnet = controlnet

    def forward(self, z_t: torch.Tensor, t: torch.Tensor, emb: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        dt = self.unet.dtype
        down, mid = self.controlnet(z_t.to(self.controlnet.dtype), t, encoder_hidden_states=emb.to(self.controlnet.dtype),
                                    controlnet_cond=cond.to(self.controlnet.dtype), return_dict=False)
        out = self.unet(z_t.to(dt), t, encoder_hidden_states=emb.to(dt),
                        down_block_additional_residuals=[d.to(dt) for d in down],
                        mid_block_additional_residual=mid.to(dt), return_dict=False)[0]
        return out.float()


class _Decoder(torch.nn.Module):
    """The VAE decoder path ``decode(z / sf)``, clamped to ``[-1, 1]`` (for DDP)."""

    def __init__(self, vae, scaling_factor: float):
        super().__init__()
        self.vae = vae
        self.scaling_factor = scaling_factor

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode((z / self.scaling_factor).to(self.vae.dtype)).sample.float().clamp(-1, 1)


class _Discriminator(torch.nn.Module):
    """The projected discriminator with its frozen conditioning ViT (one module for DDP)."""

    def __init__(self, disc, cond_vit, disc_size: int, cond_size: int):
        super().__init__()
        self.disc, self.cond_vit = disc, cond_vit.requires_grad_(False).eval()
        self.disc_size, self.cond_size = disc_size, cond_size

    def condition(self, lq: torch.Tensor) -> torch.Tensor:
        """The CLS token of the conditioning ViT on the LR (bilinear to ``cond_size``, ImageNet-normalised)."""
        import torch.nn.functional as F

        from realisr.train.ccsr_losses import IMAGENET_MEAN, IMAGENET_STD

        with torch.no_grad():
            x = F.interpolate((lq.float() + 1) / 2, size=(self.cond_size, self.cond_size), mode="bilinear",
                              align_corners=False)
            mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
            std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
            feats = self.cond_vit.forward_features((x - mean) / std)
            return feats[:, 0].float()

    def forward(self, x: torch.Tensor, c: torch.Tensor, generator=None, augment: bool = True) -> torch.Tensor:
        return self.disc(disc_input(x, self.disc_size, generator=generator, augment=augment), c)


class CCSRTrainer(BaseTrainer):
    """CCSR-v2 trainer (see the module docstring); ``realisr train ccsr`` (stage 1), ``ccsr-controlnet``,
    ``ccsr-stage2``, ``ccsr-tiny-cpu``."""

    method = "ccsr"
    checkpoint_name = "ccsr"

    @property
    def stage(self) -> str:
        return self.cfg.ccsr.stage

    def needs_lpips(self) -> bool:
        return self.stage == "stage2" and self.cfg.loss.lpips > 0

    # -- init checkpoint (a release folder) -------------------------------------------------------------------
    def check_init_checkpoint(self, path: str) -> Path:
        """``model.init_checkpoint``: a release folder (``controlnet/``; ``vae/`` optional) of a previous stage.

        Raises:
            WeightsNotFoundError, CheckpointError.
        """
        from realisr.errors import WeightsNotFoundError

        folder = Path(path).expanduser()
        if not (folder / "controlnet" / "config.json").is_file():
            raise WeightsNotFoundError(f"model.init_checkpoint {folder} has no controlnet/: give the checkpoint "
                                       "folder of the previous stage (checkpoints/step-N) or a CCSR release folder")
        return folder

    def load_init_checkpoint(self, folder: Path) -> None:
        from diffusers import AutoencoderKL

        from realisr.arch.ccsr_controlnet_arch import CCSRControlNetModel

        def copy_into(module, state, what):
            own = module.state_dict()
            bad = sorted(set(own) ^ set(state)) or [k for k in own if own[k].shape != state[k].shape]
            if bad:
                raise CheckpointError(f"{folder / what} does not fit the recipe's backbone (e.g. {bad[0]}): same "
                                      "SD-2.1-shaped model needed")
            with torch.no_grad():
                for k, v in state.items():
                    own[k].copy_(v.to(own[k].device, own[k].dtype))

        ctrl = CCSRControlNetModel.from_pretrained(str(folder / "controlnet"))
        copy_into(self.controlnet, ctrl.state_dict(), "controlnet")
        if (folder / "vae" / "config.json").is_file():
            vae = AutoencoderKL.from_pretrained(str(folder / "vae"))
            copy_into(self.vae, vae.state_dict(), "vae")
        logger.info("CCSR %s: initialised from %s", self.stage, folder)

    # -- networks ---------------------------------------------------------------------------------------------
    def build(self, unet, vae) -> None:
        from realisr.arch.ccsr_controlnet_arch import CCSRControlNetModel

        cfg = self.cfg
        controlnet = CCSRControlNetModel.from_unet(unet)
        unet.requires_grad_(False)
        vae.requires_grad_(False)
        controlnet.requires_grad_(False)
        self.unet, self.vae, self.controlnet = unet, vae, controlnet
        acc = self.accelerator
        if self.stage in ("controlnet", "stage1"):
            params = list(controlnet.parameters())
            for p in params:
                p.requires_grad_(True)
            self._trainable_ids = {id(p) for p in params}
            self.params = {"controlnet": params}
            self.cast_frozen(unet, [])
            self.cast_frozen(vae, [])
            self.cast_frozen(controlnet, params)
            if cfg.model.gradient_checkpointing:
                unet.enable_gradient_checkpointing()
                controlnet.enable_gradient_checkpointing()
            unet.train()
            controlnet.train()
            vae.eval()
            net = CCSRNetwork(unet, controlnet)
            opt = self.make_optimizer(params)
            self.net, opt = acc.prepare(net, opt)
            self.optimizers = {"controlnet": opt}
            self.trainable = {"controlnet": controlnet}
            self.decoder = self.disc = None
            return
        # stage 2: the VAE decoder (without post_quant_conv) and the discriminator heads
        dec_params = [p for n, p in vae.named_parameters() if n.startswith("decoder.")]
        for p in dec_params:
            p.requires_grad_(True)
        disc = self._build_discriminator()
        disc_params = [p for p in disc.disc.heads.parameters()]
        self._trainable_ids = {id(p) for p in dec_params + disc_params}
        self.params = {"decoder": dec_params, "disc": disc_params}
        self.cast_frozen(unet, [])
        self.cast_frozen(controlnet, [])
        self.cast_frozen(vae, dec_params)
        disc.to(self.device)
        if cfg.model.gradient_checkpointing:
            vae.enable_gradient_checkpointing()
        unet.eval()
        controlnet.eval()
        vae.train()
        self.net = CCSRNetwork(unet, controlnet)
        opt_dec = self.make_optimizer(dec_params)
        opt_disc = torch.optim.AdamW(disc_params, lr=cfg.ccsr.disc_lr, betas=tuple(cfg.ccsr.disc_betas),
                                     eps=cfg.train.adam_eps, weight_decay=cfg.train.weight_decay)
        self.decoder, self.disc, opt_dec, opt_disc = acc.prepare(_Decoder(vae, self.vae_scale), disc, opt_dec,
                                                                 opt_disc)
        self.optimizers = {"decoder": opt_dec, "disc": opt_disc}
        self.trainable = {"vae": vae, "disc": disc.disc.heads}

    def _build_discriminator(self) -> _Discriminator:
        from realisr.arch.projected_discriminator_arch import ProjectedDiscriminator
        from realisr.weights import dino

        c = self.cfg.ccsr
        if c.discriminator == "tiny":
            backbone, cond = dino.tiny_vit(seed=1), dino.tiny_vit(seed=2)
            disc_size = cond_size = backbone.patch_embed.img_size[0]
            hooks = [h for h in c.hooks if h < len(backbone.blocks)] or [len(backbone.blocks) - 1]
            logger.warning("ccsr.discriminator=tiny: small random ViTs (a plumbing check, not real training)")
        else:
            backbone, cond = dino.dino_vits16(), dino.dinov2_vits14()
            dino.load_vit_state_dict(backbone, dino.find_dino_file(dino.DINO_FILE, c.dino_weights))
            dino.load_vit_state_dict(cond, dino.find_dino_file(dino.DINOV2_FILE, c.dinov2_weights))
            disc_size, cond_size, hooks = c.disc_size, c.cond_size, c.hooks
        disc = ProjectedDiscriminator(backbone, hooks=hooks, c_dim=int(cond.embed_dim), cmap_dim=c.cmap_dim)
        return _Discriminator(disc, cond, disc_size, cond_size)

    def check_discriminator_weights(self) -> None:
        """Stage 2 with the official discriminator: its two files must exist (before anything slow)."""
        from realisr.weights import dino

        c = self.cfg.ccsr
        if self.stage == "stage2" and c.discriminator == "dino":
            dino.find_dino_file(dino.DINO_FILE, c.dino_weights)
            dino.find_dino_file(dino.DINOV2_FILE, c.dinov2_weights)

    def setup(self) -> None:
        self.check_discriminator_weights()
        if self.stage == "stage2" and not self.cfg.model.init_checkpoint:
            logger.warning("CCSR stage 2 without model.init_checkpoint: the decoder learns from an untrained "
                           "ControlNet (give the stage-1 checkpoint folder)")
        super().setup()

    def after_prepare(self) -> None:
        self.t_tau = int(round(self.noise_scheduler.config.num_train_timesteps * self.cfg.ccsr.t_max))

    def train_modules(self) -> list:
        return [self.net] if self.stage != "stage2" else [self.decoder, self.disc]

    # -- steps ------------------------------------------------------------------------------------------------
    def _encode(self, x: torch.Tensor, generator) -> torch.Tensor:
        with torch.no_grad():
            dist = self.vae.encode(x.to(self.vae.dtype)).latent_dist
            z = dist.sample(generator=generator) if self.cfg.model.latent_sample else dist.mode()
        return z.float() * self.vae_scale

    def _eps_fn(self, emb: torch.Tensor, cond: torch.Tensor):
        net = self.net

        def fn(z_t, t):
            return net(z_t, t, emb, cond)
        return fn

    @torch.no_grad()
    def sample_x0(self, z_lr: torch.Tensor, emb: torch.Tensor, generator) -> torch.Tensor:
        """The stage-2 input: the truncated sampler from ``add_noise(z_LR, e, 999)`` (no CFG, prompt "")."""
        from realisr.pipelines.ccsr import schedule as sch

        c = self.cfg.ccsr
        acp = self.alphas_cumprod
        n = z_lr.shape[0]
        net = self.accelerator.unwrap_model(self.net) if self.stage != "stage2" else self.net
        tT = torch.full((n,), _T_START, dtype=torch.long, device=z_lr.device)
        noise = torch.randn(z_lr.shape, generator=generator, device=z_lr.device)
        z = add_noise(z_lr, noise, acp, tT)
        x0 = predict_x0(z, net(z, tT, emb, z_lr), acp, tT)
        plan = sch.truncated_schedule(c.inference_steps, c.t_max, c.t_min)
        if plan.one_step:
            return x0
        ab = acp.float().cpu()
        z = sch.add_noise(x0, torch.randn(x0.shape, generator=generator, device=x0.device), ab.to(x0.device),
                          plan.t_tau)
        final = x0
        for t, prev in zip(plan.loop, plan.prev):
            eps = net(z, torch.full((n,), t, dtype=torch.long, device=z.device), emb, z_lr)
            noise = torch.randn(z.shape, generator=generator, device=z.device)
            prev_z, x0_t = sch.ddpm_step(z, eps, ab.to(z.device), t, prev, noise)
            final = x0_t if plan.truncated else prev_z
            z = prev_z
        return final

    def training_step(self, batch: dict, step: int) -> dict[str, float]:
        cfg = self.cfg
        acc = self.accelerator
        hq, lq, prompts, gdev = self.prepare_batch(batch, step)
        emb = self.encode_prompts(prompts).to(self.weight_dtype)
        z_lr = self._encode(lq, gdev)
        n = hq.shape[0]
        if self.stage != "stage2":
            z_gt = self._encode(hq, gdev)
            fn = self._eps_fn(emb, z_lr)
            if self.stage == "controlnet":
                t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (n,), generator=gdev,
                                  device=self.device)
                loss = eps_loss(fn, z_gt, self.alphas_cumprod, t, torch.randn(z_gt.shape, generator=gdev,
                                                                              device=self.device))
                logs = {"eps": loss.item()}
            else:
                t_ori = torch.randint(0, self.t_tau, (n,), generator=gdev, device=self.device)
                noises = [torch.randn(z_gt.shape, generator=gdev, device=self.device) for _ in range(3)]
                parts = stage1_losses(fn, z_gt, z_lr if cfg.ccsr.is_start_lr else z_gt, self.alphas_cumprod,
                                      t_ori=t_ori, noise_ori=noises[0], noise_T=noises[1], noise_tau=noises[2],
                                      t_tau=self.t_tau, t_start=_T_START)
                loss = parts["ori"] + parts["x0T"] + parts["x0tau"]
                logs = {k: v.item() for k, v in parts.items()}
            acc.backward(loss)
            norm = self.clip_and_step(self.optimizers["controlnet"], self.params["controlnet"])
            logs["loss"] = loss.item()
            if norm is not None:
                logs["grad_norm"] = norm
            return logs
        # stage 2
        x0 = self.sample_x0(z_lr, emb, gdev)
        x = self.decoder(x0)
        loss_l2 = l2_loss(x, hq)
        loss = cfg.loss.l2 * loss_l2
        logs = {"l2": loss_l2.item()}
        gan_on = step >= cfg.ccsr.begin_disc
        disc = acc.unwrap_model(self.disc)
        c = disc.condition(lq) if gan_on else None
        if gan_on:
            if self.lpips is not None:
                loss_lpips = self.lpips(x, hq)
                loss = loss + cfg.loss.lpips * loss_lpips
                logs["lpips"] = loss_lpips.item()
            loss_g = generator_adv_loss(self.disc(x, c, generator=gdev))
            loss = loss + cfg.ccsr.disc_weight * loss_g
            logs["g_adv"] = loss_g.item()
        acc.backward(loss)
        norm = self.clip_and_step(self.optimizers["decoder"], self.params["decoder"])
        logs["loss"] = loss.item()
        if norm is not None:
            logs["grad_norm"] = norm
        self.optimizers["disc"].zero_grad(set_to_none=True)  # the generator's backward reached the heads
        if gan_on:
            real = self.disc(hq, c, generator=gdev)
            fake = self.disc(x.detach(), c, generator=gdev)
            loss_d = hinge_d_loss(real, fake, cfg.ccsr.disc_train_weight)
            acc.backward(loss_d)
            self.clip_and_step(self.optimizers["disc"], self.params["disc"])
            logs["d_hinge"] = loss_d.item()
        return logs

    # -- checkpoints and validation -----------------------------------------------------------------------------
    def write_official(self, folder: Path) -> None:
        """A release folder: ``controlnet/`` and ``vae/`` (official diffusers layout)."""
        from realisr.weights.ccsr import write_release_parts

        write_release_parts(folder, controlnet=self.controlnet, vae=self.vae)

    def official_checkpoint(self) -> dict:  # pragma: no cover - CCSR writes release folders
        raise NotImplementedError("CCSR checkpoints are release folders (write_official)")

    @torch.no_grad()
    def generate(self, lq: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        from realisr.train.data import to_model_range

        g = torch.Generator(self.device).manual_seed(self.cfg.validation.seed)
        lq_m = to_model_range(lq.float().to(self.device))
        emb = self.encode_prompts(prompts).to(self.weight_dtype)
        with self.accelerator.autocast():
            z_lr = self._encode(lq_m, g)
            x0 = self.sample_x0(z_lr, emb, g)
            x = self.vae.decode((x0 / self.vae_scale).to(self.vae.dtype)).sample.float().clamp(-1, 1)
        return (x * 0.5 + 0.5).clamp(0, 1)

