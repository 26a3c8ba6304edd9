"""Recipes of realisr's feed-forward SR trainers: EA-Adam (``method: ea-adam``) and the Real-ESRGAN
fidelity delta (``method: realesrgan-fidelity``).

Same YAML / ``--set`` machinery as the diffusion recipes (:func:`realisr.train.config.load_recipe` picks the
dataclass from ``method``); see docs/ea-adam.md and docs/fidelity-dial.md for every key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from realisr.train.config import RecipeError

__all__ = ["SR_METHODS", "SRDataConfig", "SRTrainConfig", "EAAdamConfig", "FusionConfig", "MergeConfig",
           "EAAdamLossConfig", "EAAdamRecipe", "FidelityConfig", "FidelityRecipe"]


@dataclass
class SRDataConfig:
    """Training patches: HQ crops, LQ made on the fly.

    Attributes:
        hq: HQ sources (folders or txt lists, entries may be ``{path: ..., repeat: N}``), listed sorted.
        crop_size: HQ patch side (official 128; LQ side = crop_size / scale).
        scale: SR factor.
        degradation: ``bicubic`` (antialiased bicubic, the official bicubic-LR setting) or a Real-ESRGAN
            preset of :mod:`realisr.train.degradations` (``osediff``, ``pisa-sr``, ...).
        augment: random h/v flips and transposition (official ``data_augment``).
        repeat: passes over the image list per epoch (official ``data_repeat`` 8).
        batch_size: patches per step (official 16).
        num_workers: DataLoader workers.
    """

    hq: list = field(default_factory=list)
    crop_size: int = 128
    scale: int = 4
    degradation: str = "bicubic"
    augment: bool = True
    repeat: int = 8
    batch_size: int = 16
    num_workers: int = 4


@dataclass
class SRTrainConfig:
    """Bookkeeping.

    Attributes:
        checkpoint_every: also write a resume checkpoint every N iterations inside an epoch (0: at epoch ends
            only).
        keep_checkpoints: resume checkpoints kept (older ones are deleted; official-format model files stay).
        log_every: log every N iterations.
        resume: ``null``, ``latest`` or a checkpoint folder.
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
    """

    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    log_every: int = 100
    resume: Optional[str] = None
    device: str = "auto"


@dataclass
class EAAdamConfig:
    """The population stage (spec: docs/ea-adam.md).

    Attributes:
        backbone: ``srresnet`` (MSRResNet) or ``rrdb`` (ESRGAN RRDBNet).
        pretrained: the L1-pretrained backbone every individual starts from (BasicSR ``net_g_*.pth``,
            ``ESRGAN_PSNR_SRx4_DF2K_official-150ff491.pth``, an EA-Adam file, any spandrel-readable file);
            ``null`` starts from a random initialisation (tests, plumbing).
        backbone_kwargs: ``num_feat`` / ``num_block`` when ``pretrained`` is null.
        popsize: N individuals (official 5).
        neighbour_size: MOEA/D neighbourhood half-width (official 1).
        freeze_first: individual 0 keeps the pretrained weights (no Adam step, never replaced).
        epochs: total epochs, Adam and EA (official 250).
        adam_epochs: Adam epochs per cycle (official 10; the first cycle has one less, see ``epoch_kind``).
        iters_per_epoch: Adam iterations per epoch (``null``: images x repeat / batch, as official).
        lr: Adam learning rate of generators and discriminators (SRResNet 1e-5, RRDB 1e-4).
        milestones, gamma: MultiStepLR on the epoch (official [250], 0.5).
        ea_iters: EA iterations per EA epoch (official 200).
        ea_images: images of the EA evaluation set (the first N of the sorted training list; official 16).
        ea_max_patches, ea_patch_range: an image gives its non-overlapping ``crop_size`` patches; above
            ``ea_max_patches`` only ``[lo, hi)`` of them are used (official 100 and [25, 75)).
        p_crossover, p_mutation: per-child probabilities (official 0.9, 0.2).
        p_global_mate: probability that the second parent comes from the whole population instead of the
            neighbourhood (official 0.3).
        sbx_eta: SBX distribution index (official 20).
        mutation_rate, mutation_sigma: per-element probability and noise std of the mutation (0.02, 0.03).
        keep_child_bias: keep the child's biases through mutation (fix); ``false`` reproduces the official
            bias reverting.
        reset_moments: Adam moments after an EA epoch: ``all`` (official: every generator optimiser is
            re-created), ``replaced`` (only individuals EA replaced start afresh), ``none``.
        discriminator_feat: VGG-style discriminator features (official 64).
    """

    backbone: str = "srresnet"
    pretrained: Optional[str] = None
    backbone_kwargs: dict = field(default_factory=dict)
    popsize: int = 5
    neighbour_size: int = 1
    freeze_first: bool = True
    epochs: int = 250
    adam_epochs: int = 10
    iters_per_epoch: Optional[int] = None
    lr: float = 1e-5
    milestones: list = field(default_factory=lambda: [250])
    gamma: float = 0.5
    ea_iters: int = 200
    ea_images: int = 16
    ea_max_patches: int = 100
    ea_patch_range: list = field(default_factory=lambda: [25, 75])
    p_crossover: float = 0.9
    p_mutation: float = 0.2
    p_global_mate: float = 0.3
    sbx_eta: float = 20.0
    mutation_rate: float = 0.02
    mutation_sigma: float = 0.03
    keep_child_bias: bool = True
    reset_moments: str = "replaced"
    discriminator_feat: int = 64


@dataclass
class EAAdamLossConfig:
    """Loss weights.

    Attributes:
        perceptual_layers: VGG19 layer -> weight (SRResNet {conv5_4: 1}; RRDB 5 layers).
        perceptual: weight of the perceptual loss in f_per (1.0).
        gan: weight of the generator GAN loss in the Adam steps' f_per (0.005; never in the EA evaluation).
        vgg_weights: torchvision ``vgg19-dcbb9e9d.pth``; ``null`` searches the caches.
        vgg_random_width: build a RANDOM VGG of this width instead (plumbing only: the perceptual objective is
            then meaningless; the tiny CPU recipe).
    """

    perceptual_layers: dict = field(default_factory=lambda: {"conv5_4": 1.0})
    perceptual: float = 1.0
    gan: float = 0.005
    vgg_weights: Optional[str] = None
    vgg_random_width: Optional[float] = None


@dataclass
class FusionConfig:
    """The fusion network (dynamic convolutions over the population) and its training.

    Attributes:
        epochs: 0 skips the fusion stage (official 300).
        iters_per_epoch: ``null``: images x repeat / batch.
        lr, milestones, gamma: Adam on the fusion modules (SRResNet 1e-4, RRDB 5e-5; [100, 200, 300], 0.5).
        l1, perceptual, gan: loss weights (SRResNet 0.01 / 1 / 0.005; RRDB 0.1 / 1 / 0.005).
        num_feat, num_params, hidden: fusion module sizes (64, 100, 15).
        discriminator_from: individual whose discriminator initialises the fusion stage's (official: a
            user-chosen ``disc.pt``; default the last, pure-perception one).
    """

    epochs: int = 300
    iters_per_epoch: Optional[int] = None
    lr: float = 1e-4
    milestones: list = field(default_factory=lambda: [100, 200, 300])
    gamma: float = 0.5
    l1: float = 0.01
    perceptual: float = 1.0
    gan: float = 0.005
    num_feat: int = 64
    num_params: int = 100
    hidden: int = 15
    discriminator_from: int = -1


@dataclass
class MergeConfig:
    """The final merge into one plain backbone.

    Attributes:
        images: folder / txt list of LR-side images whose fusion weights are averaged (official: 100 DIV2K-train
            LR images); ``null``: the sorted training images, degraded like the training LQ.
        num: M images (official 100).
        center_half: use the central half-crop of each LR (official).
    """

    images: Optional[str] = None
    num: int = 100
    center_half: bool = True


@dataclass
class EAAdamRecipe:
    method: str = "ea-adam"
    output_dir: str = "runs/ea-adam"
    seed: int = 0
    data: SRDataConfig = field(default_factory=SRDataConfig)
    train: SRTrainConfig = field(default_factory=SRTrainConfig)
    ea_adam: EAAdamConfig = field(default_factory=EAAdamConfig)
    loss: EAAdamLossConfig = field(default_factory=EAAdamLossConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)

    def validate(self) -> "EAAdamRecipe":
        e, d = self.ea_adam, self.data

        def need(ok, msg):
            if not ok:
                raise RecipeError(f"recipe: {msg}")

        need(e.backbone in ("srresnet", "rrdb"), f"ea_adam.backbone must be srresnet or rrdb, got {e.backbone!r}")
        need(e.popsize >= 2 * e.neighbour_size + 1 and e.neighbour_size >= 1,
             "ea_adam.popsize must be at least 2 * neighbour_size + 1 (and neighbour_size >= 1)")
        need(e.epochs >= 0 and e.adam_epochs >= 1, "ea_adam.epochs must be >= 0 and adam_epochs >= 1")
        need(e.reset_moments in ("all", "replaced", "none"), "ea_adam.reset_moments must be all, replaced or none")
        need(len(e.ea_patch_range) == 2 and 0 <= e.ea_patch_range[0] < e.ea_patch_range[1],
             "ea_adam.ea_patch_range must be [lo, hi) with 0 <= lo < hi")
        for k in ("p_crossover", "p_mutation", "p_global_mate", "mutation_rate"):
            need(0.0 <= getattr(e, k) <= 1.0, f"ea_adam.{k} must be in [0, 1]")
        need(d.crop_size % d.scale == 0 and d.crop_size % 32 == 0,
             "data.crop_size must be a multiple of 32 (the discriminator) and of data.scale")
        need(d.batch_size >= 1 and d.repeat >= 1, "data.batch_size and data.repeat must be >= 1")
        need(self.merge.num >= 1, "merge.num must be >= 1")
        need(self.loss.perceptual_layers, "loss.perceptual_layers must name at least one VGG19 layer")
        return self


@dataclass
class FidelityConfig:
    """The fidelity delta of a registered GAN model (docs/fidelity-dial.md).

    Attributes:
        model: registry id of the base model (``realesrgan-x4plus``).
        train_blocks: trunk blocks (counted from the end) trained along with the tail (``conv_body`` and the
            upsampling / HR convolutions).
        num_patches: training patches, cut from the HQ photos and degraded once (the trunk features before the
            trained blocks are computed once and cached; training reads the cache).
        steps: optimiser steps on the cached patches.
        batch_size: patches per step.
        lr: Adam learning rate (cosine decay to ``lr_min``).
        lr_min: final learning rate.
        l1: L1 weight (the fidelity objective).
        objective: ``l1`` (plain L1 to the HQ) or ``lowpass-l1`` (L1 to the HQ on the low band, a Gaussian
            blur of std ``sigma`` HQ pixels, plus ``texture`` x L1 to the base model's output on the rest: the
            fidelity of structure and colour, the base model's texture; see docs/fidelity-dial.md).
        sigma: std of the low-pass Gaussian (``lowpass-l1``).
        texture: weight of the high-band term (``lowpass-l1``).
        delta_dtype: ``float16`` or ``float32`` storage of the delta.
        out: where to write the delta (``null``: ``<output_dir>/<model>-fidelity.safetensors``).
    """

    model: str = "realesrgan-x4plus"
    train_blocks: int = 2
    num_patches: int = 256
    steps: int = 800
    batch_size: int = 4
    lr: float = 2e-4
    lr_min: float = 1e-5
    l1: float = 1.0
    objective: str = "lowpass-l1"
    sigma: float = 1.5
    texture: float = 1.0
    delta_dtype: str = "float16"
    out: Optional[str] = None


@dataclass
class FidelityRecipe:
    method: str = "realesrgan-fidelity"
    output_dir: str = "runs/realesrgan-fidelity"
    seed: int = 0
    data: SRDataConfig = field(default_factory=lambda: SRDataConfig(degradation="pisa-sr", repeat=1, batch_size=4))
    train: SRTrainConfig = field(default_factory=lambda: SRTrainConfig(checkpoint_every=100, log_every=10))
    fidelity: FidelityConfig = field(default_factory=FidelityConfig)

    def validate(self) -> "FidelityRecipe":
        f, d = self.fidelity, self.data
        if d.crop_size % d.scale:
            raise RecipeError("recipe: data.crop_size must be divisible by data.scale")
        if f.train_blocks < 0 or f.num_patches < 1 or f.steps < 1 or f.batch_size < 1:
            raise RecipeError("recipe: fidelity.train_blocks >= 0, num_patches, steps and batch_size >= 1")
        if f.objective not in ("l1", "lowpass-l1") or f.sigma <= 0 or f.texture < 0:
            raise RecipeError("recipe: fidelity.objective must be l1 or lowpass-l1 (sigma > 0, texture >= 0)")
        if f.delta_dtype not in ("float16", "float32"):
            raise RecipeError("recipe: fidelity.delta_dtype must be float16 or float32")
        return self


SR_METHODS = {"ea-adam": EAAdamRecipe, "realesrgan-fidelity": FidelityRecipe}
