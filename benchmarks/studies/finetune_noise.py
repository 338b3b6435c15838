"""How noisy is one fine-tuning epoch, and does decaying the learning rate within it help?

The ranking benchmark fine-tunes every pruned model for one epoch at a constant learning rate and
reads the accuracy at its end. On the same trajectory L1 scored 69.4 % at 8x but 81.4 % at 16x (a
sub-network of the 8x model), which suggests that the end point of a constant-rate epoch is noisy.
This script measures that directly: it prunes the committed seed-0 base model once per method (the
ranking protocol's 400-step global loop), then fine-tunes each snapshot for one epoch with several
data orders (``--orders``), once with the constant rate (``step``) and once with a per-batch cosine
to 0 (``cosine``), and reports mean ± std over the orders.

    python -m benchmarks.studies.finetune_noise --threads 1                        # l2 at 8x and 16x, 3 orders
    python -m benchmarks.studies.finetune_noise --threads 1 --resume               # continue an interrupted run
    python -m benchmarks.studies.finetune_noise --base runs/ranking-cpu/seed1/base/base.pt --pruned-dir 'runs/ranking-cpu/seed1/{method}' \
        --methods l1 --schedules cosine --orders 1 11 21 --out OUT      # another seed's saved snapshots

Results: ``benchmarks/results/finetune_noise/{results.json,table.md}``; every finished fine-tuning
is written at once, and ``--resume`` skips those whose key is present (a new run without it refuses
to overwrite).
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from typing import Any, Dict, List, Optional

import torch

from connect_tp.data import load_datasets
from benchmarks.resumable import open_results
from connect_tp.pipeline.files import atomic_write, atomic_write_json, sha256_file
from connect_tp.pipeline.table import format_stat, mean_spread
from connect_tp.pruning import build_importance, calibration_batches, progressive_prune
from connect_tp.training import fit, load_model_checkpoint, set_seed


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", default=os.path.join("benchmarks", "results", "ranking", "seed0", "base.pt"))
    p.add_argument("--methods", nargs="+", default=["l2"])
    p.add_argument("--targets", nargs="+", type=float, default=[8.0, 16.0])
    p.add_argument("--orders", nargs="+", type=int, default=[0, 1, 2], help="fine-tuning data-order seeds")
    p.add_argument("--schedules", nargs="+", default=["step", "cosine"], choices=["step", "cosine"])
    p.add_argument("--lr", type=float, default=0.01, help="the ranking preset's fine-tuning rate")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--out", default=os.path.join("benchmarks", "results", "finetune_noise"))
    p.add_argument("--pruned-dir", default=None, metavar="FOLDER",
                   help="fine-tune the snapshots a ranking run saved, FOLDER/pruned/<method>_<target>x.pt, instead "
                        "of pruning again; '{method}' in FOLDER is replaced by each method (one folder per method)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    path, stored = open_results(args.out, args.resume, base=args.base, lr=args.lr)
    done: Dict[str, Any] = stored.get("runs", {})

    train_set, test_set, info = load_datasets("fashion_mnist", args.data_dir, False, None, None)
    plain_train, _, _ = load_datasets("fashion_mnist", args.data_dir, False, None, None, augment=False)
    example = torch.rand(1, info.in_channels, 32, 32)
    for method in args.methods:
        keys = [f"{method}/{t:g}x/{s}/order{o}" for t in args.targets for s in args.schedules for o in args.orders]
        if all(k in done for k in keys):
            continue
        if args.pruned_dir is not None:
            snaps = [_saved_snapshot(args.pruned_dir.format(method=method), method, t, args.base)
                     for t in sorted(args.targets)]
        else:
            base, _ = load_model_checkpoint(args.base)
            set_seed(0)
            start = time.time()
            snaps = progressive_prune(base, example, build_importance(method, example, seed=0), sorted(args.targets),
                                      calibration=calibration_batches(plain_train, 256, seed=0), iterative_steps=400,
                                      desc=f"prune {method}")
            print(f"{method}: pruned in {time.time() - start:.0f} s", flush=True)
        for snap in snaps:
            for schedule in args.schedules:
                for order in args.orders:
                    key = f"{method}/{snap.target:g}x/{schedule}/order{order}"
                    if key in done:
                        continue
                    model = copy.deepcopy(snap.model)
                    start = time.time()
                    acc = fit(model, train_set, test_set, epochs=1, lr=args.lr, milestones=[], seed=order,
                              schedule=schedule, desc=key, progress=False)["final_acc"]
                    done[key] = {"method": method, "target": snap.target, "speed_up": snap.speed_up,
                                 "schedule": schedule, "order": order, "acc": acc,
                                 "seconds": time.time() - start, "threads": args.threads,
                                 "load_avg_1min": os.getloadavg()[0]}
                    atomic_write_json({"base": args.base, "lr": args.lr, "runs": done}, path)
                    print(f"{key}: {acc:.2f} % ({time.time() - start:.0f} s)", flush=True)
    write_table(done, args.out)
    return 0


class _Snapshot:
    def __init__(self, model, target: float, speed_up: float):
        self.model, self.target, self.speed_up = model, target, speed_up


def _saved_snapshot(folder: str, method: str, target: float, base: str) -> _Snapshot:
    """A snapshot a ranking run saved, refused unless it was pruned from the model ``--base`` names.

    The snapshot's recorded parent decides; a snapshot saved before parents were recorded is
    judged by its run folder's ``base.pt``.
    """
    path = os.path.join(folder, "pruned", f"{method}_{target:g}x.pt")
    if not os.path.exists(path):
        raise SystemExit(f"error: {path} does not exist; --pruned-dir must name the run folder that pruned "
                         f"{method} (with '{{method}}' where the method's name goes)")
    model, checkpoint = load_model_checkpoint(path)
    parent = checkpoint.get("provenance", {}).get("parent", {}).get("sha256")
    if parent is None and os.path.exists(os.path.join(folder, "base.pt")):
        parent = sha256_file(os.path.join(folder, "base.pt"))  # older snapshots: the run folder's base model
    if parent != sha256_file(base):
        raise SystemExit(f"error: {path} was not pruned from {base} (its parent's sha256 differs); give the "
                         "--base of that run")
    return _Snapshot(model, target, float(checkpoint.get("speed_up", target)))


def write_table(done: Dict[str, Any], out: str) -> None:
    groups: Dict[tuple, List[float]] = {}
    for r in done.values():
        groups.setdefault((r["method"], r["target"], r["schedule"]), []).append(r["acc"])
    lines = ["| method | target | schedule | accuracies (orders) | mean ± std | max - min |", "|---|---|---|---|---|---|"]
    for (m, t, s), accs in sorted(groups.items()):
        lines.append(f"| {m} | {t:g}x | {s} | {', '.join(f'{a:.2f}' for a in accs)} | "
                     f"{format_stat(mean_spread(accs), digits=2)} | {max(accs) - min(accs):.2f} |")
    atomic_write(os.path.join(out, "table.md"), lambda f: f.write("\n".join(lines) + "\n"), binary=False)
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
