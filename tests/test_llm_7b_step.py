"""The 7B scoring-step benchmark: its shape arithmetic matches docs/engine.md, and it runs on a tiny config."""
import json

import pytest

pytest.importorskip("transformers")

from benchmarks import llm_7b_step  # noqa: E402


def test_estimate_from_the_7b_shapes_is_docs_engine_md_arithmetic():
    estimate = llm_7b_step.estimate_from_shapes(llm_7b_step.llama_config(tiny=False))
    assert estimate["parameters"] == 6_738_415_616  # docs/engine.md: LLaMA-7B's parameter count
    items = {k: round(v / 1e9, 2) for k, v in estimate["items_bytes"].items()}
    assert items["weights"] == 13.48 and items["largest_part_gradients"] == 2.10
    assert items["one_module_abs"] == 0.26 and items["logits"] == 0.16
    assert 18.0 < estimate["total_bytes"] / 1e9 < 19.0  # docs: about 18.3 GB


def test_tiny_run_on_cpu_writes_the_json(tmp_path):
    out = tmp_path / "step.json"
    assert llm_7b_step.main(["--tiny", "--device", "cpu", "--threads", "1", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["status"] == "done" and result["pruned_logits_finite"]
    assert result["layers_pruned"] == [1, 2]  # the default range of a 4-layer model
    assert result["pruned_parameters"] < result["parameters"]
    assert 0 < result["scoring_seconds"] <= result["step_seconds"]
    assert result["lambda"] > 0 and result["docs_engine_md_estimate_gb"] is None


def test_cuda_without_a_device_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(llm_7b_step.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="--tiny --device cpu"):
        llm_7b_step.main(["--output", str(tmp_path / "x.json")])
