"""Declarative descriptions of a model's dials: which call arguments a user turns, their ranges, whether they
take a per-pixel map, and whether a change re-renders cheaply (no network pass).

A pipeline class declares its own dials as a class attribute ``dials = ModelDials(...)``; the web app
(``realisr serve``) builds its controls from :func:`dials_for`, so a new model gets its controls by declaring a
description, not by editing the UI. A registry entry may point at another description with
``options={"dials": "module:NAME"}`` (e.g. for a checkpoint family whose dials differ from its class's).

The generic dials every model gets from its registry entry come first: ``outscale``, ``tile`` (when the model
tiles) and ``color_fix`` (when it has a colour fix). A dial is *cheap* when the pipeline's ``redial`` method
renders it from the state a full call kept (``ModelDials.keep``), e.g. PiSA-SR's ``lambda_pix`` /
``lambda_sem``: one VAE decode, no UNet pass.

This module imports nothing heavy (``import realisr`` stays light).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field, replace
from typing import Any, Optional

from .registry import ModelSpec

__all__ = ["Dial", "ModelDials", "dials_for", "KINDS", "POSTERIOR_SEED"]

#: Kinds of dial: a number (``float``/``int``), one of ``choices``, free ``text``, a ``seed`` (int; fed to the
#: call as ``generator=torch.Generator().manual_seed(seed)``) or a ``bool``.
KINDS = ("float", "int", "choice", "text", "seed", "bool")


@dataclass(frozen=True)
class Dial:
    """One control.

    Attributes:
        name: the pipeline call argument (``pipe(image, name=value)``); ``seed`` for the generator.
        label: what the UI shows.
        kind: one of :data:`KINDS`.
        default: the value a plain call uses (``None``: the pipeline's own default, argument not passed).
        minimum, maximum, step: range of a number.
        choices: values of a ``choice``, each a value or a ``(label, value)`` pair.
        cheap: a change re-renders through the pipeline's ``redial`` from kept state (no network pass).
        spatial: the argument also accepts a per-pixel map (PIL / numpy / torch) the size of the input.
        advanced: shown in the "advanced" group.
        only: model ids this dial applies to (empty: every model of the class).
        requires: registry option keys a model's entry must have for this dial (e.g. ``"fidelity_delta"``: only
            GAN models with a fidelity delta have the ``fidelity`` dial).
        sets: call arguments that go with any value of this dial (e.g. a seed of the one-step models samples
            the VAE posterior: ``{"sample_posterior": True}``).
        help: one line for the UI.
    """

    name: str
    label: str
    kind: str = "float"
    default: Any = None
    minimum: Optional[float] = None
    maximum: Optional[float] = None
    step: Optional[float] = None
    choices: tuple = ()
    cheap: bool = False
    spatial: bool = False
    advanced: bool = False
    only: tuple[str, ...] = ()
    requires: tuple[str, ...] = ()
    sets: dict = field(default_factory=dict)
    help: str = ""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"dial {self.name}: kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "choice" and not self.choices:
            raise ValueError(f"dial {self.name}: a choice needs choices")
        if self.spatial and self.kind != "float":
            raise ValueError(f"dial {self.name}: only float dials can be spatial")

    def options(self) -> list[tuple[str, Any]]:
        """``(label, value)`` of each choice."""
        return [c if isinstance(c, tuple) else (str(c), c) for c in self.choices]

    def label_of(self, value) -> Optional[str]:
        for lab, v in self.options():
            if v == value or lab == value:
                return lab
        return None

    def coerce(self, v):
        """A UI value as the pipeline wants it (``None``, and ``""`` for non-text dials: not passed).

        Raises:
            ValueError: not a value of this dial.
        """
        if self.kind == "choice":
            for lab, val in self.options():
                if v == lab or (v == val and not isinstance(v, bool)):
                    return val
            raise ValueError(f"{self.name} must be one of {', '.join(lab for lab, _ in self.options())}, got {v!r}")
        if v is None or (isinstance(v, str) and v.strip() == "" and (self.kind != "text" or self.default is None)):
            return None  # (a text dial whose default is None: empty means the model's default)
        if self.kind in ("int", "seed", "float"):
            try:
                f = float(v)
            except (TypeError, ValueError):
                raise ValueError(f"{self.name} must be a number, got {v!r}") from None
            return f if self.kind == "float" else int(round(f))
        if self.kind == "bool":
            return bool(v)
        return str(v)


@dataclass(frozen=True)
class ModelDials:
    """The dials of a model family and how cheap re-rendering works.

    Attributes:
        dials: the method's own dials (the generic ones are added by :func:`dials_for`).
        redial: name of the pipeline method that renders cheap dials from kept state, called as
            ``pipe.<redial>(state, **cheap_values)``; ``None``: every change is a full run.
        keep: call arguments that make a full call keep that state (e.g. ``{"keep_predictions": True}``).
        fixed: call arguments that make a full call compute the dials the way ``redial`` does (replayed by
            recipes so that ``realisr upscale --recipe`` gives exactly what the app showed), e.g. PiSA-SR's
            ``{"default_mode": False}``.
        state_key: where the state is in ``SROutput.extras``.
        grid: how the work is tiled, for the estimate: ``"pixel"`` (tiles of the input) or ``"latent"``
            (one-step diffusion: latent tiles of the processed image).
        seconds_per_mp: rough prior of seconds per output megapixel, ``{"cpu": s, "cuda": s}``, used until a
            run on this device has been measured (per step when ``per_step`` is set).
        per_step: the dial whose value multiplies the time (``"steps"`` for multi-step samplers); its value
            when not given comes from the registry entry's ``options`` (else 1).
        bytes_per_out_pixel: rough peak working memory per output pixel of one untiled pass.
        model_bytes: memory of the loaded weights (fp32).
    """

    dials: tuple[Dial, ...] = ()
    redial: Optional[str] = None
    keep: dict = field(default_factory=dict)
    fixed: dict = field(default_factory=dict)
    state_key: str = "redial_state"
    grid: str = "pixel"
    seconds_per_mp: dict = field(default_factory=lambda: {"cpu": 30.0, "cuda": 0.5})
    per_step: Optional[str] = None
    bytes_per_out_pixel: float = 1600.0
    model_bytes: float = 7e7

    def names(self) -> list[str]:
        return [d.name for d in self.dials]

    def get(self, name: str) -> Optional[Dial]:
        for d in self.dials:
            if d.name == name:
                return d
        return None

    def cheap_names(self) -> list[str]:
        return [d.name for d in self.dials if d.cheap]

    def spatial_names(self) -> list[str]:
        return [d.name for d in self.dials if d.spatial]


#: The one-step diffusion models' seed: empty = the VAE posterior's mode (realisr's default); a number samples the
#: posterior with that seed, as the official scripts do (``realisr upscale --seed``).
POSTERIOR_SEED = Dial("seed", "Seed (empty: no sampling)", "seed", default=None, advanced=True,
                      sets={"sample_posterior": True},
                      help="sample the VAE posterior with this seed, as the official scripts do")

_COLOR_FIXES = ("adain", "wavelet", "none")
_TILES = (64, 128, 192, 256, 384, 512, 768, 1024)


def _generic(spec: ModelSpec, redial: bool) -> list[Dial]:
    out = [Dial("outscale", "Output scale", "float", default=float(spec.scale), minimum=1.0,
                maximum=float(spec.scale), step=0.5, cheap=redial,
                help="final scale relative to the input (the model runs at its native scale, then resizes)")]
    if spec.tiling:
        out.append(Dial("tile", "Tile (input pixels)", "choice", default=None,
                        choices=(("automatic", None), ("whole image", 0), *((str(t), t) for t in _TILES)),
                        advanced=True, help="smaller tiles need less memory; automatic: chosen from free memory"))
    if spec.color_fix != "none":
        out.append(Dial("color_fix", "Colour fix", "choice", default=spec.color_fix, choices=_COLOR_FIXES,
                        cheap=redial, help="match the colours of the input (adain / wavelet) or not"))
    return out


def _load(path: str):
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def dials_for(spec: ModelSpec) -> ModelDials:
    """The full description of a model's dials: the generic ones from its registry entry, then the pipeline
    class's own (``dials`` class attribute, or ``spec.options["dials"]``), filtered by ``Dial.only`` and
    ``Dial.requires``.

    Importing the pipeline class is cheap (pipeline modules import torch and diffusers lazily).
    """
    ref = spec.options.get("dials")
    own = _load(ref) if ref else getattr(spec.pipeline_class(), "dials", None)
    own = own if isinstance(own, ModelDials) else ModelDials()
    method = [d for d in own.dials if (not d.only or spec.id in d.only)
              and all(spec.options.get(k) for k in d.requires)]
    generic = [g for g in _generic(spec, own.redial is not None) if g.name not in {d.name for d in method}]
    return replace(own, dials=tuple(generic + method))
