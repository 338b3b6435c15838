"""Signal-flow connectivity: exact values, gradients, precision fallback and errors."""
import copy
import itertools
import math

import pytest
import torch
import torch.nn as nn

from connect_tp import engine
from connect_tp.connectivity import (
    BN_FLOWS,
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


def deep_positive_mlp(depth=60, width=16, low=0.5, high=1.0, seed=0, control_flow=False):
    """Weights ~U(low, high): the path sum is ~ (width * mean)**depth, beyond float32 for 60 layers."""
    torch.manual_seed(seed)

    class Net(nn.Sequential):
        def forward(self, x):
            for m in self:
                x = m(x)
                if control_flow and bool(x.sum() < 0):  # data-dependent: torch.fx cannot trace this
                    x = -x
            return x

    model = Net(*[nn.Linear(width, width, bias=False) for _ in range(depth)])
    for m in model:
        nn.init.uniform_(m.weight, low, high)
    return model


def test_float32_overflow_is_exact_in_the_traced_pass():
    model = deep_positive_mlp()
    example = torch.rand(1, 16)
    log_phi, dtype = log_connectivity_and_dtype(model, example)
    assert dtype is None  # measured in the model's own float32, no retry
    assert math.isfinite(log_phi.item()) and log_phi.item() > math.log(3.4e38)
    exact = log_connectivity(model.double(), example.double()).item()
    assert log_phi.item() == pytest.approx(exact, rel=1e-6)


def test_untraceable_model_falls_back_to_float64():
    model = deep_positive_mlp(control_flow=True)
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


def test_disconnected_network_is_an_error_naming_the_layer():
    # units 0-1 of the first layer see no input, units 2-3 reach no output: no path is left, yet no
    # weight tensor is zero everywhere (an all-zero one is a zero-initialised layer, see below)
    model = nn.Sequential(nn.Linear(3, 4, bias=False), nn.ReLU(), nn.Linear(4, 2, bias=False))
    with torch.no_grad():
        model[0].weight[:2] = 0
        model[2].weight[:, 2:] = 0
    with pytest.raises(ConnectivityError, match=r"disconnected \(the flow is zero in every entry from '2' \(Linear\)"):
        log_connectivity(model, torch.rand(1, 3))


def test_negative_connectivity_names_the_layer():
    # bn_flow="stats" subtracts the running mean: the flow turns negative at the BatchNorm
    model = nn.Sequential(nn.Linear(3, 4, bias=False), nn.BatchNorm1d(4), nn.Linear(4, 2, bias=False)).eval()
    with torch.no_grad():
        model[1].running_mean.fill_(100.0)
    with pytest.raises(ConnectivityError, match=r"negative .*first appear at '1' \(BatchNorm1d\)"):
        log_connectivity(model, torch.rand(1, 3), bn_flow="stats")


def test_a_zero_initialised_head_is_measured_as_ones_with_a_warning():
    # torchvision's vit_b_16 starts its head at zero: phi would be 0 and every gradient undefined
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    nn.init.zeros_(model[2].weight)
    nn.init.zeros_(model[2].bias)
    with pytest.warns(engine.ConnectivityRuleWarning, match=r"zero-initialised\): '2.weight'.*all-ones"):
        log_phi = log_connectivity(model, torch.rand(1, 3), n_samples=3, seed=0)
    grads = torch.autograd.grad(log_phi, [model[0].weight])
    assert float(grads[0].abs().min()) > 0
    reference = copy.deepcopy(model)  # the rule is exactly a head of ones
    with torch.no_grad():
        reference[2].weight.fill_(1.0)
    expected = log_connectivity(reference, torch.rand(1, 3), n_samples=3, seed=0)
    assert log_phi.item() == pytest.approx(expected.item(), rel=1e-6)


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


# ------------------------------------------------------------------ inputs and outputs
def test_only_token_ids_are_random_in_dict_inputs():
    model = nn.Sequential(nn.Embedding(30, 4), nn.Linear(4, 3))
    example = {"input_ids": torch.zeros(1, 6, dtype=torch.long),
               "attention_mask": torch.tensor([[1, 1, 1, 1, 0, 0]]),
               "token_type_ids": torch.ones(1, 6, dtype=torch.long),
               "position_ids": torch.arange(6)[None] + 2,
               "flags": torch.tensor([[True, False, True, True, False, True]])}
    x = connectivity_inputs(model, example, 5, torch.Generator().manual_seed(0))
    assert x["input_ids"].shape == (5, 6) and len(x["input_ids"].unique()) > 10 and x["input_ids"].max() < 30
    assert torch.equal(x["attention_mask"], torch.ones(5, 6, dtype=torch.long))
    assert torch.equal(x["token_type_ids"], torch.zeros(5, 6, dtype=torch.long))
    assert torch.equal(x["position_ids"], (torch.arange(6) + 2).expand(5, 6))
    assert torch.equal(x["flags"], example["flags"].expand(5, 6))


def test_first_integer_tensor_of_a_tuple_is_the_token_ids():
    model = nn.Sequential(nn.Embedding(30, 4), nn.Linear(4, 3))
    x = connectivity_inputs(model, (torch.zeros(1, 6, dtype=torch.long), torch.arange(6)[None]), 3,
                            torch.Generator().manual_seed(0))
    assert len(x[0].unique()) > 5
    assert torch.equal(x[1], torch.arange(6).expand(3, 6))  # a side input keeps its value


class Uint8Images(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.conv(x.float() / 255)


def test_uint8_input_is_an_image():
    model = Uint8Images()
    x = connectivity_inputs(model, torch.zeros(1, 3, 8, 8, dtype=torch.uint8), 4, torch.Generator().manual_seed(0))
    assert x.dtype == torch.uint8 and x.shape == (4, 3, 8, 8)
    assert int(x.max()) > 200 and int(x.min()) < 50 and len(x.unique()) > 100
    log_phi = log_connectivity(model, torch.zeros(1, 3, 8, 8, dtype=torch.uint8), n_samples=4, seed=0)
    assert math.isfinite(log_phi.item())


class LossAndLogits(nn.Module):
    def __init__(self, as_tuple=False):
        super().__init__()
        self.head = nn.Linear(3, 2)
        self.as_tuple = as_tuple

    def forward(self, x):
        logits = self.head(x)
        loss = logits.pow(2).mean() - 100.0  # a 0-dim loss first, negative: must not be measured
        return (loss, logits) if self.as_tuple else {"loss": loss, "logits": logits}


@pytest.mark.parametrize("as_tuple", [False, True])
def test_a_zero_dim_loss_in_the_output_is_skipped_for_the_logits(as_tuple):
    model = LossAndLogits(as_tuple)
    got = log_connectivity(model, torch.rand(1, 3), n_samples=4, seed=0)
    expected = log_connectivity(model.head, torch.rand(1, 3), n_samples=4, seed=0)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)


class NormalizedOutput(nn.Module):
    def __init__(self, last):
        super().__init__()
        self.body = nn.Linear(4, 6)
        self.last = last

    def forward(self, x):
        h = self.body(x)
        if self.last == "softmax":
            return torch.softmax(h, -1)
        if self.last == "centre":
            return h - h.mean(-1, keepdim=True)
        return self.norm(h)


def test_centred_output_names_the_layer():
    model = NormalizedOutput("centre")
    with pytest.raises(ConnectivityError, match=r"centred.*NormalizedOutput.forward"):
        log_connectivity(model, torch.rand(1, 4))


def test_layernorm_is_measured_without_centering():
    # centering a flow >= 0 makes half of it negative (a ViT's phi went negative); the signal view
    # divides by the RMS over the normalized dimensions instead, with |gamma| and |beta|
    model = NormalizedOutput("layernorm")
    model.norm = nn.LayerNorm(6)
    with torch.no_grad():
        model.norm.weight.uniform_(-2, 2)
        model.norm.bias.uniform_(-1, 1)
    x = connectivity_inputs(model, torch.rand(1, 4), 3, torch.Generator().manual_seed(0))
    with torch.no_grad():
        h = torch.nn.functional.linear(x, model.body.weight.abs(), model.body.bias.abs())
        out = h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + model.norm.eps) * model.norm.weight.abs() \
            + model.norm.bias.abs()
    got = log_connectivity(model, torch.rand(1, 4), n_samples=3, seed=0)
    assert got.item() == pytest.approx(float(torch.log(out.double().sum(1).mean())), rel=1e-6)
    with torch.no_grad():
        centred = torch.nn.functional.layer_norm(h, (6,), model.norm.weight.abs(), model.norm.bias.abs())
    assert abs(float(torch.log(centred.double().sum(1).mean())) - got.item()) > 0.1  # the rule matters here


