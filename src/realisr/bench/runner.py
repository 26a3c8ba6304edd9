"""``realisr bench``: run methods on a folder of LQ images, measure them against HQ images (or with
no-reference metrics only), and write ``results.csv``, ``summary.json`` and ``report.html``.

Layout of the output folder (everything is resumable: a rerun reuses what is there)::

    OUT/sr/<setting-slug>/<image>.png     SR outputs (8-bit PNG, what the metrics see); run 0 (seed S)
    OUT/sr/<setting-slug>/seed-<S+k>/<image>.png   run k of a stochastic method with ``--seeds N`` (k >= 1)
    OUT/sr/<setting-slug>/setting.json    the method setting and seconds per image
    OUT/metrics_cache.json                per-image metric values keyed by SR file identity
    OUT/results.csv  OUT/summary.json  OUT/report.html

SR outputs are quantised to 8 bits and written before any metric is computed, as the papers' scripts
measure saved PNGs.

Stability (``seeds = N > 1``, CCSR's protocol, :mod:`realisr.metrics.stability`): a stochastic method (its
pipeline's ``is_stochastic``, e.g. ``ccsr``, or ``sample_posterior=True``) runs N times per image with seeds
``S, S+1, ..., S+N-1``; every per-image metric is reported as the mean over images and runs with its G-STD
(mean over images of the population std over runs), plus L-STD (per-pixel population std over runs, 4-pixel
border cropped, averaged), and the best and worst run of each image (by PSNR, else the first metric).
Deterministic methods run once and are reported as such (``rerun_deterministic`` runs them N times anyway,
e.g. to see GPU non-determinism). Set-level metrics (FID) use run 0.
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import logging
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from ..errors import InputImageError, RealisrError
from ..progress import ProgressEvent, report
from .methods import MethodSetting, parse_methods

logger = logging.getLogger(__name__)

__all__ = ["BenchConfig", "ImagePair", "run_benchmark", "pair_images", "list_images", "read_rgb"]

_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
_LQ_SUFFIX = re.compile(r"([_-]?(lr|lq|x\d+|lr\d+|lrx\d+|input))$", re.I)
_HQ_SUFFIX = re.compile(r"([_-]?(hr|hq|gt|x1|target))$", re.I)


@dataclass(frozen=True)
class ImagePair:
    name: str
    lq: Path
    hq: Optional[Path] = None


@dataclass
class BenchConfig:
    """What to run. See :func:`run_benchmark`."""

    lq_dir: Path
    out_dir: Path
    methods: Sequence[str]
    hq_dir: Optional[Path] = None
    metrics: Optional[Sequence[str]] = None
    border: int = 0
    pair_by: str = "name"
    limit: Optional[int] = None
    device: Optional[str] = None
    dtype: Optional[str] = None
    tile: Optional[int] = None
    seed: int = 0
    seeds: int = 1
    rerun_deterministic: bool = False
    report: bool = True
    crops: int = 8
    metric_device: Optional[str] = None
    extra: dict = field(default_factory=dict)


def list_images(folder: Path) -> list[Path]:
    """Image files directly in ``folder``, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputImageError(f"not a folder: {folder}")
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in _EXTS)


def _norm(stem: str, pattern) -> str:
    return pattern.sub("", stem).lower()


