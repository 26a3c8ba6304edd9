"""A Winograd F(4x4, 3x3) CPU forward for RRDBNet (ESRGAN / Real-ESRGAN / RealSR) in fp32.

Why this exists: on CPUs without AVX-512, oneDNN (PyTorch's CPU convolution) has no Winograd kernels, and
RRDBNet spends >90% of its time in 3x3 convolutions, so a plain PyTorch forward is FLOP-bound at ~2x the
time of ncnn (which uses Winograd). No library provides Winograd convolution for PyTorch on CPU, so it is
written here with plain tensor ops: a 3x3 convolution becomes 36 batched matrix products on 6x6 input tiles
(``Y = A^T [(G g G^T) . (B^T d B)] A``, Lavin & Gray 2016), 2.25 instead of 9 multiply-adds per weight and
output pixel. RRDBNet's dense blocks reuse each feature's transformed tiles for every later convolution of
the block (the transform is linear, so the transform of a concatenation is the concatenation of transforms),
and the convolution over the concatenated features is one batched product over a channel slice.

The result equals the plain forward to ~1e-6 (fp32 rounding of the transforms); the model's weights are
only read, never changed. Only the standard x4 RRDBNet without pixel-unshuffle is handled;
:func:`winograd_rrdbnet` returns ``None`` for anything else, and callers fall back to the plain model.
"""

from __future__ import annotations

import logging
from typing import Optional

logger = logging.getLogger(__name__)

__all__ = ["winograd_rrdbnet", "WinogradRRDBNet", "winograd_conv3x3"]

# F(4x4, 3x3) with interpolation points 0, +-1, +-2 (Lavin & Gray 2016).
_BT = [[4, 0, -5, 0, 1, 0],
       [0, -4, -4, 1, 1, 0],
       [0, 4, -4, -1, 1, 0],
       [0, -2, -1, 2, 1, 0],
       [0, 2, -1, -2, 1, 0],
       [0, 4, 0, -5, 0, 1]]
_G = [[1 / 4, 0, 0],
      [-1 / 6, -1 / 6, -1 / 6],
      [-1 / 6, 1 / 6, -1 / 6],
      [1 / 24, 1 / 12, 1 / 6],
      [1 / 24, -1 / 12, 1 / 6],
      [0, 0, 1]]
_AT = [[1, 1, 1, 1, 1, 0],
       [0, 1, -1, 2, -2, 0],
       [0, 1, 1, 4, 4, 0],
       [0, 1, -1, 8, -8, 1]]
M, R, T = 4, 3, 6  # output tile, kernel, input tile


_KRON: dict = {}


def _kron(dtype):
    """``(B^T (x) B^T, A^T (x) A^T)``: the 2-D tile transforms as single ``[36, 36]`` / ``[16, 36]`` matrices,
    so each transform is one large matrix product instead of many tiny ones."""
    import torch

    if dtype not in _KRON:
        bt = torch.tensor(_BT, dtype=torch.float64)
        at = torch.tensor(_AT, dtype=torch.float64)
        _KRON[dtype] = (torch.kron(bt, bt).to(dtype), torch.kron(at, at).to(dtype))
    return _KRON[dtype]


def _at(dtype):
    import torch

    key = ("at", dtype)
    if key not in _KRON:
        _KRON[key] = torch.tensor(_AT, dtype=dtype)
    return _KRON[key]


def transform_weight(w):
    """``[cout, cin, 3, 3]`` -> ``[36, cout, cin]`` (``G g G^T``, computed in float64)."""
    import torch

    g = torch.tensor(_G, dtype=torch.float64)
    u = torch.einsum("ai,ocij,bj->aboc", g, w.double(), g)
    return u.reshape(T * T, w.shape[0], w.shape[1]).float().contiguous()


