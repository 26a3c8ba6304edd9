"""Speed, memory and numerics of every pipeline on one GPU, in one run (issue 14).

Full-size SD-2.1-base-shaped models with random weights (built from configs on the device: no download, no
slow CPU init), the pipelines users call, at ``--size`` (512) output pixels. Sections, each printed as soon as
it is measured (a run stopped by a timeout keeps what it printed; ``--json`` gets every row):

* ``speed``: ms per image at batch 1, fp16 and bf16, with the time of each stage (pre-processing, VAE encode,
  UNet, VAE decode, post-processing; CUDA events around the pipeline's own stage methods) and peak memory:
  a plain diffusers path (LoRA merged, host pre/post: the official recipe), PiSA-SR default (semantic LoRA
  fused), adjustable (0.8, 1.2), re-dial, OSEDiff (merged LoRA, cached prompt embedding), and through
  :data:`EXTRA_METHODS` CCSR-v2 one-step / two-step and SeeSR-turbo (2 steps; tags and soft prompt given).
* ``nan``: every method in fp16 and bf16 (and fp16 with an fp16 VAE, which can overflow) on a real photo, a
  flat grey image and a saturated one: NaN/Inf in the output?
* ``toggles``: PiSA-SR default with each speed technique off in turn (each step's gain): the LoRA fused vs
  peft's unmerged adapters, pre/post on the device vs Pillow on the host, channels_last, SDPA vs classic
  attention, bf16 vs fp16 (fp32 VAE); OSEDiff with the prompt embedding cached vs the text encoder (full-size
  OpenCLIP-H shape) run per image.
* ``compile`` (not in the default list: it compiles for minutes): PiSA-SR default eager vs channels_last +
  torch.compile (``--compile-mode reduce-overhead``: CUDA graphs), the compile time printed.
* ``batch``: images per second at batch sizes 1, 4, 16 (a list of images in one call) for PiSA-SR default and
  adjustable, OSEDiff, the :data:`EXTRA_METHODS` (CCSR and SeeSR take a list one image at a time) and the GAN
  models (random RRDBNet x4 = realesrgan-x4plus, SRVGG compact = realesr-animevideov3-x4).
* ``memory``: peak GPU memory and time of a 4096x4096 output (1024x1024 input; latent and VAE tiling), with
  only PiSA-SR's models resident.

The closing summary checks the issue's targets: default <= 15 ms, adjustable <= 1.3x default, re-dial <= one
VAE decode, 4096x4096 in <= 12 GB, and the batch throughput.

Usage::

    python benchmarks/bench_speed.py --device cuda                      # every section, fp16 + bf16
    python benchmarks/bench_speed.py --device cuda --dtype bf16 --sections compile --compile-mode reduce-overhead
    python benchmarks/bench_speed.py --device cpu --model-size tiny --quick   # smoke test of the script
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_onestep as bo  # noqa: E402  (model configs, memory probe, stand-in text encoder)

SECTIONS = ("speed", "nan", "toggles", "batch", "memory", "compile")
STAGES = ("preprocess", "encode", "predict", "decode", "finish")
TINY_UNET = dict(bo.UNET_CONFIG, block_out_channels=(16, 32, 48, 48), norm_num_groups=8, cross_attention_dim=32,
                 attention_head_dim=(2, 4, 6, 6))
TINY_VAE = dict(bo.VAE_CONFIG, block_out_channels=(16, 24, 32, 32), norm_num_groups=8)
CLIP_TEXT = dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                 num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu", projection_dim=512)
TINY_CLIP = dict(CLIP_TEXT, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 projection_dim=32)

#: More methods: ``name -> builder(ctx, dtype_name)`` returning ``(pipeline, call_kwargs)``; each appears in the
#: speed, nan and batch sections like the built-in methods. CCSR (one-step, two-step) and SeeSR-turbo are
#: registered below (:func:`build_ccsr`, :func:`build_seesr_turbo`); SeeSR's 50 steps with CFG and the tagger
#: are measured by ``bench_multistep.py``.
EXTRA_METHODS: dict = {}

ROWS: list = []  # every measured row, for --json


# ------------------------------------------------------------------------------------------------------------
# measuring
def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StageTimer:
    """Times a pipeline's stage methods inside its real call (CUDA events on a GPU, the host clock elsewhere)."""

    def __init__(self, pipe, device):
        self.pipe, self.device, self.events = pipe, device, []

    def _wrap(self, name, fn):
        import torch

        def timed(*a, **k):
            if self.device.type == "cuda":
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                out = fn(*a, **k)
                e.record()
            else:
                s = time.perf_counter()
                out = fn(*a, **k)
                e = time.perf_counter()
            self.events.append((name, s, e))
            return out
        return timed

    def __enter__(self):
        for name in STAGES:
            if hasattr(self.pipe, name):
                setattr(self.pipe, name, self._wrap(name, getattr(self.pipe, name)))
        return self

    def __exit__(self, *exc):
        for name in STAGES:
            self.pipe.__dict__.pop(name, None)

    def take(self) -> dict:
        """Seconds per stage since the last take (the device synchronised by the caller)."""
        out: dict = {}
        for name, s, e in self.events:
            sec = s.elapsed_time(e) / 1e3 if self.device.type == "cuda" else e - s
            out[name] = out.get(name, 0.0) + sec
        self.events = []
        return out


