"""IQA metrics with the SR papers' conventions (PSNR/SSIM on Y, LPIPS-Alex, DISTS, FID, NIQE, MUSIQ,
MANIQA, CLIPIQA) and CCSR's stability metrics.

    >>> from realisr.metrics import create_metric, list_metrics, metric_status
    >>> psnr = create_metric("psnr")          # Y channel, no border crop (OSEDiff / PiSA-SR protocol)
    >>> psnr(sr_rgb, hq_rgb)
    >>> [metric_status(m) for m in list_metrics()]  # what runs here, and which file each missing one needs

Light to import: numpy only; torch and the metric libraries load when a metric is created.
See ``docs/metrics.md`` for the conventions and where each weight file goes.
"""

from .functional import psnr_y, rgb_to_y, ssim_y
from .niqe_core import niqe
from .registry import (
    DEFAULT_FULL_REFERENCE,
    DEFAULT_NO_REFERENCE,
    METRICS,
    Metric,
    MetricSpec,
    MetricStatus,
    MetricUnavailableError,
    SetMetric,
    WeightFile,
    create_metric,
    find_weight_file,
    get_metric_spec,
    list_metrics,
    metric_status,
)
from .stability import g_std, l_std, l_std_image

__all__ = ["psnr_y", "ssim_y", "rgb_to_y", "niqe", "g_std", "l_std", "l_std_image", "METRICS", "Metric",
           "SetMetric", "MetricSpec", "MetricStatus", "MetricUnavailableError", "WeightFile", "create_metric",
           "find_weight_file", "get_metric_spec", "list_metrics", "metric_status", "DEFAULT_FULL_REFERENCE",
           "DEFAULT_NO_REFERENCE"]
