"""SeeSR (Wu et al., CVPR 2024): semantics-aware real-world SR on SD-2-base, 50 DDPM steps with CFG.

What the official ``test_seesr.py`` computes (``docs/seesr.md``; reference section 2.2):

1. DAPE (RAM with LoRA) on the raw LR gives the tags and the soft prompt ``[1, 145, 512]``. Prompt
   ``f"{tags}, {user_prompt}," + "clean, high-resolution, 8k"``; negative ``"dotted, noise, blur, lowres, smooth"``.
2. Geometry: short side up to ``process_size // 4`` if smaller, x4 (PIL bicubic), down to a multiple of 8
   (PIL bicubic); the output is resized back to exactly 4x the input.
3. LR embedding: ``z_lr = VAE posterior sample * 0.18215``, ``z_T = sqrt(abar_999) z_lr + sqrt(1 - abar_999) eps``
   (``start_point="noise"``: ``z_T = eps``).
4. DDPM ancestral steps (fixed_small). Each step runs the ControlNet (condition: the processed LR in ``[0, 1]``,
   text and soft prompt) and the UNet on the batch ``[negative, positive]`` with the same soft prompt in both
   halves; ``eps = eps_u + g (eps_c - eps_u)``. Latents larger than ``latent_tile**2`` are tiled (Gaussian
   weights; the noise predictions are blended, then CFG is applied).
5. ``VAE.decode(z / 0.18215)``, colour fix (AdaIN default) against the processed LR, resize to 4x.

Fixed by default, reproduced with ``compat="official"`` (``docs/seesr.md``):

* the prompt lacks a space before "clean" (``"..., ,clean, ..."``): default ``", ".join`` of the non-empty
  parts (``"tags, user prompt, clean, high-resolution, 8k"``);
* ``z_T`` is built for ``t = 999`` but the first step runs at ``t = 1000 - 1000/S + 1`` (751 for 4 steps, 981
  for 50; "leading" spacing): default trailing spacing, so the first step is at 999 (999, 979, ..., 19);
* the tile weights' y midpoint is ``T/2`` instead of ``(T-1)/2``: default symmetric;
* (official mode also rounds the decoded image to 8 bit and colour-fixes and resizes it as 8-bit PIL images,
  as the script does; the default keeps floats.)

Random draws: with a ``generator`` realisr draws, in order, the start noise, the VAE posterior noise and one
noise per step, all from that generator (the official script draws the posterior noise from the global RNG).
They can also be given: ``latents=`` (start noise ``[1, 4, h, w]``, diffusers' name), ``posterior_noise=``
(``[1, 4, h, w]``) and ``step_noise=`` (``[steps, 1, 4, h, w]``).
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from typing import Optional

from ...dials import Dial, ModelDials
from ..base import SRPipeline
from ..diffusion_common import (OneStepDiffusionPipeline, cached_prompt_embeds, ddpm_step, finish_output,
                                latent_tile_plan, move_module, preprocess, tiled_latent_predict, vae_decode,
                                vae_posterior)

logger = logging.getLogger(__name__)

__all__ = ["SeeSRPipeline", "seesr_prompt", "seesr_timesteps", "predict_eps", "denoise", "START_T", "OFFICIAL_ADDED_PROMPT", "OFFICIAL_NEGATIVE_PROMPT", "COMPAT_MODES",
           "START_POINTS"]

OFFICIAL_ADDED_PROMPT = "clean, high-resolution, 8k"
OFFICIAL_NEGATIVE_PROMPT = "dotted, noise, blur, lowres, smooth"
COMPAT_MODES = ("default", "official")
START_POINTS = ("lr", "noise")
START_T = 999  # the official start_steps: z_T is built for this timestep
_ARGS = ("prompt", "tags", "image_embeds", "negative_prompt", "added_prompt", "steps", "guidance_scale",
         "conditioning_scale", "start_point", "color_fix", "process_size", "resize_mode", "latent_tile",
         "latent_overlap", "vae_tile", "compat", "latents", "posterior_noise", "step_noise", "keep_intermediates")


def seesr_prompt(tags: str, user_prompt: str = "", added_prompt: str = OFFICIAL_ADDED_PROMPT,
                 compat: str = "default") -> str:
    """SeeSR's positive prompt from the tags, the user's prompt and the added quality words.

    ``compat="official"``: ``f"{tags}, {user_prompt}," + added_prompt`` exactly (no space before the added
    words; an empty user prompt leaves ``", ,"``). Default: the non-empty parts joined with ``", "``.
    """
    if compat == "official":
        return f"{tags}, {user_prompt}," + added_prompt
    return ", ".join(p.strip() for p in (tags, user_prompt, added_prompt) if p and p.strip())


def _tag_string(tags) -> str:
    return tags if isinstance(tags, str) else ", ".join(tags)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def seesr_timesteps(scheduler, steps: int, compat: str = "default") -> list[int]:
    """The denoising timesteps: the scheduler's own spacing (``compat="official"``; leading + offset for
    SD-2-base: 751, 501, 251, 1 for 4 steps) or trailing (999, 749, 499, 249), so that the first step is the one
    ``z_T`` was built for. Timesteps above 999 are skipped (official ``start_steps``)."""
    overrides = {} if compat == "official" else {"timestep_spacing": "trailing"}
    sched = type(scheduler).from_config(scheduler.config, **overrides)
    sched.set_timesteps(steps)
    return [int(t) for t in sched.timesteps if int(t) <= START_T]


def predict_eps(unet, controlnet, z, t: int, prompt_embeds, image_embeds, cond, *, guidance_scale: float,
                conditioning_scale: float = 1.0, latent_tile: Optional[int] = None, latent_overlap: int = 0,
                flavor: str = "pisa"):
    """SeeSR's noise prediction at ``t``: ControlNet + UNet, tiled when the latents exceed ``latent_tile**2``
    (Gaussian blending of the predictions), then CFG.

    Args:
        unet, controlnet: the SeeSR networks (the call runs in their device and dtype).
        z: ``[B, 4, h, w]`` latents; cond: ``[B, 3, 8h, 8w]`` ControlNet condition in ``[0, 1]``.
        prompt_embeds: ``[2B, 77, C]`` (negative first) with guidance, else ``[B, 77, C]``;
            image_embeds: the soft prompt, batched the same way.
        guidance_scale: ``eps = eps_u + g (eps_c - eps_u)`` when ``g > 1``; one conditional pass otherwise.

    Returns:
        float32 ``[B, 4, h, w]`` on the networks' device.
    """
    import torch

    param = next(unet.parameters())
    device, dtype = param.device, param.dtype
    n = 2 if guidance_scale > 1.0 else 1
    b = z.shape[0]
    tt = torch.tensor(t, device=device, dtype=torch.long)

    def fn(zt, ct):
        zz, cc = zt.repeat(n, 1, 1, 1), ct.repeat(n, 1, 1, 1)
        down, mid = controlnet(zz, tt, prompt_embeds, cc, conditioning_scale=conditioning_scale,
                               image_encoder_hidden_states=image_embeds, return_dict=False)
        out = unet(zz, tt, prompt_embeds, image_encoder_hidden_states=image_embeds,
                   down_block_additional_residuals=down, mid_block_additional_residual=mid, return_dict=False)[0]
        # [n*B, 4, h, w] -> [B, n*4, h, w] (unconditional channels first), so tiles blend both at once
        return out.reshape(n, b, *out.shape[1:]).transpose(0, 1).reshape(b, -1, *out.shape[-2:])

    with torch.no_grad():
        out = tiled_latent_predict(fn, z.to(device=device, dtype=dtype), tile=latent_tile, overlap=latent_overlap,
                                   flavor=flavor, context=cond, out_channels=4 * n)
    if n == 1:
        return out
    eps_u, eps_c = out[:, :4], out[:, 4:]
    return eps_u + guidance_scale * (eps_c - eps_u)


def denoise(unet, controlnet, alphas_cumprod, z, timesteps, *, noise_fn, on_step=None, callback=None,
            **predict_kwargs):
    """SeeSR's sampling loop: :func:`predict_eps` and a DDPM ancestral step (fixed_small) per timestep.

    Args:
        z: ``z_T`` (float32); timesteps: e.g. :func:`seesr_timesteps`.
        noise_fn: ``i -> standard normal noise like z`` for step ``i`` (not called at ``t == 0``).
        on_step: optional ``(i, t, z_in, eps, z_out)`` observer.
        callback: progress callback (stage ``"denoise"``).
        **predict_kwargs: ``prompt_embeds``, ``image_embeds``, ``cond``, ``guidance_scale``, ... of
            :func:`predict_eps`.

    Returns:
        The final latents, float32.
    """
    from ...progress import report

    report(callback, "denoise", 0, len(timesteps))
    for i, t in enumerate(timesteps):
        prev_t = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        eps = predict_eps(unet, controlnet, z, t, **predict_kwargs)
        z_prev, _ = ddpm_step(z, eps, alphas_cumprod, t, prev_t, noise_fn(i) if t > 0 else None)
        if on_step is not None:
            on_step(i, t, z, eps, z_prev)
        z = z_prev
        report(callback, "denoise", i + 1, len(timesteps), f"t={t}")
    return z


class SeeSRPipeline(OneStepDiffusionPipeline, SRPipeline):
    """SeeSR. Build with :meth:`from_spec` (``realisr.load_pipeline("seesr")`` / ``"seesr-turbo"``).

    Call: ``pipe(image, prompt="", tags=None, image_embeds=None, steps=50, guidance_scale=5.5,
    start_point="lr", negative_prompt=..., added_prompt=..., conditioning_scale=1.0, color_fix="adain",
    process_size=512, resize_mode="official", latent_tile=96, latent_overlap=4, vae_tile=None,
    compat="default", latents=None, posterior_noise=None, step_noise=None, keep_intermediates=False,
    generator=None, ...)``.

    ``tags`` (a string or a list of tags; ``False``: none) and ``image_embeds`` (the ``[1, N, 512]`` soft prompt)
    bypass the tagger; whatever is not given comes from the DAPE tagger run on the input (loaded on first use).
    """

    flavor = "pisa"  # symmetric tile weights; compat="official" uses the official y midpoint ("osediff")
    # What `realisr serve` shows (every change is a full run). The seed defaults to 0 so that a result and its
    # recipe replay are the same image. Prior per step: bench_multistep.py on the loaded 2-core CPU (68 s/step at
    # 256x256 with CFG), a rough guess on GPUs.
    dials = ModelDials(
        dials=(
            Dial("prompt", "Prompt", "text", default="", help="text added to the tags"),
            Dial("tags", "Tags (DAPE) in the prompt", "bool", default=True,
                 help="the official prompt: the tagger's tags (when the tagger files are here), then yours"),
            Dial("steps", "Steps (empty: the model's)", "int", default=None, minimum=1, maximum=200),
            Dial("guidance_scale", "Guidance scale (empty: the model's)", "float", default=None, minimum=0.0,
                 maximum=20.0, advanced=True),
            Dial("seed", "Seed", "seed", default=0, help="the sampler's noise"),
            Dial("process_size", "Processing size", "int", default=512, minimum=64, maximum=2048, step=8,
                 advanced=True, help="inputs with a short side under size/4 are enlarged first (official)"),
        ),
        grid="latent", per_step="steps", seconds_per_mp={"cpu": 1000.0, "cuda": 0.6}, bytes_per_out_pixel=3000.0,
        model_bytes=8e9)

    def __init__(self, spec, *, unet, controlnet, vae, text_encoder, tokenizer, scheduler, tagger=None,
                 tagger_kwargs: Optional[dict] = None, device=None, dtype=None):
        super().__init__(spec, device=device, dtype=dtype)
        self._init_dtypes(dtype)
        self.unet = move_module(unet, self.device, self.dtype)
        self.controlnet = move_module(controlnet, self.device, self.dtype)
        self.vae = move_module(vae, self.device, self.vae_dtype)
        self.text_encoder = move_module(text_encoder, self.device, self.dtype)
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self._tagger = tagger
        self._tagger_kwargs = dict(tagger_kwargs or {})
        self._embeds: OrderedDict = OrderedDict()

    # -- construction ---------------------------------------------------------------------------------------
    @classmethod
    def from_spec(cls, spec, device=None, dtype=None, sd=None, seesr=None, tagger=None, ram=None, dape=None,
                  tagger_root=None, **kwargs) -> "SeeSRPipeline":
        """Load SD-2-base (or SD-turbo for ``seesr-turbo``), the official ``seesr/{unet,controlnet}`` and, on
        first use, the DAPE tagger.

        Args:
            spec: the ``seesr`` / ``seesr-turbo`` registry entry.
            device, dtype: see :func:`realisr.load_pipeline` (``auto``: fp32 on CPU, bf16/fp16 on CUDA).
            sd: backbone folder or hub id (default: ``$REALISR_SD2`` / ``$REALISR_SD_TURBO``, HF cache, hub).
            seesr: the official ``seesr`` folder (default: ``$REALISR_SEESR``, ``<checkpoints>/seesr``).
            tagger: a tagger (``realisr.tagging.Tagger``), ``"dape"`` (default; ``None`` too) or ``"ram"`` to load
                one on first use, or ``False`` (then every call must pass ``tags`` and ``image_embeds``).
            ram, dape: paths of ``ram_swin_large_14m.pth`` / ``DAPE.pth`` for the tagger.
            tagger_root: a folder searched first for the tagger's files (see :mod:`realisr.tagging.loading`).

        Raises:
            WeightsNotFoundError: SeeSR weights or backbone missing. CheckpointError: malformed weights.
        """
        from ...models.backbone import load_backbone, resolve_sd
        from ...weights.seesr import (SD2_BASE, SD2_ENV, SD_TURBO, SD_TURBO_ENV, load_seesr_controlnet,
                                     load_seesr_unet, resolve_seesr_dir)

        if kwargs:
            raise TypeError(f"unexpected argument(s) for {cls.__name__}: {', '.join(kwargs)}")
        turbo = spec.options.get("variant") == "turbo"
        default_id, env = (SD_TURBO, SD_TURBO_ENV) if turbo else (SD2_BASE, SD2_ENV)
        seesr_dir = resolve_seesr_dir(seesr)
        bb = load_backbone(sd, components=("vae", "text_encoder", "tokenizer", "scheduler"), default_id=default_id,
                           env=env)
        base_unet = None
        if turbo:
            from ...errors import WeightsNotFoundError

            folder, source = resolve_sd(sd, ("unet",), default_id=default_id, env=env)
            if folder is None:
                raise WeightsNotFoundError(f"seesr-turbo needs the UNet of {source} on disk: download it "
                                           f"(huggingface-cli download {SD_TURBO}) and pass --sd PATH or set {env}")
            base_unet = folder / "unet"
        unet = load_seesr_unet(seesr_dir, base_unet_dir=base_unet)
        controlnet = load_seesr_controlnet(seesr_dir)
        logger.info("SeeSR%s: %s, backbone %s", " (SD-turbo)" if turbo else "", seesr_dir, bb.source)
        tagger_kwargs = {k: v for k, v in (("ram", ram), ("dape", dape), ("root", tagger_root)) if v is not None}
        return cls(spec, unet=unet, controlnet=controlnet, vae=bb.vae, text_encoder=bb.text_encoder,
                   tokenizer=bb.tokenizer, scheduler=bb.scheduler, tagger=tagger, tagger_kwargs=tagger_kwargs,
                   device=device, dtype=dtype)

    # -- checks -------------------------------------------------------------------------------------------
    def _defaults(self) -> dict:
        o = self.spec.options
        return {"steps": int(o.get("steps", 50)), "guidance_scale": float(o.get("guidance_scale", 5.5))}

    def check_inputs(self, image, outscale, tile, tile_pad, **kwargs) -> None:
        method = {k: kwargs.pop(k) for k in list(kwargs) if k in _ARGS}
        super().check_inputs(image, outscale, tile, tile_pad, **kwargs)
        self._check_common({k: v for k, v in method.items() if k in ("color_fix", "process_size", "resize_mode",
                                                                      "latent_tile", "latent_overlap", "vae_tile")})
        compat = method.get("compat", "default")
        if compat not in COMPAT_MODES:
            raise ValueError(f"compat must be one of {COMPAT_MODES}, got {compat!r}")
        if compat == "official" and method.get("resize_mode", "official") != "official":
            raise ValueError("compat='official' reproduces the official geometry: use resize_mode='official'")
        steps = method.get("steps")
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= 1000):
            raise ValueError(f"steps must be an integer in [1, 1000], got {steps!r}")
        for key in ("guidance_scale", "conditioning_scale"):
            v = method.get(key)
            if v is not None and not (_is_number(v) and v >= 0):
                raise ValueError(f"{key} must be a finite number >= 0, got {v!r}")
        sp = method.get("start_point", "lr")
        if sp not in START_POINTS:
            raise ValueError(f"start_point must be one of {START_POINTS}, got {sp!r}")
        for key in ("prompt", "negative_prompt", "added_prompt"):
            v = method.get(key)
            if v is not None and not isinstance(v, str):
                raise ValueError(f"{key} must be a string, got {type(v).__name__}")
        tags = method.get("tags")
        if tags is not None and not (isinstance(tags, (str, bool)) or
                                     (isinstance(tags, (list, tuple)) and all(isinstance(t, str) for t in tags))):
            raise ValueError("tags must be a string, a list of strings, True (from the tagger) or False (none)")
        emb = method.get("image_embeds")
        if emb is not None:
            shape = tuple(getattr(emb, "shape", ()))
            dim = self.unet.config.get("image_cross_attention_dim", 512)
            if len(shape) != 3 or shape[0] != 1 or shape[2] != dim:
                raise ValueError(f"image_embeds must be the soft prompt of one image, [1, N, {dim}], got "
                                 f"{list(shape) if shape else type(emb).__name__}")
        for key in ("latents", "posterior_noise", "step_noise"):
            v = method.get(key)
            if v is not None and not hasattr(v, "shape"):
                raise ValueError(f"{key} must be a tensor or array, got {type(v).__name__}")
        if not isinstance(method.get("keep_intermediates", False), bool):
            raise ValueError("keep_intermediates must be True or False")
        if (method.get("tags") in (None, True) or emb is None) and self._tagger is False:
            raise ValueError("this pipeline has no tagger (tagger=False): pass tags= and image_embeds=")

    # -- stages -------------------------------------------------------------------------------------------
    def tagger(self):
        """The DAPE (or plain RAM) tagger, loaded on first use.

        Raises:
            WeightsNotFoundError: the tagger's weights are missing (the message names them).
        """
        if self._tagger is None or isinstance(self._tagger, str):
            from ...errors import WeightsNotFoundError
            from ...tagging import load_tagger

            kind = self._tagger or "dape"
            kwargs = {"dtype": "fp32", **self._tagger_kwargs}  # fp32 as the official script: tags sit on thresholds
            try:
                self._tagger = load_tagger(kind, device=self.device, **kwargs)
            except WeightsNotFoundError as e:
                raise WeightsNotFoundError(f"SeeSR takes its prompt and soft prompt from the {kind.upper()} tagger: "
                                           f"{e} (or pass tags= and image_embeds=)") from e
        return self._tagger

    def semantics(self, x, tags=None, image_embeds=None, compat: str = "default"):
        """The tag string and the soft prompt for an image.

        Args:
            x: the raw LR, ``[1, 3, h, w]`` float in ``[0, 1]`` (the image the official script tags).
            tags, image_embeds: given values are kept; the others come from the tagger (``tags=False``: no tags;
                ``None`` / ``True``: the tagger's).
            compat: ``"official"`` takes the tagger's official tag string (raw tag names); the default joins
                the stripped names.

        Returns:
            ``(tags as one string, soft prompt [1, N, 512] float32 on the device, seconds spent tagging)``.
        """
        import numpy as np
        import torch

        secs = 0.0
        if tags is False:
            tags = ""
        if tags in (None, True) or image_embeds is None:
            tagger = self.tagger()
            t0 = time.perf_counter()
            res = tagger(x)
            secs = time.perf_counter() - t0
            if tags in (None, True):
                tags = res.text[0] if compat == "official" else list(res.tags[0])
            if image_embeds is None:
                image_embeds = res.image_embeds[:1]
        if isinstance(image_embeds, np.ndarray):
            image_embeds = torch.from_numpy(image_embeds)
        return _tag_string(tags), image_embeds.detach().float().to(self.device), secs

    def prompt_embeds(self, prompt: str):
        """The CLIP embedding ``[1, 77, C]`` of ``prompt`` (cached for the last few prompts)."""
        return cached_prompt_embeds(self._embeds, self.tokenizer, self.text_encoder, prompt)

    def timesteps(self, steps: int, compat: str = "default") -> list[int]:
        """See :func:`seesr_timesteps`."""
        return seesr_timesteps(self.scheduler, steps, compat)

    def _draw(self, given, shape, generator, what: str):
        import torch

        if given is not None:
            t = torch.as_tensor(given).float()
            if tuple(t.shape) != tuple(shape):
                raise ValueError(f"{what} must be {list(shape)} for this image, got {list(t.shape)}")
            return t.to(self.device)
        dev = generator.device if generator is not None else torch.device("cpu")
        return torch.randn(shape, generator=generator, device=dev, dtype=torch.float32).to(self.device)

    def _finish_official(self, raw, pre, color_fix: str):
        """The official post-processing on 8-bit PIL images: diffusers' ``postprocess`` (``round(255 x)``), the PIL
        colour fix (truncating), then PIL bicubic to 4x the input."""
        import numpy as np
        import torch
        from PIL import Image

        from ...color_fix import color_fix_pil

        arr = (raw[0] / 2 + 0.5).clamp(0, 1).permute(1, 2, 0).float().cpu().numpy()
        out = Image.fromarray((arr * 255).round().astype("uint8"), "RGB")
        src = Image.fromarray(np.rint(pre.image[0].permute(1, 2, 0).numpy() * 255).astype("uint8"), "RGB")
        out = color_fix_pil(out, src, color_fix)
        out = out.resize((pre.out_size[1], pre.out_size[0]), Image.BICUBIC)
        return torch.from_numpy(np.asarray(out).copy()).permute(2, 0, 1)[None].float().div(255)

    @staticmethod
    def _finish(raw, pre, color_fix: str):
        """Float post-processing: ``clamp(raw) * 0.5 + 0.5``, colour fix, resize to 4x (see ``finish_output``)."""
        return finish_output((raw.float().clamp(-1.0, 1.0) * 0.5 + 0.5).clamp(0.0, 1.0), pre, color_fix)

    def _upscale_rgb(self, x, *, tile, tile_pad, callback, generator, extras, prompt: str = "", tags=None,
                     image_embeds=None, negative_prompt: Optional[str] = None, added_prompt: Optional[str] = None,
                     steps: Optional[int] = None, guidance_scale: Optional[float] = None,
                     conditioning_scale: float = 1.0, start_point: str = "lr", color_fix=None, process_size=None,
                     resize_mode: str = "official", latent_tile=None, latent_overlap=None, vae_tile=None,
                     compat: str = "default", latents=None, posterior_noise=None, step_noise=None,
                     keep_intermediates: bool = False):
        import torch

        d = self._defaults()
        steps = d["steps"] if steps is None else steps
        guidance_scale = d["guidance_scale"] if guidance_scale is None else float(guidance_scale)
        negative_prompt = OFFICIAL_NEGATIVE_PROMPT if negative_prompt is None else negative_prompt
        added_prompt = OFFICIAL_ADDED_PROMPT if added_prompt is None else added_prompt
        color_fix = color_fix or self.spec.color_fix
        official = compat == "official"
        lt, lo = self._latent_tiling(tile, tile_pad, latent_tile, latent_overlap)

        tag_str, soft, tag_secs = self.semantics(x, tags, image_embeds, compat)
        text = seesr_prompt(tag_str, prompt or "", added_prompt, compat)
        guidance = guidance_scale > 1.0  # as the official pipeline: no unconditional pass at g <= 1
        pos = self.prompt_embeds(text)
        emb = torch.cat([self.prompt_embeds(negative_prompt), pos]) if guidance else pos
        emb = emb.to(self.dtype)
        soft_in = soft.repeat(2 if guidance else 1, 1, 1).to(self.dtype)

        ps = process_size if process_size is not None else self.spec.options.get("process_size", 512)
        pre = preprocess(x, scale=self.scale, process_size=ps, mode=resize_mode, multiple_filter="bicubic")
        h, w = pre.size[0] // 8, pre.size[1] // 8
        ts = self.timesteps(steps, compat)
        # draws, in the official order: start noise, posterior noise, one noise per step
        eps0 = self._draw(latents, (1, 4, h, w), generator, "latents")
        pnoise = self._draw(posterior_noise, (1, 4, h, w), generator, "posterior_noise")
        if step_noise is not None:
            step_noise = torch.as_tensor(step_noise).float()
            if tuple(step_noise.shape) != (len(ts), 1, 4, h, w):
                raise ValueError(f"step_noise must be {[len(ts), 1, 4, h, w]} for this image and {len(ts)} steps, "
                                 f"got {list(step_noise.shape)}")
        post = vae_posterior(self.vae, pre.image, vae_tile=vae_tile, device=self.device, dtype=self.vae_dtype,
                             callback=callback)
        # the official sample: mean + std * noise, times the scaling factor
        z_lr = ((post.mean.float().to(self.device) + post.std.float().to(self.device) * pnoise)
                * self.vae.config.scaling_factor)
        if start_point == "lr":
            z = self.scheduler.add_noise(z_lr, eps0, torch.tensor([START_T], device=self.device))
        else:
            z = eps0 * float(getattr(self.scheduler, "init_noise_sigma", 1.0))
        z_t = z
        cond = pre.image.to(device=self.device, dtype=self.dtype)
        flavor = "osediff" if official else self.flavor
        rec: dict[str, list] = {"latents_in": [], "eps": [], "latents_out": []}

        def noise_fn(i):
            if step_noise is not None:
                return step_noise[i].to(self.device)
            return self._draw(None, (1, 4, h, w), generator, "step noise")

        def record(i, t, z_in, eps, z_out):
            for key, v in (("latents_in", z_in), ("eps", eps), ("latents_out", z_out)):
                rec[key].append(v.cpu())

        z = denoise(self.unet, self.controlnet, self.scheduler.alphas_cumprod, z, ts, noise_fn=noise_fn,
                    on_step=record if keep_intermediates else None, callback=callback, prompt_embeds=emb,
                    image_embeds=soft_in, cond=cond, guidance_scale=guidance_scale,
                    conditioning_scale=conditioning_scale, latent_tile=lt, latent_overlap=lo, flavor=flavor)
        raw = vae_decode(self.vae, z, vae_tile=vae_tile, device=self.device, dtype=self.vae_dtype,
                         callback=callback, raw=True)
        y = self._finish_official(raw, pre, color_fix) if official else self._finish(raw, pre, color_fix)
        extras["info"] = {"prompt": text, "negative_prompt": negative_prompt if guidance else None, "tags": tag_str,
                          "steps": len(ts), "timesteps": ts, "guidance_scale": guidance_scale,
                          "start_point": start_point, "compat": compat, "color_fix": color_fix,
                          "processed_size": pre.size, "latent_tiles": latent_tile_plan(h, w, lt, lo),
                          "tagger_seconds": tag_secs}
        if keep_intermediates:
            extras["intermediates"] = {
                "prompt_embeds": emb.float().cpu(), "image_embeds": soft.cpu(), "processed": pre.image,
                "z_lr": z_lr.cpu(), "z_T": z_t.cpu(), "timesteps": ts,
                "latents_in": torch.stack(rec["latents_in"]), "eps": torch.stack(rec["eps"]),
                "latents_out": torch.stack(rec["latents_out"]), "z_final": z.cpu(), "decoded": raw.cpu()}
        return y
