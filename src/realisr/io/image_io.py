"""Reading and writing images for every realisr backend.

:func:`read_image` decodes PNG, JPEG, WebP, TIFF, BMP (and GIF; the first frame of animations) into
:class:`~realisr.io.types.ImageData`: float32 pixels in ``[0, 1]``, EXIF orientation applied, alpha split off,
16-bit precision kept, ICC profile and EXIF (orientation reset to 1) carried along. The pixel limit is checked
from the header before any pixel is decoded.

:func:`write_image` encodes an :class:`ImageData` atomically (temporary file in the target folder, then
``os.replace``), never overwriting unless asked, keeping alpha, 16-bit precision, ICC and EXIF where the format
can hold them. See ``docs/io.md`` for the decisions (alpha on JPEG/BMP, animations, 16-bit colour).

Pillow does the decoding and encoding. Pillow has no in-memory mode for 16-bit colour (it reduces 48/64-bit
PNG and TIFF to 8 bits), so 16-bit colour is decoded and encoded with OpenCV (and ``tifffile`` for TIFF when it
is installed, because it keeps the ICC profile); both are imported only when such an image is met.
"""

from __future__ import annotations

import io
import logging
import os
import struct
import tempfile
import threading
import warnings
import zlib
from pathlib import Path
from typing import Optional, Union

import numpy as np

from ..errors import (ImageTooLargeError, InputImageError, OutputExistsError, OutputWriteError, RealisrError,
                      UnsupportedFormatError, require)
from .types import ImageData

logger = logging.getLogger(__name__)

__all__ = [
    "read_image",
    "write_image",
    "pil_to_image_data",
    "output_format_for",
    "IMAGE_EXTENSIONS",
    "OUTPUT_EXTENSIONS",
    "DEFAULT_MAX_PIXELS",
    "UnsupportedFormatError",
    "OutputWriteError",
]

PathLike = Union[str, os.PathLike]


# -- limits -------------------------------------------------------------------------------------------------
_BUILTIN_MAX_PIXELS = 100_000_000  # 100 MP: 1.2 GB as float32 RGB, several times that once upscaled


def _max_pixels_from_env() -> Optional[int]:
    raw = os.environ.get("REALISR_MAX_PIXELS", "").strip()
    if not raw:
        return _BUILTIN_MAX_PIXELS
    if raw.lower() in ("0", "none", "off", "unlimited"):
        return None
    try:
        value = int(float(raw))
    except ValueError:
        value = -1
    if value < 0:
        logger.warning("REALISR_MAX_PIXELS=%r is not a pixel count; using %d", raw, _BUILTIN_MAX_PIXELS)
        return _BUILTIN_MAX_PIXELS
    return value or None


#: Largest input (width x height) :func:`read_image` decodes by default; ``REALISR_MAX_PIXELS`` overrides it
#: (``0`` or ``none``: no limit).
DEFAULT_MAX_PIXELS: Optional[int] = _max_pixels_from_env()

# -- formats ------------------------------------------------------------------------------------------------
#: Extensions (lower case, with the dot) that :func:`read_image` accepts; a folder scan uses this set.
IMAGE_EXTENSIONS = frozenset({
    ".png", ".apng", ".jpg", ".jpeg", ".jpe", ".jfif", ".webp", ".tif", ".tiff", ".bmp", ".dib", ".gif",
})

# Pillow plugins read_image may use. A closed list: Pillow also opens EPS (through Ghostscript), PSD, ICO and
# more, which an upscaler has no business running on untrusted files. (Pillow's JPEG plugin itself opens a
# multi-picture camera JPEG as MPO.)
_READ_FORMATS = ("PNG", "JPEG", "WEBP", "TIFF", "BMP", "DIB", "GIF")

_OUTPUT_FORMATS = {
    "png": "PNG", "apng": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "jpe": "JPEG", "jfif": "JPEG", "webp": "WEBP",
    "tif": "TIFF", "tiff": "TIFF", "bmp": "BMP", "dib": "BMP",
}
#: Extensions :func:`write_image` can write (every readable one but ``.gif``).
OUTPUT_EXTENSIONS = frozenset("." + k for k in _OUTPUT_FORMATS)
_SIXTEEN_BIT_FORMATS = ("PNG", "TIFF")
_ALPHA_FORMATS = ("PNG", "WEBP", "TIFF")

