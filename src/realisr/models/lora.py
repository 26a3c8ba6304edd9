"""LoRA adapters of the one-step diffusion SR methods (PiSA-SR, OSEDiff), on top of peft.

This module holds the *official* module-selection rules and the adapter plumbing that both the inference
pipelines and the trainers use. Adapters are injected with :func:`peft.inject_adapter_in_model` (the same
mechanism as diffusers' ``add_adapter``, which the official code uses), so parameter names are exactly the
official checkpoint keys: ``<module path>.lora_A.<adapter>.weight`` / ``.lora_B.<adapter>.weight`` and, for a
wrapped module, ``<module path>.base_layer.{weight,bias}``.

Official rules (``docs/pisa-sr-osediff.md``, "LoRA modules and checkpoint files"):

* UNet (both methods): walk ``unet.named_parameters()``; skip names containing ``"bias"`` or ``"norm"``; at the
  first pattern of :data:`UNET_LORA_PATTERNS` that is a substring of the name, the module goes to
  ``encoder`` (name contains ``down_blocks`` or ``conv_in``), ``decoder`` (``up_blocks`` or ``conv_out``) or
  ``others``. SD-2.1-base gives 94 / 148 / 16 modules.
* OSEDiff VAE encoder: skip bias/norm; for *every* pattern of :data:`VAE_LORA_PATTERNS` (no ``break``): keep the
  name if the pattern is in it and it contains ``"encoder"``, else keep it if it is ``quant_conv`` (not
  ``post_quant_conv``). The list therefore has duplicates (65 entries / 32 modules on SD-2.1-base); peft does
  not mind, and the official checkpoints store the list as is.
* Rank 4, ``init_lora_weights="gaussian"``, and peft's default ``lora_alpha=8`` (not stored in the
  checkpoints): the scale is ``alpha / r = 2.0`` at ``r=4``, i.e. ``delta W = 2 * B @ A``.
* Adapter names: PiSA-SR ``default_{encoder,decoder,others}_{pix,sem}``; OSEDiff UNet
  ``default_{encoder,decoder,others}`` and VAE ``default_encoder``.

Typical use (training)::

    from realisr.models import lora
    modules = lora.inject_pisa_adapters(unet, rank_pix=4, rank_sem=4)        # six adapters, all active
    lora.set_active_adapters(unet, lora.PISA_PIX_ADAPTERS)                  # stage 1: pixel LoRA only
    lora.set_trainable_adapters(unet, lora.PISA_PIX_ADAPTERS)
    ...
    sd = lora.lora_state_dict(unet)                                          # official key names

and (inference) :func:`load_lora_state_dict`, :func:`merge_and_unload_adapters`, :func:`per_sample_adapters`.

Caveats worth knowing:

* peft's injection freezes every non-LoRA parameter of the model (``requires_grad=False``) and marks the LoRA
  parameters trainable. OSEDiff also trains the UNet's ``conv_in`` base weights: set that yourself
  (``unet.conv_in.base_layer.requires_grad_(True)``).
* A module adapted by several adapters sums all *active* ones. Activation is per model: always call
  :func:`set_active_adapters` after injecting (diffusers' ``add_adapter`` leaves only the newest one active,
  which silently disabled most of OSEDiff's regulariser LoRA).
"""

from __future__ import annotations

import contextlib
import logging
import re
from typing import TYPE_CHECKING, Iterable, Iterator, Mapping, Optional, Sequence

from ..errors import CheckpointError

if TYPE_CHECKING:  # pragma: no cover
    import torch

logger = logging.getLogger(__name__)

__all__ = [
    "UNET_LORA_PATTERNS",
    "VAE_LORA_PATTERNS",
    "DEFAULT_LORA_ALPHA",
    "GROUPS",
    "PISA_PIX_ADAPTERS",
    "PISA_SEM_ADAPTERS",
    "OSEDIFF_UNET_ADAPTERS",
    "OSEDIFF_VAE_ADAPTER",
    "unet_lora_target_modules",
    "vae_encoder_lora_target_modules",
    "make_lora_config",
    "add_lora_adapter",
    "inject_pisa_adapters",
    "inject_osediff_adapters",
    "set_active_adapters",
    "set_trainable_adapters",
    "lora_layers",
    "adapter_names",
    "lora_state_dict",
    "load_lora_state_dict",
    "parse_lora_key",
    "merge_and_unload_adapters",
    "per_sample_adapters",
]

