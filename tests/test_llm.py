"""CoNNect pruning of tiny LLaMA models (GQA) through connect_tp.llm; needs transformers."""
import subprocess
import sys
import warnings

import pytest
import torch
import torch_pruning as tp

transformers = pytest.importorskip("transformers")

from connect_tp import llm  # noqa: E402
from connect_tp.connectivity import log_connectivity  # noqa: E402
from connect_tp.importance import ConnectImportance  # noqa: E402

VOCAB = 96


def tiny_llama(seed=0, layers=4, heads=8, kv_heads=2, hidden=64, intermediate=256):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=64,
        pad_token_id=None, bos_token_id=None, eos_token_id=None)
    return transformers.LlamaForCausalLM(config).eval()


def text_ids(n=3000, seed=1):
    # A token stream with structure (a noisy repeating pattern), so the loss gradient is not noise.
    g = torch.Generator().manual_seed(seed)
    base = torch.arange(n) * 7 % VOCAB
    noise = torch.randint(0, VOCAB, (n,), generator=g)
    return torch.where(torch.rand(n, generator=g) < 0.2, noise, base)


def n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("param_ratio", [0.2, 0.4])
def test_connect_prunes_tiny_gqa_llama_to_ratio_and_reloads(param_ratio, tmp_path):
    model = tiny_llama()
    layers = llm.llm_pruner_layers(4, keep_first=1, keep_last=0)
    dense = n_params(model)
    untouched = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("model.layers.0.")}
    group_ratio = llm.group_ratio_for_param_ratio(model, param_ratio, layers)
    batches = llm.calibration_batches(text_ids(), n_samples=10, seq_len=32)
    llm.accumulate_loss_gradients(model, batches)
    imp = ConnectImportance(lam=1.0, example_inputs={"input_ids": batches[:1]})
    llm.LLMBlockPruner(model, imp, group_ratio, layers=layers).step()

    removed = 1 - n_params(model) / dense
    assert abs(removed - param_ratio) < 0.03, removed
    assert imp.last_log_connectivity is not None
    shapes = llm.layer_shapes(model)
    assert shapes[0] == llm.LayerShape(8, 2, 256)  # kept layer
    for shape in shapes[1:]:
        assert shape.num_key_value_heads == 2 and shape.num_attention_heads % 2 == 0
        assert shape.num_attention_heads < 8 and shape.intermediate_size < 256
    for k, v in untouched.items():
        assert torch.equal(model.state_dict()[k], v)
    # The config describes the weights, layer by layer.
    for shape, stored in zip(shapes, model.config.connect_tp_layer_shapes):
        assert stored == {"num_attention_heads": shape.num_attention_heads,
                          "num_key_value_heads": shape.num_key_value_heads,
                          "intermediate_size": shape.intermediate_size}

    prompt = torch.tensor([[1, 8, 15]])
    out = model.generate(prompt, max_new_tokens=6, do_sample=False)
    assert out.shape == (1, 9)

    path = llm.save_pruned(model, str(tmp_path / "pruned"))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
    assert llm.layer_shapes(reloaded) == shapes
    x = batches[:2]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=x).logits, model(input_ids=x).logits)
    reloaded = llm.load_pruned(path, trust_remote_code=True)  # the folder was written just above
    assert torch.equal(reloaded.generate(prompt, max_new_tokens=6, do_sample=False), out)


def test_connectivity_keeps_the_head_that_carries_the_signal():
    model = tiny_llama(layers=2)
    attn = model.model.layers[1].self_attn
    hd, live = 8, 1  # head 1 shares key/value head 0 with heads 0, 2, 3
    with torch.no_grad():
        cols = torch.arange(64).view(8, hd)
        dead = torch.cat([cols[h] for h in range(8) if h != live])
        attn.o_proj.weight[:, dead] = 0          # other heads reach nothing downstream
        attn.q_proj.weight[dead] *= 20           # ... but have big weights (magnitude would keep them)
        attn.q_proj.weight[cols[live]] *= 0.05   # the live head is small in magnitude
    plan = {}
    for name, imp in (("connect", ConnectImportance(lam=1.0, example_inputs={"input_ids": torch.zeros(1, 16, dtype=torch.long)})),
                      ("l2", tp.importance.GroupMagnitudeImportance(p=2))):
        m = tiny_llama(layers=2)
        m.load_state_dict(model.state_dict())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # no loss gradient: data-free CoNNect, by design here
            plan[name] = llm.LLMBlockPruner(m, imp, 0.75, layers=[1]).step()[1]["heads_removed"]
    assert live not in plan["connect"] and len(plan["connect"]) == 6
    assert live in plan["l2"]  # the construction is not trivially solved by magnitude


