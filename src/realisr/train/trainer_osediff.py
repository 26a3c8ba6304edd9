"""OSEDiff training with variational score distillation (spec: docs/training.md).

Generator: ``z_L = VAE_enc_lora(LQ) * sf``, ``eps = UNet_lora(z_L, t=999, c)``, ``z_H`` = the DDPM x0 at
t=999, ``x = VAE.dec(z_H / sf).clamp(-1, 1)``. Trainable: UNet LoRA (3 adapters), the full UNet ``conv_in``
and the VAE-encoder LoRA. Each step:

1. generator loss ``l2 + lpips * LPIPS(VGG) + vsd * VSD`` (frozen UNet with CFG vs the fake UNet), step;
2. fake-UNet loss ``vsd_lora * eps-MSE`` on the detached ``z_H``, step of the second optimiser.

The fake UNet is SD's UNet with its own three LoRA adapters, **all** active by default
(``osediff.fake_unet_adapters: others`` reproduces the official code, where only the mid-block adapter is
active). The frozen "real" UNet is the same module with its adapters switched off: one UNet instead of two.
"""

from __future__ import annotations

import copy
import logging
from typing import Optional

import torch

from realisr.train.losses import BaseModelView, diffusion_loss, l2_loss, vsd_loss
from realisr.train.trainer_base import BaseTrainer

__all__ = ["OSEDiffGenerator", "OSEDiffTrainer"]

logger = logging.getLogger(__name__)

_T = 999  # OSEDiff's fixed timestep


class OSEDiffGenerator(torch.nn.Module):
    """The OSEDiff one-step generator (UNet + VAE, both with LoRA), as one module for DDP.

    Args:
        unet, vae: with the OSEDiff adapters injected.
        alphas_cumprod: the DDPM cumulative alphas (x0 at t=999).
        scaling_factor: VAE latent scaling (0.18215).
        latent_sample: sample the posterior (official) instead of taking its mean.
    """

    def __init__(self, unet, vae, alphas_cumprod: torch.Tensor, scaling_factor: float, latent_sample: bool = True):
        super().__init__()
        self.unet = unet
        self.vae = vae
        self.register_buffer("alpha_t", alphas_cumprod[_T].float().clone(), persistent=False)
        self.scaling_factor = scaling_factor
        self.latent_sample = latent_sample

    def forward(self, lq: torch.Tensor, emb: torch.Tensor, generator: Optional[torch.Generator] = None,
                sample: Optional[bool] = None):
        """LQ in [-1,1] -> (SR in [-1,1], z_H)."""
        sample = self.latent_sample if sample is None else sample
        dist = self.vae.encode(lq).latent_dist
        z_l = (dist.sample(generator=generator) if sample else dist.mode()) * self.scaling_factor
        t = torch.full((z_l.shape[0],), _T, dtype=torch.long, device=z_l.device)
        eps = self.unet(z_l, t, encoder_hidden_states=emb).sample
        a = self.alpha_t
        z_h = (z_l.float() - (1 - a).sqrt() * eps.float()) / a.sqrt()  # the DDPM step at t=999 is exactly x0
        x = self.vae.decode((z_h / self.scaling_factor).to(self.vae.dtype)).sample.clamp(-1, 1)
        return x, z_h


