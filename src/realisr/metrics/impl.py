"""Metric implementations behind the registry (imported only when a metric is created).

Learned metrics reuse the field's libraries: torchmetrics (LPIPS, DISTS, FID via torch-fidelity) and,
as an optional backend under a non-commercial licence, pyiqa (MUSIQ, MANIQA, CLIPIQA). realisr never
downloads their weights and never lets a library unpickle a user's file: the files are looked up where
:func:`realisr.metrics.registry.find_weight_file` says, loaded here with ``torch.load(weights_only=True)``,
and the tensors are handed to a network the library builds without its own loading (its loader is swapped
for one that returns our tensors while the network is built). Nothing is written into the libraries' caches
(torch hub, pyiqa, Hugging Face).
"""

from __future__ import annotations

import logging
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import CheckpointError
from .functional import crop_border, psnr_y, ssim_y
from .registry import Metric, MetricSpec, SetMetric, find_weight_file

logger = logging.getLogger(__name__)

__all__ = ["PSNRY", "SSIMY", "NIQEMetric", "LPIPSMetric", "DISTSMetric", "FIDMetric", "PyiqaMetric",
           "niqe_status", "to_tensor"]

_PATCH_LOCK = threading.Lock()


class PSNRY(Metric):
    def _compute(self, sr, ref) -> float:
        return psnr_y(sr, ref, self.border)


class SSIMY(Metric):
    def _compute(self, sr, ref) -> float:
        return ssim_y(sr, ref, self.border, convention=self.spec.options.get("convention", "pyiqa"))


def niqe_status() -> tuple[bool, str]:
    """NIQE's parameters: shipped with realisr, or the file ``$REALISR_NIQE_PARAMS`` names (registry hook)."""
    from ..errors import RealisrError
    from .niqe_core import find_niqe_parameters, niqe_parameters

    try:
        niqe_parameters()
        return True, str(find_niqe_parameters())
    except RealisrError as e:
        return False, str(e)


class NIQEMetric(Metric):
    """NIQE in the registry entry's colour convention (``options["convert_to"]``: ``gray`` or ``y``)."""

    def __init__(self, spec: MetricSpec, border: Optional[int] = None, device=None):
        super().__init__(spec, border, device)
        from .niqe_core import niqe_parameters

        self.params = niqe_parameters()
        self.convert_to = spec.options.get("convert_to", "gray")

    def _compute(self, sr, ref) -> float:
        from .niqe_core import niqe

        return niqe(sr, border=self.border, params=self.params, convert_to=self.convert_to)


# -- torch helpers ------------------------------------------------------------------------------------------
def _device(device):
    import torch

    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def to_tensor(img, border: int = 0, device=None):
    """``[H, W, 3]`` uint8/float image -> ``[1, 3, H, W]`` float32 tensor in ``[0, 1]`` (border cropped)."""
    import torch

    a = np.asarray(img)
    if a.ndim == 2:
        a = a[..., None]
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    f = a.astype(np.float32) / 255.0 if a.dtype == np.uint8 else a.astype(np.float32)
    f = crop_border(f, border)
    t = torch.from_numpy(np.ascontiguousarray(f.transpose(2, 0, 1)))[None]
    return t.to(device) if device is not None else t


def _load_state_dict(path: Path) -> dict:
    import torch

    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means "not a plain state dict"
        raise CheckpointError(f"{path} is not a plain PyTorch state dict ({type(e).__name__}): replace it with "
                              "the official file") from e
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path} does not hold a state dict")
    return sd


def _weight_path(spec: MetricSpec, i: int = 0) -> Path:
    p = find_weight_file(spec.weights[i])
    if p is None:  # create_metric checks first; this is for direct construction
        from .registry import MetricUnavailableError

        raise MetricUnavailableError(f"{spec.id} needs {spec.weights[i].name}")
    return p


def _load_features_into_slices(slices, state: dict, path: Path) -> None:
    """Copy torchvision ``features.<i>.*`` tensors into torchmetrics' ``slice<k>.<i>.*`` backbone modules."""
    import torch

    owner = {}
    for slice_name, sl in slices.named_children():
        for child_name, _ in sl.named_children():
            owner[child_name] = slice_name
    mapped = {}
    for k, v in state.items():
        parts = k.split(".")
        if parts[0] == "features" and parts[1] in owner:
            mapped[f"{owner[parts[1]]}.{parts[1]}.{'.'.join(parts[2:])}"] = v
    target = slices.state_dict()
    missing = [k for k in target if k not in mapped]
    if missing:
        raise CheckpointError(f"{path.name} lacks backbone tensors ({missing[0]}, ...): it is not the torchvision file")
    for k, v in mapped.items():
        if k in target and tuple(target[k].shape) != tuple(v.shape):
            raise CheckpointError(f"{path.name}: {k} has shape {tuple(v.shape)}, expected {tuple(target[k].shape)}")
    with torch.no_grad():
        slices.load_state_dict({k: v for k, v in mapped.items() if k in target}, strict=True)


