"""The cheaper paths of one pruning step give CoNNect's scores and gradients unchanged (up to float32 rounding).

``ConnectImportance(chunk_size=k)`` runs the connectivity pass ``k`` samples at a time and combines
the chunks with their log scales; the engine rebuilds folded convolution weights in the backward
and frees values after their last use. None of this may change ``log phi_tot``, its gradient or a
score beyond float32 rounding. (Speed and memory are measured by
``benchmarks/importance_overhead.py``, never here.)
"""
import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_pruning as tp

import connect_tp.scoring.gradient as gradient_module
from connect_tp import ConnectImportance, engine
from connect_tp.connectivity import log_connectivity
from connect_tp.models import resnet20


def trained_like_resnet20(seed=0):
    """A ResNet-20 with non-trivial BatchNorm statistics and signed affine parameters."""
    torch.manual_seed(seed)
    model = resnet20(num_classes=10)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(-1.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.3, 3.0)
    return model


def groups_of(model):
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=torch.rand(1, 3, 32, 32))
    return list(dg.get_all_groups(ignored_layers=[model.fc], root_module_types=[nn.Conv2d, nn.Linear]))


def scores(model, **kwargs):
    imp = ConnectImportance(example_inputs=torch.zeros(1, 3, 32, 32), **kwargs)
    return [imp(g) for g in groups_of(model)], imp


def turn_off_mean_input(patch):
    """Neither the sign proof nor the sample test may show the flow affine: every input is differentiated."""
    patch.setattr(engine, "affine_by_signs", lambda *args, **kwargs: False)
    patch.setattr(engine, "affine_on_samples", lambda *args, **kwargs: False)


@pytest.fixture
def every_sample(monkeypatch):
    """Differentiate every random input (no mean-input shortcut), so that chunking is what runs."""
    turn_off_mean_input(monkeypatch)


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 5, 8])
def test_chunked_scores_equal_batched_scores(chunk_size, every_sample):
    model = trained_like_resnet20()
    F.cross_entropy(model(torch.rand(8, 3, 32, 32)), torch.randint(0, 10, (8,))).backward()
    batched, imp_b = scores(model, balance=1.0, n_samples=5)
    chunked, imp_c = scores(model, balance=1.0, n_samples=5, chunk_size=chunk_size)
    assert imp_c.last_log_connectivity == pytest.approx(imp_b.last_log_connectivity, rel=1e-6)
    assert imp_c.lam == pytest.approx(imp_b.lam, rel=1e-5)
    assert len(batched) == len(chunked) > 5
    for a, b in zip(batched, chunked):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)


