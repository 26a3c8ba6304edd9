"""EA-Adam's official checkpoint layouts: the released models (SRResNet, RRDB, SwinIR) load as ``-m`` models with
safe loading, from tiny stand-ins written in the official format; the RRDB key map agrees with spandrel."""

import numpy as np
import pytest
import torch
from PIL import Image

import realisr
from realisr.cli.main import main
from realisr.errors import CheckpointError
from realisr.weights.ea_adam import load_official, official_model_dict, rrdb_from_basicsr, rrdb_to_basicsr


def _tiny(kind):
    torch.manual_seed(0)
    if kind == "srresnet":
        from realisr.arch.msrresnet_arch import MSRResNet

        return MSRResNet(num_feat=8, num_block=2, upscale=4)
    if kind == "rrdb":
        from spandrel.architectures.ESRGAN import ESRGAN

        return ESRGAN(in_nc=3, out_nc=3, num_filters=8, num_blocks=2, scale=4)
    from spandrel.architectures.SwinIR import SwinIR  # EA-Adam's lightweight SwinIR layout, tiny

    return SwinIR(img_size=16, in_chans=3, embed_dim=12, depths=[2], num_heads=[2], window_size=8, mlp_ratio=2.0,
                  upscale=4, img_range=1.0, upsampler="pixelshuffledirect", resi_connection="1conv")


def _official_file(tmp_path, kind):
    """A stand-in written exactly as the official scripts save (torch.save of {'model_state_dict': ...})."""
    net = _tiny(kind).eval()
    sd = net.state_dict()
    if kind == "rrdb":
        content = {"model_state_dict": rrdb_to_basicsr(sd)}  # BasicSR keys, no prefix (official test.py)
    else:
        content = {"model_state_dict": {"module." + k: v for k, v in sd.items()}}  # nn.DataParallel
    name = {"srresnet": "EA-Adam-srresnet.pt", "rrdb": "EA-Adam-rrdb.pt",
            "swinir": "final_model_swinIR_EAdam_195_42_x4_swinIR.pt"}[kind]
    path = tmp_path / name
    torch.save(content, path)
    return net, path


def test_rrdb_key_map_is_spandrels():
    import spandrel

    net = _tiny("rrdb")
    old = net.state_dict()
    new = rrdb_to_basicsr(old)
    assert {"conv_first.weight", "body.1.rdb3.conv5.bias", "conv_body.weight", "conv_up2.bias", "conv_hr.weight",
            "conv_last.bias"} <= set(new)
    loaded = spandrel.ModelLoader().load_from_state_dict(new).model.state_dict()  # spandrel's own BasicSR mapping
    assert loaded.keys() == old.keys() and all(torch.equal(loaded[k], old[k]) for k in old)
    back = rrdb_from_basicsr(new)
    assert back.keys() == old.keys()
    with pytest.raises(ValueError):
        rrdb_to_basicsr({"nonsense.weight": torch.zeros(1)})


@pytest.mark.parametrize("kind,arch", [("srresnet", "MSRResNet"), ("rrdb", "ESRGAN"), ("swinir", "SwinIR")])
def test_released_model_layout_loads_as_a_model(tmp_path, photo, kind, arch):
    net, path = _official_file(tmp_path, kind)
    pipe = realisr.load_pipeline(str(path), device="cpu")
    assert pipe.descriptor.architecture.id == arch and pipe.scale == 4
    crop = photo[200:216, 220:236]
    out = pipe(crop, tile=0).pixels
    x = torch.from_numpy(crop.astype(np.float32) / 255).permute(2, 0, 1)[None]
    with torch.no_grad():
        ref = net(x).clamp(0, 1)[0].permute(1, 2, 0).numpy()
    assert out.shape == (64, 64, 3)
    assert np.abs(out - ref).max() < 1e-4
    # realisr's reader of the official layout gives the same weights back (spandrel names for RRDB)
    if kind != "swinir":
        got = load_official(path, kind)
        assert all(torch.equal(got[k], v) for k, v in net.state_dict().items())


