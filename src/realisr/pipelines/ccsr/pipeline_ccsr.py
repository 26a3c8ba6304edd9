"""CCSR (Sun et al., "Improving the Stability and Efficiency of Diffusion Models for Content Consistent
Super-Resolution"): SD-2.1-base + a ControlNet fed with the VAE latent of the upscaled LR image, a truncated
non-uniform schedule, and a GAN-fine-tuned VAE decoder. Its point is *stability*: restoring the same photo
twice should not invent different content.

What the official v2 code computes (``test_ccsr_tile.py`` + ``pipeline_ccsr.py``; docs/ccsr.md):

1. Pre-processing: if a side is shorter than ``process_size // 4``, PIL-bicubic resize so the short side is
   that (``round`` of the scaled sizes); bicubic x4; bicubic resize to the multiple of 8 below.
2. ``c = VAE.encode(2 lr - 1)`` *sampled* (not the mode) ``* 0.18215``; with CFG the image is encoded twice
   (one posterior draw per CFG half). ``c`` is the ControlNet condition (``condition_conv_in``).
3. LR-embedded start: ``z_T = sqrt(abar_999) c + sqrt(1 - abar_999) eps``.
4. One-shot step at ``t = 999`` without CFG: ``x0_T``; re-noise ``x0_T`` to ``t_tau``; a few ancestral DDPM steps
   with CFG (``eps_u + s (eps_c - eps_u)``, negative prompt for ``eps_u``); the output is the ``x0`` predicted
   at ``t_min`` (:mod:`realisr.pipelines.ccsr.schedule`). ``N = 1`` outputs ``x0_T`` directly.
5. Decode with the fine-tuned VAE, colour fix (AdaIN / wavelet) against the pre-processed LR, resize to 4x.

Presets: ``one-step`` (N=1, CFG 1: one network evaluation) and ``two-step`` (N=6, t_max 0.6667, t_min 0.5,
CFG 4.5: two evaluations, the second with a batch of 2), as released; every setting is also a parameter.

``compat="default"`` fixes three official bugs; ``compat="official"`` reproduces them:

* the one-shot step with CFG > 1 is conditioned on the *negative* prompt (``prompt_embeds.chunk(2)[0]``);
  fixed: the positive prompt;
* ``conditioning_scale`` is ignored (hard-coded 1.0); fixed: honoured;
* latent tiles blend with a Gaussian whose y midpoint is ``h / 2`` (x: ``(w - 1) / 2``); fixed: ``(h - 1) / 2``.

``compat="official"`` also reproduces the official 8-bit post-processing (rounded uint8 decoder output,
truncating colour fix, uint8 resize), so its PNGs match the official ones; the default keeps floats.

Random draws, in the official order: start noise, posterior noise, the re-noise at ``t_tau``, one DDPM
variance noise per loop step. All come from ``generator`` (the official code takes the middle two from the
global RNG); ``noise=CCSRNoise(...)`` fixes any of them (to replay a run, or the official one).

v1 (``ccsr-v1``, the converted ``real-world_ccsr.ckpt``; ``version="v1"``): pure-noise start, the condition is
the posterior *mode*, the IDDPM-spaced 45-step grid (t_max 0.6667, t_min 0.3333: 16 evaluations), CFG 1 with
the empty prompt; pre-processing x4 bicubic, short side >= 512, LANCZOS to a multiple of 64; LANCZOS back.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from ...dials import Dial, ModelDials
from ..base import SRPipeline
from ..diffusion_common import (RESIZE_MODES, OneStepDiffusionPipeline, Preprocessed, finish_output,
                                latent_tile_plan, move_module, pil_resize, preprocess, tiled_latent_predict,
                                vae_decode, vae_posterior)
from . import schedule as sch

logger = logging.getLogger(__name__)

__all__ = ["CCSRPipeline", "CCSRNoise", "PRESETS", "COMPAT_MODES", "DEFAULT_PROMPT", "DEFAULT_NEGATIVE_PROMPT",
           "preprocess_ccsr", "preprocess_ccsr_v1"]

DEFAULT_PROMPT = "clean, high-resolution, 8k"
DEFAULT_NEGATIVE_PROMPT = "blurry, dotted, noise, raster lines, unclear, lowres, over-smoothed"
COMPAT_MODES = ("default", "official")
START_POINTS = ("lr", "noise")

#: Named settings; explicit arguments override them. ``one-step``/``two-step``: CCSR-v2 as released.
PRESETS: dict[str, dict] = {
    "one-step": dict(steps=1, t_max=0.6666, t_min=0.0, guidance_scale=1.0),
    "two-step": dict(steps=6, t_max=0.6667, t_min=0.5, guidance_scale=4.5),
    "v1": dict(steps=45, t_max=0.6667, t_min=0.3333, guidance_scale=1.0, prompt="", negative_prompt="",
               start_point="noise"),
}
_VERSION_PRESETS = {"v2": ("one-step", "two-step"), "v1": ("v1",)}
_SETTINGS = ("steps", "t_max", "t_min", "guidance_scale", "prompt", "negative_prompt", "start_point")
_ARGS = ("preset",) + _SETTINGS + ("conditioning_scale", "compat", "noise", "keep_intermediates", "color_fix",
                                   "process_size", "resize_mode", "latent_tile", "latent_overlap", "vae_tile")


@dataclass
class CCSRNoise:
    """Fixed random draws for a CCSR call; ``None`` fields are drawn from ``generator`` as usual.

    Shapes are those of the latent grid ``[*, 4, h, w]`` (``h, w`` = processed size / 8).

    Attributes:
        start: ``[1, 4, h, w]`` noise of the start latent ``z_T``.
        posterior: ``[B, 4, h, w]`` standard-normal draws of the VAE posterior sample (B = 2 with CFG: one per
            CFG half; v1 takes the posterior mode and ignores this).
        renoise: ``[1, 4, h, w]`` noise of the re-noising to ``t_tau``.
        variance: one ``[1, 4, h, w]`` tensor per loop step (the DDPM variance noise).
    """

    start: Any = None
    posterior: Any = None
    renoise: Any = None
    variance: Optional[Sequence[Any]] = None

    @classmethod
    def from_any(cls, value) -> "CCSRNoise":
        """A :class:`CCSRNoise` from itself, ``None`` or a mapping with the same keys."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            unknown = set(value) - {"start", "posterior", "renoise", "variance"}
            if unknown:
                raise ValueError(f"noise has unknown key(s) {sorted(unknown)}: use start, posterior, renoise, variance")
            return cls(**value)
        raise ValueError(f"noise must be a CCSRNoise or a dict, got {type(value).__name__}")


