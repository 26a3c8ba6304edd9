"""Image I/O shared by every backend: decoding with EXIF orientation, 16-bit, alpha, ICC and EXIF kept,
atomic writes and clear errors. See :func:`read_image` and :func:`write_image`."""

from .types import ImageData

__all__ = ["ImageData", "read_image", "write_image", "pil_to_image_data", "output_format_for", "IMAGE_EXTENSIONS",
           "OUTPUT_EXTENSIONS", "DEFAULT_MAX_PIXELS"]


def __getattr__(name):  # lazy: keeps `import realisr.io` cheap
    if name in ("read_image", "write_image", "pil_to_image_data", "output_format_for", "IMAGE_EXTENSIONS",
                "OUTPUT_EXTENSIONS", "DEFAULT_MAX_PIXELS"):
        from . import image_io

        return getattr(image_io, name)
    raise AttributeError(name)
