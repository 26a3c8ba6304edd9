"""Convert ncnn ``.param``/``.bin`` models (the Real-ESRGAN / RealSR data wheels) to PyTorch state dicts.

The offline default models ship only as ncnn files inside pure-data PyPI wheels. This module reads them
and produces the state dict of the matching architecture under the key names spandrel recognises:

* RRDBNet (ESRGAN, Real-ESRGAN, RealSR) with basicsr's keys ``conv_first``, ``body.N.rdbM.convK``,
  ``conv_body``, ``conv_up1``/``conv_up2``, ``conv_hr``, ``conv_last``;
* SRVGGNetCompact with ``body.N.weight``/``body.N.bias`` (convolutions) and ``body.N.weight`` (PReLU).

No library reads ncnn weights into PyTorch (the ncnn runtime has no weight export, pnnx goes the other way),
so the small parser is written here. Layers are mapped by graph structure: the convolutions are taken in
the order ncnn runs them and every one is checked against the architecture (channels, kernel, activation,
and the wiring of residuals, upsampling and the trunk), so a graph that does not match fails with a
:class:`~realisr.errors.CheckpointError` instead of loading garbage.

File formats (ncnn ``src/net.cpp``, ``src/modelbin.cpp``, ``src/paramdict.cpp``):

* ``.param``: magic ``7767517``, ``layer_count blob_count``, then one line per layer:
  ``Type name n_in n_out in_blobs... out_blobs... k=v ...``; ``-233xx=n,v1,...,vn`` is array param ``xx``.
* ``.bin``: the layers' weights, concatenated in layer order. A Convolution stores its weight behind a
  4-byte tag (``0x01306B47``: fp16, padded to 4 bytes; ``0``: raw fp32), then its bias as raw fp32;
  PReLU stores its slopes as raw fp32.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import numpy as np

from ..errors import CheckpointError

logger = logging.getLogger(__name__)

__all__ = ["NcnnLayer", "NcnnGraph", "parse_param", "read_weights", "convert_ncnn", "SUPPORTED_ARCHS"]

PARAM_MAGIC = 7767517
TAG_FP16 = 0x01306B47
TAG_FP32 = 0x00000000
TAG_FP32_SCALED = 0x0002C056  # raw fp32 too (ncnn's "raw data with extra scaling"); the scale is elsewhere
TAG_INT8 = 0x000D4B38

# ncnn Convolution param ids.
_NUM_OUTPUT, _KERNEL_W, _DILATION_W, _STRIDE_W, _PAD_LEFT, _BIAS_TERM, _WEIGHT_SIZE = 0, 1, 2, 3, 4, 5, 6
_INT8_SCALE, _ACT_TYPE, _ACT_PARAMS = 8, 9, 10
_ACT_NONE, _ACT_RELU, _ACT_LEAKY = 0, 1, 2

# Layer types without weights that the supported graphs use; anything else with weights is refused.
_WEIGHTLESS = {"Input", "Split", "Concat", "Eltwise", "BinaryOp", "Interp", "PixelShuffle", "Noop"}

ParamValue = Union[int, float, list]


@dataclass(eq=False)  # identity comparison: layers are graph nodes
class NcnnLayer:
    """One layer of an ncnn graph.

    Attributes:
        type: ncnn layer type (``Convolution``, ``Split``, ...).
        name: layer name.
        bottoms: input blob names.
        tops: output blob names.
        params: ``{id: value}``; array params (``-233xx``) are stored under ``xx`` as lists.
        weights: filled by :func:`read_weights` (``weight``, ``bias``, ``slope``), float32 arrays.
    """

    type: str
    name: str
    bottoms: list[str]
    tops: list[str]
    params: dict[int, ParamValue]
    weights: dict[str, np.ndarray] = field(default_factory=dict)

    def p(self, key: int, default: ParamValue = 0) -> ParamValue:
        return self.params.get(key, default)


@dataclass
class NcnnGraph:
    """A parsed ``.param`` file: layers in file (= execution) order and blob producers/consumers."""

    layers: list[NcnnLayer]
    path: str = "<param>"

    def __post_init__(self):
        self.producer: dict[str, NcnnLayer] = {}
        self.consumers: dict[str, list[NcnnLayer]] = {}
        for layer in self.layers:
            for b in layer.bottoms:
                if b not in self.producer:
                    raise CheckpointError(f"{self.path}: layer {layer.name} reads blob {b!r} before it is produced")
                self.consumers.setdefault(b, []).append(layer)
            for t in layer.tops:
                self.producer[t] = layer

    def of_type(self, *types: str) -> list[NcnnLayer]:
        return [layer for layer in self.layers if layer.type in types]

    def source(self, blob: str) -> NcnnLayer:
        """The layer producing ``blob``, looking through ``Split`` (which only copies its input)."""
        layer = self.producer[blob]
        while layer.type == "Split":
            layer = self.producer[layer.bottoms[0]]
        return layer

    def sources(self, layer: NcnnLayer) -> list[NcnnLayer]:
        return [self.source(b) for b in layer.bottoms]


def _parse_value(text: str) -> Union[int, float]:
    if any(c in text for c in ".eE") and not text.lstrip("-").isdigit():
        return float(text)
    return int(text)


def parse_param(path) -> NcnnGraph:
    """Parse an ncnn text ``.param`` file.

    Args:
        path: the ``.param`` file.

    Returns:
        The :class:`NcnnGraph`.

    Raises:
        CheckpointError: not a text ncnn param file, or a malformed line.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot read ncnn param file {path}: {e}") from e
    lines = [ln for ln in lines if ln.strip()]
    if not lines or lines[0].strip() != str(PARAM_MAGIC):
        raise CheckpointError(f"{path} is not a text ncnn .param file (magic {PARAM_MAGIC} missing)")
    try:
        n_layers, n_blobs = (int(v) for v in lines[1].split())
        layers = []
        for ln in lines[2:]:
            tok = ln.split()
            typ, name, n_in, n_out = tok[0], tok[1], int(tok[2]), int(tok[3])
            bottoms, tops = tok[4:4 + n_in], tok[4 + n_in:4 + n_in + n_out]
            if len(tops) != n_out:
                raise ValueError(f"layer {name}: expected {n_in} inputs and {n_out} outputs")
            params: dict[int, ParamValue] = {}
            for kv in tok[4 + n_in + n_out:]:
                k, _, v = kv.partition("=")
                key = int(k)
                if key <= -23300:
                    vals = v.split(",")
                    count = int(vals[0])
                    if count != len(vals) - 1:
                        raise ValueError(f"layer {name}: array param {key} announces {count} values")
                    params[-key - 23300] = [_parse_value(x) for x in vals[1:]]
                else:
                    params[key] = _parse_value(v)
            layers.append(NcnnLayer(typ, name, bottoms, tops, params))
    except (ValueError, IndexError) as e:
        raise CheckpointError(f"malformed ncnn param file {path}: {e}") from e
    if len(layers) != n_layers:
        raise CheckpointError(f"{path}: header announces {n_layers} layers, found {len(layers)}")
    return NcnnGraph(layers, str(path))


