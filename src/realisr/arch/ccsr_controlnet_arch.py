"""The CCSR-v2 ControlNet: diffusers' ``ControlNetModel`` with the low-resolution image given as a VAE latent.

The official CCSR-v2 ControlNet (``use_vae_encode_condition=True``) is a standard diffusers ControlNet in which
the pixel-space hint encoder (``controlnet_cond_embedding``, 3 -> 16 -> ... -> 320 channels with 8x
downsampling) is replaced by one convolution on the 4-channel VAE latent of the upscaled LR image:

    ``sample = conv_in(x_t) + condition_conv_in(z_LR)``,  ``condition_conv_in = Conv2d(4, C0, 3, padding=1)``

Everything else (time embedding, down blocks, mid block, the zero convolutions and the conditioning scale) is
diffusers' own code: this class only swaps that one module, under the official parameter name
(``condition_conv_in.*``), so the official ``controlnet/`` folders load and save with diffusers'
``from_pretrained`` / ``save_pretrained`` unchanged.
"""

from __future__ import annotations

from typing import Optional

import torch
from diffusers import ControlNetModel
from diffusers.configuration_utils import register_to_config

__all__ = ["CCSRControlNetModel"]


class CCSRControlNetModel(ControlNetModel):
    """diffusers ``ControlNetModel`` whose condition is a VAE latent added through ``condition_conv_in``.

    Keyword arguments are those of ``ControlNetModel`` plus ``use_vae_encode_condition`` (must be ``True``: the
    pixel hint encoder of a plain ControlNet is not built) and ``condition_channels`` (latent channels, 4).
    ``forward`` is diffusers' (``controlnet_cond`` is the scaled VAE latent ``[B, 4, h, w]``).
    """

    @register_to_config
    def __init__(
        self,
        in_channels: int = 4,
        conditioning_channels: int = 3,
        flip_sin_to_cos: bool = True,
        freq_shift: int = 0,
        down_block_types: tuple = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                   "DownBlock2D"),
        mid_block_type: Optional[str] = "UNetMidBlock2DCrossAttn",
        only_cross_attention=False,
        block_out_channels: tuple = (320, 640, 1280, 1280),
        layers_per_block: int = 2,
        downsample_padding: int = 1,
        mid_block_scale_factor: float = 1,
        act_fn: str = "silu",
        norm_num_groups: Optional[int] = 32,
        norm_eps: float = 1e-5,
        cross_attention_dim: int = 1280,
        transformer_layers_per_block=1,
        encoder_hid_dim: Optional[int] = None,
        encoder_hid_dim_type: Optional[str] = None,
        attention_head_dim=8,
        num_attention_heads=None,
        use_linear_projection: bool = False,
        class_embed_type: Optional[str] = None,
        addition_embed_type: Optional[str] = None,
        addition_time_embed_dim: Optional[int] = None,
        num_class_embeds: Optional[int] = None,
        upcast_attention: bool = False,
        resnet_time_scale_shift: str = "default",
        projection_class_embeddings_input_dim: Optional[int] = None,
        controlnet_conditioning_channel_order: str = "rgb",
        conditioning_embedding_out_channels: Optional[tuple] = (16, 32, 96, 256),
        global_pool_conditions: bool = False,
        addition_embed_type_num_heads: int = 64,
        use_vae_encode_condition: bool = True,
        condition_channels: int = 4,
    ):
        if not use_vae_encode_condition:
            raise ValueError("CCSRControlNetModel is the VAE-latent-condition ControlNet "
                             "(use_vae_encode_condition=True); use diffusers' ControlNetModel for pixel hints")
        super().__init__(
            in_channels=in_channels, conditioning_channels=conditioning_channels, flip_sin_to_cos=flip_sin_to_cos,
            freq_shift=freq_shift, down_block_types=down_block_types, mid_block_type=mid_block_type,
            only_cross_attention=only_cross_attention, block_out_channels=block_out_channels,
            layers_per_block=layers_per_block, downsample_padding=downsample_padding,
            mid_block_scale_factor=mid_block_scale_factor, act_fn=act_fn, norm_num_groups=norm_num_groups,
            norm_eps=norm_eps, cross_attention_dim=cross_attention_dim,
            transformer_layers_per_block=transformer_layers_per_block, encoder_hid_dim=encoder_hid_dim,
            encoder_hid_dim_type=encoder_hid_dim_type, attention_head_dim=attention_head_dim,
            num_attention_heads=num_attention_heads, use_linear_projection=use_linear_projection,
            class_embed_type=class_embed_type, addition_embed_type=addition_embed_type,
            addition_time_embed_dim=addition_time_embed_dim, num_class_embeds=num_class_embeds,
            upcast_attention=upcast_attention, resnet_time_scale_shift=resnet_time_scale_shift,
            projection_class_embeddings_input_dim=projection_class_embeddings_input_dim,
            controlnet_conditioning_channel_order=controlnet_conditioning_channel_order,
            conditioning_embedding_out_channels=conditioning_embedding_out_channels,
            global_pool_conditions=global_pool_conditions,
            addition_embed_type_num_heads=addition_embed_type_num_heads)
        # The pixel hint encoder is not part of this model: drop it and add the latent condition conv
        # (PyTorch's default init, as the official code; it is trained in the ControlNet pre-training stage).
        del self._modules["controlnet_cond_embedding"]
        self.condition_conv_in = torch.nn.Conv2d(condition_channels, block_out_channels[0], kernel_size=3,
                                                 padding=1)

    @property
    def controlnet_cond_embedding(self) -> torch.nn.Module:
        """diffusers' ``forward`` embeds the condition with ``controlnet_cond_embedding``: here that is
        ``condition_conv_in`` (one module, stored once under the official name)."""
        return self.condition_conv_in