def measure(fn, ctx, *, pipe=None, repeats=None, warmup=None) -> dict:
    """Median seconds of ``fn()`` (and of each stage of ``pipe``), peak memory, last result."""
    import torch

    repeats = repeats or ctx.args.repeats
    warmup = ctx.args.warmup if warmup is None else warmup
    timer = StageTimer(pipe, ctx.device) if pipe is not None else None
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        _sync(ctx.device)
        times, stages = [], []
        with bo._Peak(ctx.device) as peak:
            if timer is not None:
                timer.__enter__()
            try:
                for _ in range(repeats):
                    if timer is not None:
                        timer.take()
                    t0 = time.perf_counter()
                    out = fn()
                    _sync(ctx.device)
                    times.append(time.perf_counter() - t0)
                    if timer is not None:
                        stages.append(timer.take())
            finally:
                if timer is not None:
                    timer.__exit__()
    st = {k: statistics.median(s.get(k, 0.0) for s in stages) for k in STAGES} if stages else {}
    return {"s": statistics.median(times), "peak_gib": peak.gib, "stages": st, "out": out}


def _row(section: str, **kw) -> dict:
    kw = {"section": section, **{k: v for k, v in kw.items() if k != "out"}}
    ROWS.append(kw)
    return kw


def _ms(s) -> str:
    return f"{'-':>8}" if s is None else f"{s * 1e3:8.1f}"


# ------------------------------------------------------------------------------------------------------------
# models (random weights, built on the device)
class Ctx:
    def __init__(self, args):
        import torch

        self.args = args
        self.device = torch.device(args.device)
        self.tiny = args.model_size == "tiny"
        self._pisa = self._ose = self._clip = self._ccsr = self._seesr = None
        self.embeds = torch.randn(1, 77, 32 if self.tiny else 1024, generator=torch.Generator().manual_seed(0))

    @contextmanager
    def on_device(self):
        import torch

        with torch.device(self.device):
            yield

    def unet(self):
        from diffusers import UNet2DConditionModel

        return UNet2DConditionModel(**(TINY_UNET if self.tiny else bo.UNET_CONFIG)).eval().requires_grad_(False)

    def vae(self):
        from diffusers import AutoencoderKL

        return AutoencoderKL(**(TINY_VAE if self.tiny else bo.VAE_CONFIG)).eval().requires_grad_(False)

    def pisa_modules(self):
        if self._pisa is None:
            import torch

            from realisr.models import lora

            torch.manual_seed(0)
            with self.on_device():
                unet, vae = self.unet(), self.vae()
                lora.inject_pisa_adapters(unet, branches=("pix",))
                _randomize_lora(unet)
                lora.merge_and_unload_adapters(unet, lora.PISA_PIX_ADAPTERS)
                lora.inject_pisa_adapters(unet, branches=("sem",))
                _randomize_lora(unet)
            self._pisa = (unet, vae)
        return self._pisa

    def osediff_modules(self):
        if self._ose is None:
            import torch

            from realisr.models import lora

            torch.manual_seed(1)
            with self.on_device():
                unet, vae = self.unet(), self.vae()
                lora.inject_osediff_adapters(unet, vae)
                _randomize_lora(unet)
                _randomize_lora(vae)
                lora.merge_and_unload_adapters(unet, lora.OSEDIFF_UNET_ADAPTERS)
                lora.merge_and_unload_adapters(vae, [lora.OSEDIFF_VAE_ADAPTER])
            self._ose = (unet, vae)
        return self._ose

    def clip_text(self):
        if self._clip is None:
            from transformers import CLIPTextConfig, CLIPTextModel

            with self.on_device():
                self._clip = CLIPTextModel(CLIPTextConfig(**(TINY_CLIP if self.tiny else CLIP_TEXT))).eval()
            self._clip.requires_grad_(False)
        return self._clip


