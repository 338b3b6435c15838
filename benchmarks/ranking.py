"""The ranking benchmark: which pruning criterion keeps the most accuracy, beyond seed-to-seed noise.

One seed at a time (about 2 hours on 2 CPU cores), resumable, committing as it goes::

    python -m benchmarks.ranking --seed 0 --threads 2            # base model, then every method
    python -m benchmarks.ranking --seed 0 --threads 2 --resume   # continue after an interruption
    python -m benchmarks.ranking --summarize runs/ranking/seed*  # tables -> benchmarks/results/ranking

Protocol (docs/benchmarks.md, "The ranking benchmark"): ResNet-20 trained on all of Fashion-MNIST
(the ``ranking`` preset of ``connect-tp``), one base model and one calibration set per seed shared by
every method, Torch-Pruning's 400-step global loop with one trajectory per method and snapshots at
1.5x, 2x, 2.5x, 8x and 16x. Every snapshot is evaluated raw and after BatchNorm re-estimation; the
2.5x, 8x and 16x ones also after a short fixed budget (50 SGD steps) and after one epoch on all 60k.

Phase 1 sweeps CoNNect's balance kappa over :data:`KAPPA_GRID` (kappa = 0 is ``taylor``) beside
every Torch-Pruning built-in and a uniform random baseline. Phase 2 runs the BatchNorm treatments
at the kappa the rule :func:`choose_kappa` picks. The rule was fixed before the sweep ran.
"""
from __future__ import annotations

import argparse
import glob
import math
import os
import statistics
import sys
from typing import Any, Dict, List, Optional, Sequence

from benchmarks import cifar_pruning
from connect_tp.pipeline.table import format_stat, mean_spread

KAPPA_GRID = (0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0, math.inf)
"""Balances swept in phase 1; 0 is the ``taylor`` row (``ConnectImportance(balance=0)`` equals it exactly).

300 and 1000 were added after seeds 0-2 put the rule's best at 100, the old grid's largest finite value
(the rule, written before the sweep, widens the grid rather than set a default at its edge)."""

BASELINES = ("l2", "taylor", "lamp", "l1", "random", "uniform")
RULE_TARGETS = (8.0, 16.0)
"""The rule: the kappa with the best mean fine-tuned accuracy over these targets (and over seeds)."""

BN_FLOWS = ("gamma", "identity")  # "stats" is what the kappa sweep (phase 1) already ran


def kappa_method(kappa: float, bn_flow: Optional[str] = None) -> str:
    name = "connect-kinf" if kappa == math.inf else f"connect-k{kappa:g}"
    return name + (f"-bn{bn_flow}" if bn_flow else "")


def phase1_methods() -> List[str]:
    # Interleaved so that an interrupted seed still has the most informative rows.
    k = kappa_method
    return ["l2", "taylor", k(1.0), k(math.inf), k(10.0), "lamp", k(3.0), "random", k(30.0), "l1",
            k(0.3), "uniform", k(100.0), k(300.0), k(1000.0)]


def read_results(run_dirs: Sequence[str]) -> List[Dict[str, Any]]:
    """Every result of the run folders, validated; refused when they are not one experiment."""
    from connect_tp.pipeline.table import check_comparable, comparable_config, read_runs

    results, _ = read_runs(list(run_dirs))
    check_comparable([(path, comparable_config(r)) for path, r in results])
    return [r for _, r in results]


def _rule_accuracies(results: List[Dict[str, Any]], method: str) -> Dict[int, float]:
    """Per seed, the mean fine-tuned accuracy at :data:`RULE_TARGETS` (seeds missing a target left out)."""
    per_seed: Dict[int, List[float]] = {}
    for r in results:
        if r["method"] == method and r["target_speed_up"] in RULE_TARGETS and r.get("finetuned_acc") is not None:
            per_seed.setdefault(r["seed"], []).append(r["finetuned_acc"])
    return {s: statistics.fmean(v) for s, v in per_seed.items() if len(v) == len(RULE_TARGETS)}


def finished_seeds(results: List[Dict[str, Any]]) -> List[int]:
    """Seeds whose whole grid (Taylor and every kappa) has the rule's numbers: the only ones the rule reads.

    A seed still running would otherwise weigh in for some methods and not others.
    """
    grid = ["taylor"] + [kappa_method(k) for k in KAPPA_GRID]
    seeds = sorted({r["seed"] for r in results})
    return [s for s in seeds if all(s in _rule_accuracies(results, m) for m in grid)]


