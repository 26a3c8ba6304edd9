"""`bash benchmarks/gpu_session.sh --smoke`: the prepared GPU run, on this CPU with tiny models, so that the rare
lent GPU minutes are not spent on a broken script. Every step runs; the benchmark prints every table of issue
14 and its JSON holds every section's rows; without CUDA the GPU tests skip."""

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def test_gpu_session_smoke_run_prints_every_table(tmp_path):
    pytest.importorskip("diffusers")
    env = {**os.environ, "OUT": str(tmp_path)}
    res = subprocess.run(["bash", "benchmarks/gpu_session.sh", "--smoke"], cwd=str(REPO), env=env,
                         capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stderr[-3000:]
    assert {"env.txt", "gpu_tests.txt", "bench_speed.txt", "bench_speed.json"} <= {p.name for p in tmp_path.iterdir()}
    text = (tmp_path / "bench_speed.txt").read_text()
    for title in ("## speed", "## nan", "## toggles", "## batch", "## memory", "## targets"):
        assert title in text, text[-2000:]
    assert "Traceback" not in text and "NaN/Inf" not in text
    rows = json.loads((tmp_path / "bench_speed.json").read_text())
    assert {r["section"] for r in rows} == {"speed", "nan", "toggles", "batch", "memory"}
    assert {r["row"] for r in rows if r["section"] == "speed"} >= {"plain diffusers", "pisa default",
                                                                    "pisa adjustable", "re-dial", "osediff"}
