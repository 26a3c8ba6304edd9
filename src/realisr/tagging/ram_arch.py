"""RAM (Recognize Anything, Swin-L 14M) and SeeSR's DAPE variant of it: the networks only.

The key layout and the maths follow the official RAM code as SeeSR and OSEDiff ship it (``ram/models/ram.py``,
``ram_lora.py``), so the official ``ram_swin_large_14m.pth`` and ``DAPE.pth`` load without renaming:

* ``visual_encoder``: RAM's Swin transformer (patch 4, ``qkv`` with bias, relative position bias, shifted
  windows in odd blocks, PatchMerging at the *end* of every stage but the last, a window that shrinks to the
  resolution with no shift when the resolution is not larger than the window). Its output is the token-mean
  followed by the tokens, after the final LayerNorm: ``[B, 1 + L, C]``.
* ``image_proj``: Linear(C -> 512), the image embeddings (SeeSR's soft prompt).
* ``label_embed`` [num_classes, 512], ``wordvec_proj`` Linear(512 -> hidden) (identity when hidden is 512).
* ``tagging_head``: the Query2Label BERT without self-attention: every layer is BERT cross-attention (labels
  query the image embeddings) followed by the BERT feed-forward, post-LN, exact GELU.
* ``fc``: Linear(hidden -> 1), one logit per class.

DAPE adds loralib LoRA (rank 8, alpha 1): on the Swin ``qkv`` for the q and v rows only (loralib's
``MergedLinear(enable_lora=[True, False, True])``) and on the tagging head's ``query`` and ``key``.
:class:`LoRALinear` reproduces both with loralib's parameter names (``lora_A``, ``lora_B``).

Why not timm / transformers: timm's Swin keeps PatchMerging at the *start* of the next stage (other keys)
and has no q/v-only LoRA; transformers' BERT cross-attention takes keys and values of the hidden size (the
official ones take 512-wide image embeddings) and its layer always runs self-attention first.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LoRALinear", "RAMSwinTransformer", "Q2LTaggingHead", "RAM", "drop_path"]


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth per sample (timm's ``DropPath``, rescaled by the keep probability)."""
    if p <= 0.0 or not training:
        return x
    keep = 1.0 - p
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask.div_(keep)


