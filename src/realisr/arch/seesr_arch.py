"""SeeSR's UNet and ControlNet (Wu et al., CVPR 2024): SD-2 networks whose cross-attention blocks also attend
to the DAPE soft prompt ("representation cross-attention").

Every cross-attention block of diffusers' ``UNet2DConditionModel`` / ``ControlNetModel``
(``CrossAttnDownBlock2D``, ``UNetMidBlock2DCrossAttn``, ``CrossAttnUpBlock2D``) gets an ``image_attentions``
``ModuleList``: one ``Transformer2DModel`` per text attention with the same configuration except
``cross_attention_dim`` (512, the width of the soft prompt), run right after its text attention:
``resnet -> text attention -> image attention`` (official ``models/unet_2d_blocks.py``). Parameter names are
the official ones (``down_blocks.0.image_attentions.0...``), so the released ``seesr/unet`` and
``seesr/controlnet`` folders load with diffusers' ``from_pretrained``.

The soft prompt ``image_encoder_hidden_states`` ``[B, N, 512]`` is a forward argument, as in the official code.
It reaches the blocks through diffusers' own forward inside ``cross_attention_kwargs`` (under
:data:`IMAGE_STATES_KEY`); the SeeSR blocks take it out again before calling any attention, so diffusers'
attention processors never see it.
"""

from __future__ import annotations

import inspect
from typing import Any, Optional

import torch
from diffusers.models.controlnets.controlnet import ControlNetModel
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from diffusers.models.unets.unet_2d_blocks import (CrossAttnDownBlock2D, CrossAttnUpBlock2D,
                                                   UNetMidBlock2DCrossAttn, apply_freeu)
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from torch import nn

__all__ = ["IMAGE_STATES_KEY", "SeeSRCrossAttnDownBlock2D", "SeeSRUNetMidBlock2DCrossAttn",
           "SeeSRCrossAttnUpBlock2D", "SeeSRUNet2DConditionModel", "SeeSRControlNetModel", "add_image_attention"]

#: where the soft prompt travels inside ``cross_attention_kwargs`` between the model's forward and its blocks.
IMAGE_STATES_KEY = "image_encoder_hidden_states"


def _take_image_states(cross_attention_kwargs: Optional[dict]) -> tuple[torch.Tensor, Optional[dict]]:
    if not cross_attention_kwargs or cross_attention_kwargs.get(IMAGE_STATES_KEY) is None:
        raise ValueError("SeeSR blocks need the soft prompt: pass image_encoder_hidden_states [B, N, 512] "
                         "to the UNet / ControlNet forward")
    rest = {k: v for k, v in cross_attention_kwargs.items() if k != IMAGE_STATES_KEY}
    return cross_attention_kwargs[IMAGE_STATES_KEY], (rest or None)


def _attend(attn, hidden_states, context, attention_mask, cross_attention_kwargs, encoder_attention_mask):
    return attn(hidden_states, encoder_hidden_states=context, cross_attention_kwargs=cross_attention_kwargs,
                attention_mask=attention_mask, encoder_attention_mask=encoder_attention_mask,
                return_dict=False)[0]


def _layer(block, resnet, attn, image_attn, hidden_states, temb, encoder_hidden_states, image_states,
           attention_mask, cross_attention_kwargs, encoder_attention_mask):
    """One layer of a down / up block: resnet (checkpointed when training with gradient checkpointing), text
    attention, image attention."""
    if torch.is_grad_enabled() and block.gradient_checkpointing:
        hidden_states = block._gradient_checkpointing_func(resnet, hidden_states, temb)
    else:
        hidden_states = resnet(hidden_states, temb)
    hidden_states = _attend(attn, hidden_states, encoder_hidden_states, attention_mask, cross_attention_kwargs,
                            encoder_attention_mask)
    return _attend(image_attn, hidden_states, image_states, attention_mask, cross_attention_kwargs, None)


class SeeSRCrossAttnDownBlock2D(CrossAttnDownBlock2D):
    """``CrossAttnDownBlock2D`` with an image attention after each text attention."""

    image_attentions: nn.ModuleList

    def forward(self, hidden_states: torch.Tensor, temb: Optional[torch.Tensor] = None,
                encoder_hidden_states: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                cross_attention_kwargs: Optional[dict[str, Any]] = None,
                encoder_attention_mask: Optional[torch.Tensor] = None,
                additional_residuals: Optional[torch.Tensor] = None):
        image_states, cross_attention_kwargs = _take_image_states(cross_attention_kwargs)
        output_states = ()
        blocks = list(zip(self.resnets, self.attentions, self.image_attentions))
        for i, (resnet, attn, image_attn) in enumerate(blocks):
            hidden_states = _layer(self, resnet, attn, image_attn, hidden_states, temb, encoder_hidden_states,
                                   image_states, attention_mask, cross_attention_kwargs, encoder_attention_mask)
            # the T2I-adapter residual goes on the output of the last layer (as diffusers' block)
            if i == len(blocks) - 1 and additional_residuals is not None:
                hidden_states = hidden_states + additional_residuals
            output_states = output_states + (hidden_states,)
        if self.downsamplers is not None:
            for downsampler in self.downsamplers:
                hidden_states = downsampler(hidden_states)
            output_states = output_states + (hidden_states,)
        return hidden_states, output_states


