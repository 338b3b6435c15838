"""One-shot LLM-Pruner-style pruning of a LLaMA-family model with CoNNect and baselines (Table 2).

For each parameter ratio and method, the model is loaded afresh, the heads and MLP channels of the
selected layers are pruned (``connect_tp.llm.LLMBlockPruner``), and parameters, MACs, memory and
perplexity on each evaluation text are recorded; optionally the pruned model is LoRA-tuned and saved
so that ``from_pretrained`` reloads it. Writes ``<out-dir>/<tag>.json`` and ``<tag>.md``.

Methods: ``connect`` (ConnectImportance: Taylor of L - lam log phi_tot, one run per ``--balance``
kappa and per ``--lam``), ``taylor`` (vanilla LLM-Pruner: Taylor of L), ``l1``, ``l2`` (weight
norms), ``random``. Each connect row records the lambda it used, so a kappa can be compared with
the paper's absolute 1e5.

Offline kappa grid on the tiny LLaMA of ``benchmarks.llm_tiny_lm``:
    python -m benchmarks.llm_prune --model /tmp/tiny-llama --calib-text /tmp/tiny-llama/train.txt \
        --eval-text heldout=/tmp/tiny-llama/eval.txt --balance 0.3 1 3 10 30 100 inf --lam \
        --tag tiny_llama_kappa

Usage (LLaMA-7B on a GPU, the paper's setting):
    python -m benchmarks.llm_prune --model huggyllama/llama-7b --dtype float16 --device cuda \
        --calib-text bookcorpus.txt --eval-text wikitext2=wiki.test.raw ptb=ptb.test.txt \
        --param-ratios 0.2 0.4 --lam 1e5 --tag llama7b
"""
from __future__ import annotations

import argparse
import json
import os
import time
from typing import Dict, List

import torch
import torch_pruning as tp

from connect_tp import llm
from connect_tp.importance import ConnectImportance

