"""Conversion parity: our PyTorch (spandrel) models against independent evaluations of the ncnn graphs.

The reference is a small numpy interpreter (tests/helpers/ncnn_numpy.py) that reads the .param/.bin itself;
where the `ncnn` runtime is installed it is a second, fully independent reference.
"""

import shutil
import struct

import numpy as np
import pytest

from helpers import ncnn_numpy
from realisr.errors import CheckpointError
from realisr.registry import get_spec
from realisr.weights.ncnn import convert_ncnn, parse_param
from realisr.weights.status import ncnn_files

GAN_MODELS = ["realesrgan-x4plus", "realsr-df2k-x4", "realesrgan-x4plus-anime", "realesr-animevideov3-x4"]


def _files(model_id):
    param, binf, why = ncnn_files(get_spec(model_id))
    if param is None:
        pytest.skip(why)
    return param, binf


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """The CPU is shared: many small convolutions run far faster on one thread than on contended threads."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def crop():
    """A 24x24 crop of a real photo (face/helmet edge of the astronaut), CHW float32 in [0, 1]."""
    import skimage.data

    return np.ascontiguousarray(skimage.data.astronaut()[100:124, 200:224].transpose(2, 0, 1)).astype(np.float32) / 255


_OURS: dict = {}


def _ours(model_id, chw):
    """Our converted model's output on ``chw`` (computed once per model for this module's crop)."""
    import torch

    from realisr.weights.gan import load_gan_descriptor

    if model_id not in _OURS:
        model = load_gan_descriptor(get_spec(model_id)).model
        with torch.inference_mode():
            _OURS[model_id] = model(torch.from_numpy(chw)[None].float())[0].double().numpy()
    return _OURS[model_id]


@pytest.mark.parametrize("model_id", GAN_MODELS)
def test_converted_model_matches_numpy_ncnn_interpreter(model_id, crop):
    param, binf = _files(model_id)
    ref = ncnn_numpy.run(param, binf, crop)
    ours = _ours(model_id, crop)
    assert ours.shape == ref.shape == (3, 96, 96)
    assert np.abs(ours - ref).max() <= 1e-4
    # the output is an image, not a constant: the comparison is meaningful
    assert ref.std() > 0.05


@pytest.mark.parametrize("model_id", GAN_MODELS)
def test_converted_model_matches_ncnn_runtime(model_id, crop):
    pytest.importorskip("ncnn")
    from helpers.ncnn_runtime import run_ncnn

    param, binf = _files(model_id)
    assert np.abs(_ours(model_id, crop) - run_ncnn(param, binf, crop)).max() <= 1e-4


def test_every_tensor_filled_and_every_byte_used():
    param, binf = _files("realesrgan-x4plus")
    sd = convert_ncnn(param, binf, "RRDBNet")
    assert len(sd) == 2 * (1 + 23 * 3 * 5 + 5)
    assert sd["body.22.rdb3.conv5.weight"].shape == (64, 64 + 4 * 32, 3, 3)
    assert sd["conv_last.weight"].shape == (3, 64, 3, 3)
    # fp16 weights behind a 4-byte tag per convolution, fp32 biases
    n_w = sum(v.size for k, v in sd.items() if k.endswith("weight"))
    n_b = sum(v.size for k, v in sd.items() if k.endswith("bias"))
    n_conv = len(parse_param(param).of_type("Convolution"))
    assert binf.stat().st_size == n_conv * 4 + n_w * 2 + n_b * 4


def _compact_copy(tmp_path):
    param, binf = _files("realesr-animevideov3-x4")
    p, b = tmp_path / "m.param", tmp_path / "m.bin"
    shutil.copy(param, p)
    shutil.copy(binf, b)
    return p, b


def test_fp32_storage_tag_is_read(tmp_path):
    """Re-store the first convolution's weights as raw fp32 (tag 0): the conversion must not change."""
    p, b = _compact_copy(tmp_path)
    data = b.read_bytes()
    first = parse_param(p).of_type("Convolution")[0]
    n = int(first.params[6])
    assert struct.unpack_from("<I", data, 0)[0] == 0x01306B47
    w16 = np.frombuffer(data, dtype="<f2", count=n, offset=4)
    rest = data[4 + (2 * n + 3) // 4 * 4:]
    b.write_bytes(struct.pack("<I", 0) + w16.astype("<f4").tobytes() + rest)
    ref = convert_ncnn(*_files("realesr-animevideov3-x4"), "SRVGGNetCompact")
    got = convert_ncnn(p, b, "SRVGGNetCompact")
    assert all(np.array_equal(ref[k], got[k]) for k in ref)


@pytest.mark.parametrize("damage", ["truncate", "extra", "int8-tag"])
def test_damaged_bin_is_refused(tmp_path, damage):
    p, b = _compact_copy(tmp_path)
    data = b.read_bytes()
    if damage == "truncate":
        data = data[:-8]
    elif damage == "extra":
        data = data + b"\0" * 4
    else:
        data = struct.pack("<I", 0x000D4B38) + data[4:]
    b.write_bytes(data)
    with pytest.raises(CheckpointError):
        convert_ncnn(p, b, "SRVGGNetCompact")


def test_wrong_architecture_is_refused(tmp_path):
    p, b = _compact_copy(tmp_path)
    with pytest.raises(CheckpointError, match="does not match"):
        convert_ncnn(p, b, "RRDBNet")
    with pytest.raises(CheckpointError, match="no ncnn converter"):
        convert_ncnn(p, b, "SwinIR")


def test_rewired_graph_is_refused(tmp_path):
    """An RRDBNet graph whose trunk skips conv_first must not load (structure, not just counts, is checked)."""
    param, binf = _files("realesrgan-x4plus-anime")
    text = param.read_text().replace("BinaryOp                 Add_308                  2 1 193_splitncnn_0 500 501",
                                     "BinaryOp                 Add_308                  2 1 499 500 501")
    assert "2 1 499 500 501" in text
    p = tmp_path / "m.param"
    p.write_text(text)
    with pytest.raises(CheckpointError, match="trunk"):
        convert_ncnn(p, binf, "RRDBNet")


def test_not_a_param_file(tmp_path):
    p = tmp_path / "x.param"
    p.write_text("hello\n")
    with pytest.raises(CheckpointError, match="magic"):
        parse_param(p)
