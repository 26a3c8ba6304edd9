"""``realisr`` entry point: dispatches to sub-command modules lazily and turns user errors into one line.

A sub-command module defines ``add_arguments(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import sys
from typing import Optional, Sequence

__all__ = ["main", "COMMANDS"]

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "upscale": ("realisr.cli.upscale", "restore and upscale images (files, folders, globs)"),
    "models": ("realisr.cli.models", "list registered models and whether their weights are available"),
    "convert": ("realisr.cli.convert", "convert an official checkpoint (.pkl) or a bundled ncnn model to safetensors"),
    "bench": ("realisr.cli.bench", "benchmark methods on paired or unpaired folders (metrics + report)"),
    "bench-data": ("realisr.cli.bench_data", "build the offline real-photo benchmark"),
    "metrics": ("realisr.cli.metrics", "list metrics and whether their weights are available"),
    "weights": ("realisr.cli.weights", "list the weight files you bring; `weights fetch NAME` downloads and verifies"),
    "degrade": ("realisr.cli.degrade", "make LQ images from HQ images with the Real-ESRGAN degradation"),
    "train": ("realisr.cli.train", "train from a YAML recipe (run under `accelerate launch` for many GPUs)"),
    "tag": ("realisr.cli.tag", "print the RAM / DAPE tags of images (the prompt of OSEDiff and SeeSR)"),
    "serve": ("realisr.cli.serve", "web app with live dials (Gradio; realisr[ui])"),
    "study": ("realisr.cli.study", "blind pairwise user studies: create, serve, results (Bradley-Terry)"),
}


def _available_commands() -> dict[str, tuple[str, str]]:
    return {k: v for k, v in COMMANDS.items() if importlib.util.find_spec(v[0]) is not None}


def common_options() -> argparse.ArgumentParser:
    """The parent parser of ``-v``/``-q``: give it to every (sub-)sub-parser so they work after any command word
    (SUPPRESS: a sub-parser must not reset the value the main parser read)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                        help="more log output (-vv: debug)")
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="no progress bars, errors only")
    return common


def build_parser() -> argparse.ArgumentParser:
    from realisr import __version__

    common = common_options()
    parser = argparse.ArgumentParser(prog="realisr", description="Real-world image super-resolution.",
                                     parents=[common])
    parser.add_argument("--version", action="version", version=f"realisr {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_) in _available_commands().items():
        p = sub.add_parser(name, help=help_, description=help_, parents=[common])
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    import importlib.util  # noqa: F401  (used by _available_commands)

    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    args.quiet = getattr(args, "quiet", False)
    args.verbose = getattr(args, "verbose", 0)
    level = logging.ERROR if args.quiet else (logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    module = importlib.import_module(COMMANDS[args.command][0])
    from realisr.errors import RealisrError

    try:
        return int(module.run(args) or 0)
    except RealisrError as e:
        print(f"realisr {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
