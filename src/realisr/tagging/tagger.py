"""The tagger: RAM or DAPE (RAM + SeeSR's LoRA) on an image -> tags, image embeddings, logits.

Preprocessing is the official one (``test_seesr.py`` / ``test_osediff.py``): the image as a float tensor in
``[0, 1]`` (``ToTensor``), a tensor ``Resize((384, 384))`` (bilinear, **no antialiasing**, as torchvision 0.15
does for tensors), then ImageNet mean/std. Tags are the classes whose ``sigmoid(logit)`` is strictly greater
than their threshold, in tag-list order; the official tag string joins them with ``", "``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Mapping, Optional, Sequence, Union

from .loading import PathLike

if TYPE_CHECKING:  # pragma: no cover
    import torch

logger = logging.getLogger(__name__)

__all__ = ["TagResult", "Tagger", "load_tagger", "image_to_tensor", "ram_preprocess", "official_prompt",
           "join_tags", "IMAGENET_MEAN", "IMAGENET_STD", "RAM_IMAGE_SIZE"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RAM_IMAGE_SIZE = 384
ThresholdSpec = Union[float, Sequence[float], Mapping[str, float], "torch.Tensor"]


def official_prompt(tags: str, user_prompt: str = "") -> str:
    """The prompt OSEDiff and SeeSR build from the tag string: ``f"{tags}, {user_prompt},"``
    (SeeSR appends its ``added_prompt`` to this without a space)."""
    return f"{tags}, {user_prompt},"


def join_tags(names: Sequence[str]) -> str:
    """The official tag string: ``", ".join(names)``."""
    return ", ".join(names)


def image_to_tensor(image) -> "torch.Tensor":
    """An image -> float32 ``[B, 3, H, W]`` in ``[0, 1]`` on the CPU (a tensor stays on its device).

    PIL images are converted to RGB and divided by 255 exactly like torchvision's ``ToTensor``; numpy arrays
    ``[H, W]``/``[H, W, C]`` may be uint8, uint16 or float in ``[0, 1]`` (alpha is dropped, grey replicated);
    tensors are ``[3, H, W]`` or ``[B, 3, H, W]`` in ``[0, 1]`` (uint8 is divided by 255).

    Raises:
        ValueError / TypeError: an unsupported shape or type.
    """
    import numpy as np
    import torch

    mod = type(image).__module__
    if mod.startswith("PIL."):
        image = np.array(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        arr = image
        if arr.ndim == 2:
            arr = arr[..., None]
        if arr.ndim != 3 or arr.shape[2] not in (1, 2, 3, 4):
            raise ValueError(f"expected an [H,W,C] image array with 1-4 channels, got shape {image.shape}")
        if arr.shape[2] in (2, 4):
            arr = arr[..., :-1]
        arr = np.ascontiguousarray(arr)
        t = torch.from_numpy(arr if arr.flags.writeable else arr.copy()).permute(2, 0, 1).contiguous()
        if arr.dtype == np.uint8:
            t = t.float().div(255)
        elif arr.dtype == np.uint16:
            t = t.float().div(65535)
        elif np.issubdtype(arr.dtype, np.floating):
            t = t.float()
        else:
            raise ValueError(f"unsupported array dtype {arr.dtype}: use uint8, uint16 or float in [0, 1]")
        if t.shape[0] == 1:
            t = t.expand(3, -1, -1)
        return t.unsqueeze(0)
    if isinstance(image, torch.Tensor):
        t = image.detach()
        if t.ndim == 3:
            t = t.unsqueeze(0)
        if t.ndim != 4 or t.shape[1] not in (1, 3):
            raise ValueError(f"expected a [3,H,W] or [B,3,H,W] tensor, got shape {tuple(image.shape)}")
        if t.shape[1] == 1:
            t = t.expand(-1, 3, -1, -1)
        return t.float().div(255) if t.dtype == torch.uint8 else t.float()
    raise TypeError(f"unsupported image type {type(image).__name__}: pass a PIL image, numpy array or torch tensor")


def ram_preprocess(x01, size: int = RAM_IMAGE_SIZE) -> "torch.Tensor":
    """The official RAM/DAPE input: ``[B, 3, H, W]`` in ``[0, 1]`` (or a list of ``[1, 3, H, W]``) ->
    bilinear resize to ``size x size`` without antialiasing (torchvision 0.15 ``Resize`` on tensors), then
    ImageNet normalisation. float32, on the input's device."""
    import torch
    import torch.nn.functional as F

    parts = x01 if isinstance(x01, (list, tuple)) else [x01]
    out = []
    for x in parts:
        x = x.float()
        if tuple(x.shape[-2:]) != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
        out.append(x)
    x = torch.cat(out)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


