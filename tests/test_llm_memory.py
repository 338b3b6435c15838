"""The memory-lean paths for language models: |W| per module while it runs, and the streamed LLM step.

Each must give the same numbers as the plain path; the memory itself is measured by
``benchmarks/llm_memory.py`` (a benchmark, not a timed test).
"""
import math

import pytest
import torch
import torch.nn as nn
import torch_pruning as tp

transformers = pytest.importorskip("transformers")

from connect_tp import connectivity, llm  # noqa: E402
from connect_tp.connectivity import log_connectivity  # noqa: E402
from connect_tp.importance import ConnectImportance  # noqa: E402
from tests.test_llm import text_ids, tiny_llama  # noqa: E402


def _log_phi_and_grads(model, dtype=None):
    params = {n: p.detach().requires_grad_(True) for n, p in model.named_parameters()}
    log_phi = log_connectivity(model, {"input_ids": torch.zeros(1, 12, dtype=torch.long)}, 4, 0, params, dtype)
    return log_phi.item(), torch.autograd.grad(log_phi, list(params.values()))


def test_abs_per_module_equals_plain_autograd_and_takes_the_lean_path(monkeypatch):
    # reference: every |W| built first, plain functional_call, no hooks of ours
    model = tiny_llama(layers=3)
    lean_reads = []
    original_exit = connectivity._AbsWhileRunning.__exit__

    def spy(self, *exc):
        lean_reads.append(self.signed_read)
        return original_exit(self, *exc)

    monkeypatch.setattr(connectivity._AbsWhileRunning, "__exit__", spy)
    lazy, lazy_grads = _log_phi_and_grads(model)
    assert lean_reads == [False]  # no weight read outside its module: one lean pass, no second one
    params = {n: p.detach().requires_grad_(True) for n, p in model.named_parameters()}
    inputs = connectivity.connectivity_inputs(model, {"input_ids": torch.zeros(1, 12, dtype=torch.long)}, 4,
                                              torch.Generator().manual_seed(0))
    out = torch.func.functional_call(model.eval(), {n: p.abs() for n, p in params.items()}, kwargs=inputs)
    reference = torch.log(out.logits.double().flatten(1).sum(1).mean())
    assert lazy == pytest.approx(reference.item(), rel=1e-6)
    for a, b in zip(lazy_grads, torch.autograd.grad(reference, list(params.values()))):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9)


class _ReadsChildWeight(nn.Module):
    """A forward that uses a submodule's weight without calling the submodule (and is not fx-traceable)."""

    def __init__(self):
        super().__init__()
        self.first = nn.Linear(3, 4)
        self.second = nn.Linear(4, 2)

    def forward(self, x):
        if float(x.sum()) < -1:  # data-dependent control flow: the traced-free path
            x = -x
        return torch.relu(self.first(x)) @ self.second.weight.t()


