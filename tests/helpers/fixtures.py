"""Where the tests find the official fixture sets.

Each set is vendored under ``tests/fixtures/<name>`` (see ``tests/fixtures/README.md``). An environment
variable per set points the tests at another set of the same format instead (other seeds, shapes, settings):

    golden        REALISR_GOLDEN_DIR         PiSA-SR and OSEDiff
    golden-ccsr   REALISR_GOLDEN_CCSR_DIR    CCSR-v2
    golden-seesr  REALISR_GOLDEN_SEESR_DIR   SeeSR, RAM and DAPE

The three vendored sets share one tiny SD-2.1-shaped model, kept once in ``tests/fixtures/golden/sd``: a set
without its own ``sd/`` uses that one.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures"
ENV = {"golden": "REALISR_GOLDEN_DIR", "golden-ccsr": "REALISR_GOLDEN_CCSR_DIR",
       "golden-seesr": "REALISR_GOLDEN_SEESR_DIR"}


def fixture_set(name: str) -> Path:
    """The folder of fixture set ``name``: its environment variable when set, else the vendored copy."""
    env = os.environ.get(ENV[name])
    return Path(env) if env else FIXTURES / name


def tiny_sd_dir(root: Path) -> Path:
    """The tiny SD model of a fixture set: ``<root>/sd`` when the set has one, else the shared vendored copy."""
    own = Path(root) / "sd"
    if (own / "vae").is_dir() or (own / "model_index.json").is_file():
        return own
    return FIXTURES / "golden" / "sd"
