"""Progressive pruning to speed-up targets, calibration gradients and layer-collapse detection."""
import pytest
import torch

import connect_tp.pruning as pruning_module
import torch.nn as nn

from connect_tp.models import resnet20
from connect_tp.pruning import (PRUNING_METHODS, UnreachableSpeedUp, build_importance, calibration_gradients,
                                count_macs_and_params, layer_channels, layer_report, parse_method, progressive_prune,
                                recalibrate_batchnorm)
from patience import patience

EXAMPLE = torch.rand(1, 1, 32, 32)


def _model(seed=0):
    torch.manual_seed(seed)
    model = resnet20(num_classes=10, in_channels=1).eval()
    with torch.no_grad():  # non-trivial BN statistics, as in a trained model
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model


def test_every_method_builds():
    for method in PRUNING_METHODS:
        assert build_importance(method, EXAMPLE) is not None
    with pytest.raises(ValueError, match="unknown pruning method 'l3'"):
        build_importance("l3")


def test_snapshots_reach_targets_and_keep_the_classifier():
    model = _model()
    base_macs, _ = count_macs_and_params(model, EXAMPLE)
    snaps = progressive_prune(model, EXAMPLE, build_importance("l2"), [4.0, 2.0], iterative_steps=40, progress=False)
    assert [s.target for s in snaps] == [2.0, 4.0]
    for snap in snaps:
        assert snap.speed_up >= snap.target
        assert count_macs_and_params(snap.model, EXAMPLE)[0] == snap.macs == pytest.approx(base_macs / snap.speed_up)
        assert snap.model.fc.out_features == 10
    assert snaps[0].step < snaps[1].step
    # The snapshot is a copy: pruning went on after it was taken.
    assert layer_channels(snaps[0].model) != layer_channels(model)


def test_one_trajectory_equals_separate_runs():
    """Stopping at 2.5x gives the same model whether or not the run then continues to 5x."""
    alone = progressive_prune(_model(), EXAMPLE, build_importance("l1"), [2.5], iterative_steps=40, progress=False)[0]
    shared = progressive_prune(_model(), EXAMPLE, build_importance("l1"), [2.5, 5.0], iterative_steps=40,
                               progress=False)[0]
    assert alone.step == shared.step and layer_channels(alone.model) == layer_channels(shared.model)
    assert torch.allclose(alone.model(EXAMPLE), shared.model(EXAMPLE))


def test_gradient_methods_need_calibration_and_unreachable_targets_fail():
    with pytest.raises(ValueError, match="calibration"):
        progressive_prune(_model(), EXAMPLE, build_importance("taylor"), [2.0], iterative_steps=10, progress=False)
    with pytest.raises(ValueError, match="out of reach"):
        progressive_prune(_model(), EXAMPLE, build_importance("l2"), [1000.0], iterative_steps=10,
                          max_pruning_ratio=0.3, progress=False)


def test_taylor_uses_calibration_gradients():
    model = _model()
    batches = [(torch.rand(8, 1, 32, 32), torch.randint(0, 10, (8,))) for _ in range(2)]
    loss = calibration_gradients(model, batches)
    with torch.no_grad():
        expected = sum(nn.functional.cross_entropy(model(x), y, reduction="sum") for x, y in batches) / 16
    assert loss == pytest.approx(expected.item(), rel=1e-5)
    assert model.conv1.weight.grad is not None and model.conv1.weight.grad.abs().sum() > 0
    snaps = progressive_prune(model, EXAMPLE, build_importance("taylor"), [1.5], calibration=batches,
                              iterative_steps=20, progress=False)
    assert snaps[0].speed_up >= 1.5


def test_layer_report_flags_a_layer_with_no_path():
    model = _model()
    report = layer_report(model, EXAMPLE)
    assert report["collapsed_layers"] == [] and not report["network_disconnected"]
    assert report["channels"]["layer2.0.conv1"] == [16, 32]
    with torch.no_grad():
        model.layer2[1].bn1.weight.zero_()  # every channel of the residual branch scaled to zero
        model.layer3[0].conv1.weight[:3].zero_()  # three dead channels in another layer
    report = layer_report(model, EXAMPLE)
    # No signal enters layer2.1.conv2, and layer2.1.conv1 has no path onwards: both collapse.
    assert set(report["collapsed_layers"]) == {"layer2.1.conv1", "layer2.1.conv2"}
    assert report["dead_channels"]["layer3.0.conv1"] == 3
    assert not report["network_disconnected"]  # the skip connection still carries the signal


