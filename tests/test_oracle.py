"""An independent oracle for ConnectImportance's scores.

Nothing here calls connect_tp to compute an expected value: ``log phi`` is the test's own forward
pass with absolute-valued parameters (:func:`oracle_log_phi`) or a brute-force sum over every
input-output path (:func:`path_sum`), its gradient comes from ``torch.autograd.grad``, and the
per-channel reduction is written out member by member. The only contract shared with the
library is how the connectivity inputs are drawn: ``n_samples`` images of
``torch.rand(..., generator=torch.Generator().manual_seed(seed))`` (torch's global generator for
``seed=None``), averaged.

With ``normalizer=None`` and ``group_reduction="sum"`` a group's score must equal the sum over its
members of ``|W * (W.grad - lam * d log phi / dW)|`` per channel, and ``|W * d log phi / dW|``
when no ``.grad`` exists (data-free).
"""
import itertools
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_pruning as tp

from connect_tp import ConnectImportance
from connect_tp.importance import DEFAULT_BN_FLOW
from connect_tp.connectivity import BN_FLOWS, log_connectivity

SHAPE = (3, 8, 8)


class OracleNet(nn.Module):
    """Conv with bias, eval BatchNorm, a grouped conv, a depthwise conv, a 1x1 conv, a linear head."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.conv3 = nn.Conv2d(8, 6, 1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.conv2(x))
        x = F.relu(self.dw(x))
        return self.fc(self.conv3(x).mean((2, 3)))


def oracle_net(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    model = OracleNet()
    with torch.no_grad():  # non-trivial eval statistics: some channels get clipped by the ReLU
        model.bn1.weight.copy_(torch.randn(8))
        model.bn1.bias.copy_(torch.randn(8))
        model.bn1.running_mean.copy_(torch.randn(8) * 0.5)
        model.bn1.running_var.copy_(torch.rand(8) + 0.5)
    model = model.to(dtype).eval()
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(6, *SHAPE, generator=g).to(dtype)
    y = torch.randint(0, 4, (6,), generator=g)
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    return model


def connectivity_inputs(n_samples, seed, dtype):
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    return torch.rand((n_samples,) + SHAPE, generator=generator).to(dtype)


def oracle_log_phi(p, buffers, x, bn_flow):
    """The test's own signal-flow pass of OracleNet: |every parameter|, BatchNorm as bn_flow says."""
    a = {k: v.abs() for k, v in p.items()}
    h = F.conv2d(x, a["conv1.weight"], a["conv1.bias"], padding=1)
    if bn_flow == "stats":
        scale = a["bn1.weight"] / torch.sqrt(buffers["bn1.running_var"] + 1e-5)
        h = (h - buffers["bn1.running_mean"][:, None, None]) * scale[:, None, None] + a["bn1.bias"][:, None, None]
    elif bn_flow == "gamma":
        h = h * a["bn1.weight"][:, None, None]
    elif bn_flow == "scale":
        h = h * (a["bn1.weight"] / torch.sqrt(buffers["bn1.running_var"] + 1e-5))[:, None, None]
    h = torch.relu(h)
    h = torch.relu(F.conv2d(h, a["conv2.weight"], a["conv2.bias"], padding=1, groups=2))
    h = torch.relu(F.conv2d(h, a["dw.weight"], a["dw.bias"], padding=1, groups=8))
    h = F.conv2d(h, a["conv3.weight"], a["conv3.bias"]).mean((2, 3))
    out = h @ a["fc.weight"].t() + a["fc.bias"]
    return torch.log(out.sum(1).mean())


def oracle_dlogphi(model, n_samples=4, seed=0, bn_flow=DEFAULT_BN_FLOW):
    """``d log phi / dW`` for every parameter, in float64, by autograd through the oracle pass."""
    leaves = {n: p.detach().double().requires_grad_(True) for n, p in model.named_parameters()}
    buffers = {n: b.detach().double() for n, b in model.named_buffers()}
    x = connectivity_inputs(n_samples, seed, torch.float64) if seed is not None else \
        connectivity_inputs(n_samples, None, torch.float32).double()
    log_phi = oracle_log_phi(leaves, buffers, x, bn_flow)
    grads = torch.autograd.grad(log_phi, list(leaves.values()), allow_unused=True)
    return log_phi.item(), {n: torch.zeros_like(leaves[n]) if g is None else g for n, g in zip(leaves, grads)}


def objective(model, dlogphi, lam, data_free=False):
    """``W * dJ/dW`` per parameter in float64: loss gradient minus lam times the connectivity one."""
    out = {}
    for n, p in model.named_parameters():
        w = p.detach().double()
        out[n] = (w * -dlogphi[n]) if data_free else w * (p.grad.double() - lam * dlogphi[n])
    return {n: t.abs() for n, t in out.items()}


