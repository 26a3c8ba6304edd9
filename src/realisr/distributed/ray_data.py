"""Batch restoration on a Ray cluster with Ray Data (``pip install 'realisr[ray]'``).

The job's items (input path, output path) become a Ray Dataset; ``map_batches`` runs them through a pool of
model actors (:class:`UpscaleActor`): each actor loads one pipeline (``num_gpus`` per actor: 1 for the diffusion
models, a fraction for the small GAN models so that several share a GPU), reads each input's *bytes* and
decodes them with realisr's own reader (Ray's image reader drops ICC profiles, EXIF, 16-bit depth and alpha),
and writes with realisr's atomic writer, through the same :class:`realisr.batch.BatchRunner` as the CLI and
torchrun. Outputs go to a file system every node sees (a shared or network folder).

Every actor journals what it finished (:mod:`realisr.distributed.journal`), so a job whose driver or workers
were killed resumes where it stopped when it is run again; failed images come back as results with their
reasons, never dropped. The driver shows the combined progress and returns the combined
:class:`realisr.batch.BatchSummary`.

    >>> from realisr.distributed import upscale_dataset
    >>> summary = upscale_dataset(["s3-mounted/photos/"], "/shared/out", model="realesrgan-x4plus",
    ...                           address="auto", recursive=True)
"""

from __future__ import annotations

import logging
import os
import socket
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

from ..batch import BatchItem, BatchRunner, BatchSettings, BatchSummary, ItemResult, plan_items, summarise

logger = logging.getLogger(__name__)

__all__ = ["upscale_dataset", "run_ray_job", "UpscaleActor", "default_gpus_per_worker"]

_COLUMNS = ("src", "dst", "status", "reason", "seconds", "worker")


def default_gpus_per_worker(model: str) -> float:
    """GPUs per actor by default: 0 for interpolation, 0.25 for feed-forward (GAN) models, 1 for the rest."""
    from ..registry import REGISTRY

    spec = REGISTRY.get(model)
    if spec is not None:
        if spec.family == "interpolation":
            return 0.0
        return 0.25 if ".gan." in spec.pipeline else 1.0
    path = Path(model).expanduser()
    if path.suffix.lower() == ".pkl":
        return 1.0
    from ..weights.official import is_official_safetensors

    return 1.0 if path.exists() and is_official_safetensors(path) else 0.25


class UpscaleActor:
    """A Ray Data callable class: one pipeline per actor, one :class:`~realisr.batch.BatchRunner`.

    Args:
        settings: the job's settings.
        out_root: the output folder (holds the journal).
        journal: journal every result (resume).
    """

    def __init__(self, settings: BatchSettings, out_root: str, journal: bool = True):
        self.worker = f"ray-{socket.gethostname()}-{os.getpid()}"
        self.runner = BatchRunner(settings, worker=self.worker)
        self.runner.load()  # Ray sets CUDA_VISIBLE_DEVICES to this actor's GPU: "auto" finds it as cuda:0
        self.journal = None
        if journal:
            from .journal import Journal

            self.journal = Journal(out_root, settings.job_key_fields(), worker=self.worker)

    def __call__(self, batch: dict) -> dict:
        out: dict = {k: [] for k in _COLUMNS}
        for src, dst in zip(batch["src"], batch["dst"]):
            item = BatchItem(str(src), str(dst))
            if self.journal is not None:
                self.journal.start(item.src, str(self.runner.targets(item)[0]))
            data, reason = _read_bytes(item.src)
            if reason is not None:
                r = ItemResult(item.src, item.dst, "failed", reason, 0.0, self.worker)
            else:
                r = self.runner.process(item, data=data)
            if self.journal is not None:
                self.journal.record(r)
            for k in _COLUMNS:
                v = getattr(r, k)
                out[k].append("" if v is None else v)
        return out


