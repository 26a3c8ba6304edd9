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
    "fidelity": "fidelity",
}
SAMPLE_PREFIX = "sample:"


def add_arguments(p) -> None:
    g = p.add_argument_group("input / output")
    g.add_argument("-i", "--input", nargs="+", required=True, metavar="PATH",
                   help="image files, folders or glob patterns; 'sample:NAME' takes a photo bundled with "
                        "scikit-image (e.g. sample:astronaut, sample:coffee)")
    g.add_argument("-o", "--output", default="results",
                   help="output folder (default: results), or an output file when there is one input")
    g.add_argument("--recursive", action="store_true", help="descend into sub-folders (kept in the output)")
    g.add_argument("--ext", default="auto", choices=["auto", "png", "jpg", "webp", "tif", "bmp"],
                   help="output format; auto keeps the input's format where it can be written (default)")
    g.add_argument("--suffix", default="out", help="suffix of output names: NAME_SUFFIX.EXT (default: out)")
    g.add_argument("--overwrite", action="store_true", help="replace existing outputs (default: skip them)")
    g.add_argument("--max-pixels", type=int, default=None,
                   help="refuse inputs with more pixels than this (decompression-bomb guard; default 100 MP or "
                        "$REALISR_MAX_PIXELS; 0 = no limit)")
    g = p.add_argument_group("model")
    g.add_argument("-m", "--model", default="auto",
                   help="registry id (see `realisr models`) or checkpoint path; auto: pisa-sr when its weights "
                        "are found, else the offline default realesrgan-x4plus")
    g.add_argument("-s", "--outscale", type=float, default=None,
                   help="final scale relative to the input, any float (default: the model's native scale)")
    g.add_argument("-t", "--tile", type=int, default=None,
                   help="tile size in input pixels; 0 disables tiling (default: chosen from free memory)")
    g.add_argument("--tile-pad", type=int, default=None, help="context around each tile in pixels")
    g.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                   help="auto: fp32 on CPU, half precision on CUDA where the model supports it")
    g.add_argument("--fp32", action="store_true", help="same as --dtype fp32")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: best available)")
    g.add_argument("--seed", type=int, default=None, help="seed for pipelines that sample")
    g.add_argument("--fidelity", default=None, metavar="F|MAP",
                   help="fidelity dial of models with a fidelity delta (realesrgan-x4plus): 0 = the released GAN "
                        "model (default), 1 = realisr's L1-tuned weights, in between = weight-space "
                        "interpolation; or a grey image file as a per-pixel map (white = 1)")
    g = p.add_argument_group("diffusion models (pisa-sr, osediff)")
    g.add_argument("--sd", default=None,
                   help="SD-2.1-base: local diffusers folder or hub id (default: $REALISR_SD, then the HF cache)")
    g.add_argument("--lambda-pix", type=float, default=None, help="PiSA-SR pixel-fidelity dial (default 1.0)")
    g.add_argument("--lambda-sem", type=float, default=None, help="PiSA-SR semantic-detail dial (default 1.0)")
    g.add_argument("--lambda-grid", default=None, metavar="VALUES",
                   help="PiSA-SR: render a grid of dial settings from one pair of UNet passes, e.g. "
                        "'0,0.5,1,1.5' (both dials) or '0,1;0.5,1,1.5' (pix values;sem values)")
    g.add_argument("--prompt", default=None, help="OSEDiff prompt text")
    g.add_argument("--color-fix", default=None, choices=["adain", "wavelet", "none"], help="colour fix")
    g.add_argument("--process-size", type=int, default=None, help="diffusion processing size (default 512)")
    g.add_argument("--resize-mode", default=None, choices=["official", "pad"],
                   help="official: resize to a multiple of 8 as the official scripts; pad: pad and crop")
    g.add_argument("--latent-tile", type=int, default=None, help="latent tile size (default 96)")
    g.add_argument("--latent-overlap", type=int, default=None, help="latent tile overlap (default 32)")
    g.add_argument("--vae-tile", type=int, default=None, help="VAE tile size in pixels (default: automatic)")


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


def _parse_fidelity(text: str, pipe):
    """``--fidelity``: a number, or a grey image file read as a per-pixel map."""
    from realisr.errors import RealisrError

    if not getattr(pipe, "fidelity_available", False):
        raise RealisrError(f"--fidelity needs a model with a fidelity dial (realesrgan-x4plus), not {pipe.spec.id}")
    try:
        return float(text)
    except ValueError:
        pass
    path = Path(text).expanduser()
    if not path.is_file():
        raise RealisrError(f"--fidelity {text!r}: give a number in [0, 1] or a grey image file (a per-pixel map)")
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("L").copy()


def _fmt(v: float) -> str:
    return f"{v:g}"


