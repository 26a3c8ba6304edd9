"""The work behind ``realisr serve``, without any web framework: models, sessions, runs and re-dials,
estimates, downloads. :mod:`realisr.ui.app` is only the Gradio layout around it.

* One :class:`Engine` per server: pipelines loaded on first use and kept (one per model), measured speeds,
  and the sessions.
* One :class:`Session` per browser tab: its own folder for uploads and results (deleted when the tab closes or
  after ``session_ttl`` idle seconds), the kept state for cheap re-dials, and a cancel flag.
* :meth:`Engine.render` runs a :class:`~realisr.recipe.Recipe`: a full pipeline call, or, when only cheap dials
  changed since the last full call on the same image, the pipeline's ``redial`` from the kept state (PiSA-SR:
  one VAE decode, no UNet pass). A download writes exactly what a recipe replay with ``realisr upscale
  --recipe`` writes.

Messages shown to users never contain server paths (:func:`redact`).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import threading
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from ..dials import Dial, ModelDials, dials_for
from ..errors import RealisrError
from ..progress import ProgressEvent
from ..recipe import Recipe, encode_mask
from ..registry import REGISTRY, ModelSpec, get_spec
from .estimate import Estimate, Limits, estimate_run, steps_of

logger = logging.getLogger(__name__)

__all__ = ["Engine", "Session", "Cancelled", "RefusedError", "redact", "Upload", "RenderResult"]

_PATH_RE = re.compile(r"(?:[A-Za-z]:)?(?:[\\/][^\s\\/:'\"<>|]+){2,}")


def redact(text: str) -> str:
    """Replace absolute paths in a message by their last component (no server paths shown to users)."""
    return _PATH_RE.sub(lambda m: re.split(r"[\\/]", m.group(0))[-1], str(text))


class Cancelled(RealisrError):
    """The user cancelled the run."""


class RefusedError(RealisrError):
    """The server refuses a run (limits); the message says why."""


@dataclass
class Upload:
    """An uploaded image in a session."""

    key: str
    name: str  # the user's file name (no folders)
    path: Path  # the session's copy
    width: int
    height: int
    refused: Optional[str] = None


@dataclass
class RenderResult:
    output: object  # SROutput
    kind: str  # "full" or "redial"
    seconds: float
    recipe: Recipe
    upload: Upload


@dataclass
class Session:
    """One browser tab's files and state."""

    key: str
    folder: Path
    uploads: dict = field(default_factory=dict)
    originals: list = field(default_factory=list)  # the server's upload temp files, deleted on close
    masks: dict = field(default_factory=dict)  # upload key -> painted region (uint8 [H, W])
    batch_keys: list = field(default_factory=list)
    state: object = None
    state_sig: object = None
    last: Optional[RenderResult] = None
    cancel: threading.Event = field(default_factory=threading.Event)
    touched: float = field(default_factory=time.monotonic)

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
        for p in self.originals:
            try:
                os.unlink(p)
                d = os.path.dirname(p)
                if d and not os.listdir(d):
                    os.rmdir(d)
            except OSError:
                pass
        self.uploads.clear()
        self.masks.clear()
        self.state = self.last = None


def _safe_name(name: str) -> str:
    base = os.path.basename(str(name)) or "image"
    stem, ext = os.path.splitext(base)
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._") or "image"
    return stem[:80] + ext.lower()[:6]