def _randomize_lora(model, std=1e-3):
    """peft leaves ``lora_B`` at zero; fill it (on the model's device) so the adapters carry real deltas."""
    for name, p in model.named_parameters():
        if ".lora_B." in name:
            p.data.normal_(0.0, std)


def build_pisa(ctx, dtype: str):
    from realisr.pipelines.pisa_sr.pipeline_pisa_sr import PiSASRPipeline
    from realisr.registry import get_spec

    unet, vae = ctx.pisa_modules()
    from realisr.models import lora

    for _n, layer in lora.lora_layers(unet):  # the modules are shared: undo what an earlier pipeline fused
        if layer.merged:
            layer.unmerge()
    return PiSASRPipeline(get_spec("pisa-sr"), unet=unet, vae=vae, prompt_embeds=ctx.embeds, device=ctx.device,
                          dtype=bo.DTYPES[dtype])


def build_osediff(ctx, dtype: str, text_encoder: str = "fixed"):
    from realisr.pipelines.osediff.pipeline_osediff import OSEDiffPipeline
    from realisr.registry import get_spec

    unet, vae = ctx.osediff_modules()
    te = bo._fixed_text_encoder(ctx.embeds) if text_encoder == "fixed" else ctx.clip_text()
    return OSEDiffPipeline(get_spec("osediff"), unet=unet, vae=vae, text_encoder=te, tokenizer=bo._FixedTokenizer(),
                           scheduler=bo._sd_scheduler(), device=ctx.device, dtype=bo.DTYPES[dtype])


def build_gan(ctx, which: str, dtype: str):
    """A random-weight spandrel model with realesrgan-x4plus's (RRDBNet) or animevideov3's (SRVGG) shape."""
    import spandrel
    import torch

    from realisr.pipelines.gan.pipeline_gan import GANPipeline
    from realisr.registry import get_spec

    torch.manual_seed(2)
    if which == "rrdb":
        from spandrel.architectures.ESRGAN import ESRGAN

        net = ESRGAN(num_blocks=2 if ctx.tiny else 23, num_filters=16 if ctx.tiny else 64, scale=4)
        spec = get_spec("realesrgan-x4plus")
    else:
        from spandrel.architectures.Compact import Compact

        net = Compact(num_feat=16 if ctx.tiny else 64, num_conv=4 if ctx.tiny else 16, upscale=4)
        spec = get_spec("realesr-animevideov3-x4")
    desc = spandrel.ModelLoader().load_from_state_dict(net.state_dict())
    return GANPipeline(spec, device=ctx.device, dtype=bo.DTYPES[dtype], descriptor=desc)


def _ccsr_modules(ctx):
    """A random SD-2.1-base-shaped UNet, CCSR ControlNet (``from_unet``, its zero convolutions filled) and VAE."""
    if ctx._ccsr is None:
        import torch

        from realisr.arch.ccsr_controlnet_arch import CCSRControlNetModel

        torch.manual_seed(3)
        with ctx.on_device():
            unet, vae = ctx.unet(), ctx.vae()
            controlnet = CCSRControlNetModel.from_unet(unet).eval().requires_grad_(False)
            for name, p in controlnet.named_parameters():  # zero at init: give the control path real values
                if name.startswith(("controlnet_down_blocks", "controlnet_mid_block")):
                    p.data.normal_(0.0, 1e-3)
        ctx._ccsr = (unet, controlnet, vae)
    return ctx._ccsr


