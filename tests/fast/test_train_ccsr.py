"""CCSR-v2 training: each loss against a hand computation, the projected discriminator and the DINO layout,
and tiny CPU runs of the three stages on the tiny SD model (the ControlNet stages learn, stage 2 changes only
the VAE decoder, checkpoints are release folders that load into the pipeline)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("accelerate")
pytest.importorskip("timm")

from helpers import ccsr as H  # noqa: E402
from helpers.onestep import golden_dir, one_thread, sd_dir  # noqa: E402
from helpers.training import photo_dir as _photo_dir, stand_in_vgg as _stand_in_vgg  # noqa: E402

SD = sd_dir(golden_dir())
HAVE_LPIPS = importlib.util.find_spec("lpips") is not None
ACP = torch.linspace(0.9991, 0.0047, 1000, dtype=torch.float32)  # a stand-in cumulative-alpha table


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_thread():  # the shared 2-core box thrashes with more threads
        yield


# -- losses, by hand ------------------------------------------------------------------------------------------------
def test_stage1_losses_by_hand():
    """A linear stand-in network eps = w * z_t (w a learnable scalar): the three losses and the gradient of
    l_x0tau, which flows through x0_T into the re-noised latent (no detach), against float64 formulas."""
    from realisr.train.ccsr_losses import stage1_losses

    g = torch.Generator().manual_seed(0)
    z_gt, z_st, n0, n1, n2 = (torch.randn(2, 4, 3, 3, generator=g, dtype=torch.float64).float() for _ in range(5))
    t_ori = torch.tensor([10, 500])
    w = torch.tensor(0.3, requires_grad=True)
    out = stage1_losses(lambda z, t: w * z, z_gt, z_st, ACP, t_ori=t_ori, noise_ori=n0, noise_T=n1, noise_tau=n2,
                        t_tau=667, t_start=999)

    def by_hand(wv: float):
        a = ACP.double().numpy()
        zg, zs, e0, e1, e2 = (x.double().numpy() for x in (z_gt, z_st, n0, n1, n2))
        at = a[t_ori.numpy()].reshape(2, 1, 1, 1)
        zt = np.sqrt(at) * zg + np.sqrt(1 - at) * e0
        ori = np.mean((wv * zt - e0) ** 2)
        aT, au = a[999], a[667]
        xT = np.sqrt(aT) * zs + np.sqrt(1 - aT) * e1
        x0T = (xT - np.sqrt(1 - aT) * wv * xT) / np.sqrt(aT)
        xu = np.sqrt(au) * x0T + np.sqrt(1 - au) * e2
        x0u = (xu - np.sqrt(1 - au) * wv * xu) / np.sqrt(au)
        return ori, np.mean((x0T - zg) ** 2), np.mean((x0u - zg) ** 2)

    ori, lT, lu = by_hand(0.3)
    assert out["ori"].item() == pytest.approx(ori, rel=1e-5)
    assert out["x0T"].item() == pytest.approx(lT, rel=1e-5)
    assert out["x0tau"].item() == pytest.approx(lu, rel=1e-5)
    out["x0tau"].backward()
    h = 1e-5
    numeric = (by_hand(0.3 + h)[2] - by_hand(0.3 - h)[2]) / (2 * h)
    assert w.grad.item() == pytest.approx(numeric, rel=1e-3)


def test_eps_hinge_and_adversarial_losses_by_hand():
    from realisr.train.ccsr_losses import eps_loss, generator_adv_loss, hinge_d_loss

    z = torch.ones(1, 1, 1, 2)
    noise = torch.tensor([[[[0.5, -1.0]]]])
    t = torch.tensor([999])
    # net returns 0: the loss is mean(noise^2) = (0.25 + 1) / 2
    assert eps_loss(lambda zt, tt: torch.zeros_like(zt), z, ACP, t, noise).item() == pytest.approx(0.625)
    real = torch.tensor([0.5, 2.0, -1.0])
    fake = torch.tensor([-2.0, 0.3])
    # relu(1 - real) = [0.5, 0, 2] -> 2.5/3; relu(1 + fake) = [0, 1.3] -> 0.65
    assert hinge_d_loss(real, fake, 0.5).item() == pytest.approx(0.5 * (2.5 / 3 + 0.65))
    assert generator_adv_loss(fake).item() == pytest.approx(0.85)


def test_discriminator_input_augmentation():
    from realisr.train.ccsr_losses import IMAGENET_MEAN, IMAGENET_STD, diff_augment, disc_input

    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.equal(diff_augment(x, translation=0.0, cutout=0.0), x)
    cut = diff_augment(torch.ones(1, 3, 16, 16), torch.Generator().manual_seed(0), translation=0.0, cutout=0.5)
    zeros = int((cut[0, 0] == 0).sum())
    assert 0 < zeros <= 9 * 9  # one square of about half the side (clipped at the border)
    shifted = diff_augment(torch.ones(4, 1, 16, 16), torch.Generator().manual_seed(1), translation=0.25, cutout=0.0)
    assert ((shifted == 0) | (shifted == 1)).all() and (shifted == 0).any()  # zero-filled shifts
    y = disc_input(torch.zeros(1, 3, 8, 8), 4, augment=False)  # grey 0 -> 0.5 in [0, 1], normalised
    expect = (0.5 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(y[0, :, 0, 0], expect)
    assert y.shape == (1, 3, 4, 4)


# -- discriminator and DINO --------------------------------------------------------------------------------------------
def test_projected_discriminator_heads_train_backbone_frozen():
    from realisr.arch.projected_discriminator_arch import ProjectedDiscriminator
    from realisr.weights.dino import tiny_vit

    backbone = tiny_vit(seed=3)
    d = ProjectedDiscriminator(backbone, hooks=[1, 3], c_dim=8, cmap_dim=4).train()
    x = torch.randn(2, 3, 32, 32)
    c = torch.randn(2, 8)
    out = d(x, c)
    assert out.shape == (2, 3 * 16)  # 3 features (patch embedding + 2 blocks) x 16 patch tokens
    assert not torch.allclose(out, d(x, torch.randn(2, 8)))  # the projection uses the condition
    out.mean().backward()
    assert all(p.grad is None for p in backbone.parameters()) and not backbone.training
    assert all(p.grad is not None for p in d.heads.parameters() if p.requires_grad)
    assert any("parametrizations.weight" in n for n, _ in d.heads.named_parameters())  # spectral norm


# The official key names (facebookresearch/dino vision_transformer.py, facebookresearch/dinov2), per block.
_DINO_KEYS = ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias"]
_DINO_BLOCK = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
               "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"]


def test_timm_vits_have_the_official_dino_layouts(tmp_path):
    from realisr.errors import CheckpointError, WeightsNotFoundError
    from realisr.weights.dino import DINO_FILE, dino_vits16, dinov2_vits14, find_dino_file, load_vit_state_dict

    v1 = dino_vits16()
    official_v1 = set(_DINO_KEYS) | {f"blocks.{i}.{k}" for i in range(12) for k in _DINO_BLOCK}
    assert set(v1.state_dict()) == official_v1
    assert tuple(v1.state_dict()["pos_embed"].shape) == (1, 197, 384)
    v2 = dinov2_vits14()
    official_v2 = official_v1 | {f"blocks.{i}.ls{j}.gamma" for i in range(12) for j in (1, 2)}
    assert set(v2.state_dict()) == official_v2 and tuple(v2.state_dict()["pos_embed"].shape) == (1, 1370, 384)
    # an official-layout file (with DINOv2's unused mask_token) loads strictly; another file is refused
    sd = {k: torch.randn(v.shape) for k, v in v2.state_dict().items()}
    sd["mask_token"] = torch.zeros(1, 384)
    torch.save(sd, tmp_path / "v2.pth")
    load_vit_state_dict(v2, tmp_path / "v2.pth")
    torch.testing.assert_close(v2.state_dict()["blocks.3.ls1.gamma"], sd["blocks.3.ls1.gamma"])
    with pytest.raises(CheckpointError) as e:
        load_vit_state_dict(v1, tmp_path / "v2.pth")  # v2 tensors in the v1 model
    assert "\n" not in str(e.value)
    with pytest.raises(WeightsNotFoundError, match=DINO_FILE):
        find_dino_file(DINO_FILE)


# -- tiny runs -----------------------------------------------------------------------------------------------------------
def _fixed_stage1_loss(trainer) -> float:
    """Stage 1's loss on a fixed batch with fixed noise (the training image, seeded degradation and draws)."""
    from realisr.train.ccsr_losses import stage1_losses
    from realisr.train.data import to_model_range

    g = torch.Generator().manual_seed(123)
    hq = torch.stack([trainer.dataset[0]["hq"]] * 2)
    lq = trainer.lq_maker(hq, generator=g)
    net = trainer.accelerator.unwrap_model(trainer.net)
    with torch.no_grad():
        z = [trainer.vae.encode(to_model_range(x)).latent_dist.mode() * trainer.vae_scale for x in (hq, lq)]
        emb = trainer.encode_prompts([""] * 2)
        noise = [torch.randn(z[0].shape, generator=g) for _ in range(3)]
        parts = stage1_losses(lambda zt, t: net(zt, t, emb, z[1]), z[0], z[0], trainer.alphas_cumprod,
                              t_ori=torch.tensor([100, 400]), noise_ori=noise[0], noise_T=noise[1],
                              noise_tau=noise[2], t_tau=667)
    return float(sum(v.item() for v in parts.values()))


