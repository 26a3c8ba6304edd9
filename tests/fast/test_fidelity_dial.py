"""The `fidelity` dial of GAN models with a fidelity delta: F=0 is the released model bit for bit, F is
weight-space interpolation in one pass, per-pixel maps, errors; the delta trainer resumes exactly. On a tiny
RRDBNet with a delta written in the shipped format."""

import copy
import json

import numpy as np
import pytest
import torch

from realisr.pipelines.gan.pipeline_gan import GANPipeline
from realisr.registry import ModelSpec, WeightSource
from realisr.weights.fidelity import DELTA_FORMAT, base_fingerprint

_GAN = "realisr.pipelines.gan.pipeline_gan:GANPipeline"


def _desc(seed=0):
    import spandrel
    from spandrel.architectures.ESRGAN import ESRGAN

    torch.manual_seed(seed)
    return spandrel.ModelLoader().load_from_state_dict(ESRGAN(num_filters=8, num_blocks=2, scale=4).state_dict())


def _spec(delta_path=None):
    return ModelSpec(id="tiny-rrdb", family="test", scale=4, license="n/a", weights=WeightSource("none"),
                     pipeline=_GAN, arch="RRDBNet",
                     options={"fidelity_delta": str(delta_path)} if delta_path else {})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from safetensors.torch import save_file

    desc = _desc()
    state = desc.model.state_dict()
    g = torch.Generator().manual_seed(1)
    delta = {k: (torch.randn(v.shape, generator=g) * 0.05).half() for k, v in state.items()
             if k.startswith(("model.1.sub.2.", "model.8.", "model.10."))}
    path = tmp_path_factory.mktemp("delta") / "tiny-fidelity.safetensors"
    save_file(delta, str(path), metadata={"format": DELTA_FORMAT, "base_model": "tiny-rrdb",
                                          "base_fingerprint": base_fingerprint({k: state[k] for k in delta})})
    return desc, {k: v.float() for k, v in delta.items()}, path


def _pipe(desc, path=None):
    return GANPipeline(_spec(path), device="cpu", descriptor=copy.deepcopy(desc))


def _reference(desc, delta, f):
    """The model with W + f * delta put in by hand, run without any dial."""
    d = copy.deepcopy(desc)
    sd = d.model.state_dict()
    for k, v in delta.items():
        sd[k] = sd[k].float() + f * v
    d.model.load_state_dict(sd)
    return GANPipeline(_spec(), device="cpu", descriptor=d)


def test_zero_is_the_released_model_bit_for_bit(tiny, photo):
    desc, _, path = tiny
    img = photo[100:124, 200:230]
    plain = _pipe(desc)(img, tile=0).pixels
    pipe = _pipe(desc, path)
    assert pipe.fidelity_available
    assert np.array_equal(pipe(img, tile=0).pixels, plain)
    assert np.array_equal(pipe(img, tile=0, fidelity=0).pixels, plain)
    pipe(img, tile=0, fidelity=0.7)
    assert np.array_equal(pipe(img, tile=0, fidelity=0.0).pixels, plain)  # back to the released weights exactly
    assert np.array_equal(pipe(img, tile=0).pixels, plain)


@pytest.mark.parametrize("f", [0.25, 0.5, 1.0])
def test_fidelity_is_weight_space_interpolation_in_one_pass(tiny, photo, f):
    desc, delta, path = tiny
    img = photo[100:124, 200:230]
    pipe = _pipe(desc, path)
    calls = []
    forward = pipe._forward
    pipe._forward = lambda x: (calls.append(1), forward(x))[1]
    out = pipe(img, tile=0, fidelity=f)
    assert len(calls) == 1  # one forward pass, as the plain model
    assert out.info["fidelity"] == f
    ref = _reference(desc, delta, f)(img, tile=0).pixels
    assert np.abs(out.pixels - ref).max() <= 1e-6
    assert np.abs(out.pixels - _pipe(desc)(img, tile=0).pixels).max() > 1e-3  # the dial does something


