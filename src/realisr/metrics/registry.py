"""The metric registry: every metric realisr reports, with the conventions it is computed under.

One declarative table (like :mod:`realisr.registry` for models) drives ``realisr metrics``, ``realisr bench``,
``docs/metrics.md`` and the parametrized tests. A metric whose weights or backend are missing is *reported*
unavailable (with the file it needs and where to put it); it never stops the other metrics.

This module imports nothing heavy; implementations are imported by :func:`create_metric`.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import RealisrError, WeightsNotFoundError

__all__ = ["WeightFile", "MetricSpec", "MetricStatus", "Metric", "SetMetric", "MetricUnavailableError",
           "METRICS", "register_metric", "get_metric_spec", "list_metrics", "metric_status", "create_metric",
           "find_weight_file", "torch_hub_dir", "DEFAULT_FULL_REFERENCE", "DEFAULT_NO_REFERENCE"]


class MetricUnavailableError(WeightsNotFoundError):
    """A metric cannot run here: a backend package or a weight file is missing (the message says which)."""


@dataclass(frozen=True)
class WeightFile:
    """A file a metric needs.

    Attributes:
        name: the exact file name.
        hub_subdir: the folder under the torch hub dir where the backend library looks for it
            (``checkpoints`` for torchvision/torch-fidelity, ``pyiqa``, ``clip``). The file is also accepted
            in :func:`realisr.weights.cache.checkpoints_dir`.
        url: where to get it (`realisr weights fetch` downloads it; nothing else does).
        what: one line: what the file is.
        sha256: the official file's SHA-256, for files that are not plain state dicts (a TorchScript archive
            such as CLIP's ``RN50.pt`` runs code when loaded, so only the exact official file is accepted).
    """

    name: str
    hub_subdir: str
    url: str
    what: str = ""
    sha256: str = ""


@dataclass(frozen=True)
class MetricSpec:
    """Declared conventions of one metric.

    Attributes:
        id: registry id (``psnr``, ``lpips``, ...).
        label: column name in reports (``PSNR``, ...).
        kind: ``"full-reference"`` (needs the HQ image), ``"no-reference"``, or ``"set"`` (one value per
            folder pair, e.g. FID).
        higher_is_better: direction of the scale.
        color_space: what the metric sees (``"Y (BT.601 ycbcr, [16,235] on 0-255)"``, ``"RGB"``).
        data_range: the input it is computed on.
        crop_border: default border crop in pixels (the OSEDiff/PiSA-SR protocol: 0; CCSR/SeeSR: 4, pass
            ``border=4``).
        backend: ``"realisr"`` (numpy/scipy here), ``"torchmetrics"`` or ``"pyiqa"`` (optional backend under a
            non-commercial licence).
        packages: importable modules the backend needs.
        extra: the ``realisr[extra]`` that provides them.
        weights: files the metric needs (see :class:`WeightFile`).
        factory: ``"module:function"`` building the metric object.
        license: licence of the implementation / weights.
        convention: one line on the paper convention it reproduces.
    """

    id: str
    label: str
    kind: str
    higher_is_better: bool
    color_space: str
    data_range: str
    factory: str
    crop_border: int = 0
    backend: str = "realisr"
    packages: tuple[str, ...] = ()
    extra: str = "metrics"
    weights: tuple[WeightFile, ...] = ()
    license: str = ""
    convention: str = ""
    options: dict = field(default_factory=dict)

    @property
    def needs_reference(self) -> bool:
        return self.kind in ("full-reference", "set")

    @property
    def arrow(self) -> str:
        return "↑" if self.higher_is_better else "↓"


@dataclass(frozen=True)
class MetricStatus:
    """Whether a metric can run here. ``missing`` lists ``(what, where to put it / how to get it)``."""

    id: str
    available: bool
    detail: str
    missing: tuple[tuple[str, str], ...] = ()


class Metric:
    """A per-image metric: ``metric(sr, ref=None) -> float``.

    Images are ``[H, W, 3]`` RGB, uint8 or float32 in ``[0, 1]``; ``ref`` is required for full-reference
    metrics and must have the size of ``sr``.
    """

    per_image = True

    def __init__(self, spec: MetricSpec, border: Optional[int] = None, device=None):
        self.spec = spec
        self.border = spec.crop_border if border is None else int(border)
        self.device = device

    def __call__(self, sr, ref=None) -> float:
        if self.spec.needs_reference and ref is None:
            raise ValueError(f"{self.spec.id} needs a reference image")
        if ref is not None and np.shape(sr)[:2] != np.shape(ref)[:2]:
            raise ValueError(f"SR and reference sizes differ: {np.shape(sr)[:2]} vs {np.shape(ref)[:2]}")
        return float(self._compute(sr, ref))

    def _compute(self, sr, ref) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec.id!r}, border={self.border})"


class SetMetric:
    """A metric over a set of images (FID): ``reset()``, ``update(sr, ref)`` per pair, ``compute()``."""

    per_image = False

    def __init__(self, spec: MetricSpec, border: Optional[int] = None, device=None):
        self.spec = spec
        self.border = spec.crop_border if border is None else int(border)
        self.device = device

    def reset(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def update(self, sr, ref) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def compute(self) -> float:  # pragma: no cover - abstract
        raise NotImplementedError


METRICS: dict[str, MetricSpec] = {}


def register_metric(spec: MetricSpec) -> MetricSpec:
    """Add a metric to the registry (ids are unique)."""
    if spec.id in METRICS:
        raise ValueError(f"metric id {spec.id!r} is already registered")
    METRICS[spec.id] = spec
    return spec


def get_metric_spec(metric_id: str) -> MetricSpec:
    """Look up a metric.

    Raises:
        RealisrError: unknown id (the message lists the registered ids).
    """
    try:
        return METRICS[metric_id]
    except KeyError:
        raise RealisrError(f"unknown metric {metric_id!r}: choose from {', '.join(METRICS)} "
                           "(see `realisr metrics`)") from None


def list_metrics() -> list[MetricSpec]:
    """All registered metrics, in registration order."""
    return list(METRICS.values())


def torch_hub_dir() -> Path:
    """torch's hub folder (``$TORCH_HOME/hub``, else ``$XDG_CACHE_HOME/torch/hub``, else ``~/.cache/torch/hub``).

    Uses ``torch.hub.get_dir()`` when torch is already imported (it honours ``torch.hub.set_dir``), and the same
    rule without importing torch otherwise.
    """
    if "torch" in sys.modules:
        return Path(sys.modules["torch"].hub.get_dir())
    home = os.environ.get("TORCH_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "torch")
    return Path(os.path.expanduser(home)) / "hub"


def find_weight_file(wf: WeightFile) -> Optional[Path]:
    """The file in ``checkpoints_dir()`` or in the backend's torch hub subfolder, else ``None``."""
    from ..weights.cache import checkpoints_dir

    for p in (checkpoints_dir() / wf.name, torch_hub_dir() / wf.hub_subdir / wf.name):
        if p.is_file():
            return p
    return None


