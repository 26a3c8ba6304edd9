"""realisr.io.image_io: decoding (orientation, modes, 16-bit, metadata), errors, atomic writes.

Every image is generated here; files are written with Pillow, OpenCV, tifffile or by hand (raw PNG chunks),
never by the code under test, when they are the input of a read test.
"""

from __future__ import annotations

import functools

import io
import logging
import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageCms, ImageOps

from realisr.errors import ImageTooLargeError, InputImageError, OutputExistsError
from realisr.io import image_io
from realisr.io.image_io import (IMAGE_EXTENSIONS, OUTPUT_EXTENSIONS, UnsupportedFormatError, output_format_for,
                                 pil_to_image_data, read_image, write_image)
from realisr.io.types import ImageData

cv2 = pytest.importorskip("cv2")

RNG = np.random.default_rng(1234)
ORIENTATION = 0x0112


def pattern(h=4, w=6):
    """An asymmetric uint8 RGB pattern: every pixel differs, so any flip or rotation is visible."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 40 + 5, y * 60 + 3, (x * 7 + y * 31) % 256], axis=2).astype(np.uint8)


def u16_values(shape):
    """uint16 values none of which is a multiple of 257 (so none survives a trip through 8 bits)."""
    v = RNG.integers(0, 65535, size=shape).astype(np.uint16)
    v[v % 257 == 0] += 1
    return v


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def raw_png(width, height, bit_depth, colour_type, rows: bytes, extra: bytes = b"") -> bytes:
    """A PNG written by hand (filter 0 on every row), with ``extra`` chunks before the image data."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + extra + png_chunk(b"IDAT", zlib.compress(rows))
            + png_chunk(b"IEND", b""))


def raw_png_u16(arr: np.ndarray, extra: bytes = b"") -> bytes:
    """16-bit PNG of an ``[H, W, C]`` uint16 array (C: 1 grey, 2 grey+alpha, 3 RGB, 4 RGBA)."""
    h, w, c = arr.shape
    rows = b"".join(b"\x00" + arr[i].astype(">u2").tobytes() for i in range(h))
    return raw_png(w, h, 16, {1: 0, 2: 4, 3: 2, 4: 6}[c], rows, extra)


@functools.lru_cache(maxsize=None)
def srgb_icc() -> bytes:
    """One sRGB profile per session: a new one carries the current time, so two calls can differ."""
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def to_u8(x):
    return np.clip(np.rint(np.asarray(x) * 255), 0, 255).astype(np.uint8)


def to_u16(x):
    return np.clip(np.rint(np.asarray(x) * 65535), 0, 65535).astype(np.uint16)