def build_ccsr(ctx, dtype: str, preset: str = "one-step"):
    """CCSR-v2 (``CCSRPipeline``) with random weights, at a preset (one-step: 1 evaluation; two-step: 2, the
    second with CFG)."""
    from realisr.pipelines.ccsr.pipeline_ccsr import CCSRPipeline
    from realisr.registry import get_spec

    unet, controlnet, vae = _ccsr_modules(ctx)
    pipe = CCSRPipeline.from_components(get_spec("ccsr"), unet=unet, controlnet=controlnet, vae=vae,
                                        text_encoder=bo._fixed_text_encoder(ctx.embeds), tokenizer=bo._FixedTokenizer(),
                                        scheduler=bo._sd_scheduler(), device=ctx.device, dtype=bo.DTYPES[dtype])
    return pipe, {"process_size": ctx.args.size, "preset": preset}


def build_seesr_turbo(ctx, dtype: str):
    """SeeSR on the SD-turbo UNet shape (2 steps, no CFG) with random weights; tags and soft prompt given (the
    tagger is timed by ``bench_multistep.py`` / ``bench_tagger.py``)."""
    import torch

    from realisr.pipelines.seesr.pipeline_seesr import SeeSRPipeline
    from realisr.registry import get_spec

    if ctx._seesr is None:
        from realisr.arch.seesr_arch import SeeSRControlNetModel, SeeSRUNet2DConditionModel

        torch.manual_seed(4)
        with ctx.on_device():
            unet = SeeSRUNet2DConditionModel(**(TINY_UNET if ctx.tiny else bo.UNET_CONFIG)).eval()
            controlnet = SeeSRControlNetModel.from_unet(unet).eval()
            vae = ctx.vae()
        for m in (unet, controlnet):
            m.requires_grad_(False)
        ctx._seesr = (unet, controlnet, vae, torch.randn(1, 145, 512, generator=torch.Generator().manual_seed(5)))
    unet, controlnet, vae, soft = ctx._seesr
    pipe = SeeSRPipeline(get_spec("seesr-turbo"), unet=unet, controlnet=controlnet, vae=vae,
                         text_encoder=bo._fixed_text_encoder(ctx.embeds), tokenizer=bo._FixedTokenizer(),
                         scheduler=bo._sd_scheduler(), tagger=False, device=ctx.device, dtype=bo.DTYPES[dtype])
    return pipe, {"process_size": ctx.args.size, "tags": "a, b", "image_embeds": soft}


EXTRA_METHODS["ccsr one-step"] = build_ccsr
EXTRA_METHODS["ccsr two-step"] = lambda ctx, dtype: build_ccsr(ctx, dtype, "two-step")
EXTRA_METHODS["seesr-turbo"] = build_seesr_turbo


# ------------------------------------------------------------------------------------------------------------
# inputs
def inputs(ctx) -> dict:
    """LQ images (uint8 arrays, side = size / 4): a real photo, a flat grey image, a saturated one."""
    import numpy as np
    from PIL import Image

    side = ctx.args.size // bo.SCALE
    try:
        import skimage.data

        photo = Image.fromarray(skimage.data.astronaut()).resize((side, side), Image.BICUBIC)
        photo = np.asarray(photo)
    except ImportError:
        photo = (bo.lq_image(ctx.args.size)[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    flat = np.full((side, side, 3), 128, np.uint8)
    sat = np.zeros((side, side, 3), np.uint8)
    q = max(1, side // 4)
    for i, c in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)]):
        sat[:, i * q:(i + 1) * q] = c  # pure primaries and white; the rest black
    return {"photo": photo, "flat": flat, "saturated": sat}


def methods(ctx, dtype: str) -> dict:
    """name -> (pipeline, call kwargs) of the diffusion methods (built for ``dtype``)."""
    kw = {"process_size": ctx.args.size}
    pisa = build_pisa(ctx, dtype)
    out = {"pisa default": (pisa, dict(kw, default_mode=True)),
           "pisa adjustable": (pisa, dict(kw, lambda_pix=0.8, lambda_sem=1.2)),
           "osediff": (build_osediff(ctx, dtype), dict(kw, prompt=""))}
    for name, builder in EXTRA_METHODS.items():
        out[name] = builder(ctx, dtype)
    return out


def _call(pipe, kw, images):
    if kw.get("default_mode"):
        pipe.fuse_lora()
    elif hasattr(pipe, "unfuse_lora"):
        pipe.unfuse_lora()
    return pipe(images, **kw)