def _where(wf: WeightFile) -> str:
    from ..weights.cache import checkpoints_dir
    from ..weights.fetch import item_for_file

    item = item_for_file(wf.name)
    fetch = f"run `realisr weights fetch {item}`, or " if item else ""
    return f"{fetch}put {wf.name} in {checkpoints_dir()} or {torch_hub_dir() / wf.hub_subdir} (from {wf.url})"


def metric_status(spec_or_id) -> MetricStatus:
    """Whether a metric can run here, without loading anything heavy or touching the network."""
    spec = spec_or_id if isinstance(spec_or_id, MetricSpec) else get_metric_spec(spec_or_id)
    missing: list[tuple[str, str]] = []
    for mod in spec.packages:
        if importlib.util.find_spec(mod) is None:
            how = f"pip install 'realisr[{spec.extra}]'"
            if spec.extra == "pyiqa":
                how += (" && pip install --no-deps pyiqa==0.1.16 (from a clone: pip install -e '.[pyiqa]'; "
                        "pyiqa is PolyForm-Noncommercial: non-commercial use only)")
            missing.append((f"python package {mod}", how))
    for wf in spec.weights:
        if find_weight_file(wf) is None:
            missing.append((wf.name, _where(wf)))
    check = spec.options.get("status")
    if check and not missing:
        module, _, name = check.partition(":")
        ok, detail = getattr(importlib.import_module(module), name)()
        if not ok:
            return MetricStatus(spec.id, False, detail, (("parameters", detail),))
        return MetricStatus(spec.id, True, detail)
    if missing:
        return MetricStatus(spec.id, False, "; ".join(f"{w}: {h}" for w, h in missing), tuple(missing))
    found = [str(find_weight_file(wf)) for wf in spec.weights]
    return MetricStatus(spec.id, True, ", ".join(found) if found else "no weights needed")


def create_metric(metric_id: str, *, border: Optional[int] = None, device=None):
    """Build a metric object.

    Args:
        metric_id: a registered id (see :func:`list_metrics`).
        border: border crop in pixels (default: the metric's declared ``crop_border``).
        device: torch device for learned metrics (default: CUDA if available, else CPU).

    Returns:
        A :class:`Metric` (call it per image) or a :class:`SetMetric` (FID).

    Raises:
        MetricUnavailableError: a package or weight file is missing (the message says which and where).
        RealisrError: unknown metric id.
    """
    spec = get_metric_spec(metric_id)
    st = metric_status(spec)
    if not st.available:
        raise MetricUnavailableError(f"{spec.id} is unavailable: {st.detail}")
    module, _, name = spec.factory.partition(":")
    return getattr(importlib.import_module(module), name)(spec, border=border, device=device)


