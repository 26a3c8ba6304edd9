"""OSEDiff (Wu et al., NeurIPS 2024): one-step SD-2.1 super-resolution at ``t = 999``.

What the official code computes (``docs/pisa-sr-osediff.md``):

* ``z_L = VAE_enc_LoRA(lq) * 0.18215`` (the VAE encoder carries a LoRA, the decoder does not);
* ``eps = UNet_LoRA(z_L, t=999, prompt)`` (UNet LoRA plus a fine-tuned ``conv_in``);
* ``z_H = DDPM step at t=999 with one inference step``, which is exactly
  ``x0 = (z_L - sqrt(1 - abar_999) * eps) / sqrt(abar_999)``;
* ``out = clamp(VAE.decode(z_H / 0.18215), -1, 1)``, colour fix, (meant to) resize back.

The official prompt is ``f"{tags}, {user_prompt},"`` with tags from RAM+DAPE (:mod:`realisr.tagging`) run on
the processed LQ (after the x4 resize, ``[1, 3, H, W]`` in ``[0, 1]``; the tagger resizes it to 384 itself). When
the DAPE files are found (``tagger="auto"``, the default) every call builds that prompt, ``prompt=`` being the
user part; ``tags=False`` (CLI ``--no-tags``) or ``tagger=None`` turns tagging off, and without the files the
pipeline says once that it runs untagged, ``prompt=`` being then the whole prompt. ``prompt=`` may also be a
callable ``image -> str`` receiving the processed LQ (it replaces the tagger); :class:`TagPrompt` wraps any
tagger (``image -> "tag1, tag2"``) into the official format.

Deviations (see :mod:`realisr.pipelines.diffusion_common`): posterior mode instead of a sample (seeded
sampling available), the output is always 4x the input and colour-fixed in float (the official script
quantises by truncation, colour-fixes in 8 bits and drops its resize-back; ``compat="official"`` reproduces
that, see ``docs/pisa-sr-osediff.md``), and the LoRAs are merged by default (``merge_lora=False`` keeps them
separate, the official script's default; both agree to float precision).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Callable, Optional, Union

from ...dials import POSTERIOR_SEED, Dial, ModelDials
from ..base import SRPipeline
from ..diffusion_common import (COMMON_ARGS, OneStepDiffusionPipeline, latent_tile_plan, move_module,
                               tiled_latent_predict)

logger = logging.getLogger(__name__)

__all__ = ["OSEDiffPipeline", "TagPrompt", "official_prompt", "resolve_tagger"]

_ARGS = COMMON_ARGS + ("prompt", "tags")
PromptSource = Union[str, Callable[..., str]]


def official_prompt(tags: str, user_prompt: str = "") -> str:
    """The official OSEDiff prompt string: ``f"{tags}, {user_prompt},"``."""
    from ...tagging import official_prompt as _official

    return _official(tags, user_prompt)


def resolve_tagger(tagger, device, dtype, method: str = "OSEDiff"):
    """The DAPE tagger of a pipeline: ``"auto"`` loads it when its files are found (else logs once that the
    method runs untagged and returns ``None``); ``None``/``False`` -> ``None``; a tagger object is kept.

    Raises:
        CheckpointError: the files are found but do not load.
    """
    if tagger is None or tagger is False:
        return None
    if isinstance(tagger, str) and tagger != "auto":
        raise ValueError(f"tagger must be 'auto', None or a Tagger, got {tagger!r}")
    if tagger != "auto":
        return tagger
    import torch

    from ...errors import WeightsNotFoundError
    from ...tagging import load_tagger

    try:
        # fp16 on CUDA as the official script runs DAPE; fp32 where the pipeline is fp32
        return load_tagger("dape", device=device, dtype=torch.float32 if dtype == torch.float32 else "auto")
    except WeightsNotFoundError as e:
        logger.warning("%s runs untagged: the prompt is only the user prompt (%s)", method, e)
        return None


class TagPrompt:
    """A prompt source from a tagger, formatted as the official script does.

    Args:
        tagger: ``callable(image) -> str`` of comma-separated tags; ``image`` is the processed LQ,
            ``[1, 3, H, W]`` float32 in ``[0, 1]``.
        user_prompt: text appended after the tags.
    """

    def __init__(self, tagger: Callable[..., str], user_prompt: str = ""):
        self.tagger = tagger
        self.user_prompt = user_prompt

    def __call__(self, image) -> str:
        return official_prompt(self.tagger(image), self.user_prompt)


class OSEDiffPipeline(OneStepDiffusionPipeline, SRPipeline):
    """OSEDiff. Build with :meth:`from_spec` (``realisr.load_pipeline("osediff")``).

    Call: ``pipe(image, prompt="", tags=True, color_fix="adain", process_size=512, resize_mode="official",
    latent_tile=96, latent_overlap=32, vae_tile=None, sample_posterior=False, compat="default", ...)``.
    """

    flavor = "osediff"
    supports_batch = True  # same-size images share the VAE and UNet calls (one by one when the VAE tiles)
    timestep = 999
    # What `realisr serve` shows (every change is a full run: the prompt reaches the UNet).
    dials = ModelDials(
        dials=(
            Dial("prompt", "Prompt", "text", default="", help="text added after the tags"),
            Dial("tags", "Tags (RAM / DAPE) before the prompt", "bool", default=True,
                 help="the official prompt: the tagger's tags, then yours (when the tagger files are here)"),
            Dial("process_size", "Processing size", "int", default=512, minimum=64, maximum=2048, step=8,
                 advanced=True, help="inputs with a short side under size/4 are enlarged first (official)"),
            POSTERIOR_SEED,
        ),
        grid="latent", seconds_per_mp={"cpu": 300.0, "cuda": 2.0}, bytes_per_out_pixel=2300.0, model_bytes=5.2e9)

    def __init__(self, spec, *, unet, vae, text_encoder, tokenizer, scheduler, device=None, dtype=None,
                 tagger=None):
        super().__init__(spec, device=device, dtype=dtype)
        self.tagger = tagger
        self._init_dtypes(dtype)
        self.unet = move_module(unet, self.device, self.dtype)
        self.vae = move_module(vae, self.device, self.vae_dtype)
        self.text_encoder = move_module(text_encoder, self.device, self.dtype)
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self._embeds: OrderedDict = OrderedDict()

    @classmethod
    def from_spec(cls, spec, device=None, dtype=None, sd=None, checkpoint=None, merge_lora: bool = True,
                  tagger="auto", **kwargs) -> "OSEDiffPipeline":
        """Load SD-2.1-base and the official ``osediff.pkl``.

        Args:
            spec: the ``osediff`` registry entry.
            device, dtype: see :func:`realisr.load_pipeline`.
            sd: SD-2.1-base folder or hub id.
            checkpoint: path to ``osediff.pkl`` / its ``.safetensors`` or an ``OfficialCheckpoint``.
            merge_lora: merge the LoRAs into the weights (faster; the official ``--merge_and_unload_lora``).
            tagger: ``"auto"`` (the DAPE tagger when its files are found, see :mod:`realisr.tagging`), ``None``
                (untagged) or a :class:`realisr.tagging.Tagger`.

        Raises:
            WeightsNotFoundError, CheckpointError.
        """
        from ...models.backbone import load_backbone
        from ...weights.official import resolve_checkpoint

        if kwargs:
            raise TypeError(f"unexpected argument(s) for {cls.__name__}: {', '.join(kwargs)}")
        from ...models.backbone import COMPONENTS

        checkpoint = resolve_checkpoint(checkpoint, spec, expect="osediff", sd=sd, components=COMPONENTS)
        bb = load_backbone(sd)
        pipe = cls.from_components(spec, unet=bb.unet, vae=bb.vae, text_encoder=bb.text_encoder,
                                   tokenizer=bb.tokenizer, scheduler=bb.scheduler, checkpoint=checkpoint,
                                   device=device, dtype=dtype, merge_lora=merge_lora)
        pipe.tagger = resolve_tagger(tagger, pipe.device, pipe.dtype)
        return pipe

    @classmethod
    def from_components(cls, spec, *, unet, vae, text_encoder, tokenizer, scheduler, checkpoint, device=None,
                        dtype=None, merge_lora: bool = True) -> "OSEDiffPipeline":
        """Build from plain fp32 SD components and a validated official checkpoint (modified in place)."""
        from ...models import lora

        name = checkpoint.name
        logger.info("OSEDiff: official checkpoint %s", checkpoint.path)
        lora.inject_osediff_adapters(unet, vae, rank_unet=checkpoint.rank("unet"), rank_vae=checkpoint.rank("vae"),
                                     unet_modules=checkpoint.unet_modules(""),
                                     vae_modules=checkpoint.raw["vae_lora_encoder_modules"])
        lora.load_lora_state_dict(unet, checkpoint.state_dict_unet, what=name)
        lora.load_lora_state_dict(vae, checkpoint.state_dict_vae, what=name)
        if merge_lora:
            lora.merge_and_unload_adapters(unet, lora.OSEDIFF_UNET_ADAPTERS)
            lora.merge_and_unload_adapters(vae, [lora.OSEDIFF_VAE_ADAPTER])
        for m in (unet, vae, text_encoder):
            m.requires_grad_(False).eval()
        return cls(spec, unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
                   device=device, dtype=dtype)

    # -- checks -------------------------------------------------------------------------------------------
    def check_inputs(self, image, outscale, tile, tile_pad, **kwargs) -> None:
        method = {k: kwargs.pop(k) for k in list(kwargs) if k in _ARGS}
        super().check_inputs(image, outscale, tile, tile_pad, **kwargs)
        self._check_common(method)
        p = method.get("prompt", "")
        if not (isinstance(p, str) or callable(p)):
            raise ValueError(f"prompt must be a string or a callable image -> str, got {type(p).__name__}")
        if not isinstance(method.get("tags", True), bool):
            raise ValueError("tags must be True or False")

    # -- stages -------------------------------------------------------------------------------------------
    def prompt_embeds(self, prompt: str):
        """The CLIP embedding of ``prompt`` (cached for the last few prompts)."""
        from ..diffusion_common import cached_prompt_embeds

        return cached_prompt_embeds(self._embeds, self.tokenizer, self.text_encoder, prompt)

    def resolve_prompt(self, prompt: PromptSource, image01, tags: bool = True) -> tuple[str, Optional[str]]:
        """``(prompt text, tag string or None)`` for one image: ``prompt(image01)`` for a callable; with the
        tagger (and ``tags``) the official ``f"{tags}, {prompt},"``; else the string itself."""
        if callable(prompt):
            text = prompt(image01)
            if not isinstance(text, str):
                raise ValueError(f"the prompt source returned {type(text).__name__}, not a string")
            return text, None
        if tags and self.tagger is not None:
            tag_string = self.tagger.prompt(image01)
            return official_prompt(tag_string, prompt), tag_string
        return prompt, None

    def predict(self, z_l, embeds, *, latent_tile: int = 96, latent_overlap: int = 32, callback=None):
        """The (tiled) UNet prediction ``eps`` at t=999, float32."""
        import torch

        def fn(z):
            return self._unet(z, embeds)

        with torch.no_grad():
            return tiled_latent_predict(fn, z_l, tile=latent_tile, overlap=latent_overlap, flavor=self.flavor,
                                        callback=callback)

    def step(self, z_l, eps):
        """The DDPM step at t=999 with one inference step: ``x0 = (z - sqrt(1 - abar) eps) / sqrt(abar)`` (fp32)."""
        import torch

        abar = self.scheduler.alphas_cumprod[self.timestep].to(device=z_l.device, dtype=torch.float32)
        beta = 1 - abar
        return (z_l.float() - beta ** 0.5 * eps.float()) / abar ** 0.5

    def _upscale_rgb(self, x, *, tile, tile_pad, callback, generator, extras, prompt: PromptSource = "",
                     tags: bool = True, color_fix=None, process_size=None, resize_mode="official", latent_tile=None,
                     latent_overlap=None, vae_tile=None, sample_posterior=False, compat="default"):
        color_fix = color_fix or self.spec.color_fix
        if x.shape[0] > 1 and self._vae_tiled(x, process_size, resize_mode, vae_tile):
            return self._one_by_one(x, extras, generator, tile=tile, tile_pad=tile_pad, callback=callback,
                                    prompt=prompt, tags=tags, color_fix=color_fix, process_size=process_size,
                                    resize_mode=resize_mode, latent_tile=latent_tile, latent_overlap=latent_overlap,
                                    vae_tile=vae_tile, sample_posterior=sample_posterior, compat=compat)
        import torch

        lt, lo = self._latent_tiling(tile, tile_pad, latent_tile, latent_overlap)
        pre = self.preprocess(x, process_size=process_size, resize_mode=resize_mode, compat=compat)
        ch, cw = pre.content_size  # the tagger sees the processed LQ without any padding (resize_mode="pad")
        prompts = [self.resolve_prompt(prompt, pre.image[i:i + 1, :, :ch, :cw], tags) for i in range(x.shape[0])]
        embs = [self.prompt_embeds(text) for text, _ in prompts]  # cached: the text encoder runs once per prompt
        emb = embs[0] if all(e is embs[0] for e in embs) else torch.cat(embs)
        z_l = self.encode(pre.image, sample_posterior=sample_posterior, generator=generator, vae_tile=vae_tile,
                          callback=callback)
        eps = self.predict(z_l, emb, latent_tile=lt, latent_overlap=lo, callback=callback)
        z_h = self.step(z_l, eps)
        y = self.decode(z_h, vae_tile=vae_tile, callback=callback)
        out = self.finish(y, pre, color_fix, compat)
        extras["info"] = {"color_fix": color_fix, "processed_size": pre.size, "resize_flag": pre.resize_flag,
                          "compat": compat,
                          "latent_tiles": latent_tile_plan(z_l.shape[-2], z_l.shape[-1], lt, lo)}
        per = [{"info": {"prompt": text, "tags": tag_string}} for text, tag_string in prompts]
        if len(per) == 1:
            extras["info"].update(per[0]["info"])
        else:
            extras["per_image"] = per
        return out