class _Geometry:
    """Tiling of an ``h x w`` map: ``th x tw`` output tiles of 4x4 (the map is zero-padded to fit)."""

    def __init__(self, n: int, h: int, w: int):
        self.n, self.h, self.w = n, h, w
        self.th, self.tw = -(-h // M), -(-w // M)
        self.tiles = n * self.th * self.tw


def input_transform(x, geo: _Geometry, out=None):
    """``[n, c, h, w]`` -> ``[c, 36, tiles]`` (``B^T d B`` of every 6x6 tile), optionally into ``out``."""
    import torch
    import torch.nn.functional as F

    n, c, h, w = x.shape
    kin, _ = _kron(x.dtype)
    hp, wp = geo.th * M + 2, geo.tw * M + 2
    xp = F.pad(x, (1, wp - w - 1, 1, hp - h - 1))
    s = xp.stride()
    # overlapping 6x6 tiles, stride 4, as [c, 6, 6, n, th, tw]: a view, then one gathering copy
    tiles = xp.as_strided((c, T, T, n, geo.th, geo.tw), (s[1], s[2], s[3], s[0], M * s[2], M * s[3]))
    d = tiles.reshape(c, T * T, geo.tiles)
    return torch.matmul(kin, d, out=out) if out is not None else torch.matmul(kin, d)


def output_transform(mm, geo: _Geometry, cout: int):
    """``[36, cout, tiles]`` -> ``[n, cout, h, w]`` (``A^T m A`` of every tile, cropped to the map)."""
    import torch

    at = _at(mm.dtype)
    # separable: A^T along a, then along b (240 instead of 576 multiply-adds per tile and channel)
    t = torch.matmul(at, mm.reshape(T, T * cout * geo.tiles))
    t = torch.matmul(at, t.view(M, T, cout * geo.tiles)).view(M, M, cout, geo.n, geo.th, geo.tw)
    y = t.permute(3, 2, 4, 0, 5, 1).reshape(geo.n, cout, geo.th * M, geo.tw * M)
    return y[:, :, :geo.h, :geo.w]


def _gemm(u, v):
    """``[36, cout, cin] x [cin, 36, tiles] -> [36, cout, tiles]``."""
    import torch

    return torch.bmm(u, v.transpose(0, 1))


def _finish(y, bias, slope: Optional[float]):
    import torch.nn.functional as F

    y = y + bias.view(1, -1, 1, 1)
    return F.leaky_relu(y, slope, inplace=True) if slope is not None else y


def winograd_conv3x3(x, u, bias, slope: Optional[float] = None, max_tiles: int = 16384):
    """A 3x3, stride-1, pad-1 convolution with pre-transformed weights ``u`` (:func:`transform_weight`).

    Large maps are processed in horizontal bands of at most ``max_tiles`` tiles to bound the memory of
    the transformed tiles (2.25x the feature map).
    """
    import torch

    n, c, h, w = x.shape
    rows = max(1, max_tiles // max(1, n * -(-w // M))) * M
    if h <= rows:
        geo = _Geometry(n, h, w)
        return _finish(output_transform(_gemm(u, input_transform(x, geo)), geo, u.shape[1]), bias, slope)
    out = []
    for y0 in range(0, h, rows):
        y1 = min(h, y0 + rows)
        band = x[:, :, max(0, y0 - 1):min(h, y1 + 1)]  # one row of context each side
        part = winograd_conv3x3_band(band, u, y0 > 0, y1 < h)
        out.append(part)
    return _finish(torch.cat(out, dim=2), bias, slope)


def winograd_conv3x3_band(band, u, ctx_top: bool, ctx_bottom: bool):
    """Convolve a band that carries one row of real context on the sides flagged; crop it off again."""
    n, c, h, w = band.shape
    geo = _Geometry(n, h, w)
    y = output_transform(_gemm(u, input_transform(band, geo)), geo, u.shape[1])
    return y[:, :, int(ctx_top):h - int(ctx_bottom)]


class WinogradRRDBNet:
    """Callable replacing a spandrel ESRGAN (RRDBNet x4) forward; weights are read from ``model``."""

    def __init__(self, model):
        import torch

        sd = {k: v.detach().float() for k, v in model.state_dict().items()}
        self.nb = sum(1 for k in sd if k.startswith("model.1.sub.") and k.endswith(".RDB1.conv1.0.weight"))
        self.first = (sd["model.0.weight"], sd["model.0.bias"])
        self.blocks = []
        for b in range(self.nb):
            rdbs = []
            for r in (1, 2, 3):
                convs = []
                for k in range(1, 6):
                    p = f"model.1.sub.{b}.RDB{r}.conv{k}.0."
                    convs.append((transform_weight(sd[p + "weight"]), sd[p + "bias"]))
                rdbs.append(convs)
            self.blocks.append(rdbs)
        body = f"model.1.sub.{self.nb}."
        self.body = (transform_weight(sd[body + "weight"]), sd[body + "bias"])
        self.up = [(transform_weight(sd[f"model.{i}.weight"]), sd[f"model.{i}.bias"]) for i in (3, 6, 8)]
        self.last = (sd["model.10.weight"], sd["model.10.bias"])
        self.nf = self.first[0].shape[0]
        self.gc = self.blocks[0][0][0][0].shape[1]
        self._torch = torch

    def _rdb(self, x, convs, geo, vbuf):
        torch = self._torch
        nf, gc = self.nf, self.gc
        input_transform(x, geo, out=vbuf[:nf])
        cin = nf
        for k, (u, b) in enumerate(convs):
            mm = _gemm(u, vbuf[:cin])
            y = output_transform(mm, geo, u.shape[1])
            if k < 4:
                y = _finish(y, b, 0.2)
                input_transform(y, geo, out=vbuf[cin:cin + gc])
                cin += gc
            else:
                # residual scaling of RRDBNet: x + 0.2 * conv5
                return torch.addcmul(x, _finish(y, b, None), torch.tensor(0.2, dtype=x.dtype))

    def __call__(self, x):
        import torch.nn.functional as F

        torch = self._torch
        n, _, h, w = x.shape
        feat = F.conv2d(x, *self.first, padding=1)
        geo = _Geometry(n, h, w)
        vbuf = torch.empty(self.nf + 4 * self.gc, T * T, geo.tiles, dtype=x.dtype)
        out = feat
        for rdbs in self.blocks:
            block_in = out
            for convs in rdbs:
                out = self._rdb(out, convs, geo, vbuf)
            out = torch.addcmul(block_in, out, torch.tensor(0.2, dtype=x.dtype))
        del vbuf
        u, b = self.body
        out = feat + winograd_conv3x3(out, u, b)
        for i, (u, b) in enumerate(self.up):
            if i < 2:
                out = F.interpolate(out, scale_factor=2, mode="nearest")
            out = winograd_conv3x3(out, u, b, 0.2)
        return F.conv2d(out, *self.last, padding=1)


def winograd_rrdbnet(descriptor) -> Optional[WinogradRRDBNet]:
    """The Winograd forward for a spandrel descriptor, or ``None`` where it does not apply."""
    model = descriptor.model
    arch = getattr(descriptor.architecture, "id", "")
    if arch != "ESRGAN" or descriptor.scale != 4 or getattr(model, "shuffle_factor", None) \
            or getattr(model, "plus", False):
        return None
    keys = set(model.state_dict())
    if not {"model.0.weight", "model.3.weight", "model.6.weight", "model.8.weight", "model.10.weight"} <= keys \
            or "model.12.weight" in keys:
        return None
    try:
        return WinogradRRDBNet(model)
    except (KeyError, IndexError) as e:  # an RRDB variant this forward does not know
        logger.debug("no Winograd forward for this RRDBNet: %s", e)
        return None