_ORIENTATION = 0x0112
_EXIF_IFD = 0x8769
_PIXEL_X, _PIXEL_Y = 0xA002, 0xA003

_pillow_limit_lock = threading.Lock()


def output_format_for(path_or_ext: Union[PathLike, str]) -> str:
    """The Pillow format name (``"PNG"``, ``"JPEG"``, ``"WEBP"``, ``"TIFF"``, ``"BMP"``) for an output.

    Args:
        path_or_ext: a path (``"out/x.png"``), an extension (``".jpg"``) or a format name (``"jpeg"``, ``"tif"``).

    Returns:
        The format name :func:`write_image` passes to the encoder.

    Raises:
        UnsupportedFormatError: the extension is missing or not one realisr writes.
    """
    s = os.fspath(path_or_ext)
    key = s.lower()
    if key.lstrip(".") not in _OUTPUT_FORMATS:
        key = Path(s).suffix.lower()
    key = key.lstrip(".")
    if key not in _OUTPUT_FORMATS:
        raise UnsupportedFormatError(
            f"cannot write {'no' if not key else repr('.' + key)} image format for {s!r}: use one of "
            f"{', '.join(sorted(OUTPUT_EXTENSIONS))} (or pass fmt=)")
    return _OUTPUT_FORMATS[key]


# -- reading ------------------------------------------------------------------------------------------------
def read_image(path: Union[PathLike, bytes, "io.IOBase"], *, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS,
               name: Optional[str] = None) -> ImageData:
    """Decode an image file, or its bytes.

    Args:
        path: the file (PNG, JPEG, WebP, TIFF, BMP, GIF), its bytes (``bytes``, ``bytearray``, ``memoryview``),
            or a binary file object to read them from (e.g. the bytes a Ray task read); decoded the same way
            either way (16-bit, alpha, ICC and EXIF kept).
        max_pixels: refuse images with more than this many pixels (``None`` or ``0``: no limit). Decided from
            the header, before any pixel is decoded.
        name: how messages name the image when it is given as bytes (default ``"<bytes>"``).

    Returns:
        :class:`ImageData`: pixels upright (EXIF orientation applied), float32 in ``[0, 1]``; alpha split off;
        ``bit_depth`` 16 for 16-bit sources; ICC profile and EXIF (orientation reset to 1) kept;
        ``info["n_frames"]`` for animations (only the first frame is read).

    Raises:
        InputImageError: missing, empty, truncated, corrupt or not an image; the message names the file.
        ImageTooLargeError: more pixels than ``max_pixels``.
    """
    from PIL import Image, UnidentifiedImageError

    raw: Optional[bytes] = None
    if isinstance(path, (bytes, bytearray, memoryview)) or hasattr(path, "read"):
        try:
            raw = bytes(path.read() if hasattr(path, "read") else path)
        except OSError as e:
            raise InputImageError(f"cannot read input image {name or '<bytes>'}: {e.strerror or e}") from None
        p = Path(name or "<bytes>")
        size = len(raw)
    else:
        p = Path(path)
        if not p.exists():
            raise InputImageError(f"input image not found: {p}")
        if p.is_dir():
            raise InputImageError(f"input image {p} is a folder, not a file")
        try:
            size = p.stat().st_size
        except OSError as e:
            raise InputImageError(f"cannot read input image {p}: {e.strerror or e}") from None
    if size == 0:
        raise InputImageError(f"input image {p} is empty (0 bytes)")

    if max_pixels is not None and max_pixels < 0:
        raise ValueError(f"max_pixels must be >= 0 (0 or None: no limit), got {max_pixels}")
    try:
        fh = io.BytesIO(raw) if raw is not None else open(p, "rb")
    except OSError as e:
        raise InputImageError(f"cannot open input image {p}: {e.strerror or e}") from None
    try:
        with fh:
            with _pillow_limit_lock, warnings.catch_warnings():
                # Our own limit replaces Pillow's global one (checked below from the same header).
                saved = Image.MAX_IMAGE_PIXELS
                Image.MAX_IMAGE_PIXELS = None
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                try:
                    im = Image.open(fh, formats=_READ_FORMATS)
                finally:
                    Image.MAX_IMAGE_PIXELS = saved
            with im:
                w, h = im.size
                if max_pixels and w * h > max_pixels:
                    raise ImageTooLargeError(
                        f"input image {p} is {w}x{h} = {w * h:,} pixels, over the limit of {max_pixels:,}: "
                        "raise it with --max-pixels N (or REALISR_MAX_PIXELS=N, 0 for no limit) if you trust "
                        "the file and have the memory")
                if w < 1 or h < 1:
                    raise InputImageError(f"input image {p} has no pixels ({w}x{h})")
                data = _decode(im, p, raw=raw)
    except RealisrError:
        raise
    except UnidentifiedImageError:
        raise InputImageError(
            f"{p} is not an image realisr can read (or is corrupt): supported are "
            "PNG, JPEG, WebP, TIFF, BMP, GIF") from None
    except MemoryError:
        raise InputImageError(f"not enough memory to decode {p}: try a smaller image") from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error, IndexError, KeyError,
            TypeError) as e:
        raise InputImageError(f"cannot decode input image {p}: {_reason(e)}") from None
    data.info.setdefault("path", str(p))
    return data


