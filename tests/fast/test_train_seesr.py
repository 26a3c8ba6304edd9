"""SeeSR stage-2 training on the tiny random models (CPU): the loss against a hand computation, what trains,
the loss of a tiny run falling, the official checkpoint layout loading back into the pipeline, paired data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("accelerate")
pytest.importorskip("yaml")

from helpers.onestep import one_thread  # noqa: E402
from helpers.fixtures import FIXTURES, fixture_set, tiny_sd_dir  # noqa: E402

from realisr.train.config import load_recipe  # noqa: E402

ROOT = fixture_set("golden-seesr")
SD = tiny_sd_dir(ROOT)
STEPS = 12


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_thread():  # the shared 2-core box thrashes with more threads
        yield


def _photos(tmp: Path) -> Path:
    import skimage.data
    from PIL import Image

    folder = tmp / "hq"
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(skimage.data.coffee()).resize((100, 75), Image.BICUBIC).save(folder / "coffee.png")
    return folder


def _recipe(tmp: Path, hq: Path, **over) -> dict:
    r = {
        "method": "seesr", "output_dir": str(tmp / "run"), "seed": 0,
        "model": {"pretrained": str(SD), "latent_sample": True, "gradient_checkpointing": False},
        "data": {"hq": [{"path": str(hq), "repeat": 2}], "crop_size": 64, "scale": 4, "degradation": "bicubic",
                 "batch_size": 2, "num_workers": 0, "null_text_ratio": 0.5},
        "train": {"max_steps": STEPS, "lr": 1e-3, "mixed_precision": "no", "checkpoint_every": 0, "log_every": 1},
        "validation": {"every": STEPS, "num": 1},
        "seesr": {"tags": "ram", "tagger_root": str(ROOT / "ram"), "validation_steps": 2},
    }
    for k, v in over.items():
        r[k] = {**r.get(k, {}), **v} if isinstance(v, dict) else v
    return r


def _snapshot(trainer) -> dict:
    out = {f"{prefix}.{n}": p.detach().clone() for prefix, m in trainer.trainable.items()
           for n, p in m.named_parameters()}
    out.update({f"vae.{n}": p.detach().clone() for n, p in trainer.vae.named_parameters()})
    out.update({f"text_encoder.{n}": p.detach().clone() for n, p in trainer.text_encoder.named_parameters()})
    out.update({f"dape.{n}": p.detach().clone() for n, p in trainer.dape.model.named_parameters()})
    return out


def _fixed_batch(trainer):
    """A fixed evaluation batch: the first training crop, its LQ, text, soft prompt, z0, timesteps and noise."""
    g = torch.Generator().manual_seed(7)
    item = trainer.dataset[0]
    hq = item["hq"][None]
    lq = trainer.make_lq(hq, torch.Generator().manual_seed(1))
    with torch.no_grad():
        z0 = trainer.vae.encode(hq * 2 - 1).latent_dist.mode() * trainer.vae_scale
    n = 6
    return {"hq": hq.repeat(n, 1, 1, 1), "lq": lq.repeat(n, 1, 1, 1), "z0": z0.repeat(n, 1, 1, 1),
            "text": trainer.encode_prompts(["coffee"] * n), "soft": trainer.soft_prompt(lq).repeat(n, 1, 1),
            "t": torch.tensor([50, 200, 400, 600, 800, 950]), "noise": torch.randn(n, 4, 8, 8, generator=g)}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from realisr.cli.train import make_trainer
    from realisr.train.trainer_seesr import seesr_eps_loss

    tmp = tmp_path_factory.mktemp("seesr")
    cfg = load_recipe(_recipe(tmp, _photos(tmp)))
    trainer = make_trainer(cfg)
    trainer.setup()
    batch = _fixed_batch(trainer)

    def fixed_loss():
        with torch.no_grad():
            return seesr_eps_loss(trainer.model, batch["z0"], batch["text"], batch["lq"], batch["soft"],
                                  trainer.alphas_cumprod, timesteps=batch["t"], noise=batch["noise"]).item()

    before, loss_before = _snapshot(trainer), fixed_loss()
    summary = trainer.train()
    return {"trainer": trainer, "before": before, "after": _snapshot(trainer), "summary": summary, "tmp": tmp,
            "loss_before": loss_before, "loss_after": fixed_loss(), "batch": batch}


def test_loss_is_eps_mse_of_controlnet_plus_unet(trained):
    """The loss of the trainer equals a hand computation: noise the latent, ControlNet on (z_t, LQ, text,
    soft prompt), UNet with its residuals, MSE against the noise."""
    from realisr.train.trainer_seesr import seesr_eps_loss

    trainer, b = trained["trainer"], trained["batch"]
    a = trainer.alphas_cumprod[b["t"]].view(-1, 1, 1, 1)
    z_t = a.sqrt() * b["z0"] + (1 - a).sqrt() * b["noise"]
    with torch.no_grad():
        down, mid = trainer.controlnet(z_t, b["t"], b["text"], b["lq"], image_encoder_hidden_states=b["soft"],
                                       return_dict=False)
        eps = trainer.unet(z_t, b["t"], b["text"], image_encoder_hidden_states=b["soft"],
                           down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
        hand = ((eps - b["noise"]) ** 2).mean()
        loss = seesr_eps_loss(trainer.model, b["z0"], b["text"], b["lq"], b["soft"], trainer.alphas_cumprod,
                              timesteps=b["t"], noise=b["noise"])
    torch.testing.assert_close(loss, hand, rtol=1e-6, atol=1e-7)


def test_soft_prompt_is_dape_on_the_official_training_input(trained):
    import torch.nn.functional as F

    trainer, lq = trained["trainer"], trained["batch"]["lq"][:1]
    x = F.interpolate(lq, size=(384, 384), mode="bicubic", align_corners=False).clamp(0, 1)
    x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        ref = trainer.dape.model(x)["image_embeds"]
    torch.testing.assert_close(trainer.soft_prompt(lq), ref)


def test_only_the_controlnet_and_image_attentions_train(trained):
    b, a = trained["before"], trained["after"]
    changed = {k for k in b if not torch.equal(b[k], a[k])}
    image_attn = {k for k in b if k.startswith("unet.") and "image_attentions" in k}
    control = {k for k in b if k.startswith("controlnet.")}
    assert changed <= image_attn | control, sorted(changed - image_attn - control)[:3]
    assert len(changed & image_attn) > 0.9 * len(image_attn)
    assert len(changed & control) > 0.9 * len(control)
    # the optimiser holds exactly the trainable parameters
    trainer = trained["trainer"]
    opt_ids = {id(p) for g in trainer.optimizers["seesr"].param_groups for p in g["params"]}
    assert opt_ids == {id(p) for m in (trainer.unet, trainer.controlnet) for p in m.parameters() if p.requires_grad}


def test_a_tiny_run_lowers_the_loss(trained):
    # a fixed batch (timesteps, noise) evaluated before and after: 1.107 -> 0.959 measured
    assert trained["loss_after"] < 0.92 * trained["loss_before"], (trained["loss_before"], trained["loss_after"])
    logs = [json.loads(line) for line in (trained["tmp"] / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs if "loss" in r] == list(range(1, STEPS + 1))
    assert (trained["tmp"] / "run" / "validation" / f"step-{STEPS:06d}.png").is_file()


def test_checkpoint_is_the_official_layout_and_loads_into_the_pipeline(trained):
    import realisr

    folder = Path(trained["summary"]["checkpoint"]) / "seesr"
    for part, cls in (("unet", "UNet2DConditionModel"), ("controlnet", "ControlNetModel")):
        cfg = json.loads((folder / part / "config.json").read_text())
        assert cfg["_class_name"] == cls and cfg["use_image_cross_attention"] is True
        assert (folder / part / "diffusion_pytorch_model.safetensors").is_file()
    trainer = trained["trainer"]
    pipe = realisr.load_pipeline("seesr", device="cpu", dtype="fp32", sd=str(SD), seesr=str(folder),
                                 tagger_root=str(ROOT / "ram"))
    for ours, theirs in ((pipe.unet, trainer.unet), (pipe.controlnet, trainer.controlnet)):
        ref = theirs.state_dict()
        got = ours.state_dict()
        assert set(got) == set(ref)
        assert all(torch.equal(got[k], ref[k].float()) for k in ref)
    out = pipe(trained["batch"]["hq"][0], steps=1, process_size=64, generator=torch.Generator().manual_seed(0))
    assert out.pixels.shape == (256, 256, 3)
    # and training can start from it again (model.init_checkpoint), as from the released weights
    from realisr.cli.train import make_trainer

    cfg = load_recipe(_recipe(trained["tmp"], trained["tmp"] / "hq", output_dir=str(trained["tmp"] / "run2"),
                              model={"init_checkpoint": str(folder)}, train={"max_steps": 1},
                              validation={"every": 0}))
    again = make_trainer(cfg)
    again.setup()
    assert all(torch.equal(again.controlnet.state_dict()[k], v) for k, v in trainer.controlnet.state_dict().items())


def test_paired_files_match_by_name_sorted(tmp_path):
    from PIL import Image

    from realisr.train.data import DataError, PairedSRDataset, paired_files

    root = tmp_path / "pairs"
    for sub in ("gt", "sr_bicubic", "tag"):
        (root / sub).mkdir(parents=True)
    # written in an order a file system may well return: the pairing must not depend on it
    for name in ("b", "a", "c"):
        Image.new("RGB", (16, 16), (ord(name), 0, 0)).save(root / "gt" / f"{name}.png")
        Image.new("RGB", (16, 16), (0, ord(name), 0)).save(root / "sr_bicubic" / f"{name}.png")
        (root / "tag" / f"{name}.txt").write_text(f"tag {name}")
    pairs = paired_files([root])
    assert [p[0].stem for p in pairs] == ["a", "b", "c"]
    assert all(p[0].stem == p[1].stem == p[2].stem for p in pairs)
    item = PairedSRDataset(pairs)[1]
    assert item["caption"] == "tag b" and int(item["hq"][0, 0, 0] * 255) == ord("b")
    assert int(item["lq"][1, 0, 0] * 255) == ord("b")
    (root / "sr_bicubic" / "c.png").unlink()
    with pytest.raises(DataError, match=r"gt/c has no partner in sr_bicubic/"):
        paired_files([root])


def test_builtin_recipes_hold_the_official_settings():
    cfg = load_recipe("seesr")
    assert cfg.method == "seesr" and cfg.model.pretrained == "stabilityai/stable-diffusion-2-base"
    assert (cfg.train.lr, cfg.train.weight_decay, cfg.train.max_grad_norm) == (5e-5, 1e-2, 1.0)
    assert cfg.data.batch_size * cfg.train.gradient_accumulation_steps * 8 == 192
    assert cfg.data.null_text_ratio == 0.5 and cfg.train.max_steps == 150000
    tiny = load_recipe("tiny-cpu-seesr")
    assert (FIXTURES.parent.parent / tiny.model.pretrained).is_dir()
    assert (FIXTURES.parent.parent / tiny.seesr.tagger_root).is_dir()