def test_chunked_gradient_is_that_of_log_mean_phi_at_extreme_scales(monkeypatch, every_sample):
    """Per-sample sums spread over many orders of magnitude: the log-scale weighting stays exact."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3)).double()
    x = torch.tensor([[1e-30] * 6, [1.0] * 6, [1e-3] * 6, [1e5] * 6], dtype=torch.float64)

    params = dict(model.named_parameters())
    leaves = {n: p.detach().clone().requires_grad_(True) for n, p in params.items()}
    # reference: log of the mean over samples of the summed output, plain float64 autograd
    out = torch.func.functional_call(model, {n: l.abs() for n, l in leaves.items()}, (x,))
    ref_log = torch.log(out.sum(1).mean())
    ref_grads = torch.autograd.grad(ref_log, list(leaves.values()))
    # the random inputs are uniform in [0, 1): put these per-sample scales in their place
    monkeypatch.setattr(gradient_module, "connectivity_inputs", lambda model_, inputs, n, generator=None: x[:n].clone())
    for chunk_size in (None, 1, 2, 3):
        imp = ConnectImportance(n_samples=4, chunk_size=chunk_size, example_inputs=torch.zeros(1, 6))
        fresh = {n: p.detach().requires_grad_(True) for n, p in params.items()}
        with torch.enable_grad():
            log_phi, grads = imp._traced_gradients(model, x, fresh, {})
        assert log_phi == pytest.approx(float(ref_log.detach()), rel=1e-12)
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-300)
        assert all(leaf.grad is None for leaf in fresh.values())  # the leaves keep no .grad


def test_refolded_convolution_matches_plain_autograd():
    """Engine gradients (folded weights rebuilt in the backward) against a plain functional forward."""
    model = trained_like_resnet20(1).double().eval()
    x = torch.rand(3, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    params = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
    out, _ = engine.run_traced(model, x, params, "signal", "stats", layer_outputs=False)
    traced = torch.log(out.value.sum()) + out.log_scale
    g_traced = torch.autograd.grad(traced, list(params.values()), allow_unused=True)
    plain = torch.func.functional_call(model, {n: p.abs() for n, p in params.items()}, (x,))
    direct = torch.log(plain.sum())
    g_direct = torch.autograd.grad(direct, list(params.values()), allow_unused=True)
    assert float(traced) == pytest.approx(float(direct), rel=1e-12)
    for name, a, b in zip(params, g_traced, g_direct):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=name)


def test_layer_outputs_can_be_dropped_without_changing_the_output():
    model = trained_like_resnet20(3).eval()
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    kept, layers = engine.run_traced(model, x, None, "signal", "stats")
    dropped, none = engine.run_traced(model, x, None, "signal", "stats", layer_outputs=False)
    assert len(layers) == 22 and none == {}  # every convolution and the fc
    assert dropped.log_scale == kept.log_scale
    torch.testing.assert_close(dropped.value, kept.value, rtol=0, atol=0)


def test_untraceable_and_invalid_models_still_take_the_general_path():
    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.l1, self.l2 = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            h = self.l1(x)
            if float(h.sum()) > -1e9:  # data-dependent control flow: torch.fx cannot trace it
                h = F.relu(h)
            return self.l2(h)

    torch.manual_seed(0)
    model = Untraceable()
    assert engine.traced_graph(model) is None
    for chunk_size in (None, 1):
        imp = ConnectImportance(balance=math.inf, n_samples=3, chunk_size=chunk_size, example_inputs=torch.zeros(1, 4))
        params = dict(model.named_parameters())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            grads = imp._connectivity_gradients(model, params)
            imp._connectivity_gradients(model, params)
        # A chunk size the general path cannot honour is said, once; no chunk size, no warning.
        said = [w for w in caught if "has no effect on this model" in str(w.message)]
        assert len(said) == (0 if chunk_size is None else 1)
        assert imp.last_log_connectivity == pytest.approx(float(log_connectivity(model, torch.zeros(1, 4), 3)), rel=1e-6)
        assert len(grads) == 4


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_chunk_size_is_validated(bad):
    with pytest.raises(ValueError, match="chunk_size"):
        ConnectImportance(chunk_size=bad)


def test_chunk_size_defaults_to_one_pass():
    assert ConnectImportance().chunk_size is None


# ----------------------------------------------------------------------------- the mean-input shortcut
@pytest.mark.parametrize("bn_flow,means,shortcut", [
    ("gamma", "signed", True),      # no shifts: a ReLU network of |W| is affine on inputs >= 0
    ("scale", "signed", True),      # no shifts either, only a positive factor per channel
    ("stats", "negative", True),    # the running means only add to the signal: no kink is reached
    ("stats", "signed", None),      # some kinks may fall between the samples: whichever path, same scores
])
def test_mean_input_gives_the_scores_of_every_input(monkeypatch, bn_flow, means, shortcut):
    """Where the flow is affine on the random inputs, one mean input gives log phi_tot, its gradient
    and the scores of the n inputs (up to float32 rounding)."""
    model = trained_like_resnet20()
    if means == "negative":
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.abs_().neg_()
    F.cross_entropy(model(torch.rand(8, 3, 32, 32)), torch.randint(0, 10, (8,))).backward()
    short, imp_s = scores(model, balance=1.0, n_samples=4, bn_flow=bn_flow)
    if shortcut is not None:
        assert imp_s.used_mean_sample is shortcut
    with monkeypatch.context() as m:
        turn_off_mean_input(m)
        full, imp_f = scores(model, balance=1.0, n_samples=4, bn_flow=bn_flow)
    assert not imp_f.used_mean_sample
    assert imp_s.last_log_connectivity == pytest.approx(imp_f.last_log_connectivity, rel=1e-6)
    assert imp_s.lam == pytest.approx(imp_f.lam, rel=1e-5)
    for a, b in zip(full, short):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def _relu_net_with_a_kink_between_samples():
    """Linear(2 -> 2), BatchNorm whose running mean puts channel 0's kink between the samples."""
    model = nn.Sequential(nn.Linear(2, 2, bias=False), nn.BatchNorm1d(2), nn.ReLU(), nn.Linear(2, 1, bias=False))
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[3].weight.fill_(1.0)
        model[1].running_mean.copy_(torch.tensor([1.0, -5.0]))
        model[1].running_var.fill_(1.0 - model[1].eps)
    return model.eval()


