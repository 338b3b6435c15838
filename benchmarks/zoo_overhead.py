"""Cost of one Torch-Pruning step with ConnectImportance against GroupTaylorImportance, per zoo model.

For every model of the model-zoo test (tests/test_zoo.py: torchvision and timm, random weights,
32x32 inputs, global pruning toward about 2x with the same ignored layers), this runs what one
``pruner.step()`` runs before it prunes, split in its two parts:

* Torch-Pruning's own part: collecting the pruning groups (``DG.get_all_groups``), the same for
  every importance, timed once;
* the importance's part: scoring every group through ``pruner.estimate_importance`` (what the
  step calls), timed for Taylor, the default ``ConnectImportance()``
  and the data-free ``ConnectImportance(balance=math.inf)`` on the same model and the same loss
  gradients (a backward on 4 random images), each with a fresh importance (one connectivity pass,
  as at every pruning step), median of ``--repeats`` after one warm-up.

A step is the sum of the two parts; the table prints the step ratio ``(tp + connect) / (tp +
taylor)``, the importance-only ratio, which engine path ran, and the time of the default's first
group alone (it runs the connectivity pass; the other groups reuse its gradient).

Usage:
    python -m benchmarks.zoo_overhead [--threads 1] [--repeats 3] [--device cpu|cuda]
        [--models resnet18,mobilenet_v2] [--output results.json] [--time-limit SECONDS]

Target: step ratio <= 3 on every model. Timings on a shared machine drift: report the thread
count and the load average (printed).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_pruning as tp

from connect_tp import ConnectImportance

RATIO, STEPS, SIZE = 0.3, 3, 32


def _torchvision(name, **kwargs):
    import torchvision
    return getattr(torchvision.models, name)(num_classes=10, **kwargs)


def _timm(name, **kwargs):
    import timm
    return timm.create_model(name, pretrained=False, num_classes=10, **kwargs)


# name -> (builder, transformer?)  (the models of tests/test_zoo.py; the two whose group collection
# by Torch-Pruning takes longest last, so that --time-limit cuts them first)
ZOO = {
    "resnet18": (lambda: _torchvision("resnet18"), False),
    "mobilenet_v2": (lambda: _torchvision("mobilenet_v2"), False),
    "mobilenet_v3_small": (lambda: _torchvision("mobilenet_v3_small"), False),
    "efficientnet_b0": (lambda: _torchvision("efficientnet_b0"), False),
    "regnet_y_400mf": (lambda: _torchvision("regnet_y_400mf"), False),
    "convnext_tiny": (lambda: _torchvision("convnext_tiny"), False),
    "vit_b_16": (lambda: _torchvision("vit_b_16", image_size=SIZE), True),
    "timm_vit_tiny_patch16_224": (lambda: _timm("vit_tiny_patch16_224", img_size=SIZE), True),
    "timm_convnext_atto": (lambda: _timm("convnext_atto"), False),
    "timm_efficientnet_b0": (lambda: _timm("efficientnet_b0"), False),
    "timm_resnet18": (lambda: _timm("resnet18"), False),
    "densenet121": (lambda: _torchvision("densenet121"), False),
    "swin_t": (lambda: _torchvision("swin_t"), True),
}


def ignored_layers(model: nn.Module, transformer: bool) -> list:
    """The classifier, and for transformers everything but the first layer of each MLP."""
    ignored = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and m.out_features == 10:
            ignored.append(m)
        elif transformer and isinstance(m, (nn.Linear, nn.Conv2d)) and not (name.endswith("mlp.fc1")
                                                                             or name.endswith("mlp.0")):
            ignored.append(m)
    return ignored


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(name: str, device: str, repeats: int) -> dict:
    build, transformer = ZOO[name]
    torch.manual_seed(0)
    model = build().eval().to(device)
    if name == "vit_b_16":  # a zero head gives every layer a zero loss gradient (see tests/test_zoo.py)
        nn.init.normal_(model.heads.head.weight, std=0.02)
    example = torch.rand(1, 3, SIZE, SIZE, device=device)
    pruner = tp.pruner.MetaPruner(model, example, importance=tp.importance.GroupTaylorImportance(),
                                  global_pruning=True, pruning_ratio=RATIO, iterative_steps=STEPS,
                                  ignored_layers=ignored_layers(model, transformer))
    images = torch.rand(4, 3, SIZE, SIZE, device=device)
    labels = torch.randint(0, 10, (4,), device=device)
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(images), labels).backward()

    _sync(device)
    start = time.perf_counter()
    groups = [g for g in pruner.DG.get_all_groups(ignored_layers=pruner.ignored_layers,
                                                   root_module_types=pruner.root_module_types)
              if pruner._check_pruning_ratio(g)]
    _sync(device)
    tp_ms = 1000 * (time.perf_counter() - start)

    makers = {
        "taylor": lambda: tp.importance.GroupTaylorImportance(),
        "connect": lambda: ConnectImportance(example_inputs=example),
        "connect_data_free": lambda: ConnectImportance(balance=math.inf, example_inputs=example),
    }
    times, firsts, paths = {}, {}, {}
    for key, make in makers.items():
        runs, first_runs = [], []
        for _ in range(repeats + 1):  # the first is a warm-up (allocator, trace)
            imp = make()
            pruner.importance = imp  # scored through the pruner, as pruner.step() scores
            _sync(device)
            start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with torch.no_grad():
                    for i, g in enumerate(groups):
                        pruner.estimate_importance(g)
                        if i == 0:  # the first group's call runs the connectivity pass
                            _sync(device)
                            first_runs.append(1000 * (time.perf_counter() - start))
            _sync(device)
            runs.append(1000 * (time.perf_counter() - start))
        times[key] = statistics.median(runs[1:])
        firsts[key] = statistics.median(first_runs[1:])
        paths[key] = getattr(imp, "engine_path", None)
    row = {"groups": len(groups), "tp_ms": tp_ms, **{f"{k}_ms": v for k, v in times.items()},
           **{f"{k}_first_group_ms": v for k, v in firsts.items()},
           "engine_path": paths["connect"], "engine_path_data_free": paths["connect_data_free"]}
    for key in ("connect", "connect_data_free"):
        row[f"{key}_step_ratio"] = (tp_ms + times[key]) / (tp_ms + times["taylor"])
        row[f"{key}_importance_ratio"] = times[key] / times["taylor"]
    return row


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (1 is steadiest on a busy machine)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--models", default=",".join(ZOO), help="comma-separated subset of: " + ", ".join(ZOO))
    parser.add_argument("--output", default=None,
                        help="write the results as JSON to this path (rewritten after every model)")
    parser.add_argument("--time-limit", type=float, default=None,
                        help="seconds: start no further model after this (the rest are listed as skipped)")
    args = parser.parse_args(argv)
    names = [n for n in args.models.split(",") if n]
    unknown = [n for n in names if n not in ZOO]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {list(ZOO)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA build of torch and a visible GPU")
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"device {args.device}, {args.threads} thread(s), load average {load:.2f}, repeats {args.repeats}")
    header = (f"{'model':28s} {'groups':>6s} {'TP ms':>9s} {'Taylor ms':>10s} {'CoNNect ms':>11s} "
              f"{'data-free ms':>12s} {'1st group':>9s} {'step x':>7s} {'df step x':>9s} {'imp x':>7s}  path")
    print(header)
    rows, start = {}, time.perf_counter()
    result = {"device": args.device, "threads": args.threads, "load_average": load, "repeats": args.repeats,
              "torch": torch.__version__, "models": rows, "skipped": []}
    if args.device.startswith("cuda"):
        result["gpu"] = torch.cuda.get_device_name()
    for name in names:
        if args.time_limit is not None and time.perf_counter() - start > args.time_limit:
            result["skipped"].append(name)
            print(f"{name:28s} skipped (--time-limit {args.time_limit:g} s)")
            continue
        try:
            row = measure(name, args.device, args.repeats)
        except Exception as exc:  # one model's failure must not lose the others' numbers
            result.setdefault("errors", {})[name] = f"{type(exc).__name__}: {exc}"
            print(f"{name:28s} failed: {type(exc).__name__}: {exc}", flush=True)
            continue
        rows[name] = row
        print(f"{name:28s} {row['groups']:6d} {row['tp_ms']:9.1f} {row['taylor_ms']:10.1f} {row['connect_ms']:11.1f} "
              f"{row['connect_data_free_ms']:12.1f} {row['connect_first_group_ms']:9.1f} {row['connect_step_ratio']:7.2f} "
              f"{row['connect_data_free_step_ratio']:9.2f} {row['connect_importance_ratio']:7.1f}  "
              f"{row['engine_path']}", flush=True)
        result["seconds"] = time.perf_counter() - start
        _write(result, args.output)  # after every model: a run cut short keeps what it measured
    result["seconds"] = time.perf_counter() - start
    _write(result, args.output)
    print(f"total {result['seconds']:.1f} s")
    return result


def _write(result: dict, path) -> None:
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    sys.exit(main() and 0)
