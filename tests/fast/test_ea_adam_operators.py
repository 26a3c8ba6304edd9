"""EA-Adam's operators against their formulas: SBX and mutation statistics, MOEA/D Tchebycheff replacement on a
hand-made population, gradient mixing against a hand computation, the schedule, and the fusion merge."""

import math

import pytest
import torch

from realisr.train import ea_adam as ops


def test_weight_vectors_and_neighbourhoods_are_the_official_ones():
    w = ops.weight_vectors(5)
    assert w.tolist() == [[1.0, 0.0], [0.75, 0.25], [0.5, 0.5], [0.25, 0.75], [0.0, 1.0]]
    assert ops.neighbourhoods(5, 1) == [[0, 1, 2], [0, 1, 2], [1, 2, 3], [2, 3, 4], [2, 3, 4]]
    with pytest.raises(ValueError):
        ops.neighbourhoods(2, 1)


def test_epoch_schedule_has_ea_at_9_20_31():
    kinds = [ops.epoch_kind(e, 10) for e in range(40)]
    assert [e for e, k in enumerate(kinds) if k == "ea"] == [9, 20, 31]


def test_sbx_beta_formula_and_distribution():
    eta = 20.0
    assert float(ops.sbx_beta(torch.tensor(0.25, dtype=torch.float64), eta)) == pytest.approx(0.5 ** (1 / 21))
    assert float(ops.sbx_beta(torch.tensor(0.75, dtype=torch.float64), eta)) == pytest.approx(0.5 ** (-1 / 21))
    n = 20000
    g = torch.Generator().manual_seed(0)
    p1 = {f"t{k}.weight": torch.ones(3) for k in range(n)}
    p2 = {f"t{k}.weight": torch.zeros(3) for k in range(n)}
    child = ops.sbx_crossover(p1, p2, eta=eta, generator=g)
    # one beta per tensor: every element of a tensor gets the same one
    assert all(float(v.max() - v.min()) == 0.0 for v in list(child.values())[:100])
    beta = torch.tensor([2 * float(v[0]) - 1 for v in child.values()], dtype=torch.float64)

    def cdf(b):  # P(beta <= b) of the SBX spread factor
        return 0.5 * b ** (eta + 1) if b <= 1 else 1 - 0.5 * b ** -(eta + 1)

    for b in (0.8, 0.9, 0.95, 0.99, 1.0, 1.01, 1.05, 1.1, 1.25):
        assert float((beta <= b).double().mean()) == pytest.approx(cdf(b), abs=0.015), b
    mean = 0.5 * (eta + 1) * (1 / (eta + 2) + 1 / eta)
    assert float(beta.mean()) == pytest.approx(mean, abs=0.003)


def test_gaussian_mutation_statistics_and_bias_rule():
    g = torch.Generator().manual_seed(1)
    child = {"conv.weight": torch.zeros(200, 50, 3, 3), "conv.bias": torch.full((200,), 0.5)}
    parent = {"conv.weight": torch.zeros(200, 50, 3, 3), "conv.bias": torch.full((200,), -1.0)}
    out = ops.gaussian_mutation(child, parent, mu=0.02, sigma=0.03, keep_child_bias=True, generator=g)
    d = out["conv.weight"].flatten()
    n = d.numel()
    frac = float((d != 0).double().mean())
    assert frac == pytest.approx(0.02, abs=5 * math.sqrt(0.02 * 0.98 / n))
    noise = d[d != 0].double()
    assert float(noise.std()) == pytest.approx(0.03, rel=0.05)
    assert abs(float(noise.mean())) < 5 * 0.03 / math.sqrt(noise.numel())
    assert torch.equal(out["conv.bias"], child["conv.bias"])  # biases are never mutated
    official = ops.gaussian_mutation(child, parent, keep_child_bias=False, generator=g)
    assert torch.equal(official["conv.bias"], parent["conv.bias"])  # the official code's bias reverting
    assert torch.equal(child["conv.weight"], torch.zeros(200, 50, 3, 3))  # inputs untouched