def test_affine_check_finds_a_kink_between_the_samples():
    model = _relu_net_with_a_kink_between_samples()
    params = dict(model.named_parameters())
    below, above = torch.full((1, 2), 0.1), torch.full((1, 2), 0.9)  # channel 0 sees 0.2 - 1 < 0 and 1.8 - 1 > 0
    assert not engine.affine_on_samples(model, torch.cat([below, above]), params, "stats")
    assert engine.affine_on_samples(model, torch.cat([above, above * 1.1]), params, "stats")  # same piece
    assert engine.affine_on_samples(model, torch.cat([below, above]), params, "gamma")  # no shift: no kink
    # a smooth non-linearity is never affine on distinct samples
    torch.manual_seed(0)
    smooth = nn.Sequential(nn.Linear(2, 2), nn.Sigmoid(), nn.Linear(2, 1))
    spread = torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.9, 0.1]])
    assert not engine.affine_on_samples(smooth, spread, dict(smooth.named_parameters()), "stats")


def test_kinked_samples_are_each_differentiated(monkeypatch):
    """Where the check fails, the importance differentiates every input: the plain n-sample result."""
    model = _relu_net_with_a_kink_between_samples()
    x = torch.tensor([[0.1, 0.1], [0.9, 0.9], [0.5, 0.2]])
    monkeypatch.setattr(gradient_module, "connectivity_inputs", lambda model_, inputs, n, generator=None: x[:n].clone())
    imp = ConnectImportance(n_samples=3, bn_flow="stats", example_inputs=torch.zeros(1, 2))  # the kink is a running mean
    params = dict(model.named_parameters())
    leaves = {n: p.detach().clone().requires_grad_(True) for n, p in params.items()}
    with torch.enable_grad():
        log_phi, grads = imp._traced_gradients(model, x, leaves, {})
    assert not imp.used_mean_sample
    fresh = {n: p.detach().clone().requires_grad_(True) for n, p in params.items()}
    out = torch.func.functional_call(model, {n: t.abs() for n, t in fresh.items()}, (x,))
    ref = torch.log(out.sum(1).mean())
    assert log_phi == pytest.approx(float(ref), rel=1e-6)
    for g, r in zip(grads, torch.autograd.grad(ref, list(fresh.values()))):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-8)
    # ...and its result differs from the mean input's, which is why the check exists
    mean_out = torch.func.functional_call(model, {n: t.abs() for n, t in params.items()}, (x.mean(0, keepdim=True),))
    assert abs(float(torch.log(mean_out.sum())) - log_phi) > 1e-3


def _shortcut_against_every_sample(model, x, monkeypatch):
    """(used the mean input?, max |gradient difference| against differentiating every sample)."""
    monkeypatch.setattr(gradient_module, "connectivity_inputs", lambda model_, inputs, n, generator=None: x[:n].clone())
    results = []
    for shortcut in (True, False):
        with monkeypatch.context() as m:
            if not shortcut:
                turn_off_mean_input(m)
            imp = ConnectImportance(n_samples=x.shape[0], bn_flow="stats", example_inputs=x[:1])  # kinks from running means
            leaves = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
            with torch.enable_grad():
                log_phi, grads = imp._traced_gradients(model, x, leaves, {})
            results.append((imp.used_mean_sample, log_phi, grads))
    (used, log_a, grads_a), (_, log_b, grads_b) = results
    assert log_a == pytest.approx(log_b, rel=1e-6)
    return used, max(float((a - b).abs().max()) for a, b in zip(grads_a, grads_b))


def test_clamp_with_samples_on_both_flat_pieces_is_not_affine(monkeypatch):
    # Hardtanh(0, 1) is neither convex nor concave: two samples on its two flat pieces have a mean on
    # the slope, so the values at the mean can match while the gradients do not (found in review)
    model = nn.Sequential(nn.Linear(1, 1, bias=False), nn.BatchNorm1d(1), nn.Hardtanh(0.0, 1.0),
                          nn.Linear(1, 1, bias=False))
    with torch.no_grad():
        model[0].weight.fill_(4.0)
        model[3].weight.fill_(1.0)
        model[1].running_mean.fill_(1.0)
        model[1].running_var.fill_(1.0 - model[1].eps)
    model.eval()
    x = torch.tensor([[0.125], [0.625]])  # before the clamp: -0.5 and 1.5
    assert not engine.affine_on_samples(model, x, dict(model.named_parameters()), "stats")
    used, gap = _shortcut_against_every_sample(model, x, monkeypatch)
    assert not used and gap == 0.0


def test_a_sample_just_below_a_kink_is_caught(monkeypatch):
    # one sample 5e-6 below a ReLU's kink: values at the mean nearly match, gradients do not
    model = _relu_net_with_a_kink_between_samples()
    x = torch.tensor([[0.4999975, 0.4999975], [0.9, 0.9]])
    assert not engine.affine_on_samples(model, x, dict(model.named_parameters()), "stats")
    used, gap = _shortcut_against_every_sample(model, x, monkeypatch)
    assert not used and gap == 0.0


