"""CCSR weights: the official v2 release folders, and conversion of the v1 checkpoint into the same layout.

**v2** (csslc/CCSR, branch ``CCSR-v2.0``; Google Drive links in its README) ships diffusers folders::

    <release>/controlnet/   config.json + diffusion_pytorch_model.safetensors (or .bin)   the stage-1 ControlNet
    <release>/vae/          config.json + weights                                        the stage-2 VAE

The ControlNet is diffusers' ``ControlNetModel`` with ``use_vae_encode_condition=true`` and a
``condition_conv_in`` tensor pair instead of the pixel hint encoder
(:class:`realisr.arch.ccsr_controlnet_arch.CCSRControlNetModel`). The UNet, text encoder, tokenizer and
scheduler are SD-2.1-base's (:mod:`realisr.models.backbone`).

Where the release folder is looked for, in order:

1. ``weights=`` (API) / ``--ccsr PATH_OR_ID`` (CLI): a local folder, or a Hugging Face hub id (its HF cache
   snapshot, else a download of ``controlnet/*`` and ``vae/*`` when online);
2. the checkpoints folder: ``$REALISR_WEIGHTS/ccsr`` (else ``<cache>/checkpoints/ccsr``); ``ccsr-v1`` for v1.

**v1** ships ``real-world_ccsr.ckpt``: one PyTorch-Lightning state dict of the whole ``ControlLDM``
(``model.diffusion_model.*`` the SD UNet, ``control_model.*`` the ControlNet whose first conv takes
``concat(x_t, c_latent)``, ``cond_encoder.{encoder,quant_conv}.*`` the condition VAE encoder,
``first_stage_model.*`` the VAE with the GAN-fine-tuned decoder, ``cond_stage_model.*`` OpenCLIP). It is read
with ``torch.load(weights_only=True)`` only and converted by :func:`convert_v1_checkpoint` into the v2 layout
plus ``unet/``:

* ``controlnet/``: the ControlNet; the first conv's 8 input channels are split into ``conv_in`` (x_t, with the
  bias) and ``condition_conv_in`` (c_latent, zero bias): ``conv(cat(x, c)) = conv_x(x) + conv_c(c)``, exact.
* ``vae/``: encoder + ``quant_conv`` from ``cond_encoder`` (what v1 encodes the condition with), decoder +
  ``post_quant_conv`` from ``first_stage_model`` (the fine-tuned decoder);
* ``unet/``: ``model.diffusion_model``; ``ccsr_v1.json`` marks the folder as v1.

The text encoder is SD-2.1-base's (v1 froze the same OpenCLIP ViT-H and only ever encodes ``""``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Optional

from ..errors import CheckpointError, WeightsNotFoundError

logger = logging.getLogger(__name__)

__all__ = [
    "RELEASE_PARTS",
    "V1_MARKER",
    "CCSRWeights",
    "missing_release_parts",
    "resolve_ccsr_weights",
    "load_ccsr_weights",
    "save_ccsr_release",
    "write_release_parts",
    "read_v1_checkpoint",
    "is_v1_state_dict",
    "convert_v1_state_dict",
    "convert_v1_checkpoint",
    "weights_status",
    "SD21_UNET_CONFIG",
    "SD21_VAE_CONFIG",
]

RELEASE_PARTS = ("controlnet", "vae")
V1_MARKER = "ccsr_v1.json"
_URL_V2 = "https://github.com/csslc/CCSR/tree/CCSR-v2.0 (README: controlnet/ and vae/ Google Drive folders)"
_URL_V1 = "https://github.com/csslc/CCSR (README: real-world_ccsr.ckpt)"

#: stabilityai/stable-diffusion-2-1-base unet/config.json and vae/config.json (the v1 conversion's default).
SD21_UNET_CONFIG = dict(
    sample_size=64, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1,
    act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20],
    use_linear_projection=True, dual_cross_attention=False, upcast_attention=False)
SD21_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32, act_fn="silu",
    block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4, sample_size=768, scaling_factor=0.18215)


class CCSRWeights:
    """Loaded CCSR components (fp32, CPU, eval mode, frozen).

    Attributes:
        controlnet: :class:`~realisr.arch.ccsr_controlnet_arch.CCSRControlNetModel`.
        vae: the stage-2 ``AutoencoderKL`` (used for encoding the condition and for decoding).
        unet: the v1 UNet (``None`` for v2: SD-2.1-base's is used).
        version: ``"v2"`` or ``"v1"``.
        source: where they were read from.
    """

    def __init__(self, controlnet, vae, unet=None, version: str = "v2", source: str = ""):
        self.controlnet, self.vae, self.unet, self.version, self.source = controlnet, vae, unet, version, source


# ------------------------------------------------------------------------------------------------------------
# finding and loading the release folders
def _has_weights(sub: Path) -> bool:
    return (sub / "config.json").is_file() and any(
        p.suffix in (".safetensors", ".bin") for p in sub.glob("diffusion_pytorch_model*") if p.is_file())


def missing_release_parts(folder, version: str = "v2") -> list[str]:
    """The parts of a CCSR release folder that are missing (``"controlnet/"``, ``"vae/"``; v1 also
    ``"unet/"``); an empty list when complete."""
    folder = Path(folder)
    parts = RELEASE_PARTS + (("unet",) if version == "v1" else ())
    return [p + "/" for p in parts if not _has_weights(folder / p)]


def _howto(version: str) -> str:
    if version == "v1":
        return (f"convert real-world_ccsr.ckpt ({_URL_V1}) with `realisr convert real-world_ccsr.ckpt "
                "DIR` and pass --ccsr DIR (or put DIR at <checkpoints>/ccsr-v1); see docs/ccsr.md")
    return (f"download controlnet/ and vae/ from {_URL_V2} into one folder and pass --ccsr DIR "
            "(or put it at <checkpoints>/ccsr); see docs/ccsr.md")


def _default_folder(version: str) -> Path:
    from .cache import checkpoints_dir

    return checkpoints_dir() / ("ccsr-v1" if version == "v1" else "ccsr")


def _looks_like_hub_id(text: str) -> bool:
    return text.count("/") == 1 and not text.startswith((".", "/", "~")) and not Path(text).exists()


def resolve_ccsr_weights(weights=None, version: str = "v2", *, download: bool = True) -> Path:
    """The folder holding the CCSR release (``controlnet/``, ``vae/``; v1 also ``unet/``).

    Args:
        weights: a local folder or a hub id; ``None``: the checkpoints folder (``<checkpoints>/ccsr`` or
            ``ccsr-v1``).
        version: ``"v2"`` or ``"v1"``.
        download: allow a hub download (only for a hub id, only when ``HF_HUB_OFFLINE`` is not set).

    Raises:
        WeightsNotFoundError: not found, incomplete (the message names the missing parts) or not downloadable.
    """
    what = "CCSR-v1" if version == "v1" else "CCSR"
    if weights is not None and _looks_like_hub_id(str(weights)):
        from .cache import find_hf_snapshot

        snap = find_hf_snapshot(str(weights))
        if snap is not None and not missing_release_parts(snap, version):
            return snap
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        if not download or offline:
            raise WeightsNotFoundError(f"{what} weights {weights} are not in the HF cache and downloads are off: "
                                       + _howto(version))
        try:
            from huggingface_hub import snapshot_download

            parts = RELEASE_PARTS + (("unet",) if version == "v1" else ())
            path = Path(snapshot_download(str(weights), allow_patterns=[f"{p}/*" for p in parts]))
        except Exception as e:  # noqa: BLE001 - any hub failure is "not available"
            raise WeightsNotFoundError(f"{what} weights {weights} could not be downloaded "
                                       f"({type(e).__name__}): {_howto(version)}") from e
        missing = missing_release_parts(path, version)
        if missing:
            raise WeightsNotFoundError(f"{what} hub repo {weights} lacks {', '.join(missing)}: {_howto(version)}")
        return path
    folder = Path(weights).expanduser() if weights is not None else _default_folder(version)
    origin = "weights" if weights is not None else "the checkpoints folder"
    if not folder.is_dir():
        raise WeightsNotFoundError(f"{what} weights folder {folder} ({origin}) does not exist: {_howto(version)}")
    missing = missing_release_parts(folder, version)
    if missing:
        raise WeightsNotFoundError(f"{what} weights folder {folder} is missing {', '.join(missing)}: "
                                   + _howto(version))
    return folder


def folder_version(folder) -> str:
    """``"v1"`` for a folder written by :func:`convert_v1_checkpoint`, else ``"v2"``."""
    return "v1" if (Path(folder) / V1_MARKER).is_file() else "v2"


def load_ccsr_weights(folder, version: Optional[str] = None) -> CCSRWeights:
    """Load the ControlNet and VAE (and the v1 UNet) of a resolved release folder.

    Raises:
        CheckpointError: a part that is not what CCSR needs (a plain ControlNet, a non-KL VAE, bad shapes).
    """
    from diffusers import AutoencoderKL

    from ..arch.ccsr_controlnet_arch import CCSRControlNetModel

    folder = Path(folder)
    version = version or folder_version(folder)
    cfg_path = folder / "controlnet" / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{cfg_path}: unreadable ControlNet config ({e})") from e
    if not cfg.get("use_vae_encode_condition", False):
        raise CheckpointError(f"{cfg_path}: not a CCSR ControlNet (use_vae_encode_condition is not true): "
                              "use the controlnet/ folder of the CCSR-v2 release")
    try:
        controlnet = CCSRControlNetModel.from_pretrained(str(folder / "controlnet"))
        vae = AutoencoderKL.from_pretrained(str(folder / "vae"))
        unet = None
        if version == "v1":
            from diffusers import UNet2DConditionModel

            unet = UNet2DConditionModel.from_pretrained(str(folder / "unet"))
    except (OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"cannot load the CCSR weights in {folder}: {str(e).splitlines()[0]}") from e
    for m in (controlnet, vae, unet):
        if m is not None:
            m.requires_grad_(False).eval()
    logger.info("CCSR %s weights loaded from %s", version, folder)
    return CCSRWeights(controlnet, vae, unet, version, str(folder))


def check_compatible(controlnet, unet, what: str = "CCSR") -> None:
    """The ControlNet must fit the UNet it steers (channels, cross-attention width, latent channels).

    Raises:
        CheckpointError: naming the first mismatch.
    """
    c, u = controlnet.config, unet.config
    for key in ("block_out_channels", "cross_attention_dim", "in_channels", "layers_per_block"):
        a, b = c.get(key), u.get(key)
        if (list(a) if isinstance(a, (list, tuple)) else a) != (list(b) if isinstance(b, (list, tuple)) else b):
            raise CheckpointError(f"{what}: the ControlNet's {key} ({a}) does not fit the UNet's ({b}): use the "
                                  "SD-2.1-base backbone the ControlNet was trained on")


def write_release_parts(folder, *, controlnet=None, vae=None, unet=None, marker: Optional[dict] = None) -> None:
    """Write components into an existing folder in the release layout (no atomic rename; see
    :func:`save_ccsr_release`)."""
    folder = Path(folder)
    if controlnet is not None:
        controlnet.save_pretrained(str(folder / "controlnet"), safe_serialization=True)
        cfg_path = folder / "controlnet" / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["_class_name"] = "ControlNetModel"
        cfg["use_vae_encode_condition"] = True
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    if vae is not None:
        vae.save_pretrained(str(folder / "vae"), safe_serialization=True)
    if unet is not None:
        unet.save_pretrained(str(folder / "unet"), safe_serialization=True)
    if marker is not None:
        (folder / V1_MARKER).write_text(json.dumps(marker, indent=1) + "\n")


def save_ccsr_release(folder, *, controlnet, vae, unet=None, marker: Optional[dict] = None) -> Path:
    """Write components in the official release layout (diffusers folders, safetensors), atomically.

    The ControlNet's ``config.json`` names ``ControlNetModel`` with ``use_vae_encode_condition: true``, as the
    official files do, so the folders load in the official code too.
    """
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write_release_parts(tmp, controlnet=controlnet, vae=vae, unet=unet, marker=marker)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


# ------------------------------------------------------------------------------------------------------------
# v1 conversion
_V1_PREFIXES = ("model.diffusion_model.", "control_model.", "cond_encoder.", "first_stage_model.")


def read_v1_checkpoint(path) -> dict:
    """The state dict of a CCSR-v1 ``.ckpt`` (``torch.load(weights_only=True)``; Lightning's ``state_dict``).

    Raises:
        WeightsNotFoundError: no such file. CheckpointError: unreadable, needs code execution, not v1.
    """
    import pickle

    import torch

    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsNotFoundError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "unsupported content"
        raise CheckpointError(f"{path.name} holds Python objects beyond tensors and cannot be loaded safely "
                              f"({first[:160]}): save its 'state_dict' alone where you trust the file") from e
    except Exception as e:  # noqa: BLE001 - a broken file
        raise CheckpointError(f"{path.name} is not a readable PyTorch checkpoint ({type(e).__name__})") from e
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict) or not is_v1_state_dict(sd):
        raise CheckpointError(f"{path.name} is not a CCSR-v1 checkpoint (needs model.diffusion_model.*, "
                              "control_model.*, cond_encoder.* and first_stage_model.* tensors)")
    return sd


def is_v1_state_dict(sd: dict) -> bool:
    """Whether a state dict has the CCSR-v1 ``ControlLDM`` layout."""
    keys = [k for k in sd if isinstance(k, str)]
    return all(any(k.startswith(p) for k in keys) for p in _V1_PREFIXES) and "control_model.input_blocks.0.0.weight" in sd


def _load_strict(module, state: dict, what: str) -> None:
    try:
        missing, unexpected = module.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        lines = [ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln]
        raise CheckpointError(f"CCSR-v1 {what}: tensors do not fit the model ({lines[0] if lines else 'bad shapes'}; "
                              f"{len(lines)} mismatches): is the backbone config right?") from None
    if missing or unexpected:
        bad = (f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}")
        raise CheckpointError(f"CCSR-v1 {what}: the converted tensors do not fit the model ({bad}; "
                              f"{len(missing)} missing, {len(unexpected)} unexpected): is the backbone config right?")


def convert_v1_state_dict(sd: dict, unet_config: Optional[dict] = None, vae_config: Optional[dict] = None):
    """Convert a CCSR-v1 state dict into ``(unet, controlnet, vae)`` diffusers modules (fp32, CPU).

    Args:
        sd: the ``ControlLDM`` state dict (:func:`read_v1_checkpoint`).
        unet_config, vae_config: diffusers configs of the backbone (default: SD-2.1-base's).

    Raises:
        CheckpointError: missing tensors, shapes that do not fit the configs, or a non-finite tensor.
    """
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (convert_controlnet_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint)

    from ..arch.ccsr_controlnet_arch import CCSRControlNetModel

    unet_config = {k: v for k, v in dict(unet_config or SD21_UNET_CONFIG).items() if not k.startswith("_")}
    vae_config = {k: v for k, v in dict(vae_config or SD21_VAE_CONFIG).items() if not k.startswith("_")}
    for k, v in sd.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point() and not torch.isfinite(v).all():
            raise CheckpointError(f"CCSR-v1 checkpoint: {k} contains NaN/inf values")
    sd = {k: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in sd.items()}

    unet = UNet2DConditionModel(**unet_config)
    _load_strict(unet, convert_ldm_unet_checkpoint(sd, unet.config), "UNet")

    first = sd["control_model.input_blocks.0.0.weight"]
    lat = unet.config.in_channels
    if first.ndim != 4 or first.shape[1] != 2 * lat:
        raise CheckpointError(f"CCSR-v1 control_model.input_blocks.0.0.weight has shape {tuple(first.shape)}: "
                              f"expected [C, {2 * lat}, 3, 3] (x_t and c_latent concatenated)")
    ctrl_sd = convert_controlnet_checkpoint(sd, dict(unet.config))
    ctrl_sd = {k: v for k, v in ctrl_sd.items() if v is not None and not k.startswith("controlnet_cond_embedding")}
    w = ctrl_sd.pop("conv_in.weight")
    ctrl_sd["conv_in.weight"] = w[:, :lat].contiguous()
    ctrl_sd["condition_conv_in.weight"] = w[:, lat:].contiguous()
    ctrl_sd["condition_conv_in.bias"] = torch.zeros_like(ctrl_sd["conv_in.bias"])
    controlnet = CCSRControlNetModel.from_unet(unet)
    _load_strict(controlnet, ctrl_sd, "ControlNet")

    dec = {k: v for k, v in sd.items() if k.startswith(("first_stage_model.decoder.", "first_stage_model.post_quant_conv."))}
    enc = {"first_stage_model." + k[len("cond_encoder."):]: v for k, v in sd.items()
           if k.startswith(("cond_encoder.encoder.", "cond_encoder.quant_conv."))}
    if not dec or not enc:
        raise CheckpointError("CCSR-v1 checkpoint lacks first_stage_model.decoder.* or cond_encoder.encoder.* tensors")
    vae = AutoencoderKL(**vae_config)
    _load_strict(vae, convert_ldm_vae_checkpoint({**enc, **dec}, vae.config), "VAE")
    for m in (unet, controlnet, vae):
        m.requires_grad_(False).eval()
    return unet, controlnet, vae


def convert_v1_checkpoint(src, dst, *, sd=None) -> Path:
    """``real-world_ccsr.ckpt`` -> a release folder (``controlnet/ vae/ unet/`` + ``ccsr_v1.json``).

    Args:
        src: the v1 ``.ckpt``.
        dst: the output folder (replaced atomically).
        sd: SD-2.1-base folder/hub id whose ``unet``/``vae`` configs to use (default: SD-2.1-base's configs).

    Raises:
        WeightsNotFoundError, CheckpointError.
    """
    unet_cfg = vae_cfg = None
    if sd is not None:
        from ..models.backbone import resolve_sd

        folder, source = resolve_sd(sd, components=("unet", "vae"))
        if folder is None:
            raise WeightsNotFoundError(f"SD backbone {source} is not available locally: pass a local folder as --sd")
        unet_cfg = json.loads((folder / "unet" / "config.json").read_text())
        vae_cfg = json.loads((folder / "vae" / "config.json").read_text())
    state = read_v1_checkpoint(src)
    unet, controlnet, vae = convert_v1_state_dict(state, unet_cfg, vae_cfg)
    marker = {"format": "realisr-ccsr-v1", "source": Path(src).name,
              "note": "converted from the CCSR-v1 ControlLDM checkpoint; text encoder: SD-2.1-base's"}
    out = save_ccsr_release(dst, controlnet=controlnet, vae=vae, unet=unet, marker=marker)
    logger.info("CCSR-v1 %s converted to %s", src, out)
    return out


# ------------------------------------------------------------------------------------------------------------
# registry hook
def weights_status(spec) -> tuple[bool, str]:
    """``(available, detail)`` for ``ccsr`` / ``ccsr-v1``: the release folder and the SD backbone (no network)."""
    from ..models.backbone import backbone_status

    version = spec.options.get("version", "v2")
    comps = ("text_encoder", "tokenizer", "scheduler") + (() if version == "v1" else ("unet",))
    ok_sd, sd_detail = backbone_status(components=comps)
    try:
        folder = resolve_ccsr_weights(None, version, download=False)
    except WeightsNotFoundError as e:
        return False, f"{e}; {sd_detail if not ok_sd else 'SD backbone found'}"
    if not ok_sd:
        return False, f"CCSR weights {folder} found, but {sd_detail}"
    return True, f"{folder}; {sd_detail}"