def _run(tmp: Path, stage: str, steps: int, probe=None, **extra):
    from realisr.train.config import load_recipe
    from realisr.train.trainer_ccsr import CCSRTrainer

    hq = _photo_dir(tmp)
    over = [f"data.hq=[{{path: {hq}, repeat: 2}}]", f"output_dir={tmp / stage}", f"ccsr.stage={stage}",
            f"model.pretrained={SD}", f"train.max_steps={steps}", "validation.every=0", f"train.checkpoint_every={steps}",
            "data.batch_size=1", "data.hflip=false", "data.degradation=bicubic"]
    over += [f"{k}={v}" for k, v in extra.items()]
    trainer = CCSRTrainer(load_recipe("ccsr-tiny-cpu", over))
    trainer.setup()
    before = {f"{p}.{n}": t.detach().clone() for p, m in (("unet", trainer.unet), ("controlnet", trainer.controlnet),
                                                         ("vae", trainer.vae)) for n, t in m.state_dict().items()}
    probes = [probe(trainer)] if probe else []
    summary = trainer.train()
    probes += [probe(trainer)] if probe else []
    after = {f"{p}.{n}": t.detach().clone() for p, m in (("unet", trainer.unet), ("controlnet", trainer.controlnet),
                                                        ("vae", trainer.vae)) for n, t in m.state_dict().items()}
    logs = [json.loads(x) for x in (tmp / stage / "metrics.jsonl").read_text().splitlines()]
    if probe:
        logs.append({"probes": probes})
    return trainer, summary, before, after, logs


