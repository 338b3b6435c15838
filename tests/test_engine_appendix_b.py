"""The engine's appendix-B views ("normalized", "effective"): brute force, and the old interpreter's values.

The regularizer (``ConnectRegularizer``, ``ConnectivityGraph``, ``channel_connectivity_importance``,
``synflow_scores``) and ``sparsity_report`` run on :class:`connect_tp.engine.AppendixBGraph`. These
tests check the two views against an enumeration of every input-output path of a tiny network
with BatchNorm, a channel scaler and an identity skip, and pin values that the former separate
interpreter (``regularizer.ConnectivityGraph`` before it moved into the engine) gave on a
deterministic ResNet-20.
"""
import itertools
import math

import pytest
import torch
import torch.nn as nn

from connect_tp import engine
from connect_tp.models import resnet20
from connect_tp.regularizer import (
    ChannelScaler,
    ConnectivityGraph,
    ConnectRegularizer,
    add_channel_scalers,
    channel_connectivity_importance,
    mlp_log_connectivity,
)
from connect_tp.sparsity import sparsity_report
from connect_tp.unstructured import synflow_scores

torch.set_num_threads(1)


def theta(w: torch.Tensor) -> torch.Tensor:
    return w.abs() / w.abs().sum()


class Tiny(nn.Module):
    """x(3) -> l1(4) -> BatchNorm -> ReLU -> scaler -> l2(3), plus the identity skip x -> l3(2)."""

    def __init__(self):
        super().__init__()
        self.l1, self.bn, self.s = nn.Linear(3, 4), nn.BatchNorm1d(4), ChannelScaler(4, dim=-1)
        self.l2, self.l3 = nn.Linear(4, 3), nn.Linear(3, 2)

    def forward(self, x):
        return self.l3(torch.relu(self.l2(self.s(torch.relu(self.bn(self.l1(x))))) + x))


def tiny(seed=0) -> Tiny:
    torch.manual_seed(seed)
    model = Tiny().double().eval()
    with torch.no_grad():
        model.s.scale.copy_(torch.tensor([0.5, -2.0, 1.5, 1.0]))
        model.bn.weight.uniform_(0.5, 2.0)
        model.bn.running_var.uniform_(0.5, 2.0)
    return model


def paths(model: Tiny, edge):
    """Every path (i, a, v, o) through l1, l2, l3 and (i, None, i, o) through the skip, with its product."""
    w1, d, w2, w3 = (edge(t.detach()) for t in (model.l1.weight, model.s.scale, model.l2.weight, model.l3.weight))
    branch = [((i, a, v, o), float(w1[a, i] * d[a] * w2[v, a] * w3[o, v]))
              for i, a, v, o in itertools.product(range(3), range(4), range(3), range(2))]
    skip = [((i, None, i, o), float(w3[o, i])) for i, o in itertools.product(range(3), range(2))]
    return branch, skip


@pytest.mark.parametrize("skip", ["drop", "keep"])
def test_normalized_view_equals_path_enumeration(skip):
    model = tiny()
    branch, identity = paths(model, theta)
    expected = sum(p for _, p in branch) + (sum(p for _, p in identity) if skip == "keep" else 0.0)
    graph = engine.AppendixBGraph(model, torch.randn(1, 3, dtype=torch.float64), skip)
    assert math.exp(graph.log_connectivity().item()) == pytest.approx(expected, rel=1e-12)
    # the saliency of l1 is the share of the path sum through each of its weights
    sal = graph.saliency()["l1"]
    share = torch.zeros(4, 3, dtype=torch.float64)
    for (i, a, _, _), p in branch:
        share[a, i] += p / expected
    torch.testing.assert_close(sal, share, rtol=1e-10, atol=1e-15)
    # the public names read the same engine view
    if skip == "drop":
        assert ConnectRegularizer(model, torch.randn(1, 3, dtype=torch.float64))().item() == \
            pytest.approx(-math.log(expected), rel=1e-12)
        imp = channel_connectivity_importance(model, torch.randn(1, 3, dtype=torch.float64))[model.s]
        per_channel = torch.tensor([sum(p for (_, a, _, _), p in branch if a == c) for c in range(4)],
                                   dtype=torch.float64) / expected
        torch.testing.assert_close(imp, per_channel, rtol=1e-10, atol=1e-15)


def test_normalized_view_gradients_equal_the_plain_path_sum():
    model = tiny(1)
    params = [model.l1.weight, model.s.scale, model.l2.weight, model.l3.weight]
    r = ConnectRegularizer(model, torch.randn(1, 3, dtype=torch.float64))()
    grads = torch.autograd.grad(r, params)
    t1, td, t2, t3 = (theta(p) for p in params)
    naive = -torch.log((t3 @ t2 @ (td[:, None] * t1) @ torch.ones(3, dtype=torch.float64)).sum())
    for g, ng in zip(grads, torch.autograd.grad(naive, params)):
        torch.testing.assert_close(g, ng, rtol=1e-10, atol=1e-14)