# ------------------------------------------------------------------------------------------------------------
# sections
def section_speed(ctx, dtypes):
    import torch

    img = inputs(ctx)["photo"]
    clock = "CUDA events" if ctx.device.type == "cuda" else "the host clock"
    print(f"\n## speed: ms per image at batch 1, {ctx.args.size}x{ctx.args.size} output "
          f"(median of {ctx.args.repeats}; stages timed by {clock} inside the call)", flush=True)
    head = (f"{'row':<18} {'dtype':<6} {'total':>8} {'pre':>8} {'encode':>8} {'unet':>8} {'decode':>8} "
            f"{'post':>8} {'peak GiB':>9}")
    print(head)
    print("-" * len(head))
    for dt in dtypes:
        ms = methods(ctx, dt)
        pisa, kw = ms["pisa default"]
        # the plain path: diffusers modules, LoRA merged, host pre/post (what the official recipe times)
        pisa.fuse_lora()
        x = bo._bicubic_x4(torch.from_numpy(img.copy()).permute(2, 0, 1)[None].float() / 255)
        t = torch.tensor([1], device=ctx.device)
        emb = ctx.embeds.to(ctx.device, pisa.dtype)

        def plain():
            z = pisa.vae.encode((x * 2 - 1).to(ctx.device, pisa.vae_dtype)).latent_dist.mode() * 0.18215
            eps = pisa.unet(z.to(pisa.dtype), t, encoder_hidden_states=emb).sample
            out = pisa.vae.decode(((z - eps) / 0.18215).to(pisa.vae_dtype)).sample.clamp(-1, 1)
            return (out.float() * 0.5 + 0.5).cpu()

        r = measure(plain, ctx)
        _print_speed(_row("speed", row="plain diffusers", dtype=dt, **r))
        for name, (pipe, kw) in ms.items():
            r = measure(lambda: _call(pipe, kw, img), ctx, pipe=pipe)
            _print_speed(_row("speed", row=name, dtype=dt, **r))
            if name == "pisa adjustable":
                st = _call(pipe, dict(kw, keep_predictions=True), img).extras["redial_state"]
                r = measure(lambda: pipe.redial(st, 0.5, 1.5), ctx, pipe=pipe)
                _print_speed(_row("speed", row="re-dial", dtype=dt, **r))
        del ms
        _free(ctx)


def _print_speed(r):
    st = r.get("stages") or {}
    print(f"{r['row']:<18} {r['dtype']:<6} {_ms(r['s'])} {_ms(st.get('preprocess'))} {_ms(st.get('encode'))} "
          f"{_ms(st.get('predict'))} {_ms(st.get('decode'))} {_ms(st.get('finish'))} {r['peak_gib']:>9.2f}",
          flush=True)


def section_nan(ctx, dtypes):
    import numpy as np
    import torch

    from realisr.errors import RealisrError

    print("\n## nan: NaN / Inf in the outputs (random weights; fp16 keeps the VAE in fp32 unless 'fp16 VAE')",
          flush=True)
    head = f"{'method':<18} {'dtype':<12} {'photo':>16} {'flat':>16} {'saturated':>16}"
    print(head)
    print("-" * len(head))
    imgs = inputs(ctx)
    for dt in dtypes:
        variants = list(methods(ctx, dt).items())
        variants += [(f"gan {w}", (build_gan(ctx, w, dt), {"tile": 0})) for w in ("rrdb", "compact")]
        if dt == "fp16":
            pipe, kw = build_pisa(ctx, dt), {"process_size": ctx.args.size, "default_mode": True}
            variants.append(("pisa default", (pipe, dict(kw, _fp16_vae=True))))
        for name, (pipe, kw) in variants:
            kw = dict(kw)
            fp16_vae = kw.pop("_fp16_vae", False)
            if fp16_vae:
                pipe.vae.to(dtype=torch.float16)
                pipe.vae_dtype = torch.float16
            cells = {}
            for key, img in imgs.items():
                try:
                    with torch.inference_mode():
                        out = _call(pipe, kw, img).pixels
                    cells[key] = "ok" if np.isfinite(out).all() else "NaN/Inf"
                    cells[key] += f" [{out.min():.2f},{out.max():.2f}]"
                except RealisrError as e:  # the decoder's own NaN check
                    cells[key] = "NaN (raised)" if "NaN" in str(e) else f"error: {e}"[:16]
            label = dt + (" fp16 VAE" if fp16_vae else "")
            _row("nan", method=name, dtype=label, **cells)
            print(f"{name:<18} {label:<12} {cells['photo']:>16} {cells['flat']:>16} {cells['saturated']:>16}",
                  flush=True)
            if fp16_vae:
                pipe.vae.to(dtype=torch.float32)
                pipe.vae_dtype = torch.float32
        _free(ctx)


