"""The documented defaults, pinned through what they do: ``ConnectImportance()`` scores as kappa = 100, ``bn_flow="scale"``.

README and docs/api.md document the defaults of :class:`~connect_tp.ConnectImportance`: the balance
kappa = 100 (lambda resolved at the first step so that the connectivity term weighs 100 times the
loss term) and BatchNorm in the flow as its linear scale ``|gamma| / sigma`` (``bn_flow="scale"``). Comparing
``DEFAULT_BALANCE == 100`` would pass whatever the importance does with it; these tests instead pin
the scores ``ConnectImportance()`` gives on the seeded ResNet-20 of :mod:`pinned_model`, so a
change of either default, or of what it means, fails here.

``tests/reference/pinned_resnet20_defaults.json`` was written by ``ConnectImportance()`` (version
0.3.0 defaults) on that model: every group's scores, the resolved lambda and the log-connectivity;
``pinned_resnet20_defaults-0.2.0.json`` by version 0.2.0's (``bn_flow="gamma"``), which stays reachable
by name. The scores themselves are checked against an independent autograd reference for every
``bn_flow`` in ``tests/test_oracle.py``; these files pin what the defaults are.
"""
import json
import os

import pytest
import torch

from connect_tp import ConnectImportance
from pinned_model import fingerprint, pinned_groups, pinned_resnet20

REFERENCE = os.path.join(os.path.dirname(__file__), "reference", "pinned_resnet20_defaults.json")
REFERENCE_0_2 = os.path.join(os.path.dirname(__file__), "reference", "pinned_resnet20_defaults-0.2.0.json")
EXAMPLE = torch.zeros(1, 3, 32, 32)


def _read(path):
    with open(path) as f:
        ref = json.load(f)
    ref["scores"] = [torch.tensor(s, dtype=torch.float32) for s in ref["scores"]]
    return ref


@pytest.fixture(scope="module")
def reference():
    return _read(REFERENCE)


@pytest.fixture(scope="module")
def model(reference):
    model = pinned_resnet20()
    torch.testing.assert_close(fingerprint(model), torch.tensor(reference["fingerprint"], dtype=torch.float64),
                               rtol=1e-6, atol=0, msg="the pinned model itself changed (torch's init or RNG)")
    return model


def scores_of(imp, model):
    return [imp(g) for g in pinned_groups(model)]


def assert_scores(got, want, what):
    assert len(got) == len(want) == 13
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, rtol=2e-4, atol=1e-6, msg=f"{what}: group {i}")


def test_default_scores_are_pinned(model, reference):
    imp = ConnectImportance(example_inputs=EXAMPLE)
    assert_scores(scores_of(imp, model), reference["scores"], "ConnectImportance()")
    # kappa = 100: the resolved lambda and the connectivity it balanced.
    assert imp.lam == pytest.approx(reference["lam"], rel=1e-4)
    assert imp.last_log_connectivity == pytest.approx(reference["log_connectivity"], rel=1e-5)


def test_the_defaults_are_the_documented_kappa_100_and_bn_flow_scale(model, reference):
    documented = ConnectImportance(balance=100.0, bn_flow="scale", example_inputs=EXAMPLE)
    assert_scores(scores_of(documented, model), reference["scores"], "balance=100, bn_flow='scale'")
    assert (reference["balance"], reference["bn_flow"]) == (100.0, "scale")


def test_version_0_2_0_s_default_is_reachable_by_name_and_scores_as_it_did(model):
    old = _read(REFERENCE_0_2)
    assert (old["balance"], old["bn_flow"]) == (100.0, "gamma")
    imp = ConnectImportance(balance=100.0, bn_flow="gamma", example_inputs=EXAMPLE)
    assert_scores(scores_of(imp, model), old["scores"], "balance=100, bn_flow='gamma' (0.2.0's default)")
    assert imp.lam == pytest.approx(old["lam"], rel=1e-4)


@pytest.mark.parametrize("other", [dict(balance=1.0, bn_flow="scale"), dict(balance=100.0, bn_flow="stats"),
                                   dict(balance=100.0, bn_flow="gamma")])
def test_another_default_would_fail_the_pin(model, reference, other):
    # The pin is sensitive to each default: kappa = 1, or another bn_flow, moves some score beyond the tolerance.
    got = scores_of(ConnectImportance(example_inputs=EXAMPLE, **other), model)
    worst = max(float(((a - b).abs() - 2e-4 * b.abs() - 1e-6).max()) for a, b in zip(got, reference["scores"]))
    assert worst > 1e-3, f"{other} scores like the defaults: the pin would not catch this change"
