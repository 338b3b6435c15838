"""The connectivity engine: views against brute-force path sums, float32 at any depth, no false collapse."""
import copy
import itertools
import math
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from connect_tp import engine
from connect_tp.connectivity import BN_FLOWS, log_connectivity, log_connectivity_and_dtype
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


# ------------------------------------------------------------------ rules of the signal view
def _growing_linears(depth, act=None):
    """``depth`` 16-wide linear layers with weights in [0.5, 1): the flow grows about e^2.5 per layer,
    far beyond float32's range after 40 layers; ``act`` follows every layer when given."""
    layers = []
    for _ in range(depth):
        lin = nn.Linear(16, 16)
        with torch.no_grad():
            lin.weight.uniform_(0.5, 1.0)
        layers += [lin, act] if act is not None else [lin]
    return layers


def _abs_forward64(model, x, **swap):
    """The plain forward of ``model`` in float64 with every parameter replaced by its absolute value."""
    params = {n: p.detach().double().abs().requires_grad_(True) for n, p in model.named_parameters()}
    params.update(swap)
    buffers = {n: b.double() for n, b in model.named_buffers()}
    out = torch.func.functional_call(model, {**params, **buffers}, (x.double(),))
    return out, params


class _Clamped(nn.Module):
    """Two wide linear layers around a clamp given as ``form`` (floor 0.5, ceiling 6)."""

    def __init__(self, form):
        super().__init__()
        self.l1, self.l2, self.form = nn.Linear(6, 16), nn.Linear(16, 3), form
        self.act = nn.Hardtanh(0.5, 6.0)
        with torch.no_grad():  # half the units far below the floor, half far above the ceiling
            self.l1.weight.uniform_(-1, 1)
            self.l1.weight[:8] *= 1e-3
            self.l1.weight[8:] *= 50.0
            self.l1.bias.zero_()

    def forward(self, x):
        h = self.l1(x)
        if self.form == "module":
            h = self.act(h)
        elif self.form == "hardtanh":
            h = F.hardtanh(h, 0.5, 6.0)
        elif self.form == "clamp":
            h = torch.clamp(h, 0.5, 6.0)
        else:
            h = h.clamp(min=0.5, max=6.0)
        return self.l2(h)


@pytest.mark.parametrize("form", ["module", "hardtanh", "clamp", "method"])
def test_clamp_rule_against_a_float64_oracle_at_a_nonzero_log_scale(form):
    """The floor is exact at the flow's scale (divided by it); the ceiling is open (a path sum).

    At the clamp the flow is renormalized to a maximum of 1 at a scale near e^4, so a floor that
    is not divided by the scale lifts the small units to 0.5 * e^4 instead of 0.5.
    """
    torch.manual_seed(0)
    model = _Clamped(form).eval()
    x = torch.rand(5, 6)
    got_out, _ = engine.run_traced(model, x)
    flow = engine.output_flow(got_out)
    l1 = engine.run_traced(nn.Sequential(model.l1), x)[0]
    assert l1.log_scale > 3.0  # the clamp sees a scaled flow
    # oracle: float64, |params|, the floor alone
    p = {n: t.detach().double().abs() for n, t in model.named_parameters()}
    h = F.linear(x.double(), p["l1.weight"], p["l1.bias"]).clamp(min=0.5)
    expected = F.linear(h, p["l2.weight"], p["l2.bias"])
    assert bool((F.linear(x.double(), p["l1.weight"]) < 0.5).any())  # the floor is active...
    assert bool((F.linear(x.double(), p["l1.weight"]) > 6.0).any())  # ...and so would the ceiling be
    torch.testing.assert_close((flow.value.double() * math.exp(flow.log_scale)), expected, rtol=1e-5, atol=0)
    log_phi = log_connectivity(model, x[:1], n_samples=4, seed=0)
    ref_x = torch.rand(4, 6, generator=torch.Generator().manual_seed(0))
    hh = F.linear(ref_x.double(), p["l1.weight"], p["l1.bias"]).clamp(min=0.5)
    ref = torch.log(F.linear(hh, p["l2.weight"], p["l2.bias"]).sum(1).mean())
    assert log_phi.item() == pytest.approx(ref.item(), rel=1e-6)


