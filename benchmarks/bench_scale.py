"""Scale-out throughput: `realisr upscale` with 1 and N workers on the same inputs (issue 14).

Each row runs the same job (``--images`` synthetic photos of ``--size`` pixels, ``--overwrite`` so that every
run does all the work) with ``w`` workers:

* ``torchrun``: ``python -m torch.distributed.run --nproc-per-node w -m realisr upscale ...`` (what
  ``accelerate launch`` runs underneath); on GPUs each process takes ``cuda:LOCAL_RANK``.
* ``ray``: :func:`realisr.distributed.upscale_dataset` with ``w`` actors on a local Ray instance
  (``ray.init(num_cpus=N, num_gpus=...)``, started once, outside the timings).

Two throughputs: *wall* (images / the whole command, process start and model load included) and *steady*
(from the outputs' modification times: ``(images - w) / (last output - w-th output)``, i.e. once every worker
has produced its first image). The ratio is ``steady(N) / (N x steady(1))``: 1.0 is perfect scaling; the target
on GPUs (one per worker) is >= 0.9. Every run uses ``OMP_NUM_THREADS=--threads`` per worker, so on CPUs
N workers need N x that many free cores to scale: on a shared machine say so (``uptime`` is printed).

Usage::

    python benchmarks/bench_scale.py --workers 2                         # CPU, torchrun and Ray
    python benchmarks/bench_scale.py --workers 8 --device cuda --model realesrgan-x4plus --size 256 --images 256
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def make_inputs(folder: Path, n: int, size: int) -> None:
    """``n`` smooth random RGB photos (8-bit PNG) of ``size x size``."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        small = rng.integers(0, 256, (max(2, size // 8), max(2, size // 8), 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((size, size), Image.BICUBIC)
        arr = np.clip(np.asarray(img, dtype=np.int16) + rng.integers(-8, 9, (size, size, 3)), 0, 255)
        Image.fromarray(arr.astype(np.uint8)).save(folder / f"img{i:04d}.png")


def steady_rate(out: Path, workers: int) -> float:
    """Images per second once every worker has written its first output (from the outputs' times)."""
    times = sorted(p.stat().st_mtime_ns for p in out.glob("*.png"))
    if len(times) <= workers:
        return float("nan")
    span = (times[-1] - times[workers - 1]) / 1e9
    return (len(times) - workers) / span if span > 0 else float("nan")


def run_torchrun(args, inputs: Path, out: Path, w: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(REPO / "src")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(w), "--master-port",
           str(29500 + w), "-m", "realisr", "-q", "upscale", "-i", str(inputs), "-o", str(out), "-m", args.model,
           "--overwrite", "--dtype", args.dtype]
    if args.device:
        cmd += ["--device", args.device]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"torchrun with {w} worker(s) failed:\n{res.stderr[-3000:]}")
    return wall


def run_ray(args, inputs: Path, out: Path, w: int) -> float:
    from realisr.distributed import upscale_dataset

    gpus = None if args.device in (None, "cpu") else args.gpus_per_worker
    t0 = time.perf_counter()
    s = upscale_dataset([str(inputs)], str(out), args.model, workers=w, overwrite=True, dtype=args.dtype,
                        device=args.device, gpus_per_worker=gpus)
    wall = time.perf_counter() - t0
    if not s.ok:
        raise SystemExit(f"Ray with {w} worker(s): {s.failures[:3]} {s.missing[:3]}")
    return wall


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=2, help="N: compared with 1 worker")
    p.add_argument("--backend", default="torchrun,ray", help="comma list of torchrun, ray")
    p.add_argument("--model", default="realesr-animevideov3-x4")
    p.add_argument("--images", type=int, default=24)
    p.add_argument("--size", type=int, default=64, help="input side in pixels")
    p.add_argument("--device", default=None, help="cpu | cuda (default: best available)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per worker (OMP_NUM_THREADS)")
    p.add_argument("--gpus-per-worker", type=float, default=1.0, help="Ray on GPUs")
    p.add_argument("--keep", default=None, help="keep inputs/outputs in this folder")
    args = p.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    sys.path.insert(0, str(REPO / "src"))
    backends = [b.strip() for b in args.backend.split(",") if b.strip()]
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_scale_"))
    inputs = root / "in"
    make_inputs(inputs, args.images, args.size)
    # warm-up: converts bundled weights on first use, fills the page cache
    warm = REPO / "src"
    subprocess.run([sys.executable, "-m", "realisr", "-q", "upscale", "-i", str(sorted(inputs.glob("*.png"))[0]),
                    "-o", str(root / "warm") + "/", "-m", args.model, "--overwrite"],
                   env={**os.environ, "PYTHONPATH": str(warm)}, check=True)
    rows = []
    ray = None
    for backend in backends:
        if backend == "ray":
            import ray

            if not ray.is_initialized():
                kw = {"num_cpus": max(args.workers, 2), "include_dashboard": False, "log_to_driver": False,
                      "runtime_env": {"env_vars": {"PYTHONPATH": str(REPO / "src"),
                                                   "OMP_NUM_THREADS": str(args.threads)}}}
                ray.init(**kw)
        for w in (1, args.workers):
            out = root / f"out_{backend}_{w}"
            wall = (run_torchrun if backend == "torchrun" else run_ray)(args, inputs, out, w)
            rows.append((backend, w, wall, args.images / wall, steady_rate(out, w)))
            print(f"  {backend} x{w}: {wall:.1f} s", file=sys.stderr, flush=True)
    if ray is not None:
        ray.shutdown()
    load = os.getloadavg()
    print(f"\nbench_scale: {args.images} images of {args.size}x{args.size}, model {args.model}, device "
          f"{args.device or 'auto'}, {args.threads} thread(s) per worker, {os.cpu_count()} CPUs, load average "
          f"{load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    head = f"{'backend':<9} {'workers':>7} {'wall s':>8} {'img/s wall':>11} {'img/s steady':>13} {'ratio to N x 1':>15}"
    print(head)
    print("-" * len(head))
    one = {b: r for (b, w, _, _, r) in rows if w == 1}
    for b, w, wall, rw, rs in rows:
        ratio = rs / (w * one[b]) if w > 1 and one.get(b) else float("nan")
        print(f"{b:<9} {w:>7} {wall:>8.1f} {rw:>11.2f} {rs:>13.2f} {('%.2f' % ratio) if w > 1 else '-':>15}")
    print("ratio: steady throughput with N workers / (N x with 1); 1.0 = perfect scaling (target >= 0.9 on GPUs, "
          "one per worker)")


if __name__ == "__main__":
    main()
