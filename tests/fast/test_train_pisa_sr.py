"""PiSA-SR training on a tiny random SD model (CPU, 64 px crops of a real photo): stage 1 learns, the stage
switch freezes the pixel LoRA bit for bit, checkpoints have the official layout and load for inference."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("accelerate")
pytest.importorskip("yaml")

from realisr.errors import WeightsNotFoundError  # noqa: E402
from realisr.train.config import load_recipe  # noqa: E402

from helpers.onestep import golden_dir, sd_dir  # noqa: E402
from helpers.training import photo_dir as _photo_dir, stand_in_vgg as _stand_in_vgg  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
GOLDEN = golden_dir()
SD = sd_dir(GOLDEN)

STAGE1_STEPS = 24
HAVE_LPIPS = importlib.util.find_spec("lpips") is not None
STAGE2_STEPS = 2


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # the CPUs are shared: more threads are much slower here
    yield
    torch.set_num_threads(n)


def _recipe(tmp: Path, hq: Path, **over) -> dict:
    r = {
        "method": "pisa-sr", "output_dir": str(tmp / "run"), "seed": 0,
        "model": {"pretrained": str(SD), "latent_sample": False, "gradient_checkpointing": False},
        "data": {"hq": [{"path": str(hq), "repeat": 2}], "crop_size": 64, "scale": 4, "degradation": "bicubic",
                 "hflip": False, "batch_size": 1, "num_workers": 0, "null_text_ratio": 0.5},
        "train": {"max_steps": STAGE1_STEPS, "lr": 2e-3, "mixed_precision": "no", "checkpoint_every": 0,
                  "log_every": 1},
        "loss": {"lpips": 0.0},
        "validation": {"every": 0},
        "pisa_sr": {"pix_steps": STAGE1_STEPS},
    }
    for k, v in over.items():
        r[k] = {**r.get(k, {}), **v} if isinstance(v, dict) else v
    return r


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One run: STAGE1_STEPS pixel steps, snapshot, then STAGE2_STEPS semantic steps (with LPIPS and CSD)."""
    from realisr.train.trainer_pisa_sr import PiSASRTrainer

    class Recording(PiSASRTrainer):
        def before_step(self, step):
            if step == STAGE1_STEPS and not hasattr(self, "at_switch"):
                self.at_switch = {n: p.detach().clone() for n, p in self.unet.named_parameters() if "lora_" in n}
            super().before_step(step)

    tmp = tmp_path_factory.mktemp("pisa")
    hq = _photo_dir(tmp)
    vgg = _stand_in_vgg(tmp)
    cfg = load_recipe(_recipe(tmp, hq, loss={"lpips": 2.0 if HAVE_LPIPS else 0.0, "lpips_vgg_weights": str(vgg)},
                              train={"max_steps": STAGE1_STEPS + STAGE2_STEPS}))
    trainer = Recording(cfg)
    trainer.setup()
    init = {n: p.detach().clone() for n, p in trainer.unet.named_parameters() if "lora_" in n}
    summary = trainer.train()
    after1 = trainer.at_switch
    after2 = {n: p.detach().clone() for n, p in trainer.unet.named_parameters() if "lora_" in n}
    lines = [json.loads(x) for x in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]
    return {"trainer": trainer, "init": init, "after1": after1, "after2": after2, "metrics": lines,
            "summary": summary, "tmp": tmp, "hq": hq}


def _is_pix(name):
    return name.split(".")[-2].endswith("_pix")


def test_stage1_loss_falls(trained):
    losses = [m["l2"] for m in trained["metrics"] if m["step"] <= STAGE1_STEPS and "l2" in m]
    assert len(losses) == STAGE1_STEPS
    # same photo, no flips, fixed LQ: the loss falls steadily (the random tiny VAE sets a high floor)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.9 * first, (first, last)
    assert max(losses[-10:]) < min(losses[:3]), losses
    assert all(m["stage"] == 1.0 for m in trained["metrics"] if m["step"] <= STAGE1_STEPS and "stage" in m)


def test_stage1_trains_only_the_pixel_lora(trained):
    init, after1 = trained["init"], trained["after1"]
    pix_changed = [n for n in init if _is_pix(n) and not torch.equal(init[n], after1[n])]
    assert len(pix_changed) > 0.9 * sum(_is_pix(n) for n in init)
    assert all(torch.equal(init[n], after1[n]) for n in init if not _is_pix(n))


def test_stage2_freezes_pixel_lora_bit_identical_and_trains_semantic(trained):
    after1, after2 = trained["after1"], trained["after2"]
    stage2 = [m for m in trained["metrics"] if m["step"] > STAGE1_STEPS and "l2" in m]
    assert [m["stage"] for m in stage2] == [2.0] * STAGE2_STEPS
    assert all("csd" in m and ("lpips" in m or not HAVE_LPIPS) for m in stage2)  # the stage-2 losses ran
    for n in after1:
        if _is_pix(n):
            assert torch.equal(after1[n], after2[n]), f"pixel LoRA {n} changed in stage 2"
    sem_b = [n for n in after1 if not _is_pix(n) and ".lora_B." in n]
    changed = [n for n in sem_b if not torch.equal(after1[n], after2[n])]
    assert len(changed) > 0.9 * len(sem_b)
    # and the pixel LoRA is not in the optimiser that stage 2 steps
    trainer = trained["trainer"]
    sem_opt_ids = {id(p) for g in trainer.optimizers["sem"].param_groups for p in g["params"]}
    assert not any(id(p) in sem_opt_ids for p in trainer.pix_params)


