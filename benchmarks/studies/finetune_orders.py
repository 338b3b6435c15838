"""Two criteria compared over seeds *and* fine-tuning data orders: is their difference more than noise?

The ranking benchmark fine-tunes each pruned snapshot once, with the data order of its seed, so a
paired difference over three seeds mixes the criterion with the fine-tuning epoch's own noise.
``benchmarks/studies/finetune_noise.py --pruned-dir`` fine-tunes the same saved snapshots with more data
orders; this script pairs two methods on every (seed, order, target) they share, reading

- ``--runs S:DIR``: a ``finetune_noise`` output folder for seed S (its ``results.json``), and
- ``--ranking ROOT``: ranking results ``ROOT/seed<S>/<method>/results/<method>_<T>x.json``, whose
  one fine-tuning used data order S (the pipeline seeds it with the run's seed),

and writes the per-seed differences, their mean ± std over all pairs and over the seeds' means, and
each method's accuracy over seeds and orders.

    python -m benchmarks.studies.finetune_orders connect-k100-bngamma l1 --schedule cosine \\
        --runs 0:benchmarks/results/finetune_orders/seed0 1:benchmarks/results/finetune_orders/seed1 \\
               2:benchmarks/results/finetune_orders/seed2 --ranking benchmarks/results/ranking-cosine \\
        --out benchmarks/results/finetune_orders
"""
from __future__ import annotations

import argparse
import glob
import os
import statistics
import sys
from typing import Dict, List, Optional, Tuple

from connect_tp.pipeline.files import atomic_write, read_json
from connect_tp.pipeline.table import format_stat, mean_spread

Key = Tuple[int, int, float]  # seed, data order, target


def collect(method: str, schedule: str, runs: List[Tuple[int, str]], ranking: Optional[str]) -> Dict[Key, float]:
    """Fine-tuned accuracy of ``method`` per (seed, order, target), from both kinds of results."""
    acc: Dict[Key, float] = {}
    for seed, folder in runs:
        for r in read_json(os.path.join(folder, "results.json"))["runs"].values():
            if r["method"] == method and r["schedule"] == schedule:
                acc[(seed, r["order"], float(r["target"]))] = r["acc"]
    if ranking is not None:
        for path in glob.glob(os.path.join(ranking, "seed*", method, "results", f"{method}_*x.json")):
            r = read_json(path)
            ft = r.get("provenance", {}).get("finetune", {}).get("config", {})
            if r.get("finetuned_acc") is not None and ft.get("schedule", "step") == schedule:
                acc[(r["seed"], r["seed"], float(r["target_speed_up"]))] = r["finetuned_acc"]
    return acc


def compare(a: Dict[Key, float], b: Dict[Key, float]) -> str:
    shared = sorted(set(a) & set(b))
    lines = ["| target | pairs | A minus B per seed (each order) | mean ± std, all pairs | "
             "mean ± std of the seeds' means | A | B |", "|---|---|---|---|---|---|---|"]
    for target in sorted({k[2] for k in shared}):
        keys = [k for k in shared if k[2] == target]
        seeds = sorted({k[0] for k in keys})
        per_seed = {s: [a[k] - b[k] for k in keys if k[0] == s] for s in seeds}
        diffs = [d for s in seeds for d in per_seed[s]]
        means = [statistics.fmean(per_seed[s]) for s in seeds]
        cells = "; ".join(f"s{s}: " + ", ".join(f"{d:+.1f}" for d in per_seed[s]) for s in seeds)
        counts = ", ".join(str(len(per_seed[s])) for s in seeds)
        lines.append(f"| {target:g}x | {len(keys)} (orders per seed: {counts}) | {cells} | "
                     f"{format_stat(mean_spread(diffs), 1)} | {format_stat(mean_spread(means), 1)} | "
                     f"{format_stat(mean_spread([a[k] for k in keys]), 1)} | "
                     f"{format_stat(mean_spread([b[k] for k in keys]), 1)} |")
    return "\n".join(lines) + "\n"


def _seed_dir(text: str) -> Tuple[int, str]:
    seed, sep, folder = text.partition(":")
    if not sep or not seed.isdigit():
        raise argparse.ArgumentTypeError(f"--runs takes SEED:FOLDER, e.g. 1:out/seed1; got {text!r}")
    return int(seed), folder


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("method_a")
    p.add_argument("method_b")
    p.add_argument("--schedule", default="cosine", choices=["step", "cosine"])
    p.add_argument("--runs", nargs="*", type=_seed_dir, default=[])
    p.add_argument("--ranking", default=None, help="a ranking results root (seed<S>/<method>/results)")
    p.add_argument("--out", default=None, help="write pairs.md here too")
    args = p.parse_args(argv)
    a = collect(args.method_a, args.schedule, args.runs, args.ranking)
    b = collect(args.method_b, args.schedule, args.runs, args.ranking)
    if not set(a) & set(b):
        raise SystemExit(f"error: no (seed, order, target) has results of both {args.method_a} and {args.method_b}")
    text = (f"A = {args.method_a}, B = {args.method_b}; one fine-tuning epoch, schedule {args.schedule}.\n\n"
            + compare(a, b))
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        atomic_write(os.path.join(args.out, "pairs.md"), lambda f: f.write(text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