def _reason(e: BaseException) -> str:
    msg = " ".join(str(e).split()) or type(e).__name__
    low = msg.lower()
    if "truncated" in low or "broken data stream" in low or isinstance(e, EOFError):
        return f"the file is truncated or damaged ({msg}); re-download or re-export it"
    return f"the file is corrupt or uses an unsupported variant ({msg})"


def pil_to_image_data(img, *, exif_transpose: bool = True) -> ImageData:
    """Convert a PIL image of any mode to :class:`ImageData`.

    Palette images become RGB (RGBA if the palette has transparency), ``LA``/``RGBA`` split off alpha, CMYK is
    converted to RGB through its embedded ICC profile when it has one, ``I;16`` stays 16-bit grey.

    Args:
        img: a ``PIL.Image.Image``.
        exif_transpose: apply the EXIF orientation (as :func:`read_image` does) and reset it to 1.

    Returns:
        :class:`ImageData`.

    Raises:
        InputImageError: the image mode cannot be converted.
    """
    path = None
    filename = getattr(img, "filename", None)
    if filename and getattr(img, "tile", None) and _is_high_bit_colour(img) and os.path.isfile(filename):
        path = Path(filename)  # not yet decoded and read from a file: the 16-bit colour can still be had
    return _decode(img, path, exif_transpose=exif_transpose)


def _raw_mode(im) -> str:
    tile = getattr(im, "tile", None) or []
    for t in tile:
        args = t[-1] if not hasattr(t, "args") else t.args
        raw = args if isinstance(args, str) else (args[0] if isinstance(args, tuple) and args else "")
        if isinstance(raw, str) and raw:
            return raw
    return ""


def _is_high_bit_colour(im) -> bool:
    """Whether Pillow would reduce this (not yet loaded) image from 16 bits per sample to 8."""
    if im.mode not in ("RGB", "RGBA", "RGBa", "LA"):
        return False  # grey I;16 keeps full precision in Pillow; CMYK & co. go through Pillow's conversions
    if ";16" in _raw_mode(im):
        return True
    if getattr(im, "format", None) == "TIFF":
        bits = getattr(im, "tag_v2", {}).get(258)
        bits = bits if isinstance(bits, tuple) else (bits,)
        return any(isinstance(b, int) and b > 8 for b in bits)
    return False


