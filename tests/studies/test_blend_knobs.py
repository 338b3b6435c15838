"""The knob checks of benchmarks/studies/blend_knobs.py: rank agreement and per-layer Taylor masses."""
import math

import pytest
import torch

from benchmarks.studies import blend_knobs
from connect_tp.models import resnet20
from connect_tp.training import save_model_checkpoint

ARCH = {"model": "resnet20", "num_classes": 10, "in_channels": 1}


def test_spearman_and_bottom_overlap_read_rankings():
    a = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    assert blend_knobs.spearman(a, a * 7 + 1) == pytest.approx(1.0)
    assert blend_knobs.spearman(a, -a) == pytest.approx(-1.0)
    # global bottom quarter of 8 channels: the 2 lowest; one of them shared
    low = [torch.tensor([0.0, 5.0, 6.0, 7.0]), torch.tensor([1.0, 8.0, 9.0, 10.0])]
    other = [torch.tensor([0.0, 5.0, 6.0, 7.0]), torch.tensor([11.0, 8.0, 9.0, 1.0])]
    assert blend_knobs.bottom_overlap(low, other) == pytest.approx(0.5)
    report = blend_knobs.compare(low, low)
    assert report == {"spearman_mean": pytest.approx(1.0), "spearman_min": pytest.approx(1.0), "bottom25_overlap": 1.0}


def test_layer_masses_show_connectivity_near_one_per_main_convolution(tmp_path):
    torch.manual_seed(0)
    model = resnet20(num_classes=10, in_channels=1).eval()
    path = tmp_path / "base.pt"
    save_model_checkpoint(str(path), model, ARCH)
    batches = [(torch.rand(8, 1, 32, 32), torch.randint(0, 10, (8,)))]
    rows = blend_knobs.layer_masses(str(path), batches, lam=2.0)
    by_name = {r["layer"]: r for r in rows}
    assert len(rows) == 22 and "fc" in by_name
    main = [r for r in rows if "downsample" not in r["layer"]]
    # positively homogeneous in each layer's weights: d log phi / d log W sums to about 1 per layer
    assert all(0.8 < r["connectivity_mass"] < 1.05 for r in main)
    # the shortcut convolutions carry the residual sums' smaller share
    assert all(r["connectivity_mass"] < 0.8 for r in rows if "downsample" in r["layer"])
    for r in rows:
        assert r["loss_mass"] > 0
        assert r["kappa_of_layer"] == pytest.approx(2.0 * r["connectivity_mass"] / r["loss_mass"])
        assert math.isfinite(r["kappa_of_layer"])
