"""LLMBlockPruner beyond LLaMA: Phi-3 (fused qkv and gate_up), GPT-2 (Conv1D, plain MLP) and OPT.

Every family gets the guarantees the LLaMA path has, on tiny random configs built in code: the
pruned model computes exactly what the unpruned one computes with the removed heads and channels
silenced, its config and attributes describe its weights, ``generate`` runs, and save/load is exact.
"""
import copy
import json
import warnings

import pytest
import torch
import torch_pruning as tp

transformers = pytest.importorskip("transformers")

from connect_tp import llm  # noqa: E402
from connect_tp.importance import ConnectImportance  # noqa: E402

VOCAB = 96
NO_SPECIAL = dict(pad_token_id=None, bos_token_id=None, eos_token_id=None)


def tiny(kind, layers=4, seed=0):
    torch.manual_seed(seed)
    if kind == "llama":
        config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                          num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=2,
                                          max_position_embeddings=64, **NO_SPECIAL)
        return transformers.LlamaForCausalLM(config).eval()
    if kind in ("phi3", "phi3-gqa"):
        config = transformers.Phi3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=layers, num_attention_heads=8,
                                         num_key_value_heads=8 if kind == "phi3" else 2,
                                         max_position_embeddings=64, **NO_SPECIAL)
        return transformers.Phi3ForCausalLM(config).eval()
    if kind == "gpt2":
        config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=layers, n_head=8, n_positions=64,
                                         **NO_SPECIAL)
        return transformers.GPT2LMHeadModel(config).eval()
    if kind == "opt":
        config = transformers.OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=layers,
                                        num_attention_heads=8, max_position_embeddings=64, word_embed_proj_dim=64,
                                        **NO_SPECIAL)
        return transformers.OPTForCausalLM(config).eval()
    raise ValueError(kind)


FAMILY_OF = {"llama": "llama", "phi3": "phi3", "phi3-gqa": "phi3", "gpt2": "gpt2", "opt": "opt"}
KINDS = list(FAMILY_OF)


def tokens(n=8, length=16, seed=1):
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def silence(model, report):
    """The unpruned model with the removed heads' and channels' contributions zeroed.

    A head reaches the residual stream only through its columns of the output projection, an MLP
    channel only through its column of the down projection; zeroing them must give the pruned
    model's function exactly.
    """
    family = llm.model_family(model)
    layers = llm.decoder_layers(model)
    with torch.no_grad():
        for index, entry in report.items():
            layer = layers[index]
            head_dim = llm._shape(model, family, layer)[1]
            for module, idxs in ((layer.get_submodule(family.o),
                                  [h * head_dim + j for h in entry["heads_removed"] for j in range(head_dim)]),
                                 (layer.get_submodule(family.down), entry["channel_indices"])):
                if llm._is_conv1d(module):  # weight is (in, out)
                    module.weight[idxs, :] = 0
                else:
                    module.weight[:, idxs] = 0
    return model


