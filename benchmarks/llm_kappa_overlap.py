"""Does the connectivity term change which heads and channels a language model loses?

For each parameter ratio, the model is pruned once with Taylor importance (LLM-Pruner) and once per
``--balance`` kappa with ``ConnectImportance(balance=kappa)``, all from the same calibration
gradients and the same layer range, and the removed query heads and MLP channels are compared
with Taylor's: the overlap is the share of each method's removed units that Taylor also removed
(1.0: the same choice). Held-out perplexity of every pruned model is recorded beside it.
Writes ``<out-dir>/<tag>.json`` and ``<tag>.md``.

On the tiny LLaMA of ``benchmarks.llm_tiny_lm`` (one thread, a few minutes):
    python -m benchmarks.llm_tiny_lm --text /usr/share/vim/vim90/doc/usr_*.txt --out /tmp/tiny-llama \
        --steps 300 --batch-size 8 --hidden-size 128 --intermediate-size 344 --layers 6
    python -m benchmarks.llm_kappa_overlap --model /tmp/tiny-llama --balance 0.1 1 3 10 100 inf \
        --keep-first 1 --keep-last 1 --param-ratios 0.2 0.35
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
import warnings
from typing import Dict, List

import torch
import torch_pruning as tp

from connect_tp import llm
from connect_tp.importance import ConnectImportance

RESULTS = os.path.join(os.path.dirname(__file__), "results", "llm")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="model directory written by benchmarks.llm_tiny_lm")
    p.add_argument("--calib-text", default=None, help="default: <model>/train.txt")
    p.add_argument("--eval-text", default=None, help="default: <model>/eval.txt")
    p.add_argument("--balance", nargs="+", type=float, default=[1.0, 10.0, math.inf],
                   help="kappa values of ConnectImportance ('inf': connectivity alone)")
    p.add_argument("--param-ratios", nargs="+", type=float, default=[0.2, 0.4])
    p.add_argument("--keep-first", type=int, default=None, help="default: llm.llm_pruner_layers for the depth")
    p.add_argument("--keep-last", type=int, default=None)
    p.add_argument("--n-calib", type=int, default=10)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--max-eval-windows", type=int, default=64)
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration windows")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out-dir", default=RESULTS)
    p.add_argument("--tag", default="tiny_llama_kappa_overlap")
    return p.parse_args(argv)


def removed_units(report: Dict[int, dict]) -> Dict[str, set]:
    """The removed (layer, head) and (layer, channel) pairs of a step's report."""
    return {"heads": {(i, h) for i, entry in report.items() for h in entry["heads_removed"]},
            "channels": {(i, c) for i, entry in report.items() for c in entry["channel_indices"]}}


def overlap(units: set, reference: set) -> float:
    """Share of ``units`` that ``reference`` also holds (1.0 for two empty sets)."""
    return len(units & reference) / len(units) if units else 1.0


def prune(args, method: str, balance, group_ratio: float, layers, batches, eval_ids) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    if method == "taylor":
        imp = tp.importance.GroupTaylorImportance()
    else:
        imp = ConnectImportance(balance=balance, example_inputs={"input_ids": batches[:1]})
    start = time.perf_counter()
    llm.accumulate_loss_gradients(model, batches)  # the same calibration gradients for every method
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # kappa=inf scores without the loss gradient, by design here
        report = llm.LLMBlockPruner(model, imp, group_ratio, layers=layers).step()
    seconds = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return {"method": method, "balance": balance, "lam": getattr(imp, "lam", None), "report": report,
            "seconds": seconds,
            "ppl": llm.perplexity(model, eval_ids, args.seq_len, max_windows=args.max_eval_windows)}


def markdown(rows: List[dict], dense_ppl: float) -> str:
    lines = [f"Dense held-out perplexity: {dense_ppl:.2f}", "",
             "| ratio (params) | method | lambda | heads removed | overlap with Taylor: heads | channels | ppl |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        name = "taylor" if r["method"] == "taylor" else f"connect kappa={r['balance']:g}"
        lam = "-" if r["lam"] is None else f"{r['lam']:.3g}"
        lines.append(f"| {r['param_ratio']:.0%} | {name} | {lam} | {r['n_heads']} | {r['overlap_heads']:.3f} | "
                     f"{r['overlap_channels']:.3f} | {r['ppl']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    read = lambda path: open(path, encoding="utf-8", errors="replace").read()  # noqa: E731
    calib_ids = llm.tokenize(tokenizer, read(args.calib_text or os.path.join(args.model, "train.txt")))
    eval_ids = llm.tokenize(tokenizer, read(args.eval_text or os.path.join(args.model, "eval.txt")))
    batches = llm.calibration_batches(calib_ids, args.n_calib, args.seq_len, seed=args.seed)
    dense = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    layers = llm.llm_pruner_layers(len(llm.decoder_layers(dense)), args.keep_first, args.keep_last)
    dense_ppl = llm.perplexity(dense, eval_ids, args.seq_len, max_windows=args.max_eval_windows)
    rows = []
    for param_ratio in args.param_ratios:
        group_ratio = llm.group_ratio_for_param_ratio(dense, param_ratio, layers)
        taylor = prune(args, "taylor", None, group_ratio, layers, batches, eval_ids)
        reference = removed_units(taylor["report"])
        for result in [taylor] + [prune(args, "connect", b, group_ratio, layers, batches, eval_ids)
                                  for b in args.balance]:
            units = removed_units(result["report"])
            row = {k: v for k, v in result.items() if k != "report"}
            row.update(param_ratio=param_ratio, group_ratio=group_ratio, n_heads=len(units["heads"]),
                       n_channels=len(units["channels"]),
                       overlap_heads=overlap(units["heads"], reference["heads"]),
                       overlap_channels=overlap(units["channels"], reference["channels"]),
                       heads_removed={str(i): e["heads_removed"] for i, e in result["report"].items()})
            rows.append(row)
            print(f"{param_ratio:.0%} {row['method']:7s} kappa={row['balance']} overlap heads "
                  f"{row['overlap_heads']:.3f} channels {row['overlap_channels']:.3f} ppl {row['ppl']:.2f} "
                  f"({row['seconds']:.1f}s)", flush=True)
    os.makedirs(args.out_dir, exist_ok=True)
    result = {"config": {**vars(args), "balance": [str(b) for b in args.balance]}, "layers": list(layers),
              "dense_ppl": dense_ppl, "rows": rows, "torch": torch.__version__}
    with open(os.path.join(args.out_dir, f"{args.tag}.json"), "w") as f:
        json.dump(result, f, indent=2, default=str)
    with open(os.path.join(args.out_dir, f"{args.tag}.md"), "w") as f:
        f.write(markdown(rows, dense_ppl))
    print(markdown(rows, dense_ppl))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