def test_softmax_output_is_measured_on_the_logits_with_a_warning():
    import torch_pruning as tp

    from connect_tp import ConnectImportance

    model = NormalizedOutput("softmax")
    with pytest.warns(engine.ConnectivityRuleWarning, match="output comes from the function softmax.*logits"):
        log_phi = log_connectivity(model, torch.rand(1, 4), n_samples=3, seed=0)
    assert log_phi.item() == pytest.approx(log_connectivity(model.body, torch.rand(1, 4), n_samples=3, seed=0).item(),
                                           rel=1e-6)
    model(torch.rand(3, 4)).sum().backward()
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=torch.rand(1, 4))
    group = graph.get_pruning_group(model.body, tp.prune_linear_out_channels, idxs=list(range(6)))
    imp = ConnectImportance(lam=1.0, example_inputs=torch.rand(1, 4))
    scores = imp(group)  # (the rule warned once for this model, above)
    taylor = (model.body.weight * model.body.weight.grad).abs().sum(1)
    assert not torch.allclose(scores / scores.mean(), taylor / taylor.mean(), rtol=1e-3)  # not Taylor's


def test_meta_device_is_a_clear_error():
    model = nn.Linear(3, 2).to("meta")
    with pytest.raises(ValueError, match="meta device"):
        log_connectivity(model, torch.rand(1, 3))