# --------------------------------------------------------------------------------------------------------
# The table. Conventions: docs/metrics.md.
_TV = "https://download.pytorch.org/models"
_PYIQA = "https://huggingface.co/chaofengc/IQA-PyTorch-Weights/resolve/main"
_RN50_SHA256 = "afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762"
_Y = "Y (BT.601 ycbcr, 16 + 65.481R + 128.553G + 24.966B on 0-255)"

register_metric(MetricSpec(
    id="psnr", label="PSNR", kind="full-reference", higher_is_better=True, color_space=_Y,
    data_range="Y in [16,235] float64, peak 255, no rounding", factory="realisr.metrics.impl:PSNRY",
    license="n/a", convention="basicsr calculate_psnr(test_y_channel=True) = pyiqa psnr(test_y_channel=True, "
                             "color_space='ycbcr') to ~1e-4 dB (pyiqa: float32, MSE + 1e-8); OSEDiff/PiSA-SR: no "
                             "crop, CCSR/SeeSR: crop 4"))
register_metric(MetricSpec(
    id="ssim", label="SSIM", kind="full-reference", higher_is_better=True, color_space=_Y,
    data_range="Y rounded to integers, float64, C1=(0.01*255)^2, C2=(0.03*255)^2",
    factory="realisr.metrics.impl:SSIMY", packages=("scipy",), license="n/a", options={"convention": "pyiqa"},
    convention="pyiqa ssim(test_y_channel=True, color_space='ycbcr') as OSEDiff/PiSA-SR/SeeSR/CCSR report it: "
               "11x11 Gaussian sigma 1.5, valid region, rounded Y, contrast-structure map clamped at 0"))
register_metric(MetricSpec(
    id="ssim-basicsr", label="SSIM-BasicSR", kind="full-reference", higher_is_better=True, color_space=_Y,
    data_range="Y in [16,235] float64 (not rounded), C1=(0.01*255)^2, C2=(0.03*255)^2",
    factory="realisr.metrics.impl:SSIMY", packages=("scipy",), license="n/a", options={"convention": "basicsr"},
    convention="basicsr calculate_ssim(test_y_channel=True) (BasicSR-era papers): no rounding, no clamp; up to "
               "1.2e-3 above/below the pyiqa convention"))
register_metric(MetricSpec(
    id="lpips", label="LPIPS", kind="full-reference", higher_is_better=False, color_space="RGB",
    data_range="RGB [0,1] scaled to [-1,1]", factory="realisr.metrics.impl:LPIPSMetric", backend="torchmetrics",
    packages=("torch", "torchvision", "torchmetrics"),
    weights=(WeightFile("alexnet-owt-7be5be79.pth", "checkpoints", f"{_TV}/alexnet-owt-7be5be79.pth",
                        "torchvision ImageNet AlexNet (LPIPS backbone)"),),
    license="BSD-2-Clause (LPIPS heads, bundled in torchmetrics); AlexNet weights BSD-3-Clause",
    convention="LPIPS v0.1 AlexNet (pyiqa 'lpips' default), full image, no resize"))
register_metric(MetricSpec(
    id="dists", label="DISTS", kind="full-reference", higher_is_better=False, color_space="RGB",
    data_range="RGB [0,1], ImageNet mean/std", factory="realisr.metrics.impl:DISTSMetric", backend="torchmetrics",
    packages=("torch", "torchvision", "torchmetrics"),
    weights=(WeightFile("vgg16-397923af.pth", "checkpoints", f"{_TV}/vgg16-397923af.pth",
                        "torchvision ImageNet VGG16 (DISTS backbone)"),),
    license="MIT (DISTS alpha/beta, bundled in torchmetrics); VGG16 weights BSD-3-Clause",
    convention="DISTS (Ding et al. 2020) as pyiqa 'dists', full image, no resize"))
register_metric(MetricSpec(
    id="fid", label="FID", kind="set", higher_is_better=False, color_space="RGB",
    data_range="RGB uint8, resized to 299 by the Inception wrapper", factory="realisr.metrics.impl:FIDMetric",
    backend="torchmetrics", packages=("torch", "torchmetrics", "torch_fidelity"),
    weights=(WeightFile("weights-inception-2015-12-05-6726825d.pth", "checkpoints",
                        "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                        "weights-inception-2015-12-05-6726825d.pth",
                        "TF FID InceptionV3 ported by torch-fidelity"),),
    license="Apache-2.0 (torch-fidelity); Inception weights Apache-2.0 (TensorFlow)",
    convention="folder (SR) vs folder (HQ), 2048-d pool features, resize inside the network (torch-fidelity, "
               "clean-fid's 'legacy' resize); pyiqa's 'fid' (the papers') resizes with PIL bicubic ('clean' mode): "
               "values differ by ~2% (225.4 vs 220.6 on pyiqa's calibration folders)"))
