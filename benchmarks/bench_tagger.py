"""The tagger's own time: RAM / DAPE (Swin-L 384 + Query2Label head, 4585 tags) per image, stated apart from the
diffusion methods that use it (OSEDiff's prompt, SeeSR's prompt and soft prompt). Published OSEDiff / SeeSR
timings disagree by up to 3x partly because some include this step and some do not.

The network is built from the official configs shipped with realisr with random weights (no download): the
cost is the same as the released checkpoint's. DAPE's LoRA is merged as in the official eval-mode model, so
``dape`` and ``ram`` cost the same; ``dape-unmerged`` keeps the LoRA separate (training / ``merge_lora=False``).

Rows: one call of :class:`realisr.tagging.Tagger` on a ``--size`` x ``--size`` RGB image (512: OSEDiff's
processed LQ; SeeSR tags the raw LR), i.e. the official preprocessing (bilinear resize to 384, ImageNet
normalisation), the forward pass and the thresholding; batch 1 and ``--batch``. Seconds are the median of
``--repeats`` runs after ``--warmup``; peak memory is CUDA's ``max_memory_allocated`` (not measured on the CPU).

Usage::

    python benchmarks/bench_tagger.py                         # CPU fp32
    python benchmarks/bench_tagger.py --quick                 # CPU smoke run (1 warm-up, 1 run, batch 1 only)
    python benchmarks/bench_tagger.py --device cuda --dtype all
"""

from __future__ import annotations

import argparse
import statistics
import time

NUM_TAGS = 4585  # the released RAM tag list


def build_tagger(kind: str, device, dtype):
    """A Swin-L RAM / DAPE tagger with random weights (official shapes)."""
    import torch

    from realisr.tagging.loading import _PACKAGED, DAPE_LORA_RANK, TaggerFiles, build_ram, read_configs
    from realisr.tagging.tagger import Tagger

    files = TaggerFiles(kind="ram", ram=None, tag_list=None, q2l_config=_PACKAGED / "q2l_config.json",
                        swin_config=_PACKAGED / "swin" / "config_swinL_384.json")
    swin, q2l = read_configs(files)
    torch.manual_seed(0)
    model = build_ram(swin, q2l, NUM_TAGS, lora_rank=0 if kind == "ram" else DAPE_LORA_RANK)
    with torch.no_grad():
        model.label_embed.normal_()
        for m in model.lora_layers():
            m.lora_B.normal_(0, 0.01)
    if kind == "dape":
        model.merge_lora()
    names = [f"tag{i}" for i in range(NUM_TAGS)]
    return Tagger(model, names, 0.68, kind="dape" if kind != "ram" else "ram", device=device, dtype=dtype)


def _time(fn, device, warmup: int, repeats: int) -> tuple[float, float]:
    import torch

    cuda = device.type == "cuda"
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2 ** 20 if cuda else float("nan")
    return statistics.median(times), peak


def main(argv=None) -> int:
    import numpy as np
    import torch

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", help="fp32, fp16, bf16 or all (all: fp32 + the half dtypes on CUDA)")
    p.add_argument("--kinds", default="dape,ram,dape-unmerged")
    p.add_argument("--size", type=int, default=512, help="input image side (default 512)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="1 warm-up, 1 run, batch 1 only, dape only")
    args = p.parse_args(argv)
    if args.quick:
        args.warmup, args.repeats, args.batch, args.kinds = 1, 1, 1, "dape"
    device = torch.device(args.device)
    names = ["fp32", "fp16", "bf16"] if args.dtype == "all" else [args.dtype]
    if device.type != "cuda":
        names = [n for n in names if n == "fp32"] or ["fp32"]
    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    rng = np.random.default_rng(0)
    image = (rng.random((args.size, args.size, 3)) * 255).astype(np.uint8)
    batches = sorted({1, args.batch})
    print(f"# tagger benchmark: Swin-L 384 RAM, {NUM_TAGS} tags, {args.size}x{args.size} input, device {device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    print(f"{'model':<15} {'dtype':<5} {'batch':>5} {'s/call':>9} {'ms/image':>9} {'images/s':>9} {'peak MiB':>9}")
    for kind in args.kinds.split(","):
        for dn in names:
            tagger = build_tagger(kind, device, dtypes[dn])
            for b in batches:
                x = torch.from_numpy(image).permute(2, 0, 1).float().div(255)[None].expand(b, -1, -1, -1)
                secs, peak = _time(lambda: tagger(x), device, args.warmup, args.repeats)
                print(f"{kind:<15} {dn:<5} {b:>5} {secs:>9.4f} {1000 * secs / b:>9.2f} {b / secs:>9.2f} "
                      f"{peak:>9.0f}", flush=True)
            tagger = None  # free the weights before the next model
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