def _decode(im, path: Optional[Path], *, exif_transpose: bool = True, raw: Optional[bytes] = None) -> ImageData:
    """``path`` names the image in messages and is where 16-bit colour is re-read from (``raw``: its bytes)."""
    src_format = getattr(im, "format", None)
    src_mode = im.mode
    info: dict = {}
    n_frames = int(getattr(im, "n_frames", 1) or 1)
    if n_frames > 1 or getattr(im, "is_animated", False):
        info["n_frames"] = n_frames
        if src_format == "MPO":  # a camera JPEG with extra pictures (depth map, preview): the first is the photo
            logger.info("%s holds %d pictures: processing the first", path or "the image", n_frames)
        else:
            logger.warning("%s is animated (%d frames): only the first frame is processed",
                           path or "the image", n_frames)
    if "dpi" in im.info:
        info["dpi"] = im.info["dpi"]

    # Read before anything loads the image: Pillow forgets the raw mode once decoded (and getexif() of a PNG
    # decodes it to look for a late eXIf chunk).
    raw_mode = _raw_mode(im)
    high_bit = (path is not None or raw is not None) and _is_high_bit_colour(im)
    header_orientation = _orientation(im.getexif())

    rgb16 = None
    if high_bit:
        rgb16 = _decode_16bit_colour(path, raw_mode, raw)
    im.load()  # Pillow applies (and removes) a TIFF orientation tag itself on load
    # The orientation still to apply to Pillow's pixels, and to OpenCV's (which may have applied it or not).
    orientation = _orientation(im.getexif())
    if rgb16 is not None and header_orientation != 1:
        state = _opencv_orientation(im, orientation, rgb16[0], header_orientation)
        if state is None:
            logger.warning("could not tell how OpenCV oriented %s: reading it as 8-bit", path)
            rgb16 = None
        else:
            orientation = state
    if rgb16 is not None:
        pixels, alpha, bit_depth = rgb16
        mode = "LA" if raw_mode.startswith("LA") else src_mode
    else:
        pixels, alpha, bit_depth, mode = _pil_pixels(im)

    exif = im.getexif()
    kept_exif = None
    if "exif" in im.info and len(exif):
        if exif_transpose:
            exif[_ORIENTATION] = 1
        kept_exif = exif.tobytes()
    if exif_transpose and orientation != 1:
        pixels = _apply_orientation(pixels, orientation)
        if alpha is not None:
            alpha = _apply_orientation(alpha, orientation)
    if header_orientation != 1:
        info["orientation"] = header_orientation  # the source's tag (the pixels are upright)
    icc = im.info.get("icc_profile") or None
    if src_mode == "CMYK":
        icc = None  # converted to sRGB; an untagged output is read as sRGB
    return ImageData(pixels=np.ascontiguousarray(pixels, dtype=np.float32),
                     alpha=None if alpha is None else np.ascontiguousarray(alpha, dtype=np.float32),
                     bit_depth=bit_depth, icc_profile=icc, exif=kept_exif, format=src_format, mode=mode,
                     info=info)


def _pil_pixels(im):
    """(pixels [H,W,C], alpha [H,W] or None, bit_depth, mode) from a loaded PIL image."""
    mode = im.mode
    has_trns = getattr(im, "has_transparency_data", False) and mode in ("P", "L", "RGB")
    if mode == "1":
        im = im.convert("L")
    elif mode in ("P", "PA"):
        im = im.convert("RGBA" if (mode == "PA" or has_trns) else "RGB")
    elif mode == "L" and has_trns:
        im = im.convert("LA")
    elif mode == "RGB" and has_trns:
        im = im.convert("RGBA")
    elif mode == "La":
        im = im.convert("LA")
    elif mode in ("RGBa", "RGBX"):
        im = im.convert("RGBA" if mode == "RGBa" else "RGB")
    elif mode == "CMYK":
        im = _cmyk_to_rgb(im)
    elif mode.startswith("I;16") or mode in ("I", "F"):
        arr = np.asarray(im)
        if mode == "F":
            f = arr.astype(np.float32)
            if f.size and (np.nanmin(f) < 0 or np.nanmax(f) > 1):
                logger.warning("floating-point image outside [0, 1]: values are clipped")
            f = np.nan_to_num(f, nan=0.0)
        else:
            f = arr.astype(np.float32) / 65535.0
        return np.clip(f, 0.0, 1.0)[..., None], None, 16, mode
    elif mode not in ("L", "LA", "RGB", "RGBA"):
        try:
            im = im.convert("RGBA" if "A" in mode else "RGB")
        except (ValueError, OSError) as e:
            raise InputImageError(f"unsupported image mode {mode!r}: {e}") from None
    arr = np.asarray(im)
    if arr.dtype != np.uint8:
        raise InputImageError(f"unsupported image mode {im.mode!r} ({arr.dtype})")
    f = arr.astype(np.float32) / 255.0
    if f.ndim == 2:
        f = f[..., None]
    alpha = None
    if im.mode in ("LA", "RGBA"):
        alpha = f[..., -1]
        f = f[..., :-1]
    return f, alpha, 8, mode


