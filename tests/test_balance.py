"""ConnectImportance's scale-free balance (kappa), BatchNorm treatments, freshness and arguments."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_pruning as tp

from connect_tp import ConnectImportance
from connect_tp.connectivity import log_connectivity
from connect_tp.models import resnet20


def trained_like_resnet(seed=0):
    """A ResNet-20 whose BatchNorm statistics are non-trivial (a few train-mode forwards)."""
    torch.manual_seed(seed)
    model = resnet20(num_classes=10)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 3, 32, 32))
    return model.eval()


def loss_backward(model, scale=1.0, times=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)
    model.zero_grad()
    for _ in range(times):
        (scale * F.cross_entropy(model(x), y)).backward()


def all_scores(model, imp):
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(1, 3, 32, 32))
    out = []
    for group in graph.get_all_groups(root_module_types=[nn.Conv2d, nn.Linear]):
        score = imp(group)
        if score is not None:
            out.append(score)
    return out


def bottom_sets(scores, frac=0.25):
    return [set(torch.argsort(s)[: max(1, int(frac * len(s)))].tolist()) for s in scores]


@pytest.mark.parametrize("kappa", [0.3, 3.0])
@pytest.mark.parametrize("scale,times", [(10.0, 1), (1.0, 2)])
def test_balance_is_invariant_to_loss_scale_and_accumulation(kappa, scale, times):
    model = trained_like_resnet()
    loss_backward(model)
    ref_imp = ConnectImportance(balance=kappa, example_inputs=torch.rand(1, 3, 32, 32))
    ref = all_scores(model, ref_imp)
    loss_backward(model, scale=scale, times=times)
    imp = ConnectImportance(balance=kappa, example_inputs=torch.rand(1, 3, 32, 32))
    got = all_scores(model, imp)
    assert imp.lam == pytest.approx(ref_imp.lam * scale * times, rel=1e-4)
    for a, b in zip(ref, got):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)  # "mean" normalizer: same scores
    assert bottom_sets(ref) == bottom_sets(got)


def test_absolute_lambda_is_not_invariant_to_loss_scale():
    # The reason balance exists: the same lam means a different blend when the loss is scaled.
    model = trained_like_resnet()
    loss_backward(model)
    ref = all_scores(model, ConnectImportance(lam=1.0, example_inputs=torch.rand(1, 3, 32, 32)))
    loss_backward(model, scale=100.0)
    got = all_scores(model, ConnectImportance(lam=1.0, example_inputs=torch.rand(1, 3, 32, 32)))
    assert any(not torch.allclose(a, b, rtol=1e-3) for a, b in zip(ref, got))


def test_balance_sets_equal_taylor_masses_at_kappa_one():
    model = trained_like_resnet()
    loss_backward(model)
    imp = ConnectImportance(balance=1.0, example_inputs=torch.rand(1, 3, 32, 32))
    all_scores(model, imp)
    loss_mass = conn_mass = 0.0
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            loss_mass += float((m.weight.detach() * m.weight.grad).abs().sum())
            conn_mass += float((m.weight * imp._connectivity_grads[id(m.weight)]).abs().sum())
    assert imp.lam * conn_mass == pytest.approx(loss_mass, rel=1e-5)


def test_lambda_is_frozen_after_the_first_step():
    model = trained_like_resnet()
    loss_backward(model)
    imp = ConnectImportance(balance=1.0, example_inputs=torch.rand(1, 3, 32, 32))
    all_scores(model, imp)
    first = imp.lam
    loss_backward(model, scale=5.0)
    all_scores(model, imp)
    assert imp.lam == first
    imp.reset()
    all_scores(model, imp)
    assert imp.lam == pytest.approx(5.0 * first, rel=1e-4)


def test_balance_zero_equals_group_taylor_exactly():
    model = trained_like_resnet()
    loss_backward(model)
    taylor = all_scores(model, tp.importance.GroupTaylorImportance())
    connect = all_scores(model, ConnectImportance(balance=0.0))
    assert len(taylor) == len(connect) > 5
    for a, b in zip(taylor, connect):
        assert torch.equal(a, b)


def test_balance_inf_equals_the_data_free_mode_and_ignores_grad():
    model = trained_like_resnet()
    with pytest.warns(UserWarning, match="data-free"):
        data_free = all_scores(model, ConnectImportance(lam=7.0, example_inputs=torch.rand(1, 3, 32, 32)))
    loss_backward(model)  # balance=inf must not look at these
    endpoint = all_scores(model, ConnectImportance(balance=math.inf, example_inputs=torch.rand(1, 3, 32, 32)))
    for a, b in zip(data_free, endpoint):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=0)


def test_balance_moves_the_ranking_between_the_endpoints():
    model = trained_like_resnet()
    loss_backward(model)
    ex = torch.rand(1, 3, 32, 32)
    taylor = all_scores(model, ConnectImportance(balance=0.0))
    conn = all_scores(model, ConnectImportance(balance=math.inf, example_inputs=ex))

    def corr(a, b):
        ra, rb = a.argsort().argsort().float(), b.argsort().argsort().float()
        return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])

    small = all_scores(model, ConnectImportance(balance=0.01, example_inputs=ex))
    large = all_scores(model, ConnectImportance(balance=100.0, example_inputs=ex))
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    assert mean([corr(a, b) for a, b in zip(small, taylor)]) > 0.95
    assert mean([corr(a, b) for a, b in zip(large, conn)]) > 0.95
    assert mean([corr(a, b) for a, b in zip(small, conn)]) < 0.9


@pytest.mark.parametrize("kwargs,match", [
    ({"lam": 1.0, "balance": 1.0}, "not both"),
    ({"balance": -0.5}, "balance"),
    ({"balance": float("nan")}, "balance"),
    ({"balance": "1"}, "balance"),
    ({"lam": 1e300}, "lam"),
    ({"lam": float("inf")}, "lam"),
    ({"lam": 10 ** 400}, "lam"),  # an int beyond float's range: ValueError, not OverflowError
    ({"balance": 10 ** 400}, "balance"),
    ({"balance": -10 ** 400}, "balance"),
    ({"seed": -1}, "seed"),
    ({"seed": 1.5}, "seed"),
    ({"normalizer": "sentinel_x"}, "sentinel"),
    ({"normalizer": "sentinel_1.5"}, "sentinel"),
    ({"bn_flow": "none"}, "bn_flow"),
])
def test_bad_arguments_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ConnectImportance(**kwargs)


def test_finite_balance_without_gradients_names_the_fix():
    model = trained_like_resnet()
    imp = ConnectImportance(balance=1.0, example_inputs=torch.rand(1, 3, 32, 32))
    with pytest.raises(RuntimeError, match="loss.backward"):
        all_scores(model, imp)


def test_zero_loss_mass_is_an_error():
    model = trained_like_resnet()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    imp = ConnectImportance(balance=1.0, example_inputs=torch.rand(1, 3, 32, 32))
    with pytest.raises(RuntimeError, match="loss Taylor mass"):
        all_scores(model, imp)


# ---------------------------------------------------------------------------------- BatchNorm
def score_of_channel(model, bn_flow, channel=3):
    imp = ConnectImportance(balance=math.inf, bn_flow=bn_flow, example_inputs=torch.rand(1, 3, 32, 32),
                            normalizer=None)
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(1, 3, 32, 32))
    conv = model.layer1[0].conv1
    group = graph.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=list(range(conv.out_channels)))
    return imp(group)[channel].item()


def test_tiny_running_variance_inflates_only_the_stats_flow():
    model = trained_like_resnet()
    before = {flow: score_of_channel(model, flow) for flow in ("stats", "gamma", "identity")}
    model.layer1[0].bn1.running_var[3] = 1e-6
    after = {flow: score_of_channel(model, flow) for flow in ("stats", "gamma", "identity")}
    assert after["stats"] > 10 * before["stats"]
    assert after["gamma"] == pytest.approx(before["gamma"], rel=1e-5)
    assert after["identity"] == pytest.approx(before["identity"], rel=1e-5)


def test_bn_flows_compute_what_they_say():
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(3)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([2.0, -3.0, 0.5]))
        bn.bias.copy_(torch.tensor([1.0, 1.0, -1.0]))
        bn.running_mean.copy_(torch.tensor([0.1, 0.2, 0.3]))
        bn.running_var.copy_(torch.tensor([4.0, 1.0, 0.25]))
    model = nn.Sequential(nn.Linear(2, 3, bias=False), bn).eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
    x = torch.rand(1, 2)
    # Compare with a manual pass on the same uniform inputs (seed 0, 4 samples).
    u = torch.rand((4, 2), generator=torch.Generator().manual_seed(0)).double()
    h = u @ model[0].weight.double().abs().t()
    gamma = bn.weight.double().abs()
    expected = {
        "stats": (gamma * (h - bn.running_mean.double()) / torch.sqrt(bn.running_var.double() + bn.eps)
                  + bn.bias.double().abs()),
        "gamma": gamma * h,
        "identity": h,
    }
    for flow, out in expected.items():
        got = log_connectivity(model, x, n_samples=4, seed=0, bn_flow=flow)
        assert got.item() == pytest.approx(math.log(out.sum(1).mean().item()), rel=1e-6), flow


# ---------------------------------------------------------------------------------- freshness
def test_data_free_does_not_stick_once_gradients_appear():
    model = trained_like_resnet()
    imp = ConnectImportance(lam=1.0, example_inputs=torch.rand(1, 3, 32, 32))
    with pytest.warns(UserWarning, match="data-free"):
        free = all_scores(model, imp)
    assert imp.data_free
    loss_backward(model)
    with_loss = all_scores(model, imp)
    assert not imp.data_free
    assert any(not torch.allclose(a, b) for a, b in zip(free, with_loss))


def test_edits_through_data_and_bn_reestimation_refresh_the_connectivity():
    model = trained_like_resnet()
    loss_backward(model)
    imp = ConnectImportance(lam=1.0, bn_flow="stats", example_inputs=torch.rand(1, 3, 32, 32))  # statistics enter phi
    all_scores(model, imp)
    assert imp.connectivity_evaluations == 1
    all_scores(model, imp)  # nothing changed: cached
    assert imp.connectivity_evaluations == 1
    before = imp.last_log_connectivity
    model.conv1.weight.data.mul_(10)
    all_scores(model, imp)
    assert imp.connectivity_evaluations == 2
    assert imp.last_log_connectivity == pytest.approx(
        log_connectivity(model, torch.rand(1, 3, 32, 32)).item(), rel=1e-6)
    assert imp.last_log_connectivity != pytest.approx(before)
    model.train()
    with torch.no_grad():
        model(torch.randn(8, 3, 32, 32) * 3)  # running statistics change, no parameter does
    model.eval()
    all_scores(model, imp)
    assert imp.connectivity_evaluations == 3


def test_connectivity_is_measured_once_per_pruner_step():
    model = trained_like_resnet()
    example = torch.rand(1, 3, 32, 32)
    imp = ConnectImportance(balance=1.0)
    pruner = tp.pruner.MetaPruner(model, example, importance=imp, global_pruning=True, pruning_ratio=0.5,
                                  iterative_steps=3, ignored_layers=[model.fc])
    for step in range(3):
        loss_backward(model)
        pruner.step()
        model.zero_grad(set_to_none=True)
        assert imp.connectivity_evaluations == step + 1


def test_inputs_follow_the_model_dtype():
    model = trained_like_resnet()
    example = torch.rand(1, 3, 32, 32)
    imp = ConnectImportance(balance=1.0)
    pruner = tp.pruner.MetaPruner(model, example, importance=imp, global_pruning=True, pruning_ratio=0.5,
                                  iterative_steps=2, ignored_layers=[model.fc])
    loss_backward(model)
    pruner.step()
    model.double()
    model.zero_grad()
    g = torch.Generator().manual_seed(1)
    F.cross_entropy(model(torch.randn(4, 3, 32, 32, generator=g).double()), torch.tensor([0, 1, 2, 3])).backward()
    pruner.step()  # used to fail: "Input type (float) and bias type (double)"


def test_nan_weights_are_reported_as_nan():
    model = trained_like_resnet()
    loss_backward(model)
    model.conv1.weight.data[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        all_scores(model, ConnectImportance(balance=1.0, example_inputs=torch.rand(1, 3, 32, 32)))


# ---------------------------------------------------------------------------------- bounds and reuse
def test_a_huge_balance_is_clamped_to_max_lambda_with_a_warning():
    from connect_tp.importance import MAX_LAMBDA

    model = trained_like_resnet()
    loss_backward(model)
    imp = ConnectImportance(balance=1e300, example_inputs=torch.rand(1, 3, 32, 32))
    with pytest.warns(UserWarning, match="clamped to 1e\\+12"):
        scores = all_scores(model, imp)
    assert imp.lam == MAX_LAMBDA  # 1e300 resolved to lambda = 1.5e301 and NaN scores before
    assert all(torch.isfinite(s).all() for s in scores)
    # at the bound the ranking is the connectivity term's
    alone = all_scores(model, ConnectImportance(balance=math.inf, example_inputs=torch.rand(1, 3, 32, 32)))
    for got, want in zip(scores, alone):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-5)


def test_a_reused_importance_resolves_lambda_for_each_model():
    first, second = trained_like_resnet(0), trained_like_resnet(1)
    loss_backward(first, scale=10.0)
    loss_backward(second)
    imp = ConnectImportance(balance=1.0, example_inputs=torch.rand(1, 3, 32, 32))
    all_scores(first, imp)
    lam_first = imp.lam
    all_scores(second, imp)
    fresh = ConnectImportance(balance=1.0, example_inputs=torch.rand(1, 3, 32, 32))
    all_scores(second, fresh)
    assert imp.lam == pytest.approx(fresh.lam, rel=1e-9)
    assert imp.lam != pytest.approx(lam_first, rel=0.1)  # the first model's lambda was kept before


# ---------------------------------------------------------------------------------- normalized outputs
class UntraceableSoftmax(nn.Module):
    """A softmax output behind control flow ``torch.fx`` cannot trace: the general pass measures it."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 6)
        self.head = nn.Linear(6, 5)

    def forward(self, x):
        h = F.relu(self.body(x))
        if bool(h.sum() >= 0):  # data-dependent: fx fails here
            h = h + 0.0
        return torch.softmax(self.head(h), -1)


