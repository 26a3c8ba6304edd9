"""Training recipes: typed YAML files plus ``--set key=value`` overrides.

A recipe is a YAML mapping with the sections of :class:`RecipeConfig` (``model``, ``data``, ``train``,
``loss``, ``validation`` and one section per method). Every key has a declared type and a default, so a
typo or a wrong type in the YAML or in ``--set`` fails before anything heavy is loaded, with one line that
names the key. ``--set`` values are parsed as YAML scalars/lists (``--set train.max_steps=10``,
``--set data.hq=[a/,b.txt]``, ``--set loss.lpips=0``).

Built-in recipes (``pisa-sr``, ``osediff``, ``tiny-cpu``, ``ccsr-controlnet``, ``ccsr``, ``ccsr-stage2``,
``ccsr-tiny-cpu``, ``dape``, ``dape-tiny-cpu``, ``seesr``, ``tiny-cpu-seesr``) live in
``realisr/train/recipes/*.yaml`` and can be named instead of a path.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from realisr.errors import RealisrError

__all__ = [
    "RecipeError",
    "RecipeConfig",
    "ModelConfig",
    "DataConfig",
    "TrainConfig",
    "LossConfig",
    "ValidationConfig",
    "PiSASRConfig",
    "OSEDiffConfig",
    "SeeSRConfig",
    "CCSRConfig",
    "DAPEConfig",
    "load_recipe",
    "builtin_recipes",
    "apply_overrides",
    "recipe_to_dict",
]

# Negative prompts of the official training scripts (PiSA-SR's repeats "oil painting"; kept verbatim).
PISA_NEGATIVE_PROMPT = (
    "painting, oil painting, illustration, drawing, art, sketch, oil painting, cartoon, CG Style, 3D render, "
    "unreal engine, blurring, dirty, messy, worst quality, low quality, frames, watermark, signature, "
    "jpeg artifacts, deformed, lowres, over-smooth"
)
OSEDIFF_NEGATIVE_PROMPT = (
    "painting, oil painting, illustration, drawing, art, sketch, cartoon, CG Style, 3D render, unreal engine, "
    "blurring, dirty, messy, worst quality, low quality, frames, watermark, signature, jpeg artifacts, "
    "deformed, lowres, over-smooth"
)


class RecipeError(RealisrError, ValueError):
    """A recipe file or a ``--set`` override is malformed (unknown key, wrong type, bad value)."""


@dataclass
class ModelConfig:
    """The diffusion backbone.

    Attributes:
        pretrained: a local diffusers folder or a hub id found in the local HF cache (SD-2.1-base).
        latent_sample: sample the VAE posterior like the official code (``False``: use its mean).
        gradient_checkpointing: trade compute for memory in the UNet and VAE.
        init_checkpoint: start from an official checkpoint of the method (``pisa_sr.pkl`` / ``osediff.pkl`` or
            their ``.safetensors``), e.g. to fine-tune the released weights; its ranks must match the recipe.
    """

    pretrained: str = "stabilityai/stable-diffusion-2-1-base"
    latent_sample: bool = True
    gradient_checkpointing: bool = True
    init_checkpoint: Optional[str] = None


@dataclass
class DataConfig:
    """Training data.

    Attributes:
        hq: HQ sources: folders or txt lists of image paths, each a string or ``{path: ..., repeat: N}``.
        captions: optional file with one ``name<TAB>caption`` per line (or a JSON mapping); missing = "".
        crop_size: random HQ crop size (official 512).
        scale: degradation scale factor (LQ side = crop_size / scale, resized back to crop_size).
        degradation: degradation preset name (``pisa-sr``, ``osediff``, ...).
        hflip: random horizontal flips.
        null_text_ratio: probability that a batch's prompt is replaced by "" (one coin flip per batch).
        batch_size: images per process and step.
        num_workers: DataLoader workers.
    """

    hq: list = field(default_factory=list)
    captions: Optional[str] = None
    crop_size: int = 512
    scale: int = 4
    degradation: str = "pisa-sr"
    hflip: bool = True
    null_text_ratio: float = 0.5
    batch_size: int = 4
    num_workers: int = 4


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping.

    Attributes:
        max_steps: total optimiser steps (PiSA-SR: pixel + semantic steps).
        lr, adam_betas, adam_eps, weight_decay: AdamW settings (constant learning rate, as official).
        max_grad_norm: gradient-norm clipping (0 disables).
        gradient_accumulation_steps: micro-batches per optimiser step.
        mixed_precision: ``no``, ``fp16`` or ``bf16`` (frozen weights are cast; trainable ones stay fp32).
        checkpoint_every: write a checkpoint (official .pkl + safetensors + resume state) every N steps.
        keep_checkpoints: how many step checkpoints to keep (0 = all).
        log_every: log losses every N steps.
        resume: ``null``, ``latest`` or a checkpoint folder.
    """

    max_steps: int = 12500
    lr: float = 5e-5
    adam_betas: list = field(default_factory=lambda: [0.9, 0.999])
    adam_eps: float = 1e-8
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "fp16"
    checkpoint_every: int = 500
    keep_checkpoints: int = 0
    log_every: int = 10
    resume: Optional[str] = None


