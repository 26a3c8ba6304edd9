"""Finding and loading the RAM / DAPE files users bring, and mapping the official checkpoints onto
:mod:`realisr.tagging.ram_arch`.

Files (the names of the official code; see ``docs/tagging.md``):

==============================  ====================================================================
``ram_swin_large_14m.pth``      RAM Swin-L 14M, ``torch.save({'model': state_dict})``
``DAPE.pth``                    SeeSR's DAPE: a flat dict of loralib ``lora_A`` / ``lora_B`` tensors
``ram_tag_list.txt``            one tag per line (4585 for the released model)
``ram_tag_list_threshold.txt``  one per-class threshold per line
``ram_tag_list_chinese.txt``    Chinese tag names (only with ``chinese=True``)
``configs/q2l_config.json``     tagging-head config; default: shipped with realisr (the official one)
``configs/swin/config_swinL_384.json``  Swin config; default: shipped with realisr
==============================  ====================================================================

Where each file is looked for, in order: the explicit path given for it; ``root`` (a folder laid out like
SeeSR's ``ram/`` package or ``preset/models/``: ``data/`` and ``configs/`` sub-folders are searched too);
``$REALISR_WEIGHTS/ram/``; ``$REALISR_WEIGHTS/``. The RAM weights are also taken from the Hugging Face cache
(``xinyu1205/recognize_anything_model``) and downloaded from the hub only when ``download=True``.
A missing file raises :class:`~realisr.errors.WeightsNotFoundError` with one line naming *every* missing file.

The BERT WordPiece vocabulary of the official code is not needed: RAM uses its tokenizer only to size the
word embeddings of the tagging head, which it deletes right after (they take no part in tagging).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

from ..errors import CheckpointError, WeightsNotFoundError

logger = logging.getLogger(__name__)

__all__ = [
    "RAM_FILE", "DAPE_FILE", "TAG_LIST_FILE", "THRESHOLD_FILE", "TAG_LIST_CHINESE_FILE", "Q2L_CONFIG",
    "SWIN_CONFIG", "RAM_HUB_REPO", "DAPE_LORA_RANK", "DAPE_LORA_ALPHA", "DEFAULT_THRESHOLD", "TaggerFiles",
    "search_roots", "find_tagger_files", "tagger_status", "read_configs", "read_tag_list", "read_thresholds",
    "build_ram", "read_ram_state_dict", "read_dape_state_dict", "load_ram_weights", "apply_dape",
    "dape_state_dict", "load_ram_model",
]

RAM_FILE = "ram_swin_large_14m.pth"
DAPE_FILE = "DAPE.pth"
TAG_LIST_FILE = "ram_tag_list.txt"
THRESHOLD_FILE = "ram_tag_list_threshold.txt"
TAG_LIST_CHINESE_FILE = "ram_tag_list_chinese.txt"
Q2L_CONFIG = "configs/q2l_config.json"
SWIN_CONFIG = "configs/swin/config_swinL_384.json"
RAM_HUB_REPO = "xinyu1205/recognize_anything_model"
#: DAPE's loralib settings (``r=8``; ``lora_alpha`` is loralib's default 1, so the scaling is 1/8).
DAPE_LORA_RANK = 8
DAPE_LORA_ALPHA = 1.0
#: RAM's default class threshold, for classes the threshold file does not list.
DEFAULT_THRESHOLD = 0.68
#: The official embedding width (hard-coded 512 in RAM).
EMBED_WIDTH = 512

_PACKAGED = Path(__file__).with_name("configs")
_WHAT = {
    "ram": (RAM_FILE, "RAM weights, from xinyu1205/recognize_anything_model"),
    "dape": (DAPE_FILE, "SeeSR's DAPE weights"),
    "tag_list": (TAG_LIST_FILE, "tag list, from SeeSR's ram/data/"),
    "thresholds": (THRESHOLD_FILE, "per-class thresholds, from SeeSR's ram/data/"),
    "tag_list_chinese": (TAG_LIST_CHINESE_FILE, "Chinese tag list, from SeeSR's ram/data/"),
}
PathLike = Union[str, os.PathLike]


@dataclass
class TaggerFiles:
    """Resolved files of a tagger (``dape`` is ``None`` for plain RAM, ``thresholds`` when overridden,
    ``tag_list_chinese`` unless requested)."""

    kind: str
    ram: Path
    tag_list: Path
    q2l_config: Path
    swin_config: Path
    dape: Optional[Path] = None
    thresholds: Optional[Path] = None
    tag_list_chinese: Optional[Path] = None


def search_roots(root: Optional[PathLike] = None) -> list[Path]:
    """The folders searched for tagger files: ``root``, ``$REALISR_WEIGHTS/ram``, ``$REALISR_WEIGHTS``."""
    from ..weights.cache import checkpoints_dir

    roots = [Path(root).expanduser()] if root is not None else []
    ck = checkpoints_dir()
    return roots + [ck / "ram", ck]


def _find(name: str, roots: Sequence[Path], subdirs: Sequence[str] = ("",)) -> Optional[Path]:
    for r in roots:
        for sub in subdirs:
            p = r / sub / name if sub else r / name
            if p.is_file():
                return p
    return None


def _find_ram_weights(roots: Sequence[Path], download: bool) -> Optional[Path]:
    p = _find(RAM_FILE, roots)
    if p is not None:
        return p
    from ..weights.cache import find_hf_snapshot

    snap = find_hf_snapshot(RAM_HUB_REPO)
    if snap is not None and (snap / RAM_FILE).is_file():
        return snap / RAM_FILE
    if download:
        try:
            from huggingface_hub import hf_hub_download

            logger.info("downloading %s from %s on the Hugging Face hub", RAM_FILE, RAM_HUB_REPO)
            return Path(hf_hub_download(RAM_HUB_REPO, RAM_FILE))
        except Exception as e:  # noqa: BLE001 - offline, no such repo, ...: reported as missing
            logger.warning("cannot download %s from %s: %s", RAM_FILE, RAM_HUB_REPO, str(e).splitlines()[0])
    return None


def find_tagger_files(kind: str = "dape", *, ram: Optional[PathLike] = None, dape: Optional[PathLike] = None,
                      tag_list: Optional[PathLike] = None, thresholds: Optional[PathLike] = None,
                      tag_list_chinese: Optional[PathLike] = None, config_dir: Optional[PathLike] = None,
                      root: Optional[PathLike] = None, chinese: bool = False, need_thresholds: bool = True,
                      download: bool = False) -> TaggerFiles:
    """Locate every file a tagger needs (no loading).

    Args:
        kind: ``"dape"`` (RAM + DAPE, SeeSR's and OSEDiff's prompt extractor) or ``"ram"`` (plain RAM).
        ram, dape, tag_list, thresholds, tag_list_chinese: explicit paths (searched for when ``None``).
        config_dir: a folder with ``q2l_config.json`` and ``swin/config_swinL_384.json`` (default: the
            ``configs/`` of the folder the files are found in, else the configs shipped with realisr).
        root: an extra folder searched first (see the module docstring).
        chinese: the Chinese tag list is needed too.
        need_thresholds: the per-class threshold file is needed (``False`` when thresholds are overridden).
        download: fetch the RAM weights from the Hugging Face hub when they are not found locally.

    Raises:
        ValueError: unknown ``kind``.
        WeightsNotFoundError: one line naming every missing file and where it was looked for.
    """
    if kind not in ("dape", "ram"):
        raise ValueError(f"tagger kind must be 'dape' or 'ram', got {kind!r}")
    roots = search_roots(root)
    explicit = {"ram": ram, "dape": dape, "tag_list": tag_list, "thresholds": thresholds,
                "tag_list_chinese": tag_list_chinese}
    wanted = ["ram", "tag_list"] + (["dape"] if kind == "dape" else []) + \
        (["thresholds"] if need_thresholds else []) + (["tag_list_chinese"] if chinese else [])
    found: dict[str, Optional[Path]] = {}
    missing: list[str] = []
    for key in wanted:
        name, what = _WHAT[key]
        if explicit[key] is not None:
            p = Path(explicit[key]).expanduser()
            found[key] = p if p.is_file() else None
            if found[key] is None:
                missing.append(f"{p} ({what})")
            continue
        if key == "ram":
            found[key] = _find_ram_weights(roots, download)
        else:
            found[key] = _find(name, roots, ("", "data"))
        if found[key] is None:
            missing.append(f"{name} ({what})")
    if missing:
        where = ", ".join(str(r) for r in roots)
        raise WeightsNotFoundError(
            f"tagger ({kind}) files missing: {'; '.join(missing)}. Looked in {where}: put them in "
            f"$REALISR_WEIGHTS/ram/ or pass their paths (see docs/tagging.md)")
    q2l, swin = _find_configs(config_dir, [p.parent for p in (found["tag_list"], found["ram"])])
    return TaggerFiles(kind=kind, ram=found["ram"], tag_list=found["tag_list"], q2l_config=q2l, swin_config=swin,
                       dape=found.get("dape"), thresholds=found.get("thresholds"),
                       tag_list_chinese=found.get("tag_list_chinese"))


def _find_configs(config_dir: Optional[PathLike], near: Sequence[Path]) -> tuple[Path, Path]:
    if config_dir is not None:
        d = Path(config_dir).expanduser()
        q2l, swin = d / "q2l_config.json", d / "swin" / "config_swinL_384.json"
        missing = [str(p) for p in (q2l, swin) if not p.is_file()]
        if missing:
            raise WeightsNotFoundError(f"tagger config files missing: {', '.join(missing)}: fix config_dir "
                                       "or leave it unset to use the official configs shipped with realisr")
        return q2l, swin
    # the configs/ next to the user's files (e.g. SeeSR's ram/ folder: ram/data/*.txt, ram/configs/*.json)
    for base in near:
        for d in (base, base.parent):
            if (d / Q2L_CONFIG).is_file() and (d / SWIN_CONFIG).is_file():
                return d / Q2L_CONFIG, d / SWIN_CONFIG
    return _PACKAGED / "q2l_config.json", _PACKAGED / "swin" / "config_swinL_384.json"


def tagger_status(kind: str = "dape", root: Optional[PathLike] = None) -> tuple[bool, str]:
    """``(all files found, detail)`` without loading anything or touching the network."""
    try:
        files = find_tagger_files(kind, root=root)
    except WeightsNotFoundError as e:
        return False, str(e)
    return True, f"tagger ({kind}): {files.ram}" + (f" + {files.dape}" if files.dape else "")


# ------------------------------------------------------------------------------------------------ reading
def _read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable JSON config ({e})") from e


def read_configs(files: TaggerFiles) -> tuple[dict, dict]:
    """``(swin_config, q2l_config)`` as dicts, checked for the keys RAM uses.

    Raises:
        CheckpointError: a config misses a key or is not JSON.
    """
    swin, q2l = _read_json(files.swin_config), _read_json(files.q2l_config)
    for path, cfg, keys in ((files.swin_config, swin, ("image_res", "window_size", "embed_dim", "depths",
                                                       "num_heads")),
                            (files.q2l_config, q2l, ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                     "intermediate_size"))):
        miss = [k for k in keys if k not in cfg]
        if miss:
            raise CheckpointError(f"{path}: missing {', '.join(miss)}")
    return swin, q2l


def read_tag_list(path: PathLike) -> list[str]:
    """Tag names, one per line, exactly as the official ``f.read().splitlines()`` (no stripping)."""
    try:
        return Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read the tag list ({e})") from e


def read_thresholds(path: PathLike, num_classes: int) -> list[float]:
    """Per-class thresholds: the file's values in class order, :data:`DEFAULT_THRESHOLD` for classes after
    its last line (as official).

    Raises:
        CheckpointError: a line is not a number, or there are more lines than classes.
    """
    values = [DEFAULT_THRESHOLD] * num_classes
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    if len(lines) > num_classes:
        raise CheckpointError(f"{path}: {len(lines)} thresholds for {num_classes} tags: use the threshold file "
                              "that belongs to the tag list")
    for i, line in enumerate(lines):
        try:
            values[i] = float(line.strip())
        except ValueError:
            raise CheckpointError(f"{path} line {i + 1}: {line!r} is not a number") from None
    return values


def build_ram(swin: dict, q2l: dict, num_classes: int, *, lora_rank: int = 0, lora_alpha: float = DAPE_LORA_ALPHA,
              drop_path_rate: float = 0.1):
    """A randomly initialised :class:`~realisr.tagging.ram_arch.RAM` for the given configs."""
    from .ram_arch import RAM

    return RAM(num_classes=num_classes, img_size=int(swin["image_res"]), embed_dim=int(swin["embed_dim"]),
               depths=list(swin["depths"]), num_heads=list(swin["num_heads"]), window_size=int(swin["window_size"]),
               embed_width=EMBED_WIDTH, q2l_hidden_size=int(q2l["hidden_size"]),
               q2l_num_hidden_layers=int(q2l["num_hidden_layers"]),
               q2l_num_attention_heads=int(q2l["num_attention_heads"]),
               q2l_intermediate_size=int(q2l["intermediate_size"]),
               q2l_layer_norm_eps=float(q2l.get("layer_norm_eps", 1e-12)),
               q2l_hidden_dropout_prob=float(q2l.get("hidden_dropout_prob", 0.1)),
               q2l_attention_probs_dropout_prob=float(q2l.get("attention_probs_dropout_prob", 0.1)),
               drop_path_rate=drop_path_rate, lora_rank=lora_rank, lora_alpha=lora_alpha)


def _torch_load(path: Path) -> object:
    import torch

    if not Path(path).is_file():
        raise WeightsNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - pickle errors, unsafe globals, truncation
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{Path(path).name}: not a loadable checkpoint ({msg[:200]}); only plain tensor "
                              "dicts are accepted (weights_only)") from e


def read_ram_state_dict(path: PathLike) -> dict:
    """The RAM state dict of ``ram_swin_large_14m.pth`` (``{'model': sd}``; a bare state dict is accepted).

    Raises:
        WeightsNotFoundError, CheckpointError.
    """
    import torch

    d = _torch_load(Path(path))
    sd = d.get("model", d) if isinstance(d, dict) else None
    if not isinstance(sd, dict) or not any(isinstance(k, str) and k.startswith("visual_encoder.") for k in sd):
        raise CheckpointError(f"{Path(path).name}: not a RAM checkpoint (expected {{'model': state_dict}} with "
                              "visual_encoder.* keys)")
    if not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{Path(path).name}: the state dict holds non-tensor entries")
    return sd


def read_dape_state_dict(path: PathLike) -> dict:
    """The LoRA tensors of ``DAPE.pth`` (a flat dict of ``...lora_A`` / ``...lora_B``).

    Raises:
        WeightsNotFoundError, CheckpointError.
    """
    import torch

    d = _torch_load(Path(path))
    if isinstance(d, dict) and "params" in d and isinstance(d["params"], dict):
        d = d["params"]  # a BasicSR-style wrapper
    if not isinstance(d, dict) or not d or not all(
            isinstance(k, str) and "lora_" in k and isinstance(v, torch.Tensor) for k, v in d.items()):
        raise CheckpointError(f"{Path(path).name}: not a DAPE checkpoint (expected a dict of '...lora_A' / "
                              "'...lora_B' tensors)")
    return d


# ------------------------------------------------------------------------------------------- key mapping
#: Keys of the official checkpoint that the tagger does not use: the captioning branch (tag_encoder,
#: text_decoder), the buffers the official loader deletes and recomputes, and the zero-initialised condition
#: layers of ram.py's Swin.
_IGNORED_PREFIXES = ("tag_encoder.", "text_decoder.")
_IGNORED_PARTS = ("relative_position_index", "attn_mask", "condition_attention", "condition_ffn")


def _map_ram_key(key: str) -> Optional[str]:
    if key.startswith(_IGNORED_PREFIXES) or any(p in key for p in _IGNORED_PARTS):
        return None
    if key.startswith("vision_multi."):  # older checkpoints (the official loader renames the same way)
        key = "tagging_head." + key[len("vision_multi."):]
    if key.startswith("tagging_head.") and (key.startswith("tagging_head.embeddings.") or ".attention." in key):
        return None  # deleted officially (the tagging head has no embeddings and no self-attention)
    return key


def load_ram_weights(model, sd: dict, name: str = RAM_FILE) -> None:
    """Copy the official RAM state dict into ``model`` (LoRA parameters are left alone).

    Raises:
        CheckpointError: missing tensors, wrong shapes (e.g. a tag list of another length than
            ``label_embed``, or configs that do not match the weights).
    """
    own = {k: v for k, v in model.state_dict().items() if "lora_" not in k}
    mapped, unused = {}, []
    for key, value in sd.items():
        k = _map_ram_key(key)
        if k is None:
            continue
        if k not in own:
            unused.append(key)
            continue
        mapped[k] = value
    missing = sorted(set(own) - set(mapped))
    if missing:
        raise CheckpointError(f"{name}: {len(missing)} tensors missing (e.g. {missing[0]}): not the RAM Swin-L "
                              "checkpoint these configs describe")
    for k, v in mapped.items():
        if tuple(v.shape) != tuple(own[k].shape):
            hint = (" (the tag list has another length than the checkpoint's classes)" if k == "label_embed"
                    else " (the configs do not match the checkpoint)")
            raise CheckpointError(f"{name}: {k} has shape {tuple(v.shape)}, the model {tuple(own[k].shape)}{hint}")
    if unused:
        logger.info("%s: %d tensors not used by the tagger (e.g. %s)", name, len(unused), unused[0])
    model.load_state_dict(mapped, strict=False)


def _tied_tag_encoder_key(key: str, num_head_layers: int) -> Optional[str]:
    """The tagging-head key whose weight the official ``tie_encoder_decoder_weights`` shares with this
    ``tag_encoder`` cross-attention LoRA key, or ``None``."""
    prefix = "tag_encoder.encoder.layer."
    if not key.startswith(prefix):
        return None
    rest = key[len(prefix):]
    idx, _, tail = rest.partition(".")
    if not idx.isdigit() or int(idx) >= num_head_layers:
        return None
    if not tail.startswith(("crossattention.self.query.lora_", "crossattention.self.key.lora_")):
        return None
    return f"tagging_head.encoder.layer.{idx}.{tail}"


def apply_dape(model, lora_sd: dict, *, merge: bool = True, name: str = DAPE_FILE) -> None:
    """Load DAPE's LoRA tensors into a RAM built with ``lora_rank=8`` and merge them (``merge=True``).

    Official behaviour reproduced: the tagging head's query/key weights are tied to the (unused) tag encoder's
    cross-attention, whose own LoRA in ``DAPE.pth`` loralib also merges into the shared weight on ``eval()``.
    Those updates are therefore always added to the tagging head's base weights (in the released ``DAPE.pth``
    they are zero: that LoRA never receives a gradient). ``text_decoder`` LoRA tensors are unused.

    Raises:
        CheckpointError: a LoRA tensor is missing or has the wrong shape.
    """
    import torch

    from .ram_arch import LoRALinear

    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear) and m.has_lora}
    if not layers:
        raise CheckpointError("DAPE weights need a RAM built with LoRA (lora_rank=8)")
    n_head = len(model.tagging_head.encoder.layer)
    own, tied = {}, []
    for key, value in lora_sd.items():
        t = _tied_tag_encoder_key(key, n_head)
        if t is not None:
            tied.append((t, key, value))
        elif not key.startswith(_IGNORED_PREFIXES):
            own[key] = value
    expected = {f"{n}.lora_{x}": getattr(m, f"lora_{x}") for n, m in layers.items() for x in "AB"}
    missing = sorted(set(expected) - set(own))
    unknown = sorted(set(own) - set(expected))
    if missing or unknown:
        what = f"missing {missing[0]}" if missing else f"unexpected {unknown[0]}"
        raise CheckpointError(f"{name}: LoRA tensors do not fit RAM Swin-L ({what}; {len(missing)} missing, "
                              f"{len(unknown)} unexpected): not a DAPE checkpoint for this RAM")
    with torch.no_grad():
        for k, v in own.items():
            if tuple(v.shape) != tuple(expected[k].shape):
                raise CheckpointError(f"{name}: {k} has shape {tuple(v.shape)}, expected {tuple(expected[k].shape)}")
            expected[k].copy_(v)
        pairs: dict[str, dict] = {}
        for t, key, value in tied:
            pairs.setdefault(t.rsplit(".lora_", 1)[0], {})[key.rsplit(".", 1)[1]] = value
        for mod_name, ab in pairs.items():
            lin = layers[mod_name]
            if set(ab) != {"lora_A", "lora_B"}:
                raise CheckpointError(f"{name}: incomplete tag_encoder LoRA pair for {mod_name}")
            a, b = ab["lora_A"].float(), ab["lora_B"].float()
            if a.shape != lin.lora_A.shape or b.shape != lin.lora_B.shape:
                raise CheckpointError(f"{name}: tag_encoder LoRA for {mod_name} has the wrong shape")
            lin.weight.add_(((b @ a) * lin.lora_scaling).to(lin.weight.dtype))
    if merge:
        model.merge_lora()


def dape_state_dict(model) -> dict:
    """The LoRA tensors of a DAPE model in the official ``DAPE.pth`` layout (CPU, float32)."""
    return {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items() if "lora_" in k}


def load_ram_model(files: TaggerFiles, *, merge_lora: bool = True, lora_rank: Optional[int] = None):
    """Build RAM (plain or DAPE) from resolved files.

    Args:
        files: see :func:`find_tagger_files`.
        merge_lora: merge DAPE's LoRA into the weights (the official eval-mode model; faster).
        lora_rank: LoRA rank to build with (default: 8 for DAPE, 0 for plain RAM); a plain RAM with
            ``lora_rank=8`` starts DAPE training (fresh LoRA, loralib's init).

    Returns:
        ``(model, tag_names)``: the model in eval mode on the CPU (float32) and the tag list.

    Raises:
        WeightsNotFoundError, CheckpointError.
    """
    swin, q2l = read_configs(files)
    tags = read_tag_list(files.tag_list)
    if not tags:
        raise CheckpointError(f"{files.tag_list}: empty tag list")
    rank = lora_rank if lora_rank is not None else (DAPE_LORA_RANK if files.dape is not None else 0)
    model = build_ram(swin, q2l, len(tags), lora_rank=rank)
    load_ram_weights(model, read_ram_state_dict(files.ram), name=files.ram.name)
    if files.dape is not None:
        apply_dape(model, read_dape_state_dict(files.dape), merge=merge_lora, name=files.dape.name)
    return model.eval(), tags