def _variant_table(ctx, section: str, dt: str, title: str, base_name: str):
    """A table of PiSA-SR default-mode variants against its eager base: ``(pipe, kw, img, base s, show)``."""
    img = inputs(ctx)["photo"]
    print(f"\n## {section}: {title}", flush=True)
    head = f"{'variant':<46} {'dtype':<6} {'ms':>8} {'vs base':>8} {'peak GiB':>9}"
    print(head)
    print("-" * len(head))
    pipe = build_pisa(ctx, dt)
    kw = {"process_size": ctx.args.size, "default_mode": True}
    r0 = measure(lambda: _call(pipe, kw, img), ctx)
    base = r0["s"]

    def show(name, s, peak, dtype=dt):
        _row(section, variant=name, dtype=dtype, s=s, peak_gib=peak, vs_base=s / base)
        print(f"{name:<46} {dtype:<6} {_ms(s)} {s / base:>8.2f} {peak:>9.2f}", flush=True)

    show(base_name, base, r0["peak_gib"])
    return pipe, kw, img, base, show


def section_toggles(ctx, dtypes):
    import torch

    dt = "bf16" if "bf16" in dtypes else dtypes[0]
    pipe, kw, img, base, show = _variant_table(
        ctx, "toggles", dt, "each speed technique off (or on) in turn; PiSA-SR default mode, batch 1",
        "base: LoRA fused, pre/post on device, SDPA")
    pipe.unfuse_lora()
    r = measure(lambda: pipe(img, **kw), ctx)  # default mode through peft's unmerged adapters
    show("LoRA not fused (peft adapters)", r["s"], r["peak_gib"])
    pipe.processing = "host"
    r = measure(lambda: _call(pipe, kw, img), ctx)
    show("pre/post on the host (Pillow, compat path)", r["s"], r["peak_gib"])
    pipe.processing = "auto"
    for m in (pipe.unet, pipe.vae):
        m.to(memory_format=torch.channels_last)
    r = measure(lambda: _call(pipe, kw, img), ctx)
    show("+ channels_last (UNet, VAE)", r["s"], r["peak_gib"])
    for m in (pipe.unet, pipe.vae):
        m.to(memory_format=torch.contiguous_format)
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    pipe.unet.set_attn_processor(AttnProcessor())
    pipe.vae.set_attn_processor(AttnProcessor())
    r = measure(lambda: _call(pipe, kw, img), ctx)
    show("classic attention instead of SDPA", r["s"], r["peak_gib"])
    pipe.unet.set_attn_processor(AttnProcessor2_0())
    pipe.vae.set_attn_processor(AttnProcessor2_0())
    if ctx.device.type == "cuda":
        other = build_pisa(ctx, "fp16" if dt == "bf16" else "bf16")
        r = measure(lambda: _call(other, kw, img), ctx)
        vae = str(other.vae_dtype).replace("torch.", "")
        show(f"{'fp16' if dt == 'bf16' else 'bf16'} (VAE {vae})", r["s"], r["peak_gib"],
             dtype="fp16" if dt == "bf16" else "bf16")
        pipe = build_pisa(ctx, dt)
    ose = build_osediff(ctx, dt, text_encoder="clip")
    okw = {"process_size": ctx.args.size, "prompt": "a photo"}
    r = measure(lambda: ose(img, **okw), ctx)
    show("osediff: prompt embedding cached", r["s"], r["peak_gib"])
    cached = r["s"]

    def per_image():
        ose._embeds.clear()
        return ose(img, **okw)

    r = measure(per_image, ctx)
    show("osediff: text encoder per image", r["s"], r["peak_gib"])
    print(f"(osediff: the text encoder costs {1e3 * (r['s'] - cached):.1f} ms per image when not cached)")
    _free(ctx)