def rule_score(results: List[Dict[str, Any]], method: str) -> Optional[float]:
    """Mean over the :func:`finished_seeds` of the mean fine-tuned accuracy at :data:`RULE_TARGETS`
    (None when the method lacks one of those seeds, or no seed is finished)."""
    seeds = finished_seeds(results)
    per_seed = _rule_accuracies(results, method)
    if not seeds or any(s not in per_seed for s in seeds):
        return None
    return statistics.fmean(per_seed[s] for s in seeds)


def choose_kappa(results: List[Dict[str, Any]]) -> Optional[float]:
    """The rule, written before the sweep: best :func:`rule_score` over the grid (Taylor as kappa 0).

    Returns None until every grid point has a score. Ties go to the smaller kappa (closer to the data).
    """
    scores = {0.0: rule_score(results, "taylor")}
    scores.update({k: rule_score(results, kappa_method(k)) for k in KAPPA_GRID})
    if any(v is None for v in scores.values()):
        return None
    best = max(scores.values())
    return min(k for k, v in scores.items() if v == best)


def run_seed(seed: int, common: List[str], resume: bool, methods: Optional[List[str]] = None) -> None:
    """Base model, then phase 1 and phase 2 (or only ``methods``) for one seed, in its run folder."""
    def stage(name: str, *extra: str) -> None:
        argv = [name, "--preset", "ranking", "--seed", str(seed), *common, *extra]
        if resume:
            argv.append("--resume")
        code = cifar_pruning.main(argv)
        if code:
            raise SystemExit(code)

    stage("train")
    resume = True  # every later stage continues the folder this invocation owns
    # Fine-tuning at 8x and 16x (cheap, and what the rule reads) comes first for every method; the
    # costlier 2.5x fine-tuning runs last, so an interrupted seed has the most telling numbers.
    done = []
    if methods:  # an explicit list: no phase 2 (e.g. two processes sharing a seed's methods)
        for method in methods:
            stage("prune", "--methods", method)
            stage("finetune", "--methods", method, "--speed-up", "8", "16")
        for method in methods:
            stage("finetune", "--methods", method, "--speed-up", "2.5")
        return
    for method in phase1_methods():
        stage("prune", "--methods", method)
        stage("finetune", "--methods", method, "--speed-up", "8", "16")
        done.append(method)
    out = next((common[i + 1] for i, a in enumerate(common) if a == "--out"), os.path.join("runs", "ranking", f"seed{seed}"))
    kappa = choose_kappa(read_results(sorted(glob.glob(os.path.join("runs", "ranking", "seed*")))))
    if kappa is None or kappa == 0.0:
        print(f"phase 2 skipped: the rule picked {kappa!r} (BatchNorm treatments need a connectivity term)")
    else:
        print(f"phase 2: BatchNorm treatments at kappa = {kappa:g} (results in {out})")
        for flow in BN_FLOWS:
            stage("prune", "--methods", kappa_method(kappa, flow))
            stage("finetune", "--methods", kappa_method(kappa, flow), "--speed-up", "8", "16")
            done.append(kappa_method(kappa, flow))
    for method in done:
        stage("finetune", "--methods", method, "--speed-up", "2.5")


# ------------------------------------------------------------------------------------------ summary
def _fmt(stat: Dict[str, float]) -> str:
    return format_stat(stat, digits=1)


def _paired(results, method: str, reference: str, target: float, key: str) -> Dict[str, float]:
    by = {(r["method"], r["seed"]): r for r in results if r["target_speed_up"] == target}
    diffs = [by[(method, s)][key] - by[(reference, s)][key] for (m, s) in by
             if m == method and (reference, s) in by
             and by[(method, s)].get(key) is not None and by[(reference, s)].get(key) is not None]
    return mean_spread(diffs)


def stage_widths(result: Dict[str, Any]) -> str:
    """Output channels per ResNet stage: the residual stream (shared) and the mean inner width."""
    channels = result["channels"]
    parts = []
    for stage in ("layer1", "layer2", "layer3"):
        inner = [v[1] for k, v in channels.items() if k.startswith(stage) and k.endswith("conv1")]
        stream = [v[1] for k, v in channels.items() if k.startswith(stage) and k.endswith("conv2")]
        if inner:
            parts.append(f"{stream[-1]}/{statistics.fmean(inner):.0f}")
    return " · ".join(parts)


