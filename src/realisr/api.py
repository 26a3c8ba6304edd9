"""The public entry points: :func:`load_pipeline`, :func:`upscale`, :func:`list_models`."""

from __future__ import annotations

import logging
from pathlib import Path
from .errors import UnknownModelError
from .registry import get_spec, list_models

logger = logging.getLogger(__name__)

__all__ = ["load_pipeline", "upscale", "list_models", "resolve_model_id", "OFFLINE_DEFAULT"]

OFFLINE_DEFAULT = "realesrgan-x4plus"


def resolve_model_id(model: str, sd=None) -> str:
    """Resolve ``"auto"``: ``pisa-sr`` when its checkpoint and SD backbone are found locally (``sd``: the
    backbone given with ``--sd``; default ``REALISR_SD``, then the HF cache), else the offline GAN default."""
    if model != "auto":
        return model
    from .registry import REGISTRY

    if "pisa-sr" in REGISTRY:
        from .weights.status import weights_status

        ok, _why = weights_status(REGISTRY["pisa-sr"], sd=sd)
        if ok:
            return "pisa-sr"
    return OFFLINE_DEFAULT


def load_pipeline(model: str = "auto", *, device=None, dtype=None, **kwargs):
    """Load a pipeline by registry id or checkpoint path.

    Args:
        model: a registry id (see ``realisr models``), ``"auto"``, or a path to a checkpoint (any
            spandrel-supported ``.pth``/``.safetensors``, an official ``.pkl`` of a diffusion method, or a
            CCSR release folder holding ``controlnet/`` and ``vae/``).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ... (default: the best available).
        dtype: ``"auto"`` (fp32 on CPU, half precision on CUDA where safe), ``"fp32"``, ``"fp16"``, ``"bf16"``.
        **kwargs: passed to the pipeline's constructor (e.g. ``sd=`` for diffusion pipelines).

    Returns:
        A pipeline: call it as ``pipe(image, outscale=..., tile=...)``.

    Raises:
        UnknownModelError: neither a registered id nor an existing file.
        WeightsNotFoundError: the weights are not available here (the message says how to get them).
    """
    model_id = resolve_model_id(str(model), sd=kwargs.get("sd"))
    path = Path(model_id).expanduser()
    from .registry import REGISTRY

    if model_id not in REGISTRY and path.is_dir() and (path / "controlnet").is_dir():
        from .weights.ccsr import folder_version

        spec = get_spec("ccsr-v1" if folder_version(path) == "v1" else "ccsr")  # a CCSR release folder
        return spec.pipeline_class().from_spec(spec, device=device, dtype=dtype, weights=str(path), **kwargs)
    if model_id not in REGISTRY and path.suffix and path.exists():
        from .weights.official import is_official_safetensors

        if path.suffix.lower() == ".pkl" or is_official_safetensors(path):
            from .weights.official import pipeline_from_official_checkpoint

            return pipeline_from_official_checkpoint(path, device=device, dtype=dtype, **kwargs)
        from .pipelines.gan.pipeline_gan import GANPipeline

        return GANPipeline.from_file(path, device=device, dtype=dtype, **kwargs)
    if model_id not in REGISTRY and (path.suffix or "/" in model_id):
        raise UnknownModelError(f"model file not found: {model_id}")
    spec = get_spec(model_id)
    logger.info("loading %s (%s)", spec.id, spec.description)
    return spec.pipeline_class().from_spec(spec, device=device, dtype=dtype, **kwargs)


def _loader_arguments(model: str, sd=None) -> set:
    """Names ``load_pipeline(model, ...)`` takes (the pipeline's ``from_spec`` and constructor arguments)."""
    import inspect

    from .registry import REGISTRY, get_spec

    model_id = resolve_model_id(str(model), sd=sd)
    if model_id in REGISTRY:
        classes = [REGISTRY[model_id].pipeline_class()]
    else:
        path = Path(model_id).expanduser()
        from .weights.official import is_official_safetensors

        if path.suffix.lower() == ".pkl" or is_official_safetensors(path):
            classes = [get_spec(m).pipeline_class() for m in ("pisa-sr", "osediff") if m in REGISTRY]
        else:
            from .pipelines.gan.pipeline_gan import GANPipeline

            classes = [GANPipeline]
    names = {"device", "dtype"}
    for cls in classes:
        for fn in (cls.from_spec, cls.__init__):
            for prm in inspect.signature(fn).parameters.values():
                if prm.kind in (prm.KEYWORD_ONLY, prm.POSITIONAL_OR_KEYWORD) and prm.name not in ("self", "spec"):
                    names.add(prm.name)
    return names


def upscale(image, model: str = "auto", **kwargs):
    """One-shot convenience: load the pipeline and call it once. Prefer keeping the pipeline for several images.

    Args:
        image: as for a pipeline call.
        model: as for :func:`load_pipeline`.
        **kwargs: loading arguments (``device``, ``dtype``, ``sd``, ``checkpoint``, ...) go to
            :func:`load_pipeline`; everything else (``outscale``, ``tile``, ``lambda_pix``, ``prompt``, ...) to
            the call, e.g. ``realisr.upscale(img, "pisa-sr", lambda_pix=0.5)``.

    Returns:
        :class:`~realisr.pipelines.base.SROutput`.
    """
    load_keys = _loader_arguments(model, kwargs.get("sd"))
    load = {k: kwargs.pop(k) for k in list(kwargs) if k in load_keys}
    return load_pipeline(model, **load)(image, **kwargs)
