"""A tiny, independent numpy interpreter of ncnn graphs: the reference for the conversion-parity tests.

It reads the ``.param`` text and the ``.bin`` weights itself (it shares no code with
``realisr.weights.ncnn``, the code under test) and runs the layers the Real-ESRGAN/RealSR graphs use, in
float64, on one CHW image. Semantics follow ncnn's reference layer implementations (src/layer/*.cpp).
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np


def single_thread_blas():
    """Best effort: make numpy's OpenBLAS single-threaded. On a shared, oversubscribed CPU its spinning
    worker threads make small matrix products several times slower than one thread."""
    import ctypes
    import glob
    import os

    libs = glob.glob(os.path.join(os.path.dirname(np.__file__) + ".libs", "*openblas*"))
    for lib in libs:
        for sym in ("scipy_openblas_set_num_threads64_", "openblas_set_num_threads64_", "openblas_set_num_threads"):
            try:
                getattr(ctypes.CDLL(lib), sym)(1)
                return True
            except (OSError, AttributeError):
                continue
    return False


def _num(text):
    try:
        return int(text)
    except ValueError:
        return float(text)


def load_graph(param_path):
    """``[(type, name, bottoms, tops, params)]`` from a text .param (array params under ``"aN"`` keys)."""
    lines = [ln.split() for ln in Path(param_path).read_text().splitlines() if ln.strip()]
    assert lines[0] == ["7767517"], "not an ncnn text param file"
    layers = []
    for tok in lines[2:]:
        n_in, n_out = int(tok[2]), int(tok[3])
        params = {}
        for item in tok[4 + n_in + n_out:]:
            key, value = item.split("=")
            key = int(key)
            if key < -23300:
                values = value.split(",")
                params[f"a{-key - 23300}"] = [_num(v) for v in values[1:int(values[0]) + 1]]
            else:
                params[key] = _num(value)
        layers.append((tok[0], tok[1], tok[4:4 + n_in], tok[4 + n_in:4 + n_in + n_out], params))
    assert len(layers) == int(lines[1][0])
    return layers


def load_bin(layers, bin_path):
    """Per-layer weights ``{name: {...}}`` read from the .bin in layer order; asserts it is fully consumed."""
    blob = Path(bin_path).read_bytes()
    pos = 0
    out = {}

    def floats(n):
        nonlocal pos
        vals = struct.unpack_from(f"<{n}f", blob, pos)
        pos += 4 * n
        return np.array(vals, dtype=np.float64)

    for typ, name, _b, _t, p in layers:
        if typ == "Convolution":
            n = p[6]
            tag = struct.unpack_from("<I", blob, pos)[0]
            pos += 4
            if tag == 0x01306B47:
                w = np.frombuffer(blob, dtype="<f2", count=n, offset=pos).astype(np.float64)
                pos += (2 * n + 3) & ~3
            elif tag == 0:
                w = floats(n)
            else:
                raise NotImplementedError(f"weight storage tag {tag:#x}")
            kw = p.get(1, 0)
            kh = p.get(11, kw)
            w = w.reshape(p[0], -1, kh, kw)
            out[name] = {"w": w, "b": floats(p[0]) if p.get(5, 0) else np.zeros(p[0])}
        elif typ == "PReLU":
            out[name] = {"slope": floats(p.get(0, 1))}
    assert pos == len(blob), f"{len(blob) - pos} bytes of the .bin unread"
    return out


def _conv(x, w, b, p):
    kw = p.get(1, 0)
    kh = p.get(11, kw)
    dw, sw = p.get(2, 1), p.get(3, 1)
    dh, sh = p.get(12, dw), p.get(13, sw)
    pl = p.get(4, 0)
    pt, pr = p.get(14, pl), p.get(15, pl)
    pb = p.get(16, pt)
    assert min(pl, pt, pr, pb) >= 0, "SAME padding (-233) not needed by these graphs"
    x = np.pad(x, ((0, 0), (pt, pb), (pl, pr)), constant_values=p.get(18, 0.0))
    c, hp, wp = x.shape
    ho = (hp - (dh * (kh - 1) + 1)) // sh + 1
    wo = (wp - (dw * (kw - 1) + 1)) // sw + 1
    cols = np.empty((c, kh, kw, ho, wo), dtype=x.dtype)  # im2col
    for i in range(kh):
        for j in range(kw):
            cols[:, i, j] = x[:, i * dh:i * dh + sh * (ho - 1) + 1:sh, j * dw:j * dw + sw * (wo - 1) + 1:sw]
    y = w.reshape(w.shape[0], -1) @ cols.reshape(c * kh * kw, ho * wo) + b[:, None]
    y = y.reshape(-1, ho, wo)
    act, ap = p.get(9, 0), p.get("a10", [])
    if act == 1:
        y = np.where(y > 0, y, y * ap[0] if ap else 0.0)
    elif act == 2:
        y = np.where(y > 0, y, y * ap[0])
    elif act == 3:
        y = np.clip(y, ap[0], ap[1])
    elif act == 4:
        y = 1.0 / (1.0 + np.exp(-y))
    elif act != 0:
        raise NotImplementedError(f"activation type {act}")
    return y


def _interp(x, p):
    mode = p.get(0, 0)
    assert mode == 1, "only nearest-neighbour Interp is used by these graphs"
    c, h, w = x.shape
    oh = p.get(3, 0) or int(h * p.get(1, 1.0))
    ow = p.get(4, 0) or int(w * p.get(2, 1.0))
    ys = np.minimum((np.arange(oh) * (h / oh)).astype(int), h - 1)
    xs = np.minimum((np.arange(ow) * (w / ow)).astype(int), w - 1)
    return x[:, ys][:, :, xs]


def _pixel_shuffle(x, p):
    r, mode = p[0], p.get(1, 0)
    c, h, w = x.shape
    oc = c // (r * r)
    y = np.empty((oc, h * r, w * r), dtype=x.dtype)
    for q in range(oc):
        for i in range(r):
            for j in range(r):
                src = q * r * r + i * r + j if mode == 0 else (i * r + j) * oc + q
                y[q, i::r, j::r] = x[src]
    return y


def run(param_path, bin_path, image, input_blob="data", output_blob="output"):
    """Run the graph on ``image`` (CHW float array) and return the output blob (CHW float64)."""
    single_thread_blas()
    layers = load_graph(param_path)
    weights = load_bin(layers, bin_path)
    blobs = {}
    for typ, name, bottoms, tops, p in layers:
        xs = [blobs[b] for b in bottoms]
        if typ == "Input":
            out = [np.asarray(image, dtype=np.float64)]
        elif typ == "Split":
            out = [xs[0]] * len(tops)
        elif typ == "Convolution":
            out = [_conv(xs[0], weights[name]["w"], weights[name]["b"], p)]
        elif typ == "Concat":
            assert p.get(0, 0) == 0
            out = [np.concatenate(xs, axis=0)]
        elif typ == "Eltwise":
            op, coeffs = p.get(0, 1), p.get("a1", [])
            if op == 1:
                coeffs = coeffs or [1.0] * len(xs)
                out = [sum(c * v for c, v in zip(coeffs, xs))]
            elif op == 0:
                out = [np.prod(xs, axis=0)]
            else:
                out = [np.max(xs, axis=0)]
        elif typ == "BinaryOp":
            op = p.get(0, 0)
            a, b = (xs[0], p.get(2, 0.0)) if p.get(1, 0) else xs
            out = [{0: np.add, 1: np.subtract, 2: np.multiply, 3: np.divide}[op](a, b)]
        elif typ == "Interp":
            out = [_interp(xs[0], p)]
        elif typ == "PixelShuffle":
            out = [_pixel_shuffle(xs[0], p)]
        elif typ == "PReLU":
            s = weights[name]["slope"]
            s = s[:, None, None] if s.size > 1 else s[0]
            out = [np.where(xs[0] > 0, xs[0], xs[0] * s)]
        else:
            raise NotImplementedError(typ)
        for t, v in zip(tops, out):
            blobs[t] = v
    return blobs[output_blob]
