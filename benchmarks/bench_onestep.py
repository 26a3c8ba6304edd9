"""One-step diffusion SR benchmark: PiSA-SR (default, adjustable, re-dial), OSEDiff and CCSR (one-step,
two-step) against a plain reference.

Full-size SD-2.1-base-shaped models with random weights, built from configs (no download): the UNet
(865.9 M parameters), the VAE, and random prompt embeddings ``[1, 77, 1024]`` in place of the text encoder
(neither method runs the text encoder per image: PiSA-SR's prompt is fixed, OSEDiff's is encoded once).
LoRA adapters are injected with the official module lists (``realisr.models.lora``) at rank 4.

Rows (``--size 512``: a 128x128 LQ, bicubic x4, 64x64 latents; whole calls, pre/post-processing included):

* ``reference``: the straightforward path with plain diffusers modules: ``vae.encode`` -> posterior mode ->
  UNet at t=1 with the six PiSA LoRA adapters *unmerged* (peft) -> ``z - eps`` -> ``vae.decode``; fp32, and
  on CUDA also in each benchmarked half dtype (the "plain fp16 path" of the issue's targets).
* ``pisa default``: ``PiSASRPipeline`` in the default mode with the semantic LoRA fused (one plain UNet pass).
* ``pisa adjustable``: dials (0.8, 1.2): eps_pix and eps_PiSA from one batched UNet call (batch 2).
* ``re-dial``: :meth:`PiSASRPipeline.redial` from kept predictions: one VAE decode, no UNet.
* ``osediff``: ``OSEDiffPipeline`` with merged LoRA (UNet and VAE encoder) and the prompt embedding computed
  once (a stand-in text encoder returns the random embeddings); if that pipeline API is missing, the
  equivalent operations are timed directly (marked ``[direct ops]``): VAE encoder with the merged encoder
  LoRA, UNet at t=999, the x0 step, VAE decode, AdaIN colour fix.
* ``ccsr one-step`` / ``ccsr two-step``: ``CCSRPipeline`` with a random SD-2.1-base-shaped CCSR ControlNet
  (``CCSRControlNetModel.from_unet``: the UNet's encoder half plus ``condition_conv_in``), the presets as
  released: one network evaluation (UNet + ControlNet, batch 1) / two (the second with CFG, batch 2); the
  posterior-sampled condition latent, the LR-embedded start and the AdaIN colour fix included.

Seconds are the median of ``--repeats`` runs after ``--warmup`` runs. Peak memory: CUDA
``max_memory_allocated`` per row; CPU the process's peak RSS *during* the row (sampled every 2 ms) minus its
RSS before the row, so weights already loaded are not counted.

Usage::

    python benchmarks/bench_onestep.py                       # CPU, fp32, 512x512 (minutes per row on 2 cores)
    python benchmarks/bench_onestep.py --quick               # CPU smoke run: 256x256 output, 1 warm-up + 1 run
    python benchmarks/bench_onestep.py --device cuda --dtype all --channels-last --compile
    bash benchmarks/gpu_session.sh                           # on a lent GPU: CUDA tests + the GPU runs (see there)
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import threading
import time

UNET_CONFIG = dict(  # stabilityai/stable-diffusion-2-1-base unet/config.json
    sample_size=64, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1,
    act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
    use_linear_projection=True, dual_cross_attention=False, upcast_attention=False)
VAE_CONFIG = dict(  # stabilityai/stable-diffusion-2-1-base vae/config.json
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32, act_fn="silu",
    block_out_channels=(128, 256, 512, 512), down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4, sample_size=768, scaling_factor=0.18215)
SCALE = 4
ALPHA_BAR_999 = 0.0046601  # SD scaled_linear schedule, t=999 (docs/pisa-sr-osediff.md)

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


# ------------------------------------------------------------------------------------------------------------
# measurement
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


class _Peak:
    """Peak memory of one row: CUDA allocator peak, or sampled RSS growth on the CPU."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        import torch

        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = self.peak = _rss_bytes()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(0.002)

    def __exit__(self, *exc):
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, _rss_bytes())
        return False

    @property
    def gib(self) -> float:
        return self.peak / 2**30

    @property
    def extra_gib(self) -> float:
        return (self.peak - self.base) / 2**30


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(fn, device, warmup: int, repeats: int):
    """``(median seconds, peak GiB, peak GiB above the starting level, last result)``."""
    import torch

    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        _sync(device)
        times = []
        with _Peak(device) as peak:
            for _ in range(repeats):
                t0 = time.perf_counter()
                out = fn()
                _sync(device)
                times.append(time.perf_counter() - t0)
    return statistics.median(times), peak.gib, peak.extra_gib, out


