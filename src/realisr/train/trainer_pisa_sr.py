"""PiSA-SR two-stage dual-LoRA training (spec: docs/training.md).

Generator at every step: ``z_L = VAE.enc(LQ) * sf`` (frozen VAE), ``eps = UNet(z_L, t=1, c)``,
``z_H = z_L - eps``, ``x = VAE.dec(z_H / sf).clamp(-1, 1)``.

* Stage 1 (steps ``[0, pix_steps)``): only the pixel adapters are active and trained; loss = l2.
* Stage 2 (steps ``[pix_steps, max_steps)``): all six adapters active; only the semantic ones train;
  loss = l2 + lpips * LPIPS(VGG) + csd * CSD. The pixel LoRA is frozen **and not in the optimiser**: the
  official code keeps it in its AdamW with zero gradients, so weight decay keeps shrinking it in stage 2.

The frozen SD UNet that CSD needs is the generator's own UNet with its adapters switched off (PiSA-SR
never trains base weights), which saves a second 866 M-parameter UNet in memory.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

from realisr.train.losses import BaseModelView, csd_loss, l2_loss
from realisr.train.trainer_base import BaseTrainer

__all__ = ["PiSASRGenerator", "PiSASRTrainer"]

logger = logging.getLogger(__name__)


class PiSASRGenerator(torch.nn.Module):
    """The PiSA-SR one-step generator (UNet with LoRA + frozen VAE), as one module for DDP.

    Args:
        unet: UNet with the PiSA-SR adapters injected.
        vae: frozen VAE.
        scaling_factor: VAE latent scaling (0.18215).
        latent_sample: sample the posterior (official) instead of taking its mean.
    """

    def __init__(self, unet, vae, scaling_factor: float, latent_sample: bool = True):
        super().__init__()
        self.unet = unet
        self.vae = vae
        self.scaling_factor = scaling_factor
        self.latent_sample = latent_sample

    def forward(self, lq: torch.Tensor, emb: torch.Tensor, generator: Optional[torch.Generator] = None,
                sample: Optional[bool] = None):
        """LQ in [-1,1] -> (SR in [-1,1], z_H)."""
        sample = self.latent_sample if sample is None else sample
        with torch.no_grad():  # frozen encoder, input without grad
            dist = self.vae.encode(lq.to(self.vae.dtype)).latent_dist
            z_l = (dist.sample(generator=generator) if sample else dist.mode()) * self.scaling_factor
        t = torch.ones(z_l.shape[0], dtype=torch.long, device=z_l.device)
        eps = self.unet(z_l, t, encoder_hidden_states=emb).sample
        z_h = z_l - eps
        x = self.vae.decode((z_h / self.scaling_factor).to(self.vae.dtype)).sample.clamp(-1, 1)
        return x, z_h


class PiSASRTrainer(BaseTrainer):
    """PiSA-SR trainer (see the module docstring). Use via :func:`realisr.train.trainer_pisa_sr.train` or
    ``realisr train pisa-sr.yaml``."""

    method = "pisa-sr"
    checkpoint_name = "pisa_sr"

    def needs_lpips(self) -> bool:
        # LPIPS is used in stage 2 only; a stage-1-only run does not need the weights
        return self.cfg.loss.lpips > 0 and self.cfg.train.max_steps > self.cfg.pisa_sr.pix_steps

    def build(self, unet, vae) -> None:
        from realisr.models import lora

        cfg = self.cfg
        self.modules = lora.inject_pisa_adapters(unet, rank_pix=cfg.pisa_sr.lora_rank_pix,
                                                 rank_sem=cfg.pisa_sr.lora_rank_sem)
        unet.requires_grad_(False)
        vae.requires_grad_(False)
        self.pix_params = [p for n, p in unet.named_parameters() if "lora_" in n and n.split(".")[-2].endswith("_pix")]
        self.sem_params = [p for n, p in unet.named_parameters() if "lora_" in n and n.split(".")[-2].endswith("_sem")]
        for p in self.pix_params + self.sem_params:
            p.requires_grad_(True)  # DDP must register both sets; stages narrow this down afterwards
        self._trainable_ids = {id(p) for p in self.pix_params + self.sem_params}
        self.cast_frozen(unet, self.pix_params + self.sem_params)
        self.cast_frozen(vae, [])
        if cfg.model.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
            vae.enable_gradient_checkpointing()
        unet.train()
        vae.eval()
        gen = PiSASRGenerator(unet, vae, self.vae_scale, cfg.model.latent_sample)
        opt_pix = self.make_optimizer(self.pix_params)
        opt_sem = self.make_optimizer(self.sem_params)
        self.generator, opt_pix, opt_sem = self.accelerator.prepare(gen, opt_pix, opt_sem)
        self.optimizers = {"pix": opt_pix, "sem": opt_sem}
        self.trainable = {"unet": unet}
        self.unet = unet
        self.stage = 0
        self.neg_emb = None

    def init_ranks(self, ckpt):
        p = self.cfg.pisa_sr
        return ((ckpt.rank("pix"), ckpt.rank("sem")), (p.lora_rank_pix, p.lora_rank_sem),
                ("pisa_sr.lora_rank_pix", "pisa_sr.lora_rank_sem"))

    def load_init_checkpoint(self, ckpt) -> None:
        from realisr.models import lora

        lora.load_lora_state_dict(self.unet, ckpt.state_dict_unet, what=ckpt.name)
        logger.info("initialised both LoRAs from %s", ckpt.path)

    def after_prepare(self) -> None:
        self.neg_emb = self.encode_prompts([self.cfg.pisa_sr.negative_prompt])
        self._set_stage(1)

    def _set_stage(self, stage: int) -> None:
        from realisr.models import lora

        if stage == self.stage:
            return
        if stage == 1:
            lora.set_active_adapters(self.unet, lora.PISA_PIX_ADAPTERS)
            lora.set_trainable_adapters(self.unet, lora.PISA_PIX_ADAPTERS)
        else:
            if self.cfg.loss.lpips > 0 and self.lpips is None:  # max_steps was raised after setup
                from realisr.train.losses import load_lpips

                self.lpips = load_lpips(self.cfg.loss.lpips_vgg_weights).to(self.device)
            lora.set_active_adapters(self.unet, lora.PISA_PIX_ADAPTERS + lora.PISA_SEM_ADAPTERS)
            lora.set_trainable_adapters(self.unet, lora.PISA_SEM_ADAPTERS)
            for p in self.pix_params:
                p.grad = None
            logger.info("PiSA-SR stage 2 (semantic LoRA) from step %d", self.step)
        self.stage = stage

    def before_step(self, step: int) -> None:
        self._set_stage(2 if step >= self.cfg.pisa_sr.pix_steps else 1)

    def train_modules(self) -> list:
        return [self.generator]

    def training_step(self, batch: dict, step: int) -> dict[str, float]:
        cfg = self.cfg
        acc = self.accelerator
        hq, lq, prompts, gdev = self.prepare_batch(batch, step)
        emb = self.encode_prompts(prompts).to(self.weight_dtype)
        x, z_h = self.generator(lq, emb, generator=gdev)
        loss_l2 = l2_loss(x, hq)
        logs = {"l2": loss_l2.item()}
        loss = cfg.loss.l2 * loss_l2
        if self.stage == 2:
            if self.lpips is not None:
                loss_lpips = self.lpips(x, hq)
                loss = loss + cfg.loss.lpips * loss_lpips
                logs["lpips"] = loss_lpips.item()
            if cfg.loss.csd > 0:
                unet = acc.unwrap_model(self.generator).unet
                loss_csd = csd_loss(z_h, BaseModelView(unet), self.alphas_cumprod, emb, self.neg_emb,
                                    cfg_scale=cfg.pisa_sr.cfg_scale, t_range=cfg.pisa_sr.timestep_range,
                                    generator=gdev, unet_dtype=self.weight_dtype)
                loss = loss + cfg.loss.csd * loss_csd
                logs["csd"] = loss_csd.item()
        acc.backward(loss)
        params = self.pix_params if self.stage == 1 else self.sem_params
        opt = self.optimizers["pix" if self.stage == 1 else "sem"]
        norm = self.clip_and_step(opt, params)
        logs["loss"] = loss.item()
        if norm is not None:
            logs["grad_norm"] = norm
        logs["stage"] = float(self.stage)
        return logs

    def official_checkpoint(self) -> dict:
        from realisr.weights.official import pisa_checkpoint_dict

        return pisa_checkpoint_dict(self.unet, self.modules, self.cfg.pisa_sr.lora_rank_pix,
                                    self.cfg.pisa_sr.lora_rank_sem)

    @torch.no_grad()
    def generate(self, lq: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        from realisr.train.data import to_model_range

        gen = self.accelerator.unwrap_model(self.generator)
        emb = self.encode_prompts(prompts).to(self.weight_dtype)
        with self.accelerator.autocast():
            x, _ = gen(to_model_range(lq.float()), emb, sample=False)
        return (x.float() * 0.5 + 0.5).clamp(0, 1)
