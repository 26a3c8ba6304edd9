"""``realisr bench-data build``: an offline benchmark of real photos that anyone can rebuild bit for bit.

Sources (nothing is committed; everything is fetched by ordinary package clients):

* ``skimage``: the photos bundled in the scikit-image wheel (astronaut, chelsea, coffee, rocket,
  the left view of stereo_motorcycle).
* ``mate-backgrounds``: Debian package, ``usr/share/backgrounds/mate/nature/`` (photographs).
* ``plasma-workspace-wallpapers``: Debian package, ``usr/share/wallpapers/*/contents/images/`` (the
  largest image of each wallpaper; some KDE wallpapers are renders rather than photographs).

The Debian packages are fetched with ``apt-get download`` and unpacked with ``dpkg-deb -x`` into a temporary
folder (no root, nothing installed); without apt the build goes on with the scikit-image photos and says so.

From each photo one ``hq_size`` crop is taken (``crops_per_image`` of them; among 8 seeded candidate
positions the most detailed one, so a crop is not all sky). LQ inputs, each in its own folder:

* ``bicubic_x4``: MATLAB-style antialiased bicubic downscaling (what DIV2K's bicubic LR uses), 8-bit.
* ``bnj_x4``: seeded Gaussian blur (sigma ~ U[0.2, 2.0]) on the HQ, bicubic x4 down, Gaussian noise
  (sigma ~ U[1, 10] levels of 255), JPEG (quality ~ U{40..90}, Pillow). The draw per image is in the manifest.
* ``realesrgan_x4``: the two-stage Real-ESRGAN degradation (:mod:`realisr.train.degradations`, preset
  ``pisa-sr``).

``manifest.json`` records the seed, versions, source files with SHA-256, crop boxes and degradation draws.

Train/eval split (for realisr's own training, e.g. the Real-ESRGAN fidelity delta): every photo belongs to
one split by a fixed rule, :func:`photo_split` (``eval`` when ``crc32("<source>/<name>") % 3 == 0``, else
``train``), independent of the seed and of which other photos are present. ``split="eval"`` builds the
benchmark from the eval photos only; ``split="train"`` writes the full-resolution training photos to
``train/`` (no crops, no LQ) and nothing else, so a model trained on ``train/`` never sees a benchmark image.
``split="all"`` (default) is the benchmark of every photo.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import logging
import platform
import re
import shutil
import subprocess
import tempfile
import zlib
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from ..errors import RealisrError
from ..progress import ProgressEvent, report

logger = logging.getLogger(__name__)

__all__ = ["build_benchmark_data", "SKIMAGE_PHOTOS", "DEBIAN_SOURCES", "bicubic_down", "blur_noise_jpeg",
           "photo_split", "SPLITS"]

SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "stereo_motorcycle")
DEBIAN_SOURCES = {
    "mate-backgrounds": ("usr/share/backgrounds/mate/nature",),
    "plasma-workspace-wallpapers": ("usr/share/wallpapers",),
}
_EXTS = (".jpg", ".jpeg", ".png")
SPLITS = ("all", "eval", "train")


def photo_split(source: str, name: str) -> str:
    """``"eval"`` or ``"train"``: the fixed split of a source photo (``crc32("source/name") % 3 == 0`` is eval)."""
    return "eval" if zlib.crc32(f"{source}/{name}".encode()) % 3 == 0 else "train"


class BenchDataError(RealisrError):
    """The benchmark data cannot be built (no source image at all, or a bad argument)."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _skimage_sources() -> list[dict]:
    import skimage
    import skimage.data

    out = []
    for name in SKIMAGE_PHOTOS:
        fn = getattr(skimage.data, name, None)
        if fn is None:
            continue
        img = fn()
        if isinstance(img, tuple):  # stereo_motorcycle: (left, right, disparity); the left view
            img = img[0]
        if img.ndim != 3:
            continue
        out.append({"source": "skimage", "name": name, "package": f"scikit-image {skimage.__version__}",
                    "file": f"skimage.data.{name}()", "sha256": _sha256(np.ascontiguousarray(img).tobytes()),
                    "pixels": np.ascontiguousarray(img[..., :3])})
    return out


