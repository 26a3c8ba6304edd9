import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# REALISR_TEST_STRICT=1 (set by .ci/run) turns every skip into a failure, except the tests marked ``gpu`` (CI has
# no accelerator). A test whose tool is missing here (Chromium, a network, an optional package) skips with its
# reason on a developer's machine, and fails in CI, so that CI really runs it.
STRICT = os.environ.get("REALISR_TEST_STRICT", "") not in ("", "0")

# dtype="auto" must not depend on the CPU the suite runs on (bf16 on CPUs with AMX, fp32 elsewhere): the suite
# sees every CPU as one without AMX (subprocesses inherit it); tests/fast/test_cpu.py tests the choice on
# simulated CPUs of both kinds, and tests that want bf16 ask for it.
os.environ.setdefault("REALISR_CPU_BF16", "0")


def _strict_failure(report, where):
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    report.outcome = "failed"
    report.longrepr = f"skipped {where} under REALISR_TEST_STRICT=1: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if STRICT and report.skipped and item.get_closest_marker("gpu") is None and not hasattr(report, "wasxfail"):
        _strict_failure(report, "test")


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    report = outcome.get_result()
    if STRICT and report.skipped and "tests/gpu" not in str(collector.path).replace(os.sep, "/"):
        _strict_failure(report, "module")


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
