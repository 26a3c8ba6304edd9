"""Method specifications for ``realisr bench``: a model (registry id or checkpoint path) plus call settings,
with grids expanded into settings that the report draws as curves.

Grammar (one ``-m`` argument)::

    MODEL                       bicubic, realesrgan-x4plus, ./my_model.pth
    MODEL:KEY=VALUE[,KEY=VALUE] pisa-sr:lambda_pix=0.5,lambda_sem=1.0   (keyword arguments of pipe(image, ...))
    MODEL:KEY=V1|V2|V3,...      pisa-sr:lambda_pix=0|0.25|0.5|1.0,lambda_sem=1.0   (a grid: one setting per value)
    MODEL:KEY=START:STOP:STEP   pisa-sr:lambda_pix=0:1:0.25   (inclusive range, a grid too)

Keys prefixed ``load.`` go to :func:`realisr.load_pipeline` instead of the call (e.g. ``load.dtype=fp16``).
Values are parsed as int, float, ``true``/``false``, ``none``, else kept as strings. In a grid the first
swept key varies along a curve; each combination of the other swept keys is its own curve.
"""

from __future__ import annotations

import hashlib
import itertools
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from ..errors import RealisrError

__all__ = ["MethodSetting", "MethodSpecError", "parse_method", "parse_methods", "parse_value"]


class MethodSpecError(RealisrError, ValueError):
    """A ``-m`` method specification cannot be parsed."""


@dataclass(frozen=True)
class MethodSetting:
    """One method with one setting: what a row of the benchmark is.

    Attributes:
        model: registry id or checkpoint path.
        call_kwargs: keyword arguments of ``pipe(image, ...)``.
        load_kwargs: keyword arguments of ``load_pipeline``.
        label: display name, e.g. ``pisa-sr[lambda_pix=0.5,lambda_sem=1]``.
        slug: file-system-safe unique name (the SR cache folder).
        group: curve id for grids (``None`` for a single setting).
        sweep_key: the key that varies along the curve, ``sweep_value`` its value here.
        spec: the ``-m`` string it came from.
    """

    model: str
    call_kwargs: dict = field(default_factory=dict)
    load_kwargs: dict = field(default_factory=dict)
    label: str = ""
    slug: str = ""
    group: Optional[str] = None
    sweep_key: Optional[str] = None
    sweep_value: Any = None
    spec: str = ""

    def to_json(self) -> dict:
        return {"model": self.model, "call_kwargs": self.call_kwargs, "load_kwargs": self.load_kwargs,
                "label": self.label, "slug": self.slug, "group": self.group, "sweep_key": self.sweep_key,
                "sweep_value": self.sweep_value, "spec": self.spec}


def parse_value(text: str) -> Any:
    """``"0.5"`` -> 0.5, ``"3"`` -> 3, ``"true"`` -> True, ``"none"`` -> None, else the string."""
    t = text.strip()
    low = t.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(t)
        except ValueError:
            pass
    return t


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def _expand(key: str, text: str) -> list:
    if "|" in text:
        return [parse_value(p) for p in text.split("|")]
    m = re.fullmatch(r"\s*(-?[\d.eE+-]+):(-?[\d.eE+-]+):([\d.eE+-]+)\s*", text)
    if m:
        start, stop, step = (float(g) for g in m.groups())
        if step <= 0:
            raise MethodSpecError(f"{key}={text}: the step of a START:STOP:STEP range must be positive")
        n = int(round((stop - start) / step))
        vals = [round(start + i * step, 10) for i in range(n + 1) if start + i * step <= stop + 1e-9]
        return [int(v) if float(v).is_integer() and all(float(g).is_integer() for g in m.groups()) else v
                for v in vals]
    return [parse_value(text)]


def _slug(model: str, items: list[tuple[str, Any]]) -> str:
    base = re.sub(r"[^A-Za-z0-9._-]+", "-", model.rsplit("/", 1)[-1]).strip("-") or "model"
    if not items:
        return base if model == base else f"{base}-{hashlib.sha1(model.encode()).hexdigest()[:6]}"
    parts = "_".join(f"{k}-{_fmt(v)}" for k, v in items)
    parts = re.sub(r"[^A-Za-z0-9._-]+", "-", parts)
    digest = hashlib.sha1(repr((model, items)).encode()).hexdigest()[:6]
    return f"{base}__{parts}"[:100] + f"-{digest}"


def parse_method(spec: str) -> list[MethodSetting]:
    """Expand one ``-m`` specification into settings.

    Raises:
        MethodSpecError: empty model, or a setting that is not ``KEY=VALUE``.
    """
    spec = spec.strip()
    model, sep, rest = spec.partition(":")
    # a Windows drive letter or a URL-ish path: only split when the rest looks like settings
    if sep and not re.match(r"^\s*[A-Za-z_][\w.]*\s*=", rest):
        model, rest = spec, ""
    model = model.strip()
    if not model:
        raise MethodSpecError(f"method {spec!r} has no model: use ID or ID:key=value,...")
    keys, choices = [], []
    if rest.strip():
        for part in _split_settings(rest):
            if "=" not in part:
                raise MethodSpecError(f"setting {part!r} in {spec!r} is not KEY=VALUE")
            k, v = part.split("=", 1)
            k = k.strip()
            if not re.fullmatch(r"[A-Za-z_][\w.]*", k):
                raise MethodSpecError(f"bad setting name {k!r} in {spec!r}")
            keys.append(k)
            choices.append(_expand(k, v))
    swept = [k for k, c in zip(keys, choices) if len(c) > 1]
    out = []
    for combo in itertools.product(*choices) if keys else [()]:
        items = list(zip(keys, combo))
        call = {k: v for k, v in items if not k.startswith("load.")}
        load = {k[5:]: v for k, v in items if k.startswith("load.")}
        label = model + ("[" + ",".join(f"{k}={_fmt(v)}" for k, v in items) + "]" if items else "")
        group = sweep_key = sweep_value = None
        if swept:
            sweep_key = swept[0]
            sweep_value = dict(items)[sweep_key]
            others = ",".join(f"{k}={_fmt(v)}" for k, v in items if k != sweep_key)
            group = f"{model}[{others}]" if others else model
        out.append(MethodSetting(model=model, call_kwargs=call, load_kwargs=load, label=label,
                                 slug=_slug(model, items), group=group, sweep_key=sweep_key,
                                 sweep_value=sweep_value, spec=spec))
    return out


def _split_settings(rest: str) -> list[str]:
    """Split ``a=1,b=x|y`` on commas that start a new ``KEY=``."""
    parts, cur = [], ""
    for piece in rest.split(","):
        if cur and not re.match(r"^\s*[A-Za-z_][\w.]*\s*=", piece):
            cur += "," + piece  # a comma inside a value
        else:
            if cur:
                parts.append(cur)
            cur = piece
    if cur:
        parts.append(cur)
    return [p.strip() for p in parts if p.strip()]


def parse_methods(specs: list[str]) -> list[MethodSetting]:
    """Expand several specifications; duplicate settings are kept once (first wins)."""
    seen, out = set(), []
    for s in specs:
        for m in parse_method(s):
            if m.slug not in seen:
                seen.add(m.slug)
                out.append(m)
    if not out:
        raise MethodSpecError("no methods given: pass -m bicubic -m realesrgan-x4plus ...")
    return out