#: UNet substrings, in the official order (``"conv"`` already catches every conv name).
UNET_LORA_PATTERNS: tuple[str, ...] = (
    "to_k", "to_q", "to_v", "to_out.0", "conv", "conv1", "conv2", "conv_in", "conv_shortcut", "conv_out",
    "proj_out", "proj_in", "ff.net.2", "ff.net.0.proj")
#: OSEDiff VAE-encoder substrings, in the official order.
VAE_LORA_PATTERNS: tuple[str, ...] = (
    "conv1", "conv2", "conv_in", "conv_shortcut", "conv", "conv_out", "to_k", "to_q", "to_v", "to_out.0")
#: peft's default ``lora_alpha`` at the time of the official code (peft 0.9): scale = 8 / r.
DEFAULT_LORA_ALPHA = 8
#: The three UNet groups of the official split, in order.
GROUPS: tuple[str, ...] = ("encoder", "decoder", "others")
PISA_PIX_ADAPTERS: tuple[str, ...] = tuple(f"default_{g}_pix" for g in GROUPS)
PISA_SEM_ADAPTERS: tuple[str, ...] = tuple(f"default_{g}_sem" for g in GROUPS)
OSEDIFF_UNET_ADAPTERS: tuple[str, ...] = tuple(f"default_{g}" for g in GROUPS)
OSEDIFF_VAE_ADAPTER = "default_encoder"

_KEY_RE = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])\.(?P<adapter>[^.]+)\.weight$")


# ------------------------------------------------------------------------------------------------------------
# Module selection (the official rules)
def unet_lora_target_modules(unet) -> dict[str, list[str]]:
    """The official PiSA-SR / OSEDiff UNet LoRA module lists.

    Args:
        unet: a diffusers ``UNet2DConditionModel`` *without* LoRA layers (names must end in ``.weight``).

    Returns:
        ``{"encoder": [...], "decoder": [...], "others": [...]}`` of module paths, in parameter order
        (94 / 148 / 16 on SD-2.1-base).
    """
    groups: dict[str, list[str]] = {g: [] for g in GROUPS}
    for name, _param in unet.named_parameters():
        if "bias" in name or "norm" in name:
            continue
        for pattern in UNET_LORA_PATTERNS:
            if pattern not in name:
                continue
            module = name.replace(".weight", "")
            if "down_blocks" in name or "conv_in" in name:
                groups["encoder"].append(module)
            elif "up_blocks" in name or "conv_out" in name:
                groups["decoder"].append(module)
            else:
                groups["others"].append(module)
            break
    return groups


def vae_encoder_lora_target_modules(vae) -> list[str]:
    """The official OSEDiff VAE-encoder LoRA module list, duplicates included (65 entries on SD-2.1-base).

    Args:
        vae: a diffusers ``AutoencoderKL`` without LoRA layers.

    Returns:
        Module paths (``encoder.conv_in``, ..., ``quant_conv``); use ``dict.fromkeys(...)`` for unique ones.
    """
    modules: list[str] = []
    for name, _param in vae.named_parameters():
        if "bias" in name or "norm" in name:
            continue
        for pattern in VAE_LORA_PATTERNS:
            if pattern in name and "encoder" in name:
                modules.append(name.replace(".weight", ""))
            elif "quant_conv" in name and "post_quant_conv" not in name:
                modules.append(name.replace(".weight", ""))
    return modules


