"""Batch restoration beyond one process: ``torchrun`` / ``accelerate launch`` processes (:mod:`.launch`),
Ray Data clusters (:func:`upscale_dataset`), and the journal that makes both resumable (:mod:`.journal`).

Nothing heavy is imported here: ``ray`` only when :func:`upscale_dataset` runs (``pip install 'realisr[ray]'``).
See ``docs/scale.md``.
"""

from __future__ import annotations

__all__ = ["upscale_dataset", "Journal", "ProcessGroup"]

_LAZY = {
    "upscale_dataset": ("realisr.distributed.ray_data", "upscale_dataset"),
    "Journal": ("realisr.distributed.journal", "Journal"),
    "ProcessGroup": ("realisr.distributed.launch", "ProcessGroup"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'realisr.distributed' has no attribute {name!r}")