def softmax_group():
    torch.manual_seed(0)
    model = UntraceableSoftmax()
    F.nll_loss(torch.log(model(torch.rand(8, 4))), torch.randint(0, 5, (8,))).backward()
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=torch.rand(1, 4))
    return model, graph.get_pruning_group(model.body, tp.prune_linear_out_channels, idxs=list(range(6)))


@pytest.mark.parametrize("kwargs", [{"balance": 1.0}, {"balance": 100.0}, {"lam": 5.0}])
def test_a_normalized_output_drops_the_connectivity_term_and_says_so(kwargs):
    model, group = softmax_group()
    imp = ConnectImportance(example_inputs=torch.rand(1, 4), **kwargs)
    with pytest.warns(UserWarning, match="softmax.*rounding noise.*Taylor's"):
        scores = imp(group)
    assert imp.engine_path == "general-float32"
    taylor = tp.importance.GroupTaylorImportance()(group)
    # a connectivity mass of ~1e-8 resolved a balance to lambda ~ 1e4 on rounding noise before
    torch.testing.assert_close(scores, taylor, rtol=1e-6, atol=0)
    if "balance" in kwargs:
        assert imp.lam == 0.0


def test_a_normalized_output_cannot_be_scored_data_free():
    model, group = softmax_group()
    imp = ConnectImportance(balance=math.inf, example_inputs=torch.rand(1, 4))
    with pytest.raises(RuntimeError, match="does not depend on the weights"):
        imp(group)