# ------------------------------------------------------------------------------------------------------------
# Injection and activation
def make_lora_config(target_modules: Sequence[str], rank: int, *, alpha: Optional[float] = None,
                     init: object = "gaussian"):
    """A peft ``LoraConfig`` as the official code builds it.

    Args:
        target_modules: full module paths (matched by peft as exact names or ``.``-suffixes).
        rank: LoRA rank ``r``.
        alpha: ``lora_alpha``; default :data:`DEFAULT_LORA_ALPHA` (8), so the scale is ``8 / r``.
        init: peft's ``init_lora_weights`` (``"gaussian"``: A ~ N(0, 1/r), B = 0).

    Raises:
        ValueError: ``rank`` is not a positive integer or ``target_modules`` is empty.
    """
    from peft import LoraConfig

    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
    if not target_modules:
        raise ValueError("target_modules is empty")
    return LoraConfig(r=rank, lora_alpha=DEFAULT_LORA_ALPHA if alpha is None else alpha,
                      init_lora_weights=init, target_modules=list(target_modules), lora_dropout=0.0)


def add_lora_adapter(model, adapter_name: str, target_modules: Sequence[str], rank: int, *,
                     alpha: Optional[float] = None, init: object = "gaussian") -> None:
    """Inject one LoRA adapter into ``model`` in place (peft ``inject_adapter_in_model``).

    The adapter is added to modules that already carry other adapters. Activation is **not** managed
    here: call :func:`set_active_adapters` once all adapters are in.

    Raises:
        CheckpointError: a target module does not exist in ``model`` (e.g. a checkpoint made for another
            backbone).
    """
    from peft import inject_adapter_in_model

    names = set(n for n, _ in model.named_modules())
    missing = [m for m in dict.fromkeys(target_modules) if m not in names]
    if missing:
        raise CheckpointError(
            f"LoRA target module {missing[0]!r} (and {len(missing) - 1} more) not found in the "
            f"{type(model).__name__}: the checkpoint does not fit this backbone (SD-2.1-base expected)")
    import warnings

    with warnings.catch_warnings():  # "Already found a peft_config attribute": several adapters is the point
        warnings.filterwarnings("ignore", message=".*peft_config.*")
        inject_adapter_in_model(make_lora_config(target_modules, rank, alpha=alpha, init=init), model,
                                adapter_name=adapter_name)


def inject_pisa_adapters(unet, rank_pix: int = 4, rank_sem: int = 4,
                         modules: Optional[Mapping[str, Sequence[str]]] = None,
                         branches: Sequence[str] = ("pix", "sem")) -> dict[str, list[str]]:
    """Inject PiSA-SR's adapters ``default_{encoder,decoder,others}_{pix,sem}`` and activate all of them.

    Args:
        unet: SD-2.1-base UNet (without LoRA layers).
        rank_pix, rank_sem: ranks of the pixel / semantic LoRA.
        modules: module lists per group (``{"encoder": [...], ...}``); default :func:`unet_lora_target_modules`.
        branches: which branches to inject (the pipeline injects ``("sem",)`` after merging ``pix``).

    Returns:
        The module lists used, keyed by group.
    """
    modules = {g: list(v) for g, v in (modules or unet_lora_target_modules(unet)).items()}
    ranks = {"pix": rank_pix, "sem": rank_sem}
    added = []
    for branch in branches:
        for group in GROUPS:
            if modules.get(group):
                add_lora_adapter(unet, f"default_{group}_{branch}", modules[group], ranks[branch])
                added.append(f"default_{group}_{branch}")
    set_active_adapters(unet, added)
    return modules


def inject_osediff_adapters(unet, vae=None, rank_unet: int = 4, rank_vae: int = 4,
                            unet_modules: Optional[Mapping[str, Sequence[str]]] = None,
                            vae_modules: Optional[Sequence[str]] = None) -> tuple[dict[str, list[str]], list[str]]:
    """Inject OSEDiff's adapters: UNet ``default_{encoder,decoder,others}`` and VAE-encoder ``default_encoder``.

    All are activated. (The trainable UNet ``conv_in`` base weights are the caller's business.)

    Returns:
        ``(unet_modules, vae_modules)`` as used (official lists by default).
    """
    unet_modules = {g: list(v) for g, v in (unet_modules or unet_lora_target_modules(unet)).items()}
    for group in GROUPS:
        if unet_modules.get(group):
            add_lora_adapter(unet, f"default_{group}", unet_modules[group], rank_unet)
    set_active_adapters(unet, [f"default_{g}" for g in GROUPS if unet_modules.get(g)])
    vae_list: list[str] = []
    if vae is not None:
        vae_list = list(vae_modules) if vae_modules is not None else vae_encoder_lora_target_modules(vae)
        add_lora_adapter(vae, OSEDIFF_VAE_ADAPTER, vae_list, rank_vae)
        set_active_adapters(vae, [OSEDIFF_VAE_ADAPTER])
    return unet_modules, vae_list