@dataclass
class LossConfig:
    """Loss weights.

    Attributes:
        l2: pixel MSE weight.
        lpips: LPIPS(VGG) weight (0 = run without LPIPS; only ever explicit).
        lpips_vgg_weights: torchvision ``vgg16-397923af.pth``; ``null`` searches the user's caches.
        csd: PiSA-SR classifier-score-distillation weight (stage 2).
        vsd: OSEDiff variational-score-distillation weight.
        vsd_lora: OSEDiff fake-UNet diffusion-loss weight.
    """

    l2: float = 1.0
    lpips: float = 2.0
    lpips_vgg_weights: Optional[str] = None
    csd: float = 1.0
    vsd: float = 1.0
    vsd_lora: float = 1.0


@dataclass
class ValidationConfig:
    """Periodic validation images.

    Attributes:
        every: every N steps (0 disables); also at the end of training.
        images: folder or txt list of HQ images; ``null`` uses the first training images.
        num: number of images.
        seed: seed of the validation degradation (fixed so that steps are comparable).
    """

    every: int = 500
    images: Optional[str] = None
    num: int = 4
    seed: int = 0


@dataclass
class PiSASRConfig:
    """PiSA-SR specifics (two-stage dual LoRA).

    Attributes:
        pix_steps: steps of stage 1 (pixel LoRA, L2 only); the rest are stage 2 (semantic LoRA).
        lora_rank_pix, lora_rank_sem: LoRA ranks (official 4; alpha stays peft's default 8).
        cfg_scale: CFG scale of the frozen UNet in the CSD loss.
        timestep_range: [min, max) timesteps sampled for CSD (official [20, 500)).
        negative_prompt: the CFG negative prompt.
    """

    pix_steps: int = 4000
    lora_rank_pix: int = 4
    lora_rank_sem: int = 4
    cfg_scale: float = 7.5
    timestep_range: list = field(default_factory=lambda: [20, 500])
    negative_prompt: str = PISA_NEGATIVE_PROMPT


@dataclass
class OSEDiffConfig:
    """OSEDiff specifics (VSD).

    Attributes:
        lora_rank_unet, lora_rank_vae: LoRA ranks of the generator UNet and VAE encoder.
        fake_unet_adapters: ``all`` (every adapter of the fake UNet trains) or ``others`` (reproduces the
            official code, where only the mid-block adapter is active).
        cfg_scale: CFG scale of the frozen UNet in the VSD loss.
        timestep_range: [min, max) timesteps for VSD (official [20, 980)).
        negative_prompt: the CFG negative prompt.
    """

    lora_rank_unet: int = 4
    lora_rank_vae: int = 4
    fake_unet_adapters: str = "all"
    cfg_scale: float = 7.5
    timestep_range: list = field(default_factory=lambda: [20, 980])
    negative_prompt: str = OSEDIFF_NEGATIVE_PROMPT


@dataclass
class SeeSRConfig:
    """SeeSR specifics (stage 2: the ControlNet and the UNet's image attentions; the DAPE tagger is stage 1).

    Attributes:
        paired_roots: folders in the official layout (``gt/``, ``sr_bicubic/`` and optionally ``tag/*.txt``),
            paired by file name (sorted; the official dataset zips three unsorted globs). Empty: HQ crops from
            ``data.hq`` degraded on the fly (``data.degradation``, then bicubic x ``data.scale``).
        tags: the text prompt of a training image: ``ram`` (plain RAM on the HQ image, official), ``captions``
            (``data.captions`` / the ``tag/`` files), ``none`` (always ""), ``auto`` (captions when given, else
            ram). ``data.null_text_ratio`` then replaces each image's prompt by "" (per image, as official).
        tagger_root: a folder searched first for the RAM / DAPE files (see :mod:`realisr.tagging.loading`).
        ram, dape: explicit paths of ``ram_swin_large_14m.pth`` and ``DAPE.pth``.
        validation_steps, validation_guidance: sampling of the validation images (trailing DDPM steps, CFG).
        negative_prompt: the CFG negative prompt of the validation images.
    """

    paired_roots: list = field(default_factory=list)
    tags: str = "auto"
    tagger_root: Optional[str] = None
    ram: Optional[str] = None
    dape: Optional[str] = None
    validation_steps: int = 20
    validation_guidance: float = 5.5
    negative_prompt: str = "dotted, noise, blur, lowres, smooth"


