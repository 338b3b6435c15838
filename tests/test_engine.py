"""The connectivity engine: views against brute-force path sums, float32 at any depth, no false collapse."""
import copy
import itertools
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from connect_tp import engine
from connect_tp.connectivity import log_connectivity, log_connectivity_and_dtype
from connect_tp.models import resnet110
from connect_tp.pruning import layer_report, signal_flow
from connect_tp.sparsity import sparsity_report


class ResMLP(nn.Module):
    """Linear -> BatchNorm -> ReLU -> residual Linear block -> Linear head."""

    def __init__(self):
        super().__init__()
        self.l1, self.bn, self.l2, self.l3 = nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        h = F.relu(self.bn(self.l1(x)))
        h = F.relu(self.l2(h) + h)
        return self.l3(h)


def res_mlp(seed=0):
    torch.manual_seed(seed)
    model = ResMLP().double().eval()
    with torch.no_grad():
        model.bn.weight.copy_(torch.tensor([1.5, -0.5, 0.8, 2.0], dtype=torch.float64))
        model.bn.running_var.copy_(torch.tensor([0.5, 2.0, 1.0, 4.0], dtype=torch.float64))
        model.bn.running_mean.copy_(torch.tensor([0.3, -0.2, 0.1, 0.4], dtype=torch.float64))
    return model


def enumerate_paths(model):
    """Every input-output path of ResMLP's structure view as (l1 unit, l2 unit or None = skip, out, product)."""
    a1 = model.l1.weight.detach().abs()
    s = model.bn.weight.detach().abs() / torch.sqrt(model.bn.running_var + model.bn.eps)
    a2, a3 = model.l2.weight.detach().abs(), model.l3.weight.detach().abs()
    for i, a, via, o in itertools.product(range(3), range(4), [None, 0, 1, 2, 3], range(2)):
        product = float(a1[a, i] * s[a])  # all-ones input
        b = a if via is None else via
        if via is not None:
            product *= float(a2[via, a])
        product *= float(a3[o, b])
        yield a, via, o, product


