"""Sweep of CoNNect's lambda: accuracy right after pruning, for choosing ``DEFAULT_LAMBDA``.

A ResNet-20 is trained briefly on Fashion-MNIST (the offline real data), then pruned from the same
base model with ``ConnectImportance(lam)`` for each lambda along one progressive trajectory
(global pruning, pruning_ratio 1.0, linear schedule), snapshotting at each target MAC speed-up.
``lam = 0`` is Taylor importance. Accuracy is measured right after pruning, after re-estimating
the BatchNorm statistics on the calibration images (no weight changes: this removes the stale
normalization that dominates the raw number), and after one epoch of fine-tuning. Results go to ``benchmarks/results/lambda_sweep/`` (one JSON
per lambda, so an interrupted sweep resumes where it stopped) and a markdown table.

Usage:
    python -m benchmarks.studies.lambda_sweep [--lams 0 1e-3 1e-2 1e-1 1 10] [--targets 2.5 8]
"""
from __future__ import annotations

import argparse
import os

import torch

from connect_tp.data import load_datasets
from connect_tp.importance import ConnectImportance
from connect_tp.models import resnet20
from connect_tp.pruning import calibration_batches, progressive_prune, recalibrate_batchnorm
from connect_tp.training import (atomic_write, atomic_write_json, evaluate, fit, load_model_checkpoint,
                                 make_loader, read_json, save_model_checkpoint, set_seed)

OUT = os.path.join(os.path.dirname(os.path.dirname(__file__)), "results", "lambda_sweep")


def base_model(args, train_set, test_set):
    """The trained ResNet-20 every lambda starts from (trained once, then reloaded)."""
    path = os.path.join(args.work_dir, f"base_seed{args.seed}.pt")
    if os.path.exists(path):
        return load_model_checkpoint(path)[0]
    set_seed(args.seed)
    model = resnet20(num_classes=10, in_channels=1)
    fit(model, train_set, test_set, epochs=args.epochs, lr=0.1, milestones=[args.epochs // 2 + 1],
        batch_size=128, desc="base")
    save_model_checkpoint(path, model, {"model": "resnet20", "num_classes": 10, "in_channels": 1})
    return model


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lams", type=float, nargs="+", default=[0.0, 1e-2, 1e-1, 1.0, 10.0, 100.0])
    parser.add_argument("--targets", type=float, nargs="+", default=[2.5, 8.0])
    parser.add_argument("--train-subset", type=int, default=8000)
    parser.add_argument("--test-subset", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=100, help="iterative steps of the pruning schedule")
    parser.add_argument("--calibration", type=int, default=256, help="calibration images for the loss gradient")
    parser.add_argument("--finetune-epochs", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work-dir", default=os.path.join("runs", "lambda_sweep"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.makedirs(args.work_dir, exist_ok=True)

    train_set, test_set, _ = load_datasets("fashion_mnist", train_subset=args.train_subset,
                                           test_subset=args.test_subset, seed=args.seed)
    model = base_model(args, train_set, test_set)
    test_loader = make_loader(test_set, 256, train=False)
    base_acc = evaluate(model, test_loader)["acc"]
    calibration = calibration_batches(train_set.without_augmentation(), args.calibration, seed=args.seed)
    example = torch.rand(1, 1, 32, 32)

    for lam in args.lams:
        path = os.path.join(OUT, f"lam_{lam:g}_seed{args.seed}.json")
        if os.path.exists(path):
            continue
        pruned = load_model_checkpoint(os.path.join(args.work_dir, f"base_seed{args.seed}.pt"))[0]
        snapshots = progressive_prune(pruned, example, ConnectImportance(lam=lam, example_inputs=example),
                                      args.targets, calibration=calibration, iterative_steps=args.steps,
                                      desc=f"lam={lam:g}")
        row = {"lam": lam, "seed": args.seed, "base_acc": base_acc, "results": [
            {"target": s.target, "speed_up": s.speed_up, "acc": evaluate(s.model, test_loader)["acc"],
             "acc_bn_recalibrated": evaluate(recalibrate_batchnorm(s.model, calibration), test_loader)["acc"],
             "acc_finetuned": fit(s.model, train_set, test_set, epochs=args.finetune_epochs, lr=0.01,
                                  milestones=[args.finetune_epochs + 1], desc=f"finetune {s.target:g}x",
                                  seed=args.seed)["best_acc"]}
            for s in snapshots]}
        atomic_write_json(row, path)
    write_table(args)


def write_table(args):
    """Mean over every seed found in OUT, per lambda and target."""
    rows = [read_json(os.path.join(OUT, f)) for f in sorted(os.listdir(OUT)) if f.endswith(".json")]
    lams = sorted({r["lam"] for r in rows})
    seeds = sorted({r["seed"] for r in rows})
    base = sum(r["base_acc"] for r in rows if r["lam"] == lams[0]) / max(1, sum(r["lam"] == lams[0] for r in rows))

    lines = [f"Test accuracy (%) of ResNet-20 on Fashion-MNIST (base {base:.2f}%, mean of seeds "
             f"{', '.join(map(str, seeds))}) pruned with a {args.steps}-step global schedule, {args.calibration} "
             f"calibration images: right after pruning / after BatchNorm re-estimation / after "
             f"{args.finetune_epochs} fine-tuning epoch(s).", "",
             "| lambda | " + " | ".join(f"{t:g}x" for t in args.targets) + " |",
             "|---|" + "---:|" * len(args.targets)]
    for lam in lams:
        results = [res for r in rows if r["lam"] == lam for res in r["results"]]
        cells = []
        for t in args.targets:
            at = [res for res in results if res["target"] == t]
            means = [sum(res[key] for res in at) / len(at) if at else float("nan")
                     for key in ("acc", "acc_bn_recalibrated", "acc_finetuned")]
            cells.append(" / ".join(f"{m:.1f}" for m in means) if at else "-")
        lines.append(f"| {lam:g}{' (Taylor)' if lam == 0 else ''} | " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    atomic_write(os.path.join(OUT, "results.md"), lambda f: f.write(table))
    print(table)


if __name__ == "__main__":
    main()