def test_batchnorm_without_running_statistics_is_not_affine():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False), nn.Conv2d(4, 2, 3),
                          nn.Flatten()).eval()
    assert not engine.affine_on_samples(model, torch.rand(4, 3, 8, 8), dict(model.named_parameters()), "stats")


def test_max_pool_windows_must_pick_the_same_entry():
    model = nn.Sequential(nn.MaxPool1d(2), nn.Flatten(), nn.Linear(1, 1))
    params = dict(model.named_parameters())
    same = torch.tensor([[[0.9, 0.1]], [[0.8, 0.3]]])
    other = torch.tensor([[[0.9, 0.1]], [[0.2, 0.7]]])
    assert engine.affine_on_samples(model, same, params, "stats")
    assert not engine.affine_on_samples(model, other, params, "stats")


# ----------------------------------------------------------------------------- the sign proof
class _Arithmetic(nn.Module):
    """conv -> (an operation given as a function of the flow) -> ReLU -> linear."""

    def __init__(self, op):
        super().__init__()
        self.conv, self.fc, self.op = nn.Conv2d(3, 4, 3), nn.Linear(4 * 6 * 6, 2), op

    def forward(self, x):
        y = self.conv(x)
        return self.fc(torch.flatten(torch.relu(self.op(y)), 1))


@pytest.mark.parametrize("op,proved", [
    (lambda y: y, True),
    (lambda y: y * 2.0 + 1, True),            # a positive factor and a positive constant keep the sign
    (lambda y: torch.cat([y, y], 1)[:, :4], True),
    (lambda y: y - 1, False),                 # a subtraction can cross the kink
    (lambda y: y * -1.0, False),
    (lambda y: y + torch.ones(1), False),     # a tensor constant: its sign is not known from the graph
    (lambda y: y * y, False),                 # a product of flows is not affine
    (lambda y: torch.sigmoid(y), False),      # no rule: not known to be affine
])
def test_sign_proof_of_small_graphs(op, proved):
    model = _Arithmetic(op).eval()
    assert engine.affine_by_signs(model, "gamma") is proved
    if proved:  # sound: the sample test agrees on inputs in [0, 1)
        torch.manual_seed(0)
        assert engine.affine_on_samples(model, torch.rand(4, 3, 8, 8), dict(model.named_parameters()), "gamma")


def test_sign_proof_of_the_model_zoo():
    from connect_tp.models import resnet56, vgg19_bn
    for model in (trained_like_resnet20(), resnet56(num_classes=10)):
        assert engine.affine_by_signs(model.eval(), "gamma") and engine.affine_by_signs(model, "identity")
        assert not engine.affine_by_signs(model, "stats")  # the shift -mean * scale may be negative
    assert not engine.affine_by_signs(vgg19_bn(num_classes=10).eval(), "gamma")  # max-pool picks per sample
    hard = nn.Sequential(nn.Linear(2, 2), nn.Hardtanh(0.5, 1.0), nn.Linear(2, 1)).eval()
    assert not engine.affine_by_signs(hard, "gamma")  # a floor above 0 is a kink a flow >= 0 can reach
    six = nn.Sequential(nn.Linear(2, 2), nn.ReLU6(), nn.Linear(2, 1)).eval()
    assert engine.affine_by_signs(six, "gamma")  # the signal view opens the ceiling: a ReLU on flows >= 0
    free = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU()).eval()
    assert not engine.affine_by_signs(free, "gamma")  # batch statistics: not affine


def test_proved_graphs_skip_the_sample_pass(monkeypatch):
    """On a ReLU network with bn_flow="gamma" the importance uses the mean input without the test pass;
    with "stats" it runs the pass. Scores are the same as differentiating every input."""
    calls = []
    real = engine.affine_on_samples
    monkeypatch.setattr(engine, "affine_on_samples", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = trained_like_resnet20()
    F.cross_entropy(model(torch.rand(8, 3, 32, 32)), torch.randint(0, 10, (8,))).backward()
    short, imp = scores(model, balance=1.0, n_samples=4, bn_flow="gamma")
    assert imp.used_mean_sample and calls == []
    scores(model, balance=1.0, n_samples=4, bn_flow="scale")
    assert calls == []
    scores(model, balance=1.0, n_samples=4, bn_flow="stats")
    assert calls == [1]
    with monkeypatch.context() as m:
        turn_off_mean_input(m)
        full, imp_f = scores(model, balance=1.0, n_samples=4, bn_flow="gamma")
    assert not imp_f.used_mean_sample
    for a, b in zip(full, short):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
