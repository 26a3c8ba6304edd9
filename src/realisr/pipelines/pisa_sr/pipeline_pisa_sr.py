"""PiSA-SR (Sun et al., CVPR 2025): one-step SD-2.1 super-resolution with a pixel-level and a semantic-level
LoRA and two dials, ``lambda_pix`` (fidelity, removes noise/compression; over-smooths when large) and
``lambda_sem`` (perceptual detail; artifacts when large).

What the official code computes (``docs/pisa-sr-osediff.md``):

* ``z_L = VAE.encode(lq) * 0.18215``; the UNet runs once at ``t = 1`` with the empty-prompt embedding;
  ``z_H = z_L - eps``; ``out = clamp(VAE.decode(z_H / 0.18215), -1, 1)``; colour fix; resize back.
* Default mode: both LoRAs active, one UNet pass, ``eps = eps_PiSA``.
* Adjustable mode: ``eps = lambda_pix * eps_pix + lambda_sem * (eps_PiSA - eps_pix)`` where ``eps_pix`` uses
  only the pixel LoRA. ``(1, 1)`` equals the default mode and ``(0, 0)`` gives the VAE reconstruction.

How realisr does it: the pixel LoRA is merged into the UNet weights once (as the official code does); the
semantic LoRA stays a separate (unmerged) peft adapter. ``eps_pix`` and ``eps_PiSA`` come from **one
batched UNet call** in which the semantic adapter applies to the second half of the batch only
(:func:`realisr.models.lora.per_sample_adapters`), so no second copy of the UNet weights is kept (the
official code keeps ~3 GB of extra weight copies). Beyond the official code:

* the dials may be per-pixel maps (PIL image / numpy / torch, resized to the latent grid);
* ``keep_predictions=True`` keeps ``eps_pix`` and ``eps_sem = eps_PiSA - eps_pix``; :meth:`PiSASRPipeline.redial`
  renders a new ``(lambda_pix, lambda_sem)`` with one VAE decode and no UNet pass;
* the VAE is encoded by its posterior mode (the official scripts sample it and ignore ``--seed``;
  ``sample_posterior=True`` with a ``generator`` reproduces that, seeded);
* the output is always exactly 4x the input and colour-fixed in float (see
  :mod:`realisr.pipelines.diffusion_common`); ``compat="official"`` gives the official script's 8-bit output
  instead, bit for bit (``docs/pisa-sr-osediff.md``).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Optional

from ...dials import POSTERIOR_SEED, Dial, ModelDials
from ..base import SRPipeline, SROutput, to_image_data
from ..diffusion_common import (COMMON_ARGS, OneStepDiffusionPipeline, Preprocessed, dial_to_latent,
                                latent_tile_plan, move_module, tiled_latent_predict)

logger = logging.getLogger(__name__)

__all__ = ["PiSASRPipeline", "PiSARedialState"]

_ARGS = COMMON_ARGS + ("lambda_pix", "lambda_sem", "default_mode", "keep_predictions", "_redial_state")


@dataclass
class PiSARedialState:
    """What :meth:`PiSASRPipeline.redial` needs to render new dial settings without a UNet pass.

    Attributes:
        z_L: ``[1, 4, h, w]`` float32 CPU latents of the LQ (times ``scaling_factor``).
        eps_pix: the pixel-LoRA prediction (tile-blended).
        eps_sem: ``eps_PiSA - eps_pix`` (tile-blended).
        pre: the pre-processing record (colour-fix source, sizes).
        color_fix, vae_tile, compat: settings of the original call (defaults for the re-dial).
        image, outscale: the original input and ``outscale`` (filled by ``__call__``).
    """

    z_L: Any
    eps_pix: Any
    eps_sem: Any
    pre: Preprocessed
    color_fix: str = "adain"
    vae_tile: Optional[int] = None
    compat: str = "default"
    image: Any = None
    outscale: Optional[float] = None


def _is_one(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and float(v) == 1.0


class PiSASRPipeline(OneStepDiffusionPipeline, SRPipeline):
    """PiSA-SR with its two dials. Build with :meth:`from_spec` (``realisr.load_pipeline("pisa-sr")``).

    Call: ``pipe(image, lambda_pix=1.0, lambda_sem=1.0, default_mode=None, color_fix="adain",
    process_size=512, resize_mode="official", latent_tile=96, latent_overlap=32, vae_tile=None,
    sample_posterior=False, keep_predictions=False, compat="default", outscale=None, tile=None, tile_pad=None,
    callback=None, generator=None)``.
    """

    flavor = "pisa"
    timestep = 1
    supports_batch = True  # same-size images share the VAE and UNet calls (one by one when the VAE tiles)
    # What `realisr serve` shows: the two dials re-render from the kept predictions (one VAE decode, no UNet
    # pass); every call runs the adjustable mode so that a recipe replays the displayed image exactly.
    # Priors measured on 2 CPU cores in fp32 (tests/slow/test_large_image.py: 2048x2048, 2567 s, 14.7 GB).
    dials = ModelDials(
        dials=(
            Dial("lambda_pix", "lambda_pix (pixel fidelity)", "float", default=1.0, minimum=0.0, maximum=2.0,
                 step=0.05, cheap=True, spatial=True, help="removes noise and compression; over-smooths when large"),
            Dial("lambda_sem", "lambda_sem (semantic detail)", "float", default=1.0, minimum=0.0, maximum=2.0,
                 step=0.05, cheap=True, spatial=True, help="adds perceptual detail; artifacts when large"),
            Dial("process_size", "Processing size", "int", default=512, minimum=64, maximum=2048, step=8,
                 advanced=True, help="inputs with a short side under size/4 are enlarged first (official)"),
            POSTERIOR_SEED,
        ),
        redial="redial", keep={"keep_predictions": True}, fixed={"default_mode": False}, grid="latent",
        seconds_per_mp={"cpu": 610.0, "cuda": 4.0}, bytes_per_out_pixel=2300.0, model_bytes=5.2e9)

    def __init__(self, spec, *, unet, vae, prompt_embeds, device=None, dtype=None):
        super().__init__(spec, device=device, dtype=dtype)
        self._init_dtypes(dtype)
        self.unet = move_module(unet, self.device, self.dtype)
        self.vae = move_module(vae, self.device, self.vae_dtype)
        self.prompt_embeds = prompt_embeds.detach().to(self.device)
        self._fused = False

    # -- construction ---------------------------------------------------------------------------------------
    @classmethod
    def from_spec(cls, spec, device=None, dtype=None, sd=None, checkpoint=None, **kwargs) -> "PiSASRPipeline":
        """Load SD-2.1-base and the official ``pisa_sr.pkl``.

        Args:
            spec: the ``pisa-sr`` registry entry.
            device, dtype: see :func:`realisr.load_pipeline` (``auto``: fp32 on CPU, bf16/fp16 on CUDA).
            sd: SD-2.1-base folder or hub id (default: ``REALISR_SD``, HF cache, hub).
            checkpoint: path to ``pisa_sr.pkl`` / its ``.safetensors``, or an
                :class:`~realisr.weights.official.OfficialCheckpoint` (default: found in
                ``realisr.weights.cache.checkpoints_dir()``).

        Raises:
            WeightsNotFoundError: checkpoint or backbone missing. CheckpointError: malformed checkpoint.
        """
        from ...models.backbone import load_backbone
        from ...weights.official import resolve_checkpoint

        if kwargs:
            raise TypeError(f"unexpected argument(s) for {cls.__name__}: {', '.join(kwargs)}")
        parts = ("unet", "vae", "text_encoder", "tokenizer")
        checkpoint = resolve_checkpoint(checkpoint, spec, expect="pisa-sr", sd=sd, components=parts)
        bb = load_backbone(sd, components=parts)
        return cls.from_components(spec, unet=bb.unet, vae=bb.vae, text_encoder=bb.text_encoder,
                                   tokenizer=bb.tokenizer, checkpoint=checkpoint, device=device, dtype=dtype)

    @classmethod
    def from_components(cls, spec, *, unet, vae, text_encoder, tokenizer, checkpoint, device=None,
                        dtype=None) -> "PiSASRPipeline":
        """Build from loaded (plain, fp32) SD components and a validated official checkpoint.

        The pixel LoRA is merged into ``unet`` in place; the semantic LoRA is injected as adapters.
        """
        from ...models import lora
        from ...models.backbone import encode_prompt

        name = checkpoint.name
        logger.info("PiSA-SR: official checkpoint %s", checkpoint.path)
        lora.inject_pisa_adapters(unet, rank_pix=checkpoint.rank("pix"), modules=checkpoint.unet_modules("pix"),
                                  branches=("pix",))
        lora.load_lora_state_dict(unet, checkpoint.branch_state_dict("pix"), what=name)
        lora.merge_and_unload_adapters(unet, lora.PISA_PIX_ADAPTERS)
        lora.inject_pisa_adapters(unet, rank_sem=checkpoint.rank("sem"), modules=checkpoint.unet_modules("sem"),
                                  branches=("sem",))
        lora.load_lora_state_dict(unet, checkpoint.branch_state_dict("sem"), what=name)
        lora.set_active_adapters(unet, lora.PISA_SEM_ADAPTERS)
        unet.requires_grad_(False).eval()
        vae.requires_grad_(False).eval()
        embeds = encode_prompt(tokenizer, text_encoder, "")  # PiSA-SR's test script hard-codes ""
        return cls(spec, unet=unet, vae=vae, prompt_embeds=embeds, device=device, dtype=dtype)

    # -- semantic LoRA fusing (speed) ---------------------------------------------------------------------
    def fuse_lora(self) -> None:
        """Merge the semantic LoRA into the weights: the default mode then runs a plain UNet (fastest).

        The adjustable mode and ``keep_predictions`` unfuse it again (in fp16 each fuse/unfuse round trip can
        move weights by an ulp, so do not toggle per image).
        """
        from ...models import lora

        if not self._fused:
            for _name, layer in lora.lora_layers(self.unet):
                layer.merge(adapter_names=sorted(layer.lora_A.keys()))
            self._fused = True

    def unfuse_lora(self) -> None:
        """Undo :meth:`fuse_lora`."""
        from ...models import lora

        if self._fused:
            for _name, layer in lora.lora_layers(self.unet):
                layer.unmerge()
            self._fused = False

    # -- checks -------------------------------------------------------------------------------------------
    def check_inputs(self, image, outscale, tile, tile_pad, **kwargs) -> None:
        method = {k: kwargs.pop(k) for k in list(kwargs) if k in _ARGS}
        super().check_inputs(image, outscale, tile, tile_pad, **kwargs)
        self._check_common(method)
        for name in ("lambda_pix", "lambda_sem"):
            if name in method:
                dial_to_latent(method[name], (8, 8), name=name)  # raises ValueError on bad values
        dm = method.get("default_mode")
        if dm not in (None, True, False):
            raise ValueError(f"default_mode must be None, True or False, got {dm!r}")
        ones = _is_one(method.get("lambda_pix", 1.0)) and _is_one(method.get("lambda_sem", 1.0))
        if dm is True and not ones:
            raise ValueError("default_mode=True runs the merged model, which is lambda_pix = lambda_sem = 1: "
                             "leave default_mode=None to use other dial values")
        if dm is True and method.get("keep_predictions"):
            raise ValueError("keep_predictions needs the two predictions of the adjustable mode: "
                             "use default_mode=None or False")
        st = method.get("_redial_state")
        if st is not None and not isinstance(st, PiSARedialState):
            raise ValueError("redial state must come from out.extras['redial_state'] of a PiSA-SR call")

    # -- stages -------------------------------------------------------------------------------------------
    def predict(self, z_l, *, adjustable: bool, latent_tile: int = 96, latent_overlap: int = 32, callback=None):
        """The UNet prediction(s) on ``z_L`` with the official latent tiling.

        Returns:
            ``{"eps": ...}`` (default mode) or ``{"eps_pix": ..., "eps_sem": eps_PiSA - eps_pix}``
            (adjustable mode), float32 ``[1, 4, h, w]`` on the pipeline's device.
        """
        import torch

        from ...models import lora

        emb = self.prompt_embeds
        if not adjustable:
            def fn(z):
                return self._unet(z, emb)

            with torch.no_grad():
                eps = tiled_latent_predict(fn, z_l, tile=latent_tile, overlap=latent_overlap, flavor=self.flavor,
                                           callback=callback)
            return {"eps": eps}
        self.unfuse_lora()

        def fn2(z):
            with lora.per_sample_adapters(self.unet, [(), lora.PISA_SEM_ADAPTERS]):
                out = self._unet(z, emb, batch=2)
            n = z.shape[0]
            eps_pix, eps_pisa = out[:n], out[n:]
            return torch.cat([eps_pix, eps_pisa - eps_pix], dim=1)

        with torch.no_grad():
            both = tiled_latent_predict(fn2, z_l, tile=latent_tile, overlap=latent_overlap, flavor=self.flavor,
                                        callback=callback, out_channels=2 * z_l.shape[1])
        c = z_l.shape[1]
        return {"eps_pix": both[:, :c], "eps_sem": both[:, c:]}

    @staticmethod
    def combine(eps_pix, eps_sem, lambda_pix, lambda_sem):
        """``lambda_pix * eps_pix + lambda_sem * eps_sem`` (dials: floats or ``[1, 1, h, w]`` maps)."""
        import torch

        def as_t(v, ref):  # the official code multiplies by float32 tensors
            return torch.as_tensor(v, dtype=torch.float32).to(ref.device)
        return as_t(lambda_pix, eps_pix) * eps_pix + as_t(lambda_sem, eps_sem) * eps_sem

    # -- main ---------------------------------------------------------------------------------------------
    def _upscale_rgb(self, x, *, tile, tile_pad, callback, generator, extras, lambda_pix=1.0, lambda_sem=1.0,
                     default_mode=None, color_fix=None, process_size=None, resize_mode="official",
                     latent_tile=None, latent_overlap=None, vae_tile=None, sample_posterior=False,
                     keep_predictions=False, compat="default", _redial_state=None):
        color_fix = color_fix or self.spec.color_fix
        info: dict = {}
        st = _redial_state
        if st is None and x.shape[0] > 1 and self._vae_tiled(x, process_size, resize_mode, vae_tile):
            return self._one_by_one(
                x, extras, generator, tile=tile, tile_pad=tile_pad, callback=callback, lambda_pix=lambda_pix,
                lambda_sem=lambda_sem, default_mode=default_mode, color_fix=color_fix, process_size=process_size,
                resize_mode=resize_mode, latent_tile=latent_tile, latent_overlap=latent_overlap, vae_tile=vae_tile,
                sample_posterior=sample_posterior, keep_predictions=keep_predictions, compat=compat)
        if st is None:
            lt, lo = self._latent_tiling(tile, tile_pad, latent_tile, latent_overlap)
            pre = self.preprocess(x, process_size=process_size, resize_mode=resize_mode, compat=compat)
            z_l = self.encode(pre.image, sample_posterior=sample_posterior, generator=generator, vae_tile=vae_tile,
                              callback=callback)
            ones = _is_one(lambda_pix) and _is_one(lambda_sem)
            adjustable = not (ones and not keep_predictions) if default_mode is None else not default_mode
            preds = self.predict(z_l, adjustable=adjustable, latent_tile=lt, latent_overlap=lo, callback=callback)
            plan = latent_tile_plan(z_l.shape[-2], z_l.shape[-1], lt, lo)
            info.update(mode="adjustable" if adjustable else "default", latent_tiles=plan,
                        unet_batch=2 if adjustable else 1)
        else:
            pre, z_l = st.pre, st.z_L.to(self.device)
            preds = {"eps_pix": st.eps_pix.to(self.device), "eps_sem": st.eps_sem.to(self.device)}
            adjustable = True
            vae_tile = st.vae_tile if vae_tile is None else vae_tile
            compat = st.compat
            info.update(mode="redial")
        if adjustable:
            size = tuple(z_l.shape[-2:])
            content = None
            if pre.mode == "pad":
                ch, cw = pre.content_size
                content = (-(-ch // 8), -(-cw // 8))
            lp = dial_to_latent(lambda_pix, size, name="lambda_pix", content=content)
            ls = dial_to_latent(lambda_sem, size, name="lambda_sem", content=content)
            eps = self.combine(preds["eps_pix"], preds["eps_sem"], lp, ls)
        else:
            eps = preds["eps"]
        z_h = z_l - eps
        y = self.decode(z_h, vae_tile=vae_tile, callback=callback)
        out = self.finish(y, pre, color_fix, compat)
        if st is not None:
            extras["redial_state"] = st
        elif keep_predictions:
            states = [PiSARedialState(
                z_L=z_l[i:i + 1].float().cpu(), eps_pix=preds["eps_pix"][i:i + 1].float().cpu(),
                eps_sem=preds["eps_sem"][i:i + 1].float().cpu(),
                pre=dataclasses.replace(pre, image=pre.image[i:i + 1].cpu()), color_fix=color_fix,
                vae_tile=vae_tile, compat=compat) for i in range(z_l.shape[0])]
            if len(states) == 1:
                extras["redial_state"] = states[0]
            else:
                extras["per_image"] = [{"redial_state": st_i} for st_i in states]
        info.update(color_fix=color_fix, processed_size=pre.size, resize_flag=pre.resize_flag, compat=compat)
        extras["info"] = info
        return out

    def __call__(self, image, **kwargs) -> SROutput:
        out = super().__call__(image, **kwargs)
        many = isinstance(image, (list, tuple))
        for o, im in zip(out if many else [out], image if many else [image]):
            st = o.extras.get("redial_state")
            if st is not None and st.image is None:
                st.image = to_image_data(im)
                st.outscale = kwargs.get("outscale")
        return out

    def redial(self, state: PiSARedialState, lambda_pix=1.0, lambda_sem=1.0, *, color_fix: Optional[str] = None,
               outscale: Any = "same", callback=None) -> SROutput:
        """Render new dial values from kept predictions: one VAE decode, no UNet pass.

        Args:
            state: ``out.extras["redial_state"]`` of a call with ``keep_predictions=True``.
            lambda_pix, lambda_sem: new dials (floats or maps, as in ``__call__``).
            color_fix: default: the original call's.
            outscale: default: the original call's.

        The original call's ``compat`` is kept.

        Returns:
            :class:`~realisr.pipelines.base.SROutput`, equal to a fresh call with these dials.
        """
        if not isinstance(state, PiSARedialState) or state.image is None:
            raise ValueError("redial needs out.extras['redial_state'] from a call with keep_predictions=True")
        return self(state.image, outscale=state.outscale if outscale == "same" else outscale, callback=callback,
                    lambda_pix=lambda_pix, lambda_sem=lambda_sem, color_fix=color_fix or state.color_fix,
                    _redial_state=state)