@dataclass
class CCSRConfig:
    """CCSR-v2 specifics (one stage per run; docs/training.md).

    Attributes:
        stage: ``controlnet`` (pre-training: eps-MSE, t ~ U[0, 1000)), ``stage1`` (the three latent losses on
            the truncated schedule; only the ControlNet trains) or ``stage2`` (VAE decoder + discriminator).
        t_max: the re-noise point of stage 1 (``t_tau = round(1000 t_max)``, 667) and of the stage-2 sampler.
        t_min: the truncation point of the stage-2 sampler (with ``inference_steps > 1``).
        inference_steps: N of the stage-2 / validation sampler (1: the one-step ``x0_T``).
        is_start_lr: stage 1 starts ``x_T`` from the LR latent instead of the GT latent (official: false).
        begin_disc: stage-2 step from which LPIPS and the GAN losses are on (official 100).
        disc_weight: weight of the generator's adversarial loss (official 0.05).
        disc_train_weight: weight of the hinge discriminator loss (official 0.5).
        disc_lr, disc_betas: the discriminator's AdamW (official 5e-6, (0.9, 0.999)).
        discriminator: ``dino`` (the official frozen DINO ViT-S/16 features + DINOv2 ViT-S/14 condition; needs
            their files) or ``tiny`` (small random ViTs: plumbing checks on a CPU, not for real training).
        dino_weights, dinov2_weights: the official files (default: ``<checkpoints>/dino/<name>``).
        disc_size, cond_size: input sizes of the two ViTs (224 / 518; the tiny ones use 32).
        hooks: blocks whose outputs the heads judge (with the patch embedding).
        cmap_dim: projection size of the conditional heads.
    """

    stage: str = "stage1"
    t_max: float = 0.6667
    t_min: float = 0.0
    inference_steps: int = 1
    is_start_lr: bool = False
    begin_disc: int = 100
    disc_weight: float = 0.05
    disc_train_weight: float = 0.5
    disc_lr: float = 5e-6
    disc_betas: list = field(default_factory=lambda: [0.9, 0.999])
    discriminator: str = "dino"
    dino_weights: Optional[str] = None
    dinov2_weights: Optional[str] = None
    disc_size: int = 224
    cond_size: int = 518
    hooks: list = field(default_factory=lambda: [2, 5, 8, 11])
    cmap_dim: int = 64


@dataclass
class DAPEConfig:
    """DAPE (SeeSR stage 1: RAM + LoRA trained to see through degradations) specifics.

    Attributes:
        ram, tag_list: ``ram_swin_large_14m.pth`` and ``ram_tag_list.txt`` (``null``: searched like the tagger:
            ``ram_dir``, ``$REALISR_WEIGHTS/ram/``, ``$REALISR_WEIGHTS/``).
        ram_dir: a folder holding the RAM files (SeeSR's ``ram/`` layout; ``configs/`` inside it is used).
        config_dir: folder with ``q2l_config.json`` and ``swin/config_swinL_384.json`` (``null``: next to the
            files, else the official configs shipped with realisr).
        paired: official pre-made pairs: roots holding ``gt/`` and ``sr_bicubic/`` (paired by file name);
            empty: pairs are made on the fly from ``data.hq`` with ``data.degradation``.
        image_size: both images are resized to this square first (official 512), then to RAM's 384.
        lora_rank, lora_alpha: loralib LoRA (official 8 and 1).
        feature_weight, logits_weight: weights of the embedding MSE and the soft-label BCE (official 1, 1).
        lr_milestones, lr_gamma: MultiStepLR (official [20000, 30000], 0.5).
        warmup_steps: linear learning-rate warm-up (BasicSR ``warmup_iter``, official 50).
        drop_path_rate: the student's Swin stochastic depth (official 0.1).
        dropout: the student's tagging-head dropout (``null``: the q2l config's, 0.1 officially).
    """

    ram: Optional[str] = None
    tag_list: Optional[str] = None
    ram_dir: Optional[str] = None
    config_dir: Optional[str] = None
    paired: list = field(default_factory=list)
    image_size: int = 512
    lora_rank: int = 8
    lora_alpha: float = 1.0
    feature_weight: float = 1.0
    logits_weight: float = 1.0
    lr_milestones: list = field(default_factory=lambda: [20000, 30000])
    lr_gamma: float = 0.5
    warmup_steps: int = 50
    drop_path_rate: float = 0.1
    dropout: Optional[float] = None