SCHEDULE_WORDS = {"step": "constant rate (the `ranking` preset)", "cosine": "rate decayed to 0 by a per-batch cosine"}


def finetune_schedule(results: List[Dict[str, Any]]) -> str:
    """The fine-tuning schedule of the results' one-epoch numbers; a mix is refused.

    (A constant-rate result records no schedule, so the generic comparability check cannot see a mix.)
    """
    found = {((r.get("provenance") or {}).get("finetune") or {}).get("config", {}).get("schedule", "step")
             for r in results if r.get("finetuned_acc") is not None}
    if len(found) > 1:
        raise SystemExit(f"error: these runs fine-tuned with different schedules {sorted(found)}; "
                         "summarize each protocol on its own")
    return found.pop() if found else "step"


def bn_refresh(results: List[Dict[str, Any]]) -> int:
    """How often the results' pruning loops re-estimated BatchNorm (0: never, the protocol); a mix is refused."""
    found = {int(r.get("bn_refresh_every") or 0) for r in results}
    if len(found) > 1:
        raise SystemExit(f"error: these runs pruned with different --bn-refresh-every {sorted(found)}; "
                         "summarize each protocol on its own")
    return found.pop() if found else 0


def _table_order(method: str) -> tuple:
    """CoNNect rows first, by kappa (then BatchNorm treatment), then the built-ins by name."""
    from connect_tp.pipeline.methods import parse_method

    try:
        criterion, options = parse_method(method)
    except ValueError:
        return (1, 0.0, method)
    if criterion != "connect":
        return (1, 0.0, method)
    return (0, options.get("balance", options.get("lam", math.inf)), method)


HEADLINE_COLUMNS = (("2x, BN re-est.", 2.0, "pruned_acc_bn_recalibrated"),
                    ("2.5x, BN re-est.", 2.5, "pruned_acc_bn_recalibrated"),
                    ("8x, 50 steps", 8.0, "short_finetuned_acc"), ("16x, 50 steps", 16.0, "short_finetuned_acc"),
                    ("2.5x, 1 epoch", 2.5, "finetuned_acc"),
                    ("8x, 1 epoch", 8.0, "finetuned_acc"), ("16x, 1 epoch", 16.0, "finetuned_acc"))


def default_method() -> str:
    """The method name of ``ConnectImportance()``'s defaults (kappa and BatchNorm treatment)."""
    from connect_tp.importance import DEFAULT_BALANCE, DEFAULT_BN_FLOW
    from connect_tp.pipeline.methods import NAMED_BN_FLOW

    return kappa_method(DEFAULT_BALANCE, None if DEFAULT_BN_FLOW == NAMED_BN_FLOW else DEFAULT_BN_FLOW)


def _headline_name(method: str) -> str:
    from connect_tp.pipeline.methods import parse_method

    names = {"taylor": "Taylor (= κ=0)", "l1": "L1", "l2": "L2", "lamp": "LAMP",
             "random": "random (Torch-Pruning)", "uniform": "uniform random"}
    _, options = parse_method(method)
    norm = options.get("normalizer")  # a -norm<...> suffix: Torch-Pruning's normalizer instead of "mean"
    suffix = "" if norm is None else (", `normalizer=None`" if norm == "none" else f', `normalizer="{norm}"`')
    plain = method if norm is None else method[:method.rindex("-norm")]
    if plain in names:
        return names[plain] + suffix
    kappa = options.get("balance")
    name = "CoNNect κ=" + ("∞" if kappa == math.inf else f"{kappa:g}")
    if options.get("bn_flow"):
        name += f', `bn_flow="{options["bn_flow"]}"`'
    return name + suffix + (" (**default**)" if method == default_method() else "")