class SeeSRUNetMidBlock2DCrossAttn(UNetMidBlock2DCrossAttn):
    """``UNetMidBlock2DCrossAttn`` with an image attention after each text attention."""

    image_attentions: nn.ModuleList

    def forward(self, hidden_states: torch.Tensor, temb: Optional[torch.Tensor] = None,
                encoder_hidden_states: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                cross_attention_kwargs: Optional[dict[str, Any]] = None,
                encoder_attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        image_states, cross_attention_kwargs = _take_image_states(cross_attention_kwargs)
        hidden_states = self.resnets[0](hidden_states, temb)
        for attn, image_attn, resnet in zip(self.attentions, self.image_attentions, self.resnets[1:]):
            hidden_states = _attend(attn, hidden_states, encoder_hidden_states, attention_mask,
                                    cross_attention_kwargs, encoder_attention_mask)
            hidden_states = _attend(image_attn, hidden_states, image_states, attention_mask,
                                    cross_attention_kwargs, None)
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                hidden_states = self._gradient_checkpointing_func(resnet, hidden_states, temb)
            else:
                hidden_states = resnet(hidden_states, temb)
        return hidden_states


class SeeSRCrossAttnUpBlock2D(CrossAttnUpBlock2D):
    """``CrossAttnUpBlock2D`` with an image attention after each text attention."""

    image_attentions: nn.ModuleList

    def forward(self, hidden_states: torch.Tensor, res_hidden_states_tuple: tuple[torch.Tensor, ...],
                temb: Optional[torch.Tensor] = None, encoder_hidden_states: Optional[torch.Tensor] = None,
                cross_attention_kwargs: Optional[dict[str, Any]] = None, upsample_size: Optional[int] = None,
                attention_mask: Optional[torch.Tensor] = None,
                encoder_attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        image_states, cross_attention_kwargs = _take_image_states(cross_attention_kwargs)
        freeu = all(getattr(self, k, None) for k in ("s1", "s2", "b1", "b2"))
        for resnet, attn, image_attn in zip(self.resnets, self.attentions, self.image_attentions):
            res_hidden_states = res_hidden_states_tuple[-1]
            res_hidden_states_tuple = res_hidden_states_tuple[:-1]
            if freeu:
                hidden_states, res_hidden_states = apply_freeu(self.resolution_idx, hidden_states, res_hidden_states,
                                                               s1=self.s1, s2=self.s2, b1=self.b1, b2=self.b2)
            hidden_states = torch.cat([hidden_states, res_hidden_states], dim=1)
            hidden_states = _layer(self, resnet, attn, image_attn, hidden_states, temb, encoder_hidden_states,
                                   image_states, attention_mask, cross_attention_kwargs, encoder_attention_mask)
        if self.upsamplers is not None:
            for upsampler in self.upsamplers:
                hidden_states = upsampler(hidden_states, upsample_size)
        return hidden_states


_SEESR_BLOCKS = {CrossAttnDownBlock2D: SeeSRCrossAttnDownBlock2D,
                 UNetMidBlock2DCrossAttn: SeeSRUNetMidBlock2DCrossAttn,
                 CrossAttnUpBlock2D: SeeSRCrossAttnUpBlock2D}


def _image_attention_like(text_attention: Transformer2DModel, dim: int) -> Transformer2DModel:
    """A new transformer configured as ``text_attention`` but attending to ``dim``-wide tokens (the official
    ``image_attentions`` use the text attention's heads, widths, groups, projection and layer count)."""
    config = {k: v for k, v in text_attention.config.items() if not k.startswith("_")}
    config["cross_attention_dim"] = dim
    return Transformer2DModel(**config)


def add_image_attention(model: nn.Module, dim: int = 512) -> nn.Module:
    """Turn the cross-attention blocks of a freshly built diffusers UNet / ControlNet into SeeSR blocks.

    Each ``CrossAttnDownBlock2D`` / ``UNetMidBlock2DCrossAttn`` / ``CrossAttnUpBlock2D`` becomes its SeeSR
    subclass (same parameters, a forward that also runs the image attentions) and gains ``image_attentions``,
    newly initialised. Other blocks are left alone. Returns ``model``.
    """
    blocks = list(getattr(model, "down_blocks", [])) + list(getattr(model, "up_blocks", []))
    if getattr(model, "mid_block", None) is not None:
        blocks.append(model.mid_block)
    for block in blocks:
        seesr_cls = _SEESR_BLOCKS.get(type(block))
        if seesr_cls is None:
            continue
        block.__class__ = seesr_cls  # a subclass adding only a forward; the block's modules stay as built
        block.image_attentions = nn.ModuleList(_image_attention_like(a, dim) for a in block.attentions)
    return model


def _with_image_states(cross_attention_kwargs: Optional[dict], image_states: Optional[torch.Tensor]) -> dict:
    kwargs = dict(cross_attention_kwargs or {})
    kwargs[IMAGE_STATES_KEY] = image_states
    return kwargs


class _ImageAttentionModel:
    """What the SeeSR UNet and ControlNet add to their diffusers class: the image attentions (built after the
    diffusers ``__init__``, recorded in the config) and the ``image_encoder_hidden_states`` forward argument.

    Args:
        use_image_cross_attention: add the image attentions (``False``: the plain diffusers model).
        image_cross_attention_dim: width of the soft-prompt tokens (512 for DAPE).
        *args, **kwargs: the diffusers class's configuration.
    """

    def __init__(self, *args, use_image_cross_attention: bool = True, image_cross_attention_dim: int = 512,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.register_to_config(use_image_cross_attention=use_image_cross_attention,
                                image_cross_attention_dim=image_cross_attention_dim)
        if use_image_cross_attention:
            add_image_attention(self, image_cross_attention_dim)

    @staticmethod
    def _get_init_keys(input_class):
        """``ConfigMixin._get_init_keys``: this ``__init__`` forwards ``**kwargs`` to the diffusers class, whose
        keys are added so that diffusers passes every config entry through."""
        keys = set(inspect.signature(input_class.__init__).parameters)
        if issubclass(input_class, _ImageAttentionModel) and "kwargs" in keys:
            base = next(c for c in input_class.__mro__ if "__init__" in vars(c)
                        and not issubclass(c, _ImageAttentionModel))
            keys |= set(inspect.signature(base.__init__).parameters)
        return keys

    def forward(self, *args, image_encoder_hidden_states: Optional[torch.Tensor] = None,
                cross_attention_kwargs: Optional[dict[str, Any]] = None, **kwargs):
        """diffusers' forward plus ``image_encoder_hidden_states`` ``[B, N, image_cross_attention_dim]``."""
        if self.config.use_image_cross_attention:
            cross_attention_kwargs = _with_image_states(cross_attention_kwargs, image_encoder_hidden_states)
        return super().forward(*args, cross_attention_kwargs=cross_attention_kwargs, **kwargs)


class SeeSRUNet2DConditionModel(_ImageAttentionModel, UNet2DConditionModel):
    """SD's UNet with SeeSR's image attentions (official ``UNet2DConditionModel(use_image_cross_attention=True)``).

    ``forward(sample, timestep, encoder_hidden_states, image_encoder_hidden_states=..., ...)``; see
    :class:`_ImageAttentionModel` for the extra configuration.
    """


class SeeSRControlNetModel(_ImageAttentionModel, ControlNetModel):
    """diffusers' ControlNet with SeeSR's image attentions in its down and mid blocks (official
    ``ControlNetModel(use_image_cross_attention=True)``).

    ``forward(sample, timestep, encoder_hidden_states, controlnet_cond, image_encoder_hidden_states=..., ...)``.
    """

    @classmethod
    def from_unet(cls, unet: UNet2DConditionModel, *args, load_weights_from_unet: bool = True, **kwargs):
        """diffusers' ``from_unet``; the down and mid blocks copied from a SeeSR UNet include its image attentions
        (as the official ``ControlNetModel.from_unet(unet, use_image_cross_attention=True)``).

        Raises:
            ValueError: ``unet`` has no image attentions of the default width.
        """
        dim = unet.config.get("image_cross_attention_dim", None)
        if not unet.config.get("use_image_cross_attention", False) or dim != 512:
            raise ValueError("SeeSRControlNetModel.from_unet needs a SeeSR UNet (image attentions of width 512)")
        return super().from_unet(unet, *args, load_weights_from_unet=load_weights_from_unet, **kwargs)
