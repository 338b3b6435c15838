"""Peak memory of one LLM scoring step: whole-model gradients against the streamed step.

    python -m benchmarks.llm_memory [--layers 8] [--hidden 512] [--dtype float32] [--threads 1]

Builds a randomly initialized LLaMA-shaped model (MLP size 2.6875x the hidden size, as
LLaMA-7B's 11008/4096), then measures, each in a fresh subprocess, the peak of live tensor memory
that scoring one step's groups adds above the model itself (the cut that follows is left out: it
allocates the pruned copies of the weights whichever way they were scored) (CPU: replayed from torch.profiler's
allocation records), for ``ConnectImportance(balance=1)`` and Taylor:

- ``whole``: :func:`connect_tp.llm.accumulate_loss_gradients` then ``LLMBlockPruner.step()``
  (every parameter's ``.grad`` and connectivity gradient alive together);
- ``streamed``: ``LLMBlockPruner.step(calibration=..., layers_per_pass=1)``.

It prints each peak as a multiple of the model's parameter bytes (what docs/engine.md projects to
LLaMA-7B) and writes ``benchmarks/results/llm_memory.json``. Memory only: no timing target.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch

RESULTS = os.path.join(os.path.dirname(__file__), "results", "llm_memory.json")
MODES = ("whole", "streamed")
IMPORTANCES = ("connect-balance1", "taylor")


def build(layers: int, hidden: int, vocab: int, dtype: torch.dtype):
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 11008 / 4096),
        num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 64), max_position_embeddings=256,
        pad_token_id=None, bos_token_id=None, eos_token_id=None)
    return transformers.LlamaForCausalLM(config).to(dtype).eval()


def measure(mode: str, importance: str, args) -> dict:
    """The peak the step adds, in bytes (run in a fresh process)."""
    import torch_pruning as tp

    from benchmarks.importance_overhead import peak_cpu_tensor_bytes
    from connect_tp import ConnectImportance, llm

    model = build(args.layers, args.hidden, args.vocab, getattr(torch, args.dtype))
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    g = torch.Generator().manual_seed(0)
    calibration = torch.randint(0, args.vocab, (args.calibration, args.seq_len), generator=g)
    imp = (ConnectImportance(balance=1.0, example_inputs={"input_ids": calibration[:1]})
           if importance == "connect-balance1" else tp.importance.GroupTaylorImportance())
    pruner = llm.LLMBlockPruner(model, imp, 0.25, layers=range(1, args.layers))
    # Scoring only: the cut itself allocates the pruned copies of the weights, whichever path scored.
    llm._prune_group = lambda group, idxs: None
    llm._sync_layer_attributes = lambda model: None

    def whole():
        llm.accumulate_loss_gradients(model, calibration)
        pruner.step()

    def streamed():
        pruner.step(calibration=calibration, layers_per_pass=1)

    peak = peak_cpu_tensor_bytes(whole if mode == "whole" else streamed)
    return {"mode": mode, "importance": importance, "peak_bytes": peak, "param_bytes": param_bytes,
            "ratio": peak / param_bytes, "lam": getattr(imp, "lam", None)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=2000)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--calibration", type=int, default=4, help="calibration sequences")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", nargs=2, metavar=("MODE", "IMPORTANCE"), help=argparse.SUPPRESS)
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(measure(args.child[0], args.child[1], args)))
        return 0
    rows = []
    passthrough = [a for a in (argv if argv is not None else sys.argv[1:]) if a not in ("--out", args.out)]
    for importance in IMPORTANCES:
        for mode in MODES:
            out = subprocess.run([sys.executable, "-m", "benchmarks.llm_memory", *passthrough,
                                  "--child", mode, importance], capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            row = rows[-1]
            print(f"{importance:17s} {mode:9s} peak {row['peak_bytes'] / 2**20:8.1f} MiB = "
                  f"{row['ratio']:.2f}x the {row['param_bytes'] / 2**20:.1f} MiB of parameters", flush=True)
    result = {"config": {k: v for k, v in vars(args).items() if k not in ("child", "out")}, "rows": rows,
              "torch": torch.__version__}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