def section_compile(ctx, dtypes):
    """PiSA-SR default eager vs channels_last + torch.compile (``--compile-mode``; reduce-overhead: CUDA graphs)."""
    import torch

    mode = ctx.args.compile_mode
    dt = dtypes[0]
    pipe, kw, img, base, show = _variant_table(
        ctx, "compile", dt, f"PiSA-SR default mode, batch 1, torch.compile(mode={mode!r}) of the UNet and the VAE "
        "encoder/decoder", "eager (LoRA fused, pre/post on device, SDPA)")
    pipe.fuse_lora()
    for m in (pipe.unet, pipe.vae):
        m.to(memory_format=torch.channels_last)
    unet, enc, dec = pipe.unet, pipe.vae.encoder, pipe.vae.decoder
    pipe.unet = torch.compile(unet, mode=mode)
    pipe.vae.encoder = torch.compile(enc, mode=mode)
    pipe.vae.decoder = torch.compile(dec, mode=mode)
    t0 = time.perf_counter()
    with torch.inference_mode():
        pipe(img, **kw)
        _sync(ctx.device)
    compile_s = time.perf_counter() - t0
    r = measure(lambda: pipe(img, **kw), ctx, warmup=2)
    show(f"+ channels_last + compile({mode}) [{compile_s:.0f} s]", r["s"], r["peak_gib"])
    if ctx.device.type == "cuda":
        for b in ctx.args.compile_batch_sizes:  # each new batch size compiles (and captures) again
            r = measure(lambda: pipe([img] * b, **kw), ctx, warmup=2)
            _row("batch", method="pisa default compiled", dtype=dt, batch=b, s=r["s"], img_s=b / r["s"],
                 peak_gib=r["peak_gib"])
            print(f"{'  compiled batch ' + str(b):<46} {dt:<6} {_ms(r['s'] / b)} {r['s'] / b / base:>8.2f} "
                  f"{r['peak_gib']:>9.2f}   ({b / r['s']:.1f} img/s)", flush=True)
    pipe.unet, pipe.vae.encoder, pipe.vae.decoder = unet, enc, dec


