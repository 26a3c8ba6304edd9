"""realisr: real-world image super-resolution on diffusion priors, with a fidelity/perception dial.

``import realisr`` is light: torch, diffusers and the rest are imported when first used.

    >>> import realisr
    >>> pipe = realisr.load_pipeline("realesrgan-x4plus")
    >>> out = pipe(pil_image, outscale=2)
    >>> out.to_pil().save("out.png")
"""

from __future__ import annotations

import logging

__version__ = "0.1.0"
__all__ = ["load_pipeline", "upscale", "list_models", "read_image", "write_image", "ProgressEvent",
           "RealisrError", "__version__"]

logging.getLogger(__name__).addHandler(logging.NullHandler())

_LAZY = {
    "load_pipeline": ("realisr.api", "load_pipeline"),
    "upscale": ("realisr.api", "upscale"),
    "list_models": ("realisr.registry", "list_models"),
    "read_image": ("realisr.io.image_io", "read_image"),
    "write_image": ("realisr.io.image_io", "write_image"),
    "ProgressEvent": ("realisr.progress", "ProgressEvent"),
    "RealisrError": ("realisr.errors", "RealisrError"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'realisr' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