def test_fidelity_map(tiny, photo):
    desc, _, path = tiny
    img = photo[100:124, 200:232]  # 24 x 32
    pipe = _pipe(desc, path)
    const = pipe(img, tile=0, fidelity=np.full((24, 32), 0.5, np.float32))
    assert const.info["fidelity_levels"] == [0.5]
    assert np.array_equal(const.pixels, pipe(img, tile=0, fidelity=0.5).pixels)
    split = np.zeros((24, 32), np.float32)
    split[:, 16:] = 1.0
    out = pipe(img, tile=0, fidelity=split)
    assert out.info["fidelity_levels"] == [0.0, 0.25, 0.5, 0.75, 1.0]
    f0 = pipe(img, tile=0, fidelity=0.0).pixels
    f1 = pipe(img, tile=0, fidelity=1.0).pixels
    assert np.array_equal(out.pixels[:, :56], f0[:, :56])  # away from the seam the map is 0 or 1 exactly
    assert np.array_equal(out.pixels[:, 72:], f1[:, 72:])
    assert np.array_equal(pipe(img, tile=0).pixels, f0)  # a map call leaves the released weights in place


def test_fidelity_errors(tiny, photo):
    desc, _, path = tiny
    img = photo[:16, :16]
    pipe = _pipe(desc, path)
    for bad in (1.5, -0.1, np.full((16, 16), 2.0, np.float32)):
        with pytest.raises(ValueError, match="fidelity"):
            pipe(img, fidelity=bad)
    plain = _pipe(desc)
    assert not plain.fidelity_available
    with pytest.raises(ValueError, match="no fidelity dial"):
        plain(img, fidelity=0.5)
    assert plain(img, fidelity=0).pixels.shape == (64, 64, 3)


def test_bench_sweep_syntax():
    from realisr.bench.methods import parse_method

    settings = parse_method("realesrgan-x4plus:fidelity=0|0.25|0.5|0.75|1")
    assert [s.call_kwargs for s in settings] == [{"fidelity": v} for v in (0, 0.25, 0.5, 0.75, 1)]
    assert {s.group for s in settings} == {"realesrgan-x4plus"} and settings[0].sweep_key == "fidelity"


def test_a_delta_file_given_at_load_time(tiny, photo):
    """`fidelity_delta=PATH` (e.g. a delta just trained) is the registered delta's equal; a missing file says so."""
    from realisr.errors import WeightsNotFoundError

    desc, delta, path = tiny
    img = photo[40:56, 40:56]
    given = GANPipeline(_spec(), device="cpu", descriptor=copy.deepcopy(desc), fidelity_delta=path)
    assert given.fidelity_available
    assert np.array_equal(given(img, tile=0, fidelity=0.5).pixels, _reference(desc, delta, 0.5)(img, tile=0).pixels)
    with pytest.raises(WeightsNotFoundError, match="no such file"):
        GANPipeline(_spec(), device="cpu", descriptor=copy.deepcopy(desc), fidelity_delta=path.with_name("x"))


def test_bench_sweeps_the_dial_as_a_curve(tiny, photo, tmp_path):
    """`realisr bench -m "MODEL:load.fidelity_delta=D,fidelity=0|0.5|1"`: one setting per F, grouped as one curve
    of the perception-distortion plot; each setting's outputs are the model at that F."""
    from PIL import Image

    from realisr.cli.main import main
    from realisr.io import read_image

    desc, delta, path = tiny
    torch.save(desc.model.state_dict(), tmp_path / "tiny.pth")
    (tmp_path / "lq").mkdir(), (tmp_path / "hq").mkdir()
    for i, (y, x) in enumerate(((100, 200), (300, 150))):
        Image.fromarray(photo[y:y + 64, x:x + 64]).save(tmp_path / "hq" / f"p{i}.png")
        Image.fromarray(photo[y:y + 64:4, x:x + 64:4]).save(tmp_path / "lq" / f"p{i}.png")
    spec = f"{tmp_path / 'tiny.pth'}:load.fidelity_delta={path},fidelity=0|0.5|1"
    assert main(["-q", "bench", "--lq", str(tmp_path / "lq"), "--hq", str(tmp_path / "hq"), "-m", spec,
                 "--metrics", "psnr", "-o", str(tmp_path / "b")]) == 0
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    ms = summary["methods"]
    assert [m["sweep_value"] for m in ms] == [0, 0.5, 1] and len({m["group"] for m in ms}) == 1
    assert all(m["sweep_key"] == "fidelity" and m["load_kwargs"] == {"fidelity_delta": str(path)} for m in ms)
    assert len({round(m["means"]["psnr"], 6) for m in ms}) == 3
    lq = read_image(tmp_path / "lq" / "p0.png")
    for m in ms:
        want = _reference(desc, delta, m["sweep_value"])(lq).to_numpy()
        got = np.asarray(Image.open(tmp_path / "b" / "sr" / m["slug"] / "p0.png").convert("RGB"))
        assert np.array_equal(got, want)
    assert 'class="sweep"' in (tmp_path / "b" / "report.html").read_text()