def section_batch(ctx, dtypes):
    img = inputs(ctx)["photo"]
    sizes = ctx.args.batch_sizes
    print(f"\n## batch: images per second with a list of {'/'.join(map(str, sizes))} images in one call "
          f"({ctx.args.size}x{ctx.args.size} output)", flush=True)
    head = f"{'method':<18} {'dtype':<6} " + " ".join(f"{'b=' + str(b):>9}" for b in sizes) + f" {'peak GiB':>9}"
    print(head)
    print("-" * len(head))
    for dt in dtypes:
        variants = list(methods(ctx, dt).items())
        variants += [(f"gan {w}", (build_gan(ctx, w, dt), {"tile": 0})) for w in ("rrdb", "compact")]
        for name, (pipe, kw) in variants:
            rates, peak = [], 0.0
            for b in sizes:
                repeats = ctx.args.repeats if b <= 4 else max(1, ctx.args.repeats // 2)
                r = measure(lambda: _call(pipe, kw, [img] * b), ctx, repeats=repeats)
                rates.append(b / r["s"])
                peak = max(peak, r["peak_gib"])
                _row("batch", method=name, dtype=dt, batch=b, s=r["s"], img_s=b / r["s"], peak_gib=r["peak_gib"])
            print(f"{name:<18} {dt:<6} " + " ".join(f"{v:>9.1f}" for v in rates) + f" {peak:>9.2f}", flush=True)
        _free(ctx)


def section_memory(ctx, dtypes):
    import numpy as np

    side = ctx.args.memory_size
    print(f"\n## memory: a {side}x{side} output ({side // 4}x{side // 4} input; latent and VAE tiling)", flush=True)
    head = f"{'method':<18} {'dtype':<6} {'seconds':>8} {'peak GiB':>9}"
    print(head)
    print("-" * len(head))
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (side // 32, side // 32, 3), dtype=np.uint8)
    from PIL import Image

    img = np.asarray(Image.fromarray(small).resize((side // 4, side // 4), Image.BICUBIC))
    ctx._ose = ctx._clip = ctx._ccsr = ctx._seesr = None  # the peak of one pipeline: the other models go first
    _free(ctx)
    for i, dt in enumerate(dtypes):
        pipe = build_pisa(ctx, dt)
        rows = (("pisa default", {"default_mode": True}), ("pisa adjustable", {"lambda_pix": 0.8}))
        for name, kw in rows if i == 0 else rows[:1]:  # adjustable (two UNet passes per tile): first dtype only
            r = measure(lambda: _call(pipe, kw, img), ctx, repeats=1, warmup=0)
            _row("memory", method=name, dtype=dt, size=side, s=r["s"], peak_gib=r["peak_gib"])
            print(f"{name:<18} {dt:<6} {r['s']:>8.1f} {r['peak_gib']:>9.2f}", flush=True)
        _free(ctx)


def _free(ctx):
    import gc

    import torch

    gc.collect()
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()


def summary(ctx):
    def get(section, **match):
        for r in ROWS:
            if r["section"] == section and all(r.get(k) == v for k, v in match.items()):
                return r
        return None

    print("\n## targets (issue 14)")
    for dt in ("bf16", "fp16", "fp32"):
        d, a, rd = get("speed", row="pisa default", dtype=dt), get("speed", row="pisa adjustable", dtype=dt), \
            get("speed", row="re-dial", dtype=dt)
        if d:
            print(f"{dt}: PiSA-SR default {d['s'] * 1e3:.1f} ms (target <= 15)"
                  + (f"; adjustable {a['s'] / d['s']:.2f}x default (target <= 1.3)" if a else "")
                  + (f"; re-dial {rd['s'] * 1e3:.1f} ms vs one VAE decode {d['stages'].get('decode', 0) * 1e3:.1f} ms"
                     if rd and d.get("stages") else ""))
    for r in ROWS:
        if r["section"] == "memory":
            print(f"{r['dtype']} {r['method']}: {r['size']}x{r['size']} in {r['peak_gib']:.2f} GiB (target <= 12 GB "
                  f"= {12e9 / 2**30:.1f} GiB)")
    best = {}
    for r in ROWS:
        if r["section"] == "batch":
            key = (r["method"], r["dtype"])
            best[key] = max(best.get(key, 0.0), r["img_s"])
    for (m, dt), v in sorted(best.items()):
        print(f"{dt} {m}: up to {v:.1f} images/s")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default=None, help="fp16 | bf16 | fp32 | all (default: fp16,bf16 on CUDA; fp32 on CPU)")
    p.add_argument("--sections", default=",".join(SECTIONS[:-1]),
                   help=f"comma list of {', '.join(SECTIONS)} (default: all but compile)")
    p.add_argument("--size", type=int, default=512, help="output side in pixels (multiple of 32)")
    p.add_argument("--memory-size", type=int, default=4096, help="output side of the memory section")
    p.add_argument("--batch-sizes", default="1,4,16")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--model-size", default="full", choices=("full", "tiny"),
                   help="tiny: small configs, to test the script on a CPU")
    p.add_argument("--quick", action="store_true", help="128 px, 1 run, batches 1,2, memory at 512 (smoke test)")
    p.add_argument("--compile-mode", default="reduce-overhead",
                   choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"))
    p.add_argument("--compile-batch-sizes", default="", help="compiled rows at these batch sizes too (each compiles)")
    p.add_argument("--json", default=None, help="write every row to this file")
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.memory_size, args.repeats, args.warmup, args.batch_sizes = 128, 512, 1, 0, "1,2"
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    args.compile_batch_sizes = [int(b) for b in args.compile_batch_sizes.split(",") if b.strip()]
    import torch
    from diffusers.utils import logging as dlogging

    dlogging.set_verbosity_error()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("bench_speed: no CUDA device here: nothing measured (run with --device cpu --model-size tiny --quick "
              "to test the script)")
        return 0
    dtypes = (["fp16", "bf16"] if args.device.startswith("cuda") else ["fp32"]) if args.dtype is None else \
        (["fp16", "bf16", "fp32"] if args.dtype == "all" else args.dtype.split(","))
    ctx = Ctx(args)
    if ctx.device.type == "cuda":
        print(f"bench_speed: {torch.cuda.get_device_name(ctx.device)}, torch {torch.__version__}, "
              f"models {args.model_size}, random weights", flush=True)
    t0 = time.perf_counter()
    funcs = {"speed": section_speed, "nan": section_nan, "toggles": section_toggles, "batch": section_batch,
             "memory": section_memory, "compile": section_compile}
    for name in [s.strip() for s in args.sections.split(",") if s.strip()]:
        t = time.perf_counter()
        funcs[name](ctx, dtypes)
        print(f"({name}: {time.perf_counter() - t:.0f} s)", flush=True)
        if args.json:  # after every section: a run stopped by its timeout keeps what it measured
            Path(args.json).write_text(json.dumps(ROWS, indent=1, default=str))
    summary(ctx)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