class Engine:
    """Models, sessions and runs of one server.

    Args:
        models: registry ids offered (default: every registered model).
        device, dtype: for every pipeline (see :func:`realisr.load_pipeline`).
        load_kwargs: constructor arguments by model family (e.g. ``{"pisa-sr": {"sd": path}}``) or ``"*"``.
        limits: what the server accepts.
        root: where session folders are made (default: a new temporary folder).
        session_ttl: seconds after which an idle session is deleted even if its tab never said goodbye.
    """

    def __init__(self, models: Optional[list[str]] = None, *, device=None, dtype=None,
                 load_kwargs: Optional[dict] = None, limits: Limits = Limits(), root: Optional[Path] = None,
                 session_ttl: float = 3600.0):
        from ..pipelines.base import resolve_device

        self.models = list(models) if models else list(REGISTRY)
        for m in self.models:
            get_spec(m)
        self.device = resolve_device(device)
        self.dtype = dtype
        self.load_kwargs = dict(load_kwargs or {})
        self.limits = limits
        self.root = Path(root) if root else Path(tempfile.mkdtemp(prefix="realisr-serve-"))
        self.root.mkdir(parents=True, exist_ok=True)
        self.session_ttl = float(session_ttl)
        self.pipelines: dict = {}
        self.rates: dict = {}
        self.sessions: dict[str, Session] = {}
        self._lock = threading.RLock()
        self._device_lock = threading.Lock()

    # -- models -----------------------------------------------------------------------------------------------
    def spec(self, model_id: str) -> ModelSpec:
        if model_id not in self.models:
            raise RealisrError(f"model {model_id!r} is not offered here: choose one of {', '.join(self.models)}")
        return get_spec(model_id)

    def dials(self, model_id: str) -> ModelDials:
        return dials_for(self.spec(model_id))

    def status(self, model_id: str) -> tuple[bool, str]:
        """Whether the model's weights are here, and what is missing (no server paths)."""
        from ..weights.status import weights_status

        try:
            ok, detail = weights_status(self.spec(model_id))
        except Exception as e:  # noqa: BLE001 - a broken status check must not break the page
            ok, detail = False, f"{type(e).__name__}: {e}"
        if model_id in self.pipelines:
            ok, detail = True, "loaded"
        return ok, redact(detail)

    def choices(self) -> list[tuple[str, str]]:
        """``(label, id)`` for the model menu: each label says whether the weights are here."""
        out = []
        for m in self.models:
            ok, _ = self.status(m)
            out.append((f"{m} — {'ready' if ok else 'weights missing'}", m))
        return out

    def default_model(self) -> str:
        for m in ("pisa-sr", "realesrgan-x4plus"):
            if m in self.models and self.status(m)[0]:
                return m
        ready = [m for m in self.models if self.status(m)[0]]
        return (ready or self.models)[0]

    def pipeline(self, model_id: str):
        """The loaded pipeline (loaded on first use and kept)."""
        with self._lock:
            pipe = self.pipelines.get(model_id)
            if pipe is None:
                from ..api import load_pipeline

                spec = self.spec(model_id)
                kwargs = _accepted(spec, self.load_kwargs.get("*", {}))  # e.g. sd= for the diffusion models
                kwargs.update(self.load_kwargs.get(spec.family, {}))
                kwargs.update(self.load_kwargs.get(model_id, {}))
                try:
                    pipe = load_pipeline(model_id, device=self.device, dtype=self.dtype, **kwargs)
                except RealisrError as e:
                    raise RealisrError(redact(str(e))) from None
                self.pipelines[model_id] = pipe
            return pipe

    # -- sessions ---------------------------------------------------------------------------------------------
    def session(self, key: str) -> Session:
        with self._lock:
            self._expire()
            s = self.sessions.get(key)
            if s is None:
                folder = Path(tempfile.mkdtemp(prefix="s-", dir=self.root))
                s = self.sessions[key] = Session(key=key, folder=folder)
            s.touched = time.monotonic()
            return s

    def close_session(self, key: str) -> None:
        with self._lock:
            s = self.sessions.pop(key, None)
        if s is not None:
            s.close()
            logger.info("session closed: files deleted")

    def _expire(self) -> None:
        now = time.monotonic()
        for k in [k for k, s in self.sessions.items() if now - s.touched > self.session_ttl]:
            self.sessions.pop(k).close()

    def close(self) -> None:
        for k in list(self.sessions):
            self.close_session(k)
        shutil.rmtree(self.root, ignore_errors=True)

    def add_uploads(self, session: Session, files: list[tuple[str, str]]) -> list[Upload]:
        """Take uploaded files ``[(server temp path, user's file name)]`` into the session.

        Files over the pixel limit are kept with ``refused`` set (the UI shows the reason); unreadable files
        raise with a message naming the user's file.
        """
        from PIL import Image, UnidentifiedImageError

        if len(files) > self.limits.max_files:
            raise RefusedError(f"{len(files)} files is over this server's limit of {self.limits.max_files} per upload")
        out = []
        for tmp, name in files:
            session.originals.append(tmp)
            nice = _safe_name(name)
            size = os.path.getsize(tmp)
            if size > self.limits.max_upload_mb * 1e6:
                raise RefusedError(f"{nice} is {size / 1e6:.1f} MB, over this server's upload limit of "
                                   f"{self.limits.max_upload_mb:g} MB")
            key = f"{len(session.uploads) + 1}"
            dst = session.folder / "in" / key / nice
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(tmp, dst)
            try:
                with Image.open(dst) as im:  # the header only (no decoding)
                    w, h = im.size
            except (UnidentifiedImageError, OSError, ValueError) as e:
                raise RealisrError(f"{nice} is not an image realisr can read ({redact(str(e))})") from None
            up = Upload(key=key, name=nice, path=dst, width=w, height=h)
            if w * h > self.limits.max_pixels:
                up.refused = (f"{nice} is {w} x {h} = {w * h:,} pixels, over this server's limit of "
                              f"{self.limits.max_pixels:,} pixels: use a smaller image (the limit is "
                              "realisr serve --max-pixels)")
            session.uploads[key] = up
            out.append(up)
        return out

    def read(self, up: Upload):
        from ..io import read_image

        if up.refused:
            raise RefusedError(up.refused)
        try:
            return read_image(up.path, max_pixels=self.limits.max_pixels)
        except RealisrError as e:
            raise type(e)(redact(str(e)).replace(up.path.name, up.name)) from None

    # -- settings ---------------------------------------------------------------------------------------------
    def recipe(self, model_id: str, values: dict, *, mask: Optional[np.ndarray] = None,
               brush_dial: Optional[str] = None, brush_value: Optional[float] = None,
               ext: str = "png") -> Recipe:
        """The recipe of the current settings: dial ``values`` by name (``None``: the pipeline's default),
        plus a painted region where ``brush_dial`` takes ``brush_value`` (``mask``: uint8 ``[H, W]``)."""
        d = self.dials(model_id)
        args: dict = dict(d.fixed)
        seed = None
        for dial in d.dials:
            v = _coerce(dial, values.get(dial.name, dial.default))
            if v is not None:
                args.update(dial.sets)
            if dial.kind == "seed":
                seed = v
            elif v is not None:
                args[dial.name] = v
        maps = {}
        if mask is not None and brush_dial and np.any(mask):
            dial = d.get(brush_dial)
            if dial is None or not dial.spatial:
                raise RealisrError(f"{brush_dial} cannot be painted: choose one of {', '.join(d.spatial_names())}")
            if brush_value is None:
                raise RealisrError("set the value inside the painted region")
            args.setdefault(brush_dial, dial.default)
            maps[brush_dial] = {"mask_png": encode_mask(np.ascontiguousarray(mask, dtype=np.uint8)),
                                "inside": float(_coerce(dial, brush_value))}
        return Recipe(model=model_id, args=args, seed=seed, maps=maps, ext=ext, note="realisr serve")

    def estimate(self, model_id: str, up: Optional[Upload], values: dict) -> Optional[Estimate]:
        if up is None:
            return None
        spec = self.spec(model_id)
        d = self.dials(model_id)
        vals = {dial.name: _coerce(dial, values.get(dial.name, dial.default)) for dial in d.dials}
        rate = self.rates.get((model_id, self.device.type))
        est = estimate_run(spec, d, up.width, up.height, vals, device=self.device, limits=self.limits, rate=rate,
                           weights_loaded=model_id in self.pipelines)
        if up.refused:
            est.refused = up.refused
        return est

    # -- runs -------------------------------------------------------------------------------------------------
    def _callback(self, session: Session, progress: Optional[Callable[[ProgressEvent], None]]):
        def cb(ev: ProgressEvent) -> None:
            if session.cancel.is_set():
                raise Cancelled("cancelled")
            if progress is not None:
                progress(ev)
        return cb

    @staticmethod
    def _signature(key: str, recipe: Recipe, cheap: set):
        """What a full run depends on: a re-dial is possible while it is unchanged."""
        return (key, recipe.model, recipe.seed,
                tuple(sorted((k, repr(v)) for k, v in recipe.args.items() if k not in cheap)))

    def can_redial(self, session: Session, key: str, recipe: Recipe) -> bool:
        """Whether :meth:`render` would re-dial (no network pass) rather than run the model."""
        d = self.dials(recipe.model)
        if not d.redial or session.state is None:
            return False
        return session.state_sig == self._signature(key, recipe, set(d.cheap_names()))

    def render(self, session: Session, key: str, recipe: Recipe,
               progress: Optional[Callable[[ProgressEvent], None]] = None) -> RenderResult:
        """Run ``recipe`` on upload ``key``: a re-dial from kept state when only cheap dials changed since the
        last full run on this image, else a full call (keeping state when the model can re-dial).

        Raises:
            RefusedError: over a limit (the reason). Cancelled: the user cancelled. RealisrError: bad settings.
        """
        up = session.uploads.get(key)
        if up is None:
            raise RealisrError("upload an image first")
        spec = self.spec(recipe.model)
        est = self.estimate(recipe.model, up, recipe.args)
        if est is not None and est.refused:
            raise RefusedError(est.refused)
        d = dials_for(spec)
        data = self.read(up)
        base, method = recipe.split_call((data.height, data.width))
        cheap = set(d.cheap_names()) if d.redial else set()
        sig = self._signature(key, recipe, cheap)
        session.cancel.clear()
        cb = self._callback(session, progress)
        pipe = self.pipeline(recipe.model)
        with self._device_lock:
            t0 = time.perf_counter()
            try:
                if d.redial and session.state is not None and session.state_sig == sig:
                    kw = {k: v for k, v in {**base, **method}.items() if k in cheap}
                    out = getattr(pipe, d.redial)(session.state, callback=cb, **kw)
                    kind = "redial"
                else:
                    session.state = session.state_sig = None
                    out = pipe(data, callback=cb, generator=recipe.generator(), **base, **method, **d.keep)
                    kind = "full"
                    if d.redial:
                        session.state, session.state_sig = out.extras.get(d.state_key), sig
            except Cancelled:
                raise
            except (ValueError, TypeError) as e:
                raise RealisrError(redact(str(e))) from None
            secs = time.perf_counter() - t0
        if kind == "full":
            mp = data.width * data.height * spec.scale ** 2 / 1e6 * steps_of(spec, d, {**base, **method})
            k = (recipe.model, self.device.type)
            r = secs / max(mp, 1e-6)
            self.rates[k] = r if k not in self.rates else 0.5 * (self.rates[k] + r)
        res = RenderResult(output=out, kind=kind, seconds=secs, recipe=recipe, upload=up)
        session.last = res
        return res

    def previews(self, session: Session, res: RenderResult) -> tuple[Path, Path]:
        """8-bit PNGs for the before/after slider: the input enlarged without interpolation, and the result."""
        from PIL import Image

        out_pil = res.output.to_pil().convert("RGB")  # the view only; downloads keep alpha and bit depth
        data = self.read(res.upload)
        arr = np.clip(np.rint(data.pixels * 255.0), 0, 255).astype(np.uint8)
        before = Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr).convert("RGB")
        before = before.resize(out_pil.size, Image.NEAREST)
        folder = session.folder / "view"
        folder.mkdir(parents=True, exist_ok=True)
        n = int(time.monotonic() * 1000)
        b, a = folder / f"before_{n}.png", folder / f"after_{n}.png"
        before.save(b, "PNG")
        out_pil.save(a, "PNG")
        for old in folder.glob("*.png"):
            if old not in (a, b):
                old.unlink(missing_ok=True)
        return b, a

    def write_result(self, session: Session, ext: str = "png") -> Path:
        """The last result as ``NAME_out.EXT`` (metadata and bit depth kept, as ``realisr upscale`` writes)."""
        from ..io import write_image

        res = session.last
        if res is None:
            raise RealisrError("nothing to download yet: run the model first")
        stem = Path(res.upload.name).stem
        dst = session.folder / "out" / f"{stem}_out.{ext}"
        dst.parent.mkdir(parents=True, exist_ok=True)
        write_image(dst, res.output.image, overwrite=True)
        return dst

    def write_recipe(self, session: Session) -> Path:
        res = session.last
        if res is None:
            raise RealisrError("nothing to describe yet: run the model first")
        stem = Path(res.upload.name).stem
        return res.recipe.save(session.folder / "out" / f"{stem}_recipe.json")

    def batch(self, session: Session, keys: list[str], recipe: Recipe,
              progress: Optional[Callable[[ProgressEvent], None]] = None) -> tuple[Path, list[str]]:
        """Run ``recipe`` (its scalar settings) on several uploads; one zip of the outputs and the recipe.

        Returns:
            ``(zip path, failures as one line each)``.
        """
        from ..io import write_image
        from ..progress import report

        if recipe.maps:
            recipe = Recipe(model=recipe.model, args=recipe.args, seed=recipe.seed, ext=recipe.ext, note=recipe.note)
        if not keys:
            raise RealisrError("upload images for the batch first")
        pipe = self.pipeline(recipe.model)
        folder = session.folder / "batch"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        session.cancel.clear()
        cb = self._callback(session, None)
        failures = []
        names: set = set()
        for i, key in enumerate(keys):
            up = session.uploads[key]
            report(progress, "files", i, len(keys), up.name)
            try:
                est = self.estimate(recipe.model, up, recipe.args)
                if est is not None and est.refused:
                    raise RefusedError(est.refused)
                data = self.read(up)
                base, method = recipe.split_call()
                with self._device_lock:
                    out = pipe(data, callback=cb, generator=recipe.generator(), **base, **method)
                stem = Path(up.name).stem
                name = f"{stem}_out.{recipe.ext or 'png'}"
                j = 2
                while name in names:
                    name = f"{stem}_{j}_out.{recipe.ext or 'png'}"
                    j += 1
                names.add(name)
                write_image(folder / name, out.image, overwrite=True)
            except Cancelled:
                raise
            except (RealisrError, ValueError, TypeError, OSError, RuntimeError) as e:
                failures.append(f"{up.name}: {redact(str(e))}")
        report(progress, "files", len(keys), len(keys))
        recipe.save(folder / "recipe.json")
        zpath = session.folder / "realisr_batch.zip"
        tmp = zpath.with_suffix(".zip.tmp")
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as z:  # PNG/TIFF are already compressed
            for f in sorted(folder.iterdir()):
                z.write(f, f.name)
        os.replace(tmp, zpath)
        return zpath, failures


def _accepted(spec: ModelSpec, kwargs: dict) -> dict:
    """The constructor arguments the model's ``from_spec`` takes."""
    import inspect

    try:
        params = inspect.signature(spec.pipeline_class().from_spec).parameters
    except (TypeError, ValueError):
        return {}
    return {k: v for k, v in kwargs.items() if k in params and params[k].kind != params[k].VAR_KEYWORD}


def _coerce(dial: Dial, v):
    try:
        return dial.coerce(v)
    except ValueError as e:
        raise RealisrError(str(e)) from None
