"""``llm.load_pruned`` runs a folder's modeling file only when the caller opts in.

A pruned model is saved with ``modeling_connect_pruned.py`` next to its weights; loading it means
running that file. These tests edit the file so that it writes a marker file when imported, and
check that a plain ``load_pruned(path)`` does not run it, that ``trust_remote_code=True`` does
(which is what the flag means), and that an ``auto_map`` pointing to code outside the folder is
refused even with the opt-in.
"""
import json

import pytest
import torch
import torch_pruning as tp

transformers = pytest.importorskip("transformers")

from connect_tp import llm  # noqa: E402


def _tiny_llama(seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, pad_token_id=None, bos_token_id=None, eos_token_id=None)
    return transformers.LlamaForCausalLM(config).eval()


def _save_pruned_folder(folder):
    """A model with one pruned layer (so it needs its modeling file), saved to ``folder``."""
    model = _tiny_llama()
    llm.LLMBlockPruner(model, tp.importance.GroupMagnitudeImportance(p=2), pruning_ratio=0.5, layers=[1]).step()
    path = llm.save_pruned(model, str(folder))
    with open(folder / "config.json") as f:
        assert "auto_map" in json.load(f)
    return model, path


def _plant_marker(folder, marker):
    modeling = folder / "modeling_connect_pruned.py"
    modeling.write_text(f"open({str(marker)!r}, 'w').write('ran')\n" + modeling.read_text())
    return modeling


def _set_auto_map(folder, auto_map):
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = auto_map
    (folder / "config.json").write_text(json.dumps(config))


def test_edited_modeling_file_does_not_run_without_the_opt_in(tmp_path):
    folder = tmp_path / f"pruned_{tmp_path.name}"
    _save_pruned_folder(folder)
    marker = tmp_path / "pwned"
    modeling = _plant_marker(folder, marker)
    with pytest.raises(llm.UntrustedCodeError) as err:
        llm.load_pruned(str(folder))
    assert not marker.exists()
    message = str(err.value)
    assert str(modeling) in message and "trust_remote_code=True" in message
    assert "run" in message and "trust" in message and "save_pruned" in message
    with pytest.raises(llm.UntrustedCodeError):
        llm.load_pruned(str(folder), trust_remote_code=False, dtype=torch.float32)
    assert not marker.exists()


def test_opt_in_runs_the_folder_code_and_reloads_the_model(tmp_path):
    # What trust_remote_code=True means: the folder's Python file runs (here it also writes the marker).
    folder = tmp_path / f"optin_{tmp_path.name}"
    model, _ = _save_pruned_folder(folder)
    marker = tmp_path / "ran"
    _plant_marker(folder, marker)
    reloaded = llm.load_pruned(str(folder), trust_remote_code=True)
    assert marker.exists()
    assert llm.layer_shapes(reloaded) == llm.layer_shapes(model)
    x = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=x).logits, model(input_ids=x).logits)


@pytest.mark.parametrize("auto_map", [
    {"AutoModelForCausalLM": "attacker/repo--modeling_connect_pruned.ConnectPrunedForCausalLM"},
    {"AutoModelForCausalLM": "modeling_connect_pruned.ConnectPrunedForCausalLM",
     "AutoConfig": "attacker/repo--configuration.Config"},
    {"AutoModelForCausalLM": "modeling_connect_pruned.ConnectPrunedForCausalLM",
     "AutoTokenizer": ["attacker/repo--tok.Tok", None]},
], ids=["model", "config", "tokenizer-list"])
@pytest.mark.parametrize("opt_in", [False, True])
def test_auto_map_to_a_remote_repo_is_refused_even_with_the_opt_in(tmp_path, monkeypatch, auto_map, opt_in):
    folder = tmp_path / "pruned"
    _save_pruned_folder(folder)
    _set_auto_map(folder, auto_map)

    def must_not_load(*args, **kwargs):
        raise AssertionError("from_pretrained must not be reached with a remote auto_map")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", must_not_load)
    with pytest.raises(llm.UntrustedCodeError) as err:
        llm.load_pruned(str(folder), trust_remote_code=opt_in)
    message = str(err.value)
    assert "attacker/repo--" in message and "another repository" in message
    assert "even with trust_remote_code=True" in message and "save_pruned" in message


@pytest.mark.parametrize("ref", ["../outside.Cls", "missing_module.Cls", "os.system.x", 42])
def test_auto_map_to_anything_but_a_file_in_the_folder_is_refused(tmp_path, monkeypatch, ref):
    folder = tmp_path / "pruned"
    _save_pruned_folder(folder)
    _set_auto_map(folder, {"AutoModelForCausalLM": ref})
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: pytest.fail("from_pretrained must not be reached"))
    with pytest.raises(llm.UntrustedCodeError, match="save_pruned"):
        llm.load_pruned(str(folder), trust_remote_code=True)


def test_model_with_equal_layers_loads_without_the_flag(tmp_path, monkeypatch):
    model = _tiny_llama()
    path = llm.save_pruned(model, str(tmp_path / "dense"))
    assert not (tmp_path / "dense" / "modeling_connect_pruned.py").exists()
    seen = {}
    original = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    reloaded = llm.load_pruned(path, trust_remote_code=True)  # the flag is not passed on: nothing needs it
    assert seen["trust_remote_code"] is False
    x = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=x).logits, model(input_ids=x).logits)


def test_missing_config_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json.*save_pruned"):
        llm.load_pruned(str(tmp_path))
