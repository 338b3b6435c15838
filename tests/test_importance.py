"""ConnectImportance: Taylor equivalence, connectivity effect, Torch-Pruning integration, errors."""
import math
import operator
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_pruning as tp

from connect_tp import ConnectImportance, engine
from connect_tp.models import resnet20


class GroupedNet(nn.Module):
    """Small CNN with a grouped and a depthwise convolution, BN, and a linear head."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.conv3 = nn.Conv2d(8, 12, 1)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.dw(self.conv2(x)))
        return self.fc(self.conv3(x).mean((2, 3)))


def backward_on_random_batch(model, shape, classes, seed=0):
    torch.manual_seed(seed)
    model.zero_grad()
    F.cross_entropy(model(torch.randn(*shape)), torch.randint(0, classes, (shape[0],))).backward()


@pytest.mark.parametrize("make_model,shape,classes", [
    (lambda: resnet20(num_classes=10), (4, 3, 32, 32), 10),
    (GroupedNet, (4, 3, 16, 16), 5),
])
@pytest.mark.parametrize("reduction,normalizer,bias", [("mean", "mean", False), ("sum", None, True), ("max", "max", False)])
def test_lam_zero_equals_group_taylor(make_model, shape, classes, reduction, normalizer, bias):
    torch.manual_seed(1)
    model = make_model()
    backward_on_random_batch(model, shape, classes)
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(1, *shape[1:]))
    taylor = tp.importance.GroupTaylorImportance(group_reduction=reduction, normalizer=normalizer, bias=bias)
    connect = ConnectImportance(lam=0.0, group_reduction=reduction, normalizer=normalizer, bias=bias,
                                example_inputs=torch.randn(1, *shape[1:]))
    groups = list(graph.get_all_groups())
    assert len(groups) > 3
    for group in groups:
        expected, got = taylor(group), connect(group)
        assert (expected is None) == (got is None)
        if expected is not None:
            torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)


def test_connectivity_term_is_never_written_to_grad():
    model = resnet20(num_classes=10)
    backward_on_random_batch(model, (4, 3, 32, 32), 10)
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(1, 3, 32, 32))
    imp = ConnectImportance(lam=1.0, example_inputs=torch.randn(1, 3, 32, 32))
    for group in graph.get_all_groups():
        imp(group)
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, before[n]), n


def dead_path_network():
    """Hidden channel 0 carries the network's only input-output path but is dead on the data.

    Channels 1 and 2 have no input weights (their constant output comes from their bias) yet a
    large loss gradient, so Taylor ranks them above channel 0, whose ReLU never fires on the
    negative calibration inputs: its Taylor score is exactly 0.
    """
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[3.0, 3.0], [0.0, 0.0], [0.0, 0.0]]))
        model[0].bias.copy_(torch.tensor([0.0, 0.5, 0.4]))
        model[2].weight.copy_(torch.tensor([[2.0, 0.3, 0.2]]))
        model[2].bias.zero_()
    return model


def pruned_hidden_rows(importance):
    model = dead_path_network()
    x = -torch.rand(32, 2) - 1.0  # channel 0's pre-activation is negative on every sample
    pruner = tp.pruner.MetaPruner(model, torch.rand(1, 2), importance=importance,
                                  pruning_ratio=1 / 3, ignored_layers=[model[2]])
    model.zero_grad()
    F.mse_loss(model(x), torch.full((32, 1), 3.0)).backward()
    pruner.step()
    assert model[0].out_features == 2
    return model[0].weight.detach()


def test_connect_keeps_the_only_path_that_taylor_prunes():
    taylor_rows = pruned_hidden_rows(tp.importance.GroupTaylorImportance())
    connect_rows = pruned_hidden_rows(ConnectImportance(lam=1.0))
    # Taylor removed the path channel: no remaining hidden unit sees the input any more.
    assert taylor_rows.abs().sum() == 0
    # CoNNect kept it.
    assert torch.equal(connect_rows[0], torch.tensor([3.0, 3.0]))


def prune_to_speed_up(model, example, importance, target, steps=20, classes=10, **kwargs):
    base_macs, _ = tp.utils.count_ops_and_params(model, example)
    pruner = tp.pruner.MetaPruner(model, example, importance=importance, iterative_steps=steps, **kwargs)
    speed_up = 1.0
    for _ in range(steps):
        backward_on_random_batch(model, (8,) + tuple(example.shape[1:]), classes)
        pruner.step()
        macs, _ = tp.utils.count_ops_and_params(model, example)
        speed_up = base_macs / macs
        if speed_up >= target:
            break
    return speed_up


def global_forward_hooks():
    import gc

    from torch.nn.modules import module

    gc.collect()  # importances of earlier tests caught in reference cycles remove their hooks now
    return len(module._global_forward_pre_hooks) + len(module._global_forward_hooks)


def test_readme_loop_without_arguments():
    # Torch-Pruning's README loop: the importance is built first and never given the input.
    model = resnet20(num_classes=10)
    example = torch.randn(1, 3, 32, 32)
    hooks_before = global_forward_hooks()
    imp = ConnectImportance()
    assert global_forward_hooks() == hooks_before + 2  # watching for the model's input shape
    pruner = tp.pruner.MetaPruner(model, example, importance=imp, pruning_ratio=0.5,
                                  iterative_steps=2, ignored_layers=[model.fc])
    for _ in range(2):
        if isinstance(imp, tp.importance.GroupTaylorImportance):
            model(example).sum().backward()
        pruner.step()
    assert model.conv1.out_channels == 8
    assert model(example).shape == (1, 10)
    assert imp.last_log_connectivity is not None
    assert global_forward_hooks() == hooks_before  # stopped watching after the first step


def test_taylor_mode_installs_no_hooks():
    hooks_before = global_forward_hooks()
    imp = ConnectImportance(lam=0.0)
    assert global_forward_hooks() == hooks_before
    del imp


def test_connectivity_is_measured_once_per_step(monkeypatch):
    calls = []
    real = engine.run_traced  # both measurement routes run the engine's pass
    monkeypatch.setattr(engine, "run_traced", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = resnet20(num_classes=10)
    example = torch.randn(1, 3, 32, 32)
    pruner = tp.pruner.MetaPruner(model, example, importance=ConnectImportance(lam=1e-3, example_inputs=example),
                                  pruning_ratio=0.5, iterative_steps=3, ignored_layers=[model.fc])
    for step in range(3):
        backward_on_random_batch(model, (4, 3, 32, 32), 10)
        pruner.step()
        assert len(calls) == step + 1


def test_data_free_mode_warns_once_and_prunes():
    model = resnet20(num_classes=10)
    example = torch.randn(1, 3, 32, 32)
    imp = ConnectImportance(lam=1.0, example_inputs=example)
    pruner = tp.pruner.MetaPruner(model, example, importance=imp, pruning_ratio=0.5,
                                  iterative_steps=2, ignored_layers=[model.fc])
    with pytest.warns(UserWarning, match="data-free"):
        pruner.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pruner.step()
    assert model.conv1.out_channels == 8


def test_lam_zero_without_gradients_is_an_error():
    model = resnet20(num_classes=10)
    example = torch.randn(1, 3, 32, 32)
    pruner = tp.pruner.MetaPruner(model, example, importance=ConnectImportance(lam=0.0),
                                  pruning_ratio=0.5, ignored_layers=[model.fc])
    with pytest.raises(RuntimeError, match="loss.backward"):
        pruner.step()


def test_input_is_found_in_the_dependency_graph():
    # Torch-Pruning's tests/test_importance_reduction.py: the importance is built after the model's
    # last forward pass and scores a group from DG.get_pruning_group; the DG's trace shows the input.
    model = resnet20(num_classes=10)
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(1, 3, 24, 24))
    backward_on_random_batch(model, (2, 3, 32, 32), 10)
    imp = ConnectImportance(lam=1.0, normalizer=None)  # built after every forward pass
    group = graph.get_pruning_group(model.conv1, tp.prune_conv_out_channels, idxs=list(range(16)))
    got = imp(group)
    assert imp.example_inputs.shape == (1, 3, 24, 24)  # the traced input's shape, not the last batch's
    expected = ConnectImportance(lam=1.0, normalizer=None, example_inputs=torch.zeros(1, 3, 24, 24))(group)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(3, 4), nn.Linear(5, 4), nn.Linear(4, 2)

    def forward(self, x, y):
        return self.head(self.a(x) + self.b(y))


def test_unknown_input_shape_is_an_error():
    model = TwoInputs()
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=(torch.randn(1, 3), torch.randn(1, 5)))
    model(torch.randn(2, 3), torch.randn(2, 5)).sum().backward()
    imp = ConnectImportance()  # built after every forward pass; the graph shows two inputs
    group = graph.get_pruning_group(model.a, tp.prune_linear_out_channels, idxs=[0, 1, 2, 3])
    with pytest.raises(ValueError, match="example_inputs="):
        imp(group)


@pytest.mark.parametrize("kwargs,match", [
    ({"lam": -1.0}, "lam"),
    ({"lam": float("nan")}, "lam"),
    ({"lam": float("inf")}, "lam"),
    ({"lam": "big"}, "lam"),
    ({"n_samples": 0}, "n_samples"),
    ({"n_samples": 2.5}, "n_samples"),
    ({"group_reduction": "median"}, "group_reduction"),
    ({"normalizer": "l2"}, "normalizer"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ConnectImportance(**kwargs)


def test_batchnorm_option_scores_bn_affine():
    model = GroupedNet()  # conv1's group holds exactly one BatchNorm, bn1
    backward_on_random_batch(model, (4, 3, 16, 16), 5)
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(1, 3, 16, 16))
    group = graph.get_pruning_group(model.conv1, tp.prune_conv_out_channels, idxs=list(range(8)))
    off = ConnectImportance(lam=0.0, normalizer=None, group_reduction="sum")(group)
    on = ConnectImportance(lam=0.0, normalizer=None, group_reduction="sum", batchnorm=True)(group)
    bn = model.bn1
    expected_extra = (bn.weight * bn.weight.grad).abs()
    assert torch.all(on > off)
    torch.testing.assert_close(on - off, expected_extra.detach(), rtol=1e-4, atol=1e-7)


# ------------------------------------------------------------------ the trace cache
class LayerNorm2dNet(nn.Module):
    """ConvNeXt's pattern: torchvision's LayerNorm2d reads ``normalized_shape`` in its forward."""

    def __init__(self):
        super().__init__()
        from torchvision.models.convnext import LayerNorm2d

        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = LayerNorm2d(8)
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1)
        self.fc = nn.Linear(6, 4)
        nn.init.constant_(self.norm.bias, 1.0)  # a positive flow after the centring

    def forward(self, x):
        return self.fc(F.relu(self.conv2(F.relu(self.norm(self.conv1(x))))).mean((2, 3)))


def test_pruning_a_module_that_reads_its_attributes_retraces():
    torch.manual_seed(0)
    model = LayerNorm2dNet()
    example = torch.rand(1, 3, 8, 8)
    imp = ConnectImportance(balance=float("inf"))
    pruner = tp.pruner.MetaPruner(model, example, importance=imp, global_pruning=True, pruning_ratio=0.5,
                                  iterative_steps=3, ignored_layers=[model.fc])
    widths = []
    for _ in range(3):  # the second step failed on a trace that kept normalized_shape = (8,)
        pruner.step()
        widths.append(model.conv1.out_channels)
        assert model.norm.normalized_shape == (model.conv1.out_channels,)
    assert widths[-1] < 8 and imp.connectivity_evaluations == 3
    assert math.isfinite(imp.last_log_connectivity)


class Heads(nn.Module):
    """A traced (not ``torch.nn``) module whose graph bakes in an attribute and a buffer's size."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.bn = nn.BatchNorm1d(8)
        self.heads = 2
        self.register_buffer("keep", torch.ones(6))

    def forward(self, x):
        x = self.bn(self.fc(x))[:, : self.keep.shape[0]]
        return x.reshape(x.shape[0], self.heads, -1).sum(1)