def test_checkpoint_has_official_keys_and_shapes(trained):
    fixture = torch.load(GOLDEN / "pisa_sr.pkl", map_location="cpu", weights_only=True)
    folder = Path(trained["summary"]["checkpoint"])
    assert folder.name == f"step-{STAGE1_STEPS + STAGE2_STEPS:06d}"
    ours = torch.load(folder / "pisa_sr.pkl", map_location="cpu", weights_only=True)
    assert set(ours) == set(fixture)
    for k, v in fixture.items():
        if k == "state_dict_unet":
            assert set(ours[k]) == set(v)
            for name, t in v.items():
                assert ours[k][name].shape == t.shape and ours[k][name].dtype == torch.float32, name
        else:
            assert ours[k] == v, k  # module lists in the official order, ranks
    # the values are the trained ones
    after2 = trained["after2"]
    for name, t in ours["state_dict_unet"].items():
        assert torch.equal(t, after2[name])
    from safetensors import safe_open

    with safe_open(str(folder / "pisa_sr.safetensors"), "pt") as f:
        assert {k[len("unet."):] for k in f.keys()} == set(fixture["state_dict_unet"])


def test_checkpoint_loads_into_the_inference_pipeline(trained):
    from realisr.weights.official import load_official_checkpoint

    folder = Path(trained["summary"]["checkpoint"])
    for fname in ("pisa_sr.pkl", "pisa_sr.safetensors"):
        ckpt = load_official_checkpoint(folder / fname, expect="pisa-sr")
        assert ckpt.method == "pisa-sr"
    from realisr.pipelines.pisa_sr.pipeline_pisa_sr import PiSASRPipeline
    from realisr.registry import get_spec

    trainer = trained["trainer"]
    pipe = PiSASRPipeline.from_spec(get_spec("pisa-sr"), device="cpu", dtype=torch.float32, sd=str(SD),
                                    checkpoint=folder / "pisa_sr.pkl")
    # the pipeline's UNet prediction (pixel LoRA merged, semantic LoRA active, prompt "", t=1) equals the
    # trainer's UNet with both trained LoRAs
    from realisr.train.losses import BaseModelView

    z_l = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.ones(1, dtype=torch.long)
    emb = trainer.encode_prompts([""])
    with torch.no_grad():
        eps_train = trainer.unet(z_l, t, encoder_hidden_states=emb).sample
        eps_base = BaseModelView(trainer.unet)(z_l, t, encoder_hidden_states=emb).sample
    eps_pipe = pipe.predict(z_l, adjustable=False)["eps"]
    torch.testing.assert_close(eps_pipe.float(), eps_train.float(), rtol=1e-4, atol=1e-4)
    assert (eps_train - eps_base).abs().max() > 1e-3  # the trained LoRAs do something


def test_resume_continues_from_the_checkpoint(trained, tmp_path):
    from realisr.train.trainer_pisa_sr import PiSASRTrainer

    trainer = trained["trainer"]
    cfg = load_recipe(_recipe(trained["tmp"], trained["hq"],
                              train={"max_steps": STAGE1_STEPS + STAGE2_STEPS, "resume": "latest"},
                              loss={"lpips": 0.0}))
    resumed = PiSASRTrainer(cfg)
    resumed.setup()
    assert resumed.step == STAGE1_STEPS + STAGE2_STEPS
    for (n, p), (n2, q) in zip(trainer.unet.named_parameters(), resumed.unet.named_parameters()):
        if "lora_" in n:
            assert n == n2 and torch.equal(p, q)
    s_old = trainer.optimizers["sem"].state_dict()["state"]
    s_new = resumed.optimizers["sem"].state_dict()["state"]
    assert set(s_old) == set(s_new) and len(s_new) > 0
    k = next(iter(s_old))
    assert torch.equal(s_old[k]["exp_avg"], s_new[k]["exp_avg"])


