"""`realisr train ea-adam*` end to end on a tiny CPU recipe: the population spreads along the weight vectors,
individual 0 stays the pretrained model, the official files load, and a killed run resumes to the same result."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import realisr
from realisr.train.config import load_recipe
from realisr.train.trainer_ea_adam import EAAdamTrainer
from realisr.weights.ea_adam import load_official

# a perceptual objective distinct from L1 on a tiny random VGG (tests have no VGG19 weights)
OVERRIDES = ["loss.perceptual_layers={conv2_2: 1.0}", "loss.vgg_random_width=0.25", "ea_adam.iters_per_epoch=8",
             "ea_adam.lr=2e-4", "loss.gan=0.001", "train.checkpoint_every=3"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Three real photo crops and an L1-pretrained tiny MSRResNet in BasicSR's ``net_g`` format."""
    import skimage.data

    from realisr.arch.msrresnet_arch import MSRResNet

    root = tmp_path_factory.mktemp("ea-adam")
    hq = root / "hq"
    hq.mkdir()
    for n in ("astronaut", "coffee", "chelsea"):
        Image.fromarray(getattr(skimage.data, n)()[:128, :128, :3]).save(hq / f"{n}.png")
    torch.manual_seed(0)
    net = MSRResNet(num_feat=8, num_block=2)
    imgs = [torch.from_numpy(np.asarray(Image.open(p)).copy()).permute(2, 0, 1).float() / 255
            for p in sorted(hq.glob("*.png"))]
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        crops = []
        for k in range(8):
            y, x = torch.randint(0, 96, (2,), generator=g).tolist()
            crops.append(imgs[k % 3][:, y:y + 32, x:x + 32])
        h = torch.stack(crops)
        lq = F.interpolate(h, size=(8, 8), mode="bicubic", align_corners=False, antialias=True)
        loss = (net(lq) - h).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.save({"params": net.state_dict()}, root / "net_g_1000.pth")
    return root


def _cfg(data, out, extra=()):
    return load_recipe("ea-adam-tiny-cpu", [f"data.hq=[{data / 'hq'}]", f"output_dir={out}",
                                            f"ea_adam.pretrained={data / 'net_g_1000.pth'}", *OVERRIDES, *extra])


@pytest.fixture(scope="module")
def run(data):
    out = data / "run"
    summary = EAAdamTrainer(_cfg(data, out)).train()
    return out, summary


def test_population_spreads_along_the_weight_vectors(run):
    out, summary = run
    obj = np.array(json.loads((out / "objectives.json").read_text())["objectives"])  # [N, (L1, Perc)]
    idx = np.arange(len(obj))
    # the distortion end keeps the lowest L1, the perception end reaches the lowest perceptual loss region
    assert obj[-1, 0] > obj[0, 0] and obj[-1, 1] < obj[0, 1]
    assert np.corrcoef(idx, obj[:, 0])[0, 1] > 0.8, obj
    assert np.corrcoef(idx, obj[:, 1])[0, 1] < -0.6, obj
    assert summary["objectives"] == obj.tolist()


def test_individual_zero_stays_the_pretrained_model(run, data):
    out, _ = run
    pre = torch.load(data / "net_g_1000.pth", weights_only=True)["params"]
    ind0 = load_official(out / "experts" / "expert_0.pt", "srresnet")
    assert all(torch.equal(ind0[k], pre[k]) for k in pre)
    ind4 = load_official(out / "experts" / "expert_4.pt", "srresnet")
    assert not torch.equal(ind4["conv_last.weight"], pre["conv_last.weight"])
    # official per-epoch files of the EA epoch, generators and discriminators
    assert (out / "models" / "model_x4_1_3.pt").is_file() and (out / "models" / "model_d_x4_1_3.pt").is_file()
    d = torch.load(out / "models" / "model_d_x4_1_3.pt", weights_only=True)
    assert d["epoch"] == 1 and all(k.startswith("module.") for k in d["model_state_dict"])


def test_merged_model_loads_as_a_plain_backbone(run, photo):
    out, summary = run
    final = out / "final" / "final_model_EAdam_x4_srresnet.pt"
    assert summary["model"] == str(final)
    pipe = realisr.load_pipeline(str(final), device="cpu")
    assert pipe.descriptor.architecture.id == "MSRResNet"
    weights = json.loads((out / "final" / "fusion_weights.json").read_text())
    assert len(weights) == 1 + 2 * 2 + 4  # conv_first, 2 blocks x 2 convs, upconv1/2, conv_hr, conv_last
    assert all(abs(sum(w) - 1) < 1e-6 and len(w) == 5 for w in weights.values())
    # the merge is the per-layer weighted sum of the experts
    experts = [load_official(out / "experts" / f"expert_{i}.pt", "srresnet") for i in range(5)]
    merged = load_official(final, "srresnet")
    want = sum(w * e["body.1.conv2.weight"].double() for w, e in zip(weights["body.1.conv2"], experts))
    assert torch.allclose(merged["body.1.conv2.weight"].double(), want, atol=1e-6)
    assert pipe(photo[:12, :16], tile=0).pixels.shape == (48, 64, 3)
    fusion = torch.load(out / "fusion" / "model_fusion.pt", weights_only=True)["model_state_dict"]
    assert fusion["module.conv_first.weight"].shape[0] == 5 and "module.conv_first.fusion.MappingNet.2.bias" in fusion


class _Kill(Exception):
    pass


def test_killed_run_resumes_to_the_same_result(run, data):
    out_ref, _ = run
    out = data / "killed"
    seen = []

    def kill(event):  # die in the middle of the EA epoch, after a resume point
        seen.append((event.stage, event.current))
        if event.stage == "ea" and event.current == 1 and len([s for s in seen if s[0] == "ea"]) == 1:
            raise _Kill

    cfg = _cfg(data, out, ["train.checkpoint_every=1"])
    with pytest.raises(_Kill):
        EAAdamTrainer(cfg, callback=kill).train()
    assert not (out / "final").exists()
    resumed = EAAdamTrainer(_cfg(data, out, ["train.checkpoint_every=1", "train.resume=latest"])).train()
    a = load_official(out_ref / "final" / "final_model_EAdam_x4_srresnet.pt", "srresnet")
    b = load_official(resumed["model"], "srresnet")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((out / "objectives.json").read_text()) == json.loads((out_ref / "objectives.json").read_text())


def test_rrdb_population_fuses_and_merges_into_an_rrdbnet(data, tmp_path):
    cfg = load_recipe("ea-adam-tiny-cpu", [
        f"data.hq=[{data / 'hq'}]", f"output_dir={tmp_path / 'rrdb'}", "ea_adam.backbone=rrdb",
        "ea_adam.backbone_kwargs={num_feat: 8, num_block: 1}", "ea_adam.popsize=3", "ea_adam.epochs=2",
        "ea_adam.iters_per_epoch=2", "ea_adam.ea_iters=1", "fusion.iters_per_epoch=1", "merge.num=1"])
    summary = EAAdamTrainer(cfg).train()
    pipe = realisr.load_pipeline(summary["model"], device="cpu")
    assert pipe.descriptor.architecture.id == "ESRGAN" and pipe.scale == 4
    expert = torch.load(tmp_path / "rrdb" / "experts" / "expert_2.pt", weights_only=True)["model_state_dict"]
    assert "body.0.rdb1.conv1.weight" in expert and "conv_body.weight" in expert  # BasicSR names
    weights = json.loads((tmp_path / "rrdb" / "final" / "fusion_weights.json").read_text())
    assert len(weights) == 1 + 15 + 1 + 4 and all(len(w) == 3 for w in weights.values())