# ------------------------------------------------------------------------------------------------------------
# pre-processing
def _exact_8bit(x) -> bool:
    import numpy as np

    v = x.numpy() * 255.0
    return bool(np.abs(v - np.rint(v)).max() < 1e-3)


def preprocess_ccsr(x, *, scale: int = 4, process_size: int = 512) -> Preprocessed:
    """CCSR-v2's pre-processing of ``x`` (``[1, 3, h, w]`` float ``[0, 1]``), see the module docstring.

    8-bit data runs through uint8 PIL images exactly as the official script; other data per float plane.
    """
    from PIL import Image

    h, w = x.shape[-2:]
    exact = _exact_8bit(x)
    short = process_size // scale
    size, flag = (w, h), False
    if w < short or h < short:
        s = short / min(w, h)
        size, flag = (round(s * w), round(s * h)), True
    y = pil_resize(x, size, Image.BICUBIC, exact_8bit=exact)
    up = (size[0] * scale, size[1] * scale)
    y = pil_resize(y, up, Image.BICUBIC, exact_8bit=exact)
    final = (up[0] // 8 * 8, up[1] // 8 * 8)
    if min(final) < 8:
        raise ValueError(f"image of {w}x{h} is too small for x{scale}: it needs at least 8 output pixels per side")
    y = pil_resize(y, final, Image.BICUBIC, exact_8bit=exact)
    return Preprocessed(y, (h, w), (h * scale, w * scale), "official", resize_flag=flag, exact_8bit=exact)


def preprocess_ccsr_v1(x, *, scale: int = 4, process_size: int = 512) -> Preprocessed:
    """CCSR-v1's pre-processing: bicubic x``scale``; if the short side is below ``process_size``, bicubic to a
    short side of ``process_size`` (ceil of the scaled sizes); LANCZOS to the multiple of 64 below."""
    from PIL import Image

    h, w = x.shape[-2:]
    exact = _exact_8bit(x)
    up = (w * scale, h * scale)
    y = pil_resize(x, up, Image.BICUBIC, exact_8bit=exact)
    flag = False
    if min(up) < process_size:
        r = process_size / min(up)
        up, flag = (math.ceil(up[0] * r), math.ceil(up[1] * r)), True
        y = pil_resize(y, up, Image.BICUBIC, exact_8bit=exact)
    final = (up[0] // 64 * 64, up[1] // 64 * 64)
    if min(final) < 64:
        raise ValueError(f"image of {w}x{h} is too small for CCSR-v1 (needs 64 output pixels per side)")
    y = pil_resize(y, final, Image.LANCZOS, exact_8bit=exact)
    return Preprocessed(y, (h, w), (h * scale, w * scale), "official", resize_flag=flag, exact_8bit=exact)


# ------------------------------------------------------------------------------------------------------------
class CCSRPipeline(OneStepDiffusionPipeline, SRPipeline):
    """CCSR v2 (``realisr.load_pipeline("ccsr")``) and v1 (``"ccsr-v1"``).

    Call: ``pipe(image, preset=None, steps=None, t_max=None, t_min=None, guidance_scale=None, prompt=None,
    negative_prompt=None, start_point=None, conditioning_scale=1.0, compat="default", noise=None,
    keep_intermediates=False, color_fix="adain", process_size=512, resize_mode="official", latent_tile=64,
    latent_overlap=32, vae_tile=None, outscale=None, tile=None, tile_pad=None, callback=None, generator=None)``.

    ``preset`` defaults to the registry entry's (``one-step`` for ``ccsr``); ``None`` settings come from it.
    ``keep_intermediates=True`` puts every intermediate tensor (CPU float32) in ``out.extras["intermediates"]``
    under the names of the official fixture traces (``noise.start``, ``vae_enc.mean``, ``z_T``, ``init.eps``,
    ``init.x0``, ``init.z_tao``, ``step0.eps_raw``, ``final.latent``, ``decode.output``, ...).
    """

    flavor = "pisa"
    # What `realisr serve` shows (every change is a full run; empty settings come from the preset). The seed
    # defaults to 0 so that a result and its recipe replay are the same image. CPU prior: a rough guess.
    dials = ModelDials(
        dials=(
            Dial("preset", "Preset", "choice", default=None, only=("ccsr",),
                 choices=(("the model's (one-step)", None), "one-step", "two-step"),
                 help="one-step: 1 step, no CFG; two-step: 6 steps, CFG 4.5 (the released settings)"),
            Dial("steps", "Steps (empty: the preset's)", "int", default=None, minimum=1, maximum=100),
            Dial("guidance_scale", "Guidance scale (empty: the preset's)", "float", default=None, minimum=0.0,
                 maximum=20.0, advanced=True),
            Dial("prompt", "Prompt (empty: the preset's)", "text", default=None, advanced=True),
            Dial("seed", "Seed", "seed", default=0, help="the sampler's noise"),
            Dial("process_size", "Processing size", "int", default=512, minimum=64, maximum=2048, step=8,
                 advanced=True, help="inputs with a short side under size/4 are enlarged first (official)"),
        ),
        grid="latent", seconds_per_mp={"cpu": 900.0, "cuda": 6.0}, bytes_per_out_pixel=2600.0, model_bytes=6.5e9)

    def __init__(self, spec, *, unet, controlnet, vae, text_encoder, tokenizer, scheduler, device=None, dtype=None):
        super().__init__(spec, device=device, dtype=dtype)
        self._init_dtypes(dtype)
        self.version = spec.options.get("version", "v2")
        self.unet = move_module(unet, self.device, self.dtype)
        self.controlnet = move_module(controlnet, self.device, self.dtype)
        self.vae = move_module(vae, self.device, self.vae_dtype)
        self.text_encoder = move_module(text_encoder, self.device, self.dtype)
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.alphas_cumprod = scheduler.alphas_cumprod.float().cpu()
        self._embeds: OrderedDict = OrderedDict()

    # -- construction ---------------------------------------------------------------------------------------
    @classmethod
    def from_spec(cls, spec, device=None, dtype=None, sd=None, weights=None, **kwargs) -> "CCSRPipeline":
        """Load the CCSR release (ControlNet + stage-2 VAE; v1: also the UNet) and SD-2.1-base.

        Args:
            spec: the ``ccsr`` / ``ccsr-v1`` registry entry.
            device, dtype: see :func:`realisr.load_pipeline` (``auto``: fp32 on CPU, bf16/fp16 on CUDA).
            sd: SD-2.1-base folder or hub id (default: ``REALISR_SD``, HF cache, hub).
            weights: the release folder (``controlnet/``, ``vae/``) or a hub id; default: the checkpoints folder
                (``$REALISR_WEIGHTS/ccsr``, ``ccsr-v1``), see :mod:`realisr.weights.ccsr`.

        Raises:
            WeightsNotFoundError: weights or backbone missing. CheckpointError: malformed weights.
        """
        from ...models.backbone import load_backbone
        from ...weights.ccsr import folder_version, load_ccsr_weights, resolve_ccsr_weights

        if kwargs:
            raise TypeError(f"unexpected argument(s) for {cls.__name__}: {', '.join(kwargs)}")
        version = spec.options.get("version", "v2")
        folder = resolve_ccsr_weights(weights, version)
        if folder_version(folder) != version:
            from ...errors import CheckpointError

            other = "ccsr-v1" if version == "v2" else "ccsr"
            raise CheckpointError(f"{folder} holds CCSR-{folder_version(folder)} weights, not {version}: use -m {other}")
        w = load_ccsr_weights(folder, version)
        comps = ("text_encoder", "tokenizer", "scheduler") + (("unet",) if w.unet is None else ())
        bb = load_backbone(sd, components=comps)
        return cls.from_components(spec, unet=w.unet if w.unet is not None else bb.unet, controlnet=w.controlnet,
                                   vae=w.vae, text_encoder=bb.text_encoder, tokenizer=bb.tokenizer,
                                   scheduler=bb.scheduler, device=device, dtype=dtype)

    @classmethod
    def from_components(cls, spec, *, unet, controlnet, vae, text_encoder, tokenizer, scheduler, device=None,
                        dtype=None) -> "CCSRPipeline":
        """Build from loaded fp32 components (the DDPM scheduler config of SD-2.1-base; "leading" spacing is
        imposed, as the official diffusers 0.21 used it).

        Raises:
            CheckpointError: the ControlNet does not fit the UNet.
        """
        from diffusers import DDPMScheduler

        from ...weights.ccsr import check_compatible

        check_compatible(controlnet, unet)
        sched = DDPMScheduler.from_config(scheduler.config, timestep_spacing="leading")
        for m in (unet, controlnet, vae, text_encoder):
            m.requires_grad_(False).eval()
        return cls(spec, unet=unet, controlnet=controlnet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                   scheduler=sched, device=device, dtype=dtype)

    # -- settings -------------------------------------------------------------------------------------------
    def default_preset(self) -> str:
        return self.spec.options.get("preset", "one-step" if self.version == "v2" else "v1")

    def resolve_settings(self, preset: Optional[str] = None, **explicit) -> dict:
        """The effective settings: the preset's, overridden by the explicit non-``None`` values.

        Raises:
            ValueError: unknown preset (or one of the other version).
        """
        name = preset or self.default_preset()
        allowed = _VERSION_PRESETS[self.version]
        if name not in allowed:
            raise ValueError(f"unknown preset {name!r} for {self.spec.id}: use one of {', '.join(allowed)}")
        out = {"prompt": DEFAULT_PROMPT, "negative_prompt": DEFAULT_NEGATIVE_PROMPT, "start_point": "lr"}
        out.update(PRESETS[name])
        out.update({k: v for k, v in explicit.items() if v is not None})
        out["preset"] = name
        return out

    def schedule(self, settings: dict) -> sch.TruncatedSchedule:
        """The truncated schedule of resolved ``settings`` (v2: the scheduler's grid; v1: IDDPM-spaced)."""
        if self.version == "v1":
            return sch.spaced_schedule(settings["steps"], settings["t_max"], settings["t_min"],
                                       self.scheduler.config.num_train_timesteps)
        self.scheduler.set_timesteps(settings["steps"])
        ts = [int(t) for t in self.scheduler.timesteps]
        return sch.truncated_schedule(settings["steps"], settings["t_max"], settings["t_min"], timesteps=ts,
                                      num_train_timesteps=self.scheduler.config.num_train_timesteps)

    # -- checks ---------------------------------------------------------------------------------------------
    def check_inputs(self, image, outscale, tile, tile_pad, **kwargs) -> None:
        method = {k: kwargs.pop(k) for k in list(kwargs) if k in _ARGS}
        super().check_inputs(image, outscale, tile, tile_pad, **kwargs)
        self._check_common(method)
        if method.get("resize_mode", "official") not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}")
        compat = method.get("compat", "default")
        if compat not in COMPAT_MODES:
            raise ValueError(f"compat must be one of {', '.join(COMPAT_MODES)}, got {compat!r}")
        preset = method.get("preset")
        if preset is not None and not isinstance(preset, str):
            raise ValueError(f"preset must be a name, got {preset!r}")
        s = self.resolve_settings(preset, **{k: method.get(k) for k in _SETTINGS})
        steps = s["steps"]
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= 1000:
            raise ValueError(f"steps must be an integer in [1, 1000], got {steps!r}")
        for key in ("t_max", "t_min", "guidance_scale"):
            v = s[key]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{key} must be a number, got {v!r}")
        if not 0.0 <= s["t_min"] < s["t_max"] <= 1.0:
            raise ValueError(f"need 0 <= t_min < t_max <= 1, got t_min={s['t_min']}, t_max={s['t_max']}")
        if s["guidance_scale"] < 1.0:
            raise ValueError(f"guidance_scale must be >= 1 (1 = no classifier-free guidance), got {s['guidance_scale']}")
        for key in ("prompt", "negative_prompt"):
            if not isinstance(s[key], str):
                raise ValueError(f"{key} must be a string, got {type(s[key]).__name__}")
        if s["start_point"] not in START_POINTS:
            raise ValueError(f"start_point must be one of {START_POINTS}, got {s['start_point']!r}")
        cs = method.get("conditioning_scale", 1.0)
        if isinstance(cs, bool) or not isinstance(cs, (int, float)) or not math.isfinite(cs) or cs < 0:
            raise ValueError(f"conditioning_scale must be a number >= 0, got {cs!r}")
        if not isinstance(method.get("keep_intermediates", False), bool):
            raise ValueError("keep_intermediates must be True or False")
        CCSRNoise.from_any(method.get("noise"))
        self.schedule(s)  # raises ValueError for settings that leave an empty loop

    # -- stages ---------------------------------------------------------------------------------------------
    def prompt_embeds(self, prompt: str):
        """The CLIP embedding ``[1, 77, C]`` of ``prompt``, float32 (cached for the last few prompts)."""
        from ..diffusion_common import cached_prompt_embeds

        return cached_prompt_embeds(self._embeds, self.tokenizer, self.text_encoder, prompt).float()

    def _network(self, z, t: int, ehs, cond, scale: float):
        """One ControlNet + UNet evaluation on a batch: ``eps`` float32."""
        import torch

        dt = self.dtype
        tt = torch.tensor([int(t)] * z.shape[0], device=self.device, dtype=torch.long)
        zz, cc, ee = z.to(self.device, dt), cond.to(self.device, dt), ehs.to(self.device, dt)
        down, mid = self.controlnet(zz, tt, encoder_hidden_states=ee, controlnet_cond=cc, conditioning_scale=scale,
                                    return_dict=False)
        out = self.unet(zz, tt, encoder_hidden_states=ee, down_block_additional_residuals=down,
                        mid_block_additional_residual=mid, return_dict=False)[0]
        return out.float()

    def predict(self, z, cond, t: int, ehs, *, scale: float = 1.0, latent_tile: int = 64, latent_overlap: int = 32,
                flavor: str = "pisa", callback=None):
        """The network's ``eps`` for latent ``z`` (``[1, 4, h, w]``) under each condition of ``cond``
        (``[B, 4, h, w]``, one per batch row, with ``ehs`` ``[B, 77, C]``): ``[B, 4, h, w]`` float32.

        Tiles (when the latent is larger than ``latent_tile``) take their condition as the slice of the
        full-image condition latent; the per-tile predictions are blended with the Gaussian weights (``flavor``
        ``"osediff"``: the official y midpoint ``h / 2``).
        """
        import torch

        b, c = cond.shape[0], z.shape[1]
        x = torch.cat([z.float()] + [cond[i:i + 1].float() for i in range(b)], dim=1)

        def fn(xt):
            zt = xt[:, :c].expand(b, -1, -1, -1)
            ct = torch.cat([xt[:, c * (i + 1):c * (i + 2)] for i in range(b)])
            eps = self._network(zt, t, ehs, ct, scale)
            return eps.reshape(1, b * c, *eps.shape[-2:])

        with torch.no_grad():
            out = tiled_latent_predict(fn, x, tile=latent_tile, overlap=latent_overlap, flavor=flavor,
                                       callback=callback, out_channels=b * c)
        return out.reshape(b, c, *out.shape[-2:])

    def decode(self, z, *, vae_tile=None, callback=None):
        """The decoder output ``vae.decode(z / sf)`` (float32, unclamped, about ``[-1, 1]``)."""
        return vae_decode(self.vae, z, vae_tile=vae_tile, device=self.device, dtype=self.vae_dtype,
                          callback=callback, raw=True)

    # -- main -----------------------------------------------------------------------------------------------
    def _draw(self, given, shape, generator, name: str):
        import torch

        if given is not None:
            t = torch.as_tensor(given).float().cpu()
            if tuple(t.shape) != tuple(shape):
                raise ValueError(f"noise.{name} has shape {tuple(t.shape)}, this image needs {tuple(shape)}")
            return t
        return torch.randn(shape, generator=generator, dtype=torch.float32)

    def _upscale_rgb(self, x, *, tile, tile_pad, callback, generator, extras, preset=None, steps=None, t_max=None,
                     t_min=None, guidance_scale=None, prompt=None, negative_prompt=None, start_point=None,
                     conditioning_scale=1.0, compat="default", noise=None, keep_intermediates=False,
                     color_fix=None, process_size=None, resize_mode="official", latent_tile=None,
                     latent_overlap=None, vae_tile=None):
        import torch

        from ...progress import report

        official = compat == "official"
        color_fix = color_fix or self.spec.color_fix
        s = self.resolve_settings(preset, steps=steps, t_max=t_max, t_min=t_min, guidance_scale=guidance_scale,
                                  prompt=prompt, negative_prompt=negative_prompt, start_point=start_point)
        plan_sched = self.schedule(s)
        noise = CCSRNoise.from_any(noise)
        keep: dict = {}

        def rec(name, t):
            if keep_intermediates:
                keep[name] = t.detach().float().cpu().clone() if hasattr(t, "detach") else torch.tensor(t)

        lt, lo = self._latent_tiling(tile, tile_pad, latent_tile, latent_overlap)
        flavor = "osediff" if official else "pisa"
        scale = 1.0 if official else float(conditioning_scale)
        if official and conditioning_scale != 1.0:
            logger.warning("compat='official' ignores conditioning_scale=%s (the official code uses 1.0)",
                           conditioning_scale)
        ps = process_size if process_size is not None else self.spec.options.get("process_size", 512)
        if resize_mode == "pad":
            pre = preprocess(x, scale=self.scale, process_size=ps, mode="pad")
        elif self.version == "v1":
            pre = preprocess_ccsr_v1(x, scale=self.scale, process_size=ps)
        else:
            pre = preprocess_ccsr(x, scale=self.scale, process_size=ps)
        rec("preproc", pre.image)
        cfg = s["guidance_scale"] > 1.0
        pos = self.prompt_embeds(s["prompt"])
        ehs = torch.cat([self.prompt_embeds(s["negative_prompt"]), pos]) if cfg else pos
        rec("prompt_embeds", ehs)
        lh, lw = pre.image.shape[-2] // 8, pre.image.shape[-1] // 8
        lat = (1, self.unet.config.in_channels, lh, lw)
        b = 2 if cfg else 1
        acp = self.alphas_cumprod

        # 1. start noise, 2. condition latent (posterior sample per CFG half; v1: the mode)
        n_start = self._draw(noise.start, lat, generator, "start")
        rec("noise.start", n_start)
        dist = vae_posterior(self.vae, pre.image, vae_tile=vae_tile, device=self.device, dtype=self.vae_dtype,
                             callback=callback)
        mean, std = dist.mean.float().cpu(), dist.std.float().cpu()
        rec("vae_enc.mean", mean.expand(b, -1, -1, -1))  # one row per CFG half, as the official batch
        rec("vae_enc.std", std.expand(b, -1, -1, -1))
        sf = self.vae.config.scaling_factor
        if self.version == "v1":
            sample = mean.expand(b, -1, -1, -1)
        else:
            n_post = self._draw(noise.posterior, (b,) + tuple(mean.shape[1:]), generator, "posterior")
            rec("vae_enc.noise", n_post)
            sample = mean + std * n_post
        rec("vae_enc.sample", sample)
        cond = (sample * sf).to(self.device)
        # 3. start latent
        if s["start_point"] == "lr":
            z = sch.add_noise(cond[0:1].float(), n_start.to(self.device), acp, plan_sched.t_start)
        else:
            z = n_start.to(self.device)
        rec("z_T", z)
        total = plan_sched.network_evaluations
        report(callback, "denoise", 0, total)
        # 4. one-shot step at t=999 without CFG (officially on the negative prompt when CFG is on)
        ehs0 = ehs[0:1] if (official and cfg) else pos
        kw = dict(scale=scale, latent_tile=lt, latent_overlap=lo, flavor=flavor)
        eps = self.predict(z, cond[0:1], plan_sched.t_start, ehs0, **kw)
        rec("init.eps", eps)
        x0 = sch.predict_x0(z, eps.to(self.device), acp, plan_sched.t_start)
        rec("init.x0", x0)
        report(callback, "denoise", 1, total)
        final = x0
        if not plan_sched.one_step or official:  # officially re-noised (and discarded) even for N = 1
            n_tau = self._draw(noise.renoise, lat, generator, "renoise")
            rec("noise.tao", n_tau)
            z = sch.add_noise(x0, n_tau.to(self.device), acp, plan_sched.t_tau)
            rec("init.z_tao", z)
        if not plan_sched.one_step:
            variance = list(noise.variance or [])
            for i, (t, prev_t) in enumerate(zip(plan_sched.loop, plan_sched.prev)):
                eps_raw = self.predict(z, cond, t, ehs, **kw)
                eps = eps_raw[0:1] + s["guidance_scale"] * (eps_raw[1:2] - eps_raw[0:1]) if cfg else eps_raw
                rec(f"step{i}.t", torch.tensor(t))
                rec(f"step{i}.latent", z)
                rec(f"step{i}.eps_raw", eps_raw)
                rec(f"step{i}.eps", eps)
                n_var = self._draw(variance[i] if i < len(variance) else None, lat, generator, f"variance[{i}]")
                rec(f"step{i}.noise.variance", n_var)
                prev, x0_t = sch.ddpm_step(z, eps.to(self.device), acp, t, prev_t, n_var.to(self.device))
                rec(f"step{i}.prev_sample", prev)
                final = x0_t if plan_sched.truncated else prev
                z = prev
                report(callback, "denoise", i + 2, total)
        rec("final.latent", final)
        # 5. decode, colour fix, back to the input geometry
        raw = self.decode(final, vae_tile=vae_tile, callback=callback)
        rec("decode.output", raw)
        if official and self.version == "v2" and resize_mode != "pad":
            out = self._official_post(raw, pre, color_fix)
        elif self.version == "v1" and resize_mode != "pad":
            out = self._v1_post(raw, pre, color_fix)
        else:
            y = (raw.clamp(-1.0, 1.0) * 0.5 + 0.5).clamp(0.0, 1.0)
            out = finish_output(y, pre, color_fix)
        info = dict(s, compat=compat, conditioning_scale=scale, color_fix=color_fix, processed_size=pre.size,
                    resize_flag=pre.resize_flag, timesteps=list(plan_sched.timesteps), t_tau=plan_sched.t_tau,
                    loop=list(plan_sched.loop), network_evaluations=total, version=self.version,
                    latent_tiles=latent_tile_plan(lh, lw, lt, lo))
        extras["info"] = info
        if keep_intermediates:
            extras["intermediates"] = keep
        return out

    @staticmethod
    def _official_post(raw, pre: Preprocessed, color_fix: str):
        """The official 8-bit post-processing: rounded uint8 output, PIL colour fix (truncating), bicubic
        resize of the uint8 image to ``scale x`` the input."""
        import numpy as np
        import torch
        from PIL import Image

        from ...color_fix import color_fix_pil

        y = (raw.float().cpu() / 2 + 0.5).clamp(0, 1)
        arr = (y[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        src = np.rint(pre.image[0].permute(1, 2, 0).numpy() * 255).clip(0, 255).astype(np.uint8)
        img = color_fix_pil(Image.fromarray(arr, "RGB"), Image.fromarray(src, "RGB"), color_fix)
        h, w = pre.out_size
        if img.size != (w, h):
            img = img.resize((w, h), Image.BICUBIC)
        return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)[None].float().div(255)

    @staticmethod
    def _v1_post(raw, pre: Preprocessed, color_fix: str):
        """v1: colour fix against the conditioning image, LANCZOS back to ``scale x`` the input."""
        from PIL import Image

        from ...color_fix import color_fix as _fix

        y = (raw.float().clamp(-1.0, 1.0) * 0.5 + 0.5).clamp(0.0, 1.0)
        y = _fix(y, pre.image.to(y.device), color_fix).cpu()
        h, w = pre.out_size
        if tuple(y.shape[-2:]) != (h, w):
            y = pil_resize(y.contiguous(), (w, h), Image.LANCZOS, exact_8bit=False)
        return y.contiguous()