# ------------------------------------------------------------------------------------------------------------
# models
def build_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**UNET_CONFIG).eval().requires_grad_(False)


def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(**VAE_CONFIG).eval().requires_grad_(False)


def _randomize_lora(model, std=1e-3):
    """peft's "gaussian" init leaves lora_B at zero; fill it so merged/unmerged paths carry real deltas."""
    import torch

    g = torch.Generator().manual_seed(0)
    for name, p in model.named_parameters():
        if ".lora_B." in name:
            p.data.copy_(torch.randn(p.shape, generator=g) * std)


def lq_image(size: int):
    """A smooth random RGB LQ image of side ``size / 4``: ``[1, 3, h, w]`` float32 in ``[0, 1]``."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    side = size // SCALE
    small = torch.rand(1, 3, max(2, side // 8), max(2, side // 8), generator=g)
    img = F.interpolate(small, size=(side, side), mode="bicubic", align_corners=False).clamp(0, 1)
    return (img * 255).round() / 255  # 8-bit values, like a decoded file


def _bicubic_x4(x01):
    import torch.nn.functional as F

    return F.interpolate(x01, scale_factor=SCALE, mode="bicubic", align_corners=False).clamp(0, 1)


def _optimize(module, channels_last: bool, compile_: bool, mode: str = "default"):
    import torch

    if channels_last:
        module.to(memory_format=torch.channels_last)
    return torch.compile(module, mode=mode) if compile_ else module


# ------------------------------------------------------------------------------------------------------------
# rows
def reference_rows(args, device, dtypes, img, embeds):
    """The plain path: diffusers modules, six PiSA adapters unmerged (peft), fp32 and the half dtypes."""
    import torch

    from realisr.models import lora

    unet, vae = build_unet(), build_vae()
    lora.inject_pisa_adapters(unet)  # pix + sem, all active, unmerged
    _randomize_lora(unet)
    x = _bicubic_x4(img)
    sf = vae.config.scaling_factor
    rows = []
    for name in ["fp32"] + [d for d in dtypes if d != "fp32"]:
        dt = getattr(torch, DTYPES[name])
        unet.to(device=device, dtype=dt)
        vae.to(device=device, dtype=dt)
        emb = embeds.to(device=device, dtype=dt)
        t = torch.tensor([1], device=device)

        def run():
            xx = (x * 2 - 1).to(device=device, dtype=dt)
            z = vae.encode(xx).latent_dist.mode() * sf
            eps = unet(z, t, encoder_hidden_states=emb).sample
            out = vae.decode((z - eps) / sf).sample.clamp(-1, 1)
            return (out.float() * 0.5 + 0.5).cpu()

        s, peak, extra, _ = measure(run, device, args.warmup, args.repeats)
        rows.append((f"reference {name}", name, s, peak, extra, "plain diffusers, LoRA unmerged (peft)"))
        print(f"  reference {name}: {s:.3f} s", file=sys.stderr, flush=True)
    return rows  # the models are freed with this frame


def pisa_rows(args, device, dtypes, img, embeds):
    import torch

    from realisr.models import lora
    from realisr.pipelines.pisa_sr.pipeline_pisa_sr import PiSASRPipeline
    from realisr.registry import get_spec

    unet, vae = build_unet(), build_vae()
    lora.inject_pisa_adapters(unet, branches=("pix",))
    _randomize_lora(unet)
    lora.merge_and_unload_adapters(unet, lora.PISA_PIX_ADAPTERS)
    lora.inject_pisa_adapters(unet, branches=("sem",))
    _randomize_lora(unet)
    spec = get_spec("pisa-sr")
    kw = dict(process_size=args.size, color_fix="adain")
    rows = []
    for name in dtypes:
        pipe = PiSASRPipeline(spec, unet=unet, vae=vae, prompt_embeds=embeds, device=device, dtype=DTYPES[name])
        opt = args.channels_last or args.compile
        tag = name + ("+cl" if args.channels_last else "") + ("+compile" if args.compile else "")
        if args.compile and args.compile_mode != "default":
            tag += f"({args.compile_mode})"

        pipe.fuse_lora()
        if opt:
            pipe.unet = _optimize(unet, args.channels_last, args.compile, args.compile_mode)
            pipe.vae.encoder = _optimize(vae.encoder, args.channels_last, args.compile, args.compile_mode)
            pipe.vae.decoder = _optimize(vae.decoder, args.channels_last, args.compile, args.compile_mode)
        s, peak, extra, _ = measure(lambda: pipe(img, default_mode=True, **kw), device, args.warmup, args.repeats)
        rows.append(("pisa default", tag, s, peak, extra, "pipeline, semantic LoRA fused, 1 UNet pass"))
        print(f"  pisa default {tag}: {s:.3f} s", file=sys.stderr, flush=True)
        if opt:  # peft hooks (per-sample adapters) and compile do not mix: back to the eager modules
            pipe.unet = unet
            pipe.vae.encoder = getattr(pipe.vae.encoder, "_orig_mod", pipe.vae.encoder)
            pipe.vae.decoder = getattr(pipe.vae.decoder, "_orig_mod", pipe.vae.decoder)

        pipe.unfuse_lora()
        s, peak, extra, _ = measure(lambda: pipe(img, lambda_pix=0.8, lambda_sem=1.2, **kw), device,
                                    args.warmup, args.repeats)
        rows.append(("pisa adjustable", name, s, peak, extra, "pipeline, dials (0.8, 1.2), batch-2 UNet call"))
        print(f"  pisa adjustable {name}: {s:.3f} s", file=sys.stderr, flush=True)

        with torch.inference_mode():
            state = pipe(img, lambda_pix=1.0, lambda_sem=1.0, keep_predictions=True, **kw).extras["redial_state"]
        s, peak, extra, _ = measure(lambda: pipe.redial(state, 0.5, 1.5), device, args.warmup, args.repeats)
        rows.append(("re-dial", name, s, peak, extra, "pipeline.redial: VAE decode only"))
        print(f"  re-dial {name}: {s:.3f} s", file=sys.stderr, flush=True)
    return rows


def _osediff_pipeline_class():
    try:
        from realisr.pipelines.osediff.pipeline_osediff import OSEDiffPipeline
    except ImportError:
        return None
    return OSEDiffPipeline


class _FixedTokenizer:
    """Stands in for the CLIP tokenizer: the benchmark feeds fixed random prompt embeddings instead."""

    model_max_length = 77

    def __call__(self, prompt, **kwargs):
        import torch

        class _Ids:
            input_ids = torch.zeros(1, 77, dtype=torch.long)
        return _Ids()


def _fixed_text_encoder(embeds):
    """A module returning ``embeds`` (in its own device/dtype) in place of OpenCLIP-H."""
    import torch

    class FixedTextEncoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embeds = torch.nn.Parameter(embeds.clone(), requires_grad=False)

        def forward(self, ids):
            return (self.embeds,)
    return FixedTextEncoder()


def _sd_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, prediction_type="epsilon", steps_offset=1)


def osediff_rows(args, device, dtypes, img, embeds):
    import inspect

    import torch

    from realisr.models import lora

    unet, vae = build_unet(), build_vae()
    lora.inject_osediff_adapters(unet, vae)
    _randomize_lora(unet)
    _randomize_lora(vae)
    lora.merge_and_unload_adapters(unet, lora.OSEDIFF_UNET_ADAPTERS)  # as the pipeline and the official timing
    lora.merge_and_unload_adapters(vae, [lora.OSEDIFF_VAE_ADAPTER])
    cls = _osediff_pipeline_class()
    params = set(inspect.signature(cls.__init__).parameters) if cls is not None else set()
    use_pipe = {"unet", "vae", "text_encoder", "tokenizer", "scheduler"} <= params
    rows = []
    if use_pipe:
        from realisr.registry import get_spec

        spec = get_spec("osediff")
        for name in dtypes:
            pipe = cls(spec, unet=unet, vae=vae, text_encoder=_fixed_text_encoder(embeds), tokenizer=_FixedTokenizer(),
                       scheduler=_sd_scheduler(), device=device, dtype=DTYPES[name])
            s, peak, extra, _ = measure(lambda: pipe(img, prompt="", process_size=args.size), device, args.warmup,
                                        args.repeats)
            rows.append(("osediff", name, s, peak, extra, "pipeline, LoRA merged (prompt embedding cached)"))
            print(f"  osediff {name}: {s:.3f} s", file=sys.stderr, flush=True)
    else:
        from realisr.color_fix import color_fix

        x = _bicubic_x4(img)
        sf = vae.config.scaling_factor
        a = ALPHA_BAR_999
        for name in dtypes:
            dt = getattr(torch, DTYPES[name])
            vdt = torch.float32 if dt == torch.float16 else dt  # as the pipelines: no fp16 VAE
            unet.to(device=device, dtype=dt)
            vae.to(device=device, dtype=vdt)
            emb = embeds.to(device=device, dtype=dt)
            t = torch.tensor([999], device=device)

            def run():
                z = vae.encode((x * 2 - 1).to(device=device, dtype=vdt)).latent_dist.mode().float() * sf
                eps = unet(z.to(dt), t, encoder_hidden_states=emb).sample.float()
                z0 = (z - (1 - a) ** 0.5 * eps) / a ** 0.5
                out = vae.decode((z0 / sf).to(vdt)).sample.clamp(-1, 1).float().cpu() * 0.5 + 0.5
                return color_fix(out, x, "adain")

            s, peak, extra, _ = measure(run, device, args.warmup, args.repeats)
            rows.append(("osediff", name, s, peak, extra, "[direct ops] OSEDiffPipeline API not found; LoRA merged"))
            print(f"  osediff {name}: {s:.3f} s", file=sys.stderr, flush=True)
    return rows


def ccsr_rows(args, device, dtypes, img, embeds):
    """CCSR-v2 through ``CCSRPipeline``: the one-step and two-step presets."""
    import torch

    from realisr.arch.ccsr_controlnet_arch import CCSRControlNetModel
    from realisr.pipelines.ccsr.pipeline_ccsr import CCSRPipeline
    from realisr.registry import get_spec

    unet, vae = build_unet(), build_vae()
    controlnet = CCSRControlNetModel.from_unet(unet).eval().requires_grad_(False)
    with torch.no_grad():  # from_unet leaves the zero convolutions at zero: give the control path real values
        g = torch.Generator().manual_seed(1)
        for name, p in controlnet.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block")):
                p.copy_(torch.randn(p.shape, generator=g) * 1e-3)
    spec = get_spec("ccsr")
    rows = []
    for name in dtypes:
        pipe = CCSRPipeline.from_components(spec, unet=unet, controlnet=controlnet, vae=vae,
                                            text_encoder=_fixed_text_encoder(embeds), tokenizer=_FixedTokenizer(),
                                            scheduler=_sd_scheduler(), device=device, dtype=DTYPES[name])
        for preset, note in (("one-step", "pipeline, 1 evaluation (UNet + ControlNet)"),
                             ("two-step", "pipeline, 2 evaluations, the 2nd with CFG (batch 2)")):
            gen = torch.Generator().manual_seed(0)
            s, peak, extra, _ = measure(lambda: pipe(img, preset=preset, process_size=args.size, generator=gen),
                                        device, args.warmup, args.repeats)
            rows.append((f"ccsr {preset}", name, s, peak, extra, note))
            print(f"  ccsr {preset} {name}: {s:.3f} s", file=sys.stderr, flush=True)
    return rows


# ------------------------------------------------------------------------------------------------------------
def print_table(rows, device, args):
    ref = {r[1]: r[2] for r in rows if r[0].startswith("reference")}
    ref32 = ref.get("fp32")
    default = {r[1].split("+")[0]: r[2] for r in rows if r[0] == "pisa default"}
    print(f"\nbench_onestep: {args.size}x{args.size} output ({args.size // SCALE}px LQ x{SCALE}, latent "
          f"{args.size // 8}x{args.size // 8}), device {device}, median of {args.repeats} after {args.warmup} warm-up")
    head = (f"{'row':<17} {'dtype':<18} {'seconds':>9} {'peak GiB':>9} {'+GiB':>7} {'x ref32':>8} "
            f"{'x ref/dt':>8}  note")
    print(head)
    print("-" * len(head))
    for name, dt, s, peak, extra, note in rows:
        base = dt.split("+")[0]
        r32 = f"{ref32 / s:.2f}" if ref32 else "-"
        rdt = f"{ref[base] / s:.2f}" if base in ref else "-"
        print(f"{name:<17} {dt:<18} {s:>9.3f} {peak:>9.2f} {extra:>7.2f} {r32:>8} {rdt:>8}  {note}")
    print("\nx ref32 / x ref/dt: speed-up over the reference path in fp32 / in the same dtype (>1 is faster).")
    for name, dt, s, *_ in rows:
        if name == "pisa adjustable" and dt in default:
            print(f"adjustable / default ({dt}): {s / default[dt]:.2f}x the default mode's time")
    if device.type == "cpu":
        print("CPU peak = process peak RSS during the row; +GiB = growth over the RSS before the row.")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="fp32 | fp16 | bf16 | all (default: fp32 on CPU, all on CUDA)")
    p.add_argument("--size", type=int, default=512, help="output side in pixels (multiple of 32)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per row (default 3; --quick 1)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs per row (default 1)")
    p.add_argument("--quick", action="store_true", help="256x256 output, 1 timed run (CPU smoke test)")
    p.add_argument("--channels-last", action="store_true", help="channels_last UNet/decoder for pisa default")
    p.add_argument("--compile", action="store_true", help="torch.compile UNet/VAE for pisa default")
    p.add_argument("--compile-mode", default="default",
                   choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
                   help="torch.compile mode (reduce-overhead: CUDA graphs, no per-kernel launch cost)")
    p.add_argument("--rows", default="reference,pisa,osediff,ccsr",
                   help="comma list of reference,pisa,osediff,ccsr")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args(argv)
    if args.quick:
        args.size = 256 if args.size == 512 else args.size
    args.repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    args.warmup = args.warmup if args.warmup is not None else 1  # cold first calls skew the first row
    if args.size % 32:
        p.error("--size must be a multiple of 32")

    import torch
    from diffusers.utils import logging as dlogging

    dlogging.set_verbosity_error()  # random-weight models: no "cast with to()" chatter
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
    which = {w.strip() for w in args.rows.split(",")}
    rows = []
    t0 = time.perf_counter()
    if "reference" in which:
        rows += reference_rows(args, device, dtypes, img, embeds)
    if "pisa" in which:
        rows += pisa_rows(args, device, dtypes, img, embeds)
    if "osediff" in which:
        rows += osediff_rows(args, device, dtypes, img, embeds)
    if "ccsr" in which:
        rows += ccsr_rows(args, device, dtypes, img, embeds)
    print_table(rows, device, args)
    print(f"total wall time {time.perf_counter() - t0:.0f} s; torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads")


if __name__ == "__main__":
    main()