# -- EXIF orientation ---------------------------------------------------------------------------------------
# How a camera stores an upright scene U for each orientation tag (the inverse of what a viewer applies).
STORED = {
    1: lambda u: u,
    2: lambda u: u[:, ::-1],  # mirrored left-right
    3: lambda u: u[::-1, ::-1],  # upside down
    4: lambda u: u[::-1],  # mirrored top-bottom
    5: lambda u: u.swapaxes(0, 1),  # transposed
    6: lambda u: np.rot90(u, k=1),  # stored turned 90 degrees counter-clockwise; viewer turns it clockwise
    7: lambda u: np.rot90(u, k=2).swapaxes(0, 1),  # transverse
    8: lambda u: np.rot90(u, k=-1),  # stored turned clockwise; viewer turns it counter-clockwise
}


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_applied_and_reset(tmp_path, orientation):
    upright = pattern()
    stored = np.ascontiguousarray(STORED[orientation](upright))
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    exif[0x010F] = "realisr-test"  # Make: must survive
    path = tmp_path / f"o{orientation}.png"
    Image.fromarray(stored).save(path, exif=exif.tobytes())
    # The test's model of the tags agrees with Pillow's own exif_transpose.
    assert np.array_equal(np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB")), upright)

    data = read_image(path)
    assert data.pixels.shape == (4, 6, 3)
    assert np.array_equal(to_u8(data.pixels), upright)
    kept = Image.Exif()
    kept.load(data.exif)
    assert kept[ORIENTATION] == 1
    assert kept[0x010F] == "realisr-test"


@pytest.mark.parametrize("orientation", [2, 5, 6, 7, 8])
def test_exif_orientation_jpeg(tmp_path, orientation):
    upright = np.kron(pattern(2, 3), np.ones((8, 8, 1), np.uint8))  # 8x8 blocks: JPEG keeps them
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    src = tmp_path / "o.jpg"
    Image.fromarray(np.ascontiguousarray(STORED[orientation](upright))).save(src, exif=exif.tobytes(), quality=100)
    data = read_image(src)
    assert data.pixels.shape == upright.shape
    assert np.abs(to_u8(data.pixels).astype(int) - upright).mean() < 3
    assert data.info["orientation"] == orientation


def test_exif_orientation_on_alpha_and_jpeg_output_not_rotated_twice(tmp_path):
    upright = np.kron(pattern(2, 3), np.ones((8, 8, 1), np.uint8))  # 16x24 blocks survive JPEG
    a = np.zeros(upright.shape[:2], np.uint8)
    a[:, :4] = 255  # opaque left strip when upright
    rgba = np.concatenate([upright, a[..., None]], axis=2)
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    path = tmp_path / "rot.png"
    Image.fromarray(np.ascontiguousarray(STORED[6](rgba)), "RGBA").save(path, exif=exif.tobytes())
    data = read_image(path)
    assert np.array_equal(to_u8(data.alpha), a)
    out = write_image(tmp_path / "out.jpg", data.with_pixels(data.pixels))  # no alpha
    with Image.open(out) as im:
        assert im.getexif()[ORIENTATION] == 1
        assert im.size == (24, 16)
        back = np.asarray(ImageOps.exif_transpose(im).convert("RGB")).astype(int)
    assert np.abs(back - upright).mean() < 4


# -- 16-bit -------------------------------------------------------------------------------------------------
def test_16bit_rgb_png_round_trip_exact(tmp_path):
    v = u16_values((5, 7, 3))
    src = tmp_path / "in16.png"
    assert cv2.imwrite(str(src), v[..., ::-1])
    data = read_image(src)
    assert data.bit_depth == 16 and data.alpha is None
    assert np.array_equal(to_u16(data.pixels), v)
    out = write_image(tmp_path / "out16.png", data)
    back = cv2.imread(str(out), cv2.IMREAD_UNCHANGED)
    assert back.dtype == np.uint16
    assert np.array_equal(back[..., ::-1], v)


def test_16bit_rgba_tiff_round_trip_exact(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    v = u16_values((6, 5, 4))
    src = tmp_path / "in16.tif"
    tifffile.imwrite(src, v, photometric="rgb", extrasamples=("unassalpha",))
    data = read_image(src)
    assert data.bit_depth == 16
    assert np.array_equal(to_u16(data.pixels), v[..., :3])
    assert np.array_equal(to_u16(data.alpha), v[..., 3])
    out = write_image(tmp_path / "out16.tiff", data)
    back = tifffile.imread(out)
    assert back.dtype == np.uint16 and np.array_equal(back, v)


def test_16bit_png_keeps_icc_and_exif(tmp_path):
    v = u16_values((3, 4, 3))
    exif = Image.Exif()
    exif[0x010F] = "cam16"
    data = ImageData(pixels=v.astype(np.float32) / 65535, bit_depth=16, icc_profile=srgb_icc(),
                     exif=exif.tobytes())
    out = write_image(tmp_path / "m16.png", data)
    with Image.open(out) as im:  # Pillow reads the metadata even though it reduces the pixels
        assert im.info["icc_profile"] == srgb_icc()
        assert im.getexif()[0x010F] == "cam16"
    assert np.array_equal(cv2.imread(str(out), cv2.IMREAD_UNCHANGED)[..., ::-1], v)


@pytest.mark.parametrize("ext", ["png", "tif"])
def test_16bit_grey_round_trip(tmp_path, ext):
    v = u16_values((5, 6))
    src = tmp_path / f"g16.{ext}"
    Image.fromarray(v).save(src)  # Pillow writes I;16
    data = read_image(src)
    assert data.bit_depth == 16 and data.is_grey and data.pixels.shape == (5, 6, 1)
    assert np.array_equal(to_u16(data.pixels[..., 0]), v)
    out = write_image(tmp_path / f"g16_out.{ext}", data)
    with Image.open(out) as im:
        assert im.mode.startswith("I;16")
        assert np.array_equal(np.asarray(im).astype(np.uint16), v)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_16bit_colour_png_orientation_applied(tmp_path, orientation):
    upright = u16_values((4, 6, 3))
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    stored = np.ascontiguousarray(STORED[orientation](upright))
    src = tmp_path / "rot16.png"
    src.write_bytes(raw_png_u16(stored, png_chunk(b"eXIf", exif.tobytes()[6:])))
    data = read_image(src)
    assert data.bit_depth == 16
    assert np.array_equal(to_u16(data.pixels), upright)
    kept = Image.Exif()
    kept.load(data.exif)
    assert kept[ORIENTATION] == 1


@pytest.mark.parametrize("orientation", range(1, 9))
def test_16bit_colour_tiff_orientation_applied_once(tmp_path, orientation):
    # OpenCV 5 applies the TIFF orientation tag itself; the result must be upright exactly once either way.
    tifffile = pytest.importorskip("tifffile")
    upright = u16_values((4, 6, 3))
    src = tmp_path / "rot16.tif"
    tifffile.imwrite(src, np.ascontiguousarray(STORED[orientation](upright)), photometric="rgb",
                     extratags=[(ORIENTATION, "H", 1, orientation, True)])
    data = read_image(src)
    assert data.bit_depth == 16
    assert np.array_equal(to_u16(data.pixels), upright)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_tiff_orientation_tag_applied_once(tmp_path, orientation):
    # Pillow itself applies a TIFF orientation tag on load: it must not be applied a second time.
    upright = pattern()
    src = tmp_path / "rot.tif"
    Image.fromarray(np.ascontiguousarray(STORED[orientation](upright))).save(src, tiffinfo={ORIENTATION: orientation})
    data = read_image(src)
    assert np.array_equal(to_u8(data.pixels), upright)


def test_16bit_premultiplied_tiff_alpha(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    a = np.array([[65535, 32768], [16384, 0]], np.uint16)
    straight = np.array([[0.25, 0.5], [0.75, 0.3]])
    colour = np.repeat(np.rint(straight * a)[..., None], 3, axis=2).astype(np.uint16)  # premultiplied
    src = tmp_path / "premul.tif"
    tifffile.imwrite(src, np.concatenate([colour, a[..., None]], axis=2), photometric="rgb",
                     extrasamples=("assocalpha",))
    data = read_image(src)
    assert data.bit_depth == 16
    assert np.array_equal(to_u16(data.alpha), a)
    assert np.allclose(data.pixels[..., 0][a > 0], straight[a > 0], atol=2e-4)


def test_pil_to_image_data_keeps_16bit_colour_of_an_opened_file(tmp_path):
    v = u16_values((3, 5, 3))
    src = tmp_path / "lazy16.png"
    src.write_bytes(raw_png_u16(v))
    with Image.open(src) as im:
        data = pil_to_image_data(im)
    assert data.bit_depth == 16 and np.array_equal(to_u16(data.pixels), v)


def test_16bit_grey_alpha_png(tmp_path):
    g, a = u16_values((3, 4)), u16_values((3, 4))
    src = tmp_path / "la16.png"
    src.write_bytes(raw_png_u16(np.stack([g, a], axis=2)))  # colour type 4: grey + alpha
    data = read_image(src)
    assert data.bit_depth == 16 and data.is_grey
    assert np.array_equal(to_u16(data.pixels[..., 0]), g)
    assert np.array_equal(to_u16(data.alpha), a)


def test_16bit_colour_without_opencv(tmp_path, monkeypatch, caplog):
    import sys

    from realisr.errors import MissingExtraError

    v = u16_values((3, 4, 3))
    src = tmp_path / "in16.png"
    src.write_bytes(raw_png_u16(v))
    monkeypatch.setitem(sys.modules, "cv2", None)  # import cv2 -> ImportError
    monkeypatch.setitem(sys.modules, "tifffile", None)
    with caplog.at_level(logging.WARNING, logger="realisr.io.image_io"):
        data = read_image(src)
    assert data.bit_depth == 8 and "opencv" in caplog.text.lower()
    assert np.abs(to_u16(data.pixels).astype(int) - v).max() <= 257  # the 8-bit approximation
    sixteen = ImageData(pixels=v.astype(np.float32) / 65535, bit_depth=16)
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name in ("cv2", "tifffile") else 1)
    out = write_image(tmp_path / "auto.png", sixteen)  # auto depth: falls back to 8 bits with a warning
    with Image.open(out) as im:
        assert im.mode == "RGB"
    with pytest.raises(MissingExtraError):
        write_image(tmp_path / "forced.png", sixteen, bit_depth=16)
    assert not (tmp_path / "forced.png").exists()
    assert sorted(os.listdir(tmp_path)) == ["auto.png", "in16.png"]


def test_16bit_data_to_jpeg_is_8bit_unless_asked(tmp_path):
    data = ImageData(pixels=np.full((4, 4, 3), 0.5, np.float32), bit_depth=16)
    out = write_image(tmp_path / "x.jpg", data)
    with Image.open(out) as im:
        assert im.mode == "RGB"
    with pytest.raises(UnsupportedFormatError, match="16 bits"):
        write_image(tmp_path / "y.jpg", data, bit_depth=16)


# -- modes --------------------------------------------------------------------------------------------------
def test_palette_with_transparency_becomes_alpha(tmp_path):
    idx = np.array([[0, 1, 2], [2, 1, 0]], np.uint8)
    im = Image.fromarray(idx, "P")
    im.putpalette([10, 20, 30, 200, 100, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    path = tmp_path / "pal.png"
    im.save(path, transparency=0)
    data = read_image(path)
    assert data.mode == "P"
    assert np.array_equal(to_u8(data.alpha), np.where(idx == 0, 0, 255))
    palette = np.array([[10, 20, 30], [200, 100, 0], [0, 0, 255]], np.uint8)
    assert np.array_equal(to_u8(data.pixels), palette[idx])


def test_palette_without_transparency_is_rgb(tmp_path):
    im = Image.fromarray(np.array([[0, 1]], np.uint8), "P")
    im.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    path = tmp_path / "pal.bmp"
    im.save(path)
    data = read_image(path)
    assert data.alpha is None
    assert np.array_equal(to_u8(data.pixels), [[[255, 0, 0], [0, 255, 0]]])


def test_la_png_round_trip(tmp_path):
    la = RNG.integers(0, 256, size=(5, 4, 2)).astype(np.uint8)
    src = tmp_path / "la.png"
    Image.fromarray(la, "LA").save(src)
    data = read_image(src)
    assert data.is_grey and data.bit_depth == 8
    assert np.array_equal(to_u8(data.pixels[..., 0]), la[..., 0])
    assert np.array_equal(to_u8(data.alpha), la[..., 1])
    out = write_image(tmp_path / "la_out.png", data)
    with Image.open(out) as im:
        assert im.mode == "LA" and np.array_equal(np.asarray(im), la)


@pytest.mark.parametrize("ext,kw", [("png", {}), ("tif", {}), ("webp", {"quality": 100})])
def test_rgba_round_trip(tmp_path, ext, kw):
    rgba = RNG.integers(0, 256, size=(6, 5, 4)).astype(np.uint8)
    src = tmp_path / f"rgba.{ext}"
    Image.fromarray(rgba, "RGBA").save(src, **({"lossless": True, "exact": True} if ext == "webp" else {}))
    data = read_image(src)
    assert data.alpha is not None
    assert np.array_equal(to_u8(data.pixels), rgba[..., :3])
    assert np.array_equal(to_u8(data.alpha), rgba[..., 3])
    out = write_image(tmp_path / f"rgba_out.{ext}", data, **kw)
    with Image.open(out) as im:
        assert im.mode == "RGBA" and np.array_equal(np.asarray(im), rgba)


def test_cmyk_input_converted_to_rgb(tmp_path):
    cmyk = np.zeros((2, 3, 4), np.uint8)
    cmyk[0, 0] = (255, 0, 0, 0)  # cyan
    cmyk[0, 1] = (0, 255, 0, 0)  # magenta
    cmyk[0, 2] = (0, 0, 0, 255)  # black
    # row 1: no ink -> white
    path = tmp_path / "cmyk.tif"
    Image.fromarray(cmyk, "CMYK").save(path)
    data = read_image(path)
    assert data.mode == "CMYK" and data.pixels.shape == (2, 3, 3) and data.alpha is None
    got = to_u8(data.pixels).astype(int)
    expected = np.array([[[0, 255, 255], [255, 0, 255], [0, 0, 0]], [[255] * 3] * 3])
    assert np.abs(got - expected).max() <= 2


def _cmyk_profile():
    candidates = [os.environ.get("REALISR_TEST_CMYK_ICC", ""),
                  "/usr/share/color/icc/ghostscript/default_cmyk.icc",  # Debian libgs-common (SWOP)
                  "/usr/share/color/icc/ghostscript/ps_cmyk.icc"]
    for c in candidates:
        if c and os.path.isfile(c):
            return open(c, "rb").read()
    pytest.skip("no CMYK ICC profile here (apt install libgs-common, or set REALISR_TEST_CMYK_ICC)")


def test_cmyk_input_uses_embedded_icc_profile(tmp_path):
    icc = _cmyk_profile()
    path = tmp_path / "cmyk_icc.tif"
    Image.fromarray(np.array([[[255, 0, 0, 0], [0, 0, 0, 0]]], np.uint8), "CMYK").save(path, icc_profile=icc)
    data = read_image(path)
    cyan, paper = to_u8(data.pixels[0]).astype(int)
    # Press cyan is far from the naive (0, 255, 255): about (0, 174, 239) in sRGB for SWOP-like profiles.
    assert cyan[0] < 30 and 150 < cyan[1] < 200 and cyan[2] > 220
    assert np.all(paper > 240)
    assert data.icc_profile is None


def test_cmyk_with_unusable_icc_falls_back_with_warning(tmp_path, caplog):
    path = tmp_path / "cmyk_badicc.jpg"
    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(path, icc_profile=b"not a real profile" * 8, quality=100)
    with caplog.at_level(logging.WARNING, logger="realisr.io.image_io"):
        data = read_image(path)
    assert "ICC" in caplog.text
    assert data.icc_profile is None  # pixels are now sRGB; the CMYK profile must not be re-attached
    assert np.abs(to_u8(data.pixels).astype(int) - [255, 0, 0]).max() <= 3  # magenta + yellow = red


def test_pil_to_image_data_modes():
    assert pil_to_image_data(Image.new("1", (3, 2), 1)).pixels.shape == (2, 3, 1)
    d = pil_to_image_data(Image.fromarray(np.full((2, 2), 40000, np.uint16)))
    assert d.bit_depth == 16 and np.all(to_u16(d.pixels) == 40000)
    d = pil_to_image_data(Image.new("RGBA", (2, 2), (1, 2, 3, 4)))
    assert np.all(to_u8(d.alpha) == 4) and np.all(to_u8(d.pixels) == [1, 2, 3])


# -- metadata -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ext", ["png", "jpg", "webp", "tif"])
def test_icc_profile_kept(tmp_path, ext):
    icc = srgb_icc()
    src = tmp_path / f"icc.{ext}"
    Image.fromarray(pattern()).save(src, icc_profile=icc)
    data = read_image(src)
    assert data.icc_profile == icc
    out = write_image(tmp_path / f"icc_out.{ext}", data)
    with Image.open(out) as im:
        assert im.info.get("icc_profile") == icc


def test_icc_profile_of_the_wrong_colour_space_is_not_written(tmp_path, caplog):
    grey = ImageData(pixels=np.full((3, 3, 1), 0.5, np.float32), icc_profile=srgb_icc())  # RGB profile
    with caplog.at_level(logging.WARNING, logger="realisr.io.image_io"):
        out = write_image(tmp_path / "g.png", grey)
    with Image.open(out) as im:
        assert im.mode == "L" and "icc_profile" not in im.info
    assert "ICC" in caplog.text
    out = write_image(tmp_path / "g.webp", grey, quality=100)  # WebP stores grey as RGB: the profile fits
    with Image.open(out) as im:
        assert im.info.get("icc_profile") == srgb_icc()


@pytest.mark.parametrize("ext", ["jpg", "png", "webp"])
def test_exif_kept_with_new_size(tmp_path, ext):
    exif = Image.Exif()
    exif[0x010F] = "realisr-cam"
    exif[0x0110] = "model-x"
    exif.get_ifd(0x8769)[0xA002] = 6  # PixelXDimension
    exif.get_ifd(0x8769)[0xA003] = 4
    src = tmp_path / f"exif.{ext}"
    Image.fromarray(pattern()).save(src, exif=exif.tobytes())
    data = read_image(src)
    bigger = data.with_pixels(np.repeat(np.repeat(data.pixels, 2, 0), 2, 1))
    out = write_image(tmp_path / f"exif_out.{ext}", bigger)
    with Image.open(out) as im:
        got = im.getexif()
        assert got[0x010F] == "realisr-cam" and got[0x0110] == "model-x"
        assert got.get_ifd(0x8769)[0xA002] == 12 and got.get_ifd(0x8769)[0xA003] == 8


def test_exif_ifd0_kept_in_tiff(tmp_path):
    exif = Image.Exif()
    exif[0x010F] = "realisr-cam"
    exif.get_ifd(0x8769)[0xA002] = 6  # the Exif sub-IFD: dropped for TIFF (libtiff refuses it)
    out = write_image(tmp_path / "exif.tif", ImageData(pixels=pattern().astype(np.float32) / 255,
                                                      exif=exif.tobytes()))
    with Image.open(out) as im:
        assert im.getexif()[0x010F] == "realisr-cam"
        assert np.array_equal(np.asarray(im), pattern())


# -- input errors -------------------------------------------------------------------------------------------
def _one_line_naming(err, path):
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg
    return msg.lower()


def test_missing_file(tmp_path):
    p = tmp_path / "nope.png"
    with pytest.raises(InputImageError) as e:
        read_image(p)
    assert "not found" in _one_line_naming(e, p)


def test_zero_byte_file(tmp_path):
    p = tmp_path / "empty.png"
    p.write_bytes(b"")
    with pytest.raises(InputImageError) as e:
        read_image(p)
    assert "empty" in _one_line_naming(e, p)


def test_text_file_named_png(tmp_path):
    p = tmp_path / "notes.png"
    p.write_text("hello, this is not a picture\n")
    with pytest.raises(InputImageError) as e:
        read_image(p)
    assert "not an image" in _one_line_naming(e, p)


def test_truncated_jpeg(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(RNG.integers(0, 256, (64, 64, 3)).astype(np.uint8)).save(buf, "JPEG", quality=90)
    p = tmp_path / "cut.jpg"
    p.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(InputImageError) as e:
        read_image(p)
    assert "truncated" in _one_line_naming(e, p)


def test_corrupt_png_data(tmp_path):
    good = raw_png(8, 8, 8, 2, b"".join(b"\x00" + bytes(24) for _ in range(8)))
    idat = good.index(b"IDAT") + 4
    bad = good[:idat] + b"\xff" * 12 + good[idat + 12:]  # garbage where the zlib stream starts
    p = tmp_path / "corrupt.png"
    p.write_bytes(bad)
    with pytest.raises(InputImageError) as e:
        read_image(p)
    assert "corrupt" in _one_line_naming(e, p) or "damaged" in str(e.value)


def test_unreadable_file(tmp_path, monkeypatch):
    p = tmp_path / "secret.png"
    Image.new("RGB", (2, 2)).save(p)

    def denied(*args, **kwargs):  # as open() fails without read permission (tests may run as root)
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(image_io, "open", denied, raising=False)
    with pytest.raises(InputImageError) as e:
        read_image(p)
    assert "permission" in _one_line_naming(e, p)


def test_formats_outside_the_list_are_refused(tmp_path):
    p = tmp_path / "icon.png"  # a real ICO named .png: Pillow could open it, realisr does not
    Image.new("RGB", (16, 16)).save(p, format="ICO")
    with pytest.raises(InputImageError, match="not an image realisr can read"):
        read_image(p)


def test_multi_picture_jpeg_reads_the_first(tmp_path):
    p = tmp_path / "camera.jpg"
    Image.new("RGB", (8, 6), (255, 0, 0)).save(p, "MPO", save_all=True,
                                                append_images=[Image.new("RGB", (8, 6), (0, 0, 255))])
    data = read_image(p)
    assert data.format == "MPO" and data.info["n_frames"] == 2
    assert np.abs(to_u8(data.pixels).astype(int) - [255, 0, 0]).max() <= 3


def test_folder_is_not_an_image(tmp_path):
    with pytest.raises(InputImageError, match="folder"):
        read_image(tmp_path)


# -- pixel limit --------------------------------------------------------------------------------------------
def test_pixel_limit_refused_before_decoding(tmp_path, monkeypatch):
    p = tmp_path / "big.png"
    Image.new("RGB", (20, 10)).save(p)
    from PIL import ImageFile

    def no_decoding(self):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(ImageTooLargeError) as e:
        read_image(p, max_pixels=199)
    msg = str(e.value)
    assert "--max-pixels" in msg and "REALISR_MAX_PIXELS" in msg and "20x10" in msg
    monkeypatch.undo()
    assert read_image(p, max_pixels=200).pixels.shape == (10, 20, 3)


def test_decompression_bomb_header_refused_quickly(tmp_path):
    # A header claiming 60000 x 60000 pixels with almost no data behind it.
    p = tmp_path / "bomb.png"
    p.write_bytes(raw_png(60000, 60000, 8, 2, b"\x00"))
    with pytest.raises(ImageTooLargeError):
        read_image(p)
    with pytest.raises(ImageTooLargeError, match="3,600,000,000"):
        read_image(p, max_pixels=3_000_000_000)


def test_our_limit_replaces_pillows_global_one(tmp_path, monkeypatch):
    p = tmp_path / "ok.png"
    Image.new("RGB", (20, 10)).save(p)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)  # Pillow alone would refuse this image
    assert read_image(p, max_pixels=None).pixels.shape == (10, 20, 3)
    assert Image.MAX_IMAGE_PIXELS == 10  # and the global is restored


def test_max_pixels_env(monkeypatch):
    monkeypatch.setenv("REALISR_MAX_PIXELS", "1234")
    assert image_io._max_pixels_from_env() == 1234
    monkeypatch.setenv("REALISR_MAX_PIXELS", "0")
    assert image_io._max_pixels_from_env() is None
    monkeypatch.setenv("REALISR_MAX_PIXELS", "lots")
    assert image_io._max_pixels_from_env() == image_io._BUILTIN_MAX_PIXELS


# -- writing ------------------------------------------------------------------------------------------------
def _data(h=4, w=6):
    return ImageData(pixels=pattern(h, w).astype(np.float32) / 255)


def test_overwrite_refused_and_allowed(tmp_path):
    p = tmp_path / "o.png"
    p.write_bytes(b"old")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        write_image(p, _data())
    assert p.read_bytes() == b"old"
    write_image(p, _data(), overwrite=True)
    assert p.read_bytes().startswith(b"\x89PNG")
    assert sorted(os.listdir(tmp_path)) == ["o.png"]


@pytest.mark.parametrize("pre_existing", [False, True])
def test_no_partial_file_when_encoder_fails(tmp_path, monkeypatch, pre_existing):
    p = tmp_path / "fail.png"
    if pre_existing:
        p.write_bytes(b"precious")

    def broken_save(self, fp, format=None, **kw):
        fp.write(b"\x89PNG half an image")
        raise RuntimeError("encoder exploded")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(RuntimeError, match="exploded"):
        write_image(p, _data(), overwrite=True)
    assert sorted(os.listdir(tmp_path)) == (["fail.png"] if pre_existing else [])
    if pre_existing:
        assert p.read_bytes() == b"precious"


def test_disk_full_gives_one_line_error_and_no_file(tmp_path, monkeypatch):
    from realisr.io.image_io import OutputWriteError

    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(image_io.os, "fsync", full)
    with pytest.raises(OutputWriteError, match="No space left") as e:
        write_image(tmp_path / "full.png", _data())
    assert "\n" not in str(e.value) and "full.png" in str(e.value)
    assert os.listdir(tmp_path) == []


def test_target_appearing_during_encoding_is_not_clobbered(tmp_path, monkeypatch):
    p = tmp_path / "race.png"
    real_encode = image_io._encode

    def encode_while_someone_else_writes(fh, *args, **kwargs):
        p.write_bytes(b"the other writer")
        return real_encode(fh, *args, **kwargs)

    monkeypatch.setattr(image_io, "_encode", encode_while_someone_else_writes)
    with pytest.raises(OutputExistsError):
        write_image(p, _data())
    assert p.read_bytes() == b"the other writer"
    assert os.listdir(tmp_path) == ["race.png"]


def test_output_permissions_follow_umask(tmp_path):
    out = write_image(tmp_path / "perm.png", _data())
    umask = os.umask(0)
    os.umask(umask)
    assert (out.stat().st_mode & 0o777) == (0o666 & ~umask)


def test_output_format_from_extension_and_fmt(tmp_path):
    assert output_format_for("a/b.JPG") == "JPEG"
    assert output_format_for(".tiff") == "TIFF"
    assert output_format_for("webp") == "WEBP"
    assert output_format_for(tmp_path / "x.bmp") == "BMP"
    with pytest.raises(UnsupportedFormatError):
        output_format_for("x.xyz")
    with pytest.raises(UnsupportedFormatError):
        write_image(tmp_path / "noext", _data())
    out = write_image(tmp_path / "x.dat", _data(), fmt="png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = write_image(tmp_path / "y.png", _data(), fmt="jpg")
    assert out.read_bytes()[:3] == b"\xff\xd8\xff"
    assert {".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp"} <= IMAGE_EXTENSIONS
    # Every readable extension but GIF can be written (a CLI keeping the input's extension relies on it).
    assert {e for e in IMAGE_EXTENSIONS if e != ".gif"} <= OUTPUT_EXTENSIONS
    for e in OUTPUT_EXTENSIONS:
        output_format_for(e)


@pytest.mark.parametrize("ext", ["jpg", "bmp"])
def test_alpha_composited_on_white_for_formats_without_alpha(tmp_path, ext, caplog):
    px = np.zeros((8, 8, 3), np.float32)  # black
    alpha = np.zeros((8, 8), np.float32)
    alpha[:, 4:] = 1.0  # right half opaque black, left half transparent
    with caplog.at_level(logging.WARNING, logger="realisr.io.image_io"):
        out = write_image(tmp_path / f"a.{ext}", ImageData(pixels=px, alpha=alpha), quality=100)
    assert "white" in caplog.text
    with Image.open(out) as im:
        assert im.mode == "RGB"
        arr = np.asarray(im).astype(int)
    assert arr[:, :3].min() >= 250 and arr[:, 5:].max() <= 5


def test_rounding_to_nearest_and_clipping(tmp_path):
    px = np.array([[[100.4 / 255, 100.6 / 255, -0.2], [1.3, 254.5001 / 255, 0.0]]], np.float32)
    out = write_image(tmp_path / "r.png", ImageData(pixels=px))
    with Image.open(out) as im:
        assert np.asarray(im).tolist() == [[[100, 101, 0], [255, 255, 0]]]


@pytest.mark.parametrize("ext,kw,tol", [("png", {}, 0), ("tif", {}, 0), ("bmp", {}, 0),
                                        ("webp", {"quality": 100}, 0), ("jpg", {"quality": 95}, 6)])
def test_format_round_trip(tmp_path, ext, kw, tol):
    y, x = np.mgrid[0:16, 0:24]
    img = np.stack([x * 10, y * 15, (x + y) * 6], axis=2).astype(np.uint8)  # smooth: fair to JPEG
    data = ImageData(pixels=img.astype(np.float32) / 255)
    out = write_image(tmp_path / f"rt.{ext}", data, **kw)
    back = read_image(out)
    assert back.format == output_format_for(ext)
    assert back.pixels.shape == (16, 24, 3)
    err = np.abs(to_u8(back.pixels).astype(int) - img).max()
    assert err <= tol


def test_grey_round_trip_stays_grey(tmp_path):
    g = RNG.integers(0, 256, (5, 6)).astype(np.uint8)
    data = ImageData(pixels=g[..., None].astype(np.float32) / 255)
    for ext in ("png", "jpg", "bmp", "tif"):
        out = write_image(tmp_path / f"g.{ext}", data, quality=100)
        with Image.open(out) as im:
            assert im.mode in ("L", "P"), ext
        back = read_image(out)
        assert back.is_grey
        assert np.abs(to_u8(back.pixels[..., 0]).astype(int) - g).max() <= (3 if ext == "jpg" else 0)


# -- animations ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ext", ["gif", "png", "webp"])
def test_animated_first_frame_with_warning(tmp_path, ext, caplog):
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    frames = [Image.new("RGB", (8, 6), c) for c in colours]
    p = tmp_path / f"anim.{ext}"
    kw = {"lossless": True} if ext == "webp" else {}
    frames[0].save(p, save_all=True, append_images=frames[1:], duration=50, loop=0, **kw)
    with caplog.at_level(logging.WARNING, logger="realisr.io.image_io"):
        data = read_image(p)
    assert data.info["n_frames"] == 3
    assert "first frame" in caplog.text
    assert np.abs(to_u8(data.pixels).astype(int) - np.array(colours[0])).max() <= 2