def _debian_sources(package: str, subdirs: Sequence[str], tmp: Path,
                    limit: Optional[int] = None) -> tuple[list[dict], str]:
    """Fetch a Debian package with apt-get download and decode its photos, the first ``limit`` readable ones
    only (a wallpaper is up to 5120x2880: decoding all of them for ``--max-images 3`` costs seconds and
    gigabytes). Returns (sources, note)."""
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        return [], f"{package}: apt-get/dpkg-deb not available, skipped"
    dl = tmp / package
    dl.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["apt-get", "download", package], cwd=dl, capture_output=True, text=True)
    debs = sorted(dl.glob(f"{package}_*.deb"))
    if r.returncode != 0 or not debs:
        err = (r.stderr or r.stdout or "").strip().splitlines()
        return [], f"{package}: apt-get download failed ({err[-1] if err else 'no output'}); try `apt-get update`"
    deb = debs[0]
    root = dl / "root"
    r = subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], capture_output=True, text=True)
    if r.returncode != 0:
        return [], f"{package}: dpkg-deb -x failed: {r.stderr.strip()[:200]}"
    version = re.sub(r"^[^_]+_([^_]+)_.*$", r"\1", deb.name).replace("%3a", ":")
    files: list[tuple[str, Path]] = []
    for sub in subdirs:
        base = root / sub
        if not base.is_dir():
            continue
        if package == "plasma-workspace-wallpapers":  # the largest image of each wallpaper
            for wall in sorted(p for p in base.iterdir() if p.is_dir()):
                imgs = [p for p in (wall / "contents" / "images").glob("*") if p.suffix.lower() in _EXTS]
                if imgs:
                    files.append((wall.name, max(imgs, key=lambda p: _area_from_name(p))))
        else:
            files += [(p.stem, p) for p in sorted(base.rglob("*")) if p.suffix.lower() in _EXTS]
    from PIL import Image

    out = []
    for name, f in files:
        if limit is not None and len(out) >= limit:
            break
        data = f.read_bytes()
        try:
            with Image.open(io.BytesIO(data)) as im:
                px = np.asarray(im.convert("RGB"))
        except Exception as e:  # noqa: BLE001 - a broken file is skipped, not fatal
            logger.warning("skipping %s: %s", f.name, e)
            continue
        rel = str(f.relative_to(root))
        out.append({"source": package, "name": name, "package": f"{package} {version} ({deb.name}, "
                    f"sha256 {_sha256(deb.read_bytes())[:16]}...)", "file": "/" + rel, "sha256": _sha256(data),
                    "pixels": px})
    return out, f"{package} {version}: {len(out)} images"


def _area_from_name(p: Path) -> int:
    m = re.match(r"(\d+)x(\d+)", p.stem)
    return int(m.group(1)) * int(m.group(2)) if m else p.stat().st_size


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-").lower()[:40]


def _crop_box(img: np.ndarray, size: int, rng: np.random.Generator, candidates: int = 8) -> tuple[int, int]:
    h, w = img.shape[:2]
    g = img.astype(np.float32).mean(axis=2)
    best, box = -1.0, (0, 0)
    for _ in range(candidates):
        y = int(rng.integers(0, h - size + 1))
        x = int(rng.integers(0, w - size + 1))
        c = g[y:y + size, x:x + size]
        energy = float(np.abs(np.diff(c, axis=0)).mean() + np.abs(np.diff(c, axis=1)).mean())
        if energy > best:
            best, box = energy, (y, x)
    return box


def bicubic_down(hq: np.ndarray, scale: int = 4) -> np.ndarray:
    """MATLAB ``imresize(hq, 1/scale)`` (bicubic, antialiased), rounded to uint8."""
    from ..metrics.niqe_core import matlab_imresize

    planes = [matlab_imresize(hq[..., c].astype(np.float32) / 255.0, 1.0 / scale) for c in range(3)]
    return np.clip(np.rint(np.stack(planes, axis=2) * 255.0), 0, 255).astype(np.uint8)


