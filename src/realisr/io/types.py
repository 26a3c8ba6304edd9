"""The in-memory image every backend shares."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

import numpy as np

__all__ = ["ImageData"]


@dataclass
class ImageData:
    """A decoded image with what must survive a round trip through realisr.

    Attributes:
        pixels: float32 ``[H, W, 3]`` RGB (or ``[H, W, 1]`` for grey inputs) in ``[0, 1]``, EXIF orientation
            already applied.
        alpha: float32 ``[H, W]`` in ``[0, 1]`` or ``None``. Upscaled separately from the colour and
            re-attached (see :mod:`realisr.pipelines.base`).
        bit_depth: 8 or 16: the precision of the source, and of the output by default where the format allows.
        icc_profile: the embedded ICC profile bytes, kept on output where the format allows.
        exif: EXIF bytes with the orientation tag reset to 1 (pixels are already upright).
        format: source format name as Pillow reports it (``"PNG"``, ``"JPEG"``, ...), or ``None``.
        mode: source mode (``"RGB"``, ``"RGBA"``, ``"L"``, ``"LA"``, ``"P"``, ``"CMYK"``, ``"I;16"``, ...).
        info: anything else worth keeping (e.g. ``dpi``, animation frame count).
    """

    pixels: np.ndarray
    alpha: Optional[np.ndarray] = None
    bit_depth: int = 8
    icc_profile: Optional[bytes] = None
    exif: Optional[bytes] = None
    format: Optional[str] = None
    mode: Optional[str] = None
    info: dict = field(default_factory=dict)

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def is_grey(self) -> bool:
        return self.pixels.ndim == 3 and self.pixels.shape[2] == 1

    def with_pixels(self, pixels: np.ndarray, alpha: Optional[np.ndarray] = None) -> "ImageData":
        """A copy carrying the same metadata with new pixels (and alpha)."""
        return replace(self, pixels=pixels, alpha=alpha, info=dict(self.info))
