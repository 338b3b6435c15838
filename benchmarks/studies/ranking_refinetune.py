"""Fine-tune the ranking benchmark's pruned models again, under a steadier fine-tuning protocol.

The ranking benchmark fine-tunes each snapshot for one epoch at a constant rate, whose end point is
noisy: three data orders of one L2-pruned 16x model ended at 74.9, 74.2 and 61.6 %. Decaying the
rate to 0 within the epoch cut that spread to +-2.3 (``benchmarks/studies/finetune_noise.py``). Pruning is
the expensive part of a seed (8-12 min a method) and does not depend on fine-tuning, so this
script copies finished ranking folders (base model, pruned snapshots, their results) into a new
root, clears the copies' fine-tuning numbers, and runs only the fine-tuning stage again with
``--ft-schedule cosine``::

    python -m benchmarks.studies.ranking_refinetune --sources runs/ranking/seed0 runs/ranking-cpu/seed1/* \\
        --methods l2 taylor connect-k100 connect-kinf --root runs/ranking-cosine-cpu \\
        --data-dir /usr/share/datasets/fashion-mnist --workers 2
    python -m benchmarks.ranking --summarize runs/ranking-cosine-cpu/seed*/* --output benchmarks/results/ranking-cosine

A source is a run folder of ``connect-tp``'s ``ranking`` preset (one with every method, as
``benchmarks.ranking`` writes, or one per method, as ``benchmarks.ranking_parallel`` writes).
Copies land in ``ROOT/seed<s>/<method>``; a copy that exists already is kept when its pruned
snapshots are the same files (so running the command again continues, ``--resume``) and refused
when they differ. The fine-tuning stage checks every snapshot against its result's fingerprint, as
always, and records the schedule in the results, so ``--summarize`` never mixes the protocols.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from typing import List, Optional, Sequence, Tuple

from benchmarks.ranking_parallel import Pool, _cli, drain
from connect_tp.pipeline.files import read_json, sha256_file
from connect_tp.pipeline.rundir import RunFolder, tag


def _snapshots(source: str, method: str, targets: Sequence[float]) -> Optional[int]:
    """The seed of ``source``'s results for ``method`` at every target (None when one is missing)."""
    seeds = set()
    run = RunFolder(source)
    for t in targets:
        path = run.result(method, t)
        if not (os.path.isfile(path) and os.path.isfile(run.pruned(method, t))):
            return None
        seeds.add(read_json(path)["seed"])
    if len(seeds) != 1:
        raise SystemExit(f"error: {source}'s results for {method} name several seeds {sorted(seeds)}")
    return seeds.pop()


def copy_for_refinetune(source: str, dest: str, method: str, targets: Sequence[float]) -> bool:
    """Copy ``method``'s base, snapshots and results from ``source`` into ``dest`` without their fine-tuning.

    Returns False when ``dest`` already holds these very snapshots (a continued run: nothing is
    copied, its new fine-tuning numbers stay). Raises SystemExit when it holds other ones.
    """
    src, out = RunFolder(source), RunFolder(dest)
    if os.path.isdir(dest):
        for t in targets:
            mine = out.pruned(method, t)
            if not os.path.isfile(mine) or sha256_file(mine) != sha256_file(src.pruned(method, t)):
                raise SystemExit(f"error: {dest} holds other pruned models than {source} ({tag(method, t)}); "
                                 f"give another --root, or remove {dest}")
        return False
    os.makedirs(os.path.join(dest, "pruned"))
    os.makedirs(os.path.join(dest, "results"))
    for name in ("base.pt", "base.json"):
        shutil.copy2(os.path.join(source, name), os.path.join(dest, name))
    for t in targets:
        shutil.copy2(src.pruned(method, t), out.pruned(method, t))
        shutil.copy2(src.result(method, t), out.result(method, t))
        out.clear_result_section(method, t, "finetune")  # redone here under the new schedule
    return True


def plan(sources: Sequence[str], methods: Sequence[str], targets: Sequence[float], root: str,
         common: Sequence[str]) -> List[Tuple[str, None, str, List[List[str]]]]:
    """Copy what is missing and return the fine-tuning jobs, method-major (every seed of a method first)."""
    found = {}
    for source in sources:
        for method in methods:
            seed = _snapshots(source, method, targets)
            if seed is None:
                continue
            if (seed, method) in found:
                raise SystemExit(f"error: {method} of seed {seed} is in both {found[seed, method]} and {source}; "
                                 "give one of them")
            found[seed, method] = source
    jobs = []
    for method in methods:
        for seed in sorted(s for s, m in found if m == method):
            dest = os.path.join(root, f"seed{seed}", method)
            copy_for_refinetune(found[seed, method], dest, method, targets)
            speed_ups = [f"{t:g}" for t in targets]
            jobs.append((f"{method}/s{seed}", None, dest, [
                _cli("finetune", "ranking", seed, dest, common, "--methods", method, "--speed-up", *speed_ups)]))
    return jobs


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sources", nargs="+", required=True, help="ranking run folders holding pruned snapshots")
    parser.add_argument("--methods", nargs="+", required=True)
    parser.add_argument("--speed-up", dest="targets", nargs="+", type=float, default=[8.0, 16.0])
    parser.add_argument("--ft-schedule", default="cosine", choices=["step", "cosine"])
    parser.add_argument("--root", default=os.path.join("runs", "ranking-cosine"))
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--deadline", type=float, default=None, help="seconds from now: no job starts after it")
    args = parser.parse_args(argv)
    start = time.time()
    common = ["--device", args.device, "--data-dir", args.data_dir, "--threads", "1",
              "--ft-schedule", args.ft_schedule]
    queue = plan(args.sources, args.methods, args.targets, args.root, common)
    if not queue:
        raise SystemExit(f"error: no source folder holds snapshots of {args.methods} at every target "
                         f"{[f'{t:g}x' for t in args.targets]}")
    pool = Pool(args.workers, os.path.join(args.root, "logs"),
                None if args.deadline is None else start + args.deadline)
    queue = drain(pool, queue, args.workers)
    print(f"done in {time.time() - start:.0f} s; {len(queue)} job(s) not started", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
