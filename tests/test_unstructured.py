"""Tests for magnitude / SynFlow / SNIP scores and layer-local masks."""
import itertools

import pytest
import torch
import torch.nn as nn

from connect_tp.unstructured import (
    apply_masks,
    layerwise_masks,
    magnitude_scores,
    mlp_synflow_scores,
    num_kept,
    snip_scores,
    synflow_scores,
)

torch.set_num_threads(1)


def theta(w):
    return w.abs() / w.abs().sum()


def mlp(*sizes, dtype=torch.float64):
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1]).to(dtype)


def test_synflow_equals_share_of_paths_through_each_weight():
    torch.manual_seed(0)
    model = mlp(3, 4, 2)
    t1, t2 = theta(model[0].weight.detach()), theta(model[2].weight.detach())
    paths = {}
    for i, h, o in itertools.product(range(3), range(4), range(2)):
        paths[(i, h, o)] = t1[h, i] * t2[o, h]
    phi = sum(paths.values())
    expected1 = torch.zeros(4, 3, dtype=torch.float64)
    expected2 = torch.zeros(2, 4, dtype=torch.float64)
    for (i, h, o), p in paths.items():
        expected1[h, i] += p / phi
        expected2[o, h] += p / phi
    scores = synflow_scores(model, torch.randn(1, 3))
    torch.testing.assert_close(scores["0"], expected1)
    torch.testing.assert_close(scores["2"], expected2)
    # a_in * theta * a_out, literally
    a_in, a_out = torch.ones(3, dtype=torch.float64), t2.sum(0)
    torch.testing.assert_close(scores["0"], a_out[:, None] * t1 * a_in[None, :] / phi)


def test_batched_synflow_matches_module_version_and_zeroes_disconnected():
    torch.manual_seed(1)
    models = [mlp(6, 5, 5, 1) for _ in range(3)]
    with torch.no_grad():
        models[2][2].weight.zero_()  # disconnected
    ws = [torch.stack([m[i].weight.detach() for m in models]) for i in (0, 2, 4)]
    batched = mlp_synflow_scores(ws)
    for b, m in enumerate(models[:2]):
        single = synflow_scores(m, torch.randn(1, 6))
        for k, name in enumerate(("0", "2", "4")):
            torch.testing.assert_close(batched[k][b], single[name])
    assert all(torch.isfinite(s).all() for s in batched)
    assert all((s[2] == 0).all() for s in batched)


def test_num_kept_matches_the_paper_setting():
    # 96% of each layer of the 6-5-5-5-1 MLP: 2 / 1 / 1 / 1 weights survive
    assert [num_kept(n, 0.96) for n in (30, 25, 25, 5)] == [2, 1, 1, 1]
    assert num_kept(10, 0.0) == 10
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        num_kept(10, 1.0)


def test_layerwise_masks_keep_the_top_scores_per_layer_and_per_network():
    torch.manual_seed(2)
    scores = [torch.rand(7, 5, 6), torch.rand(7, 1, 5)]
    masks = layerwise_masks(scores, 0.9, batch_dims=1)
    for s, m in zip(scores, masks):
        flat_s, flat_m = s.flatten(1), m.flatten(1)
        keep = num_kept(flat_s.shape[1], 0.9)
        assert (flat_m.sum(1) == keep).all()
        for b in range(7):  # every kept score beats every removed one
            assert flat_s[b][flat_m[b]].min() > flat_s[b][~flat_m[b]].max()
    d = layerwise_masks({"a": torch.tensor([[3.0, 1.0], [2.0, 0.5]])}, 0.5)
    assert d["a"].tolist() == [[True, False], [True, False]]


def test_magnitude_masks_keep_largest_weights():
    model = nn.Sequential(nn.Linear(2, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[0.1, -3.0], [2.0, 0.2]]))
    masks = layerwise_masks(magnitude_scores(model), 0.5)
    assert masks["0"].tolist() == [[False, True], [True, False]]


def test_snip_is_weight_times_gradient():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 3, bias=False))
    x = torch.randn(5, 4)
    # L = sum(W x) over the batch  =>  dL/dW[o, i] = sum_n x[n, i]
    scores = snip_scores(model, lambda out, _: out.sum(), x, None)
    expected = (model[0].weight.detach() * x.sum(0)[None, :]).abs()
    torch.testing.assert_close(scores["0"], expected)
    assert model[0].weight.grad is None


def test_apply_masks_keeps_pruned_weights_zero_while_training():
    torch.manual_seed(4)
    model = mlp(4, 6, 1, dtype=torch.float32)
    masks = layerwise_masks(magnitude_scores(model), 0.75)
    handle = apply_masks(model, masks)
    opt = torch.optim.Adam(model.parameters(), lr=0.1, weight_decay=5e-4)
    for _ in range(20):
        opt.zero_grad()
        model(torch.randn(8, 4)).pow(2).mean().backward()
        opt.step()
    for name, m in masks.items():
        w = dict(model.named_modules())[name].weight
        assert (w[~m] == 0).all() and (w[m] != 0).all()
    handle.remove()
    with pytest.raises(KeyError, match="not a Linear/Conv layer"):
        apply_masks(model, {"nope": torch.ones(1)})
    with pytest.raises(ValueError, match="shape"):
        apply_masks(model, {"0": torch.ones(2, 2, dtype=torch.bool)})
