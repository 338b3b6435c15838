"""Cost of ConnectImportance over GroupTaylorImportance in one Torch-Pruning step.

For ResNet-56 (CIFAR-10 shape) this times one ``pruner.step()`` of the paper's protocol (global
pruning, pruning_ratio 1.0, 400 iterative steps) with each importance on the same model and the
same loss gradients, and prints the ratio of the medians. The timed step is a steady-state one:
each pruner has already taken one step, as in the 400-step loop where only the first step pays
for warm-up. It also times a whole pruning iteration (the loss backward on one calibration batch,
then the step), which is what a pruning run actually spends per step. Peak memory of each step is measured in a fresh subprocess (on CPU the
peak of live tensor memory replayed from torch.profiler's allocation records; ``torch.cuda.max_memory_allocated`` on CUDA).

Usage:
    python -m benchmarks.importance_overhead [--repeats 7] [--n-samples 4] [--device cpu] [--chunk-size K]

Targets: step ratio <= 3, whole-iteration ratio <= 1.05, and peak extra memory of the
step (CoNNect's peak minus Taylor's) <= 2x the model's parameter bytes, with the default
``n_samples``. Timings on a shared machine drift: run with ``--threads 1`` and report the load.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
import torch_pruning as tp

from connect_tp import ConnectImportance, engine
from connect_tp.models import resnet56

CALIBRATION = 128  # calibration images per pruning step (one batch of the paper's protocol)
RESULTS = os.path.join(os.path.dirname(__file__), "results", "importance_overhead.json")


CHUNK_SIZE = None  # ConnectImportance(chunk_size=...); set by --chunk-size
EVERY_SAMPLE = False  # --every-sample: no mean-input shortcut


def make_importance(name: str, n_samples: int):
    if name == "taylor":
        return tp.importance.GroupTaylorImportance()
    return ConnectImportance(n_samples=n_samples, chunk_size=CHUNK_SIZE)


def prepared_pruner(name: str, n_samples: int, device: str):
    """A ResNet-56 pruner one step into the 400-step protocol, with fresh loss gradients."""
    torch.manual_seed(0)
    model = resnet56(num_classes=10).to(device)
    example = torch.rand(1, 3, 32, 32, device=device)
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(CALIBRATION, 3, 32, 32, generator=generator).to(device)
    y = torch.randint(0, 10, (CALIBRATION,), generator=generator).to(device)
    pruner = tp.pruner.MetaPruner(model, example, importance=make_importance(name, n_samples),
                                  global_pruning=True, pruning_ratio=1.0, iterative_steps=400,
                                  ignored_layers=[model.fc])

    def backward():
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()

    backward()
    pruner.step()  # warm-up step: the timed one is a steady-state step
    backward()
    return pruner, backward


def timed_step(name: str, n_samples: int, device: str) -> tuple:
    """Seconds of one pruner.step(), and of one whole pruning iteration (calibration backward + step)."""
    pruner, backward = prepared_pruner(name, n_samples, device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    start = time.perf_counter()
    pruner.step()
    sync()
    step = time.perf_counter() - start
    start = time.perf_counter()
    backward()
    pruner.step()
    sync()
    return step, time.perf_counter() - start


def plain_torch_floor(n_samples: int, device: str, repeats: int) -> dict:
    """Seconds of the tensor work CoNNect's step cannot avoid, in plain torch (no engine, no checks).

    With the mean-input shortcut a step needs (a) one forward of the ``n_samples`` random inputs
    without gradients (the affine check), unless :func:`connect_tp.engine.affine_by_signs` proves
    the flow affine from the graph (ResNet-56 with the default ``bn_flow``), and (b) one
    forward and backward of their mean, both with ``|W|``. Here they run as ``torch.func.functional_call`` on ResNet-56 with ``|W|``: no scaled
    values, no per-node rules, no overflow guard. Taylor's step plus (a) and (b) is the time a
    zero-overhead implementation of the same estimator would take, so ``floor / taylor`` bounds the
    step ratio from below for this design on this machine.
    """
    torch.manual_seed(0)
    model = resnet56(num_classes=10).to(device).eval()
    leaves = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
    samples = torch.rand(n_samples, 3, 32, 32, device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def check() -> None:
        with torch.no_grad():
            torch.func.functional_call(model, {n: v.abs() for n, v in leaves.items()}, (samples,))

    def gradient() -> None:
        out = torch.func.functional_call(model, {n: v.abs() for n, v in leaves.items()},
                                         (samples.mean(0, keepdim=True),))
        out.sum().backward()

    out = {}
    for name, fn in (("check_forward", check), ("mean_forward_backward", gradient)):
        fn()  # warm-up
        times = []
        for _ in range(repeats):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - start)
        out[name] = statistics.median(times)
    return out


def peak_step_memory(name: str, n_samples: int, device: str) -> int:
    """Bytes of peak tensor memory the step adds (call it in a fresh process)."""
    pruner, _ = prepared_pruner(name, n_samples, device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        pruner.step()
        return torch.cuda.max_memory_allocated() - before
    return peak_cpu_tensor_bytes(pruner.step)


def peak_cpu_tensor_bytes(fn) -> int:
    """Peak of live CPU tensor memory that ``fn()`` adds above what existed when it started.

    Replays the profiler's per-operator allocations (frees are negative) in time order; the
    running total's maximum is the peak.
    """
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def memory_in_subprocess(name: str, n_samples: int, device: str) -> int:
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.importance_overhead", "--memory-child", name,
         "--n-samples", str(n_samples), "--device", device] + (["--every-sample"] if EVERY_SAMPLE else [])
        + (["--chunk-size", str(CHUNK_SIZE)] if CHUNK_SIZE is not None else []),
        check=True, capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)),
    )
    return int(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--n-samples", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (1 is steadiest on a busy machine)")
    parser.add_argument("--chunk-size", type=int, default=None,
                        help="ConnectImportance(chunk_size=...): samples per connectivity pass (default: all)")
    parser.add_argument("--every-sample", action="store_true",
                        help="differentiate every random input (turn off the mean-input shortcut) for comparison")
    parser.add_argument("--out", default=RESULTS, help="where the JSON result is written")
    parser.add_argument("--memory-child", choices=["taylor", "connect"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    global CHUNK_SIZE, EVERY_SAMPLE
    CHUNK_SIZE, EVERY_SAMPLE = args.chunk_size, args.every_sample
    if args.every_sample:  # neither the sign proof nor the sample test may allow the mean input
        engine.affine_by_signs = engine.affine_on_samples = lambda *a, **k: False
    torch.set_num_threads(args.threads)
    if args.memory_child:
        print(peak_step_memory(args.memory_child, args.n_samples, args.device))
        return {}

    times = {"taylor": [], "connect": []}
    iterations = {"taylor": [], "connect": []}
    for _ in range(args.repeats):  # interleaved, so drifting machine load hits both alike
        for name in times:
            step, iteration = timed_step(name, args.n_samples, args.device)
            times[name].append(step)
            iterations[name].append(iteration)
    medians = {name: statistics.median(t) for name, t in times.items()}
    iteration_medians = {name: statistics.median(t) for name, t in iterations.items()}
    floor = plain_torch_floor(args.n_samples, args.device, args.repeats)
    # whether the default importance skips the check pass on this model (then the floor has no check)
    proved = engine.affine_by_signs(resnet56(num_classes=10).eval(), ConnectImportance().bn_flow)
    memory = {name: memory_in_subprocess(name, args.n_samples, args.device) for name in times}
    param_bytes = sum(p.numel() * p.element_size() for p in resnet56(num_classes=10).parameters())
    result = {
        "model": "resnet56", "device": args.device, "threads": args.threads, "n_samples": args.n_samples,
        "repeats": args.repeats, "chunk_size": args.chunk_size, "every_sample": args.every_sample, "median_step_s": medians, "peak_step_memory_bytes": memory,
        "time_ratio": medians["connect"] / medians["taylor"],
        "median_iteration_s": iteration_medians,
        "iteration_time_ratio": iteration_medians["connect"] / iteration_medians["taylor"],
        "param_bytes": param_bytes,
        "extra_memory_over_param_bytes": (memory["connect"] - memory["taylor"]) / param_bytes,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "plain_torch_floor_s": floor,
        "check_proved_from_graph": proved,
        "floor_time_ratio": (medians["taylor"] + floor["mean_forward_backward"]
                             + (0.0 if proved else floor["check_forward"])) / medians["taylor"],
    }
    print(f"ResNet-56 pruner.step() on {args.device}, median of {args.repeats}, n_samples={args.n_samples}, "
          f"chunk_size={args.chunk_size}")
    for name in times:
        print(f"  {name:8s} {medians[name] * 1e3:8.1f} ms   peak step memory {memory[name] / 2**20:7.1f} MiB")
    print(f"  time ratio connect / taylor = {result['time_ratio']:.3f}  (target <= 3)")
    check = ("not needed: the flow is affine by the graph's signs" if proved
             else f"{floor['check_forward'] * 1e3:.1f} ms")
    print(f"  floor: mean-input forward and backward {floor['mean_forward_backward'] * 1e3:.1f} ms in plain torch, "
          f"check forward {check}; (taylor + floor) / taylor = {result['floor_time_ratio']:.3f}, "
          "the least this estimator can cost")
    print(f"  peak extra memory {(memory['connect'] - memory['taylor']) / 2**20:.1f} MiB = "
          f"{result['extra_memory_over_param_bytes']:.2f}x the parameter bytes ({param_bytes / 2**20:.1f} MiB; target <= 2)")
    print(f"  whole iteration (backward on {CALIBRATION} calibration images + step): "
          f"taylor {iteration_medians['taylor'] * 1e3:.1f} ms, connect {iteration_medians['connect'] * 1e3:.1f} ms, "
          f"ratio {result['iteration_time_ratio']:.3f} (target <= 1.05)")
    if result["load_average"] is not None:
        print("  load average (1, 5, 15 min): " + ", ".join(f"{x:.2f}" for x in result["load_average"]))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=2)
    os.replace(tmp, args.out)
    return result


if __name__ == "__main__":
    main()