@pytest.mark.parametrize("kind", KINDS)
def test_pruned_family_is_exact_consistent_generates_and_reloads(kind, tmp_path):
    model = tiny(kind)
    assert llm.model_family(model).name == FAMILY_OF[kind]
    reference = copy.deepcopy(model)
    dense_shape = llm.layer_shapes(model)[0]
    calibration = tokens()
    # default layer range on a 4-layer model: layers 1 and 2 (no error, no flag to set)
    report = llm.LLMBlockPruner(model, tp.importance.GroupTaylorImportance(), 0.5).step(calibration=calibration)
    assert sorted(report) == [1, 2]

    x = tokens(2, 12, seed=5)
    with torch.no_grad():
        pruned_logits = model(input_ids=x).logits
        torch.testing.assert_close(pruned_logits, silence(reference, report)(input_ids=x).logits,
                                   rtol=1e-4, atol=1e-5)

    shapes = llm.layer_shapes(model)
    assert shapes[0] == shapes[3] == dense_shape
    for index in (1, 2):
        shape = shapes[index]
        entry = report[index]
        assert shape.num_attention_heads == dense_shape.num_attention_heads - len(entry["heads_removed"]) == 4
        assert shape.intermediate_size == dense_shape.intermediate_size - entry["channels_removed"]
        if dense_shape.num_key_value_heads != dense_shape.num_attention_heads:  # GQA: kv heads kept
            assert shape.num_key_value_heads == dense_shape.num_key_value_heads
        else:
            assert shape.num_key_value_heads == shape.num_attention_heads
        assert entry["head_ratio"] == 0.5 and entry["channel_ratio"] == 0.5
    assert model.config.connect_tp_layer_shapes == [
        {"num_attention_heads": s.num_attention_heads, "num_key_value_heads": s.num_key_value_heads,
         "intermediate_size": s.intermediate_size} for s in shapes]
    if kind == "gpt2":  # still GPT-2's own Conv1D modules, with split_size following the pruned width
        attn = model.transformer.h[1].attn
        assert type(attn.c_attn).__name__ == "Conv1D" and attn.split_size == 4 * 8
    if kind.startswith("phi3"):  # the layer sees its own head count; the model config is untouched
        assert model.model.layers[1].self_attn.config.num_attention_heads == 4
        assert model.config.num_attention_heads == 8

    prompt = torch.tensor([[1, 8, 15]])
    out = model.generate(prompt, max_new_tokens=6, do_sample=False)
    assert out.shape == (1, 9)

    path = llm.save_pruned(model, str(tmp_path / kind))
    with pytest.raises(llm.UntrustedCodeError):
        llm.load_pruned(path)  # runs the folder's modeling file only when asked
    reloaded = llm.load_pruned(path, trust_remote_code=True)
    assert isinstance(reloaded, type(model)) and llm._base_class(reloaded) is type(model)
    assert llm.layer_shapes(reloaded) == shapes
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=x).logits, pruned_logits)
    assert torch.equal(reloaded.generate(prompt, max_new_tokens=6, do_sample=False), out)
    again = llm.load_pruned(llm.save_pruned(reloaded, str(tmp_path / "again")), trust_remote_code=True)
    with torch.no_grad():  # a reloaded model saves and loads again
        assert torch.equal(again(input_ids=x).logits, pruned_logits)


@pytest.mark.parametrize("kind,head_pruning,plain", [
    ("llama", True, True), ("phi3", True, True), ("opt", False, True), ("gpt2", False, True),
    ("gpt2", True, False),  # GPT-2's config ties the head size to hidden / n_head: needs the modeling file
    ("opt", True, False),
])
def test_uniformly_pruned_model_saves_as_the_plain_architecture_when_its_config_can_say_so(
        kind, head_pruning, plain, tmp_path):
    model = tiny(kind, layers=2)
    llm.LLMBlockPruner(model, tp.importance.GroupMagnitudeImportance(p=2), 0.5, layers=[0, 1],
                       head_pruning=head_pruning).step()
    x = tokens(2, 10)
    with torch.no_grad():
        logits = model(input_ids=x).logits
    path = llm.save_pruned(model, str(tmp_path / kind))
    with open(f"{path}/config.json") as f:
        config = json.load(f)
    assert ("auto_map" in config) is not plain
    reloaded = llm.load_pruned(path, trust_remote_code=not plain)
    assert (type(reloaded) is type(model)) is plain and isinstance(reloaded, type(model))
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=x).logits, logits)
    if plain:  # the architecture's own class and config describe the pruned model
        assert transformers.AutoModelForCausalLM.from_pretrained(path).num_parameters() == model.num_parameters()


@pytest.mark.parametrize("kind", ["gpt2", "phi3"])
def test_connect_importance_scores_fused_and_conv1d_projections(kind):
    # Connectivity sees every part of a fused projection: a head silenced downstream loses its score.
    model = tiny(kind, layers=2)
    family = llm.model_family(model)
    layer = llm.decoder_layers(model)[1]
    head_dim = llm._shape(model, family, layer)[1]
    live = 5
    with torch.no_grad():
        o = layer.get_submodule(family.o)
        dead = [h * head_dim + j for h in range(8) if h != live for j in range(head_dim)]
        if llm._is_conv1d(o):
            o.weight[dead, :] = 0
        else:
            o.weight[:, dead] = 0
    imp = ConnectImportance(balance=float("inf"), example_inputs={"input_ids": tokens(1, 12)})
    report = llm.LLMBlockPruner(model, imp, 0.875, layers=[1]).step()
    assert report[1]["heads_removed"] == [h for h in range(8) if h != live]