def _cmyk_to_rgb(im):
    """CMYK -> sRGB through the embedded profile when there is one, else Pillow's naive formula."""
    icc = im.info.get("icc_profile")
    if icc:
        try:
            from PIL import ImageCms

            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            dst = ImageCms.createProfile("sRGB")
            return ImageCms.profileToProfile(im, src, dst, outputMode="RGB",
                                             renderingIntent=ImageCms.Intent.PERCEPTUAL)
        except Exception as e:  # a broken profile should not stop the conversion
            logger.warning("could not use the embedded CMYK ICC profile (%s): converting without it", e)
    return im.convert("RGB")


def _decode_16bit_colour(path: Path, raw_mode: str, raw: Optional[bytes] = None):
    """Decode 16-bit colour PNG/TIFF with OpenCV (Pillow would reduce it to 8 bits); from ``raw`` when given."""
    try:
        import cv2
    except ImportError:
        logger.warning("%s has 16-bit colour but OpenCV is not installed: reading it as 8-bit "
                       "(pip install opencv-python-headless to keep the precision)", path)
        return None
    buf = np.frombuffer(raw, dtype=np.uint8) if raw is not None else np.fromfile(path, dtype=np.uint8)
    arr = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)  # UNCHANGED: keeps 16 bits and alpha, ignores orientation
    if arr is None or arr.dtype not in (np.uint8, np.uint16):
        logger.warning("OpenCV could not decode the 16-bit colour of %s: reading it as 8-bit", path)
        return None
    peak = 65535.0 if arr.dtype == np.uint16 else 255.0
    f = arr.astype(np.float32) / peak
    if f.ndim == 2:
        f = f[..., None]
    alpha = None
    if f.shape[2] == 4:
        alpha = f[..., 3]
        f = f[..., [2, 1, 0]]
    elif f.shape[2] == 3:
        f = f[..., ::-1]
    elif f.shape[2] == 2:
        alpha, f = f[..., 1], f[..., :1]
    if raw_mode.startswith(("L", "I")) and f.shape[2] == 3:
        f = f[..., :1]  # grey(+alpha) that OpenCV expanded to BGR(A)
    if raw_mode.startswith("RGBa") and alpha is not None:  # premultiplied (TIFF associated alpha)
        safe = np.where(alpha > 0, alpha, 1.0)[..., None]
        f = np.where(alpha[..., None] > 0, np.clip(f / safe, 0.0, 1.0), 0.0)
    return f, alpha, 16 if arr.dtype == np.uint16 else 8


def _orientation(exif) -> int:
    o = exif.get(_ORIENTATION, 1)
    if o not in range(1, 9):
        logger.debug("ignoring invalid EXIF orientation %r", o)
        return 1
    return int(o)


def _opencv_orientation(im, pil_orientation: int, pixels: np.ndarray, header_orientation: int) -> Optional[int]:
    """The orientation still to apply to OpenCV's 16-bit pixels: ``header_orientation`` (as stored) or 1
    (OpenCV 5 applies a TIFF orientation tag itself even with ``IMREAD_UNCHANGED``; 4.x and PNG ``eXIf`` do
    not). Told apart by comparing with Pillow's loaded 8-bit pixels (made upright); ``None`` if neither fits."""
    ref = np.asarray(im).astype(np.float32)
    ref = ref[..., : pixels.shape[2]] if ref.ndim == 3 else ref[..., None]
    ref = _apply_orientation(ref, pil_orientation)
    got = pixels * 255.0

    def close(a, b):
        return a.shape == b.shape and float(np.abs(a - b).mean()) < 2.0

    if close(got, ref):
        return 1
    if close(_apply_orientation(got, header_orientation), ref):
        return header_orientation
    return None


def _apply_orientation(a: np.ndarray, orientation) -> np.ndarray:
    """Make an EXIF-oriented array upright (the same transposes as ``PIL.ImageOps.exif_transpose``)."""
    if orientation == 2:
        return a[:, ::-1]
    if orientation == 3:
        return a[::-1, ::-1]
    if orientation == 4:
        return a[::-1]
    if orientation == 5:
        return a.swapaxes(0, 1)
    if orientation == 6:
        return np.rot90(a, k=-1)
    if orientation == 7:
        return a[::-1, ::-1].swapaxes(0, 1)
    if orientation == 8:
        return np.rot90(a, k=1)
    return a


