"""Recipes: the exact settings of one restoration as JSON, written by ``realisr serve`` ("download settings")
and replayed by ``realisr upscale --recipe settings.json``.

A recipe holds the model id, the pipeline call's keyword arguments (scalars), the seed, the output format and
the dial maps painted with the brush. A map is stored as an 8-bit mask (a base64 PNG at the input's size) and
the value inside the painted region; outside it the dial keeps its scalar value from ``args``::

    map = outside + (inside - outside) * mask / 255

Both the app and the CLI build the call from the recipe through :meth:`Recipe.call_kwargs`, so a replay runs
exactly the computation the app showed. Recipes hold no paths: the machine-specific parts (where SD-2.1 or a
checkpoint lives) stay on the command line or in the environment.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from .errors import RealisrError

__all__ = ["Recipe", "RecipeError", "region_map", "encode_mask", "decode_mask", "RECIPE_FORMAT"]

RECIPE_FORMAT = "realisr-recipe/1"
_CALL_KEYS = ("outscale", "tile", "tile_pad")


class RecipeError(RealisrError, ValueError):
    """A recipe file cannot be read or does not fit the input."""


def encode_mask(mask: np.ndarray) -> str:
    """An ``[H, W]`` uint8 mask as a base64 PNG (lossless)."""
    from PIL import Image

    m = np.asarray(mask)
    if m.ndim != 2 or m.dtype != np.uint8:
        raise ValueError(f"a mask must be an [H, W] uint8 array, got {m.shape} {m.dtype}")
    buf = io.BytesIO()
    Image.fromarray(m, "L").save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_mask(text: str) -> np.ndarray:
    """The ``[H, W]`` uint8 mask of :func:`encode_mask`."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(base64.b64decode(text, validate=True)), formats=["PNG"]) as im:
            if im.mode != "L":
                raise RecipeError(f"a recipe mask must be an 8-bit grey PNG, got mode {im.mode}")
            return np.asarray(im, dtype=np.uint8).copy()
    except (ValueError, OSError, UnidentifiedImageError) as e:
        if isinstance(e, RecipeError):
            raise
        raise RecipeError(f"a recipe mask is not a valid base64 PNG ({e}): re-download the recipe") from None


def region_map(mask: np.ndarray, inside: float, outside: float) -> np.ndarray:
    """``outside + (inside - outside) * mask / 255`` as float32 ``[H, W]`` (soft brush edges blend)."""
    m = np.asarray(mask, dtype=np.float32) / np.float32(255.0)
    return (np.float32(outside) + (np.float32(inside) - np.float32(outside)) * m).astype(np.float32)