def test_a_relu6_network_keeps_a_gradient_in_every_layer():
    """With |W| a ReLU6 network's flow is far above 6 everywhere: an exact clamp would pass a
    constant and leave every layer but the last without a connectivity gradient."""
    torch.manual_seed(0)
    layers = []
    for _ in range(6):
        layers += [nn.Linear(32, 32), nn.ReLU6()]
    model = nn.Sequential(*layers, nn.Linear(32, 4))
    log_phi = log_connectivity(model, torch.rand(1, 32), n_samples=4)
    grads = torch.autograd.grad(log_phi, [m.weight for m in model if isinstance(m, nn.Linear)])
    assert all(float(g.abs().min()) > 0 and bool(torch.isfinite(g).all()) for g in grads)


@pytest.mark.parametrize("act", [nn.GELU(), nn.SiLU(), nn.Hardswish(), nn.Mish(), nn.ELU()])
def test_relu_like_activations_are_exact_far_beyond_float32(act):
    """An 80-layer MLP reaches a scale near e^200: the float32 engine takes the activation's
    asymptote there (exact to rounding) instead of falling back, and matches float64."""
    torch.manual_seed(0)
    model = nn.Sequential(*_growing_linears(80, act), nn.Linear(16, 2)).eval()
    x = torch.rand(3, 16)
    out, _ = engine.run_traced(model, x)  # raises NeedsFallback if a rule is missing
    flow = engine.output_flow(out)
    assert flow.log_scale > 150
    ref, _ = _abs_forward64(model, x)
    got = torch.log(flow.value.double().sum()) + flow.log_scale
    assert float(got) == pytest.approx(float(torch.log(ref.sum())), rel=1e-6)


class _SqueezeExcite(nn.Module):
    def __init__(self, gate):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc1, self.fc2, self.gate = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 1), gate
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        x = self.conv(x)
        s = self.fc2(torch.relu(self.fc1(F.adaptive_avg_pool2d(x, 1))))
        x = x * self.gate(s)
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


@pytest.mark.parametrize("gate", [nn.Sigmoid(), nn.Hardsigmoid(), torch.sigmoid])
def test_a_gate_is_a_switch_with_elasticity_one(gate):
    """Value: the open gate (1), as the saturated exact gate; gradient: x * d log z, which the
    squeeze-excitation convolutions get (the exact gate gives them exactly 0)."""
    torch.manual_seed(0)
    model = _SqueezeExcite(gate).eval()
    x = torch.rand(1, 3, 8, 8)
    log_phi = log_connectivity(model, x, n_samples=2, seed=0)
    grads = torch.autograd.grad(log_phi, [model.fc1.weight, model.fc2.weight, model.conv.weight])
    assert all(float(g.abs().sum()) > 0 and bool(torch.isfinite(g).all()) for g in grads)
    # oracle in float64: x * z / stop_gradient(z)
    samples = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)).double()
    p = {n: t.detach().double().abs().requires_grad_(True) for n, t in model.named_parameters()}
    h = F.conv2d(samples, p["conv.weight"], p["conv.bias"], padding=1)
    z = F.conv2d(torch.relu(F.conv2d(F.adaptive_avg_pool2d(h, 1), p["fc1.weight"], p["fc1.bias"])),
                 p["fc2.weight"], p["fc2.bias"])
    gated = h * (z / z.detach())
    out = F.linear(torch.flatten(F.adaptive_avg_pool2d(gated, 1), 1), p["head.weight"], p["head.bias"])
    ref = torch.log(out.sum(1).mean())
    assert log_phi.item() == pytest.approx(ref.item(), rel=1e-6)
    ref_grads = torch.autograd.grad(ref, [p["fc1.weight"], p["fc2.weight"]])
    signs = [model.fc1.weight.sign().double(), model.fc2.weight.sign().double()]
    for g, r, s in zip(grads[:2], ref_grads, signs):
        torch.testing.assert_close(g.double(), r * s, rtol=1e-4, atol=1e-10)