def test_trace_is_keyed_by_what_it_bakes_in():
    def constants(graph):  # (heads, kept width): reshape(x, batch, heads, -1) and the slice's stop
        reshape = next(n for n in graph.nodes if n.target == "reshape")
        getitem = next(n for n in graph.nodes if n.target is operator.getitem and isinstance(n.args[1], tuple))
        return reshape.args[2], getitem.args[1][1].stop

    model = Heads()
    first = engine.traced_graph(model)
    assert engine.traced_graph(model) is first  # cached
    assert constants(first) == (2, 6)
    model.heads = 3  # an attribute the forward reads, no parameter changed
    assert constants(engine.traced_graph(model)) == (3, 6)
    model.heads = 2
    assert engine.traced_graph(model) is first  # the last two traces are kept
    model.keep = torch.ones(4)  # a buffer's shape
    assert constants(engine.traced_graph(model)) == (2, 4)
    model.keep = torch.ones(6)
    assert engine.traced_graph(model) is first
    # what the pass reads afresh keeps the trace: parameter shapes (get_attr nodes), leaf modules' state
    model.fc = nn.Linear(8, 8)
    model.fc.weight = nn.Parameter(torch.zeros(4, 8))
    model.bn.running_mean = torch.zeros(3)
    model.bn.eps = 0.5
    assert engine.traced_graph(model) is first