def pair_images(lq_dir: Path, hq_dir: Optional[Path] = None, pair_by: str = "name") -> tuple[list[ImagePair], list[str]]:
    """Match LQ and HQ files.

    Args:
        lq_dir: folder of inputs.
        hq_dir: folder of references (``None``: no-reference benchmark).
        pair_by: ``"name"``: same stem, else the same stem once LR/HR tags are dropped (``_LR4``, ``x4``,
            ``_HR``, ``_gt``...); ``"order"``: sorted order (the OSEDiff scripts' rule; counts must match).

    Returns:
        ``(pairs, problems)``: problems are LQ files without a reference (they are left out).

    Raises:
        InputImageError: a folder is missing or holds no images.
    """
    lqs = list_images(lq_dir)
    if not lqs:
        raise InputImageError(f"no images in {lq_dir}")
    if hq_dir is None:
        return [ImagePair(p.stem, p) for p in lqs], []
    hqs = list_images(hq_dir)
    if not hqs:
        raise InputImageError(f"no images in {hq_dir}")
    if pair_by == "order":
        if len(lqs) != len(hqs):
            raise InputImageError(f"--pair-by order needs as many HQ as LQ images ({len(hqs)} vs {len(lqs)})")
        return [ImagePair(lq.stem, lq, hq) for lq, hq in zip(lqs, hqs)], []
    by_stem = {p.stem: p for p in hqs}
    by_norm = {}
    for p in hqs:
        by_norm.setdefault(_norm(p.stem, _HQ_SUFFIX), p)
    pairs, problems = [], []
    for lq in lqs:
        hq = by_stem.get(lq.stem) or by_norm.get(_norm(lq.stem, _LQ_SUFFIX))
        if hq is None:
            problems.append(f"{lq.name}: no HQ image with a matching name in {hq_dir}")
        else:
            pairs.append(ImagePair(lq.stem, lq, hq))
    return pairs, problems


def read_rgb(path: Path) -> np.ndarray:
    """An image as RGB: uint8 ``[H, W, 3]`` for 8-bit files (exact, what basicsr-style metrics expect),
    float32 in ``[0, 1]`` otherwise. Grey is replicated; alpha is dropped."""
    from ..io.image_io import read_image

    data = read_image(path)
    px = data.pixels
    if px.shape[2] == 1:
        px = np.repeat(px, 3, axis=2)
    if data.bit_depth == 8:
        return np.clip(np.rint(px * 255.0), 0, 255).astype(np.uint8)
    return px.astype(np.float32)


def _save_png(path: Path, rgb_float: np.ndarray) -> None:
    from PIL import Image

    arr = np.clip(np.rint(rgb_float * 255.0), 0, 255).astype(np.uint8)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.stem + ".", suffix=".png.tmp", dir=path.parent)
    os.close(fd)
    try:
        Image.fromarray(arr[..., :3], "RGB").save(tmp, "PNG")
        _commit(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _commit(tmp: str, path: Path) -> None:
    """Give a ``mkstemp`` file (mode 0600) the usual mode, then move it into place atomically."""
    os.chmod(tmp, _umask_mode())
    os.replace(tmp, path)


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1, default=_json_default)
    _commit(tmp, path)


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o).__name__)


def _file_id(p: Path) -> str:
    st = p.stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


def _one_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg}" if not isinstance(e, RealisrError) else msg


# -- the SR stage -----------------------------------------------------------------------------------------
def setting_is_stochastic(setting: MethodSetting) -> bool:
    """Whether a setting's output depends on the seed (asks the pipeline class; no weights are loaded)."""
    from ..registry import REGISTRY, get_spec

    spec = REGISTRY.get(setting.model)
    path = Path(setting.model)
    if spec is None and path.is_dir() and (path / "controlnet").is_dir():  # a CCSR release folder
        spec = get_spec("ccsr")
    if spec is None:
        return False
    try:
        return bool(spec.pipeline_class().is_stochastic(spec, **setting.call_kwargs))
    except Exception:  # noqa: BLE001 - an unloadable pipeline fails later, with its reason
        return False


def n_runs(setting: MethodSetting, cfg: BenchConfig) -> int:
    """How many runs per image a setting gets."""
    if cfg.seeds > 1 and (cfg.rerun_deterministic or setting_is_stochastic(setting)):
        return int(cfg.seeds)
    return 1


def sr_path(cfg: BenchConfig, setting: MethodSetting, name: str, run: int = 0) -> Path:
    """Where run ``run`` (seed ``cfg.seed + run``) of a setting's output on image ``name`` is stored."""
    folder = cfg.out_dir / "sr" / setting.slug
    return folder / f"{name}.png" if run == 0 else folder / f"seed-{cfg.seed + run}" / f"{name}.png"