def out_channels(t):
    return t.flatten(1).sum(1)


def in_channels(t, groups=1):
    """Torch-Pruning's in-channel convention: per input slot, summed over every filter, repeated per group."""
    local = t.transpose(0, 1).flatten(1).sum(1)
    return local.repeat(groups) if groups > 1 else local


def expected_scores(wg, bias=False, batchnorm=False):
    """Expected group scores, written member by member, for the four groups of OracleNet."""
    b = (lambda name: wg[name]) if bias else (lambda name: 0)
    return {
        # conv1 out-channels + bn1 (only with batchnorm=True) + conv2's grouped in-channels
        "conv1": out_channels(wg["conv1.weight"]) + b("conv1.bias")
        + ((wg["bn1.weight"] + b("bn1.bias")) if batchnorm else 0)
        + in_channels(wg["conv2.weight"], groups=2),
        # conv2 out-channels + conv3 in-channels. The depthwise dw is in the group too, but
        # Torch-Pruning's Taylor convention (prune_depthwise_conv_out_channels is not among the
        # handlers it scores) leaves it out, and ConnectImportance reduces exactly like it.
        "conv2": out_channels(wg["conv2.weight"]) + b("conv2.bias") + in_channels(wg["conv3.weight"]),
        # conv3 out-channels + the linear head's in-features
        "conv3": out_channels(wg["conv3.weight"]) + b("conv3.bias") + in_channels(wg["fc.weight"]),
        "fc": out_channels(wg["fc.weight"]) + b("fc.bias"),
    }


def groups_of(model):
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=torch.zeros(1, *SHAPE, dtype=model.fc.weight.dtype))
    return {name: graph.get_pruning_group(getattr(model, name), fn, idxs=list(range(n)))
            for name, fn, n in [("conv1", tp.prune_conv_out_channels, 8), ("conv2", tp.prune_conv_out_channels, 8),
                                ("conv3", tp.prune_conv_out_channels, 6), ("fc", tp.prune_linear_out_channels, 4)]}


def assert_scores(imp, model, expected, dtype):
    # Torch-Pruning's reduction returns float32 even for a float64 model: float32 rounding at best.
    rtol = 2e-6 if dtype == torch.float64 else 2e-4
    for name, group in groups_of(model).items():
        got = imp(group).double()
        want = expected[name]
        torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * float(want.abs().max()), msg=name)


# ------------------------------------------------------------------------------------- scores
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("bn_flow", BN_FLOWS)
# The balanced lambda of this network (kappa = 1) is about 0.035: the list spans loss-dominated to
# connectivity-dominated scores.
@pytest.mark.parametrize("lam", [0.01, 0.05, 0.3, 3.0])
def test_scores_equal_the_oracle(lam, bn_flow, dtype):
    model = oracle_net(dtype)
    log_phi, dlogphi = oracle_dlogphi(model, bn_flow=bn_flow)
    imp = ConnectImportance(lam=lam, bn_flow=bn_flow, normalizer=None, group_reduction="sum",
                            example_inputs=torch.zeros(1, *SHAPE))
    assert_scores(imp, model, expected_scores(objective(model, dlogphi, lam)), dtype)
    assert imp.last_log_connectivity == pytest.approx(log_phi, rel=1e-9 if dtype == torch.float64 else 1e-5)


def test_the_connectivity_term_is_not_negligible_in_the_oracle():
    # Guards the oracle itself: at these lam the two terms are of comparable size, so a sign flip of
    # the connectivity term or a missing lam factor moves the scores far beyond the tolerance.
    model = oracle_net(torch.float64)
    _, dlogphi = oracle_dlogphi(model)
    for lam in (0.01, 0.05, 0.3, 3.0):
        right = expected_scores(objective(model, dlogphi, lam))
        flipped = expected_scores(objective(model, dlogphi, -lam))
        no_lam = expected_scores(objective(model, dlogphi, 1.0))
        for name in right:
            if lam < 1:
                assert float(((flipped[name] - right[name]) / right[name]).abs().max()) > 1e-2, (lam, name)
            assert float(((no_lam[name] - right[name]) / right[name]).abs().max()) > 1e-2, (lam, name)


def test_bias_and_batchnorm_scores_equal_the_oracle():
    model = oracle_net(torch.float64)
    _, dlogphi = oracle_dlogphi(model)
    imp = ConnectImportance(lam=3.0, normalizer=None, group_reduction="sum", bias=True, batchnorm=True,
                            example_inputs=torch.zeros(1, *SHAPE))
    expected = expected_scores(objective(model, dlogphi, 3.0), bias=True, batchnorm=True)
    assert_scores(imp, model, expected, torch.float64)


