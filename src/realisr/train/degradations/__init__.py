"""The two-stage Real-ESRGAN degradation (blur, resize, noise, JPEG twice, final sinc), batched in torch.

Example::

    import torch
    from realisr.train.degradations import Degrader, get_preset

    deg = Degrader(get_preset("pisa-sr"), device="cpu")
    lq, params = deg(hq, generator=torch.Generator().manual_seed(0))  # hq [N, 3, H, W] in [0, 1]

Presets ``pisa-sr``, ``osediff``, ``ccsr`` and ``seesr`` hold the official configs; see docs/degradations.md.
"""

from .jpeg import jpeg_compress
from .kernels import bivariate_kernel, circular_lowpass_kernel, sample_blur_kernels, sample_sinc_kernels
from .noise import add_noise, gaussian_noise, poisson_noise
from .pipeline import Degrader, degrade, filter2d, sample_kernels, sample_params, usm_sharp
from .presets import PRESETS, DegradationPreset, UnknownPresetError, get_preset

__all__ = [
    "Degrader",
    "DegradationPreset",
    "PRESETS",
    "UnknownPresetError",
    "get_preset",
    "degrade",
    "sample_kernels",
    "sample_params",
    "sample_blur_kernels",
    "sample_sinc_kernels",
    "bivariate_kernel",
    "circular_lowpass_kernel",
    "filter2d",
    "usm_sharp",
    "jpeg_compress",
    "add_noise",
    "gaussian_noise",
    "poisson_noise",
]