def test_cutting_the_only_path_disconnects_the_network():
    model = _model()
    with torch.no_grad():
        model.bn1.weight.zero_()  # the stem feeds every path
    report = layer_report(model, EXAMPLE)
    assert report["network_disconnected"] and "fc" in report["collapsed_layers"]


def test_bn_recalibration_changes_only_statistics():
    model = _model()
    batches = [(torch.rand(16, 1, 32, 32), torch.zeros(16, dtype=torch.long))]
    recal = recalibrate_batchnorm(model, batches)
    assert torch.equal(recal.conv1.weight, model.conv1.weight)
    with torch.no_grad():
        stem = recal.conv1(batches[0][0])
    assert torch.allclose(recal.bn1.running_mean, stem.mean((0, 2, 3)), atol=1e-5)
    assert not torch.allclose(recal.bn1.running_mean, model.bn1.running_mean)
    assert not recal.training


def test_in_place_recalibration_keeps_the_model_and_its_momentum():
    model = _model()
    batches = [(torch.rand(16, 1, 32, 32), torch.zeros(16, dtype=torch.long))]
    same = recalibrate_batchnorm(model, batches, in_place=True)
    assert same is model and not model.training and model.bn1.momentum == 0.1
    with torch.no_grad():
        stem = model.conv1(batches[0][0])
    assert torch.allclose(model.bn1.running_mean, stem.mean((0, 2, 3)), atol=1e-5)


