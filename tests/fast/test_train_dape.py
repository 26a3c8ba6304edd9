"""DAPE training (SeeSR stage 1) on the tiny random RAM of the golden-seesr fixtures (CPU): the losses against
hand computations, the official learning-rate schedule, that only the LoRA trains, that the eval loss falls,
and that the checkpoint is the official DAPE.pth layout and loads back into the tagger."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("accelerate")
pytest.importorskip("yaml")

from helpers.fixtures import fixture_set  # noqa: E402

RAM_DIR = fixture_set("golden-seesr") / "ram"


def test_losses_match_hand_computation():
    from realisr.train.trainer_dape import feature_loss, soft_label_bce

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2, 5, 7)), rng.normal(size=(2, 5, 7))
    assert abs(float(feature_loss(torch.tensor(a), torch.tensor(b))) - ((a - b) ** 2).mean()) < 1e-6
    s, t = rng.normal(size=(3, 11)) * 3, rng.normal(size=(3, 11)) * 3
    q, p = 1 / (1 + np.exp(-s)), 1 / (1 + np.exp(-t))
    official = -(p * np.log(q) + (1 - p) * np.log(1 - q)).mean()  # DAPEModel.optimize_parameters
    assert abs(float(soft_label_bce(torch.tensor(s), torch.tensor(t))) - official) < 1e-5
    # saturated logits: finite where the official log(sigmoid) gives inf
    assert math.isfinite(float(soft_label_bce(torch.tensor([[200.0, -200.0]]), torch.tensor([[-200.0, 200.0]]))))


def test_learning_rate_schedule_is_basicsr_multistep_with_warmup():
    from realisr.train.trainer_dape import lr_factor

    m = [20000, 30000]
    assert lr_factor(1, 50, m, 0.5) == 1 / 50
    assert lr_factor(49, 50, m, 0.5) == 49 / 50
    assert [lr_factor(i, 50, m, 0.5) for i in (50, 19999, 20000, 29999, 30000, 10 ** 6)] == \
        [1, 1, 0.5, 0.5, 0.25, 0.25]
    assert lr_factor(1, 0, m, 0.5) == 1


def test_official_recipe_values():
    from realisr.train.config import load_recipe

    cfg = load_recipe("dape")
    assert cfg.method == "dape" and cfg.seed == 10
    assert (cfg.train.lr, cfg.train.weight_decay, cfg.train.adam_betas, cfg.data.batch_size) == (1e-4, 0.0, [0.9, 0.999], 8)
    assert (cfg.dape.lora_rank, cfg.dape.lora_alpha, cfg.dape.lr_milestones, cfg.dape.lr_gamma,
            cfg.dape.warmup_steps, cfg.dape.image_size) == (8, 1.0, [20000, 30000], 0.5, 50, 512)
    assert cfg.train.mixed_precision == "no" and cfg.train.max_grad_norm == 0


def test_paired_layout_pairs_by_name(tmp_path):
    from PIL import Image

    from realisr.train.dape_dataset import DAPEPairedDataset
    from realisr.train.data import DataError

    for sub in ("gt", "sr_bicubic"):
        (tmp_path / sub).mkdir()
    for i, name in enumerate(("b.png", "a.png")):
        Image.new("RGB", (40, 30), (i * 100, 0, 0)).save(tmp_path / "gt" / name)
        Image.new("RGB", (40, 30), (i * 100, 50, 0)).save(tmp_path / "sr_bicubic" / name)
    ds = DAPEPairedDataset([str(tmp_path)], image_size=16)
    assert [p[0].name for p in ds.pairs] == ["a.png", "b.png"]
    item = ds[0]
    assert item["hq"].shape == item["lq"].shape == (3, 16, 16)
    assert abs(float(item["hq"][0].mean()) - 100 / 255) < 1e-6 and abs(float(item["lq"][1].mean()) - 50 / 255) < 1e-6
    (tmp_path / "sr_bicubic" / "a.png").rename(tmp_path / "sr_bicubic" / "c.png")
    with pytest.raises(DataError, match="pair by name"):
        DAPEPairedDataset([str(tmp_path)])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    import skimage.data
    from PIL import Image

    from realisr.cli.train import make_trainer
    from realisr.train.config import load_recipe

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("dape")
    hq = tmp / "hq"
    hq.mkdir()
    for name in ("coffee", "chelsea"):
        Image.fromarray(getattr(skimage.data, name)()).resize((96, 96), Image.BICUBIC).save(hq / f"{name}.png")
    # full batch, no stochastic depth / dropout: the objective itself must fall, without sampling noise
    cfg = load_recipe("dape-tiny-cpu", [f"data.hq=[{hq}]", f"dape.ram_dir={RAM_DIR}", f"output_dir={tmp / 'run'}",
                                        "train.max_steps=8", "train.lr=1e-2", "train.checkpoint_every=0",
                                        "data.batch_size=2", "dape.drop_path_rate=0", "dape.dropout=0",
                                        "validation.every=0", "validation.num=2"])
    trainer = make_trainer(cfg)
    trainer.setup()
    first = trainer.validate()
    student = trainer.accelerator.unwrap_model(trainer.student)
    before = {k: v.detach().clone() for k, v in student.state_dict().items()}
    teacher_before = {k: v.detach().clone() for k, v in trainer.teacher.state_dict().items()}
    summary = trainer.train()
    last = trainer.validate()
    torch.set_num_threads(n)
    return {"trainer": trainer, "before": before, "teacher_before": teacher_before, "summary": summary,
            "first": first, "last": last, "tmp": tmp}


def test_only_lora_parameters_change(trained):
    trainer = trained["trainer"]
    student = trainer.accelerator.unwrap_model(trainer.student)
    after = student.state_dict()
    changed = {k for k, v in after.items() if not torch.equal(v, trained["before"][k])}
    assert changed and all("lora_" in k for k in changed)
    assert {k for k in after if "lora_B" in k} <= changed  # every B left zero
    assert all(torch.equal(v, trained["teacher_before"][k]) for k, v in trainer.teacher.state_dict().items())
    assert not any(p.requires_grad for n, p in student.named_parameters() if "lora_" not in n)


def test_eval_loss_falls(trained):
    first, last = trained["first"], trained["last"]
    assert first is not None and last is not None
    for k in ("val_loss", "val_l_fea", "val_l_logits"):
        assert last[k] < first[k], k
    logs = [json.loads(x) for x in (trained["tmp"] / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in logs if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 9))
    assert steps[-1]["loss"] < steps[0]["loss"]


def test_checkpoint_is_official_dape_layout_and_loads_into_the_tagger(trained):
    from PIL import Image

    from realisr.tagging import load_tagger

    ckpt = next((trained["tmp"] / "run" / "checkpoints").glob("step-*/DAPE.pth"))
    sd = torch.load(ckpt, map_location="cpu", weights_only=True)
    official = torch.load(RAM_DIR / "DAPE.pth", weights_only=True)
    want = {k for k in official if not k.startswith(("tag_encoder.", "text_decoder."))}
    assert set(sd) == want and all(sd[k].shape == official[k].shape for k in sd)
    tagger = load_tagger("dape", root=RAM_DIR, dape=ckpt, device="cpu")
    img = Image.open(fixture_set("golden-seesr") / "inputs" / "in0" / "lq.png")
    student = trained["trainer"].accelerator.unwrap_model(trained["trainer"].student)
    student.eval()
    with torch.no_grad():
        ref = student(tagger.preprocess(img))
    student.train()
    res = tagger(img)
    assert (res.image_embeds - ref["image_embeds"]).abs().max() <= 1e-5
    assert (res.logits - ref["logits"]).abs().max() <= 1e-5