def _read_bytes(path: str):
    """``(bytes, None)`` or ``(None, one-line reason)``."""
    try:
        with open(path, "rb") as fh:
            return fh.read(), None
    except FileNotFoundError:
        return None, f"input image not found: {path}"
    except OSError as e:
        return None, f"cannot read input image {path}: {e.strerror or e}"


def _init_ray(address: Optional[str]):
    from ..errors import require

    ray = require("ray", "ray")
    if not logger.isEnabledFor(logging.INFO):  # Ray's own INFO lines only with -v
        for name in ("ray", "ray.data"):
            logging.getLogger(name).setLevel(logging.WARNING)
    if ray.is_initialized():
        return ray, False
    kw: dict = {"log_to_driver": logger.isEnabledFor(logging.DEBUG)}
    if address not in (None, "", "local"):
        kw["address"] = address
    ray.init(**kw)
    return ray, True


def run_ray_job(items: Sequence[BatchItem], settings: BatchSettings, out_root, *, address: Optional[str] = None,
                workers: Optional[int] = None, gpus_per_worker: Optional[float] = None,
                cpus_per_worker: float = 1.0, journal: bool = True,
                callback: Optional[Callable] = None) -> BatchSummary:
    """Run a job's items on Ray (see the module docstring).

    Args:
        items: the job's items (output paths on a file system every node sees).
        settings: the job's settings (pickled to each actor).
        out_root: the output folder (holds the journal).
        address: ``ray.init`` address (``"auto"``, ``"HOST:6379"``, ``"ray://HOST:10001"``); ``None`` /
            ``"local"``: ``RAY_ADDRESS`` or a local instance. Ignored when Ray is already initialised.
        workers: model actors (default: as many as the cluster's GPUs hold at ``gpus_per_worker`` each, or one
            per ``cpus_per_worker`` CPUs without GPUs; never more than the images).
        gpus_per_worker: GPUs per actor (default :func:`default_gpus_per_worker`; 0 on a cluster without GPUs).
        cpus_per_worker: CPUs per actor.
        journal: journal the results (resume after a kill, also with ``overwrite``).
        callback: progress callback (``files`` events for the whole job).

    Returns:
        :class:`~realisr.batch.BatchSummary` of the whole job.

    Raises:
        MissingExtraError: Ray is not installed. RealisrError: the job stopped (the message says why; what was
        finished is journaled and a re-run resumes).
    """
    from ..errors import RealisrError
    from ..progress import report

    t0 = time.perf_counter()
    ray, own = _init_ray(address)
    try:
        import ray.data

        resources = ray.cluster_resources()
        gpus_total = float(resources.get("GPU", 0))
        gpus = default_gpus_per_worker(settings.model) if gpus_per_worker is None else float(gpus_per_worker)
        if gpus_total == 0:
            if gpus_per_worker:
                raise RealisrError(f"--gpus-per-worker {gpus_per_worker:g}: the Ray cluster has no GPUs")
            gpus = 0.0
        jr = None
        done: set = set()
        if journal:
            from .journal import Journal

            jr = Journal(out_root, settings.job_key_fields(), worker="driver")  # reads only
            done = jr.finished()
            jr.remove_partial_outputs()
        todo = [it for it in items if it.src not in done]
        resumed = len(items) - len(todo)
        report(callback, "files", resumed, len(items))
        n_workers = 0
        results: list[ItemResult] = []
        if todo:
            ctx = ray.data.DataContext.get_current()
            ctx.enable_progress_bars = False  # realisr reports the progress
            if workers is None:
                workers = int(gpus_total // gpus) if gpus else int(float(resources.get("CPU", 1)) // cpus_per_worker)
            n_workers = max(1, min(int(workers), len(todo)))
            logger.info("Ray: %d actor(s), %g GPU and %g CPU each, %d image(s)", n_workers, gpus, cpus_per_worker,
                        len(todo))
            ds = ray.data.from_items([{"src": it.src, "dst": it.dst} for it in todo],
                                     override_num_blocks=min(len(todo), 4 * n_workers))
            ds = ds.map_batches(UpscaleActor, fn_constructor_kwargs={"settings": settings, "out_root": str(out_root),
                                                                      "journal": journal},
                                batch_size=1, compute=ray.data.ActorPoolStrategy(size=n_workers), num_gpus=gpus,
                                num_cpus=cpus_per_worker)
            try:
                for row in ds.iter_rows():
                    results.append(ItemResult(**{k: row[k] for k in _COLUMNS}))
                    report(callback, "files", resumed + len(results), len(items), Path(row["src"]).name)
            except Exception as e:  # an actor died, the cluster went away: what finished is journaled
                msg = " ".join(str(e).split())[:300]
                raise RealisrError(f"the Ray job stopped ({type(e).__name__}: {msg}); finished images are "
                                   "journaled: run the same command again to resume") from None
        for r in results:
            if r.reason == "":
                r.reason = None
        records = jr.records() if jr is not None else results
        from ..batch import _counts

        summary = summarise(records, items, resumed=resumed, seconds=time.perf_counter() - t0,
                            workers=max(1, n_workers), run_counts=_counts(results))
        if jr is not None and not summary.missing:
            jr.finish()
        return summary
    finally:
        if own:
            ray.shutdown()


def upscale_dataset(inputs: Sequence[str], output: str, model: str = "auto", *, address: Optional[str] = None,
                    workers: Optional[int] = None, gpus_per_worker: Optional[float] = None,
                    cpus_per_worker: float = 1.0, recursive: bool = False, suffix: str = "out", ext: str = "auto",
                    device: Optional[str] = None, dtype: str = "auto", outscale: Optional[float] = None,
                    tile: Optional[int] = None, tile_pad: Optional[int] = None, seed: Optional[int] = None,
                    quality: Optional[int] = None, overwrite: bool = False, max_pixels: Optional[int] = None,
                    load_args: Optional[dict] = None, callback: Optional[Callable] = None,
                    **call_args) -> BatchSummary:
    """Restore files, folders or globs on a Ray cluster, resumably (the API of ``realisr upscale --ray``).

    Args:
        inputs: files, folders, globs (as ``realisr upscale -i``), on a file system every node sees.
        output: the output folder (shared by the nodes).
        model: registry id, checkpoint path or ``"auto"``.
        address, workers, gpus_per_worker, cpus_per_worker: see :func:`run_ray_job`.
        recursive, suffix, ext: input expansion and output names, as the CLI.
        device, dtype, load_args: how each actor loads the pipeline (``load_args``: e.g. ``{"sd": path}``).
        outscale, tile, tile_pad, seed: the shared call arguments (``seed``: per-image generator).
        quality, overwrite, max_pixels: as the CLI's ``--quality``, ``--overwrite``, ``--max-pixels``.
        callback: progress callback.
        **call_args: method arguments (``lambda_pix=0.5``, ``prompt="..."``, ``color_fix="wavelet"``, ...).

    Returns:
        :class:`~realisr.batch.BatchSummary`: counts, failures with their reasons, inputs left undone.
    """
    from ..api import resolve_model_id

    plan = plan_items(inputs, output, recursive=recursive, suffix=suffix, ext=ext)
    load_args = dict(load_args or {})
    settings = BatchSettings(model=resolve_model_id(model, sd=load_args.get("sd")), device=device, dtype=dtype,
                             load_args=load_args, call_args=call_args, outscale=outscale, tile=tile,
                             tile_pad=tile_pad, seed=seed, quality=quality, overwrite=overwrite,
                             max_pixels=max_pixels, fmt=None if ext == "auto" else ext)
    return run_ray_job(plan.items, settings, plan.out_root, address=address, workers=workers,
                       gpus_per_worker=gpus_per_worker, cpus_per_worker=cpus_per_worker,
                       journal=not plan.single_file, callback=callback)
