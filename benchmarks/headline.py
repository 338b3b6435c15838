"""README's results table, computed from the committed ranking results (reads JSON files only, no training).

::

    python -m benchmarks.headline            # prints the Markdown table README.md shows

For the default ``ConnectImportance()``, version 0.2.0's default, connectivity alone (kappa = inf),
Taylor, L1, L2, LAMP and Torch-Pruning's random criterion it gives the test accuracy after one
fine-tuning epoch at 8x and 16x fewer MACs: the mean over seeds and the worst seed, once with the
ranking benchmark's constant learning rate (``benchmarks/results/ranking``) and once with the rate
decayed to 0 within the epoch (``benchmarks/results/ranking-cosine``), on the same base models.
The conditions line under the table (seeds, threads, cores, load, versions) is
read from the ``environment`` each result file recorded. ``tests/test_readme.py`` checks that README.md
shows exactly this output, so the table cannot drift from the files.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROTOCOL = os.path.join("benchmarks", "results", "ranking")
COSINE = os.path.join("benchmarks", "results", "ranking-cosine")
TARGETS = (8.0, 16.0)

ROWS: Tuple[Tuple[str, str], ...] = (
    ("connect-k100-bnscale", "**CoNNect, default** (κ = 100, `bn_flow=\"scale\"`)"),
    ("connect-k100-bngamma", "CoNNect, version 0.2.0's default (κ = 100, `bn_flow=\"gamma\"`)"),
    ("connect-kinf-bnscale", "CoNNect, connectivity alone (κ = ∞, `bn_flow=\"scale\"`)"),
    ("taylor", "Taylor (`GroupTaylorImportance`)"),
    ("l1", "L1 (`GroupMagnitudeImportance(p=1)`)"),
    ("l2", "L2 (`GroupMagnitudeImportance(p=2)`)"),
    ("lamp", "LAMP"),
    ("random", "random (`RandomImportance`)"),
)
"""(method name in the result files, label in README). The first row is ``ConnectImportance()``."""


def schedule(result: Dict[str, Any]) -> str:
    """The fine-tuning schedule a result records (a constant-rate result records none: ``"step"``)."""
    finetune = (result.get("provenance") or {}).get("finetune") or {}
    return (finetune.get("config") or {}).get("schedule") or "step"


def read(folder: str, expected_schedule: str) -> List[Dict[str, Any]]:
    """Every fine-tuned result at :data:`TARGETS` under ``folder`` (any depth), as recorded.

    A result of another fine-tuning schedule, or pruned with BatchNorm re-estimated inside the loop,
    belongs to another protocol and is refused, so a file copied into the wrong folder cannot move
    README's numbers.
    """
    found = []
    for path in sorted(glob.glob(os.path.join(REPO, folder, "**", "results", "*.json"), recursive=True)):
        with open(path, encoding="utf-8") as f:
            r = json.load(f)
        if r.get("target_speed_up") not in TARGETS or r.get("finetuned_acc") is None:
            continue
        if schedule(r) != expected_schedule or r.get("bn_refresh_every"):
            raise SystemExit(f"error: {os.path.relpath(path, REPO)} was fine-tuned with schedule {schedule(r)!r} "
                             f"(BatchNorm refresh every {r.get('bn_refresh_every') or 0} steps); {folder} holds "
                             f"the {expected_schedule!r} protocol without a refresh: move the file out")
        found.append(r)
    if not found:
        raise SystemExit(f"error: no fine-tuned results at {TARGETS} under {folder}; "
                         "run this from a checkout that has benchmarks/results/")
    return found


def by_seed(results: Sequence[Dict[str, Any]], method: str, target: float) -> Dict[int, float]:
    """``{seed: accuracy}``; a seed recorded twice for one method and target is refused."""
    out: Dict[int, float] = {}
    for r in results:
        if r["method"] == method and r["target_speed_up"] == target:
            if r["seed"] in out:
                raise SystemExit(f"error: {method} at {target:g}x has two results for seed {r['seed']}")
            out[r["seed"]] = float(r["finetuned_acc"])
    return out


def cell(values: Dict[int, float], seeds: Sequence[int]) -> str:
    """``"mean / worst"`` over ``seeds``; ``"not run"`` when the method lacks them all."""
    if not values:
        return "not run"
    missing = [s for s in seeds if s not in values]
    if missing:
        raise SystemExit(f"error: a row lacks seeds {missing}: the table compares methods over the same seeds")
    picked = [values[s] for s in seeds]
    return f"{statistics.fmean(picked):.1f} / {min(picked):.1f}"


def conditions(results: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """Seeds, base accuracies and the environment the result files recorded."""
    envs = [r.get("environment") or {} for r in results]

    def one(key: str) -> str:
        values = sorted({str(e.get(key)) for e in envs})
        return values[0] if len(values) == 1 else " or ".join(values)

    loads = [e["load_avg_1min"] for e in envs if e.get("load_avg_1min") is not None]
    base = {r["seed"]: r["base_acc"] for r in results}
    return {"seeds": sorted(base), "base_acc": base, "threads": one("threads"), "cpus": one("cpus"),
            "torch": one("torch"), "torch_pruning": one("torch_pruning"),
            "load": (min(loads), max(loads)) if loads else None}


def table(protocol: Optional[List[Dict[str, Any]]] = None, cosine: Optional[List[Dict[str, Any]]] = None) -> str:
    """The Markdown table and its conditions line."""
    protocol = read(PROTOCOL, "step") if protocol is None else protocol
    cosine = read(COSINE, "cosine") if cosine is None else cosine
    seeds = conditions(protocol)["seeds"]
    lines = ["| method | 8x, 1 epoch | 16x, 1 epoch | 8x, decayed-rate epoch | 16x, decayed-rate epoch |",
             "|---|---|---|---|---|"]
    for method, label in ROWS:
        cells = [cell(by_seed(results, method, t), seeds) for results in (protocol, cosine) for t in TARGETS]
        if cells[0] == "not run":
            raise SystemExit(f"error: {method} has no results under {PROTOCOL}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    c = conditions(list(protocol) + list(cosine))
    base = " / ".join(f"{c['base_acc'][s]:.2f}" for s in c["seeds"])
    load = "" if c["load"] is None else f", load average {c['load'][0]:.1f} to {c['load'][1]:.1f}"
    lines += ["", f"Test accuracy (%) on all 10k Fashion-MNIST test images, **mean / worst** over seeds "
                  f"{', '.join(map(str, c['seeds']))} (one base ResNet-20 per seed: {base} %); "
                  f"{c['threads']} thread per run on a {c['cpus']}-core CPU{load} when each result was "
                  f"written; torch {c['torch']}, `torch_pruning.__version__` {c['torch_pruning']}. "
                  "Made by `python -m benchmarks.headline`."]
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.parse_args(argv)
    sys.stdout.write(table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