class _CallsAndReadsEmbedding(nn.Module):
    """An embedding called as a module and its weight read again as the output projection (tied)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.mid = nn.Linear(4, 4)

    def forward(self, ids):
        if int(ids.sum()) < 0:  # not fx-traceable
            raise ValueError
        return torch.relu(self.mid(self.emb(ids))) @ self.emb.weight.t()


@pytest.mark.parametrize("make,example", [
    (_ReadsChildWeight, torch.zeros(1, 3)),
    (_CallsAndReadsEmbedding, torch.zeros(1, 3, dtype=torch.long)),
], ids=["child-never-called", "child-called-and-read"])
def test_weight_read_outside_its_module_is_still_absolute(make, example):
    torch.manual_seed(0)
    model = make()
    with torch.no_grad():
        for p in model.parameters():
            p.neg_()  # mostly negative: a signed read would change phi (or make it negative)
    params = {n: p.detach().requires_grad_(True) for n, p in model.named_parameters()}
    log_phi = log_connectivity(model, example, n_samples=4, seed=0, params=params)
    inputs = connectivity.connectivity_inputs(model, example, 4, torch.Generator().manual_seed(0))
    abs_params = {n: p.abs() for n, p in params.items()}
    reference = torch.log(torch.func.functional_call(model, abs_params, (inputs,)).double().flatten(1).sum(1).mean())
    assert log_phi.item() == pytest.approx(reference.item(), rel=1e-6)
    for a, b in zip(torch.autograd.grad(log_phi, list(params.values()), allow_unused=True),
                    torch.autograd.grad(reference, list(params.values()), allow_unused=True)):
        assert (a is None) == (b is None)  # an unused bias has no gradient either way
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9)


def test_interrupted_pass_leaves_the_model_parameters_in_place():
    class Interrupting(nn.Linear):
        def forward(self, x):
            raise KeyboardInterrupt

    model = _ReadsChildWeight()
    model.first.__class__ = Interrupting
    originals = dict(model.named_parameters())
    with pytest.raises(KeyboardInterrupt):
        log_connectivity(model, torch.zeros(1, 3), 4,
                         params={n: p.detach().requires_grad_(True) for n, p in model.named_parameters()})
    after = dict(model.named_parameters())
    assert after.keys() == originals.keys()
    assert all(after[n] is p and isinstance(after[n], nn.Parameter) for n, p in originals.items())


def _scores(model, importance, calibration, streamed, **kw):
    seen = []
    pruner = llm.LLMBlockPruner(model, importance, 0.25, layers=[1, 2])
    original = pruner._scores
    pruner._scores = lambda group: seen.append(original(group)) or seen[-1]
    if streamed:
        pruner.step(calibration=calibration, **kw)
    else:
        llm.accumulate_loss_gradients(model, calibration)
        pruner.step()
    return seen, [p.shape for p in model.parameters()]


@pytest.mark.parametrize("make", [
    lambda: ConnectImportance(balance=1.0, normalizer=None),
    lambda: ConnectImportance(lam=3.0, normalizer=None),
    lambda: ConnectImportance(balance=math.inf, normalizer=None),
    lambda: tp.importance.GroupTaylorImportance(normalizer=None),
    lambda: tp.importance.GroupMagnitudeImportance(normalizer=None),
], ids=["balance1", "lam3", "data-free", "taylor", "l2"])
@pytest.mark.parametrize("layers_per_pass", [1, 2])
def test_streamed_step_scores_like_the_whole_model_step(make, layers_per_pass):
    calibration = llm.calibration_batches(text_ids(), n_samples=4, seq_len=16)
    whole_imp, part_imp = make(), make()
    whole, whole_shapes = _scores(tiny_llama(layers=4), whole_imp, calibration, streamed=False)
    model = tiny_llama(layers=4)
    flags = [p.requires_grad for p in model.parameters()]
    part, part_shapes = _scores(model, part_imp, calibration, streamed=True, layers_per_pass=layers_per_pass)
    assert len(whole) == len(part) == 4
    for a, b in zip(whole, part):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    assert whole_shapes == part_shapes  # the same heads and channels went
    if getattr(whole_imp, "balance", None) == 1.0:
        assert part_imp.lam == pytest.approx(whole_imp.lam, rel=1e-5)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())


def test_streamed_step_holds_one_part_of_gradients_at_a_time():
    calibration = llm.calibration_batches(text_ids(), n_samples=2, seq_len=16)
    model = tiny_llama(layers=4)
    imp = ConnectImportance(balance=1.0)
    layer_params = [{id(p) for p in layer.parameters()} for layer in llm.decoder_layers(model)]
    seen = []

    def record(group):
        with_grad = {id(p) for p in model.parameters() if p.grad is not None}
        cached = set(imp._connectivity_grads)
        seen.append((with_grad, cached))
        return ConnectImportance.__call__(imp, group)

    pruner = llm.LLMBlockPruner(model, imp, 0.25, layers=[1, 3])
    pruner.importance = record
    pruner.step(calibration=calibration, layers_per_pass=1)
    for (with_grad, cached), layer in zip(seen, [1, 1, 3, 3]):
        assert with_grad and with_grad <= layer_params[layer]
    # the connectivity gradients cached for layer 3's groups are layer 3's only
    assert imp._connectivity_grads and set(imp._connectivity_grads) <= layer_params[3]


def test_streamed_step_rejects_bad_arguments():
    model = tiny_llama(layers=2)
    pruner = llm.LLMBlockPruner(model, ConnectImportance(balance=1.0), 0.25, layers=[1])
    calibration = llm.calibration_batches(text_ids(), n_samples=2, seq_len=16)
    with pytest.raises(ValueError, match="layers_per_pass"):
        pruner.step(calibration=calibration, layers_per_pass=0)
    with pytest.raises(ValueError, match="token ids"):
        pruner.step(calibration=calibration.float())


def test_streamed_step_keeps_frozen_parameters_frozen():
    calibration = llm.calibration_batches(text_ids(), n_samples=2, seq_len=16)
    scores = []
    for streamed in (False, True):
        model = tiny_llama(layers=3)
        for p in llm.decoder_layers(model)[1].mlp.up_proj.parameters():
            p.requires_grad_(False)  # no loss gradient, no connectivity gradient for it
        seen, _ = _scores(model, ConnectImportance(lam=3.0, normalizer=None), calibration, streamed=streamed)
        scores.append(seen)
    for a, b in zip(*scores):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_streamed_step_with_frozen_embeddings_and_head_resolves_the_same_lambda():
    calibration = llm.calibration_batches(text_ids(), n_samples=2, seq_len=16)
    lams = []
    for streamed in (False, True):
        model = tiny_llama(layers=3)
        for module in (model.model.embed_tokens, model.model.norm, model.lm_head):
            for p in module.parameters():
                p.requires_grad_(False)
        imp = ConnectImportance(balance=1.0)
        _scores(model, imp, calibration, streamed=streamed)
        lams.append(imp.lam)
    assert lams[1] == pytest.approx(lams[0], rel=1e-5)


def test_streamed_step_names_a_frozen_layer_it_must_score():
    model = tiny_llama(layers=3)
    for p in llm.decoder_layers(model)[1].parameters():
        p.requires_grad_(False)
    pruner = llm.LLMBlockPruner(model, ConnectImportance(lam=1.0), 0.25, layers=[1])
    with pytest.raises(ValueError, match=r"decoder layers \[1\] have no parameter"):
        pruner.step(calibration=llm.calibration_batches(text_ids(), n_samples=2, seq_len=16))
    assert all(p.grad is None for p in model.parameters())


def test_block_pruner_says_when_connect_uses_the_cnn_default_strength():
    model = tiny_llama(layers=2)
    with pytest.warns(UserWarning, match="chosen on CNNs"):
        llm.LLMBlockPruner(model, ConnectImportance(), 0.25, layers=[1])
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a strength the user chose: no warning
        llm.LLMBlockPruner(model, ConnectImportance(balance=1.0), 0.25, layers=[1])
        llm.LLMBlockPruner(model, ConnectImportance(lam=1e5), 0.25, layers=[1])
        llm.LLMBlockPruner(model, tp.importance.GroupTaylorImportance(), 0.25, layers=[1])