def _changed(before, after, prefix=""):
    return sorted(k for k in before if k.startswith(prefix) and not torch.equal(before[k], after[k]))


def test_stage1_learns_only_the_controlnet_and_loads_into_the_pipeline(tmp_path):
    import realisr

    trainer, summary, before, after, logs = _run(tmp_path, "stage1", 8, probe=_fixed_stage1_loss,
                                                 **{"train.lr": "1e-2"})
    first, last = logs.pop()["probes"]
    assert len(logs) == 8 and {"ori", "x0T", "x0tau", "loss"} <= set(logs[0])
    assert last < 0.9 * first, (first, last)  # the tiny run's loss falls (fixed batch and noise)
    changed = _changed(before, after)
    assert changed and all(k.startswith("controlnet.") for k in changed)
    assert len(changed) > 0.5 * sum(k.startswith("controlnet.") for k in before)
    ckpt = Path(summary["checkpoint"])
    pipe = realisr.load_pipeline(str(ckpt), device="cpu", sd=str(SD))
    assert pipe.spec.id == "ccsr"
    for k, v in pipe.controlnet.state_dict().items():
        torch.testing.assert_close(v, after[f"controlnet.{k}"], rtol=0, atol=0)
    cfg = json.loads((ckpt / "controlnet" / "config.json").read_text())
    assert cfg["_class_name"] == "ControlNetModel" and cfg["use_vae_encode_condition"]
    out = pipe(np.full((16, 16, 3), 100, np.uint8), process_size=64)
    assert out.pixels.shape == (64, 64, 3)