# -- writing ------------------------------------------------------------------------------------------------
def write_image(path: PathLike, data: ImageData, *, overwrite: bool = False, fmt: Optional[str] = None,
                bit_depth: Optional[int] = None, quality: int = 95) -> Path:
    """Encode ``data`` to ``path`` atomically.

    Args:
        path: the output file; missing parent folders are created.
        data: the image (:class:`ImageData`; pixels float in ``[0, 1]``).
        overwrite: replace an existing file; without it an existing file is an error and is left untouched.
        fmt: output format (``"png"``, ``"jpg"``, ``"webp"``, ``"tif"``, ``"bmp"``); default from the extension.
        bit_depth: 8 or 16; default 16 when ``data.bit_depth`` is 16 and the format allows it (PNG, TIFF).
        quality: JPEG/WebP quality 1-100; WebP at 100 is lossless; JPEG at 90 or more uses 4:4:4 chroma.

    Returns:
        The path written.

    Raises:
        OutputExistsError: the file exists and ``overwrite`` is false.
        UnsupportedFormatError: unknown format, or 16-bit asked for a format without it.
        OutputWriteError: the file system refused the write; no partial file is left.
        ValueError: ``quality`` or ``bit_depth`` out of range, or malformed pixels.
    """
    path = Path(path)
    fmt_name = output_format_for(fmt if fmt else path)
    if path.is_dir():
        raise OutputExistsError(f"output {path} is a folder: give a file name")
    if path.exists() and not overwrite:
        raise OutputExistsError(f"output {path} exists: pass --overwrite to replace it")
    if bit_depth is None:
        if data.bit_depth == 16 and fmt_name not in _SIXTEEN_BIT_FORMATS:
            logger.warning("%s: %s holds 8 bits per channel, so the 16-bit image is written with 8 (use a .png or "
                           ".tif output, --ext png/tif, to keep 16 bits)", path.name, fmt_name)
        bit_depth = 16 if data.bit_depth == 16 and fmt_name in _SIXTEEN_BIT_FORMATS else 8
        if bit_depth == 16 and not _can_write_16bit(data, fmt_name):
            logger.warning("writing %s with 8 bits per channel: 16-bit colour needs OpenCV "
                           "(pip install opencv-python-headless)", path.name)
            bit_depth = 8
    if bit_depth not in (8, 16):
        raise ValueError(f"bit_depth must be 8 or 16, got {bit_depth!r}")
    if bit_depth == 16 and fmt_name not in _SIXTEEN_BIT_FORMATS:
        raise UnsupportedFormatError(f"{fmt_name} cannot hold 16 bits per channel: write PNG or TIFF, "
                                     "or use 8 bits")
    if not (isinstance(quality, (int, np.integer)) and 1 <= quality <= 100):
        raise ValueError(f"quality must be an integer in 1..100, got {quality!r}")

    pixels, alpha = _prepare(data, fmt_name, path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    except OSError as e:
        raise OutputWriteError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            _encode(fh, pixels, alpha, data, fmt_name, bit_depth, int(quality))
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        _commit(tmp, path, overwrite)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError) and not isinstance(e, RealisrError):
            raise OutputWriteError(f"cannot write {path}: {e.strerror or e}") from None
        raise
    logger.debug("wrote %s (%s, %d-bit)", path, fmt_name, bit_depth)
    return path


def _can_write_16bit(data: ImageData, fmt_name: str) -> bool:
    """Whether the encoder that 16-bit ``data`` needs is installed (Pillow alone does 16-bit grey)."""
    import importlib.util

    if data.is_grey and data.alpha is None:
        return True
    needed = ("cv2",) if fmt_name == "PNG" else ("tifffile", "cv2")
    return any(importlib.util.find_spec(m) is not None for m in needed)


_UMASK: Optional[int] = None


def _umask() -> int:
    global _UMASK
    if _UMASK is None:  # mkstemp creates 0600; give the output the permissions a plain open() would
        current = os.umask(0o022)
        os.umask(current)
        _UMASK = current
    return _UMASK


def _commit(tmp: str, path: Path, overwrite: bool) -> None:
    if overwrite:
        os.replace(tmp, path)
        return
    # A hard link fails if the target appeared meanwhile (no check-then-replace race); not every file
    # system has them, so fall back to check + replace there.
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise OutputExistsError(f"output {path} exists: pass --overwrite to replace it") from None
    except OSError:
        if path.exists():
            raise OutputExistsError(
                f"output {path} exists: pass --overwrite to replace it") from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)


