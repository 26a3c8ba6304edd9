"""``realisr bench``: run methods on a folder of LQ images, measure them against HQ images (or with
no-reference metrics only), and write ``results.csv``, ``summary.json`` and ``report.html``.

Layout of the output folder (everything is resumable: a rerun reuses what is there)::

    OUT/sr/<setting-slug>/<image>.png     SR outputs (8-bit PNG, what the metrics see)
    OUT/sr/<setting-slug>/setting.json    the method setting and seconds per image
    OUT/metrics_cache.json                per-image metric values keyed by SR file identity
    OUT/results.csv  OUT/summary.json  OUT/report.html

SR outputs are quantised to 8 bits and written before any metric is computed, as the papers' scripts
measure saved PNGs.
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
def _run_method(setting: MethodSetting, pairs: list[ImagePair], cfg: BenchConfig, failures: list,
                callback, step: list, total: int) -> dict:
    """Produce (or reuse) every SR output of one setting. Returns ``{name: seconds}`` of this and earlier runs."""
    folder = cfg.out_dir / "sr" / setting.slug
    meta_path = folder / "setting.json"
    meta = {}
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            meta = {}
    seconds: dict = dict(meta.get("seconds", {}))
    todo = [p for p in pairs if not (folder / f"{p.name}.png").is_file()]
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
            for p in todo:
                failures.append({"method": setting.label, "image": p.name, "stage": "load", "error": msg})
            step[0] += len(pairs)
            report(callback, "bench", step[0], total, f"{setting.label}: load failed")
            return seconds
    for p in pairs:
        out = folder / f"{p.name}.png"
        if not out.is_file() and pipe is not None:
            try:
                lq = read_rgb(p.lq)
                lq_f = lq.astype(np.float32) / 255.0 if lq.dtype == np.uint8 else lq
                kwargs = dict(setting.call_kwargs)
                if cfg.tile is not None:
                    kwargs.setdefault("tile", cfg.tile)
                import torch

                gen = torch.Generator().manual_seed(cfg.seed)
                t0 = time.perf_counter()
                res = pipe(lq_f, generator=gen, **kwargs)
                seconds[p.name] = time.perf_counter() - t0
                _save_png(out, res.image.pixels)
            except Exception as e:  # noqa: BLE001 - per-image failures are listed, not fatal
                msg = _one_line(e)
                logger.warning("%s on %s failed: %s", setting.label, p.name, msg)
                failures.append({"method": setting.label, "image": p.name, "stage": "upscale", "error": msg})
        step[0] += 1
        report(callback, "bench", step[0], total, f"{setting.label}: {p.name}")
    _write_json(meta_path, {"setting": setting.to_json(), "seconds": seconds})
    return seconds


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
            logger.warning("%s", e)
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

    # 1. SR outputs (cached)
    total = len(settings) * len(pairs)
    step = [0]
    report(callback, "bench", 0, total, "upscaling")
    seconds = {}
    for s in settings:
        seconds[s.slug] = _run_method(s, pairs, cfg, failures, callback, step, total)

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
        for p in pairs:
            k += 1
            sr_path = cfg.out_dir / "sr" / s.slug / f"{p.name}.png"
            row = {"method": s.label, "model": s.model, "settings": json.dumps(s.call_kwargs, sort_keys=True),
                   "image": p.name, "seconds": seconds[s.slug].get(p.name)}
            if not sr_path.is_file():
                report(callback, "metrics", k, mtotal, f"{s.label}: {p.name}")
                continue
            key = f"{s.slug}/{p.name}"
            fid_ = _file_id(sr_path) + (("|" + _file_id(p.hq)) if p.hq else "")
            entry = cache.get(key, {})
            if entry.get("_id") != fid_:
                entry = {"_id": fid_}
            sr = read_rgb(sr_path)
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
        means = {}
        for mid in available:
            if mid in per:
                vals = [r[mid] for r in mine if r.get(mid) is not None and np.isfinite(r[mid])]
                means[mid] = float(np.mean(vals)) if vals else None
            else:
                means[mid] = set_values.get(s.slug, {}).get(mid)
        secs = [v for v in seconds[s.slug].values() if v is not None]
        d = s.to_json()
        d.update(n_images=len(pairs), n_ok=len(mine), means=means,
                 seconds_per_image=float(np.mean(secs)) if secs else None)
        methods_out.append(d)
    summary = _summary(cfg, pairs, metric_ids, minfo, methods_out, failures, t_start)
    _write_csv(cfg.out_dir / "results.csv", rows, [m for m in available if m in per])
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
        "protocol": ("Y-channel PSNR/SSIM (BT.601), border crop %d px; LPIPS AlexNet; FID folder vs folder; "
                     "MUSIQ KonIQ; MANIQA PIPAL; SR outputs quantised to 8-bit PNG before measuring" % cfg.border),
        "images": [p.name for p in pairs],
        "metrics": {mid: minfo[mid] for mid in metric_ids},
        "methods": methods_out,
        "failures": failures,
        "versions": versions,
    }


def _write_csv(path: Path, rows: list, metric_cols: list) -> None:
    cols = ["method", "model", "settings", "image", "seconds"] + metric_cols
    fd, tmp = tempfile.mkstemp(prefix="results.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in r.items()})
    _commit(tmp, path)