def test_mlp_group_matches_torch_pruning_dependency_graph():
    model = tiny_llama(layers=2)
    ids = torch.randint(0, VOCAB, (1, 8))
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=ids,
                                                  forward_fn=lambda m, x: m(input_ids=x).logits)
    mlp = model.model.layers[1].mlp
    traced = graph.get_pruning_group(mlp.gate_proj, tp.prune_linear_out_channels, idxs=[0, 5])
    traced = {(item.dep.target.module, item.dep.handler) for item in traced
              if isinstance(item.dep.target.module, torch.nn.Linear)}
    names = {m: n for n, m in model.named_modules()}
    ours = llm._layer_groups(model, 1, names).mlp
    assert {(item.dep.target.module, item.dep.handler) for item in ours} == traced


def test_bfloat16_connectivity_is_finite_and_matches_float32():
    model = tiny_llama(layers=3)
    ids = {"input_ids": torch.zeros(1, 32, dtype=torch.long)}
    fp32 = log_connectivity(model, ids, n_samples=2).item()
    bf16 = log_connectivity(model.to(torch.bfloat16), ids, n_samples=2).item()
    assert torch.isfinite(torch.tensor(bf16))
    assert abs(bf16 - fp32) < 0.05


def test_perplexity_of_uniform_model_is_vocab_size_and_matches_loss():
    model = tiny_llama(layers=2)
    ids = text_ids(400)
    windows = ids[: 3 * 64].view(3, 64)
    with torch.no_grad():
        logits = model(input_ids=windows).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten())
    assert llm.perplexity(model, ids, seq_len=64, max_windows=3) == pytest.approx(loss.exp().item(), rel=1e-4)
    with torch.no_grad():
        model.lm_head.weight.zero_()
    assert llm.perplexity(model, ids, seq_len=64) == pytest.approx(VOCAB, rel=1e-4)


def test_layer_range_calibration_and_ratio_errors():
    assert list(llm.llm_pruner_layers(32)) == list(range(3, 31))
    # A shallow model keeps fewer layers unpruned by default, and always leaves something to prune.
    assert [list(llm.llm_pruner_layers(n)) for n in (1, 2, 3, 4, 5, 6, 7, 8)] == \
        [[0], [1], [1], [1, 2], [2, 3], [2, 3, 4], [3, 4, 5], [3, 4, 5, 6]]
    with pytest.raises(ValueError, match="leaves none.*keep_first/keep_last.*--keep-first.*layers="):
        llm.llm_pruner_layers(4, keep_first=3, keep_last=1)
    batches = llm.calibration_batches(text_ids(500), n_samples=10, seq_len=128, seed=3)
    assert batches.shape == (10, 128)
    assert torch.equal(batches, llm.calibration_batches(text_ids(500), n_samples=10, seq_len=128, seed=3))
    with pytest.raises(ValueError, match="fewer than seq_len"):
        llm.calibration_batches(text_ids(50), seq_len=128)
    model = tiny_llama()
    with pytest.raises(ValueError, match="prune more layers"):
        llm.group_ratio_for_param_ratio(model, 0.6, [3])
    with pytest.raises(TypeError, match="not a supported decoder.*LLaMA.*Phi-3.*GPT-2.*OPT"):
        llm.LLMBlockPruner(torch.nn.Linear(2, 2), tp.importance.RandomImportance())


def test_lora_recovery_keeps_pruned_shapes():
    pytest.importorskip("peft")
    model = tiny_llama(layers=2)
    llm.LLMBlockPruner(model, tp.importance.GroupMagnitudeImportance(p=1), 0.5, layers=[1]).step()
    shapes = llm.layer_shapes(model)
    batches = llm.calibration_batches(text_ids(), n_samples=8, seq_len=32)
    before = llm.perplexity(model, text_ids(), seq_len=32)
    tuned = llm.lora_finetune(model, batches, steps=30, lr=1e-2, batch_size=4)
    assert llm.layer_shapes(tuned) == shapes
    assert not any("lora" in n for n, _ in tuned.named_parameters())
    assert llm.perplexity(tuned, text_ids(), seq_len=32) < before


def test_core_and_llm_module_import_without_transformers():
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('transformers', 'peft'):\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import connect_tp, connect_tp.llm, connect_tp.importance\n"
        "assert 'transformers' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
