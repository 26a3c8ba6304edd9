"""Benchmark the offline GAN path (Real-ESRGAN x4plus) on CPU against the ncnn runtime.

Usage::

    python benchmarks/bench_gan.py                      # 128->512 and 256->1024, all variants
    python benchmarks/bench_gan.py --sizes 64 --repeats 1 --variants ncnn,eager,channels_last

Every (variant, size, threads) runs in its own subprocess, so its peak memory (``ru_maxrss``) is its own;
the table shows the best of ``--repeats`` timed runs after one warm-up, the peak RSS and the peak minus the
RSS after loading the model ("infer MiB", the working memory of inference), and the time relative to ncnn
with the same size and thread count. Variants of one size run back to back, so ratios are comparable on a
shared machine even when absolute times are not.

Variants: ``ncnn`` (the ncnn runtime, fp32: no Vulkan, no fp16/bf16 storage or arithmetic), ``eager``
(our pipeline with the plain spandrel model, NCHW fp32), ``channels_last`` (plain model, channels-last),
``compile`` (torch.compile, inductor with freezing; not in the default list: compiling takes minutes),
``bf16`` (only where the CPU has avx512_bf16 or AMX).

Measured 2026-11-26 on a 2-core AMD EPYC (AVX2, no AVX-512/bf16) shared with other jobs (load 3-14, so
absolute times drift; compare rows of one block), realesrgan-x4plus, 1 thread, s/img (x ncnn):

    size        ncnn            channels_last (default)  eager (NCHW)   winograd      infer MiB ncnn / ours(CL)
    64->256     3.3-4.0         4.37 (1.09-1.33)         -              -             201 / 62
    128->512    13.7-14.9       9.93 (0.67-0.72)         15.88 (1.07)   17.89 (1.20)  746 / 212
    256->1024   43.0-45.9       51.25 (1.12-1.19)        -              -             2915 / 597
    256->1024*  100.4           90.91 (0.91)             145.16 (1.45)  103.83 (1.03) 2929 / 674   (*load ~12)

The ``winograd`` column was a hand-written Winograd RRDBNet forward: no faster than channels-last and twice
its working memory, so it was removed.
2 threads on this shared CPU were ~3x slower than 1 for both ncnn and PyTorch (contended OpenMP threads).
torch.compile (inductor, freezing) at 64 px: ~0.84x eager, after 844 s of compiling.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

ALL_VARIANTS = ["ncnn", "eager", "channels_last", "compile", "bf16"]
# torch.compile of RRDBNet takes many minutes on a small CPU: measured only when asked for.
DEFAULT_VARIANTS = ["ncnn", "eager", "channels_last", "bf16"]


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _input(size: int):
    import numpy as np
    import skimage.data
    from PIL import Image

    img = Image.fromarray(skimage.data.astronaut()).resize((size, size), Image.BICUBIC)
    return np.asarray(img)


def _cpu_has_bf16() -> bool:
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return any(f in flags for f in ("avx512_bf16", "amx_bf16"))


def worker(variant: str, model_id: str, size: int, threads: int, repeats: int) -> dict:
    import numpy as np

    img = _input(size)
    t_load = time.perf_counter()
    if variant == "ncnn":
        import ncnn

        from realisr.registry import get_spec
        from realisr.weights.status import ncnn_files

        param, binf, _ = ncnn_files(get_spec(model_id))
        net = ncnn.Net()
        for opt in ("use_vulkan_compute", "use_fp16_storage", "use_fp16_arithmetic", "use_fp16_packed",
                    "use_bf16_storage", "use_bf16_packed"):
            if hasattr(net.opt, opt):
                setattr(net.opt, opt, False)
        net.opt.num_threads = threads
        net.load_param(str(param))
        net.load_model(str(binf))
        chw = np.ascontiguousarray(img.transpose(2, 0, 1), dtype=np.float32) / 255.0

        def run():
            ex = net.create_extractor()
            mat = ncnn.Mat(chw)  # borrows chw's memory; chw outlives it
            ex.input("data", mat)
            ret, out = ex.extract("output")
            assert ret == 0
            return np.clip(np.array(out).transpose(1, 2, 0), 0, 1)
    else:
        import realisr

        kwargs: dict = {"device": "cpu", "num_threads": threads}
        if variant == "eager":
            kwargs.update(channels_last=False)
        elif variant == "channels_last":
            kwargs.update(channels_last=True)
        elif variant == "compile":
            kwargs.update(compile=True)
        elif variant == "bf16":
            kwargs.update(dtype="bf16", channels_last=True)
        pipe = realisr.load_pipeline(model_id, **kwargs)

        def run():
            return pipe(img, tile=0).image.pixels
    load_s = time.perf_counter() - t_load
    rss_loaded = _rss_mib()
    t0 = time.perf_counter()
    out = run()
    warm_s = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = run()
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if os.environ.get("BENCH_OUT"):
        np.save(os.environ["BENCH_OUT"], np.asarray(out, dtype=np.float32))
    return {"variant": variant, "size": size, "threads": threads, "best_s": min(times), "times": times,
            "warmup_s": warm_s, "load_s": load_s, "peak_mib": peak, "infer_mib": peak - rss_loaded}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="realesrgan-x4plus")
    ap.add_argument("--sizes", default="128,256", help="input sizes (square), comma-separated")
    ap.add_argument("--threads", default=None, help="thread counts, comma-separated (default: 1 and all cores)")
    ap.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"any of {','.join(ALL_VARIANTS)}")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per configuration")
    ap.add_argument("--check", action="store_true", help="also report max |ours - ncnn| per configuration")
    ap.add_argument("--worker", nargs=4, metavar=("VARIANT", "SIZE", "THREADS", "REPEATS"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        v, s, t, r = args.worker
        print(json.dumps(worker(v, args.model, int(s), int(t), int(r))))
        return 0

    import tempfile

    import numpy as np

    ncpu = os.cpu_count() or 1
    threads = [int(t) for t in args.threads.split(",")] if args.threads else sorted({1, ncpu})
    variants = [v for v in args.variants.split(",") if v]
    if "bf16" in variants and not _cpu_has_bf16():
        print("# bf16 skipped: this CPU has neither avx512_bf16 nor AMX (bf16 would be emulated, slower)")
        variants.remove("bf16")
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        cpu = "?"
    print(f"# {args.model} on {cpu}, {ncpu} logical CPUs, load average {os.getloadavg()[0]:.1f}; "
          f"best of {args.repeats} after 1 warm-up")
    header = f"{'size':>11} {'thr':>3} {'variant':<14} {'s/img':>8} {'x ncnn':>7} {'peak MiB':>9} {'infer MiB':>9}"
    if args.check:
        header += f" {'max|d| vs ncnn':>14}"
    print(header)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in [int(s) for s in args.sizes.split(",")]:
            for th in threads:
                # the baseline runs first and again last, so load drifting on a shared machine shows up
                order = variants + (["ncnn"] if "ncnn" in variants and len(variants) > 1 else [])
                res: dict = {}
                for i, v in enumerate(order):
                    again = i > 0 and v in res
                    env = dict(os.environ, OMP_NUM_THREADS=str(th),
                               BENCH_OUT=os.path.join(tmp, f"{v}{'-again' if again else ''}.npy"))
                    cmd = [sys.executable, os.path.abspath(__file__), "--model", args.model,
                           "--worker", v, str(size), str(th), str(args.repeats)]
                    label = v + (" (again)" if again else "")
                    try:
                        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
                    except subprocess.TimeoutExpired:
                        print(f"{size:>4}->{size * 4:<5} {th:>3} {label:<14} timed out after {args.timeout}s")
                        continue
                    if p.returncode != 0:
                        err = (p.stderr.strip().splitlines() or ["?"])[-1]
                        print(f"{size:>4}->{size * 4:<5} {th:>3} {label:<14} failed: {err}")
                        continue
                    r = json.loads(p.stdout.strip().splitlines()[-1])
                    if again:
                        r["variant"] = label
                    else:
                        res[v] = r
                    base = res.get("ncnn")
                    ratio = f"{r['best_s'] / base['best_s']:.2f}" if base else "-"
                    line = (f"{size:>4}->{size * 4:<5} {th:>3} {label:<14} {r['best_s']:>8.2f} {ratio:>7} "
                            f"{r['peak_mib']:>9.0f} {r['infer_mib']:>9.0f}")
                    if args.check and base and v != "ncnn" and os.path.exists(env["BENCH_OUT"]):
                        d = np.abs(np.load(env["BENCH_OUT"]) - np.load(os.path.join(tmp, "ncnn.npy"))).max()
                        line += f" {d:>14.2e}"
                    print(line, flush=True)
                    rows.append(r)
    print(json.dumps(rows), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