class OSEDiffTrainer(BaseTrainer):
    """OSEDiff trainer (see the module docstring)."""

    method = "osediff"
    checkpoint_name = "osediff"

    def build(self, unet, vae) -> None:
        from realisr.models import lora

        cfg = self.cfg
        fake = copy.deepcopy(unet)  # before injection: the fake UNet starts from SD's weights
        self.unet_modules, self.vae_modules = lora.inject_osediff_adapters(
            unet, vae, rank_unet=cfg.osediff.lora_rank_unet, rank_vae=cfg.osediff.lora_rank_vae)
        unet.requires_grad_(False)
        vae.requires_grad_(False)
        gen_params = [p for n, p in unet.named_parameters() if "lora_" in n or n.startswith("conv_in.")]
        gen_params += [p for n, p in vae.named_parameters() if "lora_" in n]
        for p in gen_params:
            p.requires_grad_(True)

        lora.inject_osediff_adapters(fake, None, rank_unet=cfg.osediff.lora_rank_unet, unet_modules=self.unet_modules)
        fake.requires_grad_(False)
        active = (list(lora.OSEDIFF_UNET_ADAPTERS) if cfg.osediff.fake_unet_adapters == "all"
                  else ["default_others"])
        lora.set_active_adapters(fake, active)
        lora.set_trainable_adapters(fake, active)
        if cfg.osediff.fake_unet_adapters == "others":
            logger.warning("osediff.fake_unet_adapters=others: only the mid-block LoRA of the fake UNet is active "
                           "(reproduces the official code)")
        fake_params = [p for p in fake.parameters() if p.requires_grad]
        self.gen_params, self.fake_params = gen_params, fake_params
        self._trainable_ids = {id(p) for p in gen_params + fake_params}

        self.cast_frozen(unet, gen_params)
        self.cast_frozen(vae, gen_params)
        self.cast_frozen(fake, fake_params)
        if cfg.model.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
            vae.enable_gradient_checkpointing()
            fake.enable_gradient_checkpointing()
        unet.train()
        vae.train()
        fake.train()
        gen = OSEDiffGenerator(unet, vae, self.alphas_cumprod.cpu(), self.vae_scale, cfg.model.latent_sample)
        opt_gen = self.make_optimizer(gen_params)
        opt_fake = self.make_optimizer(fake_params)
        self.generator, self.fake_unet, opt_gen, opt_fake = self.accelerator.prepare(gen, fake, opt_gen, opt_fake)
        self.optimizers = {"gen": opt_gen, "fake": opt_fake}
        self.trainable = {"unet": unet, "vae": vae, "fake_unet": fake}
        self.unet, self.vae, self.fake = unet, vae, fake
        self.neg_emb = None

    def init_ranks(self, ckpt):
        o = self.cfg.osediff
        return ((ckpt.rank("unet"), ckpt.rank("vae")), (o.lora_rank_unet, o.lora_rank_vae),
                ("osediff.lora_rank_unet", "osediff.lora_rank_vae"))

    def load_init_checkpoint(self, ckpt) -> None:
        from realisr.models import lora

        lora.load_lora_state_dict(self.unet, ckpt.state_dict_unet, what=ckpt.name)
        lora.load_lora_state_dict(self.vae, ckpt.state_dict_vae, what=ckpt.name)
        logger.info("initialised the generator (UNet LoRA, conv_in, VAE-encoder LoRA) from %s", ckpt.path)

    def after_prepare(self) -> None:
        self.neg_emb = self.encode_prompts([self.cfg.osediff.negative_prompt])

    def train_modules(self) -> list:
        return [self.generator, self.fake_unet]

    def training_step(self, batch: dict, step: int) -> dict[str, float]:
        cfg = self.cfg
        acc = self.accelerator
        hq, lq, prompts, gdev = self.prepare_batch(batch, step)
        emb = self.encode_prompts(prompts).to(self.weight_dtype)
        x, z_h = self.generator(lq, emb, generator=gdev)
        loss_l2 = l2_loss(x, hq)
        loss = cfg.loss.l2 * loss_l2
        logs = {"l2": loss_l2.item()}
        if self.lpips is not None:
            loss_lpips = self.lpips(x, hq)
            loss = loss + cfg.loss.lpips * loss_lpips
            logs["lpips"] = loss_lpips.item()
        if cfg.loss.vsd > 0:
            fake = acc.unwrap_model(self.fake_unet)
            loss_vsd = vsd_loss(z_h, BaseModelView(fake), fake, self.alphas_cumprod, emb, self.neg_emb,
                                cfg_scale=cfg.osediff.cfg_scale, t_range=cfg.osediff.timestep_range,
                                generator=gdev, unet_dtype=self.weight_dtype)
            loss = loss + cfg.loss.vsd * loss_vsd
            logs["vsd"] = loss_vsd.item()
        acc.backward(loss)
        norm = self.clip_and_step(self.optimizers["gen"], self.gen_params)
        logs["loss"] = loss.item()
        if norm is not None:
            logs["grad_norm"] = norm
        if cfg.loss.vsd_lora > 0:
            loss_diff = diffusion_loss(z_h, self.fake_unet, self.alphas_cumprod, emb.float(), generator=gdev)
            acc.backward(cfg.loss.vsd_lora * loss_diff)
            self.clip_and_step(self.optimizers["fake"], self.fake_params)
            logs["diff"] = loss_diff.item()
        return logs

    def official_checkpoint(self) -> dict:
        from realisr.weights.official import osediff_checkpoint_dict

        return osediff_checkpoint_dict(self.unet, self.vae, self.unet_modules, self.vae_modules,
                                       self.cfg.osediff.lora_rank_unet, self.cfg.osediff.lora_rank_vae)

    @torch.no_grad()
    def generate(self, lq: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        from realisr.train.data import to_model_range

        gen = self.accelerator.unwrap_model(self.generator)
        emb = self.encode_prompts(prompts).to(self.weight_dtype)
        with self.accelerator.autocast():
            x, _ = gen(to_model_range(lq.float()), emb, sample=False)
        return (x.float() * 0.5 + 0.5).clamp(0, 1)