def _run_method(setting: MethodSetting, pairs: list[ImagePair], cfg: BenchConfig, failures: list,
                callback, step: list, total: int, runs: int = 1) -> dict:
    """Produce (or reuse) every SR output of one setting. Returns ``{name: seconds}`` of this and earlier runs
    (run 0)."""
    folder = cfg.out_dir / "sr" / setting.slug
    meta_path = folder / "setting.json"
    meta = {}
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            meta = {}
    seconds: dict = dict(meta.get("seconds", {}))
    tags: dict = dict(meta.get("tags", {}))  # image -> the tag string a tagging method used (OSEDiff's DAPE)
    todo = [(p, k) for p in pairs for k in range(runs) if not sr_path(cfg, setting, p.name, k).is_file()]
    pipe = None
    if todo:
        try:
            from ..api import load_pipeline

            load_kwargs = dict(setting.load_kwargs)
            load_kwargs.setdefault("device", cfg.device)
            if cfg.dtype:
                load_kwargs.setdefault("dtype", cfg.dtype)
            pipe = load_pipeline(setting.model, **load_kwargs)
        except Exception as e:  # noqa: BLE001 - any failure of one method must not stop the others
            msg = _one_line(e)
            logger.warning("%s: cannot load: %s", setting.label, msg)
            for p in dict.fromkeys(p for p, _k in todo):
                failures.append({"method": setting.label, "image": p.name, "stage": "load", "error": msg})
            step[0] += len(pairs)
            report(callback, "bench", step[0], total, f"{setting.label}: load failed")
            return seconds
    for p in pairs:
        for k in range(runs):
            out = sr_path(cfg, setting, p.name, k)
            if out.is_file() or pipe is None:
                continue
            try:
                lq = read_rgb(p.lq)
                lq_f = lq.astype(np.float32) / 255.0 if lq.dtype == np.uint8 else lq
                kwargs = dict(setting.call_kwargs)
                if cfg.tile is not None:
                    kwargs.setdefault("tile", cfg.tile)
                import torch

                gen = torch.Generator().manual_seed(cfg.seed + k)
                t0 = time.perf_counter()
                res = pipe(lq_f, generator=gen, **kwargs)
                if k == 0:
                    seconds[p.name] = time.perf_counter() - t0
                    if res.info.get("tags") is not None:
                        tags[p.name] = res.info["tags"]
                _save_png(out, res.image.pixels)
            except Exception as e:  # noqa: BLE001 - per-image failures are listed, not fatal
                msg = _one_line(e)
                logger.warning("%s on %s (seed %d) failed: %s", setting.label, p.name, cfg.seed + k, msg)
                failures.append({"method": setting.label, "image": p.name, "stage": "upscale", "error": msg,
                                 "seed": cfg.seed + k})
        step[0] += 1
        report(callback, "bench", step[0], total, f"{setting.label}: {p.name}")
    _write_json(meta_path, {"setting": setting.to_json(), "seconds": seconds, "tags": tags})
    return seconds


def _method_tags(folder: Path) -> dict:
    """image -> tag string recorded by :func:`_run_method` (empty for untagged methods)."""
    try:
        return dict(json.loads((folder / "setting.json").read_text()).get("tags", {}))
    except (OSError, ValueError):
        return {}


