"""CCSR-v1: conversion of the released ``real-world_ccsr.ckpt`` layout (a PyTorch-Lightning ``ControlLDM`` state
dict) into the v2 release layout, safe loading, and the v1 sampler through the public pipeline.

No official v1 fixture exists: the checkpoint here is a tiny one in the v1 key layout, built from diffusers
modules by ``tests/helpers/ldm_layout.py`` (independent of the converter), so the expected tensors are the
modules it was built from.
"""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch

from helpers import ccsr as H
from helpers.ldm_layout import ccsr_v1_state_dict
from helpers.onestep import one_thread

ROOT = H.ccsr_dir()


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_thread():  # the shared 2-core box thrashes with more threads
        yield


@pytest.fixture(scope="module")
def parts():
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from realisr.arch.ccsr_controlnet_arch import CCSRControlNetModel

    sd = H.tiny_sd_dir(ROOT)
    unet = UNet2DConditionModel.from_pretrained(str(sd), subfolder="unet")
    with torch.no_grad():  # a v1 UNet that is not SD's, so that taking it from the file is visible
        for p in unet.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    ctrl = CCSRControlNetModel.from_pretrained(str(H.weights_dir(ROOT) / "controlnet"))
    with torch.no_grad():
        ctrl.condition_conv_in.bias.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    cond_vae = AutoencoderKL.from_pretrained(str(sd), subfolder="vae")
    dec_vae = AutoencoderKL.from_pretrained(str(H.weights_dir(ROOT) / "vae"))
    return unet.eval(), ctrl.eval(), cond_vae.eval(), dec_vae.eval()


@pytest.fixture(scope="module")
def converted(parts, tmp_path_factory):
    from realisr.cli.main import main

    tmp = tmp_path_factory.mktemp("v1")
    state = ccsr_v1_state_dict(*parts)
    state["cond_stage_model.model.token_embedding.weight"] = torch.zeros(4, 2)  # present in the real file
    ckpt = tmp / "real-world_ccsr.ckpt"
    torch.save({"state_dict": state, "global_step": 25001, "epoch": 3}, ckpt)  # the Lightning layout
    out = tmp / "ccsr-v1"
    assert main(["convert", str(ckpt), str(out), "--sd", str(H.tiny_sd_dir(ROOT))]) == 0
    return out


def test_conversion_gives_back_every_tensor(parts, converted):
    from realisr.weights.ccsr import load_ccsr_weights, missing_release_parts

    unet, ctrl, cond_vae, dec_vae = parts
    assert missing_release_parts(converted, "v1") == []
    w = load_ccsr_weights(converted)
    assert w.version == "v1"
    for k, v in unet.state_dict().items():
        torch.testing.assert_close(w.unet.state_dict()[k], v, rtol=0, atol=0, msg=k)
    vs = w.vae.state_dict()
    for k, v in cond_vae.state_dict().items():
        if k.startswith(("encoder.", "quant_conv.")):
            torch.testing.assert_close(vs[k], v, rtol=0, atol=0, msg=k)
    for k, v in dec_vae.state_dict().items():
        if k.startswith(("decoder.", "post_quant_conv.")):
            torch.testing.assert_close(vs[k], v, rtol=0, atol=0, msg=k)
    cs = w.controlnet.state_dict()
    for k, v in ctrl.state_dict().items():
        if k not in ("conv_in.bias", "condition_conv_in.bias"):
            torch.testing.assert_close(cs[k], v, rtol=0, atol=0, msg=k)
    # v1's single 8-channel first conv: its bias goes to conv_in, condition_conv_in gets none
    torch.testing.assert_close(cs["conv_in.bias"], ctrl.state_dict()["conv_in.bias"] + ctrl.state_dict()["condition_conv_in.bias"])
    assert not cs["condition_conv_in.bias"].any()


def test_converted_controlnet_computes_the_v1_concat_conv(parts, converted):
    """conv(cat(x_t, c)) == conv_in(x_t) + condition_conv_in(c): the converted ControlNet gives the original one's
    residuals."""
    from realisr.weights.ccsr import load_ccsr_weights

    ctrl = parts[1]
    w = load_ccsr_weights(converted)
    g = torch.Generator().manual_seed(0)
    x, c, e = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    t = torch.tensor([658, 341])
    with torch.no_grad():
        d0, m0 = ctrl(x, t, encoder_hidden_states=e, controlnet_cond=c, return_dict=False)
        d1, m1 = w.controlnet(x, t, encoder_hidden_states=e, controlnet_cond=c, return_dict=False)
    for a, b in zip(list(d0) + [m0], list(d1) + [m1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_v1_sampler_through_the_public_pipeline(converted):
    import realisr

    pipe = realisr.load_pipeline(str(converted), device="cpu", sd=str(H.tiny_sd_dir(ROOT)))
    assert pipe.spec.id == "ccsr-v1" and pipe.version == "v1"
    ts = []
    hook = pipe.unet.register_forward_pre_hook(lambda m, a: ts.append(int(torch.as_tensor(a[1]).flatten()[0])))
    try:
        x = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
        out = pipe(x, process_size=64, generator=torch.Generator().manual_seed(0), keep_intermediates=True)
    finally:
        hook.remove()
    assert out.pixels.shape == (64, 64, 3) and np.isfinite(out.pixels).all()
    assert out.info["network_evaluations"] == 16 == len(ts)
    assert ts[0] == 999 and ts[1] == 658 and ts[-1] == 341
    it = out.extras["intermediates"]
    np.testing.assert_array_equal(it["z_T"].numpy(), it["noise.start"].numpy())  # pure-noise start
    assert "vae_enc.noise" not in it  # the condition is the posterior mode
    np.testing.assert_allclose(it["vae_enc.sample"].numpy(), it["vae_enc.mean"].numpy())
    assert out.info["prompt"] == "" and out.info["guidance_scale"] == 1.0
    with pytest.raises(ValueError, match="preset"):
        pipe(x, preset="two-step", process_size=64)


def test_checkpoints_that_need_code_or_are_not_v1_are_refused(tmp_path):
    from realisr.errors import CheckpointError, UnsupportedFormatError
    from realisr.weights.ccsr import convert_v1_checkpoint, read_v1_checkpoint

    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hparams": argparse.Namespace(lr=1)}, evil)
    with pytest.raises(CheckpointError, match="cannot be loaded safely"):
        read_v1_checkpoint(evil)
    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.x": torch.zeros(1)}}, other)
    with pytest.raises(CheckpointError, match="not a CCSR-v1 checkpoint"):
        read_v1_checkpoint(other)
    from realisr.cli.main import main

    assert main(["convert", str(other), str(tmp_path / "x.safetensors")]) == 1
    with pytest.raises(UnsupportedFormatError):
        from realisr.cli.convert import _convert_ccsr_v1

        _convert_ccsr_v1(other, tmp_path / "x.safetensors", None)
    with pytest.raises(CheckpointError):
        convert_v1_checkpoint(other, tmp_path / "out")


def test_configs_that_do_not_fit_are_a_one_line_error(parts):
    from realisr.errors import CheckpointError
    from realisr.weights.ccsr import SD21_VAE_CONFIG, convert_v1_state_dict

    state = ccsr_v1_state_dict(*parts)
    with pytest.raises(CheckpointError) as e:
        convert_v1_state_dict(state, dict(parts[0].config), SD21_VAE_CONFIG)  # the tiny VAE is not SD's
    assert "VAE" in str(e.value) and "\n" not in str(e.value)
