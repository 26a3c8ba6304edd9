"""EA-Adam's operators (Sun et al., TIP 2024; spec: docs/ea-adam.md), as small pure functions.

* :func:`weight_vectors`, :func:`neighbourhoods`: the decomposition (w_i = (1 - i/(N-1), i/(N-1))) and the
  MOEA/D neighbourhoods B(i).
* :func:`mix_normalized_gradients`: the Adam step's gradient, ``w_i0 * g1/|g1| + w_i1 * g2/|g2|`` per tensor.
* :func:`sbx_beta`, :func:`sbx_crossover`: simulated binary crossover, one beta per tensor.
* :func:`gaussian_mutation`: the official "simple" mutation (elements of conv/linear weights, prob ``mu``,
  ``N(0, sigma^2)`` noise).
* :func:`tchebycheff`, :func:`moead_replace`: MOEA/D replacement with ideal (z*) and nadir (z^nad) points.
* :func:`epoch_kind`: which epochs are EA epochs.
* :func:`make_dynamic`, :func:`collect_fusion_weights`, :func:`merge_experts`: the fusion network over the
  population's kernels and the final merge into one plain backbone.

Randomness comes from explicit ``torch.Generator`` objects (never the global RNG), so a resumed run draws the
same numbers as an uninterrupted one.
"""

from __future__ import annotations

import copy
from typing import Iterable, Optional, Sequence

import torch
from torch import nn

__all__ = [
    "weight_vectors",
    "neighbourhoods",
    "mix_normalized_gradients",
    "sbx_beta",
    "sbx_crossover",
    "gaussian_mutation",
    "tchebycheff",
    "moead_replace",
    "epoch_kind",
    "make_dynamic",
    "dynamic_layers",
    "collect_fusion_weights",
    "merge_experts",
]


def weight_vectors(n: int) -> torch.Tensor:
    """``[n, 2]`` float64: w_i = (1 - i/(n-1), i/(n-1)); row 0 is pure distortion (L1), row n-1 pure perception.

    Raises:
        ValueError: ``n < 2``.
    """
    if n < 2:
        raise ValueError(f"a population needs at least 2 individuals, got {n}")
    t = torch.arange(n, dtype=torch.float64) / (n - 1)
    return torch.stack([1 - t, t], dim=1)


def neighbourhoods(n: int, size: int = 1) -> list[list[int]]:
    """B(i): the ``2*size+1`` consecutive indices centred on ``i``, shifted inwards at the ends
    (official for ``size=1``: B(0) = {0,1,2}, B(i) = {i-1,i,i+1}, B(n-1) = {n-3,n-2,n-1}).

    Raises:
        ValueError: the population is smaller than one neighbourhood.
    """
    width = 2 * size + 1
    if size < 1 or n < width:
        raise ValueError(f"neighbourhood size {size} needs a population of at least {width}, got {n}")
    out = []
    for i in range(n):
        lo = min(max(i - size, 0), n - width)
        out.append(list(range(lo, lo + width)))
    return out


def mix_normalized_gradients(g_distortion: Sequence[Optional[torch.Tensor]],
                             g_perception: Sequence[Optional[torch.Tensor]], w: Sequence[float],
                             eps: float = 1e-7) -> list[Optional[torch.Tensor]]:
    """The Adam step's gradient of one individual: per tensor, ``w0 * g1 / (|g1|_2 + eps) + w1 * g2 / (|g2|_2 +
    eps)`` (official ``normalized_gradient`` on every parameter tensor, then the weighted sum).

    Args:
        g_distortion: gradients of the L1 loss, one per parameter (``None``: no gradient).
        g_perception: gradients of the perceptual (+GAN) loss.
        w: the individual's weight vector ``(w0, w1)``.

    Returns:
        The mixed gradients (``None`` where the perceptual gradient is ``None``, as the official loop only
        writes parameters that have one).
    """
    out: list[Optional[torch.Tensor]] = []
    for g1, g2 in zip(g_distortion, g_perception):
        if g2 is None:
            out.append(None)
            continue
        n2 = g2 / (g2.norm(p=2) + eps)
        n1 = torch.zeros_like(g2) if g1 is None else g1 / (g1.norm(p=2) + eps)
        out.append(float(w[0]) * n1 + float(w[1]) * n2)
    return out


def sbx_beta(u: torch.Tensor, eta: float = 20.0) -> torch.Tensor:
    """SBX spread factor from ``u ~ U(0, 1)``: ``(2u)^(1/(eta+1))`` if ``u < 0.5`` else
    ``(2 - 2u)^(-1/(eta+1))`` (official eta = 20: exponent 1/21)."""
    e = 1.0 / (eta + 1.0)
    return torch.where(u < 0.5, (2 * u) ** e, (2 - 2 * u) ** (-e))