# -- the metric stage -------------------------------------------------------------------------------------
def _build_metrics(ids: Sequence[str], paired: bool, cfg: BenchConfig) -> tuple[dict, dict, dict]:
    """``(per_image {id: Metric}, set_level {id: SetMetric}, info {id: {...available, detail}})``."""
    from ..metrics.registry import MetricUnavailableError, create_metric, get_metric_spec, metric_status

    per, sets, info = {}, {}, {}
    for mid in ids:
        spec = get_metric_spec(mid)
        entry = {"label": spec.label, "higher_is_better": spec.higher_is_better, "kind": spec.kind,
                 "color_space": spec.color_space, "backend": spec.backend, "convention": spec.convention,
                 "border": cfg.border}
        if spec.needs_reference and not paired:
            entry.update(available=False, detail="needs HQ references (--hq)")
            info[mid] = entry
            continue
        try:
            m = create_metric(mid, border=cfg.border, device=cfg.metric_device)
        except MetricUnavailableError as e:
            st = metric_status(spec)
            entry.update(available=False, detail=st.detail if st.missing else str(e),
                         missing=[list(x) for x in st.missing])
            info[mid] = entry
            logger.debug("%s", e)  # said once before the run (_preflight)
            continue
        except Exception as e:  # noqa: BLE001 - a broken metric must not stop the run
            entry.update(available=False, detail=_one_line(e))
            info[mid] = entry
            logger.warning("%s unavailable: %s", mid, _one_line(e))
            continue
        entry.update(available=True, detail="")
        info[mid] = entry
        (per if m.per_image else sets)[mid] = m
    return per, sets, info


def _output_scale(setting: MethodSetting) -> Optional[float]:
    """The SR/LQ size ratio of a setting when it is known without loading the model."""
    from ..registry import REGISTRY

    if setting.call_kwargs.get("outscale") is not None:
        return float(setting.call_kwargs["outscale"])
    spec = REGISTRY.get(setting.model)
    return float(spec.scale) if spec is not None else None


def _image_size(path: Path) -> Optional[tuple[int, int]]:
    from PIL import Image

    try:
        with Image.open(path) as im:  # reads the header only
            return im.size
    except OSError:
        return None


def _preflight(settings, pairs, metric_ids, paired: bool, cfg: BenchConfig) -> None:
    """Say once, before any work, which metrics will be unavailable and which images are too small for NIQE."""
    from ..metrics.niqe_core import niqe_min_size
    from ..metrics.registry import get_metric_spec, metric_status

    for mid in metric_ids:
        spec = get_metric_spec(mid)
        if spec.needs_reference and not paired:
            logger.warning("%s needs HQ references (--hq): not measured", mid)
            continue
        st = metric_status(spec)
        if not st.available:
            logger.warning("%s is unavailable: %s", mid, st.detail)
    niqe_ids = [m for m in metric_ids if get_metric_spec(m).factory.endswith(":NIQEMetric")]
    if not niqe_ids:
        return
    min_h, min_w = niqe_min_size(border=cfg.border)
    small, example = 0, None
    for p in pairs:
        size = _image_size(p.lq)
        if size is None:
            continue
        for s in settings:
            scale = _output_scale(s)
            if scale is None:
                continue
            w, h = round(size[0] * scale), round(size[1] * scale)
            if min(h, w) < min_h or max(h, w) < min_w:  # NIQE needs two 96x96 blocks (either orientation)
                small += 1
                example = example or f"{p.name}: {w}x{h} from {s.label}"
    if small:
        logger.warning("%s needs SR images of at least %dx%d pixels (two 96x96 blocks%s): %d of %d outputs are "
                       "smaller (e.g. %s) and get no %s value", "/".join(niqe_ids), min_w, min_h,
                       f" after the {cfg.border}-pixel crop" if cfg.border else "", small,
                       len(pairs) * len(settings), example, "/".join(niqe_ids))


