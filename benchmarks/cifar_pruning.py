"""Pruning benchmark: accuracy at a MAC speed-up for CoNNect and the Torch-Pruning baselines.

Stages (each writes checkpoints and JSON results atomically and resumes with ``--resume``)::

    connect-tp train    --preset offline --seed 0        # base model          -> OUT/base.pt, base.json
    connect-tp prune    --preset offline --seed 0        # progressive pruning -> OUT/pruned/<method>_<x>.pt, results/<method>_<x>.json
    connect-tp finetune --preset offline --seed 0        # fine-tuning         -> OUT/finetuned/<method>_<x>.pt, updates the JSON
    connect-tp table    --runs runs/offline/seed*  --output benchmarks/results/offline   # table.md, table.json, plot.png
    connect-tp run      --preset offline --seed 0        # all four stages for one seed

``OUT`` defaults to ``runs/<preset>/seed<seed>``. ``python -m benchmarks.cifar_pruning`` is the same
command. Fine-tuning (and base training) run data-parallel when launched with
``torchrun --nproc_per_node N -m benchmarks.cifar_pruning finetune ...``; pruning runs on rank 0.

Presets:
    ``paper-resnet56``: ResNet-56 / CIFAR-10, speed-ups 2.5x and 16x (Table 1 of the paper).
    ``paper-vgg19``: VGG-19-BN / CIFAR-100, speed-ups 8x and 16x.
    ``offline``: ResNet-20 / Fashion-MNIST (10k training images), 2.5x/8x/16x, for a 2-core CPU.
    ``smoke``: the offline recipe on a few hundred images, for tests and CI.
"""
from __future__ import annotations

import argparse
import copy
import glob
import math
import os
import statistics
import sys
import time
from typing import Any, Dict, List, Optional

import torch

from connect_tp.data import load_datasets
from connect_tp.models import create_model
from connect_tp.pruning import (PRUNING_METHODS, build_importance, calibration_batches, count_macs_and_params,
                                layer_report, needs_gradients, parse_method, progressive_prune, recalibrate_batchnorm)
from connect_tp.training import (CheckpointError, DistributedContext, atomic_write, atomic_write_json, cleanup_distributed,
                                 evaluate, fit, init_distributed, load_model_checkpoint, make_loader, read_json,
                                 save_model_checkpoint, set_seed, short_finetune)

__all__ = ["PRESETS", "build_parser", "main", "stage_train", "stage_prune", "stage_finetune", "stage_table"]

_PAPER_COMMON = dict(
    train_subset=None, test_subset=None, batch_size=128,
    base_epochs=200, base_lr=0.1, base_milestones=[120, 150, 180],
    ft_epochs=100, ft_lr=0.01, ft_milestones=[60, 80], weight_decay=5e-4,
    iterative_steps=400, calibration_samples=1280, methods=["connect", "taylor", "l2"],
)