def _prepare(data: ImageData, fmt_name: str, path: Path):
    px = np.asarray(data.pixels, dtype=np.float32)
    if px.ndim == 2:
        px = px[..., None]
    if px.ndim != 3 or px.shape[2] not in (1, 3) or px.shape[0] < 1 or px.shape[1] < 1:
        raise ValueError(f"expected pixels [H, W, 1 or 3], got shape {px.shape}")
    px = np.nan_to_num(px, nan=0.0)
    alpha = None if data.alpha is None else np.nan_to_num(np.asarray(data.alpha, dtype=np.float32), nan=1.0)
    if alpha is not None:
        if alpha.ndim == 3 and alpha.shape[2] == 1:
            alpha = alpha[..., 0]
        if alpha.shape != px.shape[:2]:
            raise ValueError(f"alpha shape {alpha.shape} does not match the pixels {px.shape[:2]}")
        if fmt_name not in _ALPHA_FORMATS:
            if np.any(alpha < 1.0):
                logger.warning("%s cannot hold transparency: compositing %s onto white (write PNG, WebP or "
                               "TIFF to keep alpha)", fmt_name, path.name)
            a = np.clip(alpha, 0.0, 1.0)[..., None]
            px = np.clip(px, 0.0, 1.0) * a + (1.0 - a)
            alpha = None
    return px, alpha


def _quantise(x: np.ndarray, bits: int) -> np.ndarray:
    peak = 255 if bits == 8 else 65535
    return np.clip(np.rint(x * peak), 0, peak).astype(np.uint8 if bits == 8 else np.uint16)


def _exif_for_output(exif: Optional[bytes], width: int, height: int) -> Optional[bytes]:
    """The kept EXIF with orientation 1 and the pixel dimensions of the new image."""
    if not exif:
        return None
    from PIL import Image

    try:
        e = Image.Exif()
        e.load(exif)
        if _ORIENTATION in e:
            e[_ORIENTATION] = 1
        if _EXIF_IFD in e:
            ifd = e.get_ifd(_EXIF_IFD)
            if _PIXEL_X in ifd:
                ifd[_PIXEL_X] = width
            if _PIXEL_Y in ifd:
                ifd[_PIXEL_Y] = height
        return e.tobytes()
    except Exception as err:  # metadata must never stop an output
        logger.warning("dropping unreadable EXIF data (%s)", err)
        return None


def _encode(fh, px: np.ndarray, alpha: Optional[np.ndarray], data: ImageData, fmt_name: str, bits: int,
            quality: int) -> None:
    from PIL import Image

    h, w = px.shape[:2]
    grey = px.shape[2] == 1
    out_grey = grey and fmt_name != "WEBP" and not (bits == 16 and alpha is not None)
    icc = _icc_for_output(data.icc_profile, out_grey) if fmt_name != "BMP" else None
    exif = _exif_for_output(data.exif, w, h) if fmt_name != "BMP" else None

    if bits == 16 and (not grey or alpha is not None):  # Pillow has no 16-bit RGB(A)/LA mode
        arr = _quantise(np.repeat(px, 3, axis=2) if grey else px, 16)
        if alpha is not None:
            arr = np.concatenate([arr, _quantise(alpha, 16)[..., None]], axis=2)
        if fmt_name == "PNG":
            fh.write(_png_16bit_colour(arr, icc, exif))
        else:
            fh.write(_tiff_16bit_colour(arr, icc))
        return

    if bits == 16:  # grey without alpha: Pillow's I;16 keeps it
        img = Image.fromarray(_quantise(px[..., 0], 16))
        if img.mode != "I;16":
            img = img.convert("I;16")
    else:
        arr = _quantise(px, 8)
        if fmt_name == "WEBP" and grey:
            arr = np.repeat(arr, 3, axis=2)  # WebP has no grey mode
        if alpha is not None:
            arr = np.concatenate([arr, _quantise(alpha, 8)[..., None]], axis=2)
        mode = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[arr.shape[2]]
        img = Image.fromarray(arr[..., 0] if mode == "L" else arr, mode)

    kw: dict = {}
    if icc:
        kw["icc_profile"] = icc
    if exif:
        kw["exif"] = exif
    if fmt_name == "JPEG":
        kw.update(quality=quality, subsampling=0 if quality >= 90 else 2)
    elif fmt_name == "WEBP":
        kw.update(quality=quality, lossless=quality >= 100, exact=alpha is not None)
    elif fmt_name == "TIFF":
        kw.update(compression="tiff_adobe_deflate")
        if exif:
            kw["exif"] = _tiff_ifd0_exif(exif)
    elif fmt_name == "PNG":
        kw.update(compress_level=6)
    img.save(fh, format=fmt_name, **kw)