_NIQE_LICENSE = ("official pristine parameters (NIQE release, UT Austin LIVE notice) shipped as package data via "
                 "the BasicSR 1.4.2 sdist (Apache-2.0); see realisr/metrics/data/NOTICE")
register_metric(MetricSpec(
    id="niqe", label="NIQE", kind="no-reference", higher_is_better=False,
    color_space="grey (MATLAB rgb2gray: 0.2989R + 0.5870G + 0.1140B of the 8-bit image, rounded)",
    data_range="grey in [0,255], integers, 96x96 blocks", factory="realisr.metrics.impl:NIQEMetric",
    packages=("scipy", "torch"), options={"status": "realisr.metrics.impl:niqe_status", "convert_to": "gray"},
    license=_NIQE_LICENSE,
    convention="official MATLAB NIQE script on rgb2gray (pyiqa 'niqe', as OSEDiff/PiSA-SR/SeeSR/CCSR report): "
               "within 0.6% of the official values on pyiqa's calibration images"))
register_metric(MetricSpec(
    id="niqe-y", label="NIQE-Y", kind="no-reference", higher_is_better=False, color_space=_Y,
    data_range="Y rounded to integers, 96x96 blocks", factory="realisr.metrics.impl:NIQEMetric",
    packages=("scipy", "torch"), options={"status": "realisr.metrics.impl:niqe_status", "convert_to": "y"},
    license=_NIQE_LICENSE,
    convention="BasicSR calculate_niqe(convert_to='y') (Y of YCbCr), reproduced to 1e-12; up to 3.8% off the "
               "official MATLAB values"))
register_metric(MetricSpec(
    id="musiq", label="MUSIQ", kind="no-reference", higher_is_better=True, color_space="RGB",
    data_range="RGB [0,1]", factory="realisr.metrics.impl:PyiqaMetric", backend="pyiqa",
    packages=("torch", "pyiqa"), extra="pyiqa",
    options={"pyiqa_name": "musiq", "pyiqa_arch": "pyiqa.archs.musiq_arch"},
    weights=(WeightFile("musiq_koniq_ckpt-e95806b9.pth", "pyiqa", f"{_PYIQA}/musiq_koniq_ckpt-e95806b9.pth",
                        "MUSIQ trained on KonIQ-10k"),),
    license="pyiqa PolyForm-Noncommercial-1.0.0; MUSIQ weights Apache-2.0",
    convention="MUSIQ KonIQ model (pyiqa 'musiq' default)"))
register_metric(MetricSpec(
    id="maniqa", label="MANIQA", kind="no-reference", higher_is_better=True, color_space="RGB",
    data_range="RGB [0,1], random 224 crops averaged (stochastic)", factory="realisr.metrics.impl:PyiqaMetric",
    backend="pyiqa", packages=("torch", "pyiqa", "timm"), extra="pyiqa",
    options={"pyiqa_name": "maniqa-pipal", "pyiqa_arch": "pyiqa.archs.maniqa_arch"},
    weights=(WeightFile("MANIQA_PIPAL-ae6d356b.pth", "pyiqa", f"{_PYIQA}/MANIQA_PIPAL-ae6d356b.pth",
                        "MANIQA trained on PIPAL"),),
    license="pyiqa PolyForm-Noncommercial-1.0.0; MANIQA Apache-2.0",
    convention="MANIQA PIPAL model (pyiqa 'maniqa-pipal'), as OSEDiff/PiSA-SR/SeeSR"))
register_metric(MetricSpec(
    id="clipiqa", label="CLIPIQA", kind="no-reference", higher_is_better=True, color_space="RGB",
    data_range="RGB [0,1]", factory="realisr.metrics.impl:PyiqaMetric", backend="pyiqa",
    packages=("torch", "pyiqa", "clip"), extra="pyiqa", options={"pyiqa_name": "clipiqa"},
    weights=(WeightFile("RN50.pt", "clip", f"https://openaipublic.azureedge.net/clip/models/{_RN50_SHA256}/RN50.pt",
                        "OpenAI CLIP RN50, a TorchScript archive (only the official file, by SHA-256)",
                        sha256=_RN50_SHA256),),
    license="pyiqa PolyForm-Noncommercial-1.0.0; CLIP MIT",
    convention="CLIP-IQA (pyiqa 'clipiqa', RN50), as OSEDiff/PiSA-SR"))

DEFAULT_FULL_REFERENCE = ("psnr", "ssim", "lpips", "dists", "fid", "niqe", "musiq", "maniqa", "clipiqa")
DEFAULT_NO_REFERENCE = ("niqe", "musiq", "maniqa", "clipiqa")