@pytest.mark.parametrize("kwargs", [{"lam": 5.0}, {"balance": math.inf}])
def test_data_free_scores_equal_the_oracle(kwargs):
    model = oracle_net(torch.float64)
    model.zero_grad(set_to_none=True)
    _, dlogphi = oracle_dlogphi(model)
    imp = ConnectImportance(normalizer=None, group_reduction="sum", example_inputs=torch.zeros(1, *SHAPE), **kwargs)
    expected = expected_scores(objective(model, dlogphi, None, data_free=True))
    with pytest.warns(UserWarning, match="data-free") if "lam" in kwargs else _no_warning():
        assert_scores(imp, model, expected, torch.float64)
    assert imp.data_free


class _no_warning:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_balance_resolves_to_the_oracle_lambda():
    # lam = kappa * sum|W dL/dW| / sum|W dlogphi/dW| over conv and linear weights, then the same oracle.
    model = oracle_net(torch.float64)
    _, dlogphi = oracle_dlogphi(model)
    weights = [n for n, _ in model.named_parameters() if n.endswith("weight") and not n.startswith("bn")]
    params = dict(model.named_parameters())
    loss_mass = sum(float((params[n].detach() * params[n].grad).abs().sum()) for n in weights)
    conn_mass = sum(float((params[n].detach() * dlogphi[n]).abs().sum()) for n in weights)
    lam = 2.0 * loss_mass / conn_mass
    imp = ConnectImportance(balance=2.0, normalizer=None, group_reduction="sum", example_inputs=torch.zeros(1, *SHAPE))
    assert_scores(imp, model, expected_scores(objective(model, dlogphi, lam)), torch.float64)
    assert imp.lam == pytest.approx(lam, rel=1e-9)


# ------------------------------------------------------------------------- seed and n_samples
def conv1_scores(model, **kwargs):
    imp = ConnectImportance(normalizer=None, group_reduction="sum", example_inputs=torch.zeros(1, *SHAPE), **kwargs)
    return imp(groups_of(model)["conv1"]).double()


def conv1_oracle(model, lam, **kwargs):
    _, dlogphi = oracle_dlogphi(model, **kwargs)
    return expected_scores(objective(model, dlogphi, lam))["conv1"]


def test_seed_acts_and_selects_the_inputs():
    model = oracle_net(torch.float64)
    by_seed = {seed: conv1_scores(model, lam=10.0, seed=seed) for seed in (0, 1, 2)}
    for seed, got in by_seed.items():
        torch.testing.assert_close(got, conv1_oracle(model, 10.0, seed=seed), rtol=2e-6, atol=0)
    assert not torch.allclose(by_seed[0], by_seed[1], rtol=1e-3)
    assert not torch.allclose(by_seed[1], by_seed[2], rtol=1e-3)
    torch.testing.assert_close(conv1_scores(model, lam=10.0, seed=1), by_seed[1], rtol=0, atol=0)


def test_seed_none_draws_from_torch_global_generator():
    model = oracle_net(torch.float64)
    groups = groups_of(model)
    imp = ConnectImportance(lam=10.0, seed=None, normalizer=None, group_reduction="sum",
                            example_inputs=torch.zeros(1, *SHAPE))
    torch.manual_seed(123)
    got = imp(groups["conv1"]).double()
    torch.manual_seed(123)
    expected = conv1_oracle(model, 10.0, seed=None)
    torch.testing.assert_close(got, expected, rtol=2e-6, atol=0)


def test_n_samples_acts_and_averages_over_that_many_inputs():
    model = oracle_net(torch.float64)
    by_n = {n: conv1_scores(model, lam=10.0, n_samples=n) for n in (1, 3, 16)}
    for n, got in by_n.items():
        torch.testing.assert_close(got, conv1_oracle(model, 10.0, n_samples=n), rtol=2e-6, atol=0)
    assert not torch.allclose(by_n[1], by_n[16], rtol=1e-3)
    assert not torch.allclose(by_n[3], by_n[16], rtol=1e-3)


# -------------------------------------------------------------------- brute-force path sums
def bn_as_affine(bn, bn_flow):
    """Eval BatchNorm as (diagonal edge weights, additive constant) of the |parameter| network."""
    gamma, beta = bn.weight.abs(), bn.bias.abs()
    if bn_flow == "stats":
        s = torch.sqrt(bn.running_var + bn.eps)
        return gamma / s, beta - gamma * bn.running_mean / s
    if bn_flow == "gamma":
        return gamma, torch.zeros_like(beta)
    if bn_flow == "scale":
        return gamma / torch.sqrt(bn.running_var + bn.eps), torch.zeros_like(beta)
    return torch.ones_like(gamma), torch.zeros_like(beta)


