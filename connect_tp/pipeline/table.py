"""The results table and plot of one or more run folders (seeds), averaged only when comparable.

:func:`stage_table` reads every ``results/*.json`` and ``base.json`` of the given run folders,
checks that they describe the same experiment apart from the seed (preset, dataset, model,
subsets, schedules, pruning steps, fine-tuning recipe: whatever the fingerprints and the result
fields record), and refuses to average them otherwise, naming the field and two files that
disagree. It writes ``table.md`` (mean ± sample standard deviation over seeds), ``table.json``
(the same numbers and every per-seed result) and ``plot.png`` (accuracy against speed-up). It
needs neither torch nor the datasets.
"""
from __future__ import annotations

import glob
import json
import math
import os
import statistics
from typing import Any, Dict, List, Optional, Tuple

from .console import say
from ..files import CheckpointError, atomic_write, atomic_write_json, read_json
from .provenance import ProvenanceError
from .rundir import validate_base, validate_result

__all__ = ["stage_table", "comparable_config", "check_comparable", "mean_spread", "format_stat", "TableError"]


class TableError(ProvenanceError):
    """The runs given to ``table`` are not one experiment (the message names the field and the files)."""


_RESULT_FIELDS = ("preset", "dataset", "model", "iterative_steps", "max_pruning_ratio", "calibration_samples",
                  "finetune_epochs", "short_finetune_steps")
_BASE_FIELDS = ("preset", "dataset", "model", "epochs")
_PER_RUN = ("seed", "method", "target_speed_up")  # may differ between the results averaged or tabulated


def comparable_config(record: Dict[str, Any], base: bool = False) -> Dict[str, Any]:
    """The fields of a result (or ``base.json``) that must agree across the runs of one table.

    Fingerprinted parts contribute their whole config (prefixed by the part: ``prune.lr``...);
    the plain fields of older files contribute what they carry.
    """
    out: Dict[str, Any] = {}
    for key in (_BASE_FIELDS if base else _RESULT_FIELDS):
        if record.get(key) is not None:
            out[key] = record[key]
    provenance = record.get("provenance") or {}
    parts = {"train": provenance} if base else provenance
    for part, recorded in parts.items():
        config = recorded.get("config") if isinstance(recorded, dict) else None
        if isinstance(config, dict):
            out.update({f"{part}.{k}": v for k, v in config.items() if k not in _PER_RUN})
    return out


def check_comparable(records: List[Tuple[str, Dict[str, Any]]]) -> None:
    """Raise :class:`TableError` at the first field two records both carry with different values."""
    seen: Dict[str, Tuple[Any, str]] = {}
    for path, config in records:
        for key, value in config.items():
            if key not in seen:
                seen[key] = (value, path)
            elif json.dumps(seen[key][0]) != json.dumps(value):
                raise TableError(
                    f"the runs differ in more than the seed: {key} is {json.dumps(seen[key][0])} in {seen[key][1]} "
                    f"but {json.dumps(value)} in {path}; make one table per configuration")


def mean_spread(values: List[Optional[float]]) -> Dict[str, float]:
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def format_stat(stat: Dict[str, float], digits: int = 2) -> str:
    if stat["n"] == 0 or math.isnan(stat["mean"]):
        return "–"
    return f"{stat['mean']:.{digits}f}" + (f" ± {stat['std']:.{digits}f}" if stat["n"] > 1 else "")


def read_runs(run_dirs: List[str]) -> Tuple[List[Tuple[str, Dict[str, Any]]], List[Tuple[str, Dict[str, Any]]]]:
    """``(results, bases)`` as ``(path, record)`` pairs, every record validated."""
    for d in run_dirs:
        if not os.path.isdir(d):
            raise CheckpointError(f"run folder {d} does not exist")
    files = sorted(f for d in run_dirs for f in glob.glob(os.path.join(d, "results", "*.json")))
    if not files:
        raise CheckpointError(f"no result files under {', '.join(os.path.join(d, 'results') for d in run_dirs)}; "
                              f"run the prune stage first")
    results = [(f, validate_result(read_json(f), f)) for f in files]
    bases = [(p, validate_base(read_json(p), p)) for p in (os.path.join(d, "base.json") for d in run_dirs)
             if os.path.isfile(p)]
    return results, bases


def stage_table(run_dirs: List[str], output: str) -> Dict[str, Any]:
    """Aggregate the results of one or more run folders (seeds) into a table and a plot.

    Raises:
        TableError: the runs differ in more than the seed.
        CheckpointError: a result file is missing, corrupt or malformed (named).
        OSError: ``output`` cannot be written (named).
    """
    results, bases = read_runs(run_dirs)
    check_comparable([(p, comparable_config(r)) for p, r in results])
    check_comparable([(p, comparable_config(b, base=True)) for p, b in bases])
    groups: Dict[tuple, List[Dict[str, Any]]] = {}
    for _, r in results:
        groups.setdefault((r["method"], r["target_speed_up"]), []).append(r)
    rows = []
    for (method, target), rs in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        rows.append({
            "method": method, "target_speed_up": target, "seeds": sorted(r["seed"] for r in rs),
            "speed_up": mean_spread([r["speed_up"] for r in rs]),
            "params": mean_spread([r["params"] for r in rs]),
            "pruned_acc": mean_spread([r["pruned_acc"] for r in rs]),
            "pruned_acc_bn_recalibrated": mean_spread([r.get("pruned_acc_bn_recalibrated") for r in rs]),
            "finetuned_acc": mean_spread([r.get("finetuned_acc") for r in rs]),
            "runs_with_collapse": sum(bool(r["collapsed_layers"]) for r in rs),
        })
    base_acc = mean_spread([b["acc"] for _, b in bases])
    first = results[0][1]
    lines = [f"Base model: {first['model']} on {first['dataset']} (preset {first['preset']}), accuracy "
             f"{format_stat(base_acc)} % ({base_acc['n']} seed(s)), {first['base_macs'] / 1e6:.1f} M MACs, "
             f"{first['base_params'] / 1e3:.1f} k params.",
             "",
             "| Speed-up target | Method | Speed-up | Params (k) | Acc. pruned (%) | Acc. pruned + BN recal. (%) "
             "| Acc. fine-tuned (%) | Layer collapse |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        params_k = {k: v / 1e3 if isinstance(v, float) and k != "n" else v for k, v in row["params"].items()}
        lines.append(f"| {row['target_speed_up']:g}x | {row['method']} | {format_stat(row['speed_up'])}x | {format_stat(params_k, 1)} "
                     f"| {format_stat(row['pruned_acc'])} | {format_stat(row['pruned_acc_bn_recalibrated'])} "
                     f"| {format_stat(row['finetuned_acc'])} | {row['runs_with_collapse']}/{len(row['seeds'])} |")
    markdown = "\n".join(lines) + "\n"
    paths = [os.path.join(output, name) for name in ("table.md", "table.json", "plot.png")]
    atomic_write(paths[0], lambda f: f.write(markdown), binary=False)
    atomic_write_json({"base_acc": base_acc, "rows": rows, "results": [r for _, r in results],
                       "bases": [b for _, b in bases]}, paths[1])
    _plot(rows, base_acc, paths[2])
    say(markdown)
    say(f"table: wrote {', '.join(paths)}")
    return {"markdown": markdown, "rows": rows, "files": paths}


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
    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120), binary=True)
    finally:
        plt.close(fig)
