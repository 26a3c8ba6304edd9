"""``realisr convert IN OUT``: convert an official diffusion checkpoint (``pisa_sr.pkl`` / ``osediff.pkl``) to
safetensors (or back to ``.pkl``). The file is read with ``torch.load(weights_only=True)`` and validated; the
converted file loads exactly like the original (``-m OUT.safetensors`` is not a registry id, so pass it as
``checkpoint=`` or put it next to where the ``.pkl`` would be: ``pisa_sr.safetensors`` is found too)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="official checkpoint: pisa_sr.pkl or osediff.pkl (or a converted .safetensors)")
    parser.add_argument("output", help="output file: .safetensors (or .pkl)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")


def run(args) -> int:
    from ..errors import OutputExistsError
    from ..weights.official import convert_checkpoint

    out = Path(args.output)
    if out.exists() and not args.overwrite:
        raise OutputExistsError(f"{out} exists: pass --overwrite to replace it")
    method, path = convert_checkpoint(args.input, out)
    logger.info("converted %s checkpoint %s -> %s", method, args.input, path)
    print(f"{method}: {args.input} -> {path}")
    return 0
