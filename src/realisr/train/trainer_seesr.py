"""SeeSR stage-2 training (docs/seesr.md, Training; official ``train_seesr.py``).

Each step, per image: ``z0 = VAE(HQ).sample * sf`` (frozen VAE), ``eps ~ N(0, I)``, ``t ~ U{0..999}``,
``z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps``; the ControlNet sees ``z_t``, the LQ bicubic-upsampled to the HQ
size (in ``[0, 1]``), the text and the soft prompt, and the UNet predicts ``eps`` with the ControlNet's residuals
and the same soft prompt: ``loss = MSE(eps_pred, eps)``.

* Trainable: every ControlNet parameter and the UNet's ``image_attentions`` (newly initialised on SD-2-base's
  UNet; the ControlNet starts as ``from_unet`` of that UNet, image attentions included). Everything else is
  frozen; the UNet stays in fp32 as in the official script (its weights are saved with the checkpoint).
* Text: tags of the HQ image from plain RAM (official: ``make_tags.py`` on the GT), or captions; each image's
  prompt becomes "" with probability ``data.null_text_ratio`` (0.5; per image, as the official dataset).
* Soft prompt: DAPE on the LQ, bicubic to 384 and ImageNet-normalised (the official training preprocessing),
  without gradients.
* AdamW (lr 5e-5, weight decay 1e-2), constant learning rate, gradient clipping 1.0.
* Data: pre-made pairs in the official layout (``seesr.paired_roots``: ``gt/``, ``sr_bicubic/``, ``tag/``),
  matched by file name, or HQ crops degraded on the fly (``data.degradation``, then bicubic x ``data.scale``).
* Checkpoints: ``checkpoints/step-N/seesr/{unet,controlnet}`` in the official layout, which
  ``realisr upscale -m seesr --seesr .../seesr`` (and the official code) load.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from realisr.train.losses import diffusion_loss
from realisr.train.trainer_base import BaseTrainer

__all__ = ["SeeSRDenoiser", "SeeSRTrainer", "seesr_eps_loss", "dape_training_input"]

logger = logging.getLogger(__name__)


class SeeSRDenoiser(torch.nn.Module):
    """The ControlNet and the UNet as one module (one DDP wrapper): ``(z_t, t, text, cond, soft) -> eps``."""

    def __init__(self, unet, controlnet):
        super().__init__()
        self.unet = unet
        self.controlnet = controlnet

    def forward(self, z_t, t, encoder_hidden_states, cond, image_embeds):
        down, mid = self.controlnet(z_t, t, encoder_hidden_states, cond, image_encoder_hidden_states=image_embeds,
                                    return_dict=False)
        dtype = z_t.dtype if z_t.is_floating_point() else None
        down = [d.to(dtype) for d in down] if dtype is not None else down
        return self.unet(z_t, t, encoder_hidden_states, image_encoder_hidden_states=image_embeds,
                         down_block_additional_residuals=down, mid_block_additional_residual=mid.to(dtype or mid.dtype),
                         return_dict=False)[0]


def seesr_eps_loss(model, z0, text, cond, soft, alphas_cumprod, *, generator=None, timesteps=None, noise=None):
    """The stage-2 loss: ``MSE(model(z_t, t, text, cond, soft), eps)`` with ``z_t`` noised from ``z0`` at
    ``t ~ U{0..999}`` (or the given ``timesteps`` / ``noise``)."""
    def unet_like(z_t, t, encoder_hidden_states):
        return model(z_t, t, encoder_hidden_states, cond, soft)

    return diffusion_loss(z0, unet_like, alphas_cumprod, text, generator=generator, timesteps=timesteps, noise=noise)


def dape_training_input(lq01: torch.Tensor, size: int = 384) -> torch.Tensor:
    """The official training input of DAPE: bicubic to ``size`` (no antialiasing), clamped, ImageNet-normalised."""
    from realisr.tagging import IMAGENET_MEAN, IMAGENET_STD

    x = F.interpolate(lq01.float(), size=(size, size), mode="bicubic", align_corners=False).clamp(0.0, 1.0)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


class SeeSRTrainer(BaseTrainer):
    """SeeSR stage-2 trainer (see the module docstring)."""

    method = "seesr"
    checkpoint_name = "seesr"

    # ------------------------------------------------------------------------------------------------ setup
    def setup(self) -> None:
        from realisr.tagging import find_tagger_files

        s = self.cfg.seesr
        # every missing tagger file is named before anything slow is loaded
        find_tagger_files("dape", ram=s.ram, dape=s.dape, root=s.tagger_root)
        super().setup()

    def needs_lpips(self) -> bool:
        return False

    def _tag_mode(self) -> str:
        mode = self.cfg.seesr.tags
        if mode != "auto":
            return mode
        if self.cfg.seesr.paired_roots:
            return "captions" if all(p[2] is not None for p in self._pairs) else "ram"
        return "captions" if self.cfg.data.captions else "ram"

    def build(self, unet, vae) -> None:
        from realisr.arch.seesr_arch import SeeSRControlNetModel
        from realisr.tagging import load_tagger
        from realisr.weights.seesr import IMAGE_ATTENTION_KEY, seesr_unet_from_sd

        cfg, s = self.cfg, self.cfg.seesr
        unet = seesr_unet_from_sd(unet)
        controlnet = SeeSRControlNetModel.from_unet(unet)
        unet.requires_grad_(False)
        for name, p in unet.named_parameters():
            if IMAGE_ATTENTION_KEY in name:
                p.requires_grad_(True)
        controlnet.requires_grad_(True)
        params = [p for p in controlnet.parameters()] + [p for p in unet.parameters() if p.requires_grad]
        self.params = params
        self._trainable_ids = {id(p) for p in params}
        unet.to(self.device)  # fp32 like the official script (frozen weights included)
        controlnet.to(self.device)
        self.vae = vae.requires_grad_(False).eval().to(self.device, self.weight_dtype)
        if cfg.model.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
            controlnet.enable_gradient_checkpointing()
        unet.train()
        controlnet.train()
        model = SeeSRDenoiser(unet, controlnet)
        opt = self.make_optimizer(params)
        self.model, opt = self.accelerator.prepare(model, opt)
        self.optimizers = {"seesr": opt}
        self.trainable = {"unet": unet, "controlnet": controlnet}
        self.unet, self.controlnet = unet, controlnet
        tag_kw = dict(ram=s.ram, root=s.tagger_root, device=self.device, dtype=self.weight_dtype)
        self.dape = load_tagger("dape", dape=s.dape, **tag_kw)
        self._ram_kw = tag_kw
        self.ram_tagger = None
        logger.info("SeeSR: %.1f M trainable parameters (ControlNet + UNet image attentions)",
                    sum(p.numel() for p in params) / 1e6)

    def check_init_checkpoint(self, path: str):
        """A SeeSR folder (``unet/``, ``controlnet/``) to start from, e.g. the released weights."""
        from realisr.weights.seesr import resolve_seesr_dir

        return resolve_seesr_dir(path)

    def load_init_checkpoint(self, folder: Path) -> None:
        from realisr.errors import CheckpointError
        from realisr.weights.seesr import read_model_weights

        for name, module in (("unet", self.unet), ("controlnet", self.controlnet)):
            state = read_model_weights(Path(folder) / name)
            missing, unexpected = module.load_state_dict(state, strict=False)
            if missing or unexpected:
                raise CheckpointError(f"{folder}/{name} does not fit the recipe's backbone "
                                      f"(e.g. {(missing or unexpected)[0]})")
        logger.info("initialised the UNet and ControlNet from %s", folder)

    def after_prepare(self) -> None:
        if self._tag_mode() == "ram":
            from realisr.tagging import load_tagger

            self.ram_tagger = load_tagger("ram", **self._ram_kw)

    def train_modules(self) -> list:
        return [self.model]

    # ------------------------------------------------------------------------------------------------- data
    def _build_data(self) -> None:
        from realisr.train.data import (HQCropDataset, LQMaker, PairedSRDataset, list_sources, load_captions,
                                        paired_files)

        cfg, s = self.cfg, self.cfg.seesr
        self._pairs = paired_files(s.paired_roots) if s.paired_roots else []
        if self._pairs:
            self.dataset = PairedSRDataset(self._pairs)
            self.lq_maker = None
        else:
            files = list_sources(cfg.data.hq)
            self.dataset = HQCropDataset(files, cfg.data.crop_size, cfg.data.hflip, load_captions(cfg.data.captions))
            self.lq_maker = LQMaker(cfg.data.degradation, cfg.data.scale, self.device, resize_back=False)
        self.dataloader = self.make_dataloader(self.dataset, "add images or pairs")
        self._val = None
        if cfg.validation.every > 0 and cfg.validation.num > 0 and self.accelerator.is_main_process:
            if self._pairs:
                items = [self.dataset[i] for i in range(min(cfg.validation.num, len(self.dataset)))]
                lq = torch.stack([it["lq"] for it in items])
            else:
                vfiles = list_sources([cfg.validation.images]) if cfg.validation.images else self.dataset.files
                vds = HQCropDataset(list(dict.fromkeys(vfiles))[: cfg.validation.num], cfg.data.crop_size,
                                    hflip=False, captions=self.dataset.captions, random=False)
                items = [vds[i] for i in range(len(vds))]
                vg = torch.Generator(self.device).manual_seed(cfg.validation.seed)
                lq = self.make_lq(torch.stack([it["hq"] for it in items]), vg).cpu()
            self._val = {"hq": torch.stack([it["hq"] for it in items]), "lq": lq,
                         "captions": [it["caption"] for it in items]}

    def make_lq(self, hq: torch.Tensor, generator=None) -> torch.Tensor:
        """HQ ``[N, 3, H, W]`` in [0, 1] -> the official ``sr_bicubic``: degraded LQ, bicubic back to the HQ size,
        8-bit quantised."""
        small = self.lq_maker(hq, generator=generator)
        up = F.interpolate(small, size=hq.shape[-2:], mode="bicubic", align_corners=False)
        return (up.clamp(0, 1) * 255.0).round() / 255.0

    @torch.no_grad()
    def soft_prompt(self, lq01: torch.Tensor) -> torch.Tensor:
        """DAPE's image embeddings ``[N, 145, 512]`` of LQ images in [0, 1] (official training preprocessing)."""
        x = dape_training_input(lq01.to(self.device), self.dape.image_size)
        return self.dape.model(x.to(self.dape.dtype))["image_embeds"].float()

    @torch.no_grad()
    def prompts_for(self, batch: dict, hq: torch.Tensor, gcpu: torch.Generator) -> list[str]:
        """Each image's text: its tags (or caption), replaced by "" with probability ``null_text_ratio``."""
        mode = self._tag_mode()
        n = hq.shape[0]
        if mode == "ram":
            tags = self.ram_tagger(hq).text
        elif mode == "captions":
            tags = list(batch["caption"])
        else:
            tags = [""] * n
        drop = torch.rand(n, generator=gcpu) < self.cfg.data.null_text_ratio
        return ["" if d else t for t, d in zip(tags, drop.tolist())]

    # ------------------------------------------------------------------------------------------------- step
    def training_step(self, batch: dict, step: int) -> dict[str, float]:
        acc = self.accelerator
        gdev, gcpu = self.step_generators(step)
        hq = batch["hq"].to(self.device, torch.float32)
        lq = batch["lq"].to(self.device, torch.float32) if "lq" in batch else self.make_lq(hq, gdev)
        text = self.encode_prompts(self.prompts_for(batch, hq, gcpu))
        soft = self.soft_prompt(lq)
        with torch.no_grad():
            dist = self.vae.encode((hq * 2 - 1).to(self.vae.dtype)).latent_dist
            z0 = (dist.sample(generator=gdev) if self.cfg.model.latent_sample else dist.mode()).float()
            z0 = z0 * self.vae_scale
        loss = seesr_eps_loss(self.model, z0, text, lq, soft, self.alphas_cumprod, generator=gdev)
        acc.backward(loss)
        logs = {"loss": loss.item()}
        norm = self.clip_and_step(self.optimizers["seesr"], self.params)
        if norm is not None:
            logs["grad_norm"] = norm
        return logs

    # ------------------------------------------------------------------------------------------- checkpoint
    def write_official(self, folder: Path) -> None:
        """``<folder>/seesr/{unet,controlnet}`` in the official layout."""
        from realisr.weights.seesr import save_seesr_folder

        save_seesr_folder(self.unet, self.controlnet, folder / "seesr")

    @torch.no_grad()
    def generate(self, lq: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """SR of LQ images (at the HQ size, [0, 1]) with the current weights: LR-embedded start at t=999,
        ``seesr.validation_steps`` trailing DDPM steps, CFG ``seesr.validation_guidance``."""
        from realisr.pipelines.seesr.pipeline_seesr import START_T, denoise, seesr_timesteps

        s = self.cfg.seesr
        model = self.accelerator.unwrap_model(self.model)
        was_training = model.training
        model.eval()
        try:
            lq = lq.to(self.device, torch.float32)
            n = lq.shape[0]
            soft = self.soft_prompt(lq)
            text = self.encode_prompts(list(prompts))
            guidance = s.validation_guidance > 1.0
            if guidance:
                text = torch.cat([self.encode_prompts([s.negative_prompt] * n), text])
                soft = torch.cat([soft, soft])
            g = torch.Generator(self.device).manual_seed(self.cfg.validation.seed)
            z_lr = self.vae.encode((lq * 2 - 1).to(self.vae.dtype)).latent_dist.mode().float() * self.vae_scale
            a = self.alphas_cumprod[START_T]
            z = a.sqrt() * z_lr + (1 - a).sqrt() * torch.randn(z_lr.shape, generator=g, device=self.device)
            with self.accelerator.autocast():
                z = denoise(model.unet, model.controlnet, self.alphas_cumprod, z,
                            seesr_timesteps(self.noise_scheduler, s.validation_steps),
                            noise_fn=lambda i: torch.randn(z.shape, generator=g, device=self.device),
                            prompt_embeds=text, image_embeds=soft, cond=lq, guidance_scale=s.validation_guidance)
            x = self.vae.decode((z / self.vae_scale).to(self.vae.dtype)).sample.float()
        finally:
            model.train(was_training)
        return (x * 0.5 + 0.5).clamp(0, 1)

    def official_checkpoint(self) -> dict:  # pragma: no cover - SeeSR writes folders, see write_official
        raise NotImplementedError("SeeSR checkpoints are diffusers folders (write_official)")