def test_structure_view_equals_brute_force_path_sum():
    model = res_mlp()
    paths = list(enumerate_paths(model))
    phi = sum(p for *_, p in paths)
    flows = engine.layer_flows(model, torch.zeros(1, 3, dtype=torch.float64))
    assert math.exp(flows["log_phi"]) == pytest.approx(phi, rel=1e-12)
    # the share of a channel is the fraction of the path sum that passes through it
    l1 = torch.tensor([sum(p for a, _, _, p in paths if a == c) for c in range(4)], dtype=torch.float64) / phi
    l2 = torch.tensor([sum(p for _, v, _, p in paths if v == c) for c in range(4)], dtype=torch.float64) / phi
    l3 = torch.tensor([sum(p for _, _, o, p in paths if o == c) for c in range(2)], dtype=torch.float64) / phi
    torch.testing.assert_close(flows["shares"]["l1"], l1, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(flows["shares"]["l2"], l2, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(flows["shares"]["l3"], l3, rtol=1e-10, atol=1e-14)
    _, absolute = signal_flow(model, torch.zeros(1, 3, dtype=torch.float64))
    torch.testing.assert_close(absolute["l1"], l1 * phi, rtol=1e-10, atol=0)


def test_reach_view_equals_brute_force_path_existence():
    model = res_mlp()
    with torch.no_grad():
        model.l1.weight[1].zero_()          # l1 unit 1 sees no input
        model.bn.weight[2] = 0.0            # BatchNorm cuts unit 2
        model.l2.weight[:, 3].zero_()       # l2 reads nothing from unit 3 (the skip still does)
        model.l2.weight[0].zero_()          # l2 unit 0 sees nothing
        model.l3.weight[:, 1].zero_()       # unit 1 after the block reaches no output
    edges = [(a, via, o) for a, via, o, p in enumerate_paths(model) if p != 0]
    flows = engine.layer_flows(model, torch.zeros(1, 3, dtype=torch.float64))
    expected_l1 = torch.tensor([any(a == c for a, _, _ in edges) for c in range(4)])
    expected_l2 = torch.tensor([any(v == c for _, v, _ in edges) for c in range(4)])
    expected_l3 = torch.tensor([any(o == c for _, _, o in edges) for c in range(2)])
    assert torch.equal(flows["alive"]["l1"], expected_l1)
    assert torch.equal(flows["alive"]["l2"], expected_l2)
    assert torch.equal(flows["alive"]["l3"], expected_l3)
    assert flows["connected"]
    # the magnitude view agrees where a channel carries nothing
    for name in ("l1", "l2", "l3"):
        assert torch.equal(flows["shares"][name] > 0, flows["alive"][name]), name


def test_signal_view_equals_the_plain_forward_pass():
    # With |W|, |b| and BatchNorm as it runs, the engine is the plain forward pass of the |params| model.
    model = res_mlp()
    x = torch.rand(5, 3, dtype=torch.float64)
    out, _ = engine.run_traced(model, x)
    plain = copy.deepcopy(model)
    with torch.no_grad():
        for p in plain.parameters():
            p.abs_()
    torch.testing.assert_close(out.value * math.exp(out.log_scale), plain(x), rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------------------------- deep networks
def deep_mlp(depth=200, width=16, scale=0.05, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    layers = []
    for _ in range(depth):
        lin = nn.Linear(width, width)
        nn.init.uniform_(lin.weight, -scale, scale)
        nn.init.uniform_(lin.bias, -scale, scale)
        layers += [lin, nn.ReLU()]
    return nn.Sequential(*layers).to(dtype).eval()


def test_a_200_layer_mlp_is_exact_in_float32():
    model = deep_mlp()
    example = torch.rand(1, 16)
    log_phi32, dtype = log_connectivity_and_dtype(model, example)
    assert dtype is None and math.isfinite(log_phi32.item())
    reference = log_connectivity_and_dtype(model.double(), example.double(), dtype=torch.float64)[0]
    assert log_phi32.item() == pytest.approx(reference.item(), rel=1e-5)


def test_a_200_layer_mlp_without_biases_is_not_reported_disconnected():
    model = deep_mlp()
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                m.bias.zero_()
    example = torch.rand(1, 16)
    # the plain float32 pass underflows: what used to be reported as "disconnected"
    ones = torch.ones(1, 16)
    with torch.no_grad():
        h = ones
        for m in model:
            h = F.linear(h, m.weight.abs()) if isinstance(m, nn.Linear) else h
    assert float(h.sum()) == 0.0
    log_phi = log_connectivity(model, example).item()
    assert -600 < log_phi < -100  # far below float32's smallest number, e^-103
    # float64 reference: the same path sum with an all-ones input, computed by a plain product
    h = torch.ones(16, dtype=torch.float64)
    for m in model:
        if isinstance(m, nn.Linear):
            h = m.weight.detach().double().abs() @ h
    report = layer_report(model, example)
    assert not report["network_disconnected"] and report["collapsed_layers"] == [] and report["dead_channels"] == {}
    assert report["log_signal_flow"] == pytest.approx(math.log(float(h.sum())), rel=1e-5)
    assert not sparsity_report(model, example).collapsed


def float64_structural_log_phi(model, shape):
    """The old float64 collapse-report pass: |W|, no biases, BatchNorm as |gamma| / sqrt(var + eps)."""
    net = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.abs_()
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.abs_()
                m.bias.zero_()
                m.running_mean.zero_()
        return math.log(float(net(torch.ones((1,) + shape, dtype=torch.float64)).sum()))


def test_resnet110_stays_finite_in_float32_and_matches_float64():
    torch.manual_seed(0)
    model = resnet110(num_classes=10).eval()
    example = torch.rand(1, 3, 16, 16)
    params = {n: p.detach().requires_grad_(True) for n, p in model.named_parameters()}
    with torch.enable_grad():
        log_phi32, dtype = log_connectivity_and_dtype(model, example, n_samples=2, params=params)
        grads32 = torch.autograd.grad(log_phi32, [params["conv1.weight"], params["layer2.5.conv1.weight"]])
    assert dtype is None  # float32, no retry
    assert log_phi32.item() > math.log(3.4e38)  # the plain float32 pass would overflow
    params64 = {n: p.detach().double().requires_grad_(True) for n, p in model.named_parameters()}
    with torch.enable_grad():
        log_phi64, _ = log_connectivity_and_dtype(model.double(), example.double(), n_samples=2,
                                                  params=params64, dtype=torch.float64)
        grads64 = torch.autograd.grad(log_phi64, [params64["conv1.weight"], params64["layer2.5.conv1.weight"]])
    model.float()
    assert log_phi32.item() == pytest.approx(log_phi64.item(), rel=1e-5)
    for g32, g64 in zip(grads32, grads64):
        torch.testing.assert_close(g32.double(), g64, rtol=1e-3, atol=1e-4 * float(g64.abs().max()))
    report = layer_report(model, example)
    assert report["log_signal_flow"] == pytest.approx(float64_structural_log_phi(model, (3, 16, 16)), rel=1e-5)
    assert not report["network_disconnected"] and report["collapsed_layers"] == []


def test_zero_batchnorm_scales_read_the_same_in_every_report():
    torch.manual_seed(0)
    model = resnet110(num_classes=10).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.zero_()
    example = torch.rand(1, 3, 16, 16)
    report = layer_report(model, example)
    assert report["network_disconnected"] and report["log_signal_flow"] == -math.inf
    assert sparsity_report(model, example).collapsed  # used to say "not collapsed"
    # The importance's signal view is another quantity: an all-zero gamma is a zero-initialised
    # layer there, measured as all-ones with a warning naming it, so every convolution keeps a
    # connectivity gradient (the reports above still see the collapse).
    model.zero_grad()
    with pytest.warns(engine.ConnectivityRuleWarning, match=r"zero-initialised.*'bn1.weight'.*all-ones"):
        log_phi = log_connectivity(model, example, n_samples=2)
    assert math.isfinite(log_phi.item())
    log_phi.backward()
    assert float(model.layer1[0].conv1.weight.grad.abs().max()) > 0.0
