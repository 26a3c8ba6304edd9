"""The official checkpoints of the one-step diffusion methods: ``pisa_sr.pkl`` (csslc/PiSA-SR) and
``osediff.pkl`` (cswry/OSEDiff).

Both are ``torch.save`` dicts of module lists, ranks and LoRA state dicts (see ``docs/pisa-sr-osediff.md``,
"LoRA modules and checkpoint files"). They are read with ``torch.load(weights_only=True)``
only, so a file can never run code, and validated before use: missing keys, bad ranks, LoRA keys that do not
belong to the listed adapters and shapes that do not fit the backbone all raise
:class:`~realisr.errors.CheckpointError` with a one-line message.

``realisr convert IN.pkl OUT.safetensors`` writes the same content as safetensors (tensors as
``unet.<key>`` / ``vae.<key>``, the lists and ranks as JSON metadata); both formats load the same way.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..errors import CheckpointError, WeightsNotFoundError

logger = logging.getLogger(__name__)

__all__ = [
    "OfficialCheckpoint",
    "PISA_LIST_KEYS",
    "OSEDIFF_LIST_KEYS",
    "detect_method",
    "read_checkpoint_dict",
    "is_official_safetensors",
    "load_official_checkpoint",
    "validate_checkpoint_dict",
    "save_safetensors",
    "save_pkl",
    "convert_checkpoint",
    "pisa_checkpoint_dict",
    "osediff_checkpoint_dict",
    "find_checkpoint",
    "weights_status",
    "pipeline_from_official_checkpoint",
]

_GROUPS = ("encoder", "decoder", "others")
PISA_LIST_KEYS = tuple(f"unet_lora_{g}_modules_{b}" for b in ("pix", "sem") for g in _GROUPS)
PISA_RANK_KEYS = ("lora_rank_unet_pix", "lora_rank_unet_sem")
OSEDIFF_LIST_KEYS = ("vae_lora_encoder_modules",) + tuple(f"unet_lora_{g}_modules" for g in _GROUPS)
OSEDIFF_RANK_KEYS = ("rank_unet", "rank_vae")
_SAFETENSORS_FORMAT = "realisr-official-checkpoint-v1"


@dataclass
class OfficialCheckpoint:
    """A validated official checkpoint.

    Attributes:
        method: ``"pisa-sr"`` or ``"osediff"``.
        path: where it was read from.
        raw: the dict as in the official file (lists, ranks, ``state_dict_unet`` and ``state_dict_vae``).
    """

    method: str
    path: Optional[Path]
    raw: dict = field(repr=False)

    @property
    def state_dict_unet(self) -> dict:
        return self.raw["state_dict_unet"]

    @property
    def state_dict_vae(self) -> dict:
        return self.raw.get("state_dict_vae", {})

    def unet_modules(self, branch: str = "") -> dict[str, list[str]]:
        """UNet module lists per group; ``branch`` is ``"pix"``/``"sem"`` for PiSA-SR, ``""`` for OSEDiff."""
        suffix = f"_{branch}" if branch else ""
        return {g: list(self.raw[f"unet_lora_{g}_modules{suffix}"]) for g in _GROUPS}

    def rank(self, which: str) -> int:
        """``"pix"``/``"sem"`` (PiSA-SR) or ``"unet"``/``"vae"`` (OSEDiff)."""
        key = {"pix": "lora_rank_unet_pix", "sem": "lora_rank_unet_sem", "unet": "rank_unet", "vae": "rank_vae"}
        return int(self.raw[key[which]])

    def branch_state_dict(self, branch: str) -> dict:
        """PiSA-SR: the UNet tensors of the ``pix`` or ``sem`` adapters."""
        from ..models.lora import parse_lora_key

        if not branch:
            return dict(self.state_dict_unet)
        return {k: v for k, v in self.state_dict_unet.items()
                if (p := parse_lora_key(k)) is not None and p[2].endswith("_" + branch)}

    @property
    def name(self) -> str:
        return self.path.name if self.path is not None else "checkpoint"


def detect_method(d: dict) -> Optional[str]:
    """``"pisa-sr"``, ``"osediff"`` or ``None`` from the keys of an official checkpoint dict."""
    if not isinstance(d, dict):
        return None
    if any(k.endswith("_pix") or k.endswith("_sem") for k in d if isinstance(k, str)) \
            or "lora_rank_unet_pix" in d:
        return "pisa-sr"
    if "vae_lora_encoder_modules" in d or "rank_unet" in d:
        return "osediff"
    return None


def is_official_safetensors(path) -> bool:
    """Whether ``path`` is a ``.safetensors`` written by ``realisr convert`` from an official checkpoint
    (reads the header only)."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors" or not path.is_file():
        return False
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format") == _SAFETENSORS_FORMAT
    except Exception:  # noqa: BLE001 - not our file; let the caller's loader report it
        return False