# ------------------------------------------------------------------ the recorded input
class Attention(nn.Module):
    """Single-head self-attention over ``(..., tokens, 8)``: it also accepts one unbatched sample."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(8, 24)
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, -1)
        return self.proj(torch.softmax(q @ k.transpose(-1, -2), -1) @ v)


@pytest.mark.parametrize("make_model,example,layer", [
    (lambda: nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 2)), torch.rand(1, 8), 0),
    (Attention, torch.rand(1, 6, 8), "qkv"),
])
def test_recorder_keeps_the_example_not_the_pruners_unbatched_trial_call(make_model, example, layer):
    # Torch-Pruning first calls model(*example_inputs), which unbinds a tensor along its batch
    # dimension; these models accept the unbatched sample, so that call succeeds.
    from connect_tp import log_connectivity

    torch.manual_seed(0)
    model = make_model()
    imp = ConnectImportance(balance=float("inf"), normalizer=None)
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    target = model[layer] if isinstance(model, nn.Sequential) else getattr(model, layer)
    group = graph.get_pruning_group(target, tp.prune_linear_out_channels, idxs=list(range(target.out_features)))
    scores = imp(group)  # failed with "input: shape (1,)" for the MLP
    assert imp.example_inputs.shape == example.shape
    expected = log_connectivity(model, example, bn_flow=imp.bn_flow)
    assert imp.last_log_connectivity == pytest.approx(expected.item(), rel=1e-5)
    assert torch.isfinite(scores).all()


def test_a_second_model_is_measured_on_its_own_input():
    first, second = GroupedNet(), GroupedNet()
    imp = ConnectImportance(balance=float("inf"))
    tp.pruner.MetaPruner(first, torch.rand(1, 3, 16, 16), importance=imp, ignored_layers=[first.fc]).step()
    assert imp.example_inputs.shape == (1, 3, 16, 16)
    # built after the recorder stopped watching: the second model's input comes from its graph
    tp.pruner.MetaPruner(second, torch.rand(1, 3, 8, 8), importance=imp, ignored_layers=[second.fc]).step()
    assert imp.example_inputs.shape == (1, 3, 8, 8)


def test_reset_forgets_the_recorded_input_and_precision():
    model = GroupedNet()
    imp = ConnectImportance(balance=float("inf"))
    tp.pruner.MetaPruner(model, torch.rand(1, 3, 16, 16), importance=imp, ignored_layers=[model.fc]).step()
    imp._dtype = torch.float64  # as left by a model that only float64 measured
    imp.reset()
    assert imp.example_inputs is None and imp._dtype is None and imp.engine_path is None
    other = GroupedNet()
    tp.pruner.MetaPruner(other, torch.rand(1, 3, 12, 12), importance=imp, ignored_layers=[other.fc]).step()
    assert imp.example_inputs.shape == (1, 3, 12, 12)
    assert imp.engine_path == "scaled-float32"  # not the float64 general pass of the first model
    given = torch.rand(1, 3, 10, 10)
    imp = ConnectImportance(balance=float("inf"), example_inputs=given)
    imp.reset()
    assert imp.example_inputs is given  # what the user gave stays


# ------------------------------------------------------------------ outputs, devices, caches
class FeaturesAndLogits(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        features = F.relu(self.body(x))
        return features, self.fc(features)


def test_tuple_output_measures_every_output_so_the_classifier_counts():
    from connect_tp import connectivity_inputs, log_connectivity

    torch.manual_seed(0)
    model = FeaturesAndLogits()
    example = torch.rand(1, 4)
    x = connectivity_inputs(model, example, 4, torch.Generator().manual_seed(0))
    with torch.no_grad():
        features = F.relu(F.linear(x, model.body.weight.abs(), model.body.bias.abs()))
        logits = F.linear(features, model.fc.weight.abs(), model.fc.bias.abs())
    expected = math.log(float((features.sum(1) + logits.sum(1)).mean()))
    traced = log_connectivity(model, example)
    general = log_connectivity(model, example, dtype=torch.float64)  # the traced-free pass
    assert traced.item() == pytest.approx(expected, rel=1e-6)
    assert general.item() == pytest.approx(expected, rel=1e-6)
    grad = torch.autograd.grad(traced, [model.fc.weight])[0]
    assert float(grad.abs().sum()) > 0  # the classifier has a connectivity gradient


def test_meta_device_is_a_value_error():
    model = GroupedNet()
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=torch.rand(1, 3, 8, 8))
    group = graph.get_pruning_group(model.conv3, tp.prune_conv_out_channels, idxs=list(range(12)))
    model.to("meta")
    with pytest.raises(ValueError, match="meta device"):
        ConnectImportance(balance=float("inf"), example_inputs=torch.rand(1, 3, 8, 8))(group)


def test_scoring_by_hand_after_an_in_place_edit_is_never_stale():
    torch.manual_seed(0)
    model = GroupedNet()
    example = torch.rand(1, 3, 8, 8)
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    conv2 = graph.get_pruning_group(model.conv2, tp.prune_conv_out_channels, idxs=list(range(8)))
    conv3 = graph.get_pruning_group(model.conv3, tp.prune_conv_out_channels, idxs=list(range(12)))
    before = ConnectImportance(balance=float("inf"), example_inputs=example)(conv3)
    imp = ConnectImportance(balance=float("inf"), example_inputs=example)
    imp(conv2)
    model.conv2.weight.data[:4] *= 5.0  # through .data: neither the version counter nor the identity moves
    model.conv3.weight.data[0] *= 0.1
    after = imp(conv3)
    fresh = ConnectImportance(balance=float("inf"), example_inputs=example)(conv3)
    torch.testing.assert_close(after, fresh, rtol=1e-6, atol=0)
    assert not torch.allclose(after, before, rtol=1e-3)


class DeadBranch(nn.Module):
    """``side`` and ``side2`` reach the output multiplied by zero: no gradient of any kind reaches them."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 6)
        self.head = nn.Linear(6, 2)
        self.side = nn.Linear(4, 5)
        self.side2 = nn.Linear(5, 2)

    def forward(self, x):
        return self.head(F.relu(self.body(x))) + 0.0 * self.side2(F.relu(self.side(x)))