@dataclass
class TagResult:
    """What the tagger saw in a batch of images.

    Attributes:
        tags: per image, the tag names above threshold, in tag-list order (surrounding spaces stripped).
        text: per image, the official tag string (``", "`` join of the raw names, as ``inference_ram``).
        indices: per image, the class indices of ``tags``.
        image_embeds: ``[B, 145, 512]`` image embeddings (``image_proj`` output): SeeSR's soft prompt, on the
            tagger's device and in its dtype.
        visual: ``[B, 145, C]`` Swin features (token mean, then the 144 tokens), likewise.
        logits, probs: ``[B, num_classes]`` (``probs = sigmoid(logits)``), float32.
        thresholds: ``[num_classes]`` thresholds used (float32).
    """

    tags: list
    text: list
    indices: list
    image_embeds: "torch.Tensor" = field(repr=False)
    visual: "torch.Tensor" = field(repr=False)
    logits: "torch.Tensor" = field(repr=False)
    probs: "torch.Tensor" = field(repr=False)
    thresholds: "torch.Tensor" = field(repr=False)

    @property
    def tag_string(self) -> str:
        """The official tag string of a single-image result.

        Raises:
            ValueError: the result holds several images (use ``text``).
        """
        if len(self.text) != 1:
            raise ValueError(f"tag_string is for one image; this result holds {len(self.text)}: use .text")
        return self.text[0]


class Tagger:
    """RAM or DAPE with its tag list and thresholds. Build with :func:`load_tagger`.

    Call: ``tagger(image, threshold=None) -> TagResult``; ``tagger.prompt(image) -> str``.

    Attributes:
        kind: ``"dape"`` or ``"ram"``.
        model: the :class:`~realisr.tagging.ram_arch.RAM` network (eval mode).
        tag_names: the tag list (raw lines, in the language of ``chinese``).
        thresholds: ``[num_classes]`` float32 per-class thresholds.
        device, dtype: where and in which precision the network runs.
        files: the files it was loaded from (``None`` when built from a model).
    """

    def __init__(self, model, tag_names: Sequence[str], thresholds, *, kind: str = "dape", device=None,
                 dtype=None, files=None):
        import torch

        self.kind = kind
        self.model = model.eval().requires_grad_(False)
        self.tag_names = list(tag_names)
        if len(self.tag_names) != model.num_classes:
            raise ValueError(f"{len(self.tag_names)} tag names for a model with {model.num_classes} classes")
        self.thresholds = self._threshold_tensor(thresholds)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype or torch.float32
        self.model.to(self.device, self.dtype)
        self.files = files

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    @property
    def image_size(self) -> int:
        return self.model.img_size

    def _threshold_tensor(self, spec: ThresholdSpec, base=None):
        """A ``[C]`` float32 tensor from a single value, a per-class sequence, or ``{tag name: value}``
        (which updates ``base``)."""
        import torch

        c = self.num_classes
        if isinstance(spec, Mapping):
            out = (base if base is not None else self.thresholds).clone()
            index = {n.strip(): i for i, n in enumerate(self.tag_names)}
            for name, v in spec.items():
                if name.strip() not in index:
                    raise ValueError(f"threshold for unknown tag {name!r}")
                out[index[name.strip()]] = float(v)
            return out
        if isinstance(spec, (int, float)) and not isinstance(spec, bool):
            return torch.full((c,), float(spec), dtype=torch.float32)
        t = torch.as_tensor(spec, dtype=torch.float32).flatten().cpu()
        if t.numel() != c:
            raise ValueError(f"{t.numel()} thresholds for {c} tags: give one value, one per tag, or a mapping")
        return t.clone()

    def set_thresholds(self, threshold: ThresholdSpec) -> None:
        """Replace the thresholds: one value for every class, one per class, or ``{tag name: value}``."""
        self.thresholds = self._threshold_tensor(threshold)

    def preprocess(self, image) -> "torch.Tensor":
        """The official network input ``[B, 3, 384, 384]`` (float32, normalised) on the tagger's device."""
        if isinstance(image, (list, tuple)):  # sizes may differ: each is resized on its own
            if not image:
                raise ValueError("no images given")
            return ram_preprocess([image_to_tensor(im).to(self.device) for im in image], self.image_size)
        return ram_preprocess(image_to_tensor(image).to(self.device), self.image_size)

    def __call__(self, image, *, threshold: Optional[ThresholdSpec] = None) -> TagResult:
        """Tag an image or a batch.

        Args:
            image: PIL image, numpy ``[H, W, C]``, torch ``[3, H, W]`` / ``[B, 3, H, W]`` in ``[0, 1]``, or a
                list of those (sizes may differ).
            threshold: override the thresholds for this call (value, per-class sequence or mapping).

        Returns:
            :class:`TagResult`.
        """
        import torch

        x = self.preprocess(image)
        thr = self.thresholds if threshold is None else self._threshold_tensor(threshold, self.thresholds)
        # no_grad, not inference_mode: the embeddings may feed layers that train (SeeSR stage 2)
        with torch.no_grad():
            out = self.model(x.to(self.dtype))
        logits = out["logits"]
        probs = torch.sigmoid(logits)  # in the model's dtype, compared in float32 as officially
        targets = (probs.float() > thr.to(probs.device)).cpu()
        indices = [torch.nonzero(row).flatten().tolist() for row in targets]
        names = self.tag_names
        return TagResult(
            tags=[[names[i].strip() for i in idx] for idx in indices],
            text=[join_tags([names[i] for i in idx]) for idx in indices],
            indices=indices,
            image_embeds=out["image_embeds"], visual=out["visual"],
            logits=logits.float(), probs=probs.float(), thresholds=thr)

    def prompt(self, image, *, threshold: Optional[ThresholdSpec] = None) -> str:
        """The official tag string of one image (``inference_ram(...)[0]``)."""
        return self(image, threshold=threshold).tag_string

    def to(self, device=None, dtype=None) -> "Tagger":
        import torch

        if device is not None:
            self.device = torch.device(device)
        if dtype is not None:
            self.dtype = dtype
        self.model.to(self.device, self.dtype)
        return self

    def __repr__(self) -> str:
        return (f"Tagger(kind={self.kind!r}, classes={self.num_classes}, device={self.device}, "
                f"dtype={str(self.dtype).replace('torch.', '')})")