class _Reader:
    def __init__(self, data: bytes, path: str):
        self.data, self.off, self.path = data, 0, path

    def take(self, nbytes: int, what: str) -> bytes:
        if self.off + nbytes > len(self.data):
            raise CheckpointError(f"{self.path} is truncated: {what} needs {nbytes} bytes at offset {self.off}, "
                                  f"the file has {len(self.data)}; reinstall the weights")
        chunk = self.data[self.off:self.off + nbytes]
        self.off += nbytes
        return chunk

    def raw_fp32(self, count: int, what: str) -> np.ndarray:
        return np.frombuffer(self.take(4 * count, what), dtype="<f4").astype(np.float32)

    def tagged(self, count: int, what: str) -> np.ndarray:
        """ncnn ``ModelBin::load(w, type=0)``: a 4-byte tag says how the data is stored."""
        (tag,) = struct.unpack("<I", self.take(4, what + " tag"))
        if tag == TAG_FP16:
            nbytes = (2 * count + 3) // 4 * 4
            return np.frombuffer(self.take(nbytes, what), dtype="<f2")[:count].astype(np.float32)
        if tag in (TAG_FP32, TAG_FP32_SCALED):
            return self.raw_fp32(count, what)
        kind = "int8" if tag == TAG_INT8 else "quantized (lookup-table)"
        raise CheckpointError(f"{self.path}: {what} is stored as {kind} data (tag 0x{tag:08X}), which realisr "
                              "does not convert; use an fp16/fp32 ncnn model")


