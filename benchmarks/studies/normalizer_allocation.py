"""Where does global pruning cut under each group reduction and normalizer, and what is it worth?

Torch-Pruning reduces a group's per-layer channel scores (``group_reduction``) and then normalizes
the group's scores (``normalizer``) before one global ranking compares all groups. For CoNNect's
connectivity term this choice decides the allocation across layers: a layer's connectivity Taylor
scores sum to about 1 (the network is homogeneous in each layer's weights), so

- ``mean`` / ``mean`` (Torch-Pruning's default and the protocol's) ranks a channel against its own
  group's mean;
- ``mean`` / ``sum`` ranks it by its share of its group's connectivity: wide groups lose channels
  first and the widths equalize;
- ``sum`` / ``none`` ranks it by the first-order change of log phi_tot when the whole coupled channel
  goes (its shares summed over every layer it touches): residual streams, which touch many layers,
  are kept and the inner widths go first;
- any other pair Torch-Pruning accepts (``mean`` / ``max``, ``mean`` / ``none``, ...).

The script prunes a committed ranking base model with connectivity alone (``balance=inf``,
``bn_flow="gamma"``; data-free, so each trajectory takes seconds; at the default kappa = 100 the
ranking matches it, ``benchmarks/studies/blend_knobs.py``) along the ranking protocol's 400-step global loop,
and fine-tunes the 8x and 16x snapshots for one epoch with the rate decayed to 0 (the
``ranking-cosine`` fine-tuning; data order = ``--ft-seed``).

    python -m benchmarks.studies.normalizer_allocation --seeds 0 --configs mean/mean mean/sum sum/none \\
        --threads 1 --data-dir /usr/share/datasets/fashion-mnist
    python -m benchmarks.studies.normalizer_allocation --seeds 1 --configs sum/none --resume ...

Results: ``benchmarks/results/normalizer_allocation/{results.json,table.md}``, one entry per
(seed, config, target) written as it finishes; ``--resume`` skips those present (without it an
existing file is refused).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Any, Dict, List, Optional

import torch

from connect_tp.data import load_datasets
from connect_tp.importance import ConnectImportance
from benchmarks import ranking
from benchmarks.resumable import open_results
from connect_tp.pipeline.files import atomic_write, atomic_write_json
from connect_tp.pruning import layer_channels, progressive_prune
from connect_tp.training import fit, load_model_checkpoint


def stage_widths(model: torch.nn.Module) -> str:
    """ResNet-20 widths per stage, residual stream / mean inner width (the ranking table's format)."""
    return ranking.stage_widths({"channels": layer_channels(model)})


def table(runs: Dict[str, Any]) -> str:
    lines = ["| config (reduction / normalizer) | seed | target | widths per stage (residual / inner) | 1 cosine epoch |",
             "|---|---|---|---|---|"]
    for key in sorted(runs, key=lambda k: (runs[k]["config"], runs[k]["seed"], runs[k]["target"])):
        r = runs[key]
        lines.append(f"| {r['config']} | {r['seed']} | {r['target']:g}x | {r['widths']} | {r['acc']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--configs", nargs="+", default=["mean/mean", "mean/sum", "sum/none"],
                   help="REDUCTION/NORMALIZER pairs (normalizer 'none' is None)")
    p.add_argument("--targets", nargs="+", type=float, default=[8.0, 16.0])
    p.add_argument("--ft-seed", type=int, default=0, help="data order of the fine-tuning epoch")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--out", default=os.path.join("benchmarks", "results", "normalizer_allocation"))
    args = p.parse_args(argv)
    for config in args.configs:
        if config.count("/") != 1:
            p.error(f"--configs takes REDUCTION/NORMALIZER pairs such as mean/sum, got {config!r}")
    torch.set_num_threads(args.threads)
    path, stored = open_results(args.out, args.resume)
    runs: Dict[str, Any] = stored.get("runs", {})
    train_set, test_set, _ = load_datasets("fashion_mnist", args.data_dir, False, None, None)
    for seed in args.seeds:
        base = os.path.join("benchmarks", "results", "ranking", f"seed{seed}", "base.pt")
        for config in args.configs:
            keys = {t: f"seed{seed}/{config}/{t:g}x/ft{args.ft_seed}" for t in args.targets}
            if all(k in runs for k in keys.values()):
                continue
            reduction, normalizer = config.split("/")
            model = load_model_checkpoint(base)[0].eval()
            importance = ConnectImportance(balance=math.inf, bn_flow="gamma", group_reduction=reduction,
                                           normalizer=None if normalizer == "none" else normalizer)
            snaps = progressive_prune(model, torch.rand(1, 1, 32, 32), importance, args.targets, progress=False)
            for snap in snaps:
                key = keys[snap.target]
                if key in runs:
                    continue
                start = time.time()
                widths = stage_widths(snap.model)
                acc = fit(snap.model, train_set, test_set, epochs=1, lr=0.01, milestones=[], seed=args.ft_seed,
                          schedule="cosine", progress=False)["final_acc"]
                runs[key] = {"seed": seed, "config": config, "target": snap.target, "speed_up": snap.speed_up,
                             "step": snap.step, "widths": widths, "acc": acc, "ft_seed": args.ft_seed,
                             "seconds": time.time() - start, "threads": args.threads,
                             "load_avg_1min": os.getloadavg()[0], "torch": torch.__version__}
                print(f"{key}: {widths} acc {acc:.2f}", flush=True)
                atomic_write_json({"runs": runs}, path)
    text = table(runs)
    atomic_write(os.path.join(args.out, "table.md"), lambda f: f.write(text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