def load_tagger(kind: str = "dape", ram: Optional[PathLike] = None, dape: Optional[PathLike] = None,
                tag_list: Optional[PathLike] = None, device=None, dtype=None, *,
                thresholds: Optional[PathLike] = None, threshold: Optional[ThresholdSpec] = None,
                chinese: bool = False, tag_list_chinese: Optional[PathLike] = None,
                config_dir: Optional[PathLike] = None, root: Optional[PathLike] = None, merge_lora: bool = True,
                download: bool = False) -> Tagger:
    """Load RAM (``"ram"``) or DAPE (``"dape"``: RAM + SeeSR's LoRA, OSEDiff's and SeeSR's prompt extractor).

    Args:
        kind: ``"dape"`` or ``"ram"``.
        ram, dape, tag_list: paths of ``ram_swin_large_14m.pth``, ``DAPE.pth``, ``ram_tag_list.txt``
            (default: searched, see :mod:`realisr.tagging.loading`).
        device: ``None``/``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda:1"``...
        dtype: ``None``/``"auto"`` (fp16 on CUDA, as OSEDiff runs DAPE; fp32 on the CPU), or fp32/fp16/bf16.
        thresholds: path of ``ram_tag_list_threshold.txt`` (default: searched).
        threshold: override the per-class thresholds: one value, one per class, or ``{tag name: value}``
            (a mapping updates the file's values; the others replace them and make the file unnecessary).
        chinese: tag names from ``ram_tag_list_chinese.txt`` (path ``tag_list_chinese``, default: searched).
        config_dir: folder with ``q2l_config.json`` and ``swin/config_swinL_384.json`` (default: next to the
            files, else the official configs shipped with realisr).
        root: a folder searched first for every file (e.g. SeeSR's ``ram/`` or ``preset/models/``).
        merge_lora: merge DAPE's LoRA into the weights, as the official eval-mode model (``False`` keeps it
            separate; results agree to about 1e-6).
        download: fetch the RAM weights from the Hugging Face hub when not found locally.

    Returns:
        :class:`Tagger`.

    Raises:
        WeightsNotFoundError: one line naming every missing file.
        CheckpointError: a file does not fit (shapes, format, tag list length).
        ValueError: bad ``kind``, ``threshold`` or ``dtype``.
    """
    from ..pipelines.base import resolve_device, resolve_dtype
    from .loading import find_tagger_files, load_ram_model, read_tag_list, read_thresholds

    override_all = threshold is not None and not isinstance(threshold, Mapping)
    files = find_tagger_files(kind, ram=ram, dape=dape, tag_list=tag_list, thresholds=thresholds,
                              tag_list_chinese=tag_list_chinese, config_dir=config_dir, root=root, chinese=chinese,
                              need_thresholds=not override_all, download=download)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev, supported=("float32", "float16", "bfloat16"), prefer="float16")
    model, names = load_ram_model(files, merge_lora=merge_lora)
    if chinese:
        zh = read_tag_list(files.tag_list_chinese)
        if len(zh) != len(names):
            from ..errors import CheckpointError

            raise CheckpointError(f"{files.tag_list_chinese}: {len(zh)} Chinese tags for {len(names)} tags")
        names = zh
    base = read_thresholds(files.thresholds, len(names)) if files.thresholds is not None else None
    tagger = Tagger(model, names, base if base is not None else threshold, kind=kind, device=dev, dtype=dt,
                    files=files)
    if isinstance(threshold, Mapping):
        tagger.thresholds = tagger._threshold_tensor(threshold, tagger.thresholds)
    logger.info("tagger %s loaded from %s (%d tags, %s, %s)", kind, files.ram.parent, len(names), dev, dt)
    return tagger