def read_weights(graph: NcnnGraph, bin_path) -> NcnnGraph:
    """Read the ``.bin`` file into ``layer.weights`` in the order ncnn loads it.

    Convolution weights become ``[out, in, kh, kw]`` arrays, biases ``[out]``, PReLU slopes ``[n]``.

    Raises:
        CheckpointError: a layer type with weights that is not supported, int8/quantized data, a
            truncated file, or bytes left over after the last layer.
    """
    bin_path = Path(bin_path)
    try:
        data = bin_path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"cannot read ncnn weights {bin_path}: {e}") from e
    r = _Reader(data, str(bin_path))
    for layer in graph.layers:
        if layer.type == "Convolution":
            out_ch, kw = int(layer.p(_NUM_OUTPUT)), int(layer.p(_KERNEL_W))
            kh = int(layer.p(11, kw))
            size = int(layer.p(_WEIGHT_SIZE))
            if int(layer.p(_INT8_SCALE)) or int(layer.p(19, 0)):
                raise CheckpointError(f"{graph.path}: {layer.name} is an int8 or dynamic-weight convolution, "
                                      "which realisr does not convert")
            if size <= 0 or size % (out_ch * kh * kw):
                raise CheckpointError(f"{graph.path}: {layer.name} has weight_data_size {size}, not a multiple "
                                      f"of {out_ch}x{kh}x{kw}")
            in_ch = size // (out_ch * kh * kw)
            w = r.tagged(size, f"{layer.name} weight")
            layer.weights["weight"] = w.reshape(out_ch, in_ch, kh, kw)
            if int(layer.p(_BIAS_TERM)):
                layer.weights["bias"] = r.raw_fp32(out_ch, f"{layer.name} bias")
        elif layer.type == "PReLU":
            layer.weights["slope"] = r.raw_fp32(int(layer.p(0)), f"{layer.name} slope")
        elif layer.type not in _WEIGHTLESS:
            raise CheckpointError(f"{graph.path}: layer type {layer.type} ({layer.name}) is not supported by the "
                                  "ncnn converter")
    if r.off != len(data):
        raise CheckpointError(f"{bin_path}: {len(data) - r.off} bytes left over after the last layer; the .bin "
                              "does not belong to this .param")
    return graph


# ----------------------------------------------------------------------------------------------------------
# Architecture mapping.


def _fail(graph: NcnnGraph, msg: str):
    raise CheckpointError(f"{graph.path} does not match the expected architecture: {msg}")


