"""The results table and plot of one or more run folders (seeds), averaged only when comparable.

:func:`stage_table` reads every ``results/*.json`` and ``base.json`` of the given run folders,
checks that they describe the same experiment apart from the seed (preset, dataset, model,
subsets, schedules, pruning steps, fine-tuning recipe: whatever the fingerprints and the result
fields record), and refuses to average them otherwise, naming the field and two files that
disagree. It also refuses what it cannot vouch for, naming both files each time: a result pruned
from another base model than the ``base.json`` it would be shown with (the base was trained again
after pruning), a ``base.json`` that does not describe the ``base.pt`` next to it, the same folder
given twice, and two folders holding the same seed (a copied folder would count as two seeds).

It writes ``table.md`` (mean ± sample standard deviation over seeds), ``table.json`` (the same
numbers and every per-seed result) and ``plot.png`` (accuracy against speed-up, with the targets
as ticks). A preset that cannot rank methods (:data:`~connect_tp.pipeline.config.PRESET_CAVEATS`)
has its caveat printed in the table and the plot. Everything is rendered before the first file is
written; a write that fails says which files were written. It needs neither torch nor the datasets.
"""
from __future__ import annotations

import errno
import glob
import io
import json
import math
import os
import statistics
import textwrap
from typing import Any, Dict, List, Optional, Tuple

from ..files import CheckpointError, atomic_write, read_json, sha256_file
from .config import PRESET_CAVEATS
from .console import say
from .provenance import ProvenanceError, short_hash
from .rundir import validate_base, validate_result

__all__ = ["stage_table", "comparable_config", "check_comparable", "check_distinct", "check_parents",
           "mean_spread", "format_stat", "TableError", "TableWriteError"]


class TableError(ProvenanceError):
    """The runs given to ``table`` are not one experiment, or not what their files say (the message names both files)."""


class TableWriteError(OSError):
    """A table file could not be written; :attr:`report` says which files were written before.

    ``filename`` is the file that failed, ``strerror`` why; :attr:`written` and :attr:`missing`
    list the files of this table that were and were not written.
    """

    def __init__(self, code: int, strerror: str, filename: str, written: List[str], missing: List[str]):
        super().__init__(code, strerror, filename)
        self.written, self.missing = written, missing
        names = [os.path.basename(p) for p in written]
        self.report = ((f"wrote {', '.join(names)} only" if names else "wrote none of the table files")
                       + f"; {', '.join(os.path.basename(p) for p in missing)} in {os.path.dirname(filename)} "
                         f"are missing or from an earlier table")


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


def _run_of(path: str) -> str:
    """The run folder of a ``results/*.json`` or ``base.json`` path."""
    folder = os.path.dirname(path)
    return os.path.dirname(folder) if os.path.basename(folder) == "results" else folder


def check_distinct(run_dirs: List[str], results: List[Tuple[str, Dict[str, Any]]],
                   bases: List[Tuple[str, Dict[str, Any]]]) -> None:
    """Raise :class:`TableError` for a folder given twice, or a seed held by two folders (naming both).

    Averaging a folder with itself, or with a copy of itself, would report one seed as two, with a
    spread of 0.
    """
    folders: Dict[str, str] = {}
    for d in run_dirs:
        real = os.path.realpath(d)
        if real in folders:
            raise TableError(f"{folders[real]} and {d} are the same run folder; give each seed's folder once")
        folders[real] = d
    seeds: Dict[int, str] = {}
    for path, b in bases:
        if b["seed"] in seeds:
            raise TableError(f"{seeds[b['seed']]} and {path} are both the base model of seed {b['seed']} (a copied "
                             f"run folder?); give one folder per seed")
        seeds[b["seed"]] = path
    held: Dict[Tuple[Any, ...], str] = {}
    for path, r in results:
        key = (r["method"], float(r["target_speed_up"]), r["seed"])
        if key in held:
            raise TableError(f"{held[key]} and {path} are both seed {r['seed']} of {r['method']} at "
                             f"{r['target_speed_up']:g}x (a copied run folder?); give one folder per seed")
        held[key] = path