def lora_layers(model) -> Iterator[tuple[str, object]]:
    """``(module path, peft LoRA layer)`` for every LoRA-wrapped module of ``model``."""
    from peft.tuners.lora import LoraLayer

    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def adapter_names(model) -> list[str]:
    """All adapter names present in ``model``, sorted."""
    found: set[str] = set()
    for _name, layer in lora_layers(model):
        found.update(layer.lora_A.keys())
    return sorted(found)


def set_active_adapters(model, names: Iterable[str]) -> None:
    """Make exactly ``names`` the active adapters of every LoRA layer (a layer sums those it has).

    Goes through peft's public ``set_adapter`` of each layer, which also makes the active adapters trainable
    and the others frozen; the ``requires_grad`` flags are put back as they were, so training keeps what
    :func:`set_trainable_adapters` chose (PiSA-SR's stage 2 runs the pixel LoRA frozen).

    Raises:
        ValueError: one of ``names`` exists nowhere in the model.
    """
    names = list(dict.fromkeys(names))
    present = set(adapter_names(model))
    unknown = [n for n in names if n not in present]
    if unknown:
        raise ValueError(f"unknown adapter(s) {unknown}; the model has {sorted(present)}")
    for _name, layer in lora_layers(model):
        grads = [(p, p.requires_grad) for p in layer.parameters()]
        layer.set_adapter(list(names))
        for p, flag in grads:
            p.requires_grad_(flag)


def set_trainable_adapters(model, names: Iterable[str]) -> None:
    """``requires_grad=True`` for the LoRA parameters of ``names``, ``False`` for every other adapter."""
    names = set(names)
    for _name, layer in lora_layers(model):
        for attr in ("lora_A", "lora_B"):
            for adapter, sub in getattr(layer, attr).items():
                sub.requires_grad_(adapter in names)


# ------------------------------------------------------------------------------------------------------------
# Reading and writing
def parse_lora_key(key: str) -> Optional[tuple[str, str, str]]:
    """``"a.b.lora_A.default_encoder_pix.weight"`` -> ``("a.b", "A", "default_encoder_pix")``; else ``None``."""
    m = _KEY_RE.match(key)
    return (m["module"], m["ab"], m["adapter"]) if m else None


def lora_state_dict(model, adapters: Optional[Iterable[str]] = None, *, extra: Sequence[str] = ()) -> dict:
    """The LoRA tensors of ``model`` with official key names (detached, on their current device).

    Args:
        adapters: only these adapters (default: all).
        extra: also include state-dict entries whose key contains one of these substrings (OSEDiff saves
            ``conv_in`` base weights this way: ``extra=("conv_in",)``).
    """
    wanted = set(adapters) if adapters is not None else None
    out = {}
    for key, value in model.state_dict().items():
        parsed = parse_lora_key(key)
        if parsed is not None:
            if wanted is None or parsed[2] in wanted:
                out[key] = value.detach()
        elif any(s in key for s in extra):
            out[key] = value.detach()
    return out