def _icc_for_output(icc: Optional[bytes], grey: bool) -> Optional[bytes]:
    """The profile if its colour space (ICC header bytes 16-20) fits the output's channels, else None: a grey
    profile on RGB pixels (or the reverse) makes a file that colour-managed readers reject."""
    if not icc or len(icc) < 128:
        return None
    space = icc[16:20]
    if space == (b"GRAY" if grey else b"RGB "):
        return icc
    logger.warning("not writing the %s ICC profile to a %s image", space.decode("latin-1").strip() or "unknown",
                   "grey" if grey else "colour")
    return None


def _tiff_ifd0_exif(exif: bytes) -> Optional[bytes]:
    """The EXIF tags of IFD0 (make, model, date, ...) without the Exif/GPS sub-IFD pointers: libtiff refuses
    those when it compresses (Pillow passes the pointer as a plain tag)."""
    from PIL import Image

    e = Image.Exif()
    e.load(exif)
    for pointer in (_EXIF_IFD, 0x8825, 0xA005):  # Exif, GPS, interoperability
        if pointer in e:
            del e[pointer]
    return e.tobytes() if len(e) else None


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _png_16bit_colour(arr: np.ndarray, icc: Optional[bytes], exif: Optional[bytes]) -> bytes:
    """48/64-bit PNG via OpenCV, with the iCCP and eXIf chunks OpenCV cannot write added after IHDR.

    Written by hand because no installed encoder does both: Pillow cannot hold 16-bit colour and OpenCV
    drops metadata. The chunks follow the PNG 1.2 / 1.5 (eXIf) specification.
    """
    cv2 = require("cv2", "io")
    bgr = arr[..., [2, 1, 0, 3]] if arr.shape[2] == 4 else arr[..., ::-1]
    ok, enc = cv2.imencode(".png", np.ascontiguousarray(bgr))
    if not ok:
        raise OSError("OpenCV could not encode the 16-bit PNG")
    png = enc.tobytes()
    extra = b""
    if icc:
        extra += _png_chunk(b"iCCP", b"ICC Profile\x00\x00" + zlib.compress(icc))
    if exif:
        raw = exif[6:] if exif.startswith(b"Exif\x00\x00") else exif
        extra += _png_chunk(b"eXIf", raw)
    if not extra:
        return png
    ihdr_end = 8 + 4 + 4 + 13 + 4  # signature, IHDR length, type, data, crc
    return png[:ihdr_end] + extra + png[ihdr_end:]


def _tiff_16bit_colour(arr: np.ndarray, icc: Optional[bytes]) -> bytes:
    """48/64-bit TIFF: tifffile when installed (keeps the ICC profile), else OpenCV (no metadata)."""
    try:
        import tifffile
    except ImportError:
        tifffile = None
    if tifffile is not None:
        buf = io.BytesIO()
        extratags = [(34675, "B", len(icc), icc, True)] if icc else []
        tifffile.imwrite(buf, arr, photometric="rgb", compression="zlib",
                         extrasamples=("unassalpha",) if arr.shape[2] == 4 else None, extratags=extratags,
                         metadata=None)
        return buf.getvalue()
    cv2 = require("cv2", "io")
    if icc:
        logger.warning("the ICC profile is not kept in 16-bit colour TIFF without tifffile (pip install tifffile)")
    bgr = arr[..., [2, 1, 0, 3]] if arr.shape[2] == 4 else arr[..., ::-1]
    ok, enc = cv2.imencode(".tiff", np.ascontiguousarray(bgr))
    if not ok:
        raise OSError("OpenCV could not encode the 16-bit TIFF")
    return enc.tobytes()