def read_checkpoint_dict(path) -> dict:
    """Read an official checkpoint (``.pkl`` via ``torch.load(weights_only=True)``, or our ``.safetensors``).

    Raises:
        WeightsNotFoundError: the file does not exist.
        CheckpointError: the file is not a readable checkpoint (or would need code execution to load).
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise WeightsNotFoundError(f"checkpoint not found: {path}")
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != _SAFETENSORS_FORMAT:
                    raise CheckpointError(f"{path.name}: not an official-checkpoint safetensors written by "
                                          "`realisr convert` (no metadata); convert the .pkl again")
                d = json.loads(meta["official"])
                d["state_dict_unet"], d["state_dict_vae"] = {}, {}
                for key in f.keys():
                    part, _, name = key.partition(".")
                    if part not in ("unet", "vae"):
                        raise CheckpointError(f"{path.name}: unexpected tensor {key!r}")
                    d[f"state_dict_{part}"][name] = f.get_tensor(key)
            if not d["state_dict_vae"] and meta.get("has_vae") != "1":
                d.pop("state_dict_vae")
            return d
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 - any parse error is a bad file
            raise CheckpointError(f"{path.name}: cannot read safetensors ({type(e).__name__}: {e})") from e
    try:
        d = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - pickle errors, unsafe globals, truncation
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path.name}: not a loadable official checkpoint ({msg[:200]}); "
                              "only plain tensor/list/int dicts are accepted (weights_only)") from e
    if not isinstance(d, dict):
        raise CheckpointError(f"{path.name}: expected a dict checkpoint, got {type(d).__name__}")
    return d


def _check_list(d: dict, key: str, name: str) -> list:
    v = d.get(key)
    if not isinstance(v, (list, tuple)) or not v or not all(isinstance(s, str) and s for s in v):
        raise CheckpointError(f"{name}: {key!r} must be a non-empty list of module names")
    return list(v)


def _check_rank(d: dict, key: str, name: str) -> int:
    v = d.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise CheckpointError(f"{name}: {key!r} must be a positive integer rank, got {v!r}")
    return v


def _check_lora_tensors(sd: dict, name: str, part: str, adapters: dict[str, tuple[list[str], int]],
                        allowed_extra: tuple[str, ...] = ()) -> None:
    """Every key parses, belongs to a listed adapter/module, A/B pairs are complete and ranks match."""
    import torch

    from ..models.lora import parse_lora_key

    seen: dict[tuple[str, str], set] = {}
    for key, t in sd.items():
        if not isinstance(key, str) or not isinstance(t, torch.Tensor):
            raise CheckpointError(f"{name}: {part} entry {key!r} is not a named tensor")
        if key in allowed_extra:
            continue
        parsed = parse_lora_key(key)
        if parsed is None:
            raise CheckpointError(f"{name}: unexpected {part} key {key!r} (not a LoRA tensor)")
        module, ab, adapter = parsed
        if adapter not in adapters:
            raise CheckpointError(f"{name}: {part} key {key!r} names adapter {adapter!r}; expected one of "
                                  f"{sorted(adapters)}")
        modules, rank = adapters[adapter]
        if module not in modules:
            raise CheckpointError(f"{name}: {part} key {key!r}: module {module!r} is not in the adapter's list")
        dim = t.shape[0] if ab == "A" else (t.shape[1] if t.ndim > 1 else -1)
        if t.ndim not in (2, 4) or dim != rank:
            raise CheckpointError(f"{name}: {key!r} has shape {tuple(t.shape)}, which does not match rank {rank}")
        if not torch.isfinite(t).all():
            raise CheckpointError(f"{name}: {key!r} contains NaN/inf values")
        seen.setdefault((adapter, module), set()).add(ab)
    for adapter, (modules, _rank) in adapters.items():
        for module in dict.fromkeys(modules):
            got = seen.get((adapter, module), set())
            if got != {"A", "B"}:
                lack = sorted({"A", "B"} - got)
                raise CheckpointError(f"{name}: missing {part} tensor {module}.lora_{lack[0]}.{adapter}.weight")


def validate_checkpoint_dict(d: dict, name: str = "checkpoint") -> str:
    """Check the structure of an official checkpoint dict (shapes against a backbone are checked on load).

    Returns:
        The method, ``"pisa-sr"`` or ``"osediff"``.

    Raises:
        CheckpointError: unknown format, missing keys, bad ranks, or LoRA tensors inconsistent with the lists.
    """
    method = detect_method(d)
    if method is None:
        raise CheckpointError(f"{name}: neither a PiSA-SR nor an OSEDiff checkpoint (keys: "
                              f"{', '.join(sorted(map(str, d))[:6]) if isinstance(d, dict) else type(d).__name__})")
    if not isinstance(d.get("state_dict_unet"), dict):
        raise CheckpointError(f"{name}: missing 'state_dict_unet'")
    if method == "pisa-sr":
        for key in PISA_LIST_KEYS:
            _check_list(d, key, name)
        ranks = {b: _check_rank(d, f"lora_rank_unet_{b}", name) for b in ("pix", "sem")}
        adapters = {f"default_{g}_{b}": (list(d[f"unet_lora_{g}_modules_{b}"]), ranks[b])
                    for b in ("pix", "sem") for g in _GROUPS}
        _check_lora_tensors(d["state_dict_unet"], name, "state_dict_unet", adapters)
        return method
    for key in OSEDIFF_LIST_KEYS:
        _check_list(d, key, name)
    r_unet, r_vae = _check_rank(d, "rank_unet", name), _check_rank(d, "rank_vae", name)
    adapters = {f"default_{g}": (list(d[f"unet_lora_{g}_modules"]), r_unet) for g in _GROUPS}
    conv_in = ("conv_in.base_layer.weight", "conv_in.base_layer.bias")
    for key in conv_in:
        if key not in d["state_dict_unet"]:
            raise CheckpointError(f"{name}: missing state_dict_unet tensor {key!r} (OSEDiff trains conv_in)")
    _check_lora_tensors(d["state_dict_unet"], name, "state_dict_unet", adapters, allowed_extra=conv_in)
    if not isinstance(d.get("state_dict_vae"), dict):
        raise CheckpointError(f"{name}: missing 'state_dict_vae'")
    _check_lora_tensors(d["state_dict_vae"], name, "state_dict_vae",
                        {"default_encoder": (list(d["vae_lora_encoder_modules"]), r_vae)})
    return method


def load_official_checkpoint(path, expect: Optional[str] = None) -> OfficialCheckpoint:
    """Read and validate an official checkpoint (``.pkl`` or converted ``.safetensors``).

    Args:
        path: the file.
        expect: ``"pisa-sr"``/``"osediff"`` to reject the other method's file.

    Raises:
        WeightsNotFoundError: no such file.
        CheckpointError: malformed, or not the expected method.
    """
    path = Path(path).expanduser()
    d = read_checkpoint_dict(path)
    method = validate_checkpoint_dict(d, path.name)
    if expect is not None and method != expect:
        raise CheckpointError(f"{path.name} is an {method} checkpoint, not {expect}: use -m {method}")
    return OfficialCheckpoint(method=method, path=path, raw=d)


def save_safetensors(d: dict, out) -> Path:
    """Write an official checkpoint dict as safetensors (atomic). Lists and ranks go to the metadata."""
    from .cache import atomic_save_file

    method = validate_checkpoint_dict(d, Path(out).name)
    meta = {k: v for k, v in d.items() if not k.startswith("state_dict")}
    tensors = {f"unet.{k}": v.contiguous() for k, v in d["state_dict_unet"].items()}
    tensors.update({f"vae.{k}": v.contiguous() for k, v in d.get("state_dict_vae", {}).items()})
    metadata = {"format": _SAFETENSORS_FORMAT, "method": method, "official": json.dumps(meta),
                "has_vae": "1" if "state_dict_vae" in d else "0"}
    return atomic_save_file(tensors, out, metadata=metadata)


def save_pkl(d: dict, out) -> Path:
    """Write an official checkpoint dict as the official ``torch.save`` ``.pkl`` (plain types only)."""
    import torch

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(d, str(out))
    return out


def convert_checkpoint(src, dst) -> tuple[str, Path]:
    """Convert between ``.pkl`` and ``.safetensors`` (by the suffix of ``dst``). Returns ``(method, dst)``."""
    d = read_checkpoint_dict(src)
    method = validate_checkpoint_dict(d, Path(src).name)
    dst = Path(dst)
    if dst.suffix.lower() == ".safetensors":
        return method, save_safetensors(d, dst)
    if dst.suffix.lower() in (".pkl", ".pt", ".pth"):
        return method, save_pkl(d, dst)
    raise CheckpointError(f"unsupported output format {dst.suffix!r}: use .safetensors or .pkl")


def pisa_checkpoint_dict(unet, modules: dict[str, list[str]], rank_pix: int = 4, rank_sem: int = 4) -> dict:
    """The official PiSA-SR checkpoint dict of a UNet carrying the six PiSA adapters (for trainers).

    Args:
        modules: ``{"encoder": [...], "decoder": [...], "others": [...]}`` (the same lists for pix and sem).
    """
    from ..models.lora import lora_state_dict

    d: dict = {}
    for b in ("pix", "sem"):
        for g in _GROUPS:
            d[f"unet_lora_{g}_modules_{b}"] = list(modules[g])
    d["lora_rank_unet_pix"], d["lora_rank_unet_sem"] = int(rank_pix), int(rank_sem)
    d["state_dict_unet"] = {k: v.detach().cpu().clone() for k, v in lora_state_dict(unet).items()}
    return d


def osediff_checkpoint_dict(unet, vae, unet_modules: dict[str, list[str]], vae_modules: list[str],
                            rank_unet: int = 4, rank_vae: int = 4) -> dict:
    """The official OSEDiff checkpoint dict (UNet LoRA + ``conv_in`` + VAE-encoder LoRA), for trainers."""
    from ..models.lora import lora_state_dict

    d: dict = {"vae_lora_encoder_modules": list(vae_modules)}
    for g in _GROUPS:
        d[f"unet_lora_{g}_modules"] = list(unet_modules[g])
    d["rank_unet"], d["rank_vae"] = int(rank_unet), int(rank_vae)
    d["state_dict_unet"] = {k: v.detach().cpu().clone()
                            for k, v in lora_state_dict(unet, extra=("conv_in",)).items()}
    d["state_dict_vae"] = {k: v.detach().cpu().clone() for k, v in lora_state_dict(vae).items()}
    return d


# ------------------------------------------------------------------------------------------------------------
# Registry hooks
def find_checkpoint(spec) -> Optional[Path]:
    """The user's checkpoint for a registry entry: ``<REALISR_WEIGHTS or cache>/checkpoints/<file>`` (``.pkl``)
    or its converted ``.safetensors`` twin; ``None`` if absent."""
    from .cache import checkpoints_dir

    root = checkpoints_dir()
    for fname in spec.weights.files:
        p = root / fname
        for cand in (p, p.with_suffix(".safetensors")):
            if cand.is_file():
                return cand
    return None


def _missing_checkpoint(spec) -> str:
    from .cache import checkpoints_dir

    fname = spec.weights.files[0] if spec.weights.files else "the checkpoint"
    return (f"{fname} (not in {checkpoints_dir()}: run `realisr weights fetch {spec.id}`, put it there "
            f"(REALISR_WEIGHTS), or pass -m path/to/{fname}; source: {spec.weights.url})")


def resolve_checkpoint(checkpoint, spec, expect: str, *, sd=None,
                       components: Optional[tuple] = None) -> "OfficialCheckpoint":
    """A validated checkpoint from ``checkpoint`` (an :class:`OfficialCheckpoint`, a path, or ``None``: look in
    the checkpoints folder), after checking, without loading or network access, that everything the pipeline
    needs is here: with ``components``, the SD backbone's parts (``sd`` as in
    :func:`realisr.models.backbone.resolve_sd`) too, so one error names every missing file.

    Raises:
        WeightsNotFoundError: the checkpoint or backbone parts are missing (the message lists all of them and
            the commands that get them).
        CheckpointError: the file is malformed or of another method.
    """
    from ..errors import WeightsNotFoundError

    missing = []
    path = None
    if not isinstance(checkpoint, OfficialCheckpoint):
        path = checkpoint or find_checkpoint(spec)
        if path is None:
            missing.append(_missing_checkpoint(spec))
    if components is not None:
        from ..models.backbone import backbone_status

        ok, detail = backbone_status(sd, components)
        if not ok:
            missing.append(detail)
    if missing:
        raise WeightsNotFoundError(f"{spec.id} needs files that are not here: " + "; and ".join(missing))
    if isinstance(checkpoint, OfficialCheckpoint):
        return checkpoint
    return load_official_checkpoint(path, expect=expect)


def weights_status(spec, sd=None) -> tuple[bool, str]:
    """``(available, detail)`` for ``pisa-sr`` / ``osediff``: the official checkpoint and the SD backbone
    (``sd``: as ``--sd``; default ``REALISR_SD``, then the HF cache). No network access and no loading.
    """
    from ..models.backbone import backbone_status

    ckpt = find_checkpoint(spec)
    ok_sd, sd_detail = backbone_status(sd)
    if ckpt is None:
        return False, f"{_missing_checkpoint(spec)}; {sd_detail if not ok_sd else 'SD backbone found'}"
    if not ok_sd:
        return False, f"checkpoint {ckpt} found, but {sd_detail}"
    return True, f"{ckpt}; {sd_detail}"


def pipeline_from_official_checkpoint(path, device=None, dtype=None, **kwargs):
    """Build the right pipeline for an official ``.pkl`` (or converted ``.safetensors``) checkpoint.

    Args:
        path: the checkpoint file.
        device, dtype: as for :func:`realisr.load_pipeline`.
        **kwargs: passed to the pipeline's ``from_spec`` (``sd=`` for the backbone, ...).

    Raises:
        CheckpointError: malformed file. WeightsNotFoundError: backbone missing.
    """
    from ..registry import get_spec

    ckpt = load_official_checkpoint(path)
    spec = get_spec(ckpt.method)
    return spec.pipeline_class().from_spec(spec, device=device, dtype=dtype, checkpoint=ckpt, **kwargs)
