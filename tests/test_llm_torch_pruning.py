"""Torch-Pruning's own LLM recipe (``MetaPruner`` with ``num_heads`` and head pruning) with ConnectImportance.

What docs/llm.md says about it is checked here on a tiny LLaMA (multi-head attention) and a tiny
Qwen2 (grouped-query attention): the pruner builds once ``config.use_cache`` is off, prunes heads
and MLP channels with the hidden size kept, and the pruned model runs and generates. Compared with
``LLMBlockPruner``: the MLP groups (and, without GQA, the head groups) have the same members and the
same ConnectImportance scores, so both remove the same heads and channels; with GQA, Torch-Pruning's
attention group covers only the key/value channel width of ``q_proj``/``o_proj``, so its head scores
are not per query head.
"""
import copy
import warnings

import pytest
import torch
import torch_pruning as tp

transformers = pytest.importorskip("transformers")

from connect_tp import llm  # noqa: E402
from connect_tp.importance import ConnectImportance  # noqa: E402

VOCAB = 96


def tiny(kind, kv_heads):
    torch.manual_seed(0)
    config_cls, model_cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                             "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[kind]
    config = config_cls(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=8, num_key_value_heads=kv_heads, max_position_embeddings=64,
                        pad_token_id=None, bos_token_id=None, eos_token_id=None)
    return model_cls(config).eval()


class RecordingConnect(ConnectImportance):
    """ConnectImportance that remembers every group it scored and the scores."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.scored = []

    def __call__(self, group):
        scores = super().__call__(group)
        self.scored.append((group, scores))
        return scores


def meta_pruner(model, importance, ratio=0.5):
    """The recipe of docs/llm.md: heads and MLP channels, hidden size kept."""
    model.config.use_cache = False  # with the KV cache on, Torch-Pruning's graph search does not finish
    num_heads = {}
    for layer in model.model.layers:
        attn = layer.self_attn
        num_heads[attn.q_proj] = model.config.num_attention_heads
        num_heads[attn.k_proj] = model.config.num_key_value_heads
        num_heads[attn.v_proj] = model.config.num_key_value_heads
    # o_proj and down_proj write the residual stream: ignoring them keeps the hidden size
    ignored = [model.lm_head] + [m for layer in model.model.layers for m in (layer.self_attn.o_proj, layer.mlp.down_proj)]
    example = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Torch-Pruning: "Unwrapped parameters detected" (the RMSNorm weights)
        return tp.pruner.MetaPruner(model, example_inputs=example, importance=importance,
                                    output_transform=lambda out: out.logits, pruning_ratio=ratio,
                                    ignored_layers=ignored, num_heads=num_heads, prune_num_heads=True,
                                    prune_head_dims=False, head_pruning_ratio=ratio)


def members(group):
    return sorted((item.dep.target.name.split(" ")[0], item.dep.handler.__name__, len(item.idxs))
                  for item in group if isinstance(item.dep.target.module, torch.nn.Linear))


def ours(model, imp, index):
    names = {m: n for n, m in model.named_modules()}
    groups = llm._layer_groups(model, index, names)
    return {"heads": (groups.heads, imp(groups.heads)), "mlp": (groups.mlp, imp(groups.mlp))}


@pytest.mark.parametrize("kind,kv_heads", [("llama", 8), ("qwen2", 2)])
def test_meta_pruner_recipe_with_connect_importance(kind, kv_heads):
    model = tiny(kind, kv_heads)
    twin = copy.deepcopy(model)
    calibration = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(1))
    imp = RecordingConnect(balance=1.0, example_inputs={"input_ids": calibration[:1]})
    pruner = meta_pruner(model, imp)
    llm.accumulate_loss_gradients(model, calibration)
    reference = {i: ours(model, ConnectImportance(balance=1.0, example_inputs={"input_ids": calibration[:1]}), i)
                 for i in range(2)}
    for group in pruner.step(interactive=True):
        group.prune()

    # what the recipe prunes: half the query heads, half the MLP channels, hidden size kept
    llm.sync_layer_attributes(model)
    for shape in llm.layer_shapes(model):
        assert shape == llm.LayerShape(4, kv_heads if kv_heads != 8 else 4, 64)
    assert model.lm_head.in_features == 64
    assert model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False).shape == (1, 7)

    # the groups Torch-Pruning scored, against LLMBlockPruner's
    by_members = {tuple(members(group)): scores for group, scores in imp.scored}
    for i in range(2):
        mlp_group, mlp_scores = reference[i]["mlp"]
        assert tuple(members(mlp_group)) in by_members
        torch.testing.assert_close(by_members[tuple(members(mlp_group))], mlp_scores)
        head_group, head_scores = reference[i]["heads"]
        prefix = f"model.layers.{i}.self_attn."
        traced = next(m for m in by_members if m[0][0].startswith(prefix))
        if kv_heads == 8:  # multi-head: the same members and the same scores
            assert list(traced) == members(head_group)
            torch.testing.assert_close(by_members[traced], head_scores)
        else:  # GQA: q_proj/o_proj enter with the key/value width only (2 of 8 heads), k/v are members
            assert dict(((n, h), w) for n, h, w in traced) == {
                (prefix + "k_proj", "prune_out_channels"): 16, (prefix + "o_proj", "prune_in_channels"): 16,
                (prefix + "q_proj", "prune_out_channels"): 16, (prefix + "v_proj", "prune_out_channels"): 16}
            assert [w for _, _, w in members(head_group)] == [64, 64]  # ours: every query channel, q and o

    # LLMBlockPruner with the same importance on the twin
    llm.accumulate_loss_gradients(twin, calibration)
    llm.LLMBlockPruner(twin, ConnectImportance(balance=1.0, example_inputs={"input_ids": calibration[:1]}), 0.5,
                       layers=[0, 1]).step()
    assert llm.layer_shapes(twin) == llm.layer_shapes(model)
    for a, b in zip(model.model.layers, twin.model.layers):
        assert torch.equal(a.mlp.down_proj.weight, b.mlp.down_proj.weight)  # the same channels went
        if kv_heads == 8:
            assert torch.equal(a.self_attn.o_proj.weight, b.self_attn.o_proj.weight)  # the same heads went
