"""One ConnectImportance scoring step on a randomly initialized LLaMA-7B-shaped model: peak memory and time.

    python -m benchmarks.llm_7b_step --output benchmarks/results/llm_7b_step.json          # CUDA, bf16
    python -m benchmarks.llm_7b_step --tiny --device cpu --output /tmp/llm_7b_step.json    # a check on CPU

Builds ``LlamaForCausalLM(LlamaConfig())`` (the defaults are LLaMA-7B's shapes: vocabulary 32,000,
hidden size 4,096, MLP 11,008, 32 layers, 32 heads; 6.74B parameters) directly on the device in
bfloat16 with random weights: no download, no tokenizer, no internet. Then runs one
``LLMBlockPruner(model, ConnectImportance(balance=1), 0.25).step(calibration=..., layers_per_pass=1)``
on random token ids (the streamed step of docs/engine.md: ``n_samples=4`` connectivity sequences of
128 tokens, LLM-Pruner's layers 3..30), and writes beside each other:

- the measured CUDA allocator peak of the scoring part of the step (before the first weight is
  cut), of the whole step, and the model's own bytes;
- the time of the scoring, of the whole step, and of building the model;
- docs/engine.md's estimate of the streamed step's peak from the shapes (about 18.3 GB), item by item.

Needs ``torch`` with CUDA, ``transformers`` (>= 4.45; written against 5.x), ``torch_pruning`` and this
repository on the path (run from its root). ``--calibration`` sequences of ``--seq-len`` tokens feed
the loss gradient; on an H200 the default step (two passes over 33 parts for the balance) should
take well under a minute.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from typing import Any, Dict

import torch

#: The peak docs/engine.md states for the streamed step of LLaMA-7B in bfloat16.
DOCS_ESTIMATE_GB = 18.3


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output", required=True, help="JSON file to write")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--tiny", action="store_true", help="a 4-layer, hidden-64 LLaMA instead of 7B (a CPU check)")
    p.add_argument("--calibration", type=int, default=4, help="calibration sequences for the loss gradient")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=1, help="calibration sequences per forward")
    p.add_argument("--n-samples", type=int, default=4, help="random sequences of the connectivity pass")
    p.add_argument("--balance", type=float, default=1.0, help="kappa; 'inf' skips the loss gradient")
    p.add_argument("--ratio", type=float, default=0.25, help="heads and channels removed per layer")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    return p.parse_args(argv)


def llama_config(tiny: bool):
    from transformers import LlamaConfig

    special = dict(pad_token_id=None, bos_token_id=None, eos_token_id=None)
    if tiny:
        return LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=172, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256, **special)
    return LlamaConfig(**special)  # LLaMA-7B's shapes are LlamaConfig's defaults


def estimate_from_shapes(config, dtype_bytes: int = 2, n_samples: int = 4, seq_len: int = 128) -> Dict[str, Any]:
    """docs/engine.md's peak of the streamed step, item by item, in bytes (bfloat16 by default).

    Weights; the largest part's gradients (loss ``.grad`` and connectivity gradient in the model's
    dtype plus the float32 copy ConnectImportance keeps); the activations the connectivity backward
    keeps (``B * T * (10 h + 3 m + heads * T)`` elements per layer); one module's ``|W|`` (the
    largest); the logits in the model's dtype and summed in float64.
    """
    h, m, v, n = config.hidden_size, config.intermediate_size, config.vocab_size, config.num_hidden_layers
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", heads) or heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    per_layer = h * heads * head_dim * 2 + 2 * h * kv * head_dim + 3 * h * m + 2 * h
    embed = v * h * (1 if config.tie_word_embeddings else 2)
    params = n * per_layer + embed + h
    largest_part = max(embed, per_layer)
    items = {
        "weights": params * dtype_bytes,
        "largest_part_gradients": largest_part * (dtype_bytes + dtype_bytes + 4),
        "connectivity_activations": n_samples * seq_len * (10 * h + 3 * m + heads * seq_len) * n * dtype_bytes,
        "one_module_abs": max(v * h, h * m) * dtype_bytes,
        "logits": n_samples * seq_len * v * (dtype_bytes + 8),
    }
    return {"parameters": params, "items_bytes": items, "total_bytes": sum(items.values())}


def build(config, device: torch.device, dtype: torch.dtype):
    """The model with random weights, created on ``device`` in ``dtype`` (no float32 copy on the host)."""
    from transformers import LlamaForCausalLM

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            torch.manual_seed(0)
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.to(device=device, dtype=dtype).eval()


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        import torch_pruning  # noqa: F401
        import transformers
    except ImportError as err:
        raise SystemExit(f"{err}: this benchmark needs torch, transformers and torch_pruning "
                         "(pip install transformers torch-pruning), run from the repository root") from err
    from connect_tp import llm
    from connect_tp.importance import ConnectImportance

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no CUDA device; use --tiny --device cpu for a CPU check")
    dtype = getattr(torch, args.dtype)
    config = llama_config(args.tiny)
    estimate = estimate_from_shapes(config, torch.finfo(dtype).bits // 8, args.n_samples, args.seq_len)
    result: Dict[str, Any] = {
        "config": {k: v for k, v in vars(args).items()}, "estimate_from_shapes": estimate,
        "docs_engine_md_estimate_gb": None if args.tiny else DOCS_ESTIMATE_GB,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "torch_pruning": getattr(torch_pruning, "__version__", "?"), "python": platform.python_version()},
        "device_name": torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
        "status": "started",
    }

    def write() -> None:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            json.dump(result, f, indent=2)

    write()  # something to read even if the run is cut short
    start = time.perf_counter()
    model = build(config, device, dtype)
    if cuda:
        torch.cuda.synchronize(device)
    result["build_seconds"] = time.perf_counter() - start
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    result["parameters"] = sum(p.numel() for p in model.parameters())
    result["model_bytes"] = model_bytes

    g = torch.Generator().manual_seed(0)
    calibration = torch.randint(0, config.vocab_size, (args.calibration, args.seq_len), generator=g).to(device)
    imp = ConnectImportance(balance=args.balance, n_samples=args.n_samples,
                            example_inputs={"input_ids": calibration[:1]})
    pruner = llm.LLMBlockPruner(model, imp, args.ratio)  # LLM-Pruner's layers (3..30 on 32 layers)
    scoring: Dict[str, float] = {}
    cut = llm._prune_group

    def first_cut_marks_the_end_of_scoring(group, idxs):
        if not scoring:
            if cuda:
                torch.cuda.synchronize(device)
            scoring["seconds"] = time.perf_counter() - step_start
            scoring["peak_bytes"] = (torch.cuda.max_memory_allocated(device) if cuda
                                     else llm.peak_memory_mib(device)["mib"] * 2**20)
        return cut(group, idxs)

    llm._prune_group = first_cut_marks_the_end_of_scoring
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    step_start = time.perf_counter()
    try:
        report = pruner.step(calibration=calibration, layers_per_pass=1, batch_size=args.batch_size)
    finally:
        llm._prune_group = cut
    if cuda:
        torch.cuda.synchronize(device)
    step_seconds = time.perf_counter() - step_start
    peak = torch.cuda.max_memory_allocated(device) if cuda else llm.peak_memory_mib(device)["mib"] * 2**20
    with torch.no_grad():  # the pruned model still runs
        logits = model(input_ids=calibration[:1]).logits
    result.update({
        "status": "done",
        "memory_kind": "cuda_max_memory_allocated" if cuda else "process_max_rss (includes Python and libraries)",
        "scoring_peak_bytes": scoring.get("peak_bytes"), "step_peak_bytes": peak,
        "scoring_peak_gib": scoring.get("peak_bytes", 0) / 2**30, "step_peak_gib": peak / 2**30,
        "scoring_peak_gb": scoring.get("peak_bytes", 0) / 1e9, "step_peak_gb": peak / 1e9,
        "estimate_gb": estimate["total_bytes"] / 1e9,
        "scoring_seconds": scoring.get("seconds"), "step_seconds": step_seconds,
        "lambda": imp.lam, "layers_pruned": sorted(report), "pruned_parameters": sum(p.numel() for p in model.parameters()),
        "pruned_logits_finite": bool(torch.isfinite(logits.float()).all()),
    })
    write()
    print(json.dumps({k: result[k] for k in ("parameters", "build_seconds", "scoring_seconds", "step_seconds",
                                             "scoring_peak_gb", "step_peak_gb", "estimate_gb",
                                             "docs_engine_md_estimate_gb", "lambda")}, indent=2))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