def headline_table(results: List[Dict[str, Any]], methods: Sequence[str], scores: Dict[str, Optional[float]]) -> str:
    """README's results table: mean ± std over the seeds each row has, the default first, the BN rows last.

    Rows without a ``bn_flow`` use ``"stats"`` (what a name without ``-bn`` means, phase 1)."""
    default = default_method()

    def order(m: str) -> tuple:  # the default, the grid by falling kappa down to Taylor, built-ins, other BN rows
        on_grid = m.startswith("connect") or m == "taylor"
        return (m != default, m != default and "-bn" in m, not on_grid,
                -_table_order(m)[1] if m.startswith("connect") else 0, m)

    columns = [c for c in HEADLINE_COLUMNS if any(r.get(c[2]) is not None and r["target_speed_up"] == c[1]
                                                  for r in results)]
    lines = ["| method | seeds | λ used (seed %d) | " % min(r["seed"] for r in results)
             + " | ".join(c[0] for c in columns) + " | rule score |",
             "|---|---|---|" + "---|" * len(columns) + "---|"]
    for m in sorted(methods, key=order):
        rows = [r for r in results if r["method"] == m]
        seeds = sorted({r["seed"] for r in rows})
        tuned = sorted({r["seed"] for r in rows if r["target_speed_up"] in RULE_TARGETS and r.get("finetuned_acc") is not None})
        seeds_cell = ",".join(map(str, seeds)) + ("" if tuned == seeds else
                                                  f" (fine-tuned: {','.join(map(str, tuned)) or 'none'})")
        first = min(r["seed"] for r in rows)
        lam = next((r.get("connect_lam") for r in rows if r["seed"] == first), None)
        lam_cell = "–" if not m.startswith("connect") else ("∞" if lam in (None, math.inf) else f"{lam:.3g}")
        cells = [_fmt(mean_spread([r.get(key) for r in rows if r["target_speed_up"] == t])) for _, t, key in columns]
        score = scores.get(m)
        lines.append(f"| {_headline_name(m)} | {seeds_cell} | {lam_cell} | " + " | ".join(cells)
                     + f" | {'–' if score is None else f'{score:.1f}'} |")
    return "\n".join(lines) + "\n"


