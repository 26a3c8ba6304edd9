"""The public entry points: :func:`load_pipeline`, :func:`upscale`, :func:`list_models`."""

from __future__ import annotations

import logging
from pathlib import Path
from .errors import UnknownModelError
from .registry import get_spec, list_models

logger = logging.getLogger(__name__)

__all__ = ["load_pipeline", "upscale", "list_models", "resolve_model_id", "OFFLINE_DEFAULT"]

OFFLINE_DEFAULT = "realesrgan-x4plus"


def resolve_model_id(model: str) -> str:
    """Resolve ``"auto"``: ``pisa-sr`` when its weights are found locally, else the offline GAN default."""
    if model != "auto":
        return model
    from .registry import REGISTRY

    if "pisa-sr" in REGISTRY:
        from .weights.status import weights_status

        ok, _why = weights_status(REGISTRY["pisa-sr"])
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
    model_id = resolve_model_id(str(model))
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


def upscale(image, model: str = "auto", **kwargs):
    """One-shot convenience: ``load_pipeline(model)(image, **kwargs)``. Prefer keeping the pipeline for
    several images."""
    call_keys = {"outscale", "tile", "tile_pad", "callback", "generator"}
    call = {k: kwargs.pop(k) for k in list(kwargs) if k in call_keys}
    return load_pipeline(model, **kwargs)(image, **call)
