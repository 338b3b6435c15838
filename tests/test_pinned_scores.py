"""ConnectImportance's scores are pinned: they must not change where they were right.

``tests/reference/pinned_resnet20_lam100.json`` holds the scores of ``ConnectImportance(lam=100.0)``
(``bn_flow="stats"``, the other arguments at their defaults) on every Conv/Linear group of the seeded
ResNet-20 of :mod:`pinned_model`, produced by running the code of git commit 6146786 (before the
engine rewrite) from a copy outside the repository. Any later implementation must reproduce them
up to float32 rounding.
"""
import json
import os

import pytest
import torch

from connect_tp import ConnectImportance
from pinned_model import fingerprint, pinned_groups, pinned_resnet20

REFERENCE = os.path.join(os.path.dirname(__file__), "reference", "pinned_resnet20_lam100.json")


def test_scores_match_the_pinned_reference():
    with open(REFERENCE) as f:
        ref = json.load(f)
    ref["fingerprint"] = torch.tensor(ref["fingerprint"], dtype=torch.float64)
    ref["scores"] = [torch.tensor(s, dtype=torch.float32) for s in ref["scores"]]
    model = pinned_resnet20()
    # If this fails, torch's initialization or random streams changed, not ConnectImportance.
    torch.testing.assert_close(fingerprint(model), ref["fingerprint"], rtol=1e-6, atol=0,
                               msg="the pinned model itself changed (torch's init or RNG)")
    imp = ConnectImportance(lam=100.0, bn_flow="stats", example_inputs=torch.zeros(1, 3, 32, 32))
    scores = [imp(g) for g in pinned_groups(model)]
    assert len(scores) == len(ref["scores"]) == 13
    assert imp.last_log_connectivity == pytest.approx(ref["log_connectivity"], rel=1e-5)
    for i, (got, want) in enumerate(zip(scores, ref["scores"])):
        # "mean" normalization: scores are O(1); float32 rounding of sums over ~10^4 terms
        torch.testing.assert_close(got, want, rtol=2e-4, atol=1e-6, msg=f"group {i}")
    # lam=100 really weighs: the pinned scores are far from the Taylor ones.
    taylor = [ConnectImportance(lam=0.0)(g) for g in pinned_groups(model)]
    assert max(float((a - b).abs().max()) for a, b in zip(taylor, ref["scores"])) > 0.1