def summarize(run_dirs: Sequence[str], output: str) -> str:
    results = read_results(run_dirs)
    seen = {}
    for r in results:  # one seed may be split over several folders (parallel halves): no duplicates
        key = (r["seed"], r["method"], r["target_speed_up"])
        if key in seen:
            raise SystemExit(f"error: {r['method']} at {r['target_speed_up']:g}x, seed {r['seed']}, is in two run "
                             "folders; summarize each copy once")
        seen[key] = r
    seeds = sorted({r["seed"] for r in results})
    methods = sorted({r["method"] for r in results}, key=_table_order)
    bases_by_seed = {}
    for d in run_dirs:
        path = os.path.join(d, "base.json")
        if os.path.isfile(path):
            base = cifar_pruning.read_json(path)
            bases_by_seed.setdefault(base["seed"], base)
    bases = [bases_by_seed[s] for s in sorted(bases_by_seed)]
    env = results[0].get("environment", {})
    schedule = finetune_schedule(results)
    refresh = bn_refresh(results)
    lines = [f"Seeds {seeds}; base accuracy {_fmt(mean_spread([b['acc'] for b in bases]))} % "
             f"(per seed: {', '.join('%.2f' % b['acc'] for b in bases)}). "
             f"torch {env.get('torch')}, torch-pruning {env.get('torch_pruning')}, {env.get('threads')} thread(s)"
             + (f", {env['accelerator']}" if env.get("accelerator") else ", CPU")
             + f". Fine-tuning epoch: {SCHEDULE_WORDS.get(schedule, schedule)}."
             + (f" BatchNorm statistics re-estimated before every {refresh} pruning step(s)." if refresh else ""), ""]

    def table(title: str, targets: Sequence[float], key: str) -> None:
        lines.extend([f"**{title}** (mean ± sample std over seeds)", "",
                      "| method | " + " | ".join(f"{t:g}x" for t in targets) + " |",
                      "|---|" + "---|" * len(targets)])
        for m in methods:
            cells = [_fmt(mean_spread([r.get(key) for r in results if r["method"] == m and r["target_speed_up"] == t]))
                     for t in targets]
            if any(c != "–" for c in cells):
                lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")

    table("Accuracy right after pruning, no repair", (1.5, 2.0, 2.5), "pruned_acc")
    table("Accuracy after BatchNorm re-estimation only (256 images)", (1.5, 2.0, 2.5, 8.0, 16.0),
          "pruned_acc_bn_recalibrated")
    table("Accuracy after a short fine-tuning budget (50 steps)", (2.5, 8.0, 16.0), "short_finetuned_acc")
    table("Accuracy after one fine-tuning epoch on all 60k", (2.5, 8.0, 16.0), "finetuned_acc")

    default = default_method()
    for ref in ("l2", "taylor") + ((default,) if default in methods else ()):
        lines.extend([f"**Paired difference against {ref}{' (the default)' if ref == default else ''}** (per seed, then mean ± std; fine-tuned / BN-recal.)",
                      "", "| method | 2x BN-recal. | 8x fine-tuned | 16x fine-tuned | 16x short FT |", "|---|---|---|---|---|"])
        for m in methods:
            if m == ref:
                continue
            cells = [_fmt(_paired(results, m, ref, 2.0, "pruned_acc_bn_recalibrated")),
                     _fmt(_paired(results, m, ref, 8.0, "finetuned_acc")),
                     _fmt(_paired(results, m, ref, 16.0, "finetuned_acc")),
                     _fmt(_paired(results, m, ref, 16.0, "short_finetuned_acc"))]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")

    lines.extend(["**Where each method cuts at 16x** (per stage: residual stream / mean inner width; "
                  "base 16/16 · 32/32 · 64/64; lambda used on seed %d)" % seeds[0], "",
                  "| method | " + " | ".join(f"seed {s}" for s in seeds) + " | lambda used |",
                  "|---|" + "---|" * (len(seeds) + 1)])
    for m in methods:
        at_16x = {r["seed"]: r for r in results if r["method"] == m and r["target_speed_up"] == 16.0}
        if at_16x:
            lam = (at_16x.get(seeds[0]) or {}).get("connect_lam")
            cells = [stage_widths(at_16x[s]) if s in at_16x else "–" for s in seeds]
            lines.append(f"| {m} | " + " | ".join(cells) + f" | {'–' if lam is None else f'{lam:.3g}'} |")
    lines.append("")
    scores = {m: rule_score(results, m) for m in methods}
    # The rule was written for the constant-rate protocol; it does not read others.
    kappa = choose_kappa(results) if schedule == "step" and not refresh else None
    lines.append(f"Rule score (mean fine-tuned accuracy over 8x and 16x, over the finished seeds "
                 f"{finished_seeds(results)}): " + ", ".join(
        f"{m} {v:.2f}" for m, v in sorted(scores.items(), key=lambda kv: -(kv[1] or -1)) if v is not None))
    lines.append("")
    if schedule != "step" or refresh:
        lines.append("Kappa chosen by the rule: – (the rule reads the constant-rate `ranking` protocol only)")
    else:
        lines.append(f"Kappa chosen by the rule: {'not yet (grid incomplete)' if kappa is None else f'{kappa:g}'}")
    markdown = "\n".join(lines) + "\n"
    os.makedirs(output, exist_ok=True)
    cifar_pruning.atomic_write(os.path.join(output, "headline.md"),
                               lambda f: f.write(headline_table(results, methods, scores)), binary=False)
    cifar_pruning.atomic_write(os.path.join(output, "table.md"), lambda f: f.write(markdown), binary=False)
    cifar_pruning.atomic_write_json({"seeds": seeds, "rule_scores": scores, "chosen_kappa": kappa,
                                     "results": results, "bases": bases}, os.path.join(output, "summary.json"))
    return markdown


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, help="run one seed (base model, phase 1, phase 2)")
    parser.add_argument("--resume", action="store_true", help="continue the seed's folder runs/ranking/seed<seed>")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data-dir", default="data", help="Fashion-MNIST location (Debian's package is found too)")
    parser.add_argument("--methods", nargs="+", help="run only these methods (no phase 2)")
    parser.add_argument("--out", help="run folder (default: runs/ranking/seed<seed>)")
    parser.add_argument("--summarize", nargs="+", metavar="RUN_DIR", help="tabulate finished run folders")
    parser.add_argument("--output", default=os.path.join("benchmarks", "results", "ranking"))
    args = parser.parse_args(argv)
    if args.summarize:
        print(summarize(args.summarize, args.output))
        return 0
    if args.seed is None:
        parser.error("give --seed N to run a seed, or --summarize RUN_DIR... to tabulate")
    common = ["--device", args.device, "--data-dir", args.data_dir]
    if args.out:
        common += ["--out", args.out]
    if args.threads:
        common += ["--threads", str(args.threads)]
    run_seed(args.seed, common, args.resume, args.methods)
    return 0


if __name__ == "__main__":
    sys.exit(main())