def _check_conv(graph: NcnnGraph, layer: NcnnLayer, what: str, in_ch: int, out_ch: int,
                act: Optional[float], act_type: int = _ACT_LEAKY):
    """Check a 3x3 stride-1 pad-1 convolution with bias; ``act`` is the leaky slope (None: no activation)."""
    w = layer.weights.get("weight")
    if layer.type != "Convolution" or w is None:
        _fail(graph, f"{what}: expected a Convolution, found {layer.type} {layer.name}")
    if w.shape != (out_ch, in_ch, 3, 3):
        _fail(graph, f"{what} ({layer.name}): weight shape {w.shape}, expected {(out_ch, in_ch, 3, 3)}")
    geometry = [layer.p(_STRIDE_W, 1), layer.p(13, layer.p(_STRIDE_W, 1)), layer.p(_DILATION_W, 1),
                layer.p(12, layer.p(_DILATION_W, 1)), layer.p(_PAD_LEFT), layer.p(14, layer.p(_PAD_LEFT)),
                layer.p(15, layer.p(_PAD_LEFT)), layer.p(16, layer.p(14, layer.p(_PAD_LEFT)))]
    if geometry != [1, 1, 1, 1, 1, 1, 1, 1]:
        _fail(graph, f"{what} ({layer.name}): expected stride 1, dilation 1, padding 1")
    if "bias" not in layer.weights:
        _fail(graph, f"{what} ({layer.name}): expected a bias")
    t = int(layer.p(_ACT_TYPE))
    if act is None:
        if t != _ACT_NONE:
            _fail(graph, f"{what} ({layer.name}): unexpected activation type {t}")
    else:
        slope = (layer.p(_ACT_PARAMS, [0.0]) or [0.0])[0]
        if t != act_type or abs(float(slope) - act) > 1e-6:
            _fail(graph, f"{what} ({layer.name}): expected leaky ReLU({act}), found type {t} slope {slope}")


def _check_eltwise_residual(graph: NcnnGraph, layer: NcnnLayer, branch: NcnnLayer, skip: NcnnLayer, what: str):
    """``layer`` must compute ``0.2 * branch + skip`` (the residual scaling of RRDBNet)."""
    if layer.type != "Eltwise" or int(layer.p(0)) != 1:
        _fail(graph, f"{what}: expected an Eltwise sum, found {layer.type} {layer.name}")
    coeffs = [float(c) for c in (layer.p(1, []) or [1.0, 1.0])]
    pairs = list(zip(graph.sources(layer), coeffs))
    if len(pairs) != 2 or sorted((id(s), round(c, 6)) for s, c in pairs) != sorted(
            [(id(branch), 0.2), (id(skip), 1.0)]):
        _fail(graph, f"{what} ({layer.name}): expected 0.2 * {branch.name} + {skip.name}")


def _consumer_of(graph: NcnnGraph, layer: NcnnLayer, types: tuple[str, ...]) -> list[NcnnLayer]:
    """Layers of ``types`` that read ``layer``'s output, through Splits."""
    found, todo = [], list(layer.tops)
    while todo:
        blob = todo.pop()
        for c in graph.consumers.get(blob, []):
            if c.type == "Split":
                todo.extend(c.tops)
            elif c.type in types:
                found.append(c)
    return found


