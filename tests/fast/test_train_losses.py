"""Training losses: CSD/VSD gradients against hand-computed ones on a toy UNet, LPIPS weights handling."""

import pytest
import torch

from realisr.errors import CheckpointError, WeightsNotFoundError
from realisr.train import losses


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # the CPUs are shared: more threads are much slower here
    yield
    torch.set_num_threads(n)


def _alphas():
    # SD's scaled_linear schedule, written out here (not taken from the code under test)
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()


class ToyUNet:
    """eps = k * z_t + (mean of the prompt embedding), so conditional and unconditional predictions differ."""

    def __init__(self, k):
        self.k = k

    def __call__(self, z_t, t, encoder_hidden_states):
        return (self.k * z_t + encoder_hidden_states.mean(dim=(1, 2)).view(-1, 1, 1, 1),)


def _toy_inputs():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 4, 5, 6, generator=g)
    emb = torch.full((2, 7, 3), 0.8)
    neg = torch.full((1, 7, 3), -0.3)
    t = torch.tensor([25, 400])
    noise = torch.randn(z.shape, generator=g)
    return z, emb, neg, t, noise


def test_csd_gradient_matches_hand_computation():
    z, emb, neg, t, noise = _toy_inputs()
    ac = _alphas()
    z = z.requires_grad_(True)
    unet = ToyUNet(0.1)
    loss = losses.csd_loss(z, unet, ac, emb, neg, cfg_scale=7.5, timesteps=t, noise=noise)
    loss.backward()

    a = ac[t].view(-1, 1, 1, 1).double()
    zd = z.detach().double()
    z_t = a.sqrt() * zd + (1 - a).sqrt() * noise.double()
    eps_u = 0.1 * z_t + (-0.3)
    eps_c = 0.1 * z_t + 0.8
    eps_cfg = eps_u + 7.5 * (eps_c - eps_u)
    real = (z_t - (1 - a).sqrt() * eps_cfg) / a.sqrt()
    fake = (z_t - (1 - a).sqrt() * eps_u) / a.sqrt()
    w = (zd - real).abs().mean(dim=(1, 2, 3), keepdim=True)
    expected = 2 * (fake - real) / w / z.numel()
    torch.testing.assert_close(z.grad.double(), expected, rtol=1e-4, atol=1e-9)
    # descending moves z towards the CFG-guided x0, i.e. against (eps_c - eps_u) = +1.1 everywhere
    step = -z.grad
    assert torch.all(step < 0)
    cos = torch.nn.functional.cosine_similarity(step.flatten(1).double(), (real - fake).flatten(1), dim=1)
    assert torch.all(cos > 0.9999)  # per sample (each has its own normaliser w)


def test_vsd_gradient_matches_hand_computation():
    z, emb, neg, t, noise = _toy_inputs()
    ac = _alphas()
    z = z.requires_grad_(True)
    fix, fake_unet = ToyUNet(0.1), ToyUNet(0.3)
    loss = losses.vsd_loss(z, fix, fake_unet, ac, emb, neg, cfg_scale=7.5, timesteps=t, noise=noise)
    loss.backward()

    a = ac[t].view(-1, 1, 1, 1).double()
    zd = z.detach().double()
    z_t = a.sqrt() * zd + (1 - a).sqrt() * noise.double()
    eps_real = (0.1 * z_t - 0.3) + 7.5 * ((0.1 * z_t + 0.8) - (0.1 * z_t - 0.3))
    eps_fake = 0.3 * z_t + 0.8
    x0_real = (z_t - (1 - a).sqrt() * eps_real) / a.sqrt()
    x0_fake = (z_t - (1 - a).sqrt() * eps_fake) / a.sqrt()
    w = (zd - x0_real).abs().mean(dim=(1, 2, 3), keepdim=True)
    expected = 2 * (x0_fake - x0_real) / w / z.numel()
    torch.testing.assert_close(z.grad.double(), expected, rtol=1e-4, atol=1e-9)
    # the DMD direction: the update is proportional to (eps_fake - eps_real) with a positive factor
    ratio = (-z.grad.double()) / (eps_fake - eps_real)
    assert torch.all(ratio > 0)