def _output_sha(record: Dict[str, Any], section: Optional[str] = None) -> Optional[str]:
    provenance = record.get("provenance") if isinstance(record.get("provenance"), dict) else {}
    part = provenance.get(section) if section else provenance
    output = part.get("output") if isinstance(part, dict) else None
    return output.get("sha256") if isinstance(output, dict) else None


def _parent_sha(record: Dict[str, Any], section: str) -> Optional[str]:
    provenance = record.get("provenance") if isinstance(record.get("provenance"), dict) else {}
    part = provenance.get(section)
    parent = part.get("parent") if isinstance(part, dict) else None
    return parent.get("sha256") if isinstance(parent, dict) else None


_REDO = ("prune and fine-tune it again from the current base (`connect-tp prune --resume --force`, then "
         "`connect-tp finetune --resume --force`, with that run's options), or leave the folder out")


def check_parents(results: List[Tuple[str, Dict[str, Any]]], bases: List[Tuple[str, Dict[str, Any]]]) -> None:
    """Raise :class:`TableError` unless every result was made from the base model it is shown with.

    A fingerprinted result names the SHA-256 of the ``base.pt`` it was pruned from; it must be the
    one its folder's ``base.json`` was written for, and that ``base.json`` must describe the
    ``base.pt`` on disk (when there is one; a ``base.json`` without fingerprint is vouched for by
    that ``base.pt``). The fine-tuning numbers in a result must come from the pruned model the
    result describes. Every result must also carry the accuracy, MACs and parameters of that
    ``base.json`` (all a result written without fingerprints can be checked by).
    """
    base_of = {_run_of(path): (path, b) for path, b in bases}
    on_disk: Dict[str, Optional[str]] = {}  # run folder -> sha256 of its base.pt (None: absent)
    for path, b in bases:
        ckpt = os.path.join(_run_of(path), "base.pt")
        on_disk[_run_of(path)] = sha256_file(ckpt) if os.path.isfile(ckpt) else None
        recorded = _output_sha(b)
        actual = on_disk[_run_of(path)]
        if recorded is not None and actual is not None and actual != recorded:
            raise TableError(f"{ckpt} (sha256 {short_hash(actual)}) is not the model {path} was written for "
                             f"(sha256 {short_hash(recorded)}): a training of a new base started since; finish "
                             f"it (`connect-tp train --resume`) and prune again, or leave the folder out")
    for path, r in results:
        run = _run_of(path)
        base_path, base = base_of.get(run, (os.path.join(run, "base.json"), None))
        parent = _parent_sha(r, "prune")
        if parent is not None:
            if base is None:
                raise TableError(f"{path} was pruned from the base model with sha256 {short_hash(parent)}, but "
                                 f"{base_path} is missing (a training of a new base started since?), so its base "
                                 f"accuracy cannot be shown; {_REDO}")
            # A base.json written without fingerprint (an older connect-tp) is vouched for by its base.pt,
            # when the folder still has it, and by the fields below in any case.
            base_sha = _output_sha(base) or on_disk.get(run)
            if base_sha is not None and base_sha != parent:
                raise TableError(f"{path} was pruned from another base model (sha256 {short_hash(parent)}) than the "
                                 f"one {base_path} describes (sha256 {short_hash(base_sha)}): the base was trained "
                                 f"again after pruning; {_REDO}")
            pruned = _output_sha(r, "prune")
            for section in ("finetune", "short_finetune"):
                made_from = _parent_sha(r, section)
                if made_from is not None and made_from != pruned:
                    raise TableError(f"{path}: its {section.replace('_', '-')} numbers come from another pruned model "
                                     f"(sha256 {short_hash(made_from)}) than the one it describes (sha256 "
                                     f"{short_hash(pruned)}); fine-tune it again (`connect-tp finetune --resume "
                                     f"--force`), or leave the folder out")
        if base is not None:  # every result carries the numbers of the base it was pruned from
            for key, base_key in (("base_acc", "acc"), ("base_macs", "macs"), ("base_params", "params")):
                if r.get(key) is not None and not math.isclose(float(r[key]), float(base[base_key]), rel_tol=1e-9):
                    raise TableError(f"{path} was pruned from another base model ({key}={r[key]!r} there, "
                                     f"{base_key}={base[base_key]!r} in {base_path}); {_REDO}")


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
        TableError: the runs differ in more than the seed, a folder or seed is given twice, or a
            result was not made from the base model it would be shown with (both files named).
        CheckpointError: a result file is missing, corrupt or malformed (named).
        TableWriteError: a file in ``output`` cannot be written (named, with the files written before it).
    """
    results, bases = read_runs(run_dirs)
    check_comparable([(p, comparable_config(r)) for p, r in results])
    check_comparable([(p, comparable_config(b, base=True)) for p, b in bases])
    check_distinct(run_dirs, results, bases)
    check_parents(results, bases)
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
    seeds = sorted({r["seed"] for _, r in results})
    caveat = PRESET_CAVEATS.get(first["preset"])
    lines = [f"Base model: {first['model']} on {first['dataset']} (preset {first['preset']}), accuracy "
             f"{format_stat(base_acc)} % ({base_acc['n']} seed(s)), {first['base_macs'] / 1e6:.1f} M MACs, "
             f"{first['base_params'] / 1e3:.1f} k params."]
    if caveat:
        lines += ["", f"**Caveat: {caveat}.**"]
    lines += ["",
              "| Speed-up target | Method | Speed-up | Params (k) | Acc. pruned (%) | Acc. pruned + BN recal. (%) "
              "| Acc. fine-tuned (%) | Layer collapse |",
              "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        params_k = {k: v / 1e3 if isinstance(v, float) and k != "n" else v for k, v in row["params"].items()}
        lines.append(f"| {row['target_speed_up']:g}x | {row['method']} | {format_stat(row['speed_up'])}x | {format_stat(params_k, 1)} "
                     f"| {format_stat(row['pruned_acc'])} | {format_stat(row['pruned_acc_bn_recalibrated'])} "
                     f"| {format_stat(row['finetuned_acc'])} | {row['runs_with_collapse']}/{len(row['seeds'])} |")
    markdown = "\n".join(lines) + "\n"
    # Everything is rendered before the first file is written: only the disk can fail part-way.
    table_json = json.dumps({"preset": first["preset"], "seeds": seeds, "caveat": caveat, "base_acc": base_acc,
                             "rows": rows, "results": [r for _, r in results], "bases": [b for _, b in bases]},
                            indent=2) + "\n"
    title = f"{first['model']} on {first['dataset']}, preset {first['preset']}, seed{'s' if len(seeds) > 1 else ''} " \
            f"{', '.join(map(str, seeds))}"
    png = render_plot(rows, base_acc, title=title, caveat=caveat)
    paths = [os.path.join(output, name) for name in ("table.md", "table.json", "plot.png")]
    payloads = [(paths[0], markdown, False), (paths[1], table_json, False), (paths[2], png, True)]
    written: List[str] = []
    for path, data, binary in payloads:
        try:
            atomic_write(path, lambda f, data=data: f.write(data), binary=binary)
        except OSError as exc:
            raise TableWriteError(exc.errno or errno.EIO, exc.strerror or str(exc), path, written,
                                  [p for p in paths if p not in written]) from exc
        written.append(path)
    say(markdown)
    say(f"table: wrote {', '.join(paths)}")
    return {"markdown": markdown, "rows": rows, "files": paths, "seeds": seeds, "caveat": caveat}


_SERIES = (("finetuned_acc", "-", "o", "fine-tuned"),
           ("pruned_acc_bn_recalibrated", ":", "^", "pruned + BN re-estimated"),
           ("pruned_acc", "--", "x", "pruned"))


def render_plot(rows: List[Dict[str, Any]], base_acc: Dict[str, float], *, title: str = "",
                caveat: Optional[str] = None) -> bytes:
    """The PNG of accuracy against MAC speed-up: one colour per method, one line style per series.

    The series are the fine-tuned accuracy, the accuracy right after pruning with BatchNorm
    statistics re-estimated, and the accuracy right after pruning (each only if some result has
    it); the x ticks are the speed-up targets, the legend sits outside the axes, and the title
    names the preset and the seeds, with the preset's caveat under it.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FixedLocator, NullLocator

    fig, ax = plt.subplots(figsize=(8.5, 4.8))
    methods = sorted({r["method"] for r in rows})
    # One colour per method: matplotlib's 10-colour cycle, or 20 colours when there are more methods.
    palette = [f"C{i}" for i in range(10)] if len(methods) <= 10 else list(plt.get_cmap("tab20").colors)
    colour = {m: palette[i % len(palette)] for i, m in enumerate(methods)}
    used = []
    for method in methods:
        rs = sorted((r for r in rows if r["method"] == method), key=lambda r: r["target_speed_up"])
        x = [r["speed_up"]["mean"] for r in rs]
        for key, line, marker, label in _SERIES:
            y = [r[key]["mean"] for r in rs]
            if all(math.isnan(v) for v in y):
                continue
            if label not in used:
                used.append(label)
            ax.errorbar(x, y, yerr=[0.0 if math.isnan(r[key]["std"]) else r[key]["std"] for r in rs], ls=line,
                        marker=marker, color=colour[method], capsize=3, ms=5, lw=1.3)
    if base_acc["n"]:
        ax.axhline(base_acc["mean"], color="gray", lw=0.8, ls="-.")
    targets = sorted({float(r["target_speed_up"]) for r in rows})
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator(targets))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([f"{t:g}x" for t in targets])
    lo, hi = min(targets + [r["speed_up"]["mean"] for r in rows]), max(targets + [r["speed_up"]["mean"] for r in rows])
    ax.set_xlim(lo / 1.25, hi * 1.25)
    ax.set_xlabel("MAC speed-up (ticks: the targets; points: the speed-up reached)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    # Two legends outside the axes: colours name the methods, line styles the series.
    method_handles = [Line2D([], [], color=colour[m], lw=3, label=m) for m in methods]
    style = {label: (line, marker) for _, line, marker, label in _SERIES}
    series_handles = [Line2D([], [], color="black", ls=style[s][0], marker=style[s][1], label=s) for s in used]
    if base_acc["n"]:
        series_handles.append(Line2D([], [], color="gray", lw=0.8, ls="-.", label="base model"))
    # Methods to the right (two columns when there are many), series below the x label: neither covers data.
    first = ax.legend(handles=method_handles, title="method", fontsize=8, title_fontsize=8, loc="upper left",
                      bbox_to_anchor=(1.02, 1.0), borderaxespad=0, ncol=1 if len(methods) <= 12 else 2)
    ax.add_artist(first)
    second = ax.legend(handles=series_handles, title="accuracy", fontsize=8, title_fontsize=8, loc="upper center",
              bbox_to_anchor=(0.5, -0.16), borderaxespad=0, ncol=len(series_handles))
    if caveat:
        fig.suptitle(title, fontsize=11, y=0.985)
        ax.set_title("\n".join(textwrap.wrap(f"Caveat: {caveat}.", 110)), fontsize=7.5, color="firebrick", loc="left")
    else:
        ax.set_title(title, fontsize=11)
    fig.tight_layout()
    buffer = io.BytesIO()
    try:
        # A legend added with add_artist is not in the tight box unless named; naming it replaces the
        # default list (suptitle, the other legend), so that list is passed too.
        fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight",
                    bbox_extra_artists=[*fig.get_default_bbox_extra_artists(), first, second])
    finally:
        plt.close(fig)
    return buffer.getvalue()