def _rrdbnet(graph: NcnnGraph) -> dict[str, np.ndarray]:
    convs = graph.of_type("Convolution")
    if not convs or (len(convs) - 6) % 15:
        _fail(graph, f"{len(convs)} convolutions is not 1 + 15 * num_blocks + 5 (RRDBNet x4)")
    nb = (len(convs) - 6) // 15
    first = convs[0]
    nf = first.weights["weight"].shape[0]
    gc = convs[1].weights["weight"].shape[0]
    in_nc = first.weights["weight"].shape[1]
    _check_conv(graph, first, "conv_first", in_nc, nf, None)
    if graph.source(first.bottoms[0]).type != "Input":
        _fail(graph, "conv_first does not read the input")
    sd: dict[str, np.ndarray] = {"conv_first.weight": first.weights["weight"], "conv_first.bias": first.weights["bias"]}
    i = 1
    block_in = first
    for b in range(nb):
        rdb_in = block_in
        for r in range(1, 4):
            feats = [rdb_in]
            for k in range(1, 6):
                conv = convs[i]
                i += 1
                last = k == 5
                _check_conv(graph, conv, f"body.{b}.rdb{r}.conv{k}", nf + (k - 1) * gc, nf if last else gc,
                            None if last else 0.2)
                srcs = graph.sources(conv)
                if len(srcs) == 1 and srcs[0].type == "Concat":
                    srcs = graph.sources(srcs[0])
                if [id(s) for s in srcs] != [id(f) for f in feats]:
                    _fail(graph, f"body.{b}.rdb{r}.conv{k} ({conv.name}) does not read the dense-block "
                                 "concatenation of the previous features")
                feats.append(conv)
                for key, arr in conv.weights.items():
                    sd[f"body.{b}.rdb{r}.conv{k}.{key}"] = arr
            adds = [e for e in _consumer_of(graph, feats[-1], ("Eltwise",))]
            if len(adds) != 1:
                _fail(graph, f"body.{b}.rdb{r}: the residual sum after {feats[-1].name} is missing")
            _check_eltwise_residual(graph, adds[0], feats[-1], rdb_in, f"body.{b}.rdb{r} residual")
            rdb_in = adds[0]
        outer = _consumer_of(graph, rdb_in, ("Eltwise",))
        if len(outer) != 1:
            _fail(graph, f"body.{b}: the RRDB residual sum is missing")
        _check_eltwise_residual(graph, outer[0], rdb_in, block_in, f"body.{b} residual")
        block_in = outer[0]
    names = ["conv_body", "conv_up1", "conv_up2", "conv_hr", "conv_last"]
    tail = convs[i:]
    for name, conv, (cin, cout, act) in zip(names, tail, [(nf, nf, None), (nf, nf, 0.2), (nf, nf, 0.2),
                                                          (nf, nf, 0.2), (nf, None, None)]):
        cout = conv.weights["weight"].shape[0] if cout is None else cout
        _check_conv(graph, conv, name, cin, cout, act)
        for key, arr in conv.weights.items():
            sd[f"{name}.{key}"] = arr
    body, up1, up2, hr, last = tail
    if graph.sources(body) != [block_in]:
        _fail(graph, "conv_body does not read the output of the last RRDB")
    trunk = graph.sources(up1)[0]
    if trunk.type != "Interp":
        _fail(graph, "conv_up1 is not preceded by an upsampling (Interp)")
    for interp, prev in ((trunk, None), (graph.sources(up2)[0], up1)):
        if interp.type != "Interp" or int(interp.p(0)) != 1 or [float(interp.p(1, 1.0)), float(interp.p(2, 1.0))] \
                != [2.0, 2.0]:
            _fail(graph, f"{interp.name}: expected nearest-neighbour x2 upsampling")
        if prev is not None and graph.sources(interp) != [prev]:
            _fail(graph, f"{interp.name} does not upsample the output of {prev.name}")
    add = graph.sources(trunk)[0]
    if add.type not in ("BinaryOp", "Eltwise") or int(add.p(0)) != (0 if add.type == "BinaryOp" else 1) \
            or {id(s) for s in graph.sources(add)} != {id(first), id(body)}:
        _fail(graph, "the trunk is not conv_first + conv_body")
    if add.type == "Eltwise" and [float(c) for c in (add.p(1, []) or [1.0, 1.0])] != [1.0, 1.0]:
        _fail(graph, "the trunk sum is weighted")
    if graph.sources(hr) != [up2] or graph.sources(last) != [hr]:
        _fail(graph, "conv_hr/conv_last are not chained after conv_up2")
    return sd


