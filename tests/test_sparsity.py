"""Tests for direct / effective sparsity and layer-collapse detection."""
import pytest
import torch
import torch.nn as nn

from connect_tp.sparsity import (
    direct_sparsity,
    effective_sparsity,
    is_layer_collapsed,
    mlp_effective_masks,
    mlp_layer_collapse,
    sparsity_report,
)

torch.set_num_threads(1)


def set_weights(model, *weights):
    layers = [m for m in model if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for layer, w in zip(layers, weights):
            layer.weight.copy_(torch.tensor(w, dtype=torch.float32))


def test_hand_worked_effective_sparsity():
    # 3 -> 3 -> 2 -> 1.
    #  * hidden unit h0 has no incoming weight (dead from the input side), so its outgoing
    #    weight W2[0, 0] is dead;
    #  * hidden unit h2 feeds nothing (W2[:, 2] = 0), so its two incoming weights are dead;
    #  * layer-2 unit g1 has no edge to the output, so W2[1, 1] is dead.
    # Alive paths: x0 -> h1 -> g0 -> out and x1 -> h1 -> g0 -> out.
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 1))
    set_weights(
        model,
        [[0, 0, 0], [1, 1, 0], [0, 1, 1]],  # 4 non-zero: W1[1,0], W1[1,1] alive; W1[2,1], W1[2,2] dead
        [[1, 1, 0], [0, 1, 0]],  # 3 non-zero: W2[0,1] alive; W2[0,0], W2[1,1] dead
        [[1, 0]],  # 1 non-zero, alive
    )
    report = sparsity_report(model, torch.randn(1, 3))
    total = 9 + 6 + 2
    assert report.direct == pytest.approx(1 - 8 / total)
    assert report.effective == pytest.approx(1 - 4 / total)
    assert [l.effective for l in report.layers.values()] == [2, 1, 1]
    assert [l.effective_units for l in report.layers.values()] == [1, 1, 1]
    assert not report.collapsed
    assert direct_sparsity(model) == pytest.approx(report.direct)
    assert effective_sparsity(model, torch.randn(1, 3)) == pytest.approx(report.effective)

    ws = [m.weight for m in model if isinstance(m, nn.Linear)]
    weight_masks, unit_masks = mlp_effective_masks(ws)
    assert [int(m.sum()) for m in weight_masks] == [2, 1, 1]
    assert weight_masks[0].tolist() == [[False] * 3, [True, True, False], [False] * 3]
    assert [u.tolist() for u in unit_masks] == [[False, True, False], [True, False], [True]]


def test_network_built_to_collapse_is_detected():
    # every layer keeps a weight (direct sparsity < 1), but layer 2's only weight leaves the
    # hidden unit that layer 1 does not feed: no input-output path is left.
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))
    set_weights(model, [[1, 1], [0, 0]], [[0, 1], [0, 0]], [[1, 1]])
    report = sparsity_report(model, torch.randn(1, 2))
    assert report.collapsed and report.effective == 1.0 and report.direct < 1.0
    assert is_layer_collapsed(model, torch.randn(1, 2))
    assert bool(mlp_layer_collapse([m.weight for m in model if isinstance(m, nn.Linear)]))
    # re-connecting one edge removes the collapse
    with torch.no_grad():
        model[2].weight[0, 0] = 1.0
    assert not is_layer_collapsed(model, torch.randn(1, 2))


def test_batched_masks_agree_with_module_reachability():
    torch.manual_seed(0)
    nets = [nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 5), nn.ReLU(), nn.Linear(5, 1)) for _ in range(40)]
    with torch.no_grad():
        for net in nets:
            for m in net:
                if isinstance(m, nn.Linear):
                    m.weight.mul_((torch.rand_like(m.weight) < 0.3).float())
    ws = [torch.stack([net[i].weight for net in nets]) for i in (0, 2, 4)]
    weight_masks, _ = mlp_effective_masks(ws)
    collapsed = mlp_layer_collapse(ws)
    assert 0 < int(collapsed.sum()) < 40  # the random masks give both outcomes
    for b, net in enumerate(nets):
        report = sparsity_report(net, torch.randn(1, 6))
        assert report.collapsed == bool(collapsed[b])
        assert [l.effective for l in report.layers.values()] == [int(m[b].sum()) for m in weight_masks]


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 2, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(2, 2, 3, padding=1, bias=False)
        self.head = nn.Conv2d(2, 1, 1, bias=False)

    def forward(self, x):
        return self.head(torch.relu(self.conv2(torch.relu(self.conv1(x))) + x))


def test_identity_skip_keeps_a_residual_network_connected():
    model = Block()
    with torch.no_grad():
        model.conv2.weight.zero_()  # the residual branch is cut, the identity skip is not
    report = sparsity_report(model, torch.randn(1, 2, 5, 5))
    assert not report.collapsed
    assert report.layers["conv1"].effective == 0  # conv1 now feeds nothing
    assert report.layers["head"].effective == 2
    with torch.no_grad():
        model.head.weight.zero_()
    assert is_layer_collapsed(model, torch.randn(1, 2, 5, 5))


def test_conv_channel_cut_counts_its_filters_as_dead():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(3, 2, 3, padding=1), nn.Flatten(), nn.Linear(2 * 2 * 2, 1))
    with torch.no_grad():
        model[4].weight[:, 1].zero_()  # nothing reads channel 1 of the first conv any more
    report = sparsity_report(model, torch.randn(1, 1, 4, 4))
    first = report.layers["0"]
    assert first.nonzero == 27 and first.effective == 18 and first.effective_units == 2
    assert report.effective > report.direct