def tiny_bert():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16, type_vocab_size=2)
    model = transformers.BertForMaskedLM(config).eval()
    with torch.no_grad():  # at init (beta = 0) every LayerNorm output is centred and phi is noise
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.bias.fill_(1.0)
    return model


def test_tiny_bert_with_token_type_ids():
    model = tiny_bert()
    example = {"input_ids": torch.randint(0, 40, (1, 8)), "token_type_ids": torch.ones(1, 8, dtype=torch.long),
               "attention_mask": torch.ones(1, 8, dtype=torch.long)}
    log_phi = log_connectivity(model, example, n_samples=3)  # used to fail with IndexError
    assert math.isfinite(log_phi.item())
    grads = torch.autograd.grad(log_phi, [model.bert.embeddings.word_embeddings.weight])
    assert float(grads[0].abs().sum()) > 0


def test_tiny_bert_through_the_importance():
    import torch_pruning as tp

    from connect_tp import ConnectImportance

    model = tiny_bert()
    example = {"input_ids": torch.randint(0, 40, (1, 8)), "token_type_ids": torch.zeros(1, 8, dtype=torch.long)}
    model(**example).logits.sum().backward()
    imp = ConnectImportance(lam=1.0, example_inputs=example)
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    dense = model.bert.encoder.layer[0].intermediate.dense
    group = graph.get_pruning_group(dense, tp.prune_linear_out_channels, idxs=list(range(32)))
    assert torch.isfinite(imp(group)).all()


def tiny_llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=48, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                                      pad_token_id=None, bos_token_id=None, eos_token_id=None)
    return transformers.LlamaForCausalLM(config).eval()


def test_tiny_llama_attention_mask_stays_a_mask():
    model = tiny_llama()
    ids = torch.randint(0, 48, (1, 10))
    with_mask = log_connectivity(model, {"input_ids": ids, "attention_mask": torch.ones(1, 10, dtype=torch.long)},
                                 n_samples=3, seed=1)
    without = log_connectivity(model, {"input_ids": ids}, n_samples=3, seed=1)
    # an all-ones mask is no mask; a mask of random token ids (the old behaviour) was not
    assert with_mask.item() == pytest.approx(without.item(), rel=1e-6)
    with_labels = log_connectivity(model, {"input_ids": ids, "labels": ids}, n_samples=3, seed=1)
    assert with_labels.item() == pytest.approx(without.item(), rel=1e-6)  # the loss is skipped for the logits


def test_wrong_input_shape_names_the_input_and_its_shape():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    with pytest.raises(ValueError, match=r"input: shape \(4, 1, 8, 8\).*3 channels"):
        log_connectivity(model, torch.rand(1, 1, 8, 8))
    with pytest.raises(ValueError, match=r"input: shape \(4, 3, 9, 9\)"):
        log_connectivity(model, torch.rand(1, 3, 9, 9))


@pytest.mark.parametrize("bn_flow", BN_FLOWS)
def test_both_paths_treat_batchnorm_alike(bn_flow):
    # the traced engine and the traced-free functional_call path (dtype given) apply bn_flow each
    # their own way; on a network where every treatment keeps the flow positive they must agree
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 16, 3))
    with torch.no_grad():
        model[1].weight.uniform_(-2, 2)
        model[1].bias.uniform_(0.5, 1.0)
        model[1].running_mean.uniform_(-1.0, 0.0)  # negative: the "stats" shift is positive
        model[1].running_var.uniform_(0.01, 4.0)   # far from 1: "scale" differs from "gamma"
    x = torch.zeros(1, 2, 6, 6)
    traced = log_connectivity(model, x, n_samples=3, bn_flow=bn_flow)
    functional = log_connectivity(model, x, n_samples=3, bn_flow=bn_flow, dtype=torch.float64)
    assert traced.item() == pytest.approx(functional.item(), rel=1e-5)


def test_scale_divides_gamma_by_sigma():
    # "scale" is "gamma" with every BatchNorm weight divided by sqrt(running_var + eps): here one
    # BatchNorm sits in a bias-free linear chain, so every path passes it once and log phi moves by
    # exactly log(1 / sigma) when all sigmas agree
    model = nn.Sequential(nn.Linear(3, 4, bias=False), nn.BatchNorm1d(4), nn.Linear(4, 2, bias=False))
    with torch.no_grad():
        model[1].running_var.fill_(9.0 - model[1].eps)  # sigma = 3
    x = torch.zeros(1, 3)
    gamma = log_connectivity(model, x, n_samples=2, bn_flow="gamma", dtype=torch.float64)
    scale = log_connectivity(model, x, n_samples=2, bn_flow="scale", dtype=torch.float64)
    traced = log_connectivity(model, x, n_samples=2, bn_flow="scale")
    assert scale.item() == pytest.approx(gamma.item() - math.log(3.0), abs=1e-6)  # float32 running_var
    assert traced.item() == pytest.approx(scale.item(), rel=1e-6)