@pytest.mark.parametrize("kwargs,loss", [({"balance": float("inf")}, False), ({"balance": 1.0}, True),
                                         ({"balance": 0.0}, True)])
def test_a_group_without_any_gradient_scores_by_magnitude_and_says_so(kwargs, loss):
    torch.manual_seed(0)
    model = DeadBranch()
    if loss:
        model(torch.rand(8, 4)).pow(2).sum().backward()
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=torch.rand(1, 4))
    group = graph.get_pruning_group(model.side, tp.prune_linear_out_channels, idxs=list(range(5)))
    imp = ConnectImportance(example_inputs=torch.rand(1, 4), **kwargs)
    with pytest.warns(UserWarning, match=r"group of side, side2 is zero .*magnitudes \|W\|"):
        scores = imp(group)  # was 0/0 = NaN under the "mean" normalizer
    magnitude = (model.side.weight.detach().abs().sum(1) + model.side2.weight.detach().abs().sum(0)) / 2
    torch.testing.assert_close(scores, magnitude / magnitude.mean(), rtol=1e-6, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per group
        imp(group)


def test_engine_path_and_the_fallback_warning(monkeypatch):
    model = GroupedNet()
    example = torch.rand(1, 3, 8, 8)
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    group = graph.get_pruning_group(model.conv3, tp.prune_conv_out_channels, idxs=list(range(12)))
    imp = ConnectImportance(balance=float("inf"), example_inputs=example)
    assert imp.engine_path is None
    expected = imp(group)
    assert imp.engine_path == "scaled-float32"

    def refuse(*args, **kwargs):
        raise engine.NeedsFallback("node 'gelu' does not fit float32")

    monkeypatch.setattr(engine, "run_traced", refuse)
    monkeypatch.setattr(engine, "affine_on_samples", refuse)
    imp = ConnectImportance(balance=float("inf"), example_inputs=example)
    with pytest.warns(RuntimeWarning, match=r"node 'gelu' does not fit float32.*general pass"):
        got = imp(group)
    assert imp.engine_path == "general-float32"
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    model.conv1.weight.data *= 2.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once
        imp(group)


def test_an_input_given_after_construction_stops_the_recorder():
    # llm.LLMBlockPruner sets example_inputs on an importance built without them
    hooks_before = global_forward_hooks()
    model = GroupedNet()
    imp = ConnectImportance(balance=float("inf"))
    assert global_forward_hooks() == hooks_before + 2
    imp.example_inputs = torch.rand(1, 3, 8, 8)
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=torch.rand(1, 3, 8, 8))
    imp(graph.get_pruning_group(model.conv3, tp.prune_conv_out_channels, idxs=list(range(12))))
    assert global_forward_hooks() == hooks_before  # no hook left on every forward pass
    assert imp.example_inputs.shape == (1, 3, 8, 8)