def test_released_srresnet_runs_from_the_cli(tmp_path, photo):
    _, path = _official_file(tmp_path, "srresnet")
    Image.fromarray(photo[:24, :20]).save(tmp_path / "in.png")
    rc = main(["-q", "upscale", "-i", str(tmp_path / "in.png"), "-o", str(tmp_path / "out"), "-m", str(path)])
    assert rc == 0 and Image.open(tmp_path / "out" / "in_out.png").size == (80, 96)


class _Payload:  # any object the weights-only unpickler must refuse
    pass


def test_unsafe_checkpoint_is_refused(tmp_path):
    path = tmp_path / "EA-Adam-srresnet.pt"
    sd = {"module." + k: v for k, v in _tiny("srresnet").state_dict().items()}
    torch.save({"model_state_dict": sd, "extra": _Payload()}, path)
    with pytest.raises(CheckpointError):
        load_official(path, "srresnet")
    with pytest.raises(CheckpointError):
        realisr.load_pipeline(str(path), device="cpu")


def test_official_model_dict_layouts():
    sd = _tiny("srresnet").state_dict()
    content = official_model_dict(sd, "srresnet", epoch=3)
    assert content["epoch"] == 3 and all(k.startswith("module.") for k in content["model_state_dict"])
    rr = official_model_dict(_tiny("rrdb").state_dict(), "rrdb")
    assert "conv_first.weight" in rr["model_state_dict"] and "epoch" not in rr


def test_registered_release_is_found_in_the_weights_folder(tmp_path, monkeypatch, photo):
    from realisr.errors import WeightsNotFoundError
    from realisr.registry import get_spec
    from realisr.weights.status import weights_status

    monkeypatch.setenv("REALISR_WEIGHTS", str(tmp_path))
    spec = get_spec("ea-adam-srresnet")
    ok, why = weights_status(spec)
    assert not ok and "EA-Adam-srresnet.pt not found" in why
    with pytest.raises(WeightsNotFoundError, match="EA-Adam-srresnet.pt"):
        realisr.load_pipeline("ea-adam-srresnet", device="cpu")
    net, _ = _official_file(tmp_path, "srresnet")  # writes tmp_path/EA-Adam-srresnet.pt
    assert weights_status(spec)[0]
    out = realisr.load_pipeline("ea-adam-srresnet", device="cpu")(photo[:8, :8], tile=0)
    assert out.pixels.shape == (32, 32, 3) and out.info["model"] == "ea-adam-srresnet"


def test_perceptual_loss_reads_torchvision_vgg19_weights(tmp_path, monkeypatch):
    from realisr.arch.vgg_arch import VGG19Features
    from realisr.errors import WeightsNotFoundError
    from realisr.train.losses_gan import load_perceptual_loss

    monkeypatch.setenv("REALISR_WEIGHTS", str(tmp_path))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch" / "hub"))
    with pytest.raises(WeightsNotFoundError, match="vgg19-dcbb9e9d.pth"):
        load_perceptual_loss({"conv1_2": 1.0})
    torch.manual_seed(0)
    ref = VGG19Features(["conv1_2"], use_input_norm=False)  # torchvision's vgg19.features indices 0 and 2
    state = {f"features.{k}": v for k, v in ref.features.state_dict().items()}
    torch.save({**state, "classifier.6.bias": torch.zeros(1000)}, tmp_path / "vgg19-dcbb9e9d.pth")
    loss = load_perceptual_loss({"conv1_2": 1.0})
    x, y = torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    want = (ref((x - mean) / std)["conv1_2"] - ref((y - mean) / std)["conv1_2"]).abs().mean()
    assert torch.allclose(loss(x, y), want, atol=1e-6)  # L1 of features before ReLU, ImageNet-normalised input
    torch.save({"features.0.weight": torch.zeros(8, 3, 3, 3)}, tmp_path / "vgg19-dcbb9e9d.pth")
    with pytest.raises(CheckpointError, match="VGG19"):
        load_perceptual_loss({"conv1_2": 1.0})