def run_benchmark(cfg: BenchConfig, callback: Optional[Callable[[ProgressEvent], None]] = None) -> dict:
    """Run a benchmark and write its CSV, JSON and HTML report.

    Args:
        cfg: folders, methods (``-m`` specifications, see :mod:`realisr.bench.methods`), metrics (default:
            all full-reference + no-reference metrics when HQ is given, no-reference ones otherwise), border
            crop, limits, device.
        callback: progress callback (stages ``bench`` and ``metrics``).

    Returns:
        The summary (also written to ``summary.json``).

    Raises:
        InputImageError: a folder is missing or empty, or no LQ image has a reference.
        MethodSpecError: a ``-m`` specification is malformed.
    """
    from ..metrics.registry import DEFAULT_FULL_REFERENCE, DEFAULT_NO_REFERENCE, get_metric_spec

    t_start = time.time()
    cfg.out_dir = Path(cfg.out_dir)
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    settings = parse_methods(list(cfg.methods))
    pairs, problems = pair_images(Path(cfg.lq_dir), Path(cfg.hq_dir) if cfg.hq_dir else None, cfg.pair_by)
    if cfg.limit:
        pairs = pairs[: cfg.limit]
    if not pairs:
        raise InputImageError("no LQ image has a matching HQ image: check the names or use --pair-by order")
    paired = cfg.hq_dir is not None
    metric_ids = list(cfg.metrics) if cfg.metrics else list(DEFAULT_FULL_REFERENCE if paired else DEFAULT_NO_REFERENCE)
    for mid in metric_ids:
        get_metric_spec(mid)  # unknown ids fail before any work
    failures: list = [{"method": "-", "image": s.split(":")[0], "stage": "pairing", "error": s} for s in problems]
    _preflight(settings, pairs, metric_ids, paired, cfg)

    # 1. SR outputs (cached)
    total = len(settings) * len(pairs)
    step = [0]
    report(callback, "bench", 0, total, "upscaling")
    seconds = {}
    runs = {s.slug: n_runs(s, cfg) for s in settings}
    for s in settings:
        seconds[s.slug] = _run_method(s, pairs, cfg, failures, callback, step, total, runs[s.slug])

    # 2. metrics (cached per SR file)
    per, sets, minfo = _build_metrics(metric_ids, paired, cfg)
    cache_path = cfg.out_dir / "metrics_cache.json"
    try:
        cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    except (OSError, ValueError):
        cache = {}
    rows = []
    set_values: dict = {}
    mtotal = len(settings) * len(pairs)
    report(callback, "metrics", 0, mtotal, "measuring")
    k = 0
    hq_cache: dict = {}
    for s in settings:
        for m in sets.values():
            m.reset()
        n_set = 0
        tags = _method_tags(cfg.out_dir / "sr" / s.slug)
        for p, run in ((p, r) for p in pairs for r in range(runs[s.slug])):
            k += 1 if run == 0 else 0
            sr_file = sr_path(cfg, s, p.name, run)
            row = {"method": s.label, "model": s.model, "settings": json.dumps(s.call_kwargs, sort_keys=True),
                   "image": p.name, "seed": cfg.seed + run, "run": run,
                   "seconds": seconds[s.slug].get(p.name) if run == 0 else None}
            if p.name in tags:
                row["tags"] = tags[p.name]
            if not sr_file.is_file():
                report(callback, "metrics", k, mtotal, f"{s.label}: {p.name}")
                continue
            key = f"{s.slug}/{p.name}" + (f"@seed{cfg.seed + run}" if run else "")
            fid_ = _file_id(sr_file) + (("|" + _file_id(p.hq)) if p.hq else "")
            entry = cache.get(key, {})
            if entry.get("_id") != fid_:
                entry = {"_id": fid_}
            sr = read_rgb(sr_file)
            hq = None
            if p.hq is not None:
                if p.name not in hq_cache:
                    hq_cache = {p.name: read_rgb(p.hq)}  # keep one: images come in the same order per method
                hq = hq_cache[p.name]
                if hq.shape[:2] != sr.shape[:2]:
                    failures.append({"method": s.label, "image": p.name, "stage": "metrics",
                                     "error": f"SR is {sr.shape[1]}x{sr.shape[0]} but HQ is {hq.shape[1]}x{hq.shape[0]}"})
                    report(callback, "metrics", k, mtotal, f"{s.label}: {p.name}")
                    continue
            for mid, m in per.items():
                ck = f"{mid}@{cfg.border}"
                if ck not in entry:
                    try:
                        entry[ck] = m(sr, hq) if m.spec.needs_reference else m(sr)
                    except Exception as e:  # noqa: BLE001
                        failures.append({"method": s.label, "image": p.name, "stage": f"metric {mid}",
                                         "error": _one_line(e)})
                        continue
                row[mid] = entry[ck]
            for mid, m in sets.items():
                if run:
                    continue  # set-level metrics (FID) on run 0 only
                try:
                    m.update(sr, hq)
                    n_set += 1
                except Exception as e:  # noqa: BLE001
                    failures.append({"method": s.label, "image": p.name, "stage": f"metric {mid}",
                                     "error": _one_line(e)})
            cache[key] = entry
            rows.append(row)
            report(callback, "metrics", k, mtotal, f"{s.label}: {p.name}")
        for mid, m in sets.items():
            try:
                set_values.setdefault(s.slug, {})[mid] = m.compute()
            except Exception as e:  # noqa: BLE001
                failures.append({"method": s.label, "image": "*", "stage": f"metric {mid}", "error": _one_line(e)})
        _write_json(cache_path, cache)

    # 3. aggregate and write
    available = [mid for mid in metric_ids if minfo[mid]["available"]]
    methods_out = []
    for s in settings:
        mine = [r for r in rows if r["method"] == s.label]
        stab = _stability(cfg, s, pairs, mine, [m for m in available if m in per], minfo, runs[s.slug])
        means = {}
        for mid in available:
            if mid in per:
                vals = [r[mid] for r in mine if r.get(mid) is not None and np.isfinite(r[mid])]
                means[mid] = float(np.mean(vals)) if vals else None
            else:
                means[mid] = set_values.get(s.slug, {}).get(mid)
        secs = [v for v in seconds[s.slug].values() if v is not None]
        d = s.to_json()
        d.update(n_images=len(pairs), n_ok=len([r for r in mine if r["run"] == 0]), means=means,
                 seconds_per_image=float(np.mean(secs)) if secs else None, **stab)
        tagged = {r["image"]: r["tags"] for r in mine if "tags" in r}
        if tagged:
            d["tags"] = tagged
        methods_out.append(d)
    summary = _summary(cfg, pairs, metric_ids, minfo, methods_out, failures, t_start)
    _write_csv(cfg.out_dir / "results.csv", rows, [m for m in available if m in per])
    if cfg.seeds > 1:
        _write_stability_csv(cfg.out_dir / "stability.csv", methods_out, [m for m in available if m in per])
    _write_json(cfg.out_dir / "summary.json", summary)
    if cfg.report:
        from .report import write_report

        write_report(cfg.out_dir, summary, rows, pairs, n_crops=cfg.crops)
    return summary