def test_controlnet_pretraining_starts_from_the_unet(tmp_path):
    trainer, summary, before, after, logs = _run(tmp_path, "controlnet", 2)
    unet = trainer.unet.state_dict()
    for k in ("conv_in.weight", "down_blocks.0.resnets.0.conv1.weight", "mid_block.resnets.0.conv1.weight"):
        torch.testing.assert_close(before[f"controlnet.{k}"], unet[k])  # from_unet copies
    assert all(k.startswith("controlnet.") for k in _changed(before, after))
    assert all(math.isfinite(m["eps"]) for m in logs) and (Path(summary["checkpoint"]) / "vae").is_dir()


def test_stage2_changes_only_decoder_tensors(tmp_path):
    import realisr

    extra = {"model.init_checkpoint": str(H.weights_dir()), "ccsr.begin_disc": 1, "train.lr": "1e-3"}
    if HAVE_LPIPS:
        extra.update({"loss.lpips": 1.0, "loss.lpips_vgg_weights": str(_stand_in_vgg(tmp_path))})
    trainer, summary, before, after, logs = _run(tmp_path, "stage2", 3, **extra)
    # initialised from the release folder: its ControlNet, its VAE
    init = realisr.load_pipeline(str(H.weights_dir()), device="cpu", sd=str(SD))
    for k, v in init.controlnet.state_dict().items():
        torch.testing.assert_close(after[f"controlnet.{k}"], v, rtol=0, atol=0)
    changed = _changed(before, after)
    assert changed and all(k.startswith("vae.decoder.") for k in changed), changed[:5]
    assert len(changed) > 0.5 * sum(k.startswith("vae.decoder.") for k in before)
    assert "g_adv" not in logs[0] and "g_adv" in logs[1] and "d_hinge" in logs[2]  # GAN from begin_disc
    assert ("lpips" in logs[2]) == HAVE_LPIPS
    pipe = realisr.load_pipeline(summary["checkpoint"], device="cpu", sd=str(SD))
    for k, v in pipe.vae.state_dict().items():
        torch.testing.assert_close(v, after[f"vae.{k}"], rtol=0, atol=0)


def test_stage2_needs_the_dino_files(tmp_path):
    from realisr.errors import WeightsNotFoundError
    from realisr.train.config import load_recipe
    from realisr.train.trainer_ccsr import CCSRTrainer

    cfg = load_recipe("ccsr-stage2", [f"data.hq=[{tmp_path}]", f"output_dir={tmp_path / 'o'}", "loss.lpips=0"])
    with pytest.raises(WeightsNotFoundError, match="dino_deitsmall16_pretrain.pth"):
        CCSRTrainer(cfg).setup()


def test_recipes_hold_the_official_settings():
    from realisr.train.config import RecipeError, load_recipe

    s1 = load_recipe("ccsr")
    assert (s1.ccsr.stage, s1.train.lr, s1.train.max_steps, s1.train.gradient_accumulation_steps) == ("stage1", 5e-5, 20000, 6)
    assert s1.data.degradation == "ccsr" and s1.ccsr.t_max == 0.6667 and not s1.ccsr.is_start_lr
    c = load_recipe("ccsr-controlnet")
    assert (c.ccsr.stage, c.train.lr, c.train.max_steps) == ("controlnet", 5e-5, 40000)
    s2 = load_recipe("ccsr-stage2")
    assert (s2.ccsr.stage, s2.train.lr, s2.ccsr.disc_lr, s2.train.max_steps) == ("stage2", 5e-6, 5e-6, 2000)
    assert (s2.loss.l2, s2.loss.lpips, s2.ccsr.disc_weight, s2.ccsr.disc_train_weight, s2.ccsr.begin_disc) == \
        (1.0, 1.0, 0.05, 0.5, 100)
    assert (s2.data.batch_size, s2.train.gradient_accumulation_steps) == (2, 8)
    with pytest.raises(RecipeError, match="ccsr.stage"):
        load_recipe("ccsr", ["ccsr.stage=stage3"])


def test_cli_train_knows_the_ccsr_recipes(capsys):
    from realisr.cli.main import main

    assert main(["train", "ccsr-stage2", "--print-recipe", "--set", "ccsr.begin_disc=7"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["method"] == "ccsr" and r["ccsr"]["stage"] == "stage2" and r["ccsr"]["begin_disc"] == 7