def sbx_crossover(p1: dict, p2: dict, *, eta: float = 20.0, generator: Optional[torch.Generator] = None) -> dict:
    """The first SBX child of two parameter dicts, one beta per tensor: ``0.5 * ((1 + b) p1 + (1 - b) p2)``.

    Args:
        p1, p2: name -> tensor (same names and shapes).
        eta: distribution index.
        generator: CPU generator for the ``u`` draws (one per tensor, in ``p1``'s order).

    Returns:
        name -> child tensor (new tensors).
    """
    child = {}
    for k, a in p1.items():
        u = torch.rand((), generator=generator, dtype=torch.float64)
        b = float(sbx_beta(u, eta))
        child[k] = 0.5 * ((1 + b) * a + (1 - b) * p2[k])
    return child


def _is_kernel(name: str, t: torch.Tensor) -> bool:
    return name.endswith("weight") and t.dim() >= 2


def gaussian_mutation(child: dict, parent: dict, *, mu: float = 0.02, sigma: float = 0.03,
                      keep_child_bias: bool = True, generator: Optional[torch.Generator] = None) -> dict:
    """Official "simple" mutation: every element of every conv/linear *weight* tensor is perturbed with
    probability ``mu`` by ``N(0, sigma^2)`` noise.

    Args:
        child: name -> tensor to mutate (not modified).
        parent: x_i, the individual the child was made for.
        keep_child_bias: keep the child's biases (default). ``False`` reproduces the official code, which
            rebuilds the mutant from x_i with ``strict=False``, so every bias reverts to the parent's.
        generator: CPU generator (mask then noise, per tensor in ``child``'s order).

    Returns:
        name -> mutated tensor (new tensors; untouched entries are the child's, or the parent's biases).
    """
    out = {}
    for k, v in child.items():
        if _is_kernel(k, v):
            mask = torch.rand(v.shape, generator=generator) < mu
            noise = torch.randn(v.shape, generator=generator) * sigma
            out[k] = v + (mask.to(v.dtype) * noise.to(v.dtype)).to(v.device)
        elif keep_child_bias:
            out[k] = v.clone()
        else:
            out[k] = parent[k].clone()
    return out


def tchebycheff(f: Sequence[float], w: Sequence[float], z_min: Sequence[float], z_max: Sequence[float],
                eps: float = 1e-5) -> float:
    """``g(x | w) = max_k w_k * |f_k - z*_k| / (z^nad_k - z*_k + eps)`` (normalised Tchebycheff)."""
    return max(float(w[k]) * abs(float(f[k]) - float(z_min[k])) / (float(z_max[k]) - float(z_min[k]) + eps)
               for k in range(len(f)))


def moead_replace(objectives: list[list[float]], child: Sequence[float], neighbourhood: Iterable[int],
                  weights, z_min: list[float], z_max: list[float], frozen: Iterable[int] = (0,)) -> list[int]:
    """One MOEA/D replacement step (updates its arguments in place).

    First the ideal/nadir points take the child's objectives into account (``z*`` = min, ``z^nad`` = max);
    then for each ``j`` of the neighbourhood (in order, skipping ``frozen``) the child replaces x_j when
    ``g(child | w_j) < g(x_j | w_j)``; ``objectives[j]`` becomes the child's.

    Args:
        objectives: per individual ``[f_distortion, f_perception]``.
        child: the child's objectives.
        neighbourhood: B(i) of the individual the child was made for.
        weights: ``[N, 2]`` weight vectors.
        z_min, z_max: ideal and nadir points.
        frozen: individuals never replaced (official: individual 0, the pretrained model).

    Returns:
        The replaced indices.
    """
    for k in range(len(child)):
        z_min[k] = min(z_min[k], float(child[k]))
        z_max[k] = max(z_max[k], float(child[k]))
    frozen = set(frozen)
    replaced = []
    for j in neighbourhood:
        if j in frozen:
            continue
        w = [float(x) for x in weights[j]]
        if tchebycheff(child, w, z_min, z_max) < tchebycheff(objectives[j], w, z_min, z_max):
            objectives[j] = [float(x) for x in child]
            replaced.append(j)
    return replaced


def epoch_kind(epoch: int, adam_epochs: int = 10) -> str:
    """``"ea"`` or ``"adam"`` for a 0-based epoch: the official schedule runs ``adam_epochs - 1`` Adam epochs,
    then one EA epoch, then cycles of ``adam_epochs`` Adam epochs and one EA epoch (EA at 9, 20, 31, ...)."""
    if adam_epochs < 1:
        raise ValueError("adam_epochs must be >= 1")
    first = adam_epochs - 1
    return "ea" if epoch >= first and (epoch - first) % (adam_epochs + 1) == 0 else "adam"


# ---------------------------------------------------------------------------------------------------------
# fusion network and merge