def load_lora_state_dict(model, state_dict: Mapping[str, "torch.Tensor"], *, strict: bool = True,
                         what: str = "checkpoint") -> list[str]:
    """Copy tensors into ``model`` by name (official keys), checking names and shapes.

    Args:
        state_dict: tensors keyed by parameter name (LoRA keys and possibly ``*.base_layer.*`` weights).
        strict: every LoRA parameter of the adapters named in ``state_dict`` must be given.
        what: how to call the source in error messages (a file name).

    Returns:
        The keys copied.

    Raises:
        CheckpointError: an unknown key, a shape mismatch, or (strict) missing LoRA tensors.
    """
    import torch

    own = model.state_dict()
    unknown = [k for k in state_dict if k not in own]
    if unknown:
        raise CheckpointError(f"{what}: key {unknown[0]!r} (and {len(unknown) - 1} more) does not exist in the "
                              f"{type(model).__name__} after LoRA injection: wrong method or backbone")
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{what}: {key!r} is a {type(value).__name__}, not a tensor")
        if tuple(value.shape) != tuple(own[key].shape):
            raise CheckpointError(f"{what}: {key!r} has shape {tuple(value.shape)} but the backbone needs "
                                  f"{tuple(own[key].shape)}: the checkpoint does not fit this SD-2.1-base model")
    if strict:
        given = {parse_lora_key(k)[2] for k in state_dict if parse_lora_key(k)}
        missing = [k for k in own if (p := parse_lora_key(k)) and p[2] in given and k not in state_dict]
        if missing:
            raise CheckpointError(f"{what}: missing {len(missing)} LoRA tensor(s), e.g. {missing[0]!r}: "
                                  "the file is truncated or from another version")
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    with torch.no_grad():
        for key, value in state_dict.items():
            target = params.get(key, buffers.get(key))
            target.copy_(value.to(dtype=target.dtype, device=target.device))
    return list(state_dict)


def merge_and_unload_adapters(model, names: Iterable[str]) -> int:
    """Merge the adapters ``names`` into the base weights and remove them (the official ``merge_and_unload``).

    Every LoRA layer must carry only adapters from ``names`` (merge a whole branch before injecting the
    next one, as the official PiSA-SR code does). Layers are replaced by their merged base module.

    Returns:
        The number of layers merged.

    Raises:
        ValueError: a layer carries an adapter not in ``names``.
    """
    names = set(names)
    count = 0
    for path, layer in list(lora_layers(model)):
        have = set(layer.lora_A.keys())
        if not have <= names:
            raise ValueError(f"{path} also carries adapter(s) {sorted(have - names)}; merge those too or first")
        layer.merge(adapter_names=sorted(have))
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, child, layer.get_base_layer())
        count += 1
    return count


@contextlib.contextmanager
def per_sample_adapters(model, adapters_per_sample: Sequence[Iterable[str]]):
    """Run one batched forward where sample ``i`` sees only the adapters ``adapters_per_sample[i]``.

    Uses peft's mixed-batch LoRA forward (``adapter_names=``), fed through forward pre-hooks because diffusers
    modules do not pass that argument down. Each layer looks up which of a sample's adapters it carries
    (at most one may match); samples with none use the base weights (``"__base__"``). The base layer runs
    once on the whole batch and each adapter only on its sub-batch, so e.g. PiSA-SR's two passes
    (pixel only, pixel+semantic) cost one batched UNet call.

    Args:
        adapters_per_sample: one collection of adapter names per batch *block*: with ``k`` sets and a batch of
            ``k * m``, elements ``[i*m, (i+1)*m)`` use set ``i``.
    """
    per_sample = [set(a) for a in adapters_per_sample]
    handles = []

    def make_hook(layer_adapters: set):
        names = []
        for sample in per_sample:
            hit = sorted(sample & layer_adapters)
            if len(hit) > 1:
                raise ValueError(f"one layer carries several adapters of one sample: {hit}")
            names.append(hit[0] if hit else "__base__")

        def hook(module, args, kwargs):
            x = args[0] if args else kwargs["x"]
            n = x.shape[0]
            if n % len(names):
                raise ValueError(f"batch of {n} does not match {len(names)} per-sample adapter sets")
            rep = n // len(names)
            kwargs = dict(kwargs)
            kwargs["adapter_names"] = [nm for nm in names for _ in range(rep)]
            return args, kwargs
        return hook

    try:
        for _path, layer in lora_layers(model):
            handles.append(layer.register_forward_pre_hook(make_hook(set(layer.lora_A.keys())), with_kwargs=True))
        yield model
    finally:
        for h in handles:
            h.remove()
