"""Build a CCSR-v1 (LDM / ControlLDM) state dict from diffusers modules, for the v1 conversion tests.

The key names are those of the original LDM code (``openaimodel.UNetModel``, ``ldm...model.Encoder/Decoder``,
DiffBIR's ``ControlNet`` with ``zero_convs`` and ``middle_block_out``), written here independently of the code
under test (which goes the other way, through diffusers' ``single_file_utils``): the inverse of the SD-2.x
naming as diffusers' ``convert_diffusers_to_original_stable_diffusion.py`` documents it. Only the SD layout is
covered: 4 levels, 2 layers per block, attention everywhere but the last down / first up level.
"""

from __future__ import annotations

_RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"), ("conv2", "out_layers.3"),
           ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection")]


def _unet_prefixes(levels: int = 4, layers: int = 2, up: bool = True) -> list[tuple[str, str]]:
    m = [("time_embedding.linear_1.", "time_embed.0."), ("time_embedding.linear_2.", "time_embed.2."),
         ("conv_in.", "input_blocks.0.0."), ("mid_block.attentions.0.", "middle_block.1.")]
    if up:
        m += [("conv_norm_out.", "out.0."), ("conv_out.", "out.2.")]
    for j in range(2):
        m.append((f"mid_block.resnets.{j}.", f"middle_block.{2 * j}."))
    for i in range(levels):
        for j in range(layers):
            m.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{3 * i + j + 1}.0."))
            if i < levels - 1:
                m.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{3 * i + j + 1}.1."))
        if i < levels - 1:
            m.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{3 * (i + 1)}.0.op."))
        if up:
            for j in range(layers + 1):
                m.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{3 * i + j}.0."))
                if i > 0:
                    m.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{3 * i + j}.1."))
            if i < levels - 1:
                m.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{3 * i + 2}.{1 if i == 0 else 2}."))
    return m


def _rename(name: str, prefixes, inner=()) -> str:
    for hf, ldm in prefixes:
        if name.startswith(hf):
            rest = name[len(hf):]
            for a, b in inner:
                if rest.startswith(a + "."):
                    rest = b + rest[len(a):]
                    break
            return ldm + rest
    raise KeyError(name)


def unet_to_ldm(state: dict, prefix: str = "model.diffusion_model.") -> dict:
    pre = _unet_prefixes()
    return {prefix + _rename(k, pre, _RESNET if ".resnets." in k else ()): v for k, v in state.items()}


def controlnet_to_ldm(state: dict, prefix: str = "control_model.") -> dict:
    """A CCSR-v2-style ControlNet state dict -> DiffBIR ``ControlNet`` keys; ``conv_in`` and
    ``condition_conv_in`` become one 8-channel first conv (biases summed)."""
    import torch

    pre = _unet_prefixes(up=False)
    out = {}
    for k, v in state.items():
        if k.startswith("condition_conv_in.") or k.startswith("conv_in."):
            continue
        if k.startswith("controlnet_down_blocks."):
            i, rest = k.split(".", 2)[1:]
            out[f"{prefix}zero_convs.{i}.0.{rest}"] = v
        elif k.startswith("controlnet_mid_block."):
            out[f"{prefix}middle_block_out.0.{k.split('.', 1)[1]}"] = v
        else:
            out[prefix + _rename(k, pre, _RESNET if ".resnets." in k else ())] = v
    out[prefix + "input_blocks.0.0.weight"] = torch.cat([state["conv_in.weight"], state["condition_conv_in.weight"]], 1)
    out[prefix + "input_blocks.0.0.bias"] = state["conv_in.bias"] + state["condition_conv_in.bias"]
    return out


def _vae_prefixes(part: str, levels: int = 4, layers: int = 2) -> list[tuple[str, str]]:
    m = [(f"{part}.conv_in.", f"{part}.conv_in."), (f"{part}.conv_out.", f"{part}.conv_out."),
         (f"{part}.conv_norm_out.", f"{part}.norm_out."), (f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.")]
    for j in range(2):
        m.append((f"{part}.mid_block.resnets.{j}.", f"{part}.mid.block_{j + 1}."))
    for i in range(levels):
        if part == "encoder":
            for j in range(layers):
                m.append((f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}."))
            if i < levels - 1:
                m.append((f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample."))
        else:
            for j in range(layers + 1):
                m.append((f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{levels - 1 - i}.block.{j}."))
            if i < levels - 1:
                m.append((f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{levels - 1 - i}.upsample."))
    return m


_VAE_ATTN = [("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")]


def vae_to_ldm(state: dict, part: str, prefix: str) -> dict:
    """``part`` = ``"encoder"`` (with ``quant_conv``) or ``"decoder"`` (with ``post_quant_conv``); the
    mid-block attention projections become 1x1 convolutions as in LDM."""
    pre = _vae_prefixes(part)
    extra = "quant_conv." if part == "encoder" else "post_quant_conv."
    out = {}
    for k, v in state.items():
        if k.startswith(extra):
            out[prefix + k] = v
            continue
        if not k.startswith(part + "."):
            continue
        inner = [("conv_shortcut", "nin_shortcut")] if ".resnets." in k else (_VAE_ATTN if "attentions" in k else ())
        name = _rename(k, pre, inner)
        if "mid.attn_1." in name and v.ndim == 2:
            v = v[:, :, None, None]
        out[prefix + name] = v
    return out


def ccsr_v1_state_dict(unet, controlnet, vae_cond, vae_decoder) -> dict:
    """The ``ControlLDM`` state dict of CCSR-v1 built from diffusers modules."""
    sd = {}
    sd.update(unet_to_ldm(unet.state_dict()))
    sd.update(controlnet_to_ldm(controlnet.state_dict()))
    sd.update(vae_to_ldm(vae_cond.state_dict(), "encoder", "cond_encoder."))
    sd.update(vae_to_ldm(vae_decoder.state_dict(), "decoder", "first_stage_model."))
    sd.update(vae_to_ldm(vae_decoder.state_dict(), "encoder", "first_stage_model."))
    return sd