PRESETS: Dict[str, Dict[str, Any]] = {
    "paper-resnet56": dict(_PAPER_COMMON, dataset="cifar10", model="resnet56", speed_ups=[2.5, 16.0]),
    "paper-vgg19": dict(_PAPER_COMMON, dataset="cifar100", model="vgg19_bn", speed_ups=[8.0, 16.0]),
    # Sized for a 2-core CPU: about 6 minutes per seed (README, "Offline results").
    "offline": dict(
        dataset="fashion_mnist", model="resnet20", train_subset=10000, test_subset=2000, batch_size=128,
        base_epochs=4, base_lr=0.05, base_milestones=[2, 3],
        ft_epochs=1, ft_lr=0.01, ft_milestones=[], weight_decay=5e-4,
        iterative_steps=100, calibration_samples=256, speed_ups=[2.5, 8.0, 16.0],
        methods=["connect", "taylor", "l2", "random"],
    ),
    # The benchmark that ranks the criteria (README, "Which criterion"): all of Fashion-MNIST, a base
    # model above 92 %, Torch-Pruning's 400-step global loop, about 2 hours per seed on 2 CPU cores.
    "ranking": dict(
        dataset="fashion_mnist", model="resnet20", train_subset=None, test_subset=None, batch_size=128,
        base_epochs=8, base_lr=0.1, base_milestones=[4, 6],
        ft_epochs=1, ft_lr=0.01, ft_milestones=[], weight_decay=5e-4,
        iterative_steps=400, calibration_samples=256, speed_ups=[1.5, 2.0, 2.5, 8.0, 16.0],
        ft_speed_ups=[2.5, 8.0, 16.0], short_ft_steps=50,
        methods=["connect", "taylor", "l1", "l2", "lamp", "random", "uniform"],
    ),
    "smoke": dict(
        dataset="fashion_mnist", model="resnet20", train_subset=256, test_subset=128, batch_size=64,
        base_epochs=1, base_lr=0.05, base_milestones=[],
        ft_epochs=1, ft_lr=0.01, ft_milestones=[], weight_decay=5e-4,
        iterative_steps=40, calibration_samples=64, speed_ups=[2.5, 8.0, 16.0],
        methods=["connect", "taylor", "l2", "random"],
    ),
}


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The ``connect-tp`` argument parser (stages as sub-commands)."""
    parser = argparse.ArgumentParser(prog="connect-tp", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="stage", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--preset", choices=sorted(PRESETS), default="offline", help="recipe (default: offline)")
        p.add_argument("--seed", type=int, default=0, help="seed of data subsets, training and pruning")
        p.add_argument("--out", default=None, help="run folder (default: runs/<preset>/seed<seed>)")
        p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
        p.add_argument("--data-dir", default="data", help="local dataset copy (default: ./data)")
        p.add_argument("--download", action="store_true", help="download the dataset when missing")
        p.add_argument("--resume", action="store_true", help="continue from the checkpoints and results in --out")
        p.add_argument("--workers", type=int, default=0, help="data-loading processes")
        p.add_argument("--threads", type=int, default=None, help="torch CPU threads (torch.set_num_threads)")
        p.add_argument("--methods", nargs="+", type=_method, default=None,
                       help=f"pruning criteria (default: the preset's): {', '.join(PRUNING_METHODS)}, "
                            "or connect-k<kappa>[-bn<stats|gamma|identity>] / connect-lam<lambda>")
        p.add_argument("--speed-up", nargs="+", type=float, default=None, dest="speed_ups",
                       help="MAC speed-up targets (default: the preset's)")
        p.add_argument("--epochs", type=int, default=None, help="override the base-training epochs")
        p.add_argument("--ft-epochs", type=int, default=None, help="override the fine-tuning epochs")
        p.add_argument("--iterative-steps", type=int, default=None, help="override the pruning steps")
        p.add_argument("--calibration-samples", type=int, default=None, help="override the calibration set size")
        p.add_argument("--connect-lam", type=float, default=None, help="CoNNect lambda (default: library default)")
        p.add_argument("--max-pruning-ratio", type=float, default=1.0, help="most a layer may lose (default 1.0)")

    for name, help_text in (("train", "train the base model"), ("prune", "prune to the speed-up targets"),
                            ("finetune", "fine-tune every pruned model"), ("run", "train, prune, finetune and table")):
        common(sub.add_parser(name, help=help_text))
    table = sub.add_parser("table", help="markdown table and plot from result folders")
    table.add_argument("--runs", nargs="+", required=True, help="run folders (e.g. runs/offline/seed*)")
    table.add_argument("--output", required=True, help="folder for table.md, table.json and plot.png")
    return parser


def _method(name: str) -> str:
    try:
        parse_method(name)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return name


def run_environment() -> Dict[str, Any]:
    """What a timing or a result depends on besides the config: versions, threads, machine load."""
    import platform

    import torch_pruning

    return {"torch": torch.__version__, "torch_pruning": torch_pruning.__version__,
            "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "machine": platform.machine(),
            "load_avg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}


def resolve_config(args: argparse.Namespace) -> Dict[str, Any]:
    """The preset with the command-line overrides applied."""
    cfg = dict(PRESETS[args.preset], preset=args.preset, seed=args.seed, device=args.device)
    for key, value in (("methods", args.methods), ("speed_ups", args.speed_ups), ("base_epochs", args.epochs),
                       ("ft_epochs", args.ft_epochs), ("iterative_steps", args.iterative_steps),
                       ("calibration_samples", args.calibration_samples)):
        if value is not None:
            cfg[key] = value
    cfg["speed_ups"] = sorted(float(s) for s in cfg["speed_ups"])
    cfg["ft_speed_ups"] = sorted(float(s) for s in cfg.get("ft_speed_ups") or cfg["speed_ups"]
                                 if float(s) in cfg["speed_ups"])
    cfg.setdefault("short_ft_steps", 0)
    if any(s <= 1.0 for s in cfg["speed_ups"]):
        raise SystemExit(f"error: --speed-up values must be > 1, got {cfg['speed_ups']}")
    cfg["base_milestones"] = [m for m in cfg["base_milestones"] if m < cfg["base_epochs"]]
    cfg["ft_milestones"] = [m for m in cfg["ft_milestones"] if m < cfg["ft_epochs"]]
    cfg["connect_lam"] = args.connect_lam
    cfg["max_pruning_ratio"] = args.max_pruning_ratio
    cfg["out"] = args.out or os.path.join("runs", args.preset, f"seed{args.seed}")
    return cfg


def _tag(method: str, speed_up: float) -> str:
    return f"{method}_{speed_up:g}x"


def _paths(cfg: Dict[str, Any], method: Optional[str] = None, speed_up: Optional[float] = None) -> Dict[str, str]:
    out = cfg["out"]
    paths = {"base_ckpt": os.path.join(out, "base.pt"), "base_json": os.path.join(out, "base.json")}
    if method is not None:
        tag = _tag(method, speed_up)
        paths.update(pruned=os.path.join(out, "pruned", tag + ".pt"), result=os.path.join(out, "results", tag + ".json"),
                     finetune_ckpt=os.path.join(out, "finetuned", tag + ".pt"))
    return paths


class _Context:
    """Datasets and process information shared by the stages of one invocation."""

    def __init__(self, cfg: Dict[str, Any], args: argparse.Namespace, dist_ctx: DistributedContext):
        self.cfg, self.args, self.dist = cfg, args, dist_ctx
        self.train_set, self.test_set, self.info = load_datasets(
            cfg["dataset"], args.data_dir, args.download, cfg["train_subset"], cfg["test_subset"], seed=cfg["seed"])
        self.arch = {"model": cfg["model"], "num_classes": self.info.num_classes, "in_channels": self.info.in_channels}
        self.example_inputs = torch.rand(1, self.info.in_channels, 32, 32)

    def test_loader(self):
        return make_loader(self.test_set, self.cfg["batch_size"] * 2, False, self.dist, num_workers=self.args.workers)

    def calibration(self):
        return calibration_batches(self.train_set.without_augmentation(), self.cfg["calibration_samples"],
                                   self.cfg["batch_size"], seed=self.cfg["seed"])

    def log(self, message: str) -> None:
        if self.dist.is_main:
            print(message, flush=True)


# ---------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------
def stage_train(ctx: _Context) -> Dict[str, Any]:
    """Train the base model; skipped when ``--resume`` finds a finished ``base.json``."""
    cfg, paths = ctx.cfg, _paths(ctx.cfg)
    if ctx.args.resume and os.path.isfile(paths["base_json"]):
        result = read_json(paths["base_json"])
        if result.get("epochs") == cfg["base_epochs"]:
            ctx.log(f"train: {paths['base_json']} exists (acc {result['acc']:.2f}), skipped")
            return result
    set_seed(cfg["seed"])
    model = create_model(cfg["model"], ctx.info.num_classes, ctx.info.in_channels)
    start = time.time()
    out = fit(model, ctx.train_set, ctx.test_set, epochs=cfg["base_epochs"], lr=cfg["base_lr"],
              milestones=cfg["base_milestones"], weight_decay=cfg["weight_decay"], batch_size=cfg["batch_size"],
              device=cfg["device"], checkpoint_path=paths["base_ckpt"], resume=ctx.args.resume, seed=cfg["seed"],
              ctx=ctx.dist, num_workers=ctx.args.workers, desc="train", arch=ctx.arch)
    macs, params = count_macs_and_params(model.cpu(), ctx.example_inputs)
    result = {"preset": cfg["preset"], "seed": cfg["seed"], "dataset": cfg["dataset"], "model": cfg["model"],
              "epochs": cfg["base_epochs"], "acc": out["best_acc"], "final_acc": out["final_acc"],
              "macs": macs, "params": params, "seconds": time.time() - start, "history": out["history"]}
    if ctx.dist.is_main:
        atomic_write_json(result, paths["base_json"])
    ctx.log(f"train: base accuracy {out['best_acc']:.2f}% ({macs / 1e6:.1f} M MACs)")
    return result


def _load_base(ctx: _Context):
    paths = _paths(ctx.cfg)
    model, checkpoint = load_model_checkpoint(paths["base_ckpt"])
    model.load_state_dict(checkpoint["best_state_dict"])  # the best epoch is the base model
    return model, read_json(paths["base_json"])


def stage_prune(ctx: _Context) -> List[Dict[str, Any]]:
    """Prune the base model with every method to every target; one trajectory per method."""
    cfg = ctx.cfg
    results = []
    if ctx.dist.is_main:
        base_model, base = _load_base(ctx)
        calibration = ctx.calibration()
        for method in cfg["methods"]:
            results += _prune_method(ctx, method, base_model, base, calibration)
    ctx.dist.barrier()
    return results


def _prune_method(ctx: _Context, method: str, base_model, base: Dict[str, Any], calibration) -> List[Dict[str, Any]]:
    cfg, device = ctx.cfg, ctx.cfg["device"]
    todo = [s for s in cfg["speed_ups"]
            if not (ctx.args.resume and os.path.isfile(_paths(cfg, method, s)["result"])
                    and os.path.isfile(_paths(cfg, method, s)["pruned"]))]
    if not todo:
        ctx.log(f"prune {method}: all targets done, skipped")
        return [read_json(_paths(cfg, method, s)["result"]) for s in cfg["speed_ups"]]
    model = copy.deepcopy(base_model).to(device)
    set_seed(cfg["seed"])  # random importance draws from the global generator
    importance = build_importance(method, ctx.example_inputs.to(device), cfg["connect_lam"], seed=cfg["seed"])
    test_loader = ctx.test_loader()
    results: List[Dict[str, Any]] = []
    start = time.time()

    def on_target(snap) -> None:
        paths = _paths(cfg, method, snap.target)
        if snap.target not in todo:
            results.append(read_json(paths["result"]))
            return
        pruned = snap.model.to(device)
        acc = evaluate(pruned, test_loader, device)["acc"]
        acc_recal = evaluate(recalibrate_batchnorm(pruned, calibration, device), test_loader, device)["acc"]
        report = layer_report(pruned.cpu(), ctx.example_inputs)
        result = {
            "preset": cfg["preset"], "seed": cfg["seed"], "dataset": cfg["dataset"], "model": cfg["model"],
            "method": method, "target_speed_up": snap.target, "speed_up": snap.speed_up, "step": snap.step,
            "iterative_steps": cfg["iterative_steps"], "max_pruning_ratio": cfg["max_pruning_ratio"],
            "macs": snap.macs, "params": snap.params, "base_macs": base["macs"], "base_params": base["params"],
            "base_acc": base["acc"], "pruned_acc": acc, "pruned_acc_bn_recalibrated": acc_recal,
            "finetuned_acc": None, "prune_seconds": time.time() - start,
            "channels": report["channels"], "collapsed_layers": report["collapsed_layers"],
            "dead_channels": report["dead_channels"], "network_disconnected": report["network_disconnected"],
            "signal_flow": report["signal_flow"],
        }
        if parse_method(method)[0] == "connect":
            # The lambda actually used (a balance resolves to one at the first step) and the options.
            result.update(connect_lam=importance.lam, connect_balance=importance.balance,
                          bn_flow=importance.bn_flow)
        result["environment"] = run_environment()
        save_model_checkpoint(paths["pruned"], pruned.cpu(), ctx.arch, speed_up=snap.speed_up)
        atomic_write_json(result, paths["result"])
        results.append(result)
        flag = " LAYER COLLAPSE" if report["collapsed_layers"] else ""
        ctx.log(f"prune {method}: {snap.speed_up:.2f}x, {snap.params / 1e3:.1f}k params, acc {acc:.2f}% "
                f"(BN recalibrated {acc_recal:.2f}%){flag}")

    progressive_prune(model, ctx.example_inputs, importance, cfg["speed_ups"],
                      calibration=calibration if needs_gradients(method) else None,
                      iterative_steps=cfg["iterative_steps"], max_pruning_ratio=cfg["max_pruning_ratio"],
                      device=device, on_target=on_target, desc=f"prune {method}")
    return results


def stage_finetune(ctx: _Context) -> List[Dict[str, Any]]:
    """Fine-tune every pruned model; the best test accuracy is recorded as ``finetuned_acc``."""
    cfg = ctx.cfg
    results = []
    for method in cfg["methods"]:
        for speed_up in cfg["ft_speed_ups"]:
            paths = _paths(cfg, method, speed_up)
            result = read_json(paths["result"])
            if cfg["short_ft_steps"] and result.get("short_finetune_steps") != cfg["short_ft_steps"]:
                # A short fixed budget beside the full one: it repairs less, so it separates criteria more.
                model, _ = load_model_checkpoint(paths["pruned"])
                short = short_finetune(model, ctx.train_set, steps=cfg["short_ft_steps"], lr=cfg["ft_lr"],
                                       weight_decay=cfg["weight_decay"], batch_size=cfg["batch_size"],
                                       device=cfg["device"], seed=cfg["seed"])
                result.update(short_finetuned_acc=evaluate(short, ctx.test_loader(), cfg["device"])["acc"],
                              short_finetune_steps=cfg["short_ft_steps"])
                if ctx.dist.is_main:
                    atomic_write_json(result, paths["result"])
                ctx.log(f"finetune {_tag(method, speed_up)}: {cfg['short_ft_steps']} steps -> "
                        f"{result['short_finetuned_acc']:.2f}%")
            if ctx.args.resume and result.get("finetuned_acc") is not None \
                    and result.get("finetune_epochs") == cfg["ft_epochs"]:
                ctx.log(f"finetune {_tag(method, speed_up)}: done ({result['finetuned_acc']:.2f}%), skipped")
                results.append(result)
                continue
            model, _ = load_model_checkpoint(paths["pruned"])
            start = time.time()
            out = fit(model, ctx.train_set, ctx.test_set, epochs=cfg["ft_epochs"], lr=cfg["ft_lr"],
                      milestones=cfg["ft_milestones"], weight_decay=cfg["weight_decay"],
                      batch_size=cfg["batch_size"], device=cfg["device"], checkpoint_path=paths["finetune_ckpt"],
                      resume=ctx.args.resume, seed=cfg["seed"], ctx=ctx.dist, num_workers=ctx.args.workers,
                      desc=f"finetune {_tag(method, speed_up)}", arch=ctx.arch)
            result.update(finetuned_acc=out["best_acc"], finetune_epochs=cfg["ft_epochs"],
                          finetune_seconds=time.time() - start, finetune_history=out["history"],
                          finetune_world_size=ctx.dist.world_size)
            if ctx.dist.is_main:
                atomic_write_json(result, paths["result"])
            ctx.dist.barrier()
            ctx.log(f"finetune {_tag(method, speed_up)}: {result['pruned_acc']:.2f}% -> {out['best_acc']:.2f}%")
            results.append(result)
    return results


def _mean_spread(values: List[float]) -> Dict[str, float]:
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def _fmt(stat: Dict[str, float], digits: int = 2) -> str:
    if stat["n"] == 0 or math.isnan(stat["mean"]):
        return "–"
    return f"{stat['mean']:.{digits}f}" + (f" ± {stat['std']:.{digits}f}" if stat["n"] > 1 else "")


def stage_table(run_dirs: List[str], output: str) -> Dict[str, Any]:
    """Aggregate the results of one or more run folders (seeds) into a table and a plot.

    Writes ``table.md`` (mean ± sample standard deviation over seeds), ``table.json`` (the same
    numbers and every per-seed result) and ``plot.png`` (accuracy against speed-up, one line per
    method; solid after fine-tuning, dashed right after pruning) to ``output``.
    """
    files = sorted(f for d in run_dirs for f in glob.glob(os.path.join(d, "results", "*.json")))
    if not files:
        raise CheckpointError(f"no result files under {[os.path.join(d, 'results') for d in run_dirs]}; "
                              f"run the prune stage first")
    results = [read_json(f) for f in files]
    bases = [read_json(os.path.join(d, "base.json")) for d in run_dirs if os.path.isfile(os.path.join(d, "base.json"))]
    groups: Dict[tuple, List[Dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["method"], r["target_speed_up"]), []).append(r)
    rows = []
    for (method, target), rs in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        rows.append({
            "method": method, "target_speed_up": target, "seeds": sorted(r["seed"] for r in rs),
            "speed_up": _mean_spread([r["speed_up"] for r in rs]),
            "params": _mean_spread([r["params"] for r in rs]),
            "pruned_acc": _mean_spread([r["pruned_acc"] for r in rs]),
            "pruned_acc_bn_recalibrated": _mean_spread([r.get("pruned_acc_bn_recalibrated") for r in rs]),
            "finetuned_acc": _mean_spread([r.get("finetuned_acc") for r in rs]),
            "runs_with_collapse": sum(bool(r["collapsed_layers"]) for r in rs),
        })
    base_acc = _mean_spread([b["acc"] for b in bases])
    first = results[0]
    lines = [f"Base model: {first['model']} on {first['dataset']}, accuracy {_fmt(base_acc)} % "
             f"({base_acc['n']} seed(s)), {first['base_macs'] / 1e6:.1f} M MACs, {first['base_params'] / 1e3:.1f} k params.",
             "",
             "| Speed-up target | Method | Speed-up | Params (k) | Acc. pruned (%) | Acc. pruned + BN recal. (%) "
             "| Acc. fine-tuned (%) | Layer collapse |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        params_k = {k: v / 1e3 if isinstance(v, float) and k != "n" else v for k, v in row["params"].items()}
        lines.append(f"| {row['target_speed_up']:g}x | {row['method']} | {_fmt(row['speed_up'])}x | {_fmt(params_k, 1)} "
                     f"| {_fmt(row['pruned_acc'])} | {_fmt(row['pruned_acc_bn_recalibrated'])} "
                     f"| {_fmt(row['finetuned_acc'])} | {row['runs_with_collapse']}/{len(row['seeds'])} |")
    os.makedirs(output, exist_ok=True)
    markdown = "\n".join(lines) + "\n"
    atomic_write(os.path.join(output, "table.md"), lambda f: f.write(markdown), binary=False)
    atomic_write_json({"base_acc": base_acc, "rows": rows, "results": results, "bases": bases},
                      os.path.join(output, "table.json"))
    _plot(rows, base_acc, os.path.join(output, "plot.png"))
    print(markdown)
    return {"markdown": markdown, "rows": rows}


def _plot(rows: List[Dict[str, Any]], base_acc: Dict[str, float], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    methods = sorted({r["method"] for r in rows})
    for i, method in enumerate(methods):
        rs = sorted((r for r in rows if r["method"] == method), key=lambda r: r["target_speed_up"])
        x = [r["speed_up"]["mean"] for r in rs]
        color = f"C{i}"
        for key, style, label in (("finetuned_acc", "-o", "fine-tuned"), ("pruned_acc", "--x", "pruned")):
            y = [r[key]["mean"] for r in rs]
            if all(math.isnan(v) for v in y):
                continue
            ax.errorbar(x, y, yerr=[r[key]["std"] for r in rs], fmt=style, color=color, capsize=3,
                        label=f"{method} ({label})")
    if base_acc["n"]:
        ax.axhline(base_acc["mean"], color="gray", lw=0.8, ls=":", label="base")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("MAC speed-up (x)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120), binary=True)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``connect-tp`` console script."""
    args = build_parser().parse_args(argv)
    try:
        if args.stage == "table":
            stage_table(args.runs, args.output)
            return 0
        if args.threads:
            torch.set_num_threads(args.threads)
        cfg = resolve_config(args)
        if cfg["device"].startswith("cuda") and not torch.cuda.is_available():
            raise SystemExit("error: --device cuda was given but CUDA is not available")
        dist_ctx = init_distributed(cfg["device"])
        if dist_ctx.enabled and cfg["device"].startswith("cuda"):
            cfg["device"] = f"cuda:{dist_ctx.local_rank}"
        try:
            ctx = _Context(cfg, args, dist_ctx)
            start = time.time()
            if args.stage in ("train", "run"):
                stage_train(ctx)
            if args.stage in ("prune", "run"):
                stage_prune(ctx)
            if args.stage in ("finetune", "run"):
                stage_finetune(ctx)
            if args.stage == "run" and dist_ctx.is_main:
                stage_table([cfg["out"]], os.path.join(cfg["out"], "table"))
            ctx.log(f"{args.stage}: done in {time.time() - start:.0f} s")
        finally:
            cleanup_distributed()
    except (CheckpointError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