def test_bn_refresh_in_the_loop_gives_snapshots_fitted_statistics(monkeypatch):
    """With bn_refresh_every=k the statistics are re-estimated before every k-th step (counted), so a
    snapshot's running means describe the pruned network up to that step's pruning, not the unpruned one."""
    batches = [(torch.rand(16, 1, 32, 32), torch.randint(0, 10, (16,)))]
    refreshed = []
    real = pruning_module.recalibrate_batchnorm
    monkeypatch.setattr(pruning_module, "recalibrate_batchnorm",
                        lambda m, b, d="cpu", in_place=False: refreshed.append(in_place) or real(m, b, d, in_place))
    stale = progressive_prune(_model(), EXAMPLE, build_importance("l2"), [2.0], iterative_steps=20,
                              calibration=batches, progress=False)[0]
    assert refreshed == []
    fresh = progressive_prune(_model(), EXAMPLE, build_importance("l2"), [2.0], iterative_steps=20,
                              calibration=batches, progress=False, bn_refresh_every=2)[0]
    assert fresh.step == stale.step and refreshed == [True] * ((fresh.step - 1) // 2 + 1)
    # the same channels were kept (l2 reads no statistics), only the statistics differ
    assert [p.shape for p in fresh.model.parameters()] == [p.shape for p in stale.model.parameters()]
    assert not torch.allclose(fresh.model.bn1.running_var, stale.model.bn1.running_var)


@pytest.mark.parametrize("bad", [-1, 1.5, True])
def test_bn_refresh_every_is_validated(bad):
    with pytest.raises(ValueError, match="bn_refresh_every"):
        progressive_prune(_model(), EXAMPLE, build_importance("l2"), [2.0], calibration=[(torch.rand(2, 1, 32, 32),
                          torch.zeros(2, dtype=torch.long))], progress=False, bn_refresh_every=bad)
    with pytest.raises(ValueError, match="calibration"):
        progressive_prune(_model(), EXAMPLE, build_importance("l2"), [2.0], progress=False, bn_refresh_every=1)


def test_unreachable_target_is_reported_as_soon_as_nothing_is_left_to_prune():
    with pytest.raises(UnreachableSpeedUp) as info:
        progressive_prune(_model(), EXAMPLE, build_importance("l2"), [1.5, 1000.0], iterative_steps=20,
                          max_pruning_ratio=0.3, progress=False)
    exc = info.value
    assert exc.step < exc.iterative_steps == 20, "the loop must stop when no layer can lose a channel"
    assert exc.target == 1000.0 and 1.5 <= exc.reached < 1000.0
    assert [s.target for s in exc.snapshots] == [1.5]
    assert f"highest speed-up reached is {exc.reached:.2f}x" in str(exc) and "out of reach" in str(exc)


@pytest.mark.parametrize("targets, steps", [([float("nan")], 10), ([float("inf")], 10), ([1.0], 10), ([2.0], 0)])
def test_bad_targets_and_steps_are_refused_before_pruning(targets, steps):
    with pytest.raises(ValueError, match="finite numbers > 1|iterative_steps must be >= 1"):
        progressive_prune(_model(), EXAMPLE, build_importance("l2"), targets, iterative_steps=steps, progress=False)


def test_method_names_parse_without_torch_pruning():
    import subprocess
    import sys

    code = ("import sys; from connect_tp.pipeline.methods import parse_method; "
            "assert parse_method('connect-k3-bngamma') == ('connect', {'balance': 3.0, 'bn_flow': 'gamma'}); "
            "assert 'torch_pruning' not in sys.modules")
    assert subprocess.run([sys.executable, "-c", code], timeout=patience(60)).returncode == 0
    assert parse_method("l2") == ("l2", {})


def test_a_norm_suffix_names_torch_pruning_normalizer():
    assert parse_method("l1-normsum") == ("l1", {"normalizer": "sum"})
    assert parse_method("connect-k100-bngamma-normnone") == (
        "connect", {"balance": 100.0, "bn_flow": "gamma", "normalizer": "none"})
    assert build_importance("l1-normsum").normalizer == "sum"
    assert build_importance("taylor-normmax").normalizer == "max"
    assert build_importance("l2-normnone").normalizer is None
    assert build_importance("l2").normalizer == "mean", "no suffix keeps Torch-Pruning's default"
    connect = build_importance("connect-kinf-bngamma-normsum", EXAMPLE)
    assert (connect.normalizer, connect.bn_flow, connect.balance) == ("sum", "gamma", float("inf"))
    plain = build_importance("connect-normsum", EXAMPLE)
    assert plain.default_strength and plain.normalizer == "sum"
    for bad, message in (("lamp-normsum", "LAMP fixes its own"), ("random-normmean", "random and uniform"),
                         ("l1-normfoo", "unknown normalizer 'foo'"), ("l1-normsum-normmax", "one -norm")):
        with pytest.raises(ValueError, match=message):
            build_importance(bad)


def test_the_normalizer_changes_where_global_pruning_cuts():
    # Connectivity shares sum to about 1 per layer, so "sum" compares channels by their share of their
    # group's connectivity: wide groups lose channels first, unlike "mean" (a score relative to its group).
    def widths(method):
        snap = progressive_prune(_model(), EXAMPLE, build_importance(method, EXAMPLE), [4.0], iterative_steps=40,
                                 progress=False)[0]
        return layer_channels(snap.model)

    by_mean, by_sum = widths("connect-kinf-bngamma"), widths("connect-kinf-bngamma-normsum")
    assert by_mean != by_sum
    spread = lambda ch: max(v[1] for k, v in ch.items() if k != "fc") - min(v[1] for k, v in ch.items() if k != "fc")
    assert spread(by_sum) < spread(by_mean), "shares equalize the widths"


def test_connectivity_scores_of_a_group_sum_to_one_under_the_sum_normalizer():
    import torch_pruning as tp

    model = _model()
    imp = build_importance("connect-kinf-bngamma-normsum", EXAMPLE)
    pruner = tp.pruner.MetaPruner(model, EXAMPLE, importance=imp, global_pruning=True, pruning_ratio=0.5,
                                  ignored_layers=[model.fc])
    groups = list(pruner.DG.get_all_groups(ignored_layers=pruner.ignored_layers, root_module_types=pruner.root_module_types))
    assert len(groups) > 5
    for group in groups:
        scores = imp(group)
        assert torch.all(scores >= 0) and float(scores.sum()) == pytest.approx(1.0, rel=1e-5)
