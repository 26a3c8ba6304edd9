"""Registry-wide contracts: every registered model is listed, documented and tested the moment it is added."""

import re
from pathlib import Path

import numpy as np
import pytest

import realisr
from realisr.cli.models import markdown_table
from realisr.io import ImageData
from realisr.registry import list_models
from realisr.weights.status import weights_status

README = Path(__file__).resolve().parents[2] / "README.md"
SPECS = list_models()


def test_readme_table_is_generated_from_registry():
    text = README.read_text()
    block = re.search(r"<!-- models:start -->\n(.*?)\n<!-- models:end -->", text, re.S)
    assert block, "README lacks the generated models table"
    assert block.group(1).strip() == markdown_table().strip(), \
        "README models table is stale: regenerate it with `realisr models --markdown`"


@pytest.mark.parametrize("spec", SPECS, ids=[s.id for s in SPECS])
def test_declared_metadata(spec):
    assert spec.scale >= 1 and spec.license and spec.description
    assert "float32" in spec.dtypes
    assert spec.color_fix in ("none", "adain", "wavelet")
    spec.pipeline_class()  # importable


_LOCAL = [s for s in SPECS if s.weights.kind != "user"]


@pytest.fixture(scope="module")
def pipes():
    cache = {}

    def get(spec):
        ok, why = weights_status(spec)
        if not ok:
            pytest.fail(f"{spec.id}: weights of a bundled model are missing: {why}")
        if spec.id not in cache:
            cache[spec.id] = realisr.load_pipeline(spec.id, device="cpu")
        return cache[spec.id]

    return get


@pytest.mark.parametrize("spec", _LOCAL, ids=[s.id for s in _LOCAL])
def test_odd_size_alpha_and_16bit(spec, pipes, photo):
    pipe = pipes(spec)
    h, w = 13, 19
    rgb = photo[200:200 + h, 220:220 + w].astype(np.float32) / 255
    alpha = np.linspace(0, 1, h * w, dtype=np.float32).reshape(h, w)
    out = pipe(ImageData(pixels=rgb, alpha=alpha, bit_depth=16))
    assert out.pixels.shape == (h * spec.scale, w * spec.scale, 3)
    assert out.image.alpha.shape == (h * spec.scale, w * spec.scale)
    assert out.image.bit_depth == 16
    assert np.isfinite(out.pixels).all() and out.pixels.min() >= 0 and out.pixels.max() <= 1


@pytest.mark.parametrize("spec", [s for s in _LOCAL if s.tiling], ids=[s.id for s in _LOCAL if s.tiling])
def test_tiled_matches_untiled(spec, pipes, photo):
    pipe = pipes(spec)
    crop = photo[120:168, 180:240]  # 48x60, tiled 2x2 with 32-px tiles
    full = pipe(crop, tile=0).pixels
    tiled = pipe(crop, tile=32, tile_pad=16).pixels
    diff = np.abs(full - tiled)
    # Tiles see 16 px of context; what a deep GAN sees beyond that changes the output slightly and smoothly
    # (measured: mean 2.7e-3 with 24-px tiles and 12 px of context on Real-ESRGAN x4plus).
    assert diff.mean() < 3e-3 and diff.max() < 0.1, (diff.mean(), diff.max())