def _srvgg(graph: NcnnGraph) -> dict[str, np.ndarray]:
    convs = graph.of_type("Convolution")
    prelus = graph.of_type("PReLU")
    if len(convs) < 2 or len(prelus) != len(convs) - 1:
        _fail(graph, f"{len(convs)} convolutions and {len(prelus)} PReLUs: expected n convolutions, n-1 PReLUs")
    nf = convs[0].weights["weight"].shape[0]
    in_nc = convs[0].weights["weight"].shape[1]
    sd: dict[str, np.ndarray] = {}
    prev: Optional[NcnnLayer] = None
    for j, conv in enumerate(convs):
        last = j == len(convs) - 1
        out = conv.weights["weight"].shape[0] if last else nf
        _check_conv(graph, conv, f"body.{2 * j}", in_nc if j == 0 else nf, out, None)
        src = graph.source(conv.bottoms[0])
        if (j == 0 and src.type != "Input") or (j > 0 and src is not prev):
            _fail(graph, f"body.{2 * j} ({conv.name}) is not chained after the previous activation")
        sd[f"body.{2 * j}.weight"] = conv.weights["weight"]
        sd[f"body.{2 * j}.bias"] = conv.weights["bias"]
        if not last:
            act = prelus[j]
            if graph.sources(act) != [conv] or act.weights["slope"].shape != (nf,):
                _fail(graph, f"body.{2 * j + 1} ({act.name}) is not a {nf}-channel PReLU after {conv.name}")
            sd[f"body.{2 * j + 1}.weight"] = act.weights["slope"]
            prev = act
    shuffles = _consumer_of(graph, convs[-1], ("PixelShuffle",))
    if len(shuffles) != 1 or int(shuffles[0].p(1, 0)) != 0:
        _fail(graph, "the last convolution is not followed by a (PyTorch-order) PixelShuffle")
    r = int(shuffles[0].p(0))
    if convs[-1].weights["weight"].shape[0] != in_nc * r * r:
        _fail(graph, f"the last convolution has {convs[-1].weights['weight'].shape[0]} channels, "
                     f"expected {in_nc}x{r}x{r}")
    adds = _consumer_of(graph, shuffles[0], ("BinaryOp",))
    if len(adds) != 1 or int(adds[0].p(0)) != 0:
        _fail(graph, "the PixelShuffle output is not added to the upsampled input")
    base = [s for s in graph.sources(adds[0]) if s is not shuffles[0]]
    if len(base) != 1 or base[0].type != "Interp" or int(base[0].p(0)) != 1 \
            or graph.source(base[0].bottoms[0]).type != "Input" \
            or [float(base[0].p(1, 1.0)), float(base[0].p(2, 1.0))] != [float(r), float(r)]:
        _fail(graph, f"the skip branch is not a nearest x{r} upsampling of the input")
    return sd


SUPPORTED_ARCHS = {"RRDBNet": _rrdbnet, "SRVGGNetCompact": _srvgg}


def convert_ncnn(param_path, bin_path, arch: str) -> dict[str, np.ndarray]:
    """Convert an ncnn model to the state dict of ``arch`` (basicsr key names, float32 numpy arrays).

    Args:
        param_path: the ``.param`` file.
        bin_path: the ``.bin`` file.
        arch: ``"RRDBNet"`` or ``"SRVGGNetCompact"``.

    Returns:
        ``{key: float32 array}``; every tensor of the architecture is filled and every weight of the file used.

    Raises:
        CheckpointError: unreadable files, unsupported layers or storage, or a graph that does not match ``arch``.
    """
    if arch not in SUPPORTED_ARCHS:
        raise CheckpointError(f"no ncnn converter for architecture {arch!r}: supported are "
                              f"{', '.join(SUPPORTED_ARCHS)}")
    graph = read_weights(parse_param(param_path), bin_path)
    sd = SUPPORTED_ARCHS[arch](graph)
    used = sum(a.size for a in sd.values())
    stored = sum(a.size for layer in graph.layers for a in layer.weights.values())
    if used != stored:
        _fail(graph, f"{stored - used} weights of the file are not used by {arch}")
    logger.debug("converted %s: %d tensors, %d parameters", param_path, len(sd), used)
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in sd.items()}
