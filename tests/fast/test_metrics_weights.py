"""Learned metrics run end to end from files in the user's cache. The files here are stand-ins with random
weights written under the real names (test only): the scores are meaningless, the wiring is what is tested
(the backbone tensors really come from the file, nothing is downloaded)."""


import numpy as np
import pytest

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")
pytest.importorskip("torchmetrics")

from realisr.metrics import create_metric, metric_status  # noqa: E402


@pytest.fixture()
def weights_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("REALISR_WEIGHTS", str(tmp_path / "weights"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # an empty torch hub: no cached backbones
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # torch.hub.get_dir() follows TORCH_HOME again
    (tmp_path / "weights").mkdir()
    return tmp_path / "weights"


@pytest.fixture()
def unpickling(monkeypatch):
    """Every ``torch.load`` call made while the metric is built, with its ``weights_only`` argument."""
    calls = []
    real = torch.load

    def recording(f, *args, **kwargs):
        calls.append((str(f), kwargs.get("weights_only", "default")))
        return real(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", recording)
    return calls


def _nothing_written_outside_the_weights(weights_dir):
    """The torch hub and the Hugging Face cache stay empty: nothing is linked, copied or downloaded there."""
    root = weights_dir.parent
    written = [p for d in ("torch", "hf") for p in (root / d).rglob("*") if (root / d).exists()]
    assert written == [], written


def _images():
    rng = np.random.default_rng(0)
    x = rng.random((48, 56, 3), dtype=np.float32)
    y = np.clip(x + 0.1 * rng.standard_normal(x.shape).astype(np.float32), 0, 1)
    return x, y


def test_lpips_uses_the_alexnet_file(weights_dir):
    torch.manual_seed(1)
    alex = torchvision.models.alexnet(weights=None)
    state = {f"features.{k}": v for k, v in alex.features.state_dict().items()}  # the classifier is unused
    torch.save(state, weights_dir / "alexnet-owt-7be5be79.pth")
    assert metric_status("lpips").available
    m = create_metric("lpips", device="cpu")
    x, y = _images()
    d = m(x, y)
    assert d > 0 and m(x, x) == pytest.approx(0.0, abs=1e-7)
    # the backbone computes exactly what torchvision's AlexNet with this file computes
    t = torch.rand(1, 3, 40, 40)
    ours = m.net.net.slice1(t)
    alex.eval()
    assert torch.allclose(ours, alex.features[:2](t))
    # a different file gives a different score: the weights really come from it
    torch.manual_seed(2)
    alex2 = torchvision.models.alexnet(weights=None)
    torch.save({f"features.{k}": v for k, v in alex2.features.state_dict().items()},
               weights_dir / "alexnet-owt-7be5be79.pth")
    assert create_metric("lpips", device="cpu")(x, y) != pytest.approx(d)


def test_dists_uses_the_vgg16_file(weights_dir):
    torch.manual_seed(3)
    features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"])  # VGG16 without classifier
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, weights_dir / "vgg16-397923af.pth")
    m = create_metric("dists", device="cpu")
    x, y = _images()
    assert m(x, y) > 0 and abs(m(x, x)) < 1e-5
    assert torch.equal(m.net.stage1[0].weight, features[0].weight)


def test_bad_weight_file_is_a_clear_error(weights_dir):
    from realisr.errors import CheckpointError

    (weights_dir / "alexnet-owt-7be5be79.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="alexnet-owt-7be5be79.pth"):
        create_metric("lpips", device="cpu")
    torch.save({"features.0.weight": torch.zeros(1)}, weights_dir / "alexnet-owt-7be5be79.pth")
    with pytest.raises(CheckpointError, match="lacks backbone tensors|shape"):
        create_metric("lpips", device="cpu")


def _standin_inception(path):
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    with pytest.MonkeyPatch.context() as mp:  # build the network without loading (or fetching) weights
        mp.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None)
        mp.setattr(fe, "load_state_dict_from_url", lambda *a, **k: {})
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    torch.save(net.state_dict(), path)


def test_fid_folder_vs_folder_from_the_inception_file(weights_dir, unpickling):
    pytest.importorskip("torch_fidelity")
    _standin_inception(weights_dir / "weights-inception-2015-12-05-6726825d.pth")
    unpickling.clear()
    fid = create_metric("fid", device="cpu")
    # torch-fidelity would unpickle the file with weights_only=False: realisr loads it once, safely
    assert unpickling and all(w is True for _f, w in unpickling), unpickling
    _nothing_written_outside_the_weights(weights_dir)
    x, y = _images()
    fid.update(x, y)
    with pytest.raises(ValueError, match="at least 2"):
        fid.compute()
    fid.update(y, x[::-1].copy())
    assert np.isfinite(fid.compute())


PYIQA_FILES = {"musiq": "musiq_koniq_ckpt-e95806b9.pth", "maniqa": "MANIQA_PIPAL-ae6d356b.pth"}


@pytest.mark.parametrize("metric_id", sorted(PYIQA_FILES))
def test_pyiqa_metrics_from_standin_checkpoints(metric_id, weights_dir, unpickling):
    pyiqa = pytest.importorskip("pyiqa")
    import timm

    from realisr.metrics import METRICS
    from realisr.metrics.impl import _patched

    name = METRICS[metric_id].options["pyiqa_name"]
    create = timm.create_model
    with _patched((timm, "create_model", lambda *a, **k: create(*a, **{**k, "pretrained": False}))):
        net = pyiqa.create_metric(name, device="cpu", pretrained=False).net
    torch.manual_seed(4)
    state = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in net.state_dict().items()}
    torch.save(state, weights_dir / PYIQA_FILES[metric_id])
    unpickling.clear()
    m = create_metric(metric_id, device="cpu")
    # pyiqa's own loader unpickles with weights_only=False: only realisr's weights_only=True load happens
    assert unpickling and all(w is True for _f, w in unpickling), unpickling
    _nothing_written_outside_the_weights(weights_dir)
    # every tensor of the network comes from the file
    loaded = m.metric.net.state_dict()
    assert set(loaded) == set(state)
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    if metric_id == "maniqa":
        m.metric.net.test_sample = 1  # one 224 crop of ViT-B/8 instead of 20 keeps the test quick on a CPU
    x, _ = _images()
    assert np.isfinite(m(np.ascontiguousarray(np.tile(x, (5, 5, 1)))))


@pytest.fixture(scope="module")
def standin_rn50(tmp_path_factory):
    """A random-weight CLIP RN50 saved as a TorchScript archive, as the official RN50.pt is (fp16 weights)."""
    pytest.importorskip("pyiqa")
    from clip.model import CLIP

    torch.manual_seed(5)
    model = CLIP(embed_dim=1024, image_resolution=224, vision_layers=(3, 4, 6, 3), vision_width=64,
                 vision_patch_size=None, context_length=77, vocab_size=49408, transformer_width=512,
                 transformer_heads=8, transformer_layers=12).eval()
    traced = torch.jit.trace_module(model, {"encode_image": (torch.rand(1, 3, 224, 224),),
                                            "encode_text": (torch.zeros(1, 77, dtype=torch.long),)})
    path = tmp_path_factory.mktemp("clip") / "RN50.pt"
    traced.half().save(str(path))
    return path, model


def _sha256(path):
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_clipiqa_refuses_a_torchscript_file_that_is_not_the_official_one(weights_dir, standin_rn50):
    import shutil

    shutil.copy(standin_rn50[0], weights_dir / "RN50.pt")
    from realisr.errors import CheckpointError

    with pytest.raises(CheckpointError, match="not the official RN50.pt.*SHA-256"):
        create_metric("clipiqa", device="cpu")


def test_clipiqa_from_the_official_file(weights_dir, standin_rn50, monkeypatch):
    """The stand-in cannot carry the official SHA-256, so the test declares its hash as the official one."""
    import dataclasses
    import shutil

    from realisr.metrics import METRICS

    path, model = standin_rn50
    shutil.copy(path, weights_dir / "RN50.pt")
    spec = METRICS["clipiqa"]
    monkeypatch.setitem(METRICS, "clipiqa", dataclasses.replace(
        spec, weights=(dataclasses.replace(spec.weights[0], sha256=_sha256(path)),)))
    import urllib.request

    def no_network(*a, **k):
        raise AssertionError("CLIPIQA tried to download")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    m = create_metric("clipiqa", device="cpu")
    _nothing_written_outside_the_weights(weights_dir)
    clip = m.metric.net.clip_model[0]
    ref = model.half().float().state_dict()
    assert all(torch.equal(clip.state_dict()[k], ref[k]) for k in ref)  # the CLIP weights are the file's
    x, y = _images()
    a, b = m(np.tile(x, (4, 4, 1))), m(np.tile(y, (4, 4, 1)))
    assert 0.0 <= a <= 1.0 and 0.0 <= b <= 1.0 and a != b  # a softmax over the good/bad prompt pair