@dataclass
class RecipeConfig:
    """A whole training recipe."""

    method: str = "pisa-sr"
    output_dir: str = "runs/train"
    seed: int = 123
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    pisa_sr: PiSASRConfig = field(default_factory=PiSASRConfig)
    osediff: OSEDiffConfig = field(default_factory=OSEDiffConfig)
    seesr: SeeSRConfig = field(default_factory=SeeSRConfig)
    ccsr: CCSRConfig = field(default_factory=CCSRConfig)
    dape: DAPEConfig = field(default_factory=DAPEConfig)

    def validate(self) -> "RecipeConfig":
        """Check values that types alone cannot (ranges, choices). Returns self; raises RecipeError."""
        def need(ok: bool, msg: str):
            if not ok:
                raise RecipeError(f"recipe: {msg}")

        need(self.method in ("pisa-sr", "osediff", "ccsr", "dape", "seesr"),
             f"method must be 'pisa-sr', 'osediff', 'ccsr', 'dape' or 'seesr', got {self.method!r}")
        need(self.ccsr.stage in ("controlnet", "stage1", "stage2"),
             f"ccsr.stage must be controlnet, stage1 or stage2, got {self.ccsr.stage!r}")
        need(0.0 <= self.ccsr.t_min < self.ccsr.t_max <= 1.0, "ccsr: need 0 <= t_min < t_max <= 1")
        need(self.ccsr.inference_steps >= 1, "ccsr.inference_steps must be >= 1")
        need(self.ccsr.discriminator in ("dino", "tiny"), "ccsr.discriminator must be 'dino' or 'tiny'")
        need(len(self.ccsr.disc_betas) == 2, "ccsr.disc_betas must be a list of two numbers")
        need(self.train.mixed_precision in ("no", "fp16", "bf16"),
             f"train.mixed_precision must be no, fp16 or bf16, got {self.train.mixed_precision!r}")
        need(self.train.max_steps > 0, "train.max_steps must be > 0")
        need(self.train.gradient_accumulation_steps >= 1, "train.gradient_accumulation_steps must be >= 1")
        need(len(self.train.adam_betas) == 2, "train.adam_betas must be a list of two numbers")
        need(self.data.crop_size > 0 and self.data.crop_size % 8 == 0, "data.crop_size must be a multiple of 8")
        need(self.data.crop_size % self.data.scale == 0, "data.crop_size must be divisible by data.scale")
        need(0.0 <= self.data.null_text_ratio <= 1.0, "data.null_text_ratio must be in [0, 1]")
        need(self.data.batch_size >= 1, "data.batch_size must be >= 1")
        for name, rng in (("pisa_sr", self.pisa_sr.timestep_range), ("osediff", self.osediff.timestep_range)):
            need(len(rng) == 2 and 0 <= rng[0] < rng[1] <= 1000,
                 f"{name}.timestep_range must be [min, max) with 0 <= min < max <= 1000")
        need(self.osediff.fake_unet_adapters in ("all", "others"),
             "osediff.fake_unet_adapters must be 'all' or 'others'")
        need(0 <= self.pisa_sr.pix_steps, "pisa_sr.pix_steps must be >= 0")
        need(self.seesr.tags in ("auto", "ram", "captions", "none"),
             "seesr.tags must be auto, ram, captions or none")
        need(self.seesr.validation_steps >= 1, "seesr.validation_steps must be >= 1")
        for k in ("l2", "lpips", "csd", "vsd", "vsd_lora"):
            need(getattr(self.loss, k) >= 0, f"loss.{k} must be >= 0")
        need(self.dape.image_size >= 8 and self.dape.lora_rank >= 1 and self.dape.warmup_steps >= 0,
             "dape.image_size must be >= 8, dape.lora_rank >= 1 and dape.warmup_steps >= 0")
        need(self.dape.feature_weight >= 0 and self.dape.logits_weight >= 0, "dape loss weights must be >= 0")
        return self


