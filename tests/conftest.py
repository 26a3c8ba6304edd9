import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def pytest_collection_modifyitems(config, items):
    """gpu-marked tests skip without CUDA; everything in tests/fast is also marked fast."""
    cuda = None
    for item in items:
        if "tests/fast" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(pytest.mark.fast)
        if item.get_closest_marker("gpu") is not None:
            if cuda is None:
                try:
                    import torch

                    cuda = torch.cuda.is_available()
                except ImportError:
                    cuda = False
            if not cuda:
                item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Keep tests from writing into the user's real cache; converted weights are shared per session."""
    if "REALISR_CACHE" not in os.environ:
        monkeypatch.setenv("REALISR_CACHE", str(tmp_path_factory.getbasetemp() / "realisr-cache"))
    yield


@pytest.fixture(scope="session")
def photo():
    """A real photo (scikit-image's astronaut, 512x512 RGB uint8)."""
    import skimage.data

    return skimage.data.astronaut()
