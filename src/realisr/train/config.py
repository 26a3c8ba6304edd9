"""Training recipes: typed YAML files plus ``--set key=value`` overrides.

A recipe is a YAML mapping with the sections of :class:`RecipeConfig` (``model``, ``data``, ``train``,
``loss``, ``validation`` and one section per method). Every key has a declared type and a default, so a
typo or a wrong type in the YAML or in ``--set`` fails before anything heavy is loaded, with one line that
names the key. ``--set`` values are parsed as YAML scalars/lists (``--set train.max_steps=10``,
``--set data.hq=[a/,b.txt]``, ``--set loss.lpips=0``).

Built-in recipes (``pisa-sr``, ``osediff``, ``tiny-cpu``) live in ``realisr/train/recipes/*.yaml`` and can be
named instead of a path.
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

    def validate(self) -> "RecipeConfig":
        """Check values that types alone cannot (ranges, choices). Returns self; raises RecipeError."""
        def need(ok: bool, msg: str):
            if not ok:
                raise RecipeError(f"recipe: {msg}")

        need(self.method in ("pisa-sr", "osediff"), f"method must be 'pisa-sr' or 'osediff', got {self.method!r}")
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
        for k in ("l2", "lpips", "csd", "vsd", "vsd_lora"):
            need(getattr(self.loss, k) >= 0, f"loss.{k} must be >= 0")
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