class _CoordConv(nn.Module):
    """A convolution that reads constant coordinate channels in [-3, 3] next to the flow (CoordConv)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2, self.fc = nn.Conv2d(1, 2, 3, padding=1), nn.Conv2d(4, 3, 1), nn.Linear(3 * 6 * 6, 2)

    def forward(self, x):
        y = self.conv1(x)
        n, h, w = y.shape[0], y.shape[2], y.shape[3]
        rows = torch.linspace(-3.0, 3.0, h).view(1, 1, h, 1).expand(n, 1, h, w)
        cols = torch.linspace(-3.0, 3.0, w).view(1, 1, 1, w).expand(n, 1, h, w)
        y = torch.cat([y, rows, cols], 1)
        return self.fc(torch.flatten(torch.relu(self.conv2(y)), 1))


def test_cat_with_a_negative_constant_is_not_sign_keeping(monkeypatch):
    """The sign proof used to call cat([flow, coordinates]) non-negative: ReLUs after it were
    taken for the identity, the mean input was differentiated, and the gradient was off."""
    from connect_tp import ConnectImportance
    from connect_tp.scoring import gradient as importance_module

    torch.manual_seed(0)
    model = _CoordConv().eval()
    with torch.no_grad():
        model.conv1.weight.mul_(4.0)
    assert not engine.affine_by_signs(model, "gamma")
    x = torch.rand(4, 1, 6, 6, generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(importance_module, "connectivity_inputs", lambda m, inputs, n, generator=None: x[:n].clone())
    imp = ConnectImportance(n_samples=4, example_inputs=x[:1])
    leaves = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
    with torch.enable_grad():
        log_phi, grads = imp._traced_gradients(model, x, leaves, {})
    assert not imp.used_mean_sample
    out, p = _abs_forward64(model, x)  # every sample, float64: the coordinates keep their sign
    ref = torch.log(out.sum(1).mean())
    assert log_phi == pytest.approx(ref.item(), rel=1e-6)
    ref_grads = torch.autograd.grad(ref, list(p.values()))
    for (name, t), g, r in zip(model.named_parameters(), grads, ref_grads):
        torch.testing.assert_close(g.double(), r * t.detach().sign().double(), rtol=1e-4, atol=1e-9)


class _BatchNormAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d in miniature: F.batch_norm called from a traced forward."""

    def forward(self, x):
        return torch.relu(F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                       self.training, self.momentum, self.eps))


@pytest.mark.parametrize("bn_flow", BN_FLOWS)
def test_functional_batchnorm_reads_like_the_module(bn_flow):
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 2))
    with torch.no_grad():
        plain[1].running_mean.uniform_(-0.5, 0.5)
        plain[1].running_var.uniform_(0.5, 2.0)
        plain[1].weight.uniform_(-2, 2)
        plain[1].bias.uniform_(0.5, 1)
    functional = copy.deepcopy(plain)
    bn = _BatchNormAct(4)
    bn.load_state_dict(plain[1].state_dict())
    functional[1], functional[2] = bn, nn.Identity()
    functional.train()  # the pass uses the running statistics whatever the traced flag
    x = torch.rand(1, 3, 8, 8)
    a = log_connectivity(plain, x, n_samples=3, bn_flow=bn_flow)
    b = log_connectivity(functional, x, n_samples=3, bn_flow=bn_flow)
    assert b.item() == pytest.approx(a.item(), rel=1e-6)


class _Returns(nn.Module):
    def __init__(self, last):
        super().__init__()
        self.body, self.last = nn.Linear(4, 6), last

    def forward(self, x):
        return self.last(self.body(x))


@pytest.mark.parametrize("last,label", [
    (nn.Softmax(-1), "'last' (Softmax)"), (nn.LogSoftmax(-1), "'last' (LogSoftmax)"), (nn.Sigmoid(), "'last' (Sigmoid)"),
    (lambda h: F.log_softmax(h, -1), "the function log_softmax"), (lambda h: h.softmax(-1), "the function softmax"),
])
def test_an_output_normalization_is_measured_on_its_input(last, label):
    torch.manual_seed(0)
    model = _Returns(last)
    with pytest.warns(engine.ConnectivityRuleWarning, match="output comes from " + re.escape(label)):
        got = log_connectivity(model, torch.rand(1, 4), n_samples=3, seed=0)
    assert got.item() == pytest.approx(log_connectivity(model.body, torch.rand(1, 4), n_samples=3, seed=0).item(),
                                       rel=1e-6)


