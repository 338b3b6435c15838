"""Signal-flow connectivity: exact values, gradients, precision fallback and errors."""
import itertools
import math

import pytest
import torch
import torch.nn as nn

from connect_tp.connectivity import (
    ConnectivityError,
    connectivity_inputs,
    log_connectivity,
    log_connectivity_and_dtype,
)


def linear_chain(widths, seed=0, dtype=torch.float64):
    """A bias-free, activation-free MLP with random signed weights."""
    torch.manual_seed(seed)
    layers = [nn.Linear(a, b, bias=False) for a, b in zip(widths[:-1], widths[1:])]
    return nn.Sequential(*layers).to(dtype)


def brute_force_phi(model, x):
    """Sum over every input-output path of input value times the product of |weights| on the path."""
    weights = [m.weight.detach().abs() for m in model]
    widths = [weights[0].shape[1]] + [w.shape[0] for w in weights]
    total = 0.0
    for sample in x:
        for path in itertools.product(*[range(w) for w in widths]):
            value = float(sample[path[0]])
            for k, w in enumerate(weights):
                value *= float(w[path[k + 1], path[k]])
            total += value
    return total / x.shape[0]


@pytest.mark.parametrize("widths", [(3, 4, 2), (2, 3, 3, 2), (4, 2, 3, 2, 1)])
def test_connectivity_equals_path_enumeration(widths):
    model = linear_chain(widths, seed=len(widths))
    example = torch.zeros(1, widths[0], dtype=torch.float64)
    x = connectivity_inputs(model, example, 3, torch.Generator().manual_seed(7))
    expected = brute_force_phi(model, x)
    got = log_connectivity(model, example, n_samples=3, seed=7).exp().item()
    assert got == pytest.approx(expected, rel=1e-10)


def test_all_ones_input_gives_plain_path_sum():
    # phi = 1^T |W_K| ... |W_1| 1 when every input is one: compare against the matrix product.
    model = linear_chain((3, 5, 4, 2))
    ones = torch.ones(1, 3, dtype=torch.float64)
    product = ones
    for m in model:
        product = product @ m.weight.detach().abs().T
    phi = brute_force_phi(model, ones)
    assert phi == pytest.approx(product.sum().item(), rel=1e-12)


def test_gradient_matches_finite_differences():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).double()
    example = torch.zeros(1, 4, dtype=torch.float64)
    params = list(model.parameters())
    grads = torch.autograd.grad(log_connectivity(model, example, n_samples=5), params)
    eps = 1e-6
    for p, g in zip(params, grads):
        flat = p.data.view(-1)
        for i in range(0, flat.numel(), max(1, flat.numel() // 5)):
            old = flat[i].item()
            flat[i] = old + eps
            up = log_connectivity(model, example, n_samples=5).item()
            flat[i] = old - eps
            down = log_connectivity(model, example, n_samples=5).item()
            flat[i] = old
            assert g.view(-1)[i].item() == pytest.approx((up - down) / (2 * eps), rel=1e-5, abs=1e-8)


def test_model_state_is_untouched():
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Dropout(0.5), nn.Linear(6, 2))
    model.train()
    model[1].eval()  # a mixed-mode model: each module's own mode must come back
    before = {k: v.clone() for k, v in model.state_dict().items()}
    log_phi = log_connectivity(model, torch.rand(2, 4))
    log_phi.backward()
    assert model.training and not model[1].training and model[2].training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    # Gradients reach the real (signed) parameters through |W|.
    assert all(p.grad is not None for p in model.parameters())


def test_float32_overflow_falls_back_to_float64():
    # 60 layers of width 16 with weights ~U(0.5, 1): the path sum is ~ 8**60, beyond float32.
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(16, 16, bias=False) for _ in range(60)])
    for m in model:
        nn.init.uniform_(m.weight, 0.5, 1.0)
    example = torch.rand(1, 16)
    log_phi, dtype = log_connectivity_and_dtype(model, example)
    assert dtype == torch.float64
    assert math.isfinite(log_phi.item()) and log_phi.item() > math.log(3.4e38)
    exact = log_connectivity(model.double(), example.double()).item()
    assert log_phi.item() == pytest.approx(exact, rel=1e-12)


def test_token_inputs_are_drawn_from_vocabulary():
    model = nn.Sequential(nn.Embedding(50, 8), nn.Linear(8, 50))
    x = connectivity_inputs(model, torch.zeros(1, 12, dtype=torch.long), 16, torch.Generator().manual_seed(0))
    assert x.shape == (16, 12) and x.dtype == torch.long
    assert x.min() >= 0 and x.max() < 50 and len(x.unique()) > 25
    assert math.isfinite(log_connectivity(model, torch.zeros(1, 12, dtype=torch.long)).item())


class DictModel(nn.Module):
    """Takes keyword inputs and returns an object with .logits, like a Hugging Face model."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 4)
        self.head = nn.Linear(4, 20)

    def forward(self, input_ids, attention_mask=None):
        class Output:
            pass

        out = Output()
        out.logits = self.head(self.emb(input_ids))
        return out


def test_dict_inputs_and_logits_output():
    model = DictModel()
    example = {"input_ids": torch.zeros(1, 5, dtype=torch.long), "attention_mask": None}
    assert math.isfinite(log_connectivity(model, example, n_samples=2).item())


def test_disconnected_network_is_an_error():
    model = nn.Sequential(nn.Linear(3, 4, bias=False), nn.Linear(4, 2, bias=False))
    nn.init.zeros_(model[1].weight)
    with pytest.raises(ConnectivityError, match="disconnected"):
        log_connectivity(model, torch.rand(1, 3))


def test_infinite_weights_are_an_error():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    with torch.no_grad():
        model[0].weight[0, 0] = float("inf")
    with pytest.raises(ConnectivityError, match="not finite"):
        log_connectivity(model, torch.rand(1, 3))


def test_negative_signal_is_an_error():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    model[1].running_mean.fill_(100.0)  # eval-mode BN subtracts far more than the signal
    with pytest.raises(ConnectivityError, match="negative"):
        log_connectivity(model, torch.rand(1, 3))


def test_bad_n_samples():
    with pytest.raises(ValueError, match="n_samples"):
        log_connectivity(nn.Linear(2, 2), torch.rand(1, 2), n_samples=0)


def test_unsupported_output_is_an_error():
    class Scalar(nn.Module):
        def forward(self, x):
            return x.sum()

    with pytest.raises(TypeError, match="output"):
        log_connectivity(Scalar(), torch.rand(1, 2))
