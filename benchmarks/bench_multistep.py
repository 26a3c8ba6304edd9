"""Multi-step diffusion SR benchmark: SeeSR (50 DDPM steps with CFG) and its SD-turbo variant, with the
tagger's time stated separately.

Published SeeSR timings disagree by about 3x, partly because some include the DAPE tagger (RAM Swin-L) and
some do not; this script reports both: the tagger alone, the pipeline with the tags and soft prompt given
(``tagger excluded``), and the whole call with the tagger run inside (``tagger included``).

Full-size models with random weights, built from configs (no download): SD-2-base's UNet (865.9 M
parameters) with SeeSR's image attentions, the SeeSR ControlNet (``from_unet``), the SD VAE, and RAM Swin-L with
the 4585-class tagging head (``realisr.tagging``); random prompt embeddings ``[1, 77, 1024]`` stand in for the
text encoder (encoded once per prompt in the pipeline anyway).

Rows (``--size 512``: a 128x128 LQ, latents 64x64; whole calls, pre/post-processing included):

* ``tagger dape``: RAM + DAPE on the LQ (384x384 input), per image.
* ``seesr`` (tagger excluded): the pipeline with ``tags=`` and ``image_embeds=`` given; ``--steps`` steps,
  CFG 5.5 (batch 2 per step); also the seconds per step.
* ``seesr`` (tagger included): the same call with the pipeline's tagger.
* ``seesr-turbo``: 2 steps, no CFG (batch 1), tagger excluded.

Seconds are the median of ``--repeats`` runs after ``--warmup`` runs; peak memory as in ``bench_onestep.py``.

Usage::

    python benchmarks/bench_multistep.py --quick            # CPU smoke run: 256x256, 2 steps
    python benchmarks/bench_multistep.py --device cuda --dtype all   # 512x512, 50 steps, fp32/fp16/bf16
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_onestep import (DTYPES, SCALE, UNET_CONFIG, VAE_CONFIG, _fixed_text_encoder, _FixedTokenizer,  # noqa: E402
                           _sd_scheduler, lq_image, measure)


def build_seesr():
    """SD-2-base-shaped SeeSR UNet and ControlNet with random weights."""
    from realisr.arch.seesr_arch import SeeSRControlNetModel, SeeSRUNet2DConditionModel

    unet = SeeSRUNet2DConditionModel(**UNET_CONFIG).eval().requires_grad_(False)
    controlnet = SeeSRControlNetModel.from_unet(unet).eval().requires_grad_(False)
    return unet, controlnet


def build_tagger(device, dtype):
    """RAM Swin-L with the 4585-class head and random weights, as a DAPE :class:`~realisr.tagging.Tagger`."""
    import json

    from realisr.tagging import Tagger, loading

    cfg = Path(loading.__file__).with_name("configs")
    swin = json.loads((cfg / "swin" / "config_swinL_384.json").read_text())
    q2l = json.loads((cfg / "q2l_config.json").read_text())
    model = loading.build_ram(swin, q2l, 4585)
    return Tagger(model, [f"tag{i}" for i in range(4585)], 0.68, kind="dape", device=device, dtype=dtype)


def seesr_rows(args, device, dtypes, img, embeds):
    import torch
    from diffusers import AutoencoderKL

    from realisr.pipelines.seesr.pipeline_seesr import SeeSRPipeline
    from realisr.registry import get_spec

    unet, controlnet = build_seesr()
    vae = AutoencoderKL(**VAE_CONFIG).eval().requires_grad_(False)
    n_unet = sum(p.numel() for p in unet.parameters()) / 1e6
    n_cn = sum(p.numel() for p in controlnet.parameters()) / 1e6
    print(f"  SeeSR UNet {n_unet:.1f} M, ControlNet {n_cn:.1f} M parameters", file=sys.stderr, flush=True)
    rows = []
    for name in dtypes:
        dt = getattr(torch, DTYPES[name])
        tagger = build_tagger(device, torch.float32 if name == "fp32" else dt)
        soft = torch.randn(1, 145, 512)
        s, peak, extra, _ = measure(lambda: tagger(img), device, args.warmup, args.repeats)
        rows.append(("tagger dape", name, s, peak, extra, "RAM Swin-L + DAPE, 384x384 input, per image"))
        print(f"  tagger {name}: {s:.3f} s", file=sys.stderr, flush=True)
        for model_id, steps in (("seesr", args.steps), ("seesr-turbo", 2)):
            spec = get_spec(model_id)
            pipe = SeeSRPipeline(spec, unet=unet, controlnet=controlnet, vae=vae,
                                 text_encoder=_fixed_text_encoder(embeds), tokenizer=_FixedTokenizer(),
                                 scheduler=_sd_scheduler(), tagger=tagger, device=device, dtype=DTYPES[name])
            kw = dict(process_size=args.size, steps=steps, generator=torch.Generator().manual_seed(0))
            g = spec.options["guidance_scale"]
            s, peak, extra, _ = measure(lambda: pipe(img, tags="a, b", image_embeds=soft, **kw), device,
                                        args.warmup, args.repeats)
            rows.append((model_id, name, s, peak, extra,
                         f"tagger excluded; {steps} steps, CFG {g:g}: {s / steps:.3f} s/step"))
            print(f"  {model_id} {name}: {s:.3f} s", file=sys.stderr, flush=True)
            if model_id == "seesr":
                s, peak, extra, _ = measure(lambda: pipe(img, **kw), device, args.warmup, args.repeats)
                rows.append((model_id, name, s, peak, extra, f"tagger included; {steps} steps, CFG {g:g}"))
                print(f"  {model_id}+tagger {name}: {s:.3f} s", file=sys.stderr, flush=True)
    return rows


def print_table(rows, device, args):
    print(f"\nbench_multistep: {args.size}x{args.size} output ({args.size // SCALE}px LQ x{SCALE}, latent "
          f"{args.size // 8}x{args.size // 8}), device {device}, median of {args.repeats} after {args.warmup} warm-up")
    head = f"{'row':<13} {'dtype':<6} {'seconds':>9} {'peak GiB':>9} {'+GiB':>7}  note"
    print(head)
    print("-" * len(head))
    for name, dt, s, peak, extra, note in rows:
        print(f"{name:<13} {dt:<6} {s:>9.3f} {peak:>9.2f} {extra:>7.2f}  {note}")
    if device.type == "cpu":
        print("CPU peak = process peak RSS during the row; +GiB = growth over the RSS before the row.")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="fp32 | fp16 | bf16 | all (default: fp32 on CPU, all on CUDA)")
    p.add_argument("--size", type=int, default=512, help="output side in pixels (multiple of 32)")
    p.add_argument("--steps", type=int, default=None, help="SeeSR steps (default 50; --quick 2)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per row (default 3; --quick 1)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs per row (default 1)")
    p.add_argument("--quick", action="store_true", help="256x256 output, 2 steps, 1 timed run (CPU smoke test)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args(argv)
    if args.quick:
        args.size = 256 if args.size == 512 else args.size
    args.steps = args.steps if args.steps is not None else (2 if args.quick else 50)
    args.repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    args.warmup = args.warmup if args.warmup is not None else 1
    if args.size % 32:
        p.error("--size must be a multiple of 32")

    import torch
    from diffusers.utils import logging as dlogging

    dlogging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.dtype is None:
        dtypes = ["fp32", "fp16", "bf16"] if device.type == "cuda" else ["fp32"]
    elif args.dtype == "all":
        dtypes = ["fp32", "fp16", "bf16"]
    elif args.dtype in DTYPES:
        dtypes = [args.dtype]
    else:
        p.error(f"--dtype must be one of {', '.join(DTYPES)} or all")
    torch.manual_seed(0)
    img = lq_image(args.size)
    embeds = torch.randn(1, 77, 1024)
    t0 = time.perf_counter()
    rows = seesr_rows(args, device, dtypes, img, embeds)
    print_table(rows, device, args)
    print(f"total wall time {time.perf_counter() - t0:.0f} s; torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads")


if __name__ == "__main__":
    main()