# ---------------------------------------------------------------------------------------------------------
# typed construction


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


@dataclass(frozen=True)
class _Override:
    """A ``--set`` value: its YAML reading, and the raw text for string keys (``--set output_dir=2024-01-01``
    must stay a string, not become a date)."""

    raw: str
    parsed: Any


def _accepts_str(tp) -> bool:
    return tp is str or tp is Any or (typing.get_origin(tp) is Union and str in typing.get_args(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted for floats. Raises RecipeError."""
    if isinstance(value, _Override):
        try:
            return _coerce(value.parsed, tp, key)
        except RecipeError:
            if _accepts_str(tp):
                return value.raw
            raise
    origin = typing.get_origin(tp)
    if origin is Union:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except RecipeError:
                pass
        raise RecipeError(f"recipe: {key} must be {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is list or origin is list:
        if isinstance(value, (list, tuple)):
            return list(value)
    elif tp is dict or origin is dict:
        if isinstance(value, dict):
            return value
    elif dataclasses.is_dataclass(tp):
        if isinstance(value, dict):
            return _build(tp, value, key)
        raise RecipeError(f"recipe: {key} must be a mapping (a section), got {value!r}")
    raise RecipeError(f"recipe: {key} must be {_type_name(tp)}, got {value!r}")


def _build(cls, data: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        where = f"section '{prefix}'" if prefix else "the top level"
        raise RecipeError(f"recipe: unknown key '{(prefix + '.') if prefix else ''}{unknown[0]}' in {where}; "
                          f"known keys: {', '.join(sorted(known))}")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    return cls(**kwargs)


def recipe_to_dict(cfg: RecipeConfig) -> dict:
    """The recipe as plain data (for saving next to checkpoints)."""
    return dataclasses.asdict(cfg)


def _parse_override(item: str) -> tuple[list[str], Any]:
    import yaml

    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise RecipeError(f"--set expects key=value (e.g. train.max_steps=10), got {item!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), _Override(raw, value)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``key.sub=value`` overrides to a raw recipe mapping (types are checked when it is built)."""
    for item in overrides or []:
        path, value = _parse_override(item)
        node = data
        for i, part in enumerate(path[:-1]):
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise RecipeError(f"--set {item}: '{'.'.join(path[:i + 1])}' is not a section")
            node = nxt
        node[path[-1]] = value
    return data


def builtin_recipes() -> dict[str, Path]:
    """Names and paths of the recipes shipped with realisr."""
    folder = Path(__file__).with_name("recipes")
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))}


def load_recipe(source: Union[str, Path, dict], overrides: Optional[list[str]] = None):
    """Load a recipe from a YAML file, a built-in recipe name or a mapping, then apply ``--set`` overrides.

    Args:
        source: path of a YAML file, the name of a built-in recipe (``pisa-sr``, ``osediff``, ``tiny-cpu``), or
            an already parsed mapping.
        overrides: ``key.sub=value`` strings; values are parsed as YAML.

    Returns:
        The validated :class:`RecipeConfig` (or, for ``method: ea-adam`` / ``realesrgan-fidelity``, the recipe
        class of :mod:`realisr.train.config_sr`).

    Raises:
        RecipeError: the file is missing or not a mapping, a key is unknown, a value has the wrong type or range.
    """
    import yaml

    if isinstance(source, dict):
        data = dict(source)
    else:
        path = Path(source)
        if not path.is_file():
            builtin = builtin_recipes()
            if str(source) in builtin:
                path = builtin[str(source)]
            else:
                raise RecipeError(f"recipe {str(source)!r} not found: give a YAML file or one of "
                                  f"{', '.join(builtin)}")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise RecipeError(f"recipe {path}: invalid YAML ({str(e).splitlines()[0]})") from e
        if not isinstance(data, dict):
            raise RecipeError(f"recipe {path}: expected a mapping at the top level")
    data = apply_overrides(_deepcopy(data), overrides or [])
    from realisr.train.config_sr import SR_METHODS  # feed-forward SR recipes (EA-Adam, fidelity delta)

    if data.get("method") in SR_METHODS:
        return _build(SR_METHODS[data["method"]], data).validate()
    return _build(RecipeConfig, data).validate()


def _deepcopy(d):
    import copy

    return copy.deepcopy(d)