def test_an_operation_without_a_rule_names_itself_when_it_cannot_run():
    """Beyond float32's range an operation without a rule cannot run on the plain value: the
    engine says which module, so the importance's fallback warning can name it."""
    torch.manual_seed(0)
    model = nn.Sequential(*_growing_linears(60), nn.Softplus(), nn.Linear(16, 2))
    with pytest.raises(engine.NeedsFallback, match=r"module '60' \(Softplus\) has no signal-flow rule"):
        engine.run_traced(model, torch.rand(2, 16))


class _LayerNorm2d(nn.LayerNorm):
    """ConvNeXt's channels-first LayerNorm: F.layer_norm between two permutes (traced through)."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps).permute(0, 3, 1, 2)


@pytest.mark.parametrize("norm", ["layernorm2d", "groupnorm"])
def test_norms_are_uncentered_against_a_float64_oracle(norm):
    """x / rms(x) * |gamma| + |beta| over the normalized dimensions, at a scale far from 1."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3)
    with torch.no_grad():
        conv.weight.mul_(300.0)  # the norm sees a flow at a scale near e^6
    layer = _LayerNorm2d(8) if norm == "layernorm2d" else nn.GroupNorm(2, 8)
    with torch.no_grad():
        layer.weight.uniform_(-2, 2)
        layer.bias.uniform_(-1, 1)
    model = nn.Sequential(conv, layer, nn.Flatten(), nn.Linear(8 * 6 * 6, 3))
    x = torch.rand(2, 3, 8, 8)
    out, _ = engine.run_traced(model, x)
    p = {n: t.detach().double().abs() for n, t in model.named_parameters()}
    h = F.conv2d(x.double(), p["0.weight"], p["0.bias"])
    dims = (1,) if norm == "layernorm2d" else (2,)
    grouped = h if norm == "layernorm2d" else h.reshape(2, 2, -1)
    normed = (grouped / torch.sqrt(grouped.pow(2).mean(dims, keepdim=True) + layer.eps)).reshape(h.shape)
    normed = normed * p["1.weight"].view(1, -1, 1, 1) + p["1.bias"].view(1, -1, 1, 1)
    expected = F.linear(normed.flatten(1), p["3.weight"], p["3.bias"])
    torch.testing.assert_close(out.value.double() * math.exp(out.log_scale), expected, rtol=1e-5, atol=0)


def test_prelu_and_upsample_are_homogeneous_far_beyond_float32():
    """Both commute with a positive scale, so they run on the scaled value (no fall back), exactly."""
    torch.manual_seed(0)
    layers = []
    for _ in range(40):
        conv = nn.Conv2d(4, 4, 3, padding=1)
        with torch.no_grad():
            conv.weight.uniform_(0.5, 1.0)
        layers += [conv, nn.PReLU(4, init=-0.3)]
    model = nn.Sequential(*layers, nn.Upsample(scale_factor=2, mode="bilinear"), nn.Conv2d(4, 2, 1), nn.Flatten()).eval()
    x = torch.rand(2, 4, 4, 4)
    out, _ = engine.run_traced(model, x)
    assert out.log_scale > math.log(torch.finfo(torch.float32).max)  # the plain pass would overflow
    ref, _ = _abs_forward64(model, x)
    assert float(torch.log(out.value.double().sum()) + out.log_scale) == pytest.approx(float(torch.log(ref.sum())),
                                                                                      rel=1e-6)
    assert engine.affine_by_signs(model, "gamma")  # PReLU on flows >= 0 is the identity


@pytest.mark.parametrize("act", [nn.GELU(), nn.SiLU(), nn.ELU(alpha=0.5), nn.SELU(), nn.Mish()])
def test_relu_like_activations_near_zero_take_their_slope_at_zero(act):
    """Far below float32's smallest normal the activation is its slope at 0 (on each side of 0)."""
    v = torch.tensor([[0.5, -0.25, 1.0, -1.0]])
    got = engine.rules.relu_like(engine.Scaled(v, -200.0), act, *_slopes(act))
    expected = act(v.double() * 1e-30) / 1e-30  # the function near 0, in float64
    torch.testing.assert_close(got.value.double(), expected, rtol=1e-5, atol=0)
    assert got.log_scale == -200.0


def _slopes(act):
    return engine.rules.RELU_LIKE_MODULES[type(act)](act)[1:]
