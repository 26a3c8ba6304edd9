"""``realisr train RECIPE [--set key=value ...]``: run a YAML training recipe.

One process: ``realisr train pisa-sr --set data.hq=[/data/hq]``. Many GPUs or nodes:
``accelerate launch --num_processes 4 -m realisr train pisa-sr ...`` (every process runs this command;
accelerate wires them together).
"""

from __future__ import annotations

import argparse
import json
import logging

__all__ = ["add_arguments", "run", "make_trainer"]

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="a recipe YAML file, or a built-in recipe: pisa-sr, osediff, tiny-cpu, "
                                       "ccsr-controlnet, ccsr, ccsr-stage2, ccsr-tiny-cpu, dape, dape-tiny-cpu, "
                                       "seesr, tiny-cpu-seesr, ea-adam, ea-adam-rrdb, ea-adam-tiny-cpu, realesrgan-fidelity")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe key (YAML value), e.g. --set train.max_steps=10; repeatable")
    parser.add_argument("--output-dir", help="shortcut for --set output_dir=DIR")
    parser.add_argument("--resume", nargs="?", const="latest", metavar="CKPT",
                        help="resume from 'latest' (default) or a checkpoints/step-N folder")
    parser.add_argument("--no-lpips", action="store_true",
                        help="train without the LPIPS loss (explicit; otherwise missing VGG weights are an error)")
    parser.add_argument("--print-recipe", action="store_true", help="print the resolved recipe as JSON and exit")


def make_trainer(cfg, callback=None):
    """The trainer for ``cfg.method`` (imports torch/diffusers)."""
    from realisr.errors import require

    if cfg.method == "ea-adam":
        require("accelerate", "train")
        from realisr.train.trainer_ea_adam import EAAdamTrainer

        return EAAdamTrainer(cfg, callback=callback)
    if cfg.method == "realesrgan-fidelity":
        require("accelerate", "train")
        from realisr.train.trainer_fidelity import FidelityTrainer

        return FidelityTrainer(cfg, callback=callback)
    if cfg.method == "dape":
        require("accelerate", "train")
        from realisr.train.trainer_dape import DAPETrainer

        return DAPETrainer(cfg, callback=callback)
    for module in ("accelerate", "diffusers", "peft", "transformers"):
        require(module, "train")
    if cfg.method == "pisa-sr":
        from realisr.train.trainer_pisa_sr import PiSASRTrainer

        return PiSASRTrainer(cfg, callback=callback)
    if cfg.method == "ccsr":
        from realisr.train.trainer_ccsr import CCSRTrainer

        return CCSRTrainer(cfg, callback=callback)
    if cfg.method == "seesr":
        from realisr.train.trainer_seesr import SeeSRTrainer

        return SeeSRTrainer(cfg, callback=callback)
    from realisr.train.trainer_osediff import OSEDiffTrainer

    return OSEDiffTrainer(cfg, callback=callback)


def run(args: argparse.Namespace) -> int:
    from realisr.errors import require

    require("yaml", "train")
    from realisr.train.config import load_recipe, recipe_to_dict

    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"output_dir={args.output_dir}")
    if args.resume:
        overrides.append(f"train.resume={args.resume}")
    if args.no_lpips:
        overrides.append("loss.lpips=0")
    cfg = load_recipe(args.recipe, overrides)
    if args.print_recipe:
        print(json.dumps(recipe_to_dict(cfg), indent=1))
        return 0
    from realisr.progress import TqdmProgress

    callback = _MainProcessOnly(TqdmProgress(disable=bool(getattr(args, "quiet", False))))
    summary = make_trainer(cfg, callback).train()
    if callback.enabled and not getattr(args, "quiet", False):
        where = summary.get("checkpoint") or summary.get("delta") or summary.get("model")
        print(f"realisr train: {cfg.method} finished at step {summary['step']} "
              f"({summary['steps_per_s']:.3g} steps/s); output: {where}")
    return 0


class _MainProcessOnly:
    """Show progress bars on the local main process only (accelerate runs one CLI per process)."""

    def __init__(self, inner):
        import os

        self.inner = inner
        self.enabled = os.environ.get("LOCAL_RANK", "0") == "0"

    def __call__(self, event) -> None:
        if self.enabled:
            self.inner(event)
