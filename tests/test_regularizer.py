"""Tests for the CoNNect regularizer, channel scalers and the Torch-Pruning integration."""
import itertools
import math

import pytest
import torch
import torch.nn as nn

from connect_tp.models import resnet20, resnet110
from connect_tp.regularizer import (
    ChannelScaler,
    ConnectivityGraph,
    ConnectPruner,
    ConnectRegularizer,
    UnsupportedModuleError,
    add_channel_scalers,
    channel_connectivity_importance,
    channel_scalers,
    mlp_log_connectivity,
    prune_channels,
)

torch.set_num_threads(1)


def theta(w: torch.Tensor) -> torch.Tensor:
    return w.abs() / w.abs().sum()


def brute_force_paths(*adjacencies: torch.Tensor) -> float:
    """Sum over every input-output path of the product of edge weights (A[k][out, in])."""
    total = 0.0
    sizes = [adjacencies[0].shape[1]] + [a.shape[0] for a in adjacencies]
    for path in itertools.product(*[range(s) for s in sizes]):
        p = 1.0
        for k, a in enumerate(adjacencies):
            p *= float(a[path[k + 1], path[k]])
        total += p
    return total


def conv_adjacency(kernel: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Dense edge matrix of a stride-1, unpadded conv written out position by position."""
    c_out, c_in, kh, kw = kernel.shape
    ho, wo = h - kh + 1, w - kw + 1
    a = torch.zeros(c_out * ho * wo, c_in * h * w, dtype=kernel.dtype)
    for o, i, j, c, di, dj in itertools.product(range(c_out), range(ho), range(wo), range(c_in), range(kh), range(kw)):
        a[(o * ho + i) * wo + j, (c * h + i + di) * w + j + dj] += kernel[o, c, di, dj]
    return a


class Residual(nn.Module):
    def __init__(self, shortcut: bool):
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(3, 4), nn.Linear(4, 3), nn.Linear(3, 2)
        self.shortcut = nn.Linear(3, 3) if shortcut else None

    def forward(self, x):
        skip = x if self.shortcut is None else self.shortcut(x)
        return self.l3(torch.relu(self.l2(torch.relu(self.l1(x))) + skip))


def test_mlp_equals_path_enumeration():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    reg = ConnectRegularizer(model, torch.randn(1, 3, dtype=torch.float64))
    expected = brute_force_paths(*[theta(model[i].weight.detach()) for i in (0, 2, 4)])
    assert math.isclose(math.exp(-reg().item()), expected, rel_tol=1e-10)
    ws = [model[i].weight for i in (0, 2, 4)]
    assert math.isclose(math.exp(mlp_log_connectivity(ws).item()), expected, rel_tol=1e-10)


def test_cnn_with_bn_and_maxpool_equals_path_enumeration():
    torch.manual_seed(1)
    conv, fc = nn.Conv2d(2, 3, 2), nn.Linear(3 * 2 * 2, 2)
    model = nn.Sequential(conv, nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2, stride=1), nn.Dropout(0.5), nn.Flatten(), fc).double()
    model.eval()
    value = math.exp(-ConnectRegularizer(model, torch.randn(1, 2, 4, 4)).forward().item())
    # conv 2x4x4 -> 3x3x3, max-pool (as 2x2 average, stride 1) -> 3x2x2, linear -> 2
    pool = torch.zeros(3 * 2 * 2, 3 * 3 * 3, dtype=torch.float64)
    for c, i, j, di, dj in itertools.product(range(3), range(2), range(2), range(2), range(2)):
        pool[(c * 2 + i) * 2 + j, (c * 3 + i + di) * 3 + j + dj] = 0.25
    conv_a = conv_adjacency(theta(conv.weight.detach()), 4, 4)
    expected = brute_force_paths(pool @ conv_a, theta(fc.weight.detach()))
    assert math.isclose(value, expected, rel_tol=1e-9)


@pytest.mark.parametrize("shortcut", [False, True])
def test_residual_identity_skip_left_out_parameterized_kept(shortcut):
    torch.manual_seed(2)
    model = Residual(shortcut).double()
    t1, t2, t3 = (theta(m.weight.detach()) for m in (model.l1, model.l2, model.l3))
    expected = brute_force_paths(t1, t2, t3)
    if shortcut:
        expected += brute_force_paths(theta(model.shortcut.weight.detach()), t3)
    value = math.exp(-ConnectRegularizer(model, torch.randn(1, 3, dtype=torch.float64))().item())
    assert math.isclose(value, expected, rel_tol=1e-10)


def test_keep_mode_counts_the_identity_path():
    torch.manual_seed(3)
    model = Residual(False).double()
    t1, t2, t3 = (theta(m.weight.detach()) for m in (model.l1, model.l2, model.l3))
    graph = ConnectivityGraph(model, torch.randn(1, 3, dtype=torch.float64), skip_connections="keep")
    expected = brute_force_paths(t1, t2, t3) + brute_force_paths(torch.eye(3, dtype=torch.float64), t3)
    assert math.isclose(graph.log_connectivity().exp().item(), expected, rel_tol=1e-10)


def test_gradient_matches_finite_differences_and_naive_product():
    torch.manual_seed(4)
    ws = [torch.randn(4, 3, dtype=torch.float64, requires_grad=True), torch.randn(3, 4, dtype=torch.float64, requires_grad=True),
          torch.randn(2, 3, dtype=torch.float64, requires_grad=True)]
    assert torch.autograd.gradcheck(lambda *w: -mlp_log_connectivity(list(w)), ws)

    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).double()
    reg = ConnectRegularizer(model, torch.randn(1, 3, dtype=torch.float64))
    params = [model[i].weight for i in (0, 2, 4)]
    grads = torch.autograd.grad(reg(), params)
    ones = torch.ones(3, dtype=torch.float64)
    naive = -torch.log((theta(params[2]) @ theta(params[1]) @ theta(params[0]) @ ones).sum())
    naive_grads = torch.autograd.grad(naive, params)
    for g, ng in zip(grads, naive_grads):
        torch.testing.assert_close(g, ng)


def test_regularizer_gradient_in_resnet_matches_float64():
    torch.manual_seed(5)
    model = resnet20()
    x = torch.randn(1, 3, 32, 32)
    g32 = torch.autograd.grad(ConnectRegularizer(model, x)(), [model.conv1.weight, model.fc.weight])
    model64 = model.double()
    g64 = torch.autograd.grad(ConnectRegularizer(model64, x.double())(), [model64.conv1.weight, model64.fc.weight])
    for a, b in zip(g32, g64):
        torch.testing.assert_close(a.double(), b, rtol=1e-3, atol=1e-6 * b.abs().max().item())


def test_finite_where_naive_underflows_deep_mlp():
    torch.manual_seed(6)
    layers = []
    for _ in range(100):
        layers += [nn.Linear(32, 32), nn.ReLU()]
    model = nn.Sequential(*layers)
    weights = [m.weight for m in model if isinstance(m, nn.Linear)]
    flow = torch.ones(32)
    for w in weights:  # the naive pass of the paper: f(1; theta, 0)
        flow = theta(w) @ flow
    naive = -torch.log(flow.sum())
    assert flow.sum().item() == 0.0 and naive.item() == math.inf

    reg = ConnectRegularizer(model, torch.randn(1, 32))
    r = reg()
    assert torch.isfinite(r)
    grads = torch.autograd.grad(r, weights)
    assert all(torch.isfinite(g).all() for g in grads)
    # float32 agrees with a float64 run of the same rescaled computation
    r64 = -mlp_log_connectivity([w.detach().double() for w in weights])
    assert math.isclose(r.item(), r64.item(), rel_tol=1e-4)


def test_finite_for_resnet110_where_phi_underflows():
    torch.manual_seed(7)
    model = resnet110()
    reg = ConnectRegularizer(model, torch.randn(1, 3, 32, 32))
    r = reg()
    assert torch.isfinite(r)
    # phi_tot = exp(-R) is below the smallest float32, so the naive forward pass would give 0
    assert torch.exp(-r).item() == 0.0
    r.backward()
    assert all(torch.isfinite(p.grad).all() for p in reg.parameters_regularized())


def test_disconnected_network_gives_inf_not_nan():
    model = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 1))
    with torch.no_grad():
        model[0].weight[1].zero_()
        model[2].weight[0, 0] = 0.0
    reg = ConnectRegularizer(model, torch.randn(1, 3))
    assert reg().item() == math.inf
    with pytest.warns(UserWarning, match="disconnected"):
        assert reg.add_grad_(0.1) == math.inf


class Gate(nn.Module):
    def forward(self, x):
        return x * 2.0 + 1.0


def test_unsupported_module_raises_clear_error_and_handlers_fix_it():
    model = nn.Sequential(nn.Linear(3, 3), nn.Softmax(dim=-1), nn.Linear(3, 1))
    with pytest.raises(UnsupportedModuleError, match=r"'1' of type Softmax.*handlers="):
        ConnectRegularizer(model, torch.randn(1, 3))
    reg = ConnectRegularizer(model, torch.randn(1, 3), handlers={nn.Softmax: lambda m, x: x})
    assert torch.isfinite(reg())


def test_untraceable_model_raises_clear_error():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(3, 1)

        def forward(self, x):
            return self.l(x) if x.sum() > 0 else -self.l(x)

    with pytest.raises(UnsupportedModuleError, match="cannot be traced by torch.fx"):
        ConnectRegularizer(Branchy(), torch.randn(1, 3))


def test_constant_scaling_is_a_fixed_edge_weight_and_bias_ignored():
    model = nn.Sequential(nn.Linear(3, 2), Gate(), nn.Linear(2, 1)).double()
    # Gate is traced through: x * 2 scales every path by 2, "+ 1" is a bias
    plain = nn.Sequential(model[0], model[2])
    r_gate = ConnectRegularizer(model, torch.randn(1, 3, dtype=torch.float64))()
    r_plain = ConnectRegularizer(plain, torch.randn(1, 3, dtype=torch.float64))()
    assert math.isclose(r_gate.item(), r_plain.item() - math.log(2.0), rel_tol=1e-12)


def small_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, 10),
    )


def test_add_channel_scalers_places_after_bn_and_skips_classifier():
    model = small_cnn()
    scalers = add_channel_scalers(model)
    assert set(scalers) == {"1", "4", "8"}  # after both BNs and after the hidden linear layer
    assert isinstance(model[1][1], ChannelScaler) and isinstance(model[8][1], ChannelScaler)
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 10)
    with pytest.raises(ValueError, match="twice"):
        add_channel_scalers(model)


def test_channel_importance_is_flow_in_times_theta_times_flow_out():
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    add_channel_scalers(model)
    with torch.no_grad():
        model[0][1].scale.copy_(torch.tensor([0.5, -2.0, 0.0, 1.0]))
    imp = channel_connectivity_importance(model, torch.randn(1, 3, dtype=torch.float64))[model[0][1]]
    t1, t2 = theta(model[0][0].weight.detach()), theta(model[2].weight.detach())
    td = theta(model[0][1].scale.detach())
    flow_in, flow_out = t1.sum(1), t2.sum(0)
    phi = brute_force_paths(t1, torch.diag(td), t2)
    torch.testing.assert_close(imp, flow_in * td * flow_out / phi)
    assert imp[2] == 0 and math.isclose(imp.sum().item(), 1.0, rel_tol=1e-12)


def test_channel_importance_of_each_scaler_sums_to_one_in_a_chain():
    torch.manual_seed(9)
    model = small_cnn()
    add_channel_scalers(model)
    imp = channel_connectivity_importance(model, torch.randn(1, 3, 8, 8))
    assert len(imp) == 3
    for v in imp.values():
        assert math.isclose(v.sum().item(), 1.0, rel_tol=1e-4)


def test_regularize_adds_lambda_times_gradient():
    torch.manual_seed(10)
    model = small_cnn()
    add_channel_scalers(model)
    x = torch.randn(1, 3, 8, 8)
    pruner = ConnectPruner(model, x, reg=0.25, pruning_ratio=0.5, ignored_layers=[model[10]])
    params = pruner.regularizer.parameters_regularized()
    assert any(p is model[1][1].scale for p in params)
    expected = torch.autograd.grad(ConnectRegularizer(model, x)(), params)
    for p in params:
        p.grad = torch.ones_like(p)
    pruner.update_regularizer()
    r = pruner.regularize(model)
    assert math.isfinite(r)
    for p, g in zip(params, expected):
        torch.testing.assert_close(p.grad, 1.0 + 0.25 * g)
    with pytest.raises(ValueError, match="different model"):
        pruner.regularize(small_cnn())


def test_connect_regularization_alone_pushes_channels_to_zero():
    torch.manual_seed(11)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))
    add_channel_scalers(model)
    x = torch.randn(1, 4)
    pruner = ConnectPruner(model, x, reg=1.0, pruning_ratio=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    r0 = pruner.regularizer().item()
    for _ in range(300):
        opt.zero_grad()
        pruner.regularize(model)
        opt.step()
    r1 = pruner.regularizer().item()
    assert r1 < r0 - 1.0
    # the factors concentrate: the largest channel holds most of the normalized mass
    d = theta(model[2][1].scale.detach())
    assert d.max() > 0.5 > 1.0 / 8


def test_pruner_step_makes_a_smaller_model_that_runs():
    torch.manual_seed(12)
    model = small_cnn()
    add_channel_scalers(model)
    x = torch.randn(1, 3, 8, 8)
    n_before = sum(p.numel() for p in model.parameters())
    with torch.no_grad():  # make channels 0..3 of the first conv clearly unimportant
        model[1][1].scale[:4] = 1e-4
    pruner = ConnectPruner(model, x, pruning_ratio=0.5, ignored_layers=[model[10]])
    pruner.step()
    assert model[0].out_channels == 4 and model[1][1].num_channels == 4
    assert model[3].out_channels == 8 and model[8][0].out_features == 16
    assert sum(p.numel() for p in model.parameters()) < 0.4 * n_before
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 10)
    # the kept channels are the ones with the large factors
    torch.testing.assert_close(model[1][1].scale, torch.ones(4))
    assert torch.isfinite(ConnectRegularizer(model, x)())


def test_resnet_channel_pruning_keeps_residual_shapes():
    torch.manual_seed(13)
    model = resnet20()
    add_channel_scalers(model)
    assert len(channel_scalers(model)) == 21
    x = torch.randn(1, 3, 32, 32)
    n_before = sum(p.numel() for p in model.parameters())
    prune_channels(model, x, pruning_ratio=0.5, ignored_layers=[model.fc])
    assert sum(p.numel() for p in model.parameters()) < 0.5 * n_before
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_pruner_without_scalers_explains_the_fix():
    with pytest.raises(ValueError, match="add_channel_scalers"):
        ConnectPruner(small_cnn(), torch.randn(1, 3, 8, 8))


def test_bad_inputs():
    with pytest.raises(ValueError, match="floating-point"):
        ConnectRegularizer(nn.Sequential(nn.Linear(3, 1)), torch.ones(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="skip_connections"):
        ConnectivityGraph(nn.Sequential(nn.Linear(3, 1)), torch.ones(1, 3), skip_connections="maybe")
    with pytest.raises(ValueError, match="does not chain"):
        mlp_log_connectivity([torch.randn(4, 3), torch.randn(2, 5)])
    with pytest.raises(ValueError, match="reg"):
        m = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 1))
        add_channel_scalers(m)
        ConnectPruner(m, torch.randn(1, 3), reg=-1.0)