def test_tchebycheff_replacement_on_a_hand_made_population():
    w = ops.weight_vectors(5)
    objectives = [[0.10, 0.50], [0.12, 0.40], [0.15, 0.30], [0.20, 0.22], [0.30, 0.20]]
    z_min, z_max = [0.10, 0.20], [0.30, 0.50]
    # by hand, ranges 0.20001 / 0.30001; child (0.13, 0.28) normalised (0.149993, 0.266658):
    #   j=1 (.75,.25): child 0.112494 < x1 max(0.074996, 0.166661) -> replaced
    #   j=2 (.5,.5):   child 0.133329 < x2 max(0.124994, 0.166661) -> replaced
    #   j=3 (.25,.75): child 0.199994 > x3 max(0.124994, 0.049998) -> kept
    assert ops.tchebycheff([0.13, 0.28], [0.75, 0.25], z_min, z_max) == pytest.approx(0.112494, abs=1e-6)
    assert ops.tchebycheff([0.20, 0.22], [0.25, 0.75], z_min, z_max) == pytest.approx(0.124994, abs=1e-6)
    replaced = ops.moead_replace(objectives, [0.13, 0.28], [1, 2, 3], w, z_min, z_max)
    assert replaced == [1, 2]
    assert objectives[1] == [0.13, 0.28] and objectives[2] == [0.13, 0.28] and objectives[3] == [0.20, 0.22]
    # individual 0 is frozen even when the child dominates it; the ideal/nadir points take the child first
    objectives0 = [[0.10, 0.50], [0.12, 0.40], [0.15, 0.30]]
    z0, z1 = [0.10, 0.20], [0.30, 0.50]
    assert ops.moead_replace(objectives0, [0.05, 0.19], [0, 1, 2], w, z0, z1) == [1, 2]
    assert objectives0[0] == [0.10, 0.50]
    assert z0 == [0.05, 0.19] and z1 == [0.30, 0.50]
    z2 = [0.10, 0.20]
    z3 = [0.30, 0.50]
    ops.moead_replace([[0.1, 0.5]] * 3, [0.6, 0.9], [0, 1, 2], w, z2, z3)
    assert z3 == [0.6, 0.9]


def test_gradient_mixing_equals_hand_computation():
    g1 = [torch.tensor([3.0, 4.0]), torch.ones(2, 2)]
    g2 = [torch.tensor([0.0, -2.0]), torch.tensor([[2.0, 0.0], [0.0, 0.0]])]
    mixed = ops.mix_normalized_gradients(g1, g2, (0.25, 0.75))
    # 0.25 * (3,4)/5 + 0.75 * (0,-2)/2 ; 0.25 * ones/2 + 0.75 * e11
    assert torch.allclose(mixed[0], torch.tensor([0.15, -0.55]), atol=1e-6)
    assert torch.allclose(mixed[1], torch.tensor([[0.875, 0.125], [0.125, 0.125]]), atol=1e-6)
    # on a network: each loss's gradient normalised per tensor (torch.linalg.norm), then mixed
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 3, 1))
    x, y = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8)
    out = net(x)
    params = list(net.parameters())
    ga = torch.autograd.grad((out - y).abs().mean(), params, retain_graph=True)
    gb = torch.autograd.grad(((out - y) ** 2).mean() * 7.0, params)
    hand = [0.6 * a / torch.linalg.norm(a.flatten()) + 0.4 * b / torch.linalg.norm(b.flatten()) for a, b in zip(ga, gb)]
    for got, want in zip(ops.mix_normalized_gradients(ga, gb, (0.6, 0.4)), hand):
        assert torch.allclose(got, want, atol=1e-6)


def test_fusion_merge_with_one_hot_weights_is_that_expert_exactly():
    from realisr.arch.msrresnet_arch import MSRResNet

    torch.manual_seed(0)
    experts = [MSRResNet(num_feat=8, num_block=2).state_dict() for _ in range(3)]
    template = MSRResNet(num_feat=8, num_block=2)
    net = ops.make_dynamic(template, experts, fusion_kwargs={"num_feat": 4, "num_params": 6, "hidden": 5})
    layers = ops.dynamic_layers(net)
    assert [n for n, _ in layers][:3] == ["conv_first", "body.0.conv1", "body.0.conv2"]
    assert all(not p.requires_grad for n, p in net.named_parameters() if ".fusion." not in n)
    k = 1
    for _, m in layers:  # saturate every layer's softmax on expert k
        last = m.fusion.MappingNet[2]
        torch.nn.init.zeros_(last.weight)
        with torch.no_grad():
            last.bias.copy_(torch.tensor([-1e4, 1e4, -1e4]))
    imgs = [torch.rand(1, 3, 12, 16), torch.rand(1, 3, 8, 8)]
    weights = ops.collect_fusion_weights(net, imgs)
    assert all(v.tolist() == [0.0, 1.0, 0.0] for v in weights.values())
    merged = ops.merge_experts(experts, weights)
    assert merged.keys() == experts[k].keys()
    assert all(torch.equal(merged[n], experts[k][n]) for n in merged)
    # and the dynamic network itself runs expert k
    ref = MSRResNet(num_feat=8, num_block=2)
    ref.load_state_dict(experts[k])
    x = torch.rand(2, 3, 10, 10)
    with torch.no_grad():
        assert torch.allclose(net(x), ref(x), atol=1e-5)
    # a mixed weighting merges layer by layer
    half = {n: torch.tensor([0.5, 0.0, 0.5], dtype=torch.float64) for n in weights}
    mixed = ops.merge_experts(experts, half)
    assert torch.allclose(mixed["conv_last.bias"], 0.5 * (experts[0]["conv_last.bias"] + experts[2]["conv_last.bias"]))