def test_head_rounding_is_reported_and_zero_heads_warns():
    model = tiny("llama")  # 8 query heads in 2 key/value groups: 4 heads per group
    with pytest.warns(UserWarning, match=r"pruning_ratio=0.1 removes no attention head in layers \[1, 2\].*above 0.125"):
        report = llm.LLMBlockPruner(model, tp.importance.GroupMagnitudeImportance(p=2), 0.1).step()
    assert all(entry["heads_removed"] == [] and entry["head_ratio"] == 0 for entry in report.values())
    assert all(entry["channels_removed"] == 13 for entry in report.values())  # round(0.1 * 128)
    model = tiny("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 0.3 removes one head per group: no warning, 25 % reported
        pruner = llm.LLMBlockPruner(model, tp.importance.GroupMagnitudeImportance(p=2), 0.3)
        report = pruner.step()
    assert [entry["head_ratio"] for entry in report.values()] == [0.25, 0.25]
    assert pruner.last_report == report
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # head_pruning=False asked for channels only: nothing to warn about
        llm.LLMBlockPruner(tiny("llama"), tp.importance.GroupMagnitudeImportance(p=2), 0.1, head_pruning=False).step()


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_taylor_without_gradients_names_the_fix(kind):
    model = tiny(kind)
    dense = llm.layer_shapes(model)
    pruner = llm.LLMBlockPruner(model, tp.importance.GroupTaylorImportance(), 0.5)
    with pytest.raises(ValueError, match=r"needs loss gradients.*has no \.grad.*step\(calibration=.*"
                                         r"accumulate_loss_gradients"):
        pruner.step()
    assert llm.layer_shapes(model) == dense  # nothing was cut
    if kind == "gpt2":  # and GPT-2 got its Conv1D modules back
        assert type(model.transformer.h[1].attn.c_attn).__name__ == "Conv1D"
    # gradients filled beforehand (the whole-model form) reach the scores, Conv1D layout included
    llm.accumulate_loss_gradients(model, tokens(4))
    twin = copy.deepcopy(model)
    assert pruner.step()[1]["channels_removed"] == dense[1].intermediate_size // 2
    streamed = llm.LLMBlockPruner(twin, tp.importance.GroupTaylorImportance(), 0.5).step(calibration=tokens(4))
    assert streamed[1]["heads_removed"] == pruner.last_report[1]["heads_removed"]
    assert streamed[1]["channel_indices"] == pruner.last_report[1]["channel_indices"]


def test_unsupported_architecture_is_refused_at_construction_with_what_is_missing():
    model = tiny("llama", layers=2)
    del model.model.layers[1].mlp.up_proj
    with pytest.raises(TypeError) as err:
        llm.LLMBlockPruner(model, tp.importance.RandomImportance())
    message = str(err.value)
    assert "model.layers[1] has no mlp.up_proj" in message
    for family in ("LLaMA", "Phi-3", "GPT-2", "OPT"):
        assert family in message
    neox = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        **NO_SPECIAL))
    with pytest.raises(TypeError, match="GPTNeoXForCausalLM is not a supported decoder.*no model.layers"):
        llm.LLMBlockPruner(neox, tp.importance.RandomImportance())


def test_lora_targets_follow_the_family():
    pytest.importorskip("peft")
    model = tiny("gpt2", layers=2)
    llm.LLMBlockPruner(model, tp.importance.GroupMagnitudeImportance(p=1), 0.5, layers=[1]).step()
    shapes = llm.layer_shapes(model)
    tuned = llm.lora_finetune(model, tokens(8, 16), steps=2, lr=1e-3, batch_size=2)
    assert llm.layer_shapes(tuned) == shapes
    assert type(tuned.transformer.h[1].attn.c_attn).__name__ == "Conv1D"