class _PairNetMetric(Metric):
    """A full-reference metric computed by a torch network ``self.net(sr, ref, **net_kwargs)``."""

    net_kwargs: dict = {}

    def _compute(self, sr, ref) -> float:
        import torch

        with torch.inference_mode():
            a = to_tensor(sr, self.border, self.device)
            b = to_tensor(ref, self.border, self.device)
            return float(self.net(a, b, **self.net_kwargs).reshape(-1)[0])


class LPIPSMetric(_PairNetMetric):
    """LPIPS v0.1 with the AlexNet backbone: torchmetrics' network, heads bundled with torchmetrics, the
    ImageNet AlexNet from the user's file (torchmetrics would download it)."""

    def __init__(self, spec: MetricSpec, border: Optional[int] = None, device=None):
        super().__init__(spec, border, device)
        from torchmetrics.functional.image.lpips import _LPIPS

        path = _weight_path(spec)
        net = _LPIPS(pretrained=True, net="alex", pnet_rand=True)  # heads from the wheel, backbone random
        _load_features_into_slices(net.net, _load_state_dict(path), path)
        self.device = _device(device)
        self.net = net.eval().requires_grad_(False).to(self.device)

    net_kwargs = {"normalize": True}  # inputs in [0, 1]


@contextmanager
def _patched(*triples):
    """Set ``setattr(obj, name, value)`` for each ``(obj, name, value)`` while the block runs (one lock: the
    patched attributes are module globals of the backend libraries)."""
    with _PATCH_LOCK:
        old = [(obj, name, getattr(obj, name)) for obj, name, _ in triples]
        try:
            for obj, name, value in triples:
                setattr(obj, name, value)
            yield
        finally:
            for obj, name, value in reversed(old):
                setattr(obj, name, value)


class DISTSMetric(_PairNetMetric):
    """DISTS: torchmetrics' network with its bundled alpha/beta; the VGG16 backbone from the user's file.

    torchmetrics builds ``vgg16(weights=DEFAULT)`` (a download) inside the constructor; its module-level
    ``vgg16`` is swapped for one that loads the local file while the network is built.
    """

    def __init__(self, spec: MetricSpec, border: Optional[int] = None, device=None):
        super().__init__(spec, border, device)
        import torchmetrics.functional.image.dists as tm_dists
        import torchvision

        path = _weight_path(spec)
        state = _load_state_dict(path)

        def vgg16_local(weights=None, **kwargs):
            import torch

            with torch.device("meta"):  # the classifier (120M parameters) is never used: don't allocate it
                m = torchvision.models.vgg16(weights=None)
            m.features = m.features.to_empty(device="cpu")
            feats = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
            try:  # only the convolutional part is used; the classifier may be absent
                m.features.load_state_dict(feats, strict=True)
            except RuntimeError as e:
                raise CheckpointError(f"{path.name} is not a torchvision VGG16 state dict: {str(e)[:120]}") from e
            return m

        with _patched((tm_dists, "vgg16", vgg16_local)):
            net = tm_dists.DISTSNetwork(load_weights=True)
        self.device = _device(device)
        self.net = net.eval().requires_grad_(False).to(self.device)

    net_kwargs: dict = {}


class FIDMetric(SetMetric):
    """Folder-vs-folder FID (torchmetrics + torch-fidelity's TF-ported InceptionV3, 2048-d pool features).

    torch-fidelity would unpickle a weights path with ``weights_only=False`` (or download when given none):
    the file is loaded here with ``weights_only=True`` and handed to the network through its loader hook.
    """

    def __init__(self, spec: MetricSpec, border: Optional[int] = None, device=None):
        super().__init__(spec, border, device)
        import torch_fidelity.feature_extractor_inceptionv3 as tf_inception
        from torchmetrics.image.fid import FrechetInceptionDistance

        path = _weight_path(spec)
        state = _load_state_dict(path)

        def from_our_file(url, *args, **kwargs):
            return state

        self.device = _device(device)
        try:
            with _patched((tf_inception, "load_state_dict_from_url", from_our_file)):
                fid = FrechetInceptionDistance(feature=2048, normalize=True)
        except RuntimeError as e:
            raise CheckpointError(f"{path.name} is not torch-fidelity's InceptionV3 state dict: "
                                  f"{str(e).strip().splitlines()[0][:160]}") from e
        self.fid = fid.to(self.device)
        self.n = 0

    def reset(self) -> None:
        self.fid.reset()
        self.n = 0

    def update(self, sr, ref) -> None:
        import torch

        with torch.inference_mode():
            self.fid.update(to_tensor(ref, self.border, self.device), real=True)
            self.fid.update(to_tensor(sr, self.border, self.device), real=False)
        self.n += 1

    def compute(self) -> float:
        if self.n < 2:
            raise ValueError("FID needs at least 2 image pairs")
        return float(self.fid.compute())