def _render_grid(cells: dict, pix: list[float], sem: list[float]):
    """A labelled contact sheet: rows = lambda_pix, columns = lambda_sem."""
    import numpy as np
    from PIL import Image, ImageDraw

    first = next(iter(cells.values()))
    h, w = first.shape[:2]
    thumb_w = min(w, 384)
    thumb_h = max(1, round(h * thumb_w / w))
    label = 18
    sheet = Image.new("RGB", (len(sem) * thumb_w, len(pix) * (thumb_h + label)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, lp in enumerate(pix):
        for c, ls in enumerate(sem):
            arr = np.clip(np.rint(cells[(lp, ls)] * 255), 0, 255).astype(np.uint8)
            tile = Image.fromarray(arr[..., :3] if arr.shape[2] >= 3 else arr[..., 0]).convert("RGB")
            tile = tile.resize((thumb_w, thumb_h), Image.LANCZOS)
            y = r * (thumb_h + label)
            sheet.paste(tile, (c * thumb_w, y + label))
            draw.text((c * thumb_w + 4, y + 3), f"pix {_fmt(lp)}  sem {_fmt(ls)}", fill="black")
    return sheet


def run(args) -> int:
    import numpy as np

    from realisr.api import load_pipeline, resolve_model_id
    from realisr.errors import RealisrError
    from realisr.io import ImageData, read_image, write_image
    from realisr.progress import TqdmProgress, report

    quiet = getattr(args, "quiet", False)
    inputs = collect_inputs(args.input, args.recursive)
    if not inputs:
        print("realisr upscale: no images found in the given inputs", file=sys.stderr)
        return 1
    out_root = Path(args.output).expanduser()
    single = len(inputs) == 1
    dtype = "fp32" if args.fp32 else args.dtype
    model_id = resolve_model_id(args.model)
    if args.model == "auto":
        print(f"realisr: using model {model_id} (-m auto: "
              + ("PiSA-SR weights found)" if model_id == "pisa-sr" else
                 "PiSA-SR weights not found, offline default)"), file=sys.stderr)
    grid = _parse_grid(args.lambda_grid) if args.lambda_grid else None
    ctor = {}
    if args.sd is not None:
        ctor["sd"] = args.sd
    pipe = load_pipeline(model_id, device=args.device, dtype=dtype, **ctor)
    call = {v: getattr(args, k) for k, v in METHOD_OPTIONS.items() if getattr(args, k, None) is not None}
    if "fidelity" in call:
        call["fidelity"] = _parse_fidelity(call["fidelity"], pipe)
    accepted = _accepted_call_args(pipe)
    bad = sorted(k for k in call if k not in accepted)
    if bad:
        raise RealisrError(f"{', '.join('--' + b.replace('_', '-') for b in bad)} not supported by model "
                           f"{pipe.spec.id}")
    if grid and not hasattr(pipe, "redial"):
        raise RealisrError(f"--lambda-grid needs a model with the PiSA-SR dials (-m pisa-sr), not {pipe.spec.id}")
    if grid:
        call["keep_predictions"] = True
    elif hasattr(pipe, "fuse_lora") and all(call.get(k, 1.0) == 1.0 for k in ("lambda_pix", "lambda_sem")):
        pipe.fuse_lora()  # every call is PiSA-SR's default mode: one plain UNet pass, the semantic LoRA merged
    generator = None
    if args.seed is not None:
        import torch

        generator = torch.Generator().manual_seed(args.seed)
    progress = TqdmProgress(disable=quiet)
    written = skipped = 0
    failures: list[tuple[Path, str]] = []
    t0 = time.perf_counter()
    report(progress, "files", 0, len(inputs))
    for i, (src, rel) in enumerate(inputs):
        dst = output_path(src, rel, out_root, args.suffix, args.ext, single)
        targets = [dst] if not grid else [dst.with_name(dst.stem + "_grid.png")]
        if not args.overwrite and all(t.exists() for t in targets):
            skipped += 1
            logger.info("skip %s: %s exists", src, targets[0])
            report(progress, "files", i + 1, len(inputs), src.name)
            continue
        try:
            data = read_image(src, **({"max_pixels": args.max_pixels} if args.max_pixels is not None else {}))
            out = pipe(data, outscale=args.outscale, tile=args.tile, tile_pad=args.tile_pad, callback=progress,
                       generator=generator, **call)
            if grid:
                pix, sem = grid
                state = out.extras["redial_state"]
                cells = {}
                for lp in pix:
                    for ls in sem:
                        o = pipe.redial(state, lambda_pix=lp, lambda_sem=ls, outscale=args.outscale)
                        cells[(lp, ls)] = o.image.pixels
                        cell_path = dst.with_name(f"{dst.stem}_pix{_fmt(lp)}_sem{_fmt(ls)}{dst.suffix}")
                        write_image(cell_path, o.image, overwrite=True,
                                    fmt=None if args.ext == "auto" else args.ext)
                sheet = _render_grid(cells, pix, sem)
                arr = np.asarray(sheet, dtype=np.float32) / 255.0
                write_image(targets[0], ImageData(pixels=arr), overwrite=True)
            else:
                write_image(dst, out.image, overwrite=args.overwrite, fmt=None if args.ext == "auto" else args.ext)
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
    print(f"realisr: {len(inputs)} image(s) with {pipe.spec.id}: {written} written, {skipped} skipped{hint}, "
          f"{len(failures)} failed, {secs:.1f} s -> {out_root}")
    for src, why in failures:
        print(f"  failed: {src}: {why}", file=sys.stderr)
    return 1 if failures else 0
