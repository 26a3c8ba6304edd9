"""Every registered model's dial description (what `realisr serve` turns into controls) names arguments its
pipeline really takes, and its cheap dials are ones its re-dial method takes."""

import inspect

import pytest

from realisr.dials import KINDS, Dial, dials_for
from realisr.registry import REGISTRY

BASE_CALL = {"outscale", "tile", "tile_pad"}


def _call_args(cls) -> set:
    names = set(BASE_CALL)
    for fn in (cls.check_inputs, cls._upscale_rgb):
        for p in inspect.signature(fn).parameters.values():
            if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD):
                names.add(p.name)
    return names


@pytest.mark.parametrize("model_id", sorted(REGISTRY))
def test_dials_are_call_arguments(model_id):
    spec = REGISTRY[model_id]
    cls = spec.pipeline_class()
    d = dials_for(spec)
    accepted = _call_args(cls)
    names = d.names()
    assert len(names) == len(set(names)), "a dial is described twice"
    assert "outscale" in names
    for dial in d.dials:
        assert dial.kind in KINDS
        assert (dial.name in accepted) or (dial.kind == "seed"), f"{model_id}: {dial.name} is not a call argument"
        if dial.kind in ("float", "int") and dial.minimum is not None and dial.default is not None:
            assert dial.minimum <= dial.default <= dial.maximum
        if dial.kind == "choice":
            assert dial.label_of(dial.default) is not None
    for key in (*d.keep, *d.fixed, *(k for x in d.dials for k in x.sets)):
        assert key in accepted, f"{model_id}: {key} is not a call argument"
    if d.redial:
        params = inspect.signature(getattr(cls, d.redial)).parameters
        for name in d.cheap_names():
            assert name in params, f"{model_id}: cheap dial {name} is not an argument of {d.redial}"
    else:
        assert not d.cheap_names(), f"{model_id}: cheap dials without a re-dial method"
    assert set(d.spatial_names()) <= set(d.cheap_names()) | set(names)


def test_dial_values_are_coerced_and_checked():
    tile = next(x for x in dials_for(REGISTRY["realesrgan-x4plus"]).dials if x.name == "tile")
    assert tile.coerce("automatic") is None and tile.coerce("whole image") == 0 and tile.coerce("256") == 256
    with pytest.raises(ValueError, match="tile must be one of"):
        tile.coerce("300")
    assert Dial("steps", "Steps", "int", default=4).coerce(3.7) == 4
    assert Dial("prompt", "Prompt", "text", default="").coerce("") == ""
    assert Dial("prompt", "Prompt", "text").coerce("") is None  # default None: empty = the model's default
    assert Dial("x", "X").coerce("") is None
    with pytest.raises(ValueError):
        Dial("x", "X", "slider")
    with pytest.raises(ValueError):
        Dial("p", "P", "text", spatial=True)


def test_the_fidelity_dial_appears_for_gan_models_with_a_delta():
    """The GAN description's `fidelity` dial (from the ea-adam work) shows only where a registry entry names a
    fidelity delta; it is spatial (the brush) and not cheap (each change is a forward pass)."""
    from dataclasses import replace

    base = REGISTRY["realsr-df2k-x4"]
    assert "fidelity" not in dials_for(replace(base, options={})).names()
    with_delta = replace(base, options={**base.options, "fidelity_delta": "x.safetensors"})
    d = dials_for(with_delta)
    f = d.get("fidelity")
    assert f is not None and f.spatial and not f.cheap and (f.minimum, f.maximum, f.default) == (0.0, 1.0, 0.0)
    assert d.redial is None