def _finite_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass
class Recipe:
    """The settings of one restoration.

    Attributes:
        model: registry id.
        args: keyword arguments of ``pipe(image, ...)`` (JSON scalars), including ``outscale``, ``tile`` and
            ``tile_pad`` when set.
        seed: seed of the call's ``torch.Generator`` (``None``: no generator).
        maps: ``{dial: {"mask_png": base64 PNG, "inside": value}}``; the value outside is ``args[dial]``.
        ext: output format (``"png"``, ``"tif"``, ...) or ``None`` (the CLI's default).
        note: free text (what made it; shown nowhere else).
    """

    model: str
    args: dict = field(default_factory=dict)
    seed: Optional[int] = None
    maps: dict = field(default_factory=dict)
    ext: Optional[str] = None
    note: str = ""

    # -- (de)serialisation ----------------------------------------------------------------------------------
    def to_json(self) -> dict:
        from . import __version__

        return {"format": RECIPE_FORMAT, "realisr": __version__, "model": self.model, "args": dict(self.args),
                "seed": self.seed, "maps": {k: dict(v) for k, v in self.maps.items()}, "ext": self.ext,
                "note": self.note}

    @classmethod
    def from_json(cls, obj: Any, *, source: str = "recipe") -> "Recipe":
        """Validate and build a recipe.

        Raises:
            RecipeError: not a recipe, or a field of the wrong type.
        """
        if not isinstance(obj, dict) or obj.get("format") != RECIPE_FORMAT:
            raise RecipeError(f"{source} is not a realisr recipe (expected \"format\": \"{RECIPE_FORMAT}\")")
        model = obj.get("model")
        if not isinstance(model, str) or not model:
            raise RecipeError(f"{source}: \"model\" must be a model id")
        args = obj.get("args", {})
        if not isinstance(args, dict) or not all(isinstance(k, str) for k in args):
            raise RecipeError(f"{source}: \"args\" must be an object of call arguments")
        for k, v in args.items():
            if not (v is None or isinstance(v, (str, bool)) or _finite_number(v)):
                raise RecipeError(f"{source}: argument {k!r} must be a number, text, true/false or null")
        seed = obj.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise RecipeError(f"{source}: \"seed\" must be an integer or null")
        maps = obj.get("maps") or {}
        if not isinstance(maps, dict):
            raise RecipeError(f"{source}: \"maps\" must be an object")
        for k, m in maps.items():
            if (not isinstance(m, dict) or not isinstance(m.get("mask_png"), str)
                    or not _finite_number(m.get("inside"))):
                raise RecipeError(f"{source}: map {k!r} needs \"mask_png\" (base64 PNG) and a number \"inside\"")
            if not _finite_number(args.get(k)):
                raise RecipeError(f"{source}: map {k!r} needs its value outside the region in args[{k!r}]")
        ext = obj.get("ext")
        if ext is not None and not isinstance(ext, str):
            raise RecipeError(f"{source}: \"ext\" must be a file extension or null")
        return cls(model=model, args=dict(args), seed=seed, maps={k: dict(v) for k, v in maps.items()},
                   ext=ext, note=str(obj.get("note", "")))

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=1, sort_keys=False) + "\n"

    def save(self, path: Union[str, os.PathLike]) -> Path:
        """Write the recipe atomically (temporary file, then rename)."""
        from .io.text import atomic_write_text

        return atomic_write_text(path, self.dumps())

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "Recipe":
        """Read a recipe file.

        Raises:
            RecipeError: missing, not JSON, or not a recipe.
        """
        p = Path(path)
        try:
            text = p.read_text()
        except OSError as e:
            raise RecipeError(f"cannot read recipe {p.name}: {e.strerror or e}") from None
        try:
            obj = json.loads(text)
        except ValueError as e:
            raise RecipeError(f"recipe {p.name} is not valid JSON ({e})") from None
        return cls.from_json(obj, source=f"recipe {p.name}")

    # -- the call -------------------------------------------------------------------------------------------
    def call_kwargs(self, size: Optional[tuple[int, int]] = None) -> dict:
        """Keyword arguments of ``pipe(image, ...)`` (without ``generator``), maps built for an input of
        ``size = (height, width)``.

        Raises:
            RecipeError: the recipe has maps and ``size`` is not their size.
        """
        kw = dict(self.args)
        for name, m in self.maps.items():
            mask = decode_mask(m["mask_png"])
            if size is not None and tuple(mask.shape) != tuple(size):
                raise RecipeError(f"the recipe's {name} map is {mask.shape[1]}x{mask.shape[0]} but the input is "
                                  f"{size[1]}x{size[0]}: a painted map belongs to the image it was painted on")
            kw[name] = region_map(mask, float(m["inside"]), float(self.args[name]))
        return kw

    def split_call(self, size: Optional[tuple[int, int]] = None) -> tuple[dict, dict]:
        """``(base, method)``: ``outscale``/``tile``/``tile_pad`` and the method's own arguments."""
        kw = self.call_kwargs(size)
        base = {k: kw.pop(k) for k in _CALL_KEYS if k in kw}
        return base, kw

    def generator(self):
        """A ``torch.Generator`` seeded with :attr:`seed`, or ``None``."""
        if self.seed is None:
            return None
        import torch

        return torch.Generator().manual_seed(int(self.seed))
