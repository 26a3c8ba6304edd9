"""DAPE training (SeeSR stage 1, ``basicsr/models/dape_model.py`` + ``options/dape.yaml``).

A student RAM with LoRA (rank 8, alpha 1: loralib ``MergedLinear`` q/v on the Swin ``qkv``, ``Linear`` on the
tagging head's ``query``/``key``) sees the degraded image; the frozen plain RAM (eval mode) sees the HQ image.
Only the LoRA parameters train, with the student in train mode (Swin stochastic depth 0.1, BERT dropout 0.1,
as officially). Loss, per step::

    l_fea    = MSE(image_embeds_student(LQ), image_embeds_RAM(HQ))                    (mean, weight 1)
    l_logits = mean(-(p * log sigmoid(s) + (1 - p) * log(1 - sigmoid(s)))),  p = sigmoid(logits_RAM(HQ)),
               s = logits_student(LQ)                                                  (weight 1)

Optimiser: AdamW lr 1e-4, betas (0.9, 0.999), weight decay 0; MultiStepLR [20k, 30k] x 0.5; BasicSR's
linear warm-up over the first 50 iterations; no gradient clipping. The checkpoint is the official
``DAPE.pth`` layout (every ``lora_`` tensor of the student), which :func:`realisr.tagging.load_tagger` and the
official code load.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from realisr.train.trainer_base import BaseTrainer, find_checkpoint

__all__ = ["DAPETrainer", "feature_loss", "soft_label_bce", "lr_factor"]

logger = logging.getLogger(__name__)


def feature_loss(student_embeds: torch.Tensor, teacher_embeds: torch.Tensor) -> torch.Tensor:
    """Mean squared error of the image embeddings (BasicSR ``MSELoss``, reduction mean)."""
    return F.mse_loss(student_embeds.float(), teacher_embeds.float())


def soft_label_bce(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of the student's probabilities to the teacher's probabilities (soft labels), mean
    over batch and classes. Same value as the official ``-(p log q + (1-p) log(1-q))`` with
    ``q = sigmoid(s)``, computed with ``logsigmoid`` so that saturated logits give no ``log(0)``."""
    p = torch.sigmoid(teacher_logits.float())
    s = student_logits.float()
    return -(p * F.logsigmoid(s) + (1 - p) * F.logsigmoid(-s)).mean()


def lr_factor(iteration: int, warmup: int, milestones, gamma: float) -> float:
    """The learning rate over the base one at BasicSR iteration ``iteration`` (1-based): MultiStepLR after
    ``iteration`` scheduler steps, replaced by the linear warm-up ``iteration / warmup`` while
    ``iteration < warmup``."""
    if iteration < warmup:
        return iteration / warmup
    return gamma ** sum(1 for m in milestones if m <= iteration)


