"""Degradation presets: the official Real-ESRGAN-style configs of PiSA-SR, OSEDiff, CCSR and SeeSR.

Sources (see docs/degradations.md): PiSA-SR ``src/datasets/params.yml``, OSEDiff ``params_realesrgan.yml``
(both read by the byte-identical ``realesrgan.py``), CCSR v1 ``configs/dataset/*train.yaml`` = v2
``params_ccsr.yml``, and SeeSR ``utils_data/make_paired_data.py`` (offline pairs; the GT is USM-sharpened).
Values not in those configs are the Real-ESRGAN defaults that the official code hard-codes: kernel sizes
7..21 padded to 21 (whatever ``blur_kernel_size`` says), rotation in [-pi, pi], area/bilinear/bicubic resize
modes chosen uniformly, no colour jitter.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Tuple

from realisr.errors import RealisrError

__all__ = ["DegradationPreset", "PRESETS", "get_preset", "UnknownPresetError"]

_KERNELS = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")
_KPROB = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)


class UnknownPresetError(RealisrError, KeyError):
    """A degradation preset name is not known."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class DegradationPreset:
    """Parameters of the two-stage Real-ESRGAN degradation (names follow the official YAML keys).

    Ranges are ``(low, high)`` and drawn uniformly; noise sigmas are on the 0..255 scale; ``resize_prob`` is
    the probability of (up, down, keep); ``*2`` fields belong to the second stage.

    Attributes:
        name: preset id.
        scale: total down-scaling factor (LQ is ``H // scale``).
        kernel_range: odd blur kernel sizes drawn uniformly; kernels are zero-padded to ``kernel_pad_to``.
        kernel_list, kernel_prob: kernel types and their probabilities (both stages).
        sinc_prob, blur_sigma, betag_range, betap_range: first-stage blur.
        resize_prob, resize_range: first-stage random resize.
        gaussian_noise_prob, noise_range, poisson_scale_range, gray_noise_prob: first-stage noise.
        jpeg_range: first-stage JPEG quality.
        second_blur_prob ... jpeg_range2: the same for the second stage.
        final_sinc_prob: probability of the sinc filter applied with the final resize.
        resize_modes: interpolation modes drawn uniformly for every resize.
        rotation_range: range of the anisotropic kernel angle.
        usm_sharpen: USM-sharpen the HQ before degrading (SeeSR's offline pairs).
        official_resize_back: whether the official training resizes the LQ back to the HQ size (random mode,
            then 8-bit rounding); pass ``resize_back=True`` to :class:`Degrader` to do the same.
        source: where the values come from.
    """

    name: str
    scale: int = 4
    kernel_range: Tuple[int, ...] = tuple(range(7, 22, 2))
    kernel_pad_to: int = 21
    kernel_list: Tuple[str, ...] = _KERNELS
    kernel_prob: Tuple[float, ...] = _KPROB
    sinc_prob: float = 0.1
    blur_sigma: Tuple[float, float] = (0.2, 3.0)
    betag_range: Tuple[float, float] = (0.5, 4.0)
    betap_range: Tuple[float, float] = (1.0, 2.0)
    resize_prob: Tuple[float, float, float] = (0.2, 0.7, 0.1)
    resize_range: Tuple[float, float] = (0.15, 1.5)
    gaussian_noise_prob: float = 0.5
    noise_range: Tuple[float, float] = (1.0, 30.0)
    poisson_scale_range: Tuple[float, float] = (0.05, 3.0)
    gray_noise_prob: float = 0.4
    jpeg_range: Tuple[float, float] = (30.0, 95.0)
    second_blur_prob: float = 0.8
    kernel_list2: Tuple[str, ...] = _KERNELS
    kernel_prob2: Tuple[float, ...] = _KPROB
    sinc_prob2: float = 0.1
    blur_sigma2: Tuple[float, float] = (0.2, 1.5)
    betag_range2: Tuple[float, float] = (0.5, 4.0)
    betap_range2: Tuple[float, float] = (1.0, 2.0)
    resize_prob2: Tuple[float, float, float] = (0.3, 0.4, 0.3)
    resize_range2: Tuple[float, float] = (0.3, 1.2)
    gaussian_noise_prob2: float = 0.5
    noise_range2: Tuple[float, float] = (1.0, 25.0)
    poisson_scale_range2: Tuple[float, float] = (0.05, 2.5)
    gray_noise_prob2: float = 0.4
    jpeg_range2: Tuple[float, float] = (30.0, 95.0)
    final_sinc_prob: float = 0.8
    resize_modes: Tuple[str, ...] = ("area", "bilinear", "bicubic")
    rotation_range: Tuple[float, float] = (-math.pi, math.pi)
    usm_sharpen: bool = False
    official_resize_back: bool = True
    source: str = field(default="", compare=False)

    def replace(self, **changes) -> "DegradationPreset":
        """A copy with some fields changed (e.g. a smaller ``scale`` for experiments)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """The fields as a plain dict (for YAML recipes and logs)."""
        return dataclasses.asdict(self)


PRESETS: dict[str, DegradationPreset] = {
    # PiSA-SR src/datasets/params.yml (milder first stage than Real-ESRGAN).
    "pisa-sr": DegradationPreset(
        name="pisa-sr",
        resize_range=(0.3, 1.5), noise_range=(1.0, 15.0), poisson_scale_range=(0.05, 2.0), jpeg_range=(60.0, 95.0),
        second_blur_prob=0.5,
        resize_range2=(0.6, 1.2), noise_range2=(1.0, 12.0), poisson_scale_range2=(0.05, 1.0), jpeg_range2=(60.0, 100.0),
        source="csslc/PiSA-SR src/datasets/params.yml + src/datasets/realesrgan.py",
    ),
    # OSEDiff params_realesrgan.yml (= the Real-ESRGAN x4plus values).
    "osediff": DegradationPreset(
        name="osediff",
        source="cswry/OSEDiff params_realesrgan.yml + src/datasets/realesrgan.py",
    ),
    # CCSR v1 configs/dataset/*train.yaml == v2 params_ccsr.yml.
    "ccsr": DegradationPreset(
        name="ccsr",
        blur_sigma=(0.2, 1.5), betag_range=(0.5, 2.0), betap_range=(1.0, 1.5),
        resize_range=(0.3, 1.5), noise_range=(1.0, 15.0), poisson_scale_range=(0.05, 2.0), jpeg_range=(60.0, 95.0),
        second_blur_prob=0.5,
        blur_sigma2=(0.2, 1.0), betag_range2=(0.5, 2.0), betap_range2=(1.0, 1.5),
        resize_range2=(0.6, 1.2), noise_range2=(1.0, 12.0), poisson_scale_range2=(0.05, 1.0), jpeg_range2=(60.0, 100.0),
        source="csslc/CCSR configs/dataset/*train.yaml (v1) = params_ccsr.yml (v2)",
    ),
    # SeeSR utils_data/make_paired_data.py: Real-ESRGAN x4plus values on a USM-sharpened GT, offline pairs
    # (LR 128 kept; the bicubic x4 "sr_bicubic" is made separately, so no random-mode resize back).
    "seesr": DegradationPreset(
        name="seesr",
        usm_sharpen=True, official_resize_back=False,
        source="cswry/SeeSR utils_data/make_paired_data.py (RealESRGAN degradation, USM-sharpened GT)",
    ),
}


def get_preset(name: str) -> DegradationPreset:
    """The preset called ``name``.

    Raises:
        UnknownPresetError: ``name`` is not in :data:`PRESETS`.
    """
    try:
        return PRESETS[name]
    except KeyError:
        raise UnknownPresetError(
            f"unknown degradation preset {name!r}; choose one of: {', '.join(sorted(PRESETS))}") from None