def _pyiqa_loader(state: dict, path: Path):
    """A stand-in for pyiqa's ``load_pretrained_network(net, model_path, strict, weight_keys)`` that loads our
    (``weights_only=True``) tensors, whatever ``model_path`` pyiqa asks for: no unpickling, no download, no
    ``print``."""

    def load(net, model_path=None, strict: bool = True, weight_keys: Optional[str] = None) -> None:
        sd = state
        if weight_keys is not None and isinstance(sd.get(weight_keys), dict):
            sd = sd[weight_keys]
        elif set(sd) == {"params"} and isinstance(sd["params"], dict):
            sd = sd["params"]
        sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
        try:
            net.load_state_dict(sd, strict=strict)
        except RuntimeError as e:
            raise CheckpointError(f"{path.name} does not fit pyiqa's {type(net).__name__} "
                                  f"({str(e).strip().splitlines()[0][:160]}): replace it with the official file") from e

    return load


class PyiqaMetric(Metric):
    """A pyiqa metric (optional backend, PolyForm-Noncommercial): MUSIQ-KonIQ, MANIQA-PIPAL, CLIPIQA.

    Weights come from the user's files, never from the network or pyiqa's cache. State-dict files (MUSIQ,
    MANIQA) are loaded here with ``torch.load(weights_only=True)``; pyiqa's ``load_pretrained_network`` (which
    unpickles with ``weights_only=False`` and downloads missing files) is swapped, in the arch module, for one
    that hands it these tensors while pyiqa builds the network. MANIQA's timm ViT is built without its ImageNet
    download (the MANIQA checkpoint holds all of its tensors). CLIP's ``RN50.pt`` is a TorchScript archive,
    which cannot be loaded safely: it is accepted only when its SHA-256 is the official one, and pyiqa's CLIP
    loader is handed its path (so it neither looks in its own cache nor downloads).
    """

    def __init__(self, spec: MetricSpec, border: Optional[int] = None, device=None):
        super().__init__(spec, border, device)
        import importlib

        from ..errors import require

        pyiqa = require("pyiqa", "pyiqa")
        name = spec.options["pyiqa_name"]
        self.device = _device(device)
        path = _weight_path(spec)
        if name == "clipiqa":
            _check_sha256(path, spec.weights[0])
            from pyiqa.archs import clip_model, clipiqa_arch

            def load_local(backbone, device="cpu", *args, **kwargs):
                return clip_model.load(str(path), device, *args, **kwargs)

            with _patched((clipiqa_arch, "load", load_local)):
                self.metric = pyiqa.create_metric(name, device=self.device)
            return
        state = _load_state_dict(path)
        arch = importlib.import_module(spec.options["pyiqa_arch"])
        patches = [(arch, "load_pretrained_network", _pyiqa_loader(state, path))]
        if hasattr(arch, "timm"):
            create = arch.timm.create_model

            def create_no_download(*args, **kw):
                kw["pretrained"] = False
                return create(*args, **kw)

            patches.append((arch.timm, "create_model", create_no_download))
        with _patched(*patches):
            self.metric = pyiqa.create_metric(name, device=self.device)

    def _compute(self, sr, ref) -> float:
        import torch

        with torch.inference_mode():
            return float(self.metric(to_tensor(sr, self.border, self.device)).reshape(-1)[0])


def _check_sha256(path: Path, wf) -> None:
    """Refuse a file that is not byte for byte the official one (for formats that cannot be loaded safely)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    if h.hexdigest() != wf.sha256:
        raise CheckpointError(f"{path} is not the official {wf.name} (SHA-256 {h.hexdigest()[:12]}..., expected "
                              f"{wf.sha256[:12]}...): it is a TorchScript archive, which realisr loads only when it "
                              f"is the exact official file; replace it with the file from {wf.url}")
