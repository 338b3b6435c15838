"""The ranking benchmark for several seeds at once, one worker process per job (a many-core GPU machine).

    python -m benchmarks.ranking_parallel --seeds 0 1 2 --workers 14 --device cuda --root runs/ranking-gpu
    python -m benchmarks.ranking --summarize runs/ranking-gpu/seed*/* --output benchmarks/results/ranking-gpu

Same protocol and methods as :mod:`benchmarks.ranking` (phase 1, then the BatchNorm treatments at
``--bn-kappa``, fixed in advance here because the jobs run concurrently). Each (seed, method) runs
in its own folder ``ROOT/seed<s>/<method>`` holding a copy of the seed's base model, so the
run-folder lock never serializes two workers and ``--summarize`` reads every folder at once.

Order, so that a run cut short still has the rule's numbers: the base models (one per seed, in
parallel), then pruning and fine-tuning at 8x and 16x for every (seed, method), then the 2.5x
fine-tunings. With ``--deadline S`` no job starts after S seconds and running ones are stopped at
S (+30 s grace); finished results stay, and running the same command again continues (``--resume``).
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence

from benchmarks.ranking import BN_FLOWS, kappa_method, phase1_methods


def _cli(stage: str, preset: str, seed: int, out: str, common: Sequence[str], *extra: str) -> List[str]:
    return [sys.executable, "-m", "benchmarks.cifar_pruning", stage, "--preset", preset, "--seed", str(seed),
            "--out", out, "--resume", *common, *extra]


def plan(seeds: Sequence[int], methods: Sequence[str], preset: str, root: str, common: Sequence[str],
         with_2_5x: bool = True):
    """(label, base folder or None, folder, argv) jobs in priority order; a job's base must exist first.

    ``with_2_5x=False`` leaves out the 2.5x fine-tunings (run the same command again without it later)."""
    first, last = [], []
    for method in methods:  # method-major: every seed gets the most telling rows first
        for seed in seeds:
            base, out = os.path.join(root, f"seed{seed}", "base"), os.path.join(root, f"seed{seed}", method)
            first.append((f"{method}/s{seed}", base, out, [
                _cli("prune", preset, seed, out, common, "--methods", method),
                _cli("finetune", preset, seed, out, common, "--methods", method, "--speed-up", "8", "16")]))
            last.append((f"{method}/s{seed}@2.5x", base, out, [
                _cli("finetune", preset, seed, out, common, "--methods", method, "--speed-up", "2.5")]))
    return first + (last if with_2_5x else [])


def _copy_base(base: str, out: str) -> None:
    os.makedirs(out, exist_ok=True)
    for name in ("base.pt", "base.json"):
        if not os.path.exists(os.path.join(out, name)):
            shutil.copy2(os.path.join(base, name), os.path.join(out, name))


class Pool:
    """Runs jobs (a list of argv run one after another) in at most ``size`` processes, with a deadline."""

    def __init__(self, size: int, logs: str, deadline: Optional[float], grace: float = 30.0):
        self.size, self.logs, self.deadline, self.grace = size, logs, deadline, grace
        self.running = {}  # label -> (Popen, remaining argvs, log file)
        os.makedirs(logs, exist_ok=True)

    def expired(self) -> bool:
        return self.deadline is not None and time.time() > self.deadline

    def start(self, label: str, argvs: List[List[str]]) -> None:
        log = open(os.path.join(self.logs, label.replace("/", "_") + ".log"), "a")
        self.running[label] = [None, list(argvs), log]
        self._advance(label)

    def _advance(self, label: str) -> bool:
        entry = self.running[label]
        if not entry[1]:
            entry[2].close()
            del self.running[label]
            return False
        argv = entry[1].pop(0)
        entry[2].write("$ " + " ".join(argv) + "\n")
        entry[2].flush()
        entry[0] = subprocess.Popen(argv, stdout=entry[2], stderr=subprocess.STDOUT)
        return True

    def poll(self) -> List[str]:
        """Advance finished processes; returns labels that ended (with their last exit code != 0 noted)."""
        ended = []
        for label in list(self.running):
            proc = self.running[label][0]
            code = proc.poll()
            if code is None:
                continue
            if code != 0:
                print(f"[{time.strftime('%H:%M:%S')}] {label}: exit {code} (log in {self.logs})", flush=True)
                self.running[label][1].clear()
            if not self._advance(label):
                ended.append(label)
        return ended

    def stop_all(self) -> None:
        for proc, _, log in self.running.values():
            proc.terminate()
        end = time.time() + self.grace
        while time.time() < end and any(proc.poll() is None for proc, _, _ in self.running.values()):
            time.sleep(0.1)
        for proc, _, log in self.running.values():
            if proc.poll() is None:
                proc.kill()
            log.close()
        self.running.clear()


def drain(pool: Pool, queue: list, workers: int, training: Optional[Dict[str, str]] = None) -> list:
    """Run the ``(label, base, out, argvs)`` jobs in order, at most ``workers`` at once; the unstarted ones are returned.

    A job waits for its base folder (``training`` maps the labels of the pool's jobs that train base
    models to their folders; a failed one drops the jobs on that base) and for its own folder (two
    jobs of one folder never run together).
    """
    training = training or {}
    while pool.running or queue:
        for label in pool.poll():
            base = training.get(label)
            if base is not None and not os.path.exists(os.path.join(base, "base.json")):
                print(f"{label} failed: its seed's jobs are dropped", flush=True)
                queue = [job for job in queue if job[1] != base]
        if pool.expired():
            print(f"deadline reached: stopping {len(pool.running)} job(s), {len(queue)} not started", flush=True)
            pool.stop_all()
            break
        for job in list(queue):
            if len(pool.running) >= workers:
                break
            label, base, out, argvs = job
            if base is not None and not os.path.exists(os.path.join(base, "base.json")):
                continue  # its base model is still training
            if any(other.split("@")[0] == label.split("@")[0] for other in pool.running):
                continue  # the same folder is busy (its 8x/16x job before its 2.5x job)
            queue.remove(job)
            if base is not None:
                _copy_base(base, out)
            pool.start(label, argvs)
        time.sleep(1)
    return queue


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", required=True)
    parser.add_argument("--preset", default="ranking")
    parser.add_argument("--methods", nargs="+", help="default: phase 1, then the BatchNorm treatments at --bn-kappa")
    parser.add_argument("--bn-kappa", type=float, default=100.0,
                        help="kappa of the BatchNorm-treatment rows (default 100, the rule's pick on CPU seeds 0-2)")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--root", default=os.path.join("runs", "ranking-parallel"))
    parser.add_argument("--deadline", type=float, default=None, help="seconds from now: no job starts after it")
    parser.add_argument("--skip-2.5x", dest="with_2_5x", action="store_false",
                        help="only the rule's fine-tunings (8x, 16x); the 2.5x ones on a later run")
    args = parser.parse_args(argv)
    start = time.time()
    deadline = None if args.deadline is None else start + args.deadline
    common = ["--device", args.device, "--data-dir", args.data_dir, "--threads", "1"]
    methods = args.methods or phase1_methods() + [kappa_method(args.bn_kappa, f) for f in BN_FLOWS]
    pool = Pool(args.workers, os.path.join(args.root, "logs"), deadline)

    training = {}
    for seed in args.seeds:  # base models first, in parallel (each with its share of the threads)
        base = os.path.join(args.root, f"seed{seed}", "base")
        threads = str(max(1, args.workers // len(args.seeds)))
        training[f"base/s{seed}"] = base
        pool.start(f"base/s{seed}", [_cli("train", args.preset, seed, base,
                                          common[:-1] + [threads])])
    queue = plan(args.seeds, methods, args.preset, args.root, common, args.with_2_5x)
    queue = drain(pool, queue, args.workers, training)
    print(f"done in {time.time() - start:.0f} s; {len(queue)} job(s) not started", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