METHODS = ("connect", "taylor", "l1", "l2", "random")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="local directory or hub name")
    p.add_argument("--tokenizer", default=None, help="default: --model")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--param-ratios", nargs="+", type=float, default=[0.2, 0.4],
                   help="fractions of all parameters to remove")
    p.add_argument("--calib-text", required=True, help="text file the calibration samples come from")
    p.add_argument("--eval-text", nargs="+", required=True, help="NAME=PATH of each perplexity text")
    p.add_argument("--n-calib", type=int, default=10, help="calibration samples (paper: 10)")
    p.add_argument("--seq-len", type=int, default=128, help="calibration and evaluation length (paper: 128)")
    p.add_argument("--max-eval-windows", type=int, default=None)
    p.add_argument("--lam", nargs="*", type=float, default=[1e5],
                   help="absolute CoNNect lambda(s) (paper: 1e5); give the flag alone for none")
    p.add_argument("--balance", nargs="*", type=float, default=[],
                   help="scale-free CoNNect balance(s) kappa, 'inf' for connectivity alone")
    p.add_argument("--n-samples", type=int, default=4, help="random token sequences for phi_tot")
    p.add_argument("--keep-first", type=int, default=None,
                   help="unpruned first layers (default: 3 from 7 layers on, fewer for a shallower model)")
    p.add_argument("--keep-last", type=int, default=None, help="unpruned last layers (default: 1)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(_DTYPES))
    p.add_argument("--lora-steps", type=int, default=0, help="LoRA recovery steps after pruning (0: none)")
    p.add_argument("--lora-text", default=None, help="LoRA training text (default: --calib-text)")
    p.add_argument("--lora-lr", type=float, default=1e-4)
    p.add_argument("--save-dir", default=None, help="save each pruned model under this directory")
    p.add_argument("--out-dir", default="benchmarks/results/llm")
    p.add_argument("--tag", default="llm_prune")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def _read(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def _importance(method: str, strength, n_samples: int, example: torch.Tensor):
    # Scores are ranked within one layer's group, so reduction/normalization only need to be
    # monotone; "sum" is the paper's aggregation. strength is ("lam", value) or ("balance", value).
    if method == "connect":
        return ConnectImportance(**{strength[0]: strength[1]}, n_samples=n_samples,
                                 example_inputs={"input_ids": example}, group_reduction="sum", normalizer=None)
    if method == "taylor":
        return tp.importance.GroupTaylorImportance(group_reduction="sum", normalizer=None)
    if method in ("l1", "l2"):
        return tp.importance.GroupMagnitudeImportance(p=int(method[1]), group_reduction="sum", normalizer=None)
    return tp.importance.RandomImportance()


def _measure(model, evals: Dict[str, torch.Tensor], args, device) -> dict:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    row = {"params": sum(p.numel() for p in model.parameters()),
           "param_mib": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20,
           "macs": llm.count_linear_macs(model, args.seq_len)}
    for name, ids in evals.items():
        row[f"ppl_{name}"] = llm.perplexity(model, ids, args.seq_len, max_windows=args.max_eval_windows)
    row["peak_memory"] = llm.peak_memory_mib(device)
    return row


def main(argv=None):
    args = parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), _DTYPES[args.dtype]
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    calib_ids = llm.tokenize(tokenizer, _read(args.calib_text))
    batches = llm.calibration_batches(calib_ids, args.n_calib, args.seq_len, seed=args.seed)
    evals = {}
    for spec in args.eval_text:
        name, _, path = spec.partition("=")
        if not path:
            raise SystemExit(f"--eval-text expects NAME=PATH, got {spec!r}")
        evals[name] = llm.tokenize(tokenizer, _read(path))

    def load():
        return AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(device).eval()

    model = load()
    layers = llm.llm_pruner_layers(len(llm.decoder_layers(model)), args.keep_first, args.keep_last)
    rows: List[dict] = [{"method": "dense", "param_ratio_target": 0.0, **_measure(model, evals, args, device)}]
    dense_params = rows[0]["params"]
    print(json.dumps(rows[0]), flush=True)
    strengths = [("balance", k) for k in args.balance] + [("lam", v) for v in args.lam]
    runs = [(m, st) for m in args.methods for st in (strengths if m == "connect" else [None])]
    # From the dense model: the loop below replaces `model` by pruned ones.
    group_ratios = {r: llm.group_ratio_for_param_ratio(model, r, layers) for r in args.param_ratios}
    for ratio, group_ratio in group_ratios.items():
        for method, lam in runs:
            del model
            model = load()
            torch.manual_seed(args.seed)  # the random baseline draws from the global generator
            start = time.time()
            if method in ("connect", "taylor"):
                llm.accumulate_loss_gradients(model, batches)
            imp = _importance(method, lam, args.n_samples, batches[:1])
            llm.LLMBlockPruner(model, imp, group_ratio, layers=layers).step()
            model.zero_grad(set_to_none=True)
            row = {"method": method if lam is None else f"connect({lam[0]}={lam[1]:g})", "param_ratio_target": ratio,
                   "group_ratio": group_ratio, "prune_seconds": time.time() - start}
            if lam is not None:
                row["lam_used"] = imp.lam
            row.update(_measure(model, evals, args, device))
            row["param_ratio_removed"] = 1 - row["params"] / dense_params
            if args.lora_steps > 0:
                lora_ids = llm.tokenize(tokenizer, _read(args.lora_text)) if args.lora_text else calib_ids
                lora_batches = llm.calibration_batches(lora_ids, max(64, args.n_calib), args.seq_len, seed=args.seed + 1)
                model = llm.lora_finetune(model, lora_batches, steps=args.lora_steps, lr=args.lora_lr)
                for name, ids in evals.items():
                    row[f"ppl_{name}_lora"] = llm.perplexity(model, ids, args.seq_len, max_windows=args.max_eval_windows)
            if args.save_dir:
                path = os.path.join(args.save_dir, f"{method}{'' if lam is None else f'-{lam[0]}{lam[1]:g}'}-{int(ratio * 100)}")
                llm.save_pruned(model, path, tokenizer)
                row["saved_to"] = path
            rows.append(row)
            print(json.dumps(row), flush=True)

    os.makedirs(args.out_dir, exist_ok=True)
    result = {"args": vars(args), "layers_pruned": list(layers), "rows": rows}
    with open(os.path.join(args.out_dir, f"{args.tag}.json"), "w") as f:
        json.dump(result, f, indent=2)
    ppl_cols = [k for k in rows[-1] if k.startswith("ppl_")]
    lines = ["| ratio (target) | method | params | removed | GMACs | " + " | ".join(ppl_cols) + " |",
             "|---|---|---|---|---|" + "---|" * len(ppl_cols)]
    for r in rows:
        removed = r.get("param_ratio_removed", 0.0)
        lines.append(f"| {r['param_ratio_target']:.0%} | {r['method']} | {r['params'] / 1e6:.2f}M | {removed:.1%} | "
                     f"{r['macs'] / 1e9:.3f} | " + " | ".join(f"{r.get(c, float('nan')):.2f}" for c in ppl_cols) + " |")
    with open(os.path.join(args.out_dir, f"{args.tag}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