def make_dynamic(backbone: nn.Module, experts: Sequence[dict], *, fusion_kwargs: Optional[dict] = None,
                 train_experts: bool = False) -> nn.Module:
    """The fusion network: a copy of ``backbone`` whose every ``nn.Conv2d`` is a
    :class:`~realisr.arch.dynamic_conv_arch.DynamicConv2d` over the experts' kernels.

    Args:
        backbone: a plain network (MSRResNet, spandrel RRDBNet, ...) whose convolutions carry its weights.
        experts: K parameter dicts (name -> tensor, the backbone's names), in a fixed order.
        fusion_kwargs: :class:`~realisr.arch.dynamic_conv_arch.FusionModule` settings.
        train_experts: make the expert kernels trainable (official: frozen).

    Returns:
        The dynamic network (the fusion modules are its only trainable parameters unless ``train_experts``).

    Raises:
        ValueError: no experts, or an expert lacks a convolution's weights.
    """
    from realisr.arch.dynamic_conv_arch import DynamicConv2d, FusionModule

    if not experts:
        raise ValueError("make_dynamic needs at least one expert")
    net = copy.deepcopy(backbone)
    for p in net.parameters():
        p.requires_grad_(False)
    k = len(experts)
    convs = [(n, m) for n, m in net.named_modules() if isinstance(m, nn.Conv2d)]
    for name, conv in convs:
        try:
            w = torch.stack([e[f"{name}.weight"] for e in experts])
            b = torch.stack([e[f"{name}.bias"] for e in experts]) if conv.bias is not None else None
        except KeyError as err:
            raise ValueError(f"an expert lacks {err.args[0]}: experts must be state dicts of the backbone") from None
        fusion = FusionModule(conv.in_channels, k, **(fusion_kwargs or {}))
        dyn = DynamicConv2d(w.to(conv.weight.dtype), None if b is None else b.to(conv.weight.dtype),
                            stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                            fusion=fusion, train_experts=train_experts)
        parent_name, _, attr = name.rpartition(".")
        parent = net.get_submodule(parent_name) if parent_name else net
        setattr(parent, attr, dyn)
    return net


def dynamic_layers(net: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, DynamicConv2d)`` in module order (the backbone's convolution names)."""
    from realisr.arch.dynamic_conv_arch import DynamicConv2d

    return [(n, m) for n, m in net.named_modules() if isinstance(m, DynamicConv2d)]


@torch.no_grad()
def collect_fusion_weights(net: nn.Module, images: Iterable[torch.Tensor], *, center_half: bool = True
                           ) -> dict[str, torch.Tensor]:
    """Average per-layer softmax weights of the fusion network over ``images`` (official
    ``train_cal_weight.py``: M = 100 LR images, central half-crop of each).

    Args:
        net: the fusion network (see :func:`make_dynamic`).
        images: LR images ``[1, 3, h, w]`` (or batches; every sample counts once).
        center_half: crop ``[h/4, 3h/4) x [w/4, 3w/4)`` first (official).

    Returns:
        layer name -> ``[K]`` averaged weights (float64, on the simplex).

    Raises:
        ValueError: no image.
    """
    layers = dynamic_layers(net)
    sums = {n: None for n, _ in layers}
    count = 0
    net.eval()
    for x in images:
        if center_half:
            h, w = x.shape[-2:]
            x = x[..., h // 4: (3 * h) // 4, w // 4: (3 * w) // 4]
        net(x)
        for n, m in layers:
            s = m.last_weights.double().sum(0).cpu()
            sums[n] = s if sums[n] is None else sums[n] + s
        count += x.shape[0]
    if count == 0:
        raise ValueError("collect_fusion_weights needs at least one image")
    return {n: s / count for n, s in sums.items()}


def merge_experts(experts: Sequence[dict], layer_weights: dict[str, torch.Tensor]) -> dict:
    """The final plain backbone: for each layer ``l``, ``theta_l = sum_k a_l[k] * theta_l^k`` (weights and
    biases), other entries copied from expert 0.

    Args:
        experts: K state dicts (backbone names).
        layer_weights: layer name (a convolution's name) -> ``[K]`` weights (from :func:`collect_fusion_weights`).

    Returns:
        The merged state dict (same names, dtypes and devices as the experts).
    """
    merged = {}
    for key, ref in experts[0].items():
        layer, _, leaf = key.rpartition(".")
        a = layer_weights.get(layer) if leaf in ("weight", "bias") else None
        if a is None or not torch.is_floating_point(ref):
            merged[key] = ref.clone()
            continue
        acc = torch.zeros_like(ref, dtype=torch.float64)
        for k, e in enumerate(experts):
            acc += float(a[k]) * e[key].double()
        merged[key] = acc.to(ref.dtype)
    return merged