def test_resume_mid_epoch_equals_an_uninterrupted_run(tmp_path):
    """Random crops and flips (global RNG), a shuffled two-photo dataset (epoch = 2 steps) and a checkpoint at
    step 3, in the middle of epoch 1: resuming there and training to step 5 gives bit for bit the weights, and
    the losses, of the run that was never interrupted (optimiser, RNG states and data position restored)."""
    from realisr.train.trainer_pisa_sr import PiSASRTrainer

    hq = _photo_dir(tmp_path, size=80, names=("astronaut", "coffee"))

    def recipe(out, **train):
        r = _recipe(tmp_path, hq, output_dir=str(tmp_path / out),
                    data={"hq": [str(hq)], "hflip": True}, pisa_sr={"pix_steps": 100},
                    train={"max_steps": 5, "checkpoint_every": 3, **train})
        return load_recipe(r)

    whole = PiSASRTrainer(recipe("whole"))
    whole.train()
    resumed = PiSASRTrainer(recipe("resumed", resume=str(tmp_path / "whole" / "checkpoints" / "step-000003")))
    resumed.setup()
    assert (resumed.step, resumed.epoch, resumed.batch_in_epoch) == (3, 1, 1)
    resumed.train()
    for (n, p), (n2, q) in zip(whole.unet.named_parameters(), resumed.unet.named_parameters()):
        if "lora_" in n:
            assert n == n2 and torch.equal(p, q), n

    def losses(out):
        lines = (tmp_path / out / "metrics.jsonl").read_text().splitlines()
        return {m["step"]: m["l2"] for m in map(json.loads, lines) if "l2" in m}
    assert {k: v for k, v in losses("whole").items() if k > 3} == losses("resumed")
    ts = tmp_path / "whole" / "checkpoints" / "step-000003" / "training_state"
    state = json.loads((ts / "state.json").read_text())
    assert (state["epoch"], state["batch_in_epoch"]) == (1, 1)
    # accelerate's state (both optimisers, the RNG states), without a copy of the frozen backbone
    names = {p.name for p in ts.iterdir()}
    assert {"optimizer.bin", "optimizer_1.bin", "random_states_0.pkl", "trainable.safetensors"} <= names
    assert not [n for n in names if n.startswith("model")]


def test_prompt_embeddings_are_cached_on_the_cpu_within_a_bound(tmp_path):
    from realisr.train.trainer_pisa_sr import PiSASRTrainer

    trainer = PiSASRTrainer(load_recipe(_recipe(tmp_path, tmp_path)))
    trainer.device = torch.device("cpu")
    calls = []

    class Tok:
        model_max_length = 77

        def __call__(self, texts, **kw):
            calls.append(len(texts))
            ids = torch.tensor([[hash(t) % 1000] * 77 for t in texts])
            return type("Enc", (), {"input_ids": ids})()

    def text_encoder(ids):  # a 77 x 1024 float32 embedding (315 KB) that depends on the prompt
        return (ids[..., None].float().expand(-1, -1, 1024) / 1000.0,)

    trainer.tokenizer, trainer.text_encoder = Tok(), text_encoder
    prompts = [f"tag{i}, photo" for i in range(400)]
    for i in range(0, 400, 4):
        emb = trainer.encode_prompts(prompts[i:i + 4])
        assert emb.shape == (4, 77, 1024)
        assert torch.equal(emb[:, 0, 0], torch.tensor([hash(p) % 1000 for p in prompts[i:i + 4]]) / 1000.0)
    cache = trainer._emb_cache
    held = sum(e.numel() * e.element_size() for e in cache.values())
    assert 0 < held <= trainer.PROMPT_CACHE_BYTES < 400 * 77 * 1024 * 4
    assert all(e.device.type == "cpu" for e in cache.values())
    assert prompts[-1] in cache and prompts[0] not in cache  # least recently used dropped first
    n = len(calls)
    trainer.encode_prompts(prompts[-4:])  # cached: no new encoder call
    assert len(calls) == n


def test_missing_lpips_weights_stop_before_stage2(tmp_path, monkeypatch):
    from realisr.train.trainer_pisa_sr import PiSASRTrainer

    monkeypatch.setenv("REALISR_WEIGHTS", str(tmp_path / "none"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    hq = _photo_dir(tmp_path)
    cfg = load_recipe(_recipe(tmp_path, hq, loss={"lpips": 2.0}, train={"max_steps": 3},
                              pisa_sr={"pix_steps": 1}))
    trainer = PiSASRTrainer(cfg)
    with pytest.raises(WeightsNotFoundError, match="--no-lpips"):
        trainer.setup()
    assert trainer.step == 0 and not (tmp_path / "run" / "metrics.jsonl").exists()
    # a stage-1-only run does not need them
    cfg1 = load_recipe(_recipe(tmp_path, hq, loss={"lpips": 2.0}, train={"max_steps": 1}, pisa_sr={"pix_steps": 1}))
    assert PiSASRTrainer(cfg1).needs_lpips() is False


def test_init_from_the_official_checkpoint(tmp_path):
    from realisr.errors import CheckpointError
    from realisr.train.trainer_pisa_sr import PiSASRTrainer

    hq = _photo_dir(tmp_path)
    fixture = torch.load(GOLDEN / "pisa_sr.pkl", map_location="cpu", weights_only=True)["state_dict_unet"]
    cfg = load_recipe(_recipe(tmp_path, hq, model={"init_checkpoint": str(GOLDEN / "pisa_sr.pkl")}))
    trainer = PiSASRTrainer(cfg)
    trainer.setup()
    own = dict(trainer.unet.named_parameters())
    for k, v in fixture.items():
        assert torch.equal(own[k].detach(), v), k
    bad = load_recipe(_recipe(tmp_path, hq, model={"init_checkpoint": str(GOLDEN / "pisa_sr.pkl")},
                              pisa_sr={"lora_rank_sem": 8}))
    with pytest.raises(CheckpointError, match="rank"):
        PiSASRTrainer(bad).setup()