def small_net():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 3), nn.ReLU(),
                          nn.Linear(3, 2)).double().eval()
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([1.5, -0.7, 0.3, -2.0]))
        model[1].bias.copy_(torch.tensor([-0.2, 0.4, 0.1, -0.6]))
        # negative running means: with |W| and inputs >= 0 every signal stays >= 0, so the ReLUs pass
        # it unchanged and phi is exactly the path sum below
        model[1].running_mean.copy_(torch.tensor([-0.3, -0.1, -0.8, -0.05]))
        model[1].running_var.copy_(torch.tensor([0.5, 2.0, 1.0, 0.2]))
    return model


def path_sum(model, x, bn_flow):
    """Sum over every path from an input unit or a bias to an output unit of the product on the path.

    Layers are (edge weight matrix ``A[out, in]``, additive constant ``c[out]``); a path starts at
    input unit ``i`` with value ``x[i]`` or at a constant ``c_k[j]``, and collects one edge weight
    per later layer. Built from torch scalars, so autograd differentiates the enumeration itself.
    """
    lin0, bn, _, lin1, _, lin2 = model
    d, c_bn = bn_as_affine(bn, bn_flow)
    layers = [(lin0.weight.abs(), lin0.bias.abs()), (torch.diag(d), c_bn),
              (lin1.weight.abs(), lin1.bias.abs()), (lin2.weight.abs(), lin2.bias.abs())]
    widths = [x.shape[1]] + [a.shape[0] for a, _ in layers]
    total = 0
    for sample in x:
        sources = [(0, i, sample[i]) for i in range(widths[0])]
        sources += [(k + 1, j, c[j]) for k, (_, c) in enumerate(layers) for j in range(widths[k + 1])]
        for start, unit, value in sources:
            for rest in itertools.product(*[range(w) for w in widths[start + 1:]]):
                path, term = (unit,) + rest, value
                for step, (a, _) in enumerate(layers[start:]):
                    term = term * a[path[step + 1], path[step]]
                total = total + term
    return total / x.shape[0]


@pytest.mark.parametrize("bn_flow", BN_FLOWS)
def test_connectivity_equals_brute_force_path_sum(bn_flow):
    model = small_net()
    x = torch.rand((3, 3), generator=torch.Generator().manual_seed(5)).double()
    with torch.no_grad():  # the ReLUs are inactive on these inputs (checked, not assumed)
        assert bool((bn_as_affine(model[1], bn_flow)[1] >= 0).all())
        expected = float(path_sum(model, x, bn_flow))
    got = log_connectivity(model, torch.zeros(1, 3, dtype=torch.float64), n_samples=3, seed=5, bn_flow=bn_flow)
    assert math.exp(got.item()) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("bn_flow", BN_FLOWS)
def test_data_free_scores_equal_brute_force_gradients(bn_flow):
    model = small_net()
    x = torch.rand((3, 3), generator=torch.Generator().manual_seed(5)).double()
    params = dict(model.named_parameters())
    log_phi = torch.log(path_sum(model, x, bn_flow))
    grads = dict(zip(params, torch.autograd.grad(log_phi, list(params.values()), allow_unused=True)))
    wg = {n: (p.detach() * (grads[n] if grads[n] is not None else 0)).abs() for n, p in params.items()}
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=torch.zeros(1, 3, dtype=torch.float64))
    imp = ConnectImportance(balance=math.inf, bn_flow=bn_flow, n_samples=3, seed=5, normalizer=None,
                            group_reduction="sum", bias=True, batchnorm=True,
                            example_inputs=torch.zeros(1, 3))
    first = graph.get_pruning_group(model[0], tp.prune_linear_out_channels, idxs=[0, 1, 2, 3])
    expected = (out_channels(wg["0.weight"]) + wg["0.bias"] + wg["1.weight"] + wg["1.bias"]
                + in_channels(wg["3.weight"]))
    torch.testing.assert_close(imp(first).double(), expected, rtol=2e-6, atol=1e-12)
    second = graph.get_pruning_group(model[3], tp.prune_linear_out_channels, idxs=[0, 1, 2])
    expected = out_channels(wg["3.weight"]) + wg["3.bias"] + in_channels(wg["5.weight"])
    torch.testing.assert_close(imp(second).double(), expected, rtol=2e-6, atol=1e-12)
    if bn_flow == "identity":  # BatchNorm is skipped: the connectivity does not see its parameters
        assert grads["1.weight"] is None or float(grads["1.weight"].abs().max()) == 0
