"""Creating a study: which images and methods, copied into a self-contained folder, and each rater's sequence.

A study folder::

    STUDY/study.json          methods (opaque ids and their labels), images, settings, admin-token hash
    STUDY/images/<i>/<m>.png  the outputs (<m> an opaque method id), lq.png / hq.png / bicubic.png when known
    STUDY/votes.sqlite        raters, their sequences, votes (see :mod:`realisr.study.store`)

Each rater gets, when they first arrive, their own sequence: the main items (every pair of methods on every
image, or ``per_rater`` of them, chosen where the fewest raters have been so far), in a random order with random
sides; about ``repeat_rate`` of them again later, sides swapped at random (rater consistency); and about
``gold_rate`` gold pairs, the reference against its bicubic upscale, where references exist (attention check:
the reference should win).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import tempfile
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import RealisrError

logger = logging.getLogger(__name__)

__all__ = ["Study", "StudyError", "create_study", "load_study", "make_plan", "HQ", "BICUBIC", "STUDY_FORMAT"]

STUDY_FORMAT = "realisr-study/1"
HQ, BICUBIC = "hq", "bicubic"  # the two sides of a gold pair
_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
_TAG = re.compile(r"([_-]?(lr|lq|hr|hq|gt|x\d+|lr\d+|lrx\d+|input|target|out))$", re.I)


class StudyError(RealisrError, ValueError):
    """A study cannot be created or read."""


@dataclass
class Study:
    """A study folder (see the module docstring)."""

    root: Path
    title: str
    methods: dict  # opaque id -> label
    images: dict  # image id -> {"name", "outputs": {method id: rel path}, "lq", "hq", "bicubic"}
    per_rater: Optional[int] = None
    repeat_rate: float = 0.07
    gold_rate: float = 0.07
    seed: int = 0
    admin_sha256: str = ""
    qc: dict = field(default_factory=dict)

    @property
    def db_path(self) -> Path:
        return self.root / "votes.sqlite"

    def path(self, rel: str) -> Path:
        return self.root / rel

    def items(self) -> list[tuple[str, str, str]]:
        """Every main item: ``(image, method a, method b)`` with ``a < b``."""
        out = []
        for iid, im in self.images.items():
            for a, b in combinations(sorted(im["outputs"]), 2):
                out.append((iid, a, b))
        return out

    def gold_images(self) -> list[str]:
        return [i for i, im in self.images.items() if im.get("hq") and im.get("bicubic")]

    def check_admin(self, token: Optional[str]) -> bool:
        import hmac

        if not token or not self.admin_sha256:
            return False
        return hmac.compare_digest(hashlib.sha256(token.encode()).hexdigest(), self.admin_sha256)

    def to_json(self) -> dict:
        return {"format": STUDY_FORMAT, "title": self.title, "methods": self.methods, "images": self.images,
                "per_rater": self.per_rater, "repeat_rate": self.repeat_rate, "gold_rate": self.gold_rate,
                "seed": self.seed, "admin_sha256": self.admin_sha256, "qc": self.qc,
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def load_study(root) -> Study:
    """Read ``root/study.json``.

    Raises:
        StudyError: not a study folder.
    """
    root = Path(root)
    f = root / "study.json"
    try:
        obj = json.loads(f.read_text())
    except FileNotFoundError:
        raise StudyError(f"{root} is not a study folder (no study.json): make one with "
                         "`realisr study create`") from None
    except (OSError, ValueError) as e:
        raise StudyError(f"cannot read {f.name} in {root}: {e}") from None
    if obj.get("format") != STUDY_FORMAT:
        raise StudyError(f"{f} is not a realisr study (format {obj.get('format')!r})")
    return Study(root=root, title=obj.get("title", ""), methods=obj["methods"], images=obj["images"],
                 per_rater=obj.get("per_rater"), repeat_rate=float(obj.get("repeat_rate", 0.07)),
                 gold_rate=float(obj.get("gold_rate", 0.07)), seed=int(obj.get("seed", 0)),
                 admin_sha256=obj.get("admin_sha256", ""), qc=dict(obj.get("qc", {})))


# -- sources ------------------------------------------------------------------------------------------------
def _images(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise StudyError(f"not a folder: {folder}")
    return {p.stem: p for p in sorted(folder.iterdir()) if p.is_file() and p.suffix.lower() in _EXTS}


def _match(stem: str, files: dict[str, Path]) -> Optional[Path]:
    if stem in files:
        return files[stem]
    key = _TAG.sub("", stem).lower()
    for s, p in files.items():
        if _TAG.sub("", s).lower() == key:
            return p
    return None


def _from_bench(bench: Path) -> tuple[dict[str, Path], Optional[Path], Optional[Path]]:
    """Method label -> output folder, and the LQ / HQ folders, of a ``realisr bench`` output folder."""
    summary = bench / "summary.json"
    if not summary.is_file():
        raise StudyError(f"{bench} is not a `realisr bench` output folder (no summary.json)")
    s = json.loads(summary.read_text())
    methods = {}
    for m in s.get("methods", []):
        folder = bench / "sr" / m["slug"]
        if folder.is_dir():
            methods[m["label"]] = folder
    lq = Path(s["lq_dir"]) if s.get("lq_dir") else None
    hq = Path(s["hq_dir"]) if s.get("hq_dir") else None
    return methods, (lq if lq and lq.is_dir() else None), (hq if hq and hq.is_dir() else None)


def _copy(src: Path, dst: Path) -> None:
    """As PNG (browsers show every format realisr writes then; 16-bit becomes 8-bit for display)."""
    from PIL import Image

    from ..io import read_image

    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.suffix.lower() == ".png":
        try:
            os.link(src, dst)
            return
        except OSError:
            shutil.copyfile(src, dst)
            return
    data = read_image(src)
    arr = np.clip(np.rint(data.pixels * 255), 0, 255).astype(np.uint8)
    Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr).save(dst, "PNG")


def _bicubic(lq: Path, hq: Path, dst: Path) -> None:
    from PIL import Image

    with Image.open(hq) as h:
        size = h.size
    with Image.open(lq) as im:
        im.convert("RGB").resize(size, Image.BICUBIC).save(dst, "PNG")


def create_study(out, *, bench=None, methods: Optional[dict] = None, lq=None, hq=None, title: str = "",
                 per_rater: Optional[int] = None, repeat_rate: float = 0.07, gold_rate: float = 0.07,
                 seed: int = 0, min_gold_accuracy: float = 0.75, min_repeat_agreement: float = 0.6,
                 min_repeat_checks: int = 3, overwrite: bool = False) -> tuple[Study, str]:
    """Make a study folder from a ``realisr bench`` output folder or from method folders paired by file name.

    Args:
        out: the study folder to create.
        bench: a ``realisr bench`` output folder (methods = its settings; LQ/HQ from its summary).
        methods: ``{label: folder}`` of outputs (instead of or besides ``bench``).
        lq, hq: folders of inputs (shown on demand) and references (gold pairs), paired by file name.
        per_rater: main items per rater (default: all).
        repeat_rate, gold_rate: shares of repeated and gold pairs in each rater's sequence.
        seed: seed of every random choice (sequences are reproducible per rater number).
        min_gold_accuracy, min_repeat_agreement: quality-control thresholds for flagging raters (repeats count
            once a rater answered ``min_repeat_checks`` of them).

    Returns:
        ``(study, admin token)``: the token opens the results page; only its hash is stored.

    Raises:
        StudyError: fewer than two methods, no image common to them, or ``out`` exists.
    """
    out = Path(out)
    found: dict[str, Path] = {}
    if bench is not None:
        bm, blq, bhq = _from_bench(Path(bench))
        found.update(bm)
        lq = lq if lq is not None else blq
        hq = hq if hq is not None else bhq
    found.update({k: Path(v) for k, v in (methods or {}).items()})
    if len(found) < 2:
        raise StudyError(f"a pairwise study needs at least two methods, got {len(found)}")
    if not 0 <= repeat_rate < 1 or not 0 <= gold_rate < 1:
        raise StudyError("repeat and gold rates must be in [0, 1)")
    files = {label: _images(folder) for label, folder in found.items()}
    common = sorted(set.intersection(*(set(f) for f in files.values())))
    if not common:
        raise StudyError("no image name is common to every method folder: outputs are paired by file name")
    skipped = sorted(set.union(*(set(f) for f in files.values())) - set(common))
    if skipped:
        logger.warning("%d image(s) missing from some method are left out: %s", len(skipped), ", ".join(skipped[:5]))
    lq_files = _images(Path(lq)) if lq else {}
    hq_files = _images(Path(hq)) if hq else {}
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise StudyError(f"{out} exists and is not empty: choose a new folder")
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        labels = sorted(found)
        mids = {label: f"m{i}" for i, label in enumerate(labels)}
        images = {}
        for n, stem in enumerate(common):
            iid = f"i{n}"
            im: dict = {"name": stem, "outputs": {}, "lq": None, "hq": None, "bicubic": None}
            for label in labels:
                rel = f"images/{iid}/{mids[label]}.png"
                _copy(files[label][stem], tmp / rel)
                im["outputs"][mids[label]] = rel
            lqp, hqp = _match(stem, lq_files), _match(stem, hq_files)
            if lqp is not None:
                _copy(lqp, tmp / f"images/{iid}/lq.png")
                im["lq"] = f"images/{iid}/lq.png"
            if hqp is not None:
                _copy(hqp, tmp / f"images/{iid}/hq.png")
                im["hq"] = f"images/{iid}/hq.png"
                if lqp is not None:
                    _bicubic(lqp, hqp, tmp / f"images/{iid}/bicubic.png")
                    im["bicubic"] = f"images/{iid}/bicubic.png"
            images[iid] = im
        token = secrets.token_urlsafe(24)
        study = Study(root=out, title=title or f"study of {len(labels)} methods",
                      methods={v: k for k, v in mids.items()},
                      images=images, per_rater=per_rater, repeat_rate=repeat_rate, gold_rate=gold_rate, seed=seed,
                      admin_sha256=hashlib.sha256(token.encode()).hexdigest(),
                      qc={"min_gold_accuracy": min_gold_accuracy, "min_repeat_agreement": min_repeat_agreement,
                          "min_repeat_checks": int(min_repeat_checks)})
        (tmp / "study.json").write_text(json.dumps(study.to_json(), indent=1) + "\n")
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    from .store import VoteStore

    VoteStore(study.db_path).close()
    return study, token


# -- a rater's sequence -------------------------------------------------------------------------------------
def make_plan(study: Study, rater_number: int, counts: dict) -> list[tuple]:
    """The sequence of rater ``rater_number``: ``[(image, left, right, kind, repeats_seq)]``.

    Main items are those assigned least so far (``counts`` by ``(image, a, b)``), ties broken at random; order
    and sides are random; repeats come at least two places after their original with random sides; gold pairs
    (reference vs bicubic) are spread at random positions.
    """
    rng = np.random.default_rng([int(study.seed), int(rater_number)])
    items = study.items()
    n = len(items) if not study.per_rater else min(int(study.per_rater), len(items))
    order = sorted(range(len(items)), key=lambda i: (counts.get(items[i], 0), rng.random()))
    chosen = [items[i] for i in order[:n]]
    rng.shuffle(chosen)
    seq: list[list] = []
    for image, a, b in chosen:
        left, right = (a, b) if rng.random() < 0.5 else (b, a)
        seq.append([image, left, right, "main", None])
    n_rep = int(round(study.repeat_rate * n)) if n >= 3 else 0
    if study.repeat_rate > 0 and n >= 5:
        n_rep = max(1, n_rep)
    for src in sorted(rng.choice(max(0, n - 2), size=min(n_rep, max(0, n - 2)), replace=False).tolist()
                      if n_rep else [], reverse=True):
        image, left, right = seq[src][:3]
        if rng.random() < 0.5:
            left, right = right, left
        pos = int(rng.integers(src + 2, len(seq) + 1))
        seq.insert(pos, [image, left, right, "repeat", ("orig", src)])
    golds = study.gold_images()
    n_gold = int(round(study.gold_rate * n)) if golds else 0
    if golds and study.gold_rate > 0 and n >= 5:
        n_gold = max(1, n_gold)
    for _ in range(n_gold):
        image = golds[int(rng.integers(len(golds)))]
        left, right = (HQ, BICUBIC) if rng.random() < 0.5 else (BICUBIC, HQ)
        seq.insert(int(rng.integers(0, len(seq) + 1)), [image, left, right, "gold", None])
    # repeats point at their original's final position
    main_pos = {}
    k = 0
    for pos, row in enumerate(seq):
        if row[3] == "main":
            main_pos[k] = pos
            k += 1
    out = []
    for row in seq:
        rep = row[4]
        out.append((row[0], row[1], row[2], row[3], main_pos[rep[1]] if rep else None))
    return out