def blur_noise_jpeg(hq: np.ndarray, rng: np.random.Generator, scale: int = 4) -> tuple[np.ndarray, dict]:
    """The documented seeded degradation: blur, bicubic down, Gaussian noise, JPEG. Returns (LQ, draw)."""
    from PIL import Image
    from scipy.ndimage import gaussian_filter

    sigma_blur = float(rng.uniform(0.2, 2.0))
    sigma_noise = float(rng.uniform(1.0, 10.0))
    quality = int(rng.integers(40, 91))
    blurred = np.stack([gaussian_filter(hq[..., c].astype(np.float32), sigma_blur, mode="reflect")
                        for c in range(3)], axis=2)
    blurred = np.clip(np.rint(blurred), 0, 255).astype(np.uint8)
    lq = bicubic_down(blurred, scale).astype(np.float32)
    lq = np.clip(np.rint(lq + rng.normal(0.0, sigma_noise, lq.shape)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(lq).save(buf, "JPEG", quality=quality)
    with Image.open(io.BytesIO(buf.getvalue())) as im:
        out = np.asarray(im.convert("RGB"))
    return out, {"blur_sigma": round(sigma_blur, 6), "noise_sigma_255": round(sigma_noise, 6),
                 "jpeg_quality": quality}


def _realesrgan_degrader():
    from ..train.degradations import Degrader, get_preset

    return Degrader(get_preset("pisa-sr"), device="cpu"), "realisr.train.degradations preset pisa-sr"


def _save_png(path: Path, arr: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, "PNG")


def _scalar_params(params: dict, i: int) -> dict:
    out = {}
    for k, v in params.items():
        try:
            import torch

            if isinstance(v, torch.Tensor) and v.dim() <= 1 and v.numel() > i and v.dim() == 1:
                out[k] = round(float(v[i]), 6)
            elif isinstance(v, (int, float, str, bool)):
                out[k] = v
        except Exception:  # noqa: BLE001 - the record is best effort; the seed reproduces it
            pass
    return out


def build_benchmark_data(out_dir, *, sources: Sequence[str] = ("skimage", "mate-backgrounds",
                                                               "plasma-workspace-wallpapers"),
                         hq_size: int = 256, scale: int = 4, crops_per_image: int = 1, seed: int = 0,
                         max_images: Optional[int] = None, degradations: Sequence[str] = ("bicubic", "bnj", "realesrgan"),
                         split: str = "all", callback: Optional[Callable[[ProgressEvent], None]] = None) -> dict:
    """Build the benchmark in ``out_dir`` (``HQ/``, ``LQ/<degradation>_x4/``, ``manifest.json``).

    Args:
        out_dir: output folder (existing files with the same names are replaced).
        sources: any of ``skimage``, ``mate-backgrounds``, ``plasma-workspace-wallpapers``.
        hq_size: side of the square HQ crops (a multiple of ``scale``).
        scale: downscaling factor of the LQ inputs.
        crops_per_image: crops taken from each photo.
        seed: the one seed everything is derived from (per image: ``[seed, crc32(name), k]``).
        max_images: at most this many photos per source (``None``: all).
        degradations: any of ``bicubic``, ``bnj`` (blur+noise+JPEG), ``realesrgan``.
        split: ``all`` (every photo), ``eval`` (the benchmark of the eval photos) or ``train`` (the
            full-resolution training photos in ``train/``, nothing else); see :func:`photo_split`.
        callback: progress callback (stage ``bench-data``).

    Returns:
        The manifest (also written to ``manifest.json``).

    Raises:
        BenchDataError: bad arguments, or no usable photo from any source.
    """
    out_dir = Path(out_dir)
    if hq_size % scale or hq_size < 16 * scale:
        raise BenchDataError(f"--hq-size must be a multiple of {scale} and at least {16 * scale}, got {hq_size}")
    if split not in SPLITS:
        raise BenchDataError(f"unknown split {split!r}: use {', '.join(SPLITS)}")
    unknown = set(sources) - {"skimage", *DEBIAN_SOURCES}
    if unknown:
        raise BenchDataError(f"unknown source(s) {', '.join(sorted(unknown))}: use skimage, "
                             + ", ".join(DEBIAN_SOURCES))
    notes = []
    photos: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="realisr-bench-data-") as tmp:
        for src in sources:
            if src == "skimage":
                got = _skimage_sources()
                notes.append(f"skimage: {len(got)} images")
            else:
                got, note = _debian_sources(src, DEBIAN_SOURCES[src], Path(tmp), limit=max_images or None)
                notes.append(note)
                if not got:
                    logger.warning("%s", note)
            photos += got[:max_images] if max_images else got
    photos = [p for p in photos if min(p["pixels"].shape[:2]) >= hq_size]
    if not photos:
        raise BenchDataError("no source photo is large enough: " + "; ".join(notes))
    if split != "all":
        photos = [p for p in photos if photo_split(p["source"], p["name"]) == split]
        notes.append(f"split {split}: {len(photos)} photos (photo_split: crc32('source/name') % 3 == 0 is eval)")
        if not photos:
            raise BenchDataError(f"no photo of the {split} split among the sources: " + "; ".join(notes))
    if split == "train":
        return _write_train_split(out_dir, photos, notes, seed, callback)
    deg, deg_note = (None, "not requested")
    if "realesrgan" in degradations:
        deg, deg_note = _realesrgan_degrader()
        notes.append(deg_note)
    folders = {"bicubic": f"bicubic_x{scale}", "bnj": f"bnj_x{scale}", "realesrgan": f"realesrgan_x{scale}"}
    entries = []
    used: set = set()
    total = len(photos) * crops_per_image
    report(callback, "bench-data", 0, total, "cropping")
    n = 0
    for ph in photos:
        for k in range(crops_per_image):
            name = f"{_safe(ph['source'])[:8]}-{_safe(ph['name'])}" + (f"-{k}" if crops_per_image > 1 else "")
            if name in used:
                name += f"-{zlib.crc32(ph['file'].encode()) % 10000:04d}"
            used.add(name)
            seeds = [seed, zlib.crc32(f"{ph['source']}/{ph['name']}".encode()), k]
            rng = np.random.default_rng(seeds)
            y, x = _crop_box(ph["pixels"], hq_size, rng)
            hq = np.ascontiguousarray(ph["pixels"][y:y + hq_size, x:x + hq_size])
            _save_png(out_dir / "HQ" / f"{name}.png", hq)
            e = {"name": name, "source": ph["source"], "package": ph["package"], "file": ph["file"],
                 "source_sha256": ph["sha256"], "source_size": list(ph["pixels"].shape[:2][::-1]),
                 "crop_xywh": [x, y, hq_size, hq_size], "seed": seeds, "lq": {}}
            if "bicubic" in degradations:
                _save_png(out_dir / "LQ" / folders["bicubic"] / f"{name}.png", bicubic_down(hq, scale))
                e["lq"]["bicubic"] = {}
            if "bnj" in degradations:
                lq, draw = blur_noise_jpeg(hq, np.random.default_rng(seeds + [1]), scale)
                _save_png(out_dir / "LQ" / folders["bnj"] / f"{name}.png", lq)
                e["lq"]["bnj"] = draw
            if deg is not None:
                import torch

                gen = torch.Generator().manual_seed(int(np.random.default_rng(seeds + [2]).integers(2 ** 31)))
                t = torch.from_numpy(hq.transpose(2, 0, 1).astype(np.float32) / 255.0)[None]
                lq_t, params = deg(t, generator=gen)
                lq = np.clip(np.rint(lq_t[0].permute(1, 2, 0).numpy() * 255), 0, 255).astype(np.uint8)
                _save_png(out_dir / "LQ" / folders["realesrgan"] / f"{name}.png", lq)
                e["lq"]["realesrgan"] = {"torch_seed": int(gen.initial_seed()), **_scalar_params(params, 0)}
            entries.append(e)
            n += 1
            report(callback, "bench-data", n, total, name)
    manifest = {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "seed": seed, "hq_size": hq_size, "scale": scale, "crops_per_image": crops_per_image,
        "sources": list(sources), "split": split, "notes": notes,
        "folders": {"HQ": "HQ", **{k: f"LQ/{v}" for k, v in folders.items() if k in degradations
                                   and (k != "realesrgan" or deg is not None)}},
        "degradations": {
            "bicubic": "MATLAB imresize bicubic with antialiasing (realisr.metrics.niqe_core.matlab_imresize), 8-bit",
            "bnj": "Gaussian blur sigma~U[0.2,2.0] -> bicubic down -> Gaussian noise sigma~U[1,10]/255 -> "
                   "JPEG quality~U{40..90} (Pillow); numpy default_rng(seed + [1])",
            "realesrgan": deg_note},
        "versions": _versions(),
        "images": entries,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def _write_train_split(out_dir: Path, photos: list[dict], notes: list[str], seed: int, callback) -> dict:
    """The full-resolution photos of the train split as ``train/<name>.png`` with a manifest."""
    entries, used = [], set()
    report(callback, "bench-data", 0, len(photos), "train photos")
    for i, ph in enumerate(photos):
        name = f"{_safe(ph['source'])[:8]}-{_safe(ph['name'])}"
        if name in used:
            name += f"-{zlib.crc32(ph['file'].encode()) % 10000:04d}"
        used.add(name)
        _save_png(out_dir / "train" / f"{name}.png", np.ascontiguousarray(ph["pixels"]))
        entries.append({"name": name, "source": ph["source"], "package": ph["package"], "file": ph["file"],
                        "source_sha256": ph["sha256"], "source_size": list(ph["pixels"].shape[:2][::-1]),
                        "split": "train"})
        report(callback, "bench-data", i + 1, len(photos), name)
    manifest = {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "seed": seed, "split": "train", "notes": notes, "folders": {"train": "train"},
        "split_rule": "eval if crc32('<source>/<name>') % 3 == 0 else train (realisr.bench.data.photo_split)",
        "versions": _versions(), "images": entries,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def _versions() -> dict:
    v = {"python": platform.python_version(), "numpy": np.__version__}
    for mod in ("PIL", "scipy", "skimage", "torch", "realisr"):
        try:
            v[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            pass
    return v