def test_diffusion_loss_trains_only_the_fake_unet():
    ac = _alphas()
    net = torch.nn.Conv2d(4, 4, 1)
    z = torch.randn(2, 4, 4, 4, requires_grad=True)
    t = torch.tensor([0, 999])
    noise = torch.randn(2, 4, 4, 4)
    loss = losses.diffusion_loss(z, lambda x, tt, encoder_hidden_states: net(x), ac, torch.zeros(1, 7, 3),
                                 timesteps=t, noise=noise)
    loss.backward()
    a = ac[t].view(-1, 1, 1, 1)
    z_t = a.sqrt() * z.detach() + (1 - a).sqrt() * noise
    torch.testing.assert_close(loss, torch.mean((net(z_t) - noise) ** 2))
    assert z.grad is None and net.weight.grad is not None


def test_adapters_disabled_gives_base_output_and_keeps_grad_flags():
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 3))
    base = model(torch.ones(1, 3)).detach()
    for name in ("a", "b"):
        inject_adapter_in_model(LoraConfig(r=2, target_modules=["0"], init_lora_weights="gaussian"), model,
                                adapter_name=name)
    layer = model[0]
    layer.set_adapter(["a", "b"])
    with torch.no_grad():
        for n in ("a", "b"):
            layer.lora_B[n].weight.fill_(0.5)
    layer.lora_A["a"].weight.requires_grad_(False)  # a frozen adapter must stay frozen
    x = torch.ones(1, 3)
    with_lora = model(x).detach()
    assert not torch.allclose(with_lora, base)
    out = losses.BaseModelView(model)(x)
    torch.testing.assert_close(out, base)
    torch.testing.assert_close(model(x), with_lora)  # adapters are back
    assert layer.lora_A["a"].weight.requires_grad is False and layer.lora_A["b"].weight.requires_grad is True


@pytest.fixture(scope="module")
def stand_in_vgg(tmp_path_factory):
    """Random VGG16 feature weights in torchvision's layout (the real ones cannot be downloaded here)."""
    from torchvision.models.vgg import cfgs, make_layers

    torch.manual_seed(0)
    feats = make_layers(cfgs["D"])
    path = tmp_path_factory.mktemp("vgg") / losses.VGG16_WEIGHTS_NAME
    torch.save({f"features.{k}": v for k, v in feats.state_dict().items()}, path)
    return path


def test_lpips_missing_weights_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("REALISR_WEIGHTS", str(tmp_path / "weights"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(WeightsNotFoundError, match="vgg16-397923af.pth.*--no-lpips"):
        losses.find_lpips_vgg_weights()
    with pytest.raises(WeightsNotFoundError, match="not found"):
        losses.load_lpips(tmp_path / "nope.pth")


def test_lpips_from_cache(stand_in_vgg, tmp_path, monkeypatch):
    pytest.importorskip("lpips")
    monkeypatch.setenv("REALISR_WEIGHTS", str(stand_in_vgg.parent))
    assert losses.find_lpips_vgg_weights() == stand_in_vgg
    lp = losses.load_lpips()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    y = (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(-1, 1).requires_grad_(True)
    assert lp(x, x).item() == pytest.approx(0.0, abs=1e-6)
    d = lp(y, x)
    assert d.item() > 0
    d.backward()
    assert y.grad is not None and y.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in lp.parameters())
    sd = torch.load(stand_in_vgg, weights_only=True)
    for slice_name, idx in (("slice1", 0), ("slice3", 10), ("slice5", 28)):  # torchvision index kept per slice
        torch.testing.assert_close(getattr(lp.net.net, slice_name)._modules[str(idx)].weight,
                                   sd[f"features.{idx}.weight"])
    bad = tmp_path / "bad.pth"
    torch.save({"classifier.0.weight": torch.zeros(1)}, bad)
    with pytest.raises(CheckpointError, match="VGG16"):
        losses.load_lpips(bad)