class LoRALinear(nn.Linear):
    """``nn.Linear`` with an optional loralib-style LoRA (unmerged until :meth:`merge_lora`).

    Args:
        in_features, out_features, bias: as ``nn.Linear``.
        lora_rank: LoRA rank ``r`` (0: a plain linear layer, no LoRA parameters).
        lora_alpha: loralib ``lora_alpha``; the update is scaled by ``lora_alpha / r``.
        lora_groups: ``None`` for a full-matrix LoRA (``lora.Linear``); else the output is split into
            ``len(lora_groups)`` equal row groups and only the groups marked ``True`` get a rank-``r``
            update (``lora.MergedLinear(enable_lora=...)``): ``lora_A`` is ``[r * n_on, in]``, ``lora_B``
            ``[out / n_groups * n_on, r]``, and group ``i`` of the update is ``B_i @ A_i``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, lora_rank: int = 0,
                 lora_alpha: float = 1.0, lora_groups: Optional[Sequence[bool]] = None):
        super().__init__(in_features, out_features, bias=bias)
        self.lora_rank = int(lora_rank)
        self.lora_alpha = float(lora_alpha)
        self.lora_groups = tuple(bool(g) for g in lora_groups) if lora_groups is not None else None
        if self.lora_rank > 0:
            n_on = sum(self.lora_groups) if self.lora_groups else 1
            rows = out_features // len(self.lora_groups) * n_on if self.lora_groups else out_features
            self.lora_A = nn.Parameter(torch.zeros(self.lora_rank * n_on, in_features))
            self.lora_B = nn.Parameter(torch.zeros(rows, self.lora_rank))
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # loralib's init; B stays zero

    @property
    def has_lora(self) -> bool:
        return self.lora_rank > 0 and hasattr(self, "lora_A")

    @property
    def lora_scaling(self) -> float:
        return self.lora_alpha / self.lora_rank

    def delta_weight(self) -> torch.Tensor:
        """The full ``[out, in]`` LoRA update ``scaling * B @ A`` (zero rows for disabled groups)."""
        a, b, r = self.lora_A, self.lora_B, self.lora_rank
        if not self.lora_groups:
            return (b @ a) * self.lora_scaling
        group_rows = self.out_features // len(self.lora_groups)
        parts, k = [], 0
        for on in self.lora_groups:
            if on:
                parts.append(b[k * group_rows:(k + 1) * group_rows] @ a[k * r:(k + 1) * r])
                k += 1
            else:
                parts.append(b.new_zeros(group_rows, self.in_features))
        return torch.cat(parts, 0) * self.lora_scaling

    @torch.no_grad()
    def merge_lora(self) -> None:
        """Add the update into ``weight`` (in float32) and drop the LoRA parameters."""
        if not self.has_lora:
            return
        delta = self.delta_weight().float()
        self.weight.copy_((self.weight.float() + delta).to(self.weight.dtype))
        del self.lora_A
        del self.lora_B
        self.lora_rank = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        if self.has_lora:
            out = out + F.linear(x, self.delta_weight().to(x.dtype))
        return out

    def extra_repr(self) -> str:
        s = super().extra_repr()
        if self.has_lora:
            s += f", lora_rank={self.lora_rank}, lora_groups={self.lora_groups}"
        return s


# ------------------------------------------------------------------------------------------------ Swin
def _window_partition(x: torch.Tensor, ws: int) -> torch.Tensor:
    b, h, w, c = x.shape
    x = x.view(b, h // ws, ws, w // ws, ws, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, c)


def _window_reverse(windows: torch.Tensor, ws: int, h: int, w: int) -> torch.Tensor:
    b = windows.shape[0] // ((h // ws) * (w // ws))
    x = windows.view(b, h // ws, w // ws, ws, ws, -1)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, -1)


def _relative_position_index(ws: int) -> torch.Tensor:
    coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (ws - 1)
    return rel[..., 0] * (2 * ws - 1) + rel[..., 1]


def _shift_mask(h: int, w: int, ws: int, shift: int) -> torch.Tensor:
    img = torch.zeros(1, h, w, 1)
    cnt = 0
    for hs in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
        for wsl in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
            img[:, hs, wsl, :] = cnt
            cnt += 1
    win = _window_partition(img, ws).squeeze(-1)
    mask = win.unsqueeze(1) - win.unsqueeze(2)
    return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)


class WindowAttention(nn.Module):
    """Window multi-head self-attention with a relative position bias (keys: ``qkv``, ``proj``,
    ``relative_position_bias_table``)."""

    def __init__(self, dim: int, window_size: int, num_heads: int, *, lora_rank: int = 0, lora_alpha: float = 1.0):
        super().__init__()
        self.dim = dim
        self.window_size = window_size
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer("relative_position_index", _relative_position_index(window_size), persistent=False)
        self.qkv = LoRALinear(dim, 3 * dim, lora_rank=lora_rank, lora_alpha=lora_alpha,
                              lora_groups=(True, False, True))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        bw, n, c = x.shape
        qkv = self.qkv(x).reshape(bw, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        bias = bias.view(n, n, -1).permute(2, 0, 1).unsqueeze(0)  # [1, heads, n, n]
        if mask is not None:
            nw = mask.shape[0]
            bias = (bias.unsqueeze(0) + mask.to(bias.dtype)[None, :, None]).expand(bw // nw, -1, -1, -1, -1)
            bias = bias.reshape(bw, self.num_heads, n, n)
        attn = (q * self.scale) @ k.transpose(-2, -1) + bias.to(q.dtype)
        x = (attn.softmax(-1) @ v).transpose(1, 2).reshape(bw, n, c)
        return self.proj(x)


class SwinMlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwinBlock(nn.Module):
    """One Swin block (W-MSA or SW-MSA, then MLP), pre-LN, with stochastic depth."""

    def __init__(self, dim: int, input_resolution: tuple[int, int], num_heads: int, window_size: int,
                 shift_size: int, *, mlp_ratio: float = 4.0, drop_path: float = 0.0, lora_rank: int = 0,
                 lora_alpha: float = 1.0):
        super().__init__()
        self.input_resolution = tuple(input_resolution)
        if min(self.input_resolution) <= window_size:  # no partition, no shift (official rule)
            shift_size, window_size = 0, min(self.input_resolution)
        self.window_size, self.shift_size = window_size, shift_size
        self.drop_path = drop_path
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window_size, num_heads, lora_rank=lora_rank, lora_alpha=lora_alpha)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = SwinMlp(dim, int(dim * mlp_ratio))
        h, w = self.input_resolution
        mask = _shift_mask(h, w, window_size, shift_size) if shift_size > 0 else None
        self.register_buffer("attn_mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = self.input_resolution
        b, _, c = x.shape
        shortcut = x
        x = self.norm1(x).view(b, h, w, c)
        if self.shift_size > 0:
            x = torch.roll(x, shifts=(-self.shift_size, -self.shift_size), dims=(1, 2))
        x = self.attn(_window_partition(x, self.window_size), mask=self.attn_mask)
        x = _window_reverse(x, self.window_size, h, w)
        if self.shift_size > 0:
            x = torch.roll(x, shifts=(self.shift_size, self.shift_size), dims=(1, 2))
        x = shortcut + drop_path(x.reshape(b, h * w, c), self.drop_path, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)


class PatchMerging(nn.Module):
    """2x2 neighbourhood concatenation ([0,0], [1,0], [0,1], [1,1]), LayerNorm, Linear(4C -> 2C, no bias)."""

    def __init__(self, input_resolution: tuple[int, int], dim: int):
        super().__init__()
        self.input_resolution = tuple(input_resolution)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = self.input_resolution
        b, _, c = x.shape
        x = x.view(b, h, w, c)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x.view(b, -1, 4 * c)))


class SwinStage(nn.Module):
    """The blocks of one stage, then (except in the last stage) PatchMerging (key ``downsample``)."""

    def __init__(self, dim: int, input_resolution: tuple[int, int], depth: int, num_heads: int, window_size: int,
                 *, mlp_ratio: float = 4.0, drop_path: Sequence[float] = (), downsample: bool = False,
                 lora_rank: int = 0, lora_alpha: float = 1.0):
        super().__init__()
        dp = list(drop_path) or [0.0] * depth
        self.blocks = nn.ModuleList([
            SwinBlock(dim, input_resolution, num_heads, window_size, 0 if i % 2 == 0 else window_size // 2,
                      mlp_ratio=mlp_ratio, drop_path=dp[i], lora_rank=lora_rank, lora_alpha=lora_alpha)
            for i in range(depth)])
        self.downsample = PatchMerging(input_resolution, dim) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        return self.downsample(x) if self.downsample is not None else x


class PatchEmbed(nn.Module):
    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.img_size = img_size
        self.grid = img_size // patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"RAM expects {self.img_size}x{self.img_size} inputs, got "
                             f"{x.shape[-2]}x{x.shape[-1]} (use the tagger's preprocessing)")
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


class RAMSwinTransformer(nn.Module):
    """RAM's Swin image encoder: ``[B, 3, S, S]`` -> ``[B, 1 + L, C]`` (token mean, then the tokens).

    Args:
        img_size: input side (384).
        embed_dim, depths, num_heads, window_size: the Swin configuration (Swin-L: 192, [2,2,18,2],
            [6,12,24,48], 12).
        patch_size, mlp_ratio: 4 and 4.0 in RAM.
        drop_path_rate: stochastic-depth rate of the last block (linear from 0; 0.1 in RAM; training only).
        lora_rank, lora_alpha: DAPE's LoRA on ``qkv`` (q and v rows); rank 0 = none.
    """

    def __init__(self, *, img_size: int = 384, embed_dim: int = 192, depths: Sequence[int] = (2, 2, 18, 2),
                 num_heads: Sequence[int] = (6, 12, 24, 48), window_size: int = 12, patch_size: int = 4,
                 mlp_ratio: float = 4.0, drop_path_rate: float = 0.1, lora_rank: int = 0, lora_alpha: float = 1.0):
        super().__init__()
        self.patch_embed = PatchEmbed(img_size, patch_size, 3, embed_dim)
        grid = self.patch_embed.grid
        dpr = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.layers = nn.ModuleList()
        for i, depth in enumerate(depths):
            self.layers.append(SwinStage(
                embed_dim * 2 ** i, (grid // 2 ** i, grid // 2 ** i), depth, num_heads[i], window_size,
                mlp_ratio=mlp_ratio, drop_path=dpr[sum(depths[:i]):sum(depths[:i + 1])],
                downsample=i < len(depths) - 1, lora_rank=lora_rank, lora_alpha=lora_alpha))
        self.num_features = embed_dim * 2 ** (len(depths) - 1)
        self.norm = nn.LayerNorm(self.num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        for layer in self.layers:
            x = layer(x)
        x = self.norm(x)
        return torch.cat([x.mean(1, keepdim=True), x], 1)


# ----------------------------------------------------------------------------------- Query2Label head
class _CrossSelf(nn.Module):
    """BERT (cross-)attention projections: ``query`` from the labels, ``key``/``value`` from the image."""

    def __init__(self, hidden: int, encoder_width: int, num_heads: int, dropout: float, lora_rank: int,
                 lora_alpha: float):
        super().__init__()
        self.num_heads = num_heads
        self.query = LoRALinear(hidden, hidden, lora_rank=lora_rank, lora_alpha=lora_alpha)
        self.key = LoRALinear(encoder_width, hidden, lora_rank=lora_rank, lora_alpha=lora_alpha)
        self.value = nn.Linear(encoder_width, hidden)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        d = c // self.num_heads

        def heads(t):
            return t.view(b, -1, self.num_heads, d).transpose(1, 2)

        q, k, v = heads(self.query(x)), heads(self.key(memory)), heads(self.value(memory))
        # the all-ones image mask of the official code adds exactly 0: no mask
        attn = (q @ k.transpose(-1, -2)) / math.sqrt(d)
        attn = F.dropout(attn.softmax(-1), self.dropout, self.training)
        return (attn @ v).transpose(1, 2).reshape(b, n, c)


class _AddNorm(nn.Module):
    def __init__(self, d_in: int, hidden: int, eps: float, dropout: float):
        super().__init__()
        self.dense = nn.Linear(d_in, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class _CrossAttention(nn.Module):
    def __init__(self, hidden, encoder_width, num_heads, eps, dropout, attn_dropout, lora_rank, lora_alpha):
        super().__init__()
        self.self = _CrossSelf(hidden, encoder_width, num_heads, attn_dropout, lora_rank, lora_alpha)
        self.output = _AddNorm(hidden, hidden, eps, dropout)

    def forward(self, x, memory):
        return self.output(self.self(x, memory), x)


class _Intermediate(nn.Module):
    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.dense = nn.Linear(hidden, inter)

    def forward(self, x):
        return F.gelu(self.dense(x))  # exact (erf) GELU, transformers' "gelu"


class Q2LLayer(nn.Module):
    """Cross-attention (labels -> image embeddings), then the BERT feed-forward; post-LN."""

    def __init__(self, *, hidden_size, encoder_width, num_heads, intermediate_size, layer_norm_eps,
                 hidden_dropout, attention_dropout, lora_rank, lora_alpha):
        super().__init__()
        self.crossattention = _CrossAttention(hidden_size, encoder_width, num_heads, layer_norm_eps,
                                              hidden_dropout, attention_dropout, lora_rank, lora_alpha)
        self.intermediate = _Intermediate(hidden_size, intermediate_size)
        self.output = _AddNorm(intermediate_size, hidden_size, layer_norm_eps, hidden_dropout)

    def forward(self, x, memory):
        x = self.crossattention(x, memory)
        return self.output(self.intermediate(x), x)


class _Q2LEncoder(nn.Module):
    def __init__(self, layers):
        super().__init__()
        self.layer = nn.ModuleList(layers)


class Q2LTaggingHead(nn.Module):
    """The tagging head (key prefix ``encoder.layer.N``): label queries ``[B, C, hidden]`` attend to the
    image embeddings ``[B, N, encoder_width]``."""

    def __init__(self, *, hidden_size: int = 768, num_hidden_layers: int = 2, num_attention_heads: int = 4,
                 intermediate_size: int = 3072, encoder_width: int = 512, layer_norm_eps: float = 1e-12,
                 hidden_dropout_prob: float = 0.1, attention_probs_dropout_prob: float = 0.1,
                 lora_rank: int = 0, lora_alpha: float = 1.0):
        super().__init__()
        if hidden_size % num_attention_heads:
            raise ValueError(f"hidden size {hidden_size} is not a multiple of {num_attention_heads} heads")
        self.encoder = _Q2LEncoder([
            Q2LLayer(hidden_size=hidden_size, encoder_width=encoder_width, num_heads=num_attention_heads,
                     intermediate_size=intermediate_size, layer_norm_eps=layer_norm_eps,
                     hidden_dropout=hidden_dropout_prob, attention_dropout=attention_probs_dropout_prob,
                     lora_rank=lora_rank, lora_alpha=lora_alpha)
            for _ in range(num_hidden_layers)])

    def forward(self, queries: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        x = queries
        for layer in self.encoder.layer:
            x = layer(x, memory)
        return x


# --------------------------------------------------------------------------------------------------- RAM
class RAM(nn.Module):
    """RAM's tagging path: Swin -> ``image_proj`` (image embeddings) -> Query2Label head -> ``fc`` logits.

    Args:
        num_classes: number of tags (4585 for the released model).
        img_size, embed_dim, depths, num_heads, window_size: the Swin configuration (``config_swinL_384.json``;
            its ``vision_width`` is ``embed_dim * 2 ** (len(depths) - 1)``).
        embed_width: width of the image embeddings and label embeddings (512, hard-coded officially).
        q2l_hidden_size, q2l_num_hidden_layers, q2l_num_attention_heads, q2l_intermediate_size,
        q2l_layer_norm_eps, q2l_hidden_dropout_prob, q2l_attention_probs_dropout_prob: ``q2l_config.json``.
        drop_path_rate: Swin stochastic depth (training only; 0.1 officially).
        lora_rank, lora_alpha: DAPE LoRA (rank 8, alpha 1 in SeeSR); 0 = plain RAM.
    """

    def __init__(self, *, num_classes: int, img_size: int = 384, embed_dim: int = 192,
                 depths: Sequence[int] = (2, 2, 18, 2), num_heads: Sequence[int] = (6, 12, 24, 48),
                 window_size: int = 12, embed_width: int = 512, q2l_hidden_size: int = 768,
                 q2l_num_hidden_layers: int = 2, q2l_num_attention_heads: int = 4,
                 q2l_intermediate_size: int = 3072, q2l_layer_norm_eps: float = 1e-12,
                 q2l_hidden_dropout_prob: float = 0.1, q2l_attention_probs_dropout_prob: float = 0.1,
                 drop_path_rate: float = 0.1, lora_rank: int = 0, lora_alpha: float = 1.0):
        super().__init__()
        self.num_classes = num_classes
        self.img_size = img_size
        self.visual_encoder = RAMSwinTransformer(
            img_size=img_size, embed_dim=embed_dim, depths=depths, num_heads=num_heads, window_size=window_size,
            drop_path_rate=drop_path_rate, lora_rank=lora_rank, lora_alpha=lora_alpha)
        self.vision_width = self.visual_encoder.num_features
        self.image_proj = nn.Linear(self.vision_width, embed_width)
        self.label_embed = nn.Parameter(torch.zeros(num_classes, embed_width))
        self.wordvec_proj = nn.Linear(embed_width, q2l_hidden_size) if q2l_hidden_size != embed_width \
            else nn.Identity()
        self.tagging_head = Q2LTaggingHead(
            hidden_size=q2l_hidden_size, num_hidden_layers=q2l_num_hidden_layers,
            num_attention_heads=q2l_num_attention_heads, intermediate_size=q2l_intermediate_size,
            encoder_width=embed_width, layer_norm_eps=q2l_layer_norm_eps,
            hidden_dropout_prob=q2l_hidden_dropout_prob,
            attention_probs_dropout_prob=q2l_attention_probs_dropout_prob, lora_rank=lora_rank,
            lora_alpha=lora_alpha)
        self.fc = nn.Linear(q2l_hidden_size, 1)

    def lora_layers(self) -> list[LoRALinear]:
        return [m for m in self.modules() if isinstance(m, LoRALinear) and m.has_lora]

    def merge_lora(self) -> None:
        """Merge every LoRA update into its weight (what loralib does on ``eval()``)."""
        for m in self.lora_layers():
            m.merge_lora()

    def encode_image(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised ``[B, 3, S, S]`` -> (visual features ``[B, 1+L, C]``, image embeddings ``[B, 1+L, 512]``)."""
        visual = self.visual_encoder(x)
        return visual, self.image_proj(visual)

    def label_queries(self) -> torch.Tensor:
        """``relu(wordvec_proj(label_embed))``: ``[num_classes, hidden]``."""
        return F.relu(self.wordvec_proj(self.label_embed))

    def tag_logits(self, image_embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image embeddings -> (tagging embeddings ``[B, C, hidden]``, logits ``[B, C]``)."""
        q = self.label_queries().unsqueeze(0).expand(image_embeds.shape[0], -1, -1)
        tagging = self.tagging_head(q, image_embeds)
        return tagging, self.fc(tagging).squeeze(-1)

    def forward(self, x: torch.Tensor) -> dict:
        """All outputs: ``visual``, ``image_embeds``, ``tagging_embed``, ``logits``."""
        visual, embeds = self.encode_image(x)
        tagging, logits = self.tag_logits(embeds)
        return {"visual": visual, "image_embeds": embeds, "tagging_embed": tagging, "logits": logits}