# ---------------------------------------------------------------------------------- balance schedule
@pytest.mark.parametrize("kwargs,match", [
    ({"balance_schedule": "sometimes"}, "balance_schedule"),
    ({"balance_schedule": "every_step", "lam": 3.0}, "lam=3.0 fixes lambda"),
    ({"balance_schedule": "every_step", "balance": 0.0}, "balance=0.0 fixes lambda"),
    ({"balance_schedule": "every_step", "balance": math.inf}, "balance=inf fixes lambda"),
])
def test_a_balance_schedule_without_a_balance_to_rederive_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ConnectImportance(**kwargs)


@pytest.mark.parametrize("schedule", ["frozen", "every_step"])
def test_every_step_rederives_lambda_frozen_keeps_it(schedule):
    model = trained_like_resnet()
    example = torch.rand(1, 3, 32, 32)
    imp = ConnectImportance(balance=2.0, example_inputs=example, balance_schedule=schedule)
    pruner = tp.pruner.MetaPruner(model, example, importance=imp, global_pruning=True, pruning_ratio=0.5,
                                  iterative_steps=4, ignored_layers=[model.fc])
    lams = []
    for step, scale in enumerate([1.0, 10.0]):
        loss_backward(model, scale=scale)
        masses = ConnectImportance(balance=2.0, example_inputs=example).taylor_masses(model)  # before pruning
        pruner.step()
        lams.append(imp.lam)
        if schedule == "every_step" or step == 0:  # the lambda of the model as this step scored it
            expected = ConnectImportance(balance=2.0).lambda_from_masses(*masses)
            assert imp.lam == pytest.approx(expected, rel=1e-9), step
    if schedule == "frozen":
        assert lams[1] == lams[0]
    else:  # the loss scaled by 10 (and a pruned model): a new lambda, about 10 times the first
        assert 5 < lams[1] / lams[0] < 20