class DAPETrainer(BaseTrainer):
    """DAPE trainer (see the module docstring)."""

    method = "dape"
    checkpoint_name = "DAPE"

    # ---------------------------------------------------------------------------------------------- setup
    def setup(self) -> None:
        """Find the RAM files, build teacher and student, the data and the optimiser; resume if asked."""
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        from realisr.tagging.loading import build_ram, find_tagger_files, load_ram_weights, read_configs, \
            read_ram_state_dict, read_tag_list
        from realisr.train.config import recipe_to_dict

        cfg, d = self.cfg, self.cfg.dape
        files = find_tagger_files("ram", ram=d.ram, tag_list=d.tag_list, config_dir=d.config_dir, root=d.ram_dir,
                                  need_thresholds=False)
        cpu = not torch.cuda.is_available()
        mp = cfg.train.mixed_precision
        if cpu and mp == "fp16":
            logger.warning("fp16 mixed precision needs a GPU: training in fp32 on the CPU")
            mp = "no"
        self.accelerator = Accelerator(mixed_precision=mp,
                                       gradient_accumulation_steps=cfg.train.gradient_accumulation_steps, cpu=cpu)
        self.device = self.accelerator.device
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mp, torch.float32)
        set_seed(cfg.seed)
        if self.accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            with open(self.output_dir / "recipe.json", "w", encoding="utf-8") as f:
                json.dump(recipe_to_dict(cfg), f, indent=1)

        swin, q2l = read_configs(files)
        num_classes = len(read_tag_list(files.tag_list))
        sd = read_ram_state_dict(files.ram)
        teacher = build_ram(swin, q2l, num_classes, lora_rank=0)
        load_ram_weights(teacher, sd, name=files.ram.name)
        q2l_student = dict(q2l)
        if d.dropout is not None:
            q2l_student.update(hidden_dropout_prob=d.dropout, attention_probs_dropout_prob=d.dropout)
        student = build_ram(swin, q2l_student, num_classes, lora_rank=d.lora_rank, lora_alpha=d.lora_alpha,
                            drop_path_rate=d.drop_path_rate)
        load_ram_weights(student, sd, name=files.ram.name)
        del sd
        self.teacher = teacher.eval().requires_grad_(False).to(self.device, self.weight_dtype)
        student.requires_grad_(False)
        self.lora_params = [p for n, p in student.named_parameters() if "lora_" in n]
        for p in self.lora_params:
            p.requires_grad_(True)
        self._trainable_ids = {id(p) for p in self.lora_params}
        self.cast_frozen(student, self.lora_params)
        student.train()
        logger.info("DAPE: %d LoRA tensors (%d parameters) on RAM %s", len(self.lora_params),
                    sum(p.numel() for p in self.lora_params), files.ram)
        opt = self.make_optimizer(self.lora_params)
        self.student, opt = self.accelerator.prepare(student, opt)
        self.optimizers = {"lora": opt}
        self.trainable = {"dape": student}
        self.ram_size = int(swin["image_res"])  # RAM's input side (384)
        set_seed(cfg.seed, device_specific=True)
        self._build_data()
        if cfg.train.resume:
            self.load_state(find_checkpoint(self.output_dir, cfg.train.resume))

    def _build_data(self) -> None:
        from realisr.train.dape_dataset import DAPEImageDataset, DAPEPairedDataset
        from realisr.train.data import LQMaker, list_sources

        cfg, d = self.cfg, self.cfg.dape
        if d.paired:
            self.dataset = DAPEPairedDataset(d.paired, d.image_size)
            self.lq_maker = None
        else:
            self.dataset = DAPEImageDataset(list_sources(cfg.data.hq), d.image_size)
            self.lq_maker = LQMaker(cfg.data.degradation, cfg.data.scale, self.device, resize_back=False)
        self.dataloader = self.make_dataloader(self.dataset)
        self._val = None
        if cfg.validation.num > 0 and self.accelerator.is_main_process:  # also for validate() called directly
            items = [self.dataset[i] for i in range(min(cfg.validation.num, len(self.dataset)))]
            batch = {k: torch.stack([it[k] for it in items]) for k in ("hq", "lq") if k in items[0]}
            vg = torch.Generator(self.device).manual_seed(cfg.validation.seed)
            hq, lq = self.make_pair(batch, vg)
            self._val = {"hq": hq, "lq": lq}

    # ------------------------------------------------------------------------------------------------ step
    def make_pair(self, batch: dict, generator: Optional[torch.Generator] = None):
        """(HQ, LQ) in [0, 1] at ``dape.image_size`` on the device: the pre-made pair, or the LQ degraded on the
        fly and resized back with bicubic (8-bit rounded, like the saved ``sr_bicubic`` PNGs)."""
        hq = batch["hq"].to(self.device, torch.float32)
        if "lq" in batch:
            return hq, batch["lq"].to(self.device, torch.float32)
        lq = self.lq_maker(hq, generator=generator)
        lq = F.interpolate(lq, size=hq.shape[-2:], mode="bicubic", align_corners=False)
        return hq, (lq.clamp(0, 1) * 255).round() / 255

    def _ram_input(self, x: torch.Tensor) -> torch.Tensor:
        from realisr.tagging import ram_preprocess

        return ram_preprocess(x, self.ram_size)

    def losses(self, hq: torch.Tensor, lq: torch.Tensor, student) -> dict:
        """``{"l_fea", "l_logits", "loss"}`` tensors for one batch (teacher under ``no_grad``)."""
        d = self.cfg.dape
        with torch.no_grad():
            t = self.teacher(self._ram_input(hq).to(self.weight_dtype))
        with self.accelerator.autocast():
            s = student(self._ram_input(lq))
        l_fea = feature_loss(s["image_embeds"], t["image_embeds"])
        l_logits = soft_label_bce(s["logits"], t["logits"])
        return {"l_fea": l_fea, "l_logits": l_logits, "loss": d.feature_weight * l_fea + d.logits_weight * l_logits}

    def before_step(self, step: int) -> None:
        d = self.cfg.dape
        f = lr_factor(step + 1, d.warmup_steps, d.lr_milestones, d.lr_gamma)
        for group in self.optimizers["lora"].param_groups:
            group["lr"] = self.cfg.train.lr * f

    def training_step(self, batch: dict, step: int) -> dict[str, float]:
        gdev, _ = self.step_generators(step)
        hq, lq = self.make_pair(batch, gdev)
        out = self.losses(hq, lq, self.student)
        self.accelerator.backward(out["loss"])
        norm = self.clip_and_step(self.optimizers["lora"], self.lora_params)
        logs = {k: v.item() for k, v in out.items()}
        logs["lr"] = self.optimizers["lora"].param_groups[0]["lr"]
        if norm is not None:
            logs["grad_norm"] = norm
        return logs

    def train_modules(self) -> list:
        return [self.student]

    # ----------------------------------------------------------------------------------------- checkpoints
    def official_checkpoint(self) -> dict:
        from realisr.tagging.loading import dape_state_dict

        return dape_state_dict(self.accelerator.unwrap_model(self.student))

    def write_official(self, folder: Path) -> None:
        """``DAPE.pth``: the official layout (a flat dict of the student's ``lora_`` tensors)."""
        torch.save(self.official_checkpoint(), folder / f"{self.checkpoint_name}.pth")

    # ---------------------------------------------------------------------------------------------- checks
    def validate(self) -> Optional[dict]:
        """Eval-mode losses on the fixed validation pairs, and how many of the teacher's HQ tags the student
        finds on the LQ (at 0.5), logged to ``metrics.jsonl``."""
        acc = self.accelerator
        acc.wait_for_everyone()
        result = None
        if acc.is_main_process and self._val is not None:
            student = acc.unwrap_model(self.student)
            student.eval()
            try:
                with torch.no_grad():
                    out = self.losses(self._val["hq"], self._val["lq"], student)
                    t = self.teacher(self._ram_input(self._val["hq"]).to(self.weight_dtype))["logits"].float()
                    s = student(self._ram_input(self._val["lq"]))["logits"].float()
            finally:
                student.train()
            tt, ss = t > 0, s > 0
            recall = float((tt & ss).sum() / tt.sum().clamp_min(1))
            result = {"step": self.step, **{f"val_{k}": float(v) for k, v in out.items()}, "val_tag_recall": recall}
            logger.info("validation step %d: %s", self.step, " ".join(f"{k}={v:.5g}" for k, v in result.items()
                                                                      if k != "step"))
            with open(self.output_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(result) + "\n")
        acc.wait_for_everyone()
        return result

    def generate(self, lq, prompts):  # pragma: no cover - DAPE makes no images
        raise NotImplementedError