def test_effective_view_equals_brute_force_path_existence():
    model = tiny(2)
    with torch.no_grad():
        model.l1.weight[0].zero_()        # unit 0 sees no input
        model.bn.weight[1] = 0.0          # BatchNorm cuts unit 1
        model.s.scale[3] = 0.0            # the scaler cuts unit 3
        model.l2.weight[0].zero_()        # l2 unit 0 sees nothing
        model.l3.weight[:, 2].zero_()     # l2 unit 2 (and skip input 2) reach no output
        model.l1.weight[2, 1] = 0.0
    nonzero = lambda t: (t != 0).double()  # noqa: E731
    gamma = model.bn.weight.detach() != 0
    branch, identity = paths(model, nonzero)
    alive = [k for k, p in branch if p != 0 and gamma[k[1]]] + [k for k, p in identity if p != 0]
    graph = engine.AppendixBGraph(model, torch.randn(1, 3, dtype=torch.float64), "keep")
    params, units = graph.reachability()
    exp_l1 = torch.zeros(4, 3, dtype=torch.bool)
    exp_l2 = torch.zeros(3, 4, dtype=torch.bool)
    exp_l3 = torch.zeros(2, 3, dtype=torch.bool)
    for i, a, v, o in alive:
        if a is not None:
            exp_l1[a, i] = exp_l2[v, a] = True
        exp_l3[o, v] = True
    assert torch.equal(params["l1"], exp_l1) and torch.equal(params["l2"], exp_l2)
    assert torch.equal(params["l3"], exp_l3)
    assert torch.equal(units["l1"], exp_l1.any(1)) and torch.equal(units["s"], exp_l1.any(1))
    assert torch.equal(units["l2"], exp_l2.any(1)) and torch.equal(units["l3"], exp_l3.any(1))
    report = sparsity_report(model, torch.randn(1, 3, dtype=torch.float64))
    assert [report.layers[n].effective for n in ("l1", "l2", "l3")] == \
        [int(exp_l1.sum()), int(exp_l2.sum()), int(exp_l3.sum())]
    assert not report.collapsed
    with torch.no_grad():  # cut the skip's last edges: only the (dead) branch is left
        model.l3.weight.zero_()
    assert sparsity_report(model, torch.randn(1, 3, dtype=torch.float64)).collapsed


def test_deep_small_weight_mlp_matches_float64():
    torch.manual_seed(0)
    layers = []
    for _ in range(200):
        layer = nn.Linear(16, 16)
        with torch.no_grad():
            layer.weight.mul_(0.05 / layer.weight.abs().mean())
        layers += [layer, nn.ReLU()]
    model = nn.Sequential(*layers)
    weights = [m.weight for m in model if isinstance(m, nn.Linear)]
    r = ConnectRegularizer(model, torch.randn(1, 16))()
    r64 = -mlp_log_connectivity([w.detach().double() for w in weights])
    assert r.item() == pytest.approx(r64.item(), rel=1e-6)
    g = torch.autograd.grad(r, weights[::50])
    w64 = [w.detach().double().requires_grad_(True) for w in weights]
    g64 = torch.autograd.grad(-mlp_log_connectivity(w64), w64[::50])
    for a, b in zip(g, g64):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-6 * float(b.abs().max()))
    assert not sparsity_report(model, torch.randn(1, 16)).collapsed


def deterministic_resnet20(scalers: bool) -> nn.Module:
    """ResNet-20 with weights from a sine (no RNG): a third of the conv weights and of the BN scales are 0."""
    model = resnet20()
    if scalers:
        add_channel_scalers(model)
    with torch.no_grad():
        for k, (name, p) in enumerate(model.named_parameters()):
            v = torch.sin(torch.arange(p.numel(), dtype=torch.float64) * 0.7 + k).view(p.shape)
            if name.endswith("scale"):
                p.copy_(v)
            elif p.dim() > 1:
                p.copy_(v * 0.1 * (v.abs() > 0.5))
            elif name.endswith("weight"):
                p.copy_(v * (v.abs() > 0.3))
            else:
                p.copy_(v)
    return model.eval()


# Values of the former regularizer interpreter (regularizer/graph.py + op_rules.py, before the
# appendix-B views moved into the engine): R, |dR/dparams|, log phi with skips kept, direct and
# effective sparsity, number of effective units.
FORMER = {
    False: (62.61117935180664, 0.13268155459764944, -10.796443939208984, 0.3333345638178489, 0.5315287047427795, 647),
    True: (120.23102569580078, 0.9534643296025394, -21.24654197692871, 0.3333271809107554, 0.523418581300573, 641),
}


@pytest.mark.parametrize("scalers", [False, True])
def test_resnet20_values_of_the_former_interpreter(scalers):
    model = deterministic_resnet20(scalers)
    x = torch.ones(1, 3, 8, 8)
    r_old, grad_old, keep_old, direct_old, effective_old, units_old = FORMER[scalers]
    reg = ConnectRegularizer(model, x)
    r = reg()
    grads = torch.autograd.grad(r, reg.parameters_regularized())
    assert r.item() == pytest.approx(r_old, rel=1e-5)
    assert math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads)) == pytest.approx(grad_old, rel=1e-5)
    assert ConnectivityGraph(model, x, "keep").log_connectivity().item() == pytest.approx(keep_old, rel=1e-5)
    report = sparsity_report(model, x)
    assert report.direct == pytest.approx(direct_old, rel=1e-12)
    assert report.effective == pytest.approx(effective_old, rel=1e-12)
    assert not report.collapsed
    assert sum(layer.effective_units for layer in report.layers.values()) == units_old
    scores = synflow_scores(model, x)
    assert set(scores) == {n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def test_appendix_b_views_need_their_graph():
    model = nn.Sequential(nn.Linear(3, 2))
    with pytest.raises(ValueError, match="AppendixBGraph"):
        engine.run_traced(model, torch.ones(1, 3), view="normalized")
    graph = engine.AppendixBGraph(model, torch.ones(1, 3))
    with pytest.raises(ValueError, match="appendix-B view"):
        graph.edges("signal")


def test_non_finite_weights_are_a_clear_error_naming_the_layer():
    from connect_tp.regularizer import ConnectRegularizer

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    with torch.no_grad():
        model[2].weight[1, 1] = float("nan")
    with pytest.raises(FloatingPointError, match="layer '2' has non-finite weights"):
        ConnectRegularizer(model, torch.rand(1, 4))()
