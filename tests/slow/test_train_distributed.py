"""Two CPU processes (gloo) run the tiny PiSA-SR recipe through the CLI and end with identical weights.

The processes are started with ``torchrun`` (what ``accelerate launch --multi_gpu`` runs underneath; on the CPU
``accelerate launch`` only starts several processes through MPI). ``Accelerator`` picks up the distributed
environment and uses gloo.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers.onestep import golden_dir, sd_dir  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
GOLDEN = golden_dir()
SD = sd_dir(GOLDEN)

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (SD / "unet").is_dir(), reason="tiny SD fixture not available")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_cpu_run_has_identical_weights_on_both_ranks(tmp_path):
    pytest.importorskip("accelerate")
    import skimage.data
    from PIL import Image

    hq = tmp_path / "hq"
    hq.mkdir()
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        Image.fromarray(getattr(skimage.data, name)()).save(hq / f"{name}.png")
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), "-m", "realisr", "train", "tiny-cpu",
           "--set", f"data.hq=[{hq}]", "--set", f"model.pretrained={SD}", "--set", "train.max_steps=6",
           "--set", "pisa_sr.pix_steps=3", "--set", "train.checkpoint_every=3", "--output-dir", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1500, cwd=str(REPO))
    assert proc.returncode == 0, proc.stderr[-4000:]

    states = {}
    for step in (3, 6):
        state = json.loads((out / "checkpoints" / f"step-{step:06d}" / "training_state" / "state.json").read_text())
        assert state["num_processes"] == 2
        digests = state["rank_weight_digests"]
        assert len(digests) == 2 and digests[0] == digests[1], digests
        states[step] = state
    assert states[3]["rank_weight_digests"] != states[6]["rank_weight_digests"]  # it trained in between

    # the stage switch happened at step 3: the pixel LoRA is bit-identical afterwards, the semantic one moved
    a = torch.load(out / "checkpoints" / "step-000003" / "pisa_sr.pkl", weights_only=True)["state_dict_unet"]
    b = torch.load(out / "checkpoints" / "step-000006" / "pisa_sr.pkl", weights_only=True)["state_dict_unet"]
    pix = [k for k in a if "_pix." in k]
    sem_b = [k for k in a if "_sem." in k and ".lora_B." in k]
    assert pix and all(torch.equal(a[k], b[k]) for k in pix)
    assert sum(not torch.equal(a[k], b[k]) for k in sem_b) > 0.9 * len(sem_b)
    assert (out / "validation" / "step-000006.png").is_file()
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