def _summary(cfg, pairs, metric_ids, minfo, methods_out, failures, t_start) -> dict:
    import platform

    from .. import __version__

    versions = {"realisr": __version__, "python": platform.python_version(), "numpy": np.__version__}
    for mod in ("torch", "torchmetrics", "scipy", "pyiqa"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            pass
    return {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(time.time() - t_start, 2),
        "lq_dir": str(cfg.lq_dir), "hq_dir": str(cfg.hq_dir) if cfg.hq_dir else None,
        "paired": cfg.hq_dir is not None, "border": cfg.border, "pair_by": cfg.pair_by, "seed": cfg.seed,
        "seeds": cfg.seeds,
        "protocol": ("Y-channel PSNR/SSIM (BT.601), border crop %d px; LPIPS AlexNet; FID folder vs folder; "
                     "MUSIQ KonIQ; MANIQA PIPAL; SR outputs quantised to 8-bit PNG before measuring" % cfg.border),
        "images": [p.name for p in pairs],
        "metrics": {mid: minfo[mid] for mid in metric_ids},
        "methods": methods_out,
        "failures": failures,
        "versions": versions,
    }


def _rank_metric(metric_ids: list, minfo: dict) -> Optional[str]:
    """The metric that decides the best / worst run: PSNR (as CCSR's README), else the first one."""
    if "psnr" in metric_ids:
        return "psnr"
    return metric_ids[0] if metric_ids else None


def _stability(cfg: BenchConfig, setting: MethodSetting, pairs: list, rows: list, metric_ids: list, minfo: dict,
               runs: int) -> dict:
    """The stability entries of one setting's summary: ``stochastic``, ``runs``, and with several runs
    ``gstd`` (per metric), ``lstd``, ``per_image`` (L-STD, best / worst run)."""
    from ..metrics.stability import g_std, l_std_image

    out: dict = {"stochastic": setting_is_stochastic(setting), "runs": runs}
    if runs <= 1:
        if cfg.seeds > 1:
            out["stability"] = "deterministic: the output does not depend on the seed (run once)"
        return out
    by_image: dict = {}
    for r in rows:
        by_image.setdefault(r["image"], {})[r["run"]] = r
    complete = {img: rs for img, rs in by_image.items() if len(rs) == runs}
    gstd, per_image = {}, {}
    for mid in metric_ids:
        scores = {img: [rs[k].get(mid) for k in range(runs)] for img, rs in complete.items()}
        scores = {img: v for img, v in scores.items() if all(x is not None and np.isfinite(x) for x in v)}
        if scores:
            _mean, gstd[mid] = g_std(scores)
    rank = _rank_metric(metric_ids, minfo)
    lstds = []
    for p in pairs:
        rs = complete.get(p.name)
        if rs is None:
            continue
        files = [sr_path(cfg, setting, p.name, k) for k in range(runs)]
        if not all(f.is_file() for f in files):
            continue
        lv = l_std_image([read_rgb(f) for f in files], border=4)
        lstds.append(lv)
        entry = {"lstd": lv}
        if rank is not None and all(rs[k].get(rank) is not None for k in range(runs)):
            vals = [rs[k][rank] for k in range(runs)]
            order = sorted(range(runs), key=lambda k: vals[k], reverse=minfo[rank]["higher_is_better"])
            entry.update(rank_metric=rank, best={"run": order[0], "seed": cfg.seed + order[0], rank: vals[order[0]]},
                         worst={"run": order[-1], "seed": cfg.seed + order[-1], rank: vals[order[-1]]},
                         std={mid: float(np.std([rs[k][mid] for k in range(runs)], ddof=0)) for mid in metric_ids
                              if all(rs[k].get(mid) is not None for k in range(runs))})
        per_image[p.name] = entry
    out.update(gstd=gstd, lstd=float(np.mean(lstds)) if lstds else None, per_image=per_image)
    return out


def _write_stability_csv(path: Path, methods: list, metric_cols: list) -> None:
    """Per method: one row per image (L-STD, best / worst seed, the population std of each metric over runs)
    and one ``*`` row for the set (L-STD and G-STD, the mean of the per-image values)."""
    cols = ["method", "image", "runs", "lstd", "best_seed", "worst_seed"] + [f"{m}_std" for m in metric_cols]
    fd, tmp = tempfile.mkstemp(prefix="stability.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for m in methods:
            if m.get("runs", 1) <= 1:
                w.writerow({"method": m["label"], "image": "*", "runs": m.get("runs", 1),
                            "lstd": "deterministic" if m.get("stability") else ""})
                continue
            for img, e in m.get("per_image", {}).items():
                row = {"method": m["label"], "image": img, "runs": m["runs"], "lstd": f"{e['lstd']:.6f}",
                       "best_seed": e.get("best", {}).get("seed"), "worst_seed": e.get("worst", {}).get("seed")}
                row.update({f"{k}_std": f"{v:.6f}" for k, v in e.get("std", {}).items()})
                w.writerow(row)
            row = {"method": m["label"], "image": "*", "runs": m["runs"],
                   "lstd": f"{m['lstd']:.6f}" if m.get("lstd") is not None else ""}
            row.update({f"{k}_std": f"{v:.6f}" for k, v in m.get("gstd", {}).items()})
            w.writerow(row)
    _commit(tmp, path)


def _write_csv(path: Path, rows: list, metric_cols: list) -> None:
    cols = ["method", "model", "settings", "image", "seed", "seconds"] \
        + (["tags"] if any("tags" in r for r in rows) else []) + metric_cols
    fd, tmp = tempfile.mkstemp(prefix="results.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in r.items()})
    _commit(tmp, path)