# ------------------------------------------------------------------------------------------------ trainer
@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    import skimage.data
    from PIL import Image

    d = tmp_path_factory.mktemp("fid-hq")
    for n in ("astronaut", "coffee"):
        Image.fromarray(getattr(skimage.data, n)()[:160, :160, :3]).save(d / f"{n}.png")
    return d


def _fid_cfg(photos, out, extra=()):
    from realisr.train.config import load_recipe

    return load_recipe("realesrgan-fidelity", [f"data.hq=[{photos}]", f"output_dir={out}", "data.crop_size=32",
                                               "fidelity.train_blocks=1", "fidelity.num_patches=20",
                                               "fidelity.steps=6", "fidelity.batch_size=2", "fidelity.lr=1e-3",
                                               "train.checkpoint_every=2", "train.log_every=1", *extra])


class _Kill(Exception):
    pass


def test_delta_trainer_resumes_exactly_and_the_delta_is_the_trained_model(photos, tmp_path, photo):
    from safetensors import safe_open

    from realisr.train.trainer_fidelity import FidelityTrainer

    ref = FidelityTrainer(_fid_cfg(photos, tmp_path / "a"), descriptor=_desc()).train()

    def kill(event):
        if event.stage == "train" and event.current == 3:
            raise _Kill

    with pytest.raises(_Kill):
        FidelityTrainer(_fid_cfg(photos, tmp_path / "b"), callback=kill, descriptor=_desc()).train()
    done = FidelityTrainer(_fid_cfg(photos, tmp_path / "b", ["train.resume=latest"]), descriptor=_desc()).train()
    with safe_open(ref["delta"], "pt") as fa, safe_open(done["delta"], "pt") as fb:
        assert fa.keys() == fb.keys() and len(fa.keys()) > 0
        assert all(torch.equal(fa.get_tensor(k), fb.get_tensor(k)) for k in fa.keys())
        meta = fa.metadata()
        assert all(k.startswith(("model.1.sub.1.", "model.1.sub.2.", "model.3.", "model.6.", "model.8.", "model.10."))
                   for k in fa.keys())
    assert meta["format"] == DELTA_FORMAT and "BSD-3-Clause" in meta["license"]
    assert json.loads(meta["training_photos"]) == ["astronaut.png", "coffee.png"]
    # the shipped delta at F=1 runs the trained weights
    trained = FidelityTrainer(_fid_cfg(photos, tmp_path / "c", ["fidelity.steps=2"]), descriptor=_desc())
    summary = trained.train()
    pipe = _pipe(_desc(), summary["delta"])
    img = photo[:16, :16]
    tr = GANPipeline(_spec(), device="cpu", descriptor=copy.deepcopy(trained.descriptor))
    assert np.abs(pipe(img, tile=0, fidelity=1.0).pixels - tr(img, tile=0).pixels).max() < 2e-3  # fp16 delta


def test_lowpass_of_the_delta_objective_matches_scipy():
    import math

    from scipy.ndimage import gaussian_filter

    from realisr.train.trainer_fidelity import gaussian_lowpass

    x = torch.rand(1, 3, 20, 24, dtype=torch.float64)
    sigma = 1.5
    got = gaussian_lowpass(x, sigma)[0].numpy()
    r = math.ceil(3 * sigma)
    want = np.stack([gaussian_filter(x[0, c].numpy(), sigma, mode="mirror", truncate=r / sigma) for c in range(3)])
    assert np.abs(got - want).max() < 1e-10
