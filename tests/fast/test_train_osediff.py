"""OSEDiff training on a tiny random SD model (CPU): what trains, the fake-UNet adapter flag, the official
checkpoint layout, and loading the checkpoint into the inference pipeline."""

from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("accelerate")
pytest.importorskip("yaml")

from realisr.train.config import load_recipe  # noqa: E402

from helpers.onestep import golden_dir, one_thread, sd_dir  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
GOLDEN = golden_dir()
SD = sd_dir(GOLDEN)
STEPS = 2


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_thread():  # the shared 2-core box thrashes with more threads
        yield


def _recipe(tmp: Path, hq: Path, **over) -> dict:
    r = {
        "method": "osediff", "output_dir": str(tmp / "run"), "seed": 0,
        "model": {"pretrained": str(SD), "latent_sample": True, "gradient_checkpointing": True},
        "data": {"hq": [{"path": str(hq), "repeat": 2}], "crop_size": 64, "scale": 4, "degradation": "bicubic",
                 "batch_size": 1, "num_workers": 0},
        "train": {"max_steps": STEPS, "lr": 1e-3, "mixed_precision": "no", "checkpoint_every": 0, "log_every": 1},
        "loss": {"lpips": 0.0},
        "validation": {"every": STEPS, "num": 1},
    }
    for k, v in over.items():
        r[k] = {**r.get(k, {}), **v} if isinstance(v, dict) else v
    return r


def _photos(tmp: Path) -> Path:
    import skimage.data
    from PIL import Image

    folder = tmp / "hq"
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(skimage.data.coffee()).resize((100, 75), Image.BICUBIC).save(folder / "coffee.png")
    (tmp / "captions.txt").write_text("coffee.png\tcup, coffee, saucer\n")
    return folder


def _snapshot(trainer):
    return {f"{prefix}.{n}": p.detach().clone() for prefix, m in trainer.trainable.items()
            for n, p in m.named_parameters()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from realisr.train.trainer_osediff import OSEDiffTrainer

    tmp = tmp_path_factory.mktemp("osediff")
    hq = _photos(tmp)
    cfg = load_recipe(_recipe(tmp, hq, data={"captions": str(tmp / "captions.txt"), "null_text_ratio": 0.0}))
    trainer = OSEDiffTrainer(cfg)
    trainer.setup()
    before = _snapshot(trainer)
    summary = trainer.train()
    after = _snapshot(trainer)
    return {"trainer": trainer, "before": before, "after": after, "summary": summary, "tmp": tmp, "hq": hq}


def _changed(before, after, pred):
    keys = [k for k in before if pred(k)]
    assert keys, "no parameter matched"
    return [k for k in keys if not torch.equal(before[k], after[k])], keys


def test_generator_parts_train_and_frozen_parts_do_not(trained):
    b, a = trained["before"], trained["after"]
    changed, keys = _changed(b, a, lambda k: k.startswith("unet.") and ".lora_B." in k)
    assert len(changed) > 0.9 * len(keys)
    changed, keys = _changed(b, a, lambda k: k.startswith("unet.conv_in.base_layer."))
    assert len(changed) == 2  # conv_in weight and bias are fully trainable
    changed, keys = _changed(b, a, lambda k: k.startswith("vae.") and ".lora_B." in k)
    assert len(changed) > 0.9 * len(keys)  # VAE-encoder LoRA
    for k in b:
        frozen = (k.startswith("vae.decoder.") or (k.startswith("unet.") and "lora_" not in k
                  and not k.startswith("unet.conv_in.")) or (k.startswith("fake_unet.") and "lora_" not in k))
        if frozen:
            assert torch.equal(b[k], a[k]), k


def test_fake_unet_trains_all_its_adapters(trained):
    b, a = trained["before"], trained["after"]
    for group in ("encoder", "decoder", "others"):
        changed, keys = _changed(b, a, lambda k: k.startswith("fake_unet.") and f".lora_B.default_{group}." in k)
        assert len(changed) > 0.9 * len(keys), group
    logs = trained["trainer"]
    assert (trained["tmp"] / "run" / "validation" / f"step-{STEPS:06d}.png").is_file()
    assert logs.step == STEPS


def test_official_fake_unet_quirk_flag_and_init_checkpoint(trained, tmp_path):
    from realisr.models import lora
    from realisr.train.trainer_osediff import OSEDiffTrainer

    cfg = load_recipe(_recipe(tmp_path, trained["hq"], train={"max_steps": 1},
                              osediff={"fake_unet_adapters": "others"}, validation={"every": 0},
                              model={"init_checkpoint": str(GOLDEN / "osediff.pkl")}))
    trainer = OSEDiffTrainer(cfg)
    trainer.setup()
    # (also: the generator starts from the official checkpoint)
    fixture = torch.load(GOLDEN / "osediff.pkl", map_location="cpu", weights_only=True)
    for part, module in (("state_dict_unet", trainer.unet), ("state_dict_vae", trainer.vae)):
        own = dict(module.named_parameters())
        for k, v in fixture[part].items():
            assert torch.equal(own[k].detach(), v), k
    for _name, layer in lora.lora_layers(trainer.fake):
        assert list(layer.active_adapters) == ["default_others"]
    trainable = {n for n, p in trainer.fake.named_parameters() if p.requires_grad}
    assert trainable and all(".default_others." in n for n in trainable)
    opt_ids = {id(p) for g in trainer.optimizers["fake"].param_groups for p in g["params"]}
    assert opt_ids == {id(p) for p in trainer.fake.parameters() if p.requires_grad}


def test_checkpoint_official_layout_and_pipeline(trained):
    fixture = torch.load(GOLDEN / "osediff.pkl", map_location="cpu", weights_only=True)
    folder = Path(trained["summary"]["checkpoint"])
    ours = torch.load(folder / "osediff.pkl", map_location="cpu", weights_only=True)
    assert set(ours) == set(fixture)
    for k, v in fixture.items():
        if k.startswith("state_dict_"):
            assert set(ours[k]) == set(v), k
            for name, t in v.items():
                assert ours[k][name].shape == t.shape, name
        else:
            assert ours[k] == v, k  # module lists (VAE list with its 65 entries) and ranks
    assert "fake" not in str(list(ours["state_dict_unet"]))  # the regulariser is not part of the release format

    from realisr.pipelines.osediff.pipeline_osediff import OSEDiffPipeline
    from realisr.registry import get_spec

    trainer = trained["trainer"]
    pipe = OSEDiffPipeline.from_spec(get_spec("osediff"), device="cpu", dtype=torch.float32, sd=str(SD),
                                     checkpoint=folder / "osediff.safetensors")
    lq01 = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    gen = trainer.generator
    with torch.no_grad():
        z_train = gen.vae.encode(lq01 * 2 - 1).latent_dist.mode() * gen.scaling_factor
        emb = trainer.encode_prompts(["cup"])
        eps_train = gen.unet(z_train, torch.full((1,), 999), encoder_hidden_states=emb).sample
    z_pipe = pipe.encode(lq01)
    torch.testing.assert_close(z_pipe.float(), z_train.float(), rtol=1e-4, atol=1e-4)
    eps_pipe = pipe.predict(z_train, pipe.prompt_embeds("cup"))
    torch.testing.assert_close(eps_pipe.float(), eps_train.float(), rtol=1e-4, atol=1e-4)
