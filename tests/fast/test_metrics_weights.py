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
    (tmp_path / "weights").mkdir()
    return tmp_path / "weights"


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


@pytest.mark.slow
def test_fid_folder_vs_folder_from_the_inception_file(weights_dir):
    pytest.importorskip("torch_fidelity")
    _standin_inception(weights_dir / "weights-inception-2015-12-05-6726825d.pth")
    fid = create_metric("fid", device="cpu")
    x, y = _images()
    fid.update(x, y)
    with pytest.raises(ValueError, match="at least 2"):
        fid.compute()
    fid.update(y, x[::-1].copy())
    assert np.isfinite(fid.compute())


PYIQA_FILES = {"musiq": "musiq_koniq_ckpt-e95806b9.pth", "maniqa": "MANIQA_PIPAL-ae6d356b.pth"}


@pytest.mark.slow
@pytest.mark.parametrize("metric_id", sorted(PYIQA_FILES))
def test_pyiqa_metrics_from_standin_checkpoints(metric_id, weights_dir):
    pyiqa = pytest.importorskip("pyiqa")
    from realisr.metrics import METRICS
    from realisr.metrics.impl import _patched

    name = METRICS[metric_id].options["pyiqa_name"]
    import timm

    create = timm.create_model
    with _patched(timm, "create_model", lambda *a, **k: create(*a, **{**k, "pretrained": False})):
        net = pyiqa.create_metric(name, device="cpu", pretrained=False).net
    torch.save(net.state_dict(), weights_dir / PYIQA_FILES[metric_id])
    m = create_metric(metric_id, device="cpu")
    x, _ = _images()
    assert np.isfinite(m(np.ascontiguousarray(np.tile(x, (5, 5, 1)))))
