"""The robustness benchmark: many pruning trajectories per criterion, the worst one first.

A criterion that is best on average can still empty a stage of the network on one base model out of
five. This benchmark runs every criterion on several base models (seeds) and several calibration
draws per base, and reports per criterion the mean, the worst trajectory and the number of
*collapsed* trajectories (:func:`collapse_reasons`) at 8x and 16x MAC speed-up.

    # base models, then every trajectory with its fine-tuning epoch (one command, resumable)
    python -m benchmarks.robustness run --seeds 3 4 5 6 7 --draws 0 1 --workers 15 --device cuda \\
        --prune-device auto --methods connect l2 l1 --finetune connect l2 l1 --deadline 420 \\
        --hard-deadline 490 --root runs/robustness --data-dir .fmnist
    # tables: OUTPUT/{summary.json,table.md}, the worst case beside the mean, and the rule's verdict
    python -m benchmarks.robustness summarize runs/robustness --output benchmarks/results/robustness/NAME

Protocol (the ``ranking-cosine`` preset's recipe; docs/benchmarks.md, "Does the default collapse on base
models it was not chosen on?"):

- base model: ResNet-20 on all 60k Fashion-MNIST training images, 8 epochs (SGD 0.1, x0.1 at 4, 6);
- pruning: Torch-Pruning's 400-step global loop, the classifier ignored, snapshots at 8x and 16x;
  gradient criteria use 256 fixed calibration images, one *draw* of them per (base, draw) pair,
  shared by every criterion;
- each snapshot: its widths, the layer-collapse flags of :func:`connect_tp.pruning.layer_report`,
  test accuracy raw and after re-estimating BatchNorm on the calibration images (prune-only, cheap);
- the trajectories that decide: one fine-tuning epoch on all 60k images, the rate decayed to 0 by a
  per-batch cosine, then the 10k test images.

Every job writes its own JSON file, so the same ``run`` command continues where a deadline stopped
it; a criterion is a *method spec*: a pipeline method name (:mod:`connect_tp.pipeline.methods`),
optionally followed by ``+variant`` options of this benchmark (:data:`VARIANTS`).
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

# --------------------------------------------------------------------------------- the definitions
# Written before any trajectory of this benchmark ran; the summary applies them to every result.
# They judge the last stage only: at 16x every criterion leaves the first stage's residual stream at
# 1-3 channels and some second-stage convolutions at 1 (where the MACs are), and those models still
# fine-tune to 80-86 % (the ranking benchmark, seeds 0-2), so counting them would flag every
# trajectory. The failure this benchmark looks for empties the last stage: 41.7 % with its stream at
# 3 channels and one of its convolutions at 1.
STREAM_MIN = 4
"""The last stage's residual stream at this many channels or fewer is a collapse."""
CONV_MIN = 1
"""A last-stage convolution left with this many output channels or fewer is a collapse."""
FINETUNED_16X_MIN = 70.0
"""At 16x, a fine-tuned accuracy (%) below this is a collapse (the structure could not be repaired)."""
TARGETS = (8.0, 16.0)

PROTOCOL = dict(epochs=8, lr=0.1, milestones=[4, 6], weight_decay=5e-4, batch_size=128,
                train_subset=None, test_subset=None, iterative_steps=400, calibration_samples=256,
                ft_epochs=1, ft_lr=0.01, ft_schedule="cosine")
"""The recipe (the ``ranking-cosine`` preset's numbers); ``run --tiny`` shrinks it for a smoke test."""

TINY = dict(PROTOCOL, epochs=1, milestones=[], train_subset=512, test_subset=256, iterative_steps=40,
            calibration_samples=64)

VARIANTS = {
    "refresh": "BatchNorm statistics re-estimated on the calibration images before every pruning step",
    "held": "balance_schedule='every_step': lambda re-derived from the current loss and connectivity "
            "masses at every step (a finite balance)",
    "protect": "a last-channels guard: each channel's score plus -log(1 - s), s its share of the flow "
               "through its layer (the exact loss of log phi when it goes), which grows without bound as "
               "a layer empties",
    "gos": "BatchNorm in phi as its linear scale |gamma| / sqrt(running_var + eps), without the shift "
           "(bn_flow='scale'; 'connect-kinf+gos' is 'connect-kinf-bnscale')",
    "guard": "bn_flow='stats' with each BatchNorm's running variance floored at "
             "GUARD_FLOOR x its layer's median, so a near-constant channel cannot dominate phi",
}
"""``+variant`` suffixes of a method spec (CoNNect only) and what they change."""

GUARD_FLOOR = 0.05
"""``+guard``: the running variances are floored at this fraction of their layer's median."""

PROTECT_WEIGHT = 1.0
"""``+protect``: weight of the -log(1 - s) term, added to scores normalized to mean 1 per group."""

SHARE_CEILING = 1.0 - 1e-6
"""``+protect``: shares are clipped below 1, so the last channel of a layer gets a large finite bonus."""

DEFAULT_METHODS = ["connect", "l2", "l1", "connect-k100", "connect-kinf", "connect-kinf-bngamma", "lamp",
                   "random", "taylor", "uniform", "connect+refresh", "connect-kinf-bnidentity"]
"""Run order: the default and the built-ins that collapsed elsewhere first, so a cut-off run has them."""


def parse_spec(spec: str) -> Tuple[str, List[str]]:
    """``"connect+refresh"`` -> ``("connect", ["refresh"])``; the method name is checked.

    Raises:
        ValueError: an unknown method name or variant, naming the accepted ones.
    """
    from connect_tp.pipeline.methods import parse_method

    name, *variants = spec.split("+")
    parse_method(name)
    for v in variants:
        if v not in VARIANTS:
            raise ValueError(f"unknown variant +{v} in {spec!r}; choose from {sorted(VARIANTS)}")
    if len(set(variants)) != len(variants):
        raise ValueError(f"variant repeated in {spec!r}")
    return name, variants


def uses_calibration(spec: str) -> bool:
    """Whether a method's pruning loop runs the calibration images through the model at every step
    (loss gradients, or the BatchNorm refresh): the part of the loop a GPU speeds up."""
    from connect_tp.importance import DEFAULT_BALANCE
    from connect_tp.pipeline.methods import parse_method

    name, variants = parse_spec(spec)
    criterion, options = parse_method(name)
    if "refresh" in variants or criterion == "taylor":
        return True
    if criterion != "connect":
        return False
    return "lam" in options or options.get("balance", DEFAULT_BALANCE) != math.inf


def calibration_seed(seed: int, draw: int) -> int:
    """The seed of the calibration images of (base ``seed``, ``draw``); no pipeline run uses these."""
    return 1000 * (draw + 1) + seed


# ------------------------------------------------------------------------------ collapse and stats
def stage_widths(channels: Dict[str, Sequence[int]]) -> Dict[str, Any]:
    """Residual-stream and inner widths per ResNet stage, and the narrowest convolution.

    Args:
        channels: ``{layer: [in, out]}`` (:func:`connect_tp.pruning.layer_channels`).

    Returns:
        ``{"stream": [w1, w2, w3], "inner_min": [...], "min_conv": (name, width)}``: a stage's stream
        is the narrowest output of its blocks' second convolutions (the residual sum they share).
    """
    stream, inner = [], []
    for stage in ("layer1", "layer2", "layer3"):
        out2 = [v[1] for k, v in channels.items() if k.startswith(stage + ".") and k.endswith("conv2")]
        out1 = [v[1] for k, v in channels.items() if k.startswith(stage + ".") and k.endswith("conv1")]
        if out2:
            stream.append(min(out2))
        if out1:
            inner.append(min(out1))
    # Every layer but the last (the classifier, never pruned) is a convolution in these models.
    convs = [(k, v[1]) for k, v in list(channels.items())[:-1]]
    narrowest = min(convs, key=lambda kv: kv[1]) if convs else (None, None)
    return {"stream": stream, "inner_min": inner, "min_conv": list(narrowest)}


def collapse_reasons(snapshot: Dict[str, Any], target: float, finetuned_acc: Optional[float] = None) -> List[str]:
    """Why a snapshot counts as collapsed (empty list: it does not).

    Args:
        snapshot: a trajectory's record at one target (``channels``, ``collapsed_layers``, or
            ``unreachable`` when the trajectory never got there).
        target: its speed-up.
        finetuned_acc: its accuracy after the fine-tuning epoch, when it was fine-tuned.
    """
    if snapshot.get("unreachable"):
        return [f"never reached {target:g}x"]
    reasons = []
    channels = snapshot["channels"]
    widths = stage_widths(channels)
    if widths["stream"] and widths["stream"][-1] <= STREAM_MIN:
        reasons.append(f"last stage's residual stream at {widths['stream'][-1]} <= {STREAM_MIN}")
    last = f"layer{len(widths['stream'])}."
    for name, (_, w) in channels.items():
        if name.startswith(last) and w <= CONV_MIN:
            reasons.append(f"{name} at {w} channel(s)")
    if snapshot.get("collapsed_layers"):
        reasons.append("no path through " + ", ".join(snapshot["collapsed_layers"]))
    if target >= 16.0 and finetuned_acc is not None and finetuned_acc < FINETUNED_16X_MIN:
        reasons.append(f"fine-tuned {finetuned_acc:.1f} % < {FINETUNED_16X_MIN:g} %")
    return reasons


def worst_first(values: Sequence[Tuple[float, str]]) -> Dict[str, Any]:
    """Mean, sample std, worst value and its label, of ``(value, label)`` pairs (None values dropped)."""
    values = [(v, lab) for v, lab in values if v is not None]
    if not values:
        return {"n": 0, "mean": None, "std": None, "worst": None, "worst_at": None, "best": None}
    nums = [v for v, _ in values]
    worst = min(values, key=lambda vl: vl[0])
    return {"n": len(nums), "mean": statistics.fmean(nums), "std": statistics.stdev(nums) if len(nums) > 1 else 0.0,
            "worst": worst[0], "worst_at": worst[1], "best": max(nums)}


# ------------------------------------------------------------------------------------------ files
def base_path(root: str, seed: int) -> str:
    return os.path.join(root, "bases", f"seed{seed}.pt")


def traj_path(root: str, spec: str, seed: int, draw: int, kind: str = "prune") -> str:
    """``prune``: the trajectory's JSON; ``finetune``: its fine-tuning JSON; ``8``/``16``: a snapshot."""
    stem = os.path.join(root, "traj", spec, f"s{seed}-d{draw}")
    return {"prune": stem + ".json", "finetune": stem + "-ft.json"}.get(kind, f"{stem}-{kind}x.pt")


def _write_json(path: str, obj: Any) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=float)
    os.replace(tmp, path)  # atomic: a job killed by the deadline leaves no half file


def _read_json(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


# ------------------------------------------------------------------------------------------ stages
def _setup(threads: int, device: str):
    import torch

    torch.set_num_threads(threads)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no GPU is visible; use --device cpu")
    return torch


def _environment(device: str) -> Dict[str, Any]:
    import torch

    try:
        import torch_pruning
        tp_version = getattr(torch_pruning, "__version__", None)
    except ImportError:  # pragma: no cover
        tp_version = None
    return {"torch": torch.__version__, "torch_pruning": tp_version, "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(), "load_avg_1min": os.getloadavg()[0],
            "accelerator": torch.cuda.get_device_name() if device.startswith("cuda") else None}


def _data(data_dir: str, protocol: Dict[str, Any], seed: int):
    from connect_tp.data import load_datasets

    return load_datasets("fashion_mnist", data_dir, False, protocol["train_subset"], protocol["test_subset"],
                         seed=seed)


def _test_acc(model, test_set, device) -> float:
    from connect_tp.training import evaluate, make_loader

    return evaluate(model, make_loader(test_set, 256, False), device)["acc"]


def train_base(root: str, seed: int, protocol: Dict[str, Any], data_dir: str, device: str) -> Dict[str, Any]:
    """Train and save base model ``seed`` (``root/bases/seed<seed>.pt`` and ``.json``)."""
    from connect_tp.models import create_model
    from connect_tp.training import fit, save_model_checkpoint, set_seed

    start = time.time()
    train_set, test_set, info = _data(data_dir, protocol, seed)
    set_seed(seed)
    model = create_model("resnet20", info.num_classes, info.in_channels)
    out = fit(model, train_set, test_set, epochs=protocol["epochs"], lr=protocol["lr"],
              milestones=protocol["milestones"], weight_decay=protocol["weight_decay"],
              batch_size=protocol["batch_size"], device=device, seed=seed, progress=False)
    path = base_path(root, seed)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_model_checkpoint(path, model.cpu(), {"model": "resnet20", "num_classes": info.num_classes,
                                              "in_channels": info.in_channels})
    result = {"seed": seed, "acc": out["best_acc"], "final_acc": out["final_acc"], "protocol": protocol,
              "seconds": time.time() - start, "environment": _environment(device)}
    _write_json(path[:-3] + ".json", result)  # written last: its presence means the base is complete
    return result


def adopt_ranking_base(root: str, ranking_folder: str) -> Dict[str, Any]:
    """Copy a ranking-benchmark base model (``ranking_folder/base.pt``, its best epoch) in as a base here.

    The ranking benchmark trains its bases (seeds 0-2) with this benchmark's recipe, so its trajectories
    can be extended with this benchmark's calibration draws. Its own calibration set is what
    :func:`read_ranking` reads as draw 0: run draws >= 1 on an adopted base.

    Raises:
        SystemExit: the folder is not a ranking run, or this root has another base under that seed.
    """
    from connect_tp.training import load_model_checkpoint, save_model_checkpoint

    info = _read_json(os.path.join(ranking_folder, "base.json"))
    if info.get("preset") != "ranking" or info.get("model") != "resnet20":
        raise SystemExit(f"error: {ranking_folder} is not a ranking-benchmark run folder")
    seed, path = info["seed"], base_path(root, info["seed"])
    if os.path.exists(path[:-3] + ".json"):
        raise SystemExit(f"error: {root} has a base model {seed} already; adopt into another --root")
    model, ckpt = load_model_checkpoint(os.path.join(ranking_folder, "base.pt"))
    model.load_state_dict(ckpt.get("best_state_dict") or ckpt["state_dict"])  # the ranking uses its best epoch
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_model_checkpoint(path, model, ckpt["arch"])
    result = {"seed": seed, "acc": info["acc"], "final_acc": info.get("final_acc"), "protocol": _ranking_protocol(),
              "seconds": info.get("seconds"), "adopted_from": ranking_folder, "environment": _environment("cpu")}
    _write_json(path[:-3] + ".json", result)
    return result


def _variant_class(variants: Sequence[str]):
    """A :class:`~connect_tp.importance.ConnectImportance` subclass with the scoring variants asked for."""
    import torch
    import torch.nn as nn
    from connect_tp.importance import ConnectImportance

    class Variant(ConnectImportance):
        def __init__(self, **options):
            if "held" in variants:  # the library's option (it refuses a balance of 0 or inf, or lam=)
                options["balance_schedule"] = "every_step"
            if "gos" in variants:  # the library's bn_flow="scale" (the suffix predates its public name)
                options["bn_flow"] = "scale"
            super().__init__(**options)
            self.variants = tuple(variants)
            if "guard" in variants and self.bn_flow != "stats":
                raise ValueError(f"+guard floors the running variances of bn_flow='stats'; this method has "
                                 f"bn_flow={self.bn_flow!r} (name it without -bn, or with -bnstats)")
            self.lam_history: List[float] = []

        def _full_refresh(self, model, graph=None, resolve=True):
            super()._full_refresh(model, graph, resolve)
            if resolve and self.lam is not None:
                self.lam_history.append(float(self.lam))

        def _connectivity_gradients(self, model, params, graph=None):
            if "guard" not in self.variants:
                return super()._connectivity_gradients(model, params, graph)
            norms = [m for m in model.modules()
                     if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_var is not None]
            saved = [m.running_var.detach().clone() for m in norms]
            try:
                with torch.no_grad():
                    for m in norms:
                        m.running_var.clamp_(min=GUARD_FLOOR * float(m.running_var.median()))
                return super()._connectivity_gradients(model, params, graph)
            finally:
                with torch.no_grad():
                    for m, v in zip(norms, saved):
                        m.running_var.copy_(v)

        @torch.no_grad()
        def __call__(self, group):
            scores = super().__call__(group)
            if "protect" not in self.variants or scores is None or self.lam == 0 or not self._connectivity_grads:
                return scores
            share = torch.zeros_like(scores, dtype=torch.float64)
            for i, (dep, idxs) in enumerate(group):
                layer = dep.target.module
                if not isinstance(layer, (nn.modules.conv._ConvNd, nn.Linear)):
                    continue
                for local in self._channel_scores(layer, dep.handler, idxs,
                                                  lambda p: self._connectivity_grads.get(id(p))):
                    root = torch.as_tensor(group[i].root_idxs, device=share.device)
                    share[root] = torch.maximum(share[root], local.to(share))
            bonus = -torch.log1p(-share.clamp(max=SHARE_CEILING))
            return scores + PROTECT_WEIGHT * bonus.to(scores)

    return Variant


def build(spec: str, example_inputs, seed: int):
    """The importance object and the extra :func:`progressive_prune` options of a method spec.

    Raises:
        ValueError: a scoring variant on a method that is not CoNNect, or one that does not fit its options.
    """
    from connect_tp.pipeline.methods import connect_options, parse_method
    from connect_tp.pruning import build_importance

    name, variants = parse_spec(spec)
    options = {"bn_refresh_every": 1} if "refresh" in variants else {}
    scoring = [v for v in variants if v != "refresh"]
    if not scoring:
        return build_importance(name, example_inputs, seed=seed), options
    if parse_method(name)[0] != "connect":
        raise ValueError(f"+{scoring[0]} changes CoNNect's scores; {name!r} is not a connect method")
    return _variant_class(scoring)(example_inputs=example_inputs, **connect_options(name)), options


def prune_trajectory(root: str, spec: str, seed: int, draw: int, protocol: Dict[str, Any], data_dir: str,
                     device: str, prune_device: Optional[str] = None) -> Dict[str, Any]:
    """One trajectory to 16x: widths, collapse flags and accuracies at each target; snapshots saved.

    The pruning loop runs on ``prune_device`` (default ``device``), the evaluations on ``device``: on a
    machine shared by many worker processes the loop's small steps are faster on one CPU thread each
    than time-sliced on one GPU.
    """
    prune_device = prune_device or device
    import torch
    from connect_tp.pruning import (UnreachableSpeedUp, calibration_batches, layer_channels, layer_report,
                                    progressive_prune, recalibrate_batchnorm)
    from connect_tp.training import load_model_checkpoint, save_model_checkpoint

    start = time.time()
    base_json = _read_json(base_path(root, seed)[:-3] + ".json")
    if base_json["protocol"] != protocol:
        raise SystemExit(f"error: base model {seed} in {root} was trained with another protocol "
                         f"({base_json['protocol']}); use another --root")
    model, ckpt = load_model_checkpoint(base_path(root, seed))
    train_set, test_set, _ = _data(data_dir, protocol, seed)
    cseed = calibration_seed(seed, draw)
    calibration = calibration_batches(train_set.without_augmentation(), protocol["calibration_samples"],
                                      protocol["batch_size"], seed=cseed)
    example = torch.rand(1, 1, 32, 32)
    torch.manual_seed(cseed)  # Torch-Pruning's random importance draws from the global generator
    importance, options = build(spec, example, cseed)
    snaps: Dict[str, Any] = {}

    def on_target(snap) -> None:
        m = snap.model
        report = layer_report(m, example.to(prune_device))
        m.to(device)
        snaps[f"{snap.target:g}"] = {
            "step": snap.step, "speed_up": snap.speed_up, "macs": snap.macs, "params": snap.params,
            "channels": layer_channels(m), "collapsed_layers": report["collapsed_layers"],
            "dead_channels": report["dead_channels"], "disconnected": report["network_disconnected"],
            "acc_raw": _test_acc(m, test_set, device),
            "acc_bn": _test_acc(recalibrate_batchnorm(m, calibration, device), test_set, device),
            "seconds": time.time() - start}
        save_model_checkpoint(traj_path(root, spec, seed, draw, f"{snap.target:g}"), m.cpu(), ckpt["arch"])
        m.to(device)

    os.makedirs(os.path.dirname(traj_path(root, spec, seed, draw)), exist_ok=True)
    error = None
    try:
        progressive_prune(model, example, importance, TARGETS, calibration=calibration,
                          iterative_steps=protocol["iterative_steps"], device=prune_device, on_target=on_target,
                          progress=False, **options)
    except UnreachableSpeedUp as exc:
        error = str(exc)
        for t in TARGETS:
            snaps.setdefault(f"{t:g}", {"unreachable": True, "reached": exc.reached})
    lam = getattr(importance, "lam", None)
    history = getattr(importance, "lam_history", None)
    settings = ({"balance": importance.balance, "bn_flow": importance.bn_flow}
                if hasattr(importance, "bn_flow") else None)  # names plain `connect` whatever the default was
    result = {"lam_history": history[::10] if history else None, "method": spec, "seed": seed, "draw": draw,
              "calibration_seed": cseed, "protocol": protocol, "base_acc": base_json["acc"], "snapshots": snaps,
              "error": error, "connect_lam": lam if isinstance(lam, (int, float)) else None,
              "connect_settings": settings,
              "prune_seconds": time.time() - start, "prune_device": prune_device,
              "environment": _environment(device)}
    _write_json(traj_path(root, spec, seed, draw), result)
    return result


def finetune(root: str, spec: str, seed: int, draw: int, protocol: Dict[str, Any], data_dir: str,
             device: str) -> Dict[str, Any]:
    """The fine-tuning epoch for each saved snapshot of a trajectory."""
    from connect_tp.training import fit, load_model_checkpoint, set_seed

    start = time.time()
    prune = _read_json(traj_path(root, spec, seed, draw))
    if prune["protocol"] != protocol:
        raise SystemExit(f"error: {traj_path(root, spec, seed, draw)} was pruned with another protocol")
    train_set, test_set, _ = _data(data_dir, protocol, seed)
    accs = {}
    for key, snap in prune["snapshots"].items():
        if snap.get("unreachable"):
            continue
        model, _ = load_model_checkpoint(traj_path(root, spec, seed, draw, key))
        set_seed(seed)
        out = fit(model, train_set, test_set, epochs=protocol["ft_epochs"], lr=protocol["ft_lr"], milestones=[],
                  weight_decay=protocol["weight_decay"], batch_size=protocol["batch_size"], device=device,
                  seed=seed, progress=False, schedule=protocol["ft_schedule"])
        accs[key] = out["final_acc"]
    result = {"method": spec, "seed": seed, "draw": draw, "protocol": protocol, "finetuned_acc": accs,
              "seconds": time.time() - start, "environment": _environment(device)}
    _write_json(traj_path(root, spec, seed, draw, "finetune"), result)
    return result


# ------------------------------------------------------------------------------------------ driver
def _check_same_default(path: str, spec: str) -> None:
    """Refuse to continue a plain ``connect`` trajectory that ran under another library default.

    Raises:
        SystemExit: ``path`` exists and ran ``ConnectImportance()`` with other settings than today's.
    """
    if spec.split("+")[0] != "connect" or not os.path.exists(path):
        return
    then = method_name(_read_json(path))
    now = method_name({"method": spec, "connect_settings": _default_settings()})
    if then != now:
        raise SystemExit(f"error: {path} ran plain `connect` as {then}, but ConnectImportance() is now {now}; "
                         f"use another --root, or name the method by its settings (e.g. {now})")


def plan(root: str, seeds: Sequence[int], draws: Sequence[int], methods: Sequence[str],
         finetune_methods: Sequence[str]) -> List[Dict[str, Any]]:
    """Jobs not yet done, in order: base models, then the trajectories draw by draw (every method on
    draw 0 of every base, in the order given, before any draw 1), then fine-tunings of trajectories
    pruned earlier without them. Each job names the file whose presence means it is done and the
    file it needs first."""
    jobs = []
    for s in seeds:
        path = base_path(root, s)[:-3] + ".json"
        jobs.append({"label": f"base/s{s}", "stage": "train", "args": ["--seed", str(s)], "done": path,
                     "needs": None})
    later = []
    for d in draws:
        for spec in methods:
            for s in seeds:
                args = ["--seed", str(s), "--draw", str(d), "--method", spec]
                _check_same_default(traj_path(root, spec, s, d), spec)
                tuned = spec in finetune_methods
                done = traj_path(root, spec, s, d, "finetune" if tuned else "prune")
                if os.path.exists(done):
                    continue
                snapshots = all(os.path.exists(traj_path(root, spec, s, d, f"{t:g}")) for t in TARGETS)
                if tuned and os.path.exists(traj_path(root, spec, s, d)) and snapshots:
                    later.append({"label": f"finetune/{spec}/s{s}-d{d}", "stage": "finetune", "args": args,
                                  "done": done, "needs": None})
                else:  # pruned again when its snapshots are gone (the loop is deterministic on a CPU)
                    jobs.append({"label": f"prune/{spec}/s{s}-d{d}", "stage": "prune",
                                 "args": args + (["--finetune"] if tuned else []), "done": done,
                                 "needs": base_path(root, s)[:-3] + ".json"})
    return [j for j in jobs + later if not os.path.exists(j["done"])]


def run(args) -> int:
    """Run the planned jobs in at most ``--workers`` processes; stop starting them at ``--deadline``."""
    for spec in list(args.methods) + list(args.finetune):
        parse_spec(spec)
    start = time.time()
    deadline = None if args.deadline is None else start + args.deadline
    hard = None if args.hard_deadline is None else start + args.hard_deadline
    durations: List[float] = []  # of finished trajectory jobs: a job that cannot end before `hard` is not started
    jobs = plan(args.root, args.seeds, args.draws, args.methods, args.finetune)
    logs = os.path.join(args.root, "logs")
    os.makedirs(logs, exist_ok=True)
    common = ["--root", args.root, "--device", args.device, "--data-dir", args.data_dir] + \
        (["--tiny"] if args.tiny else [])
    running: Dict[str, Tuple[subprocess.Popen, Any, str, float]] = {}  # label -> (process, log, output, start)
    failed: List[str] = []
    training = [j for j in jobs if j["stage"] == "train"]
    base_threads = max(1, args.workers // max(1, len(training)))
    print(f"[robustness] {len(jobs)} job(s) to run, {args.workers} worker(s)", flush=True)

    def launch(job) -> None:
        threads = base_threads if job["stage"] == "train" else 1
        argv = [sys.executable, "-m", "benchmarks.robustness", job["stage"], *job["args"], *common,
                "--threads", str(threads)]
        if job["stage"] == "prune":
            where = args.prune_device
            if where == "auto":  # the per-step calibration passes on the GPU, data-free loops on a core each
                where = args.device if uses_calibration(job["args"][job["args"].index("--method") + 1]) else "cpu"
            argv += ["--prune-device", where]
        log = open(os.path.join(logs, job["label"].replace("/", "_") + ".log"), "a")
        log.write("$ " + " ".join(argv) + "\n")
        log.flush()
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        running[job["label"]] = (subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env), log,
                                 job["done"], time.time())

    while jobs or running:
        for label, (proc, log, _, began) in list(running.items()):
            code = proc.poll()
            if code is not None:
                log.close()
                del running[label]
                if code == 0 and not label.startswith("base/"):
                    durations.append(time.time() - began)
                print(f"[{time.time() - start:5.0f} s] {label}: {'done' if code == 0 else f'exit {code}'}", flush=True)
                if code != 0:
                    failed.append(label)
        now = time.time()
        if jobs and ((deadline is not None and now > deadline) or (
                hard is not None and durations and now + statistics.median(durations) > hard)):
            print(f"[robustness] {now - start:.0f} s: no more jobs start; {len(jobs)} not started", flush=True)
            jobs = []
        if hard is not None and now > hard and running:
            print(f"[robustness] hard deadline: stopping {len(running)} running job(s)", flush=True)
            for proc, _, _, _ in running.values():
                proc.terminate()
            grace = time.time() + 15
            while time.time() < grace and any(p.poll() is None for p, _, _, _ in running.values()):
                time.sleep(0.2)
            for proc, log, _, _ in running.values():
                if proc.poll() is None:
                    proc.kill()
                log.close()
            break
        waiting_for = {j["done"] for j in jobs} | {out for _, _, out, _ in running.values()}
        for job in list(jobs):
            if len(running) >= args.workers:
                break
            if job["needs"] is not None and not os.path.exists(job["needs"]):
                if job["needs"] not in waiting_for:  # what it needs failed or was stopped: drop it
                    jobs.remove(job)
                    print(f"[robustness] {job['label']}: dropped ({job['needs']} was not made)", flush=True)
                continue
            jobs.remove(job)
            launch(job)
        time.sleep(0.5)
    print(f"[robustness] finished in {time.time() - start:.0f} s; failed: {failed or 'none'}", flush=True)
    return 0


# ----------------------------------------------------------------------------------------- summary
def read_results(roots: Sequence[str], first_wins: bool = False) -> Tuple[List[Dict[str, Any]], List[Dict[str, Any]]]:
    """Every trajectory (with its fine-tuning numbers merged in) and every base model under ``roots``.

    Args:
        first_wins: a trajectory found in several roots is taken from the first root given (and the
            others are listed in its ``also_in``) instead of refused.

    Raises:
        SystemExit: the files were made with different protocols (summarize each on its own), or a
            trajectory is in two roots without ``first_wins``.
    """
    trajs, bases, protocols = [], {}, set()
    for root in roots:
        for path in sorted(glob.glob(os.path.join(root, "bases", "seed*.json"))):
            base = _read_json(path)
            bases.setdefault(base["seed"], base)  # the same base copied into several roots counts once
        for path in sorted(glob.glob(os.path.join(root, "traj", "*", "s*-d*.json"))):
            if path.endswith("-ft.json"):
                continue
            r = _read_json(path)
            ft = path[:-5] + "-ft.json"
            r["finetuned_acc"] = _read_json(ft)["finetuned_acc"] if os.path.exists(ft) else {}
            r["source"], r["spec"] = root, r["method"]
            r["method"] = method_name(r)
            trajs.append(r)
    for r in trajs + list(bases.values()):
        protocols.add(json.dumps(r["protocol"], sort_keys=True))
    if len(protocols) > 1:
        raise SystemExit(f"error: these results were made with {len(protocols)} different protocols; "
                         "summarize each root on its own")
    return merge_trajectories(trajs, first_wins), [bases[s] for s in sorted(bases)]


def merge_trajectories(trajs: Sequence[Dict[str, Any]], first_wins: bool = False) -> List[Dict[str, Any]]:
    """``trajs`` with each (method, base, draw) once, in the order given.

    Raises:
        SystemExit: one is given twice and ``first_wins`` is off; with it on, the first copy is kept
            and the later copies' sources are listed in its ``also_in`` (the summary shows them).
    """
    kept: Dict[Tuple[str, int, int], Dict[str, Any]] = {}
    for r in trajs:
        key = (r["method"], r["seed"], r["draw"])
        if key not in kept:
            kept[key] = r
        elif first_wins:
            kept[key].setdefault("also_in", []).append(r.get("source"))
        else:
            raise SystemExit(f"error: {r['method']} on base {r['seed']}, draw {r['draw']}, is in two sources "
                             f"({kept[key].get('source')}, {r.get('source')}); summarize each copy once, or "
                             "pass --first-wins to take the first source's copy")
    return list(kept.values())


LEGACY_DEFAULT = "connect-k100-bngamma"
"""What plain ``connect`` ran in trajectory files that do not record its settings: every such file was
written while ``ConnectImportance()`` meant ``balance=100, bn_flow="gamma"``."""


def method_name(trajectory: Dict[str, Any]) -> str:
    """The name a trajectory is summarized under, which never depends on when it ran.

    Plain ``connect`` (``ConnectImportance()``) becomes the explicit name of the settings it ran with
    (recorded as ``connect_settings``; :data:`LEGACY_DEFAULT` in older files), and the ``+gos`` variant
    becomes the library's ``-bnscale`` name it equals (``connect-kinf+gos`` -> ``connect-kinf-bnscale``),
    so one criterion gets one row across roots, ranking folders and library defaults.
    """
    from benchmarks.ranking import kappa_method
    from connect_tp.pipeline.methods import NAMED_BN_FLOW

    name, *variants = trajectory["method"].split("+")
    if name == "connect":
        settings = trajectory.get("connect_settings")
        if settings:
            flow = settings["bn_flow"]
            name = kappa_method(float(settings["balance"]), None if flow == NAMED_BN_FLOW else flow)
        else:
            name = LEGACY_DEFAULT
    if "gos" in variants:
        variants.remove("gos")
        name = name.split("-bn")[0] + "-bnscale"
    return "+".join([name] + variants)


def library_default_name() -> str:
    """``ConnectImportance()``'s settings as a method name (``connect-k100-bngamma``, ...)."""
    return method_name({"method": "connect", "connect_settings": _default_settings()})


def _default_settings() -> Dict[str, Any]:
    from connect_tp.importance import DEFAULT_BALANCE, DEFAULT_BN_FLOW

    return {"balance": DEFAULT_BALANCE, "bn_flow": DEFAULT_BN_FLOW}


def _ranking_protocol() -> Dict[str, Any]:
    """This benchmark's :data:`PROTOCOL` as the ``ranking`` preset states it, checked to agree."""
    from connect_tp.pipeline.config import PRESETS

    p = PRESETS["ranking"]
    mine = dict(epochs=p["base_epochs"], lr=p["base_lr"], milestones=list(p["base_milestones"]),
                weight_decay=p["weight_decay"], batch_size=p["batch_size"], train_subset=p["train_subset"],
                test_subset=p["test_subset"], iterative_steps=p["iterative_steps"],
                calibration_samples=p["calibration_samples"], ft_epochs=p["ft_epochs"], ft_lr=p["ft_lr"],
                ft_schedule="cosine")
    if mine != PROTOCOL:  # pragma: no cover - a guard for whoever edits one of the two recipes
        raise SystemExit("error: the ranking preset no longer has this benchmark's recipe; its results cannot "
                         "be summarized here")
    return dict(PROTOCOL)


def read_ranking(folders: Sequence[str]) -> Tuple[List[Dict[str, Any]], List[Dict[str, Any]]]:
    """Trajectories and bases of ranking-benchmark run folders (``.../seed<s>/<method>``), in this shape.

    The ranking benchmark (``connect-tp prune --preset ranking`` and ``finetune --ft-schedule cosine``)
    runs this benchmark's recipe on its own base models (seeds 0-2), with one calibration set per seed:
    it is read as draw 0 of that base. Its committed folders add three more bases at no cost.

    Raises:
        SystemExit: a folder is not a ranking run, or its fine-tuning used another schedule.
    """
    protocol = _ranking_protocol()
    trajs, bases = [], {}
    for folder in folders:
        base = _read_json(os.path.join(folder, "base.json"))
        if base.get("preset") != "ranking" or base.get("model") != "resnet20":
            raise SystemExit(f"error: {folder} is not a ranking-benchmark run folder (preset "
                             f"{base.get('preset')!r}, model {base.get('model')!r})")
        bases.setdefault(base["seed"], {"seed": base["seed"], "acc": base["acc"], "seconds": base.get("seconds"),
                                        "protocol": protocol})
        by_method: Dict[str, Dict[str, Any]] = {}
        for path in sorted(glob.glob(os.path.join(folder, "results", "*.json"))):
            res = _read_json(path)
            key = f"{res['target_speed_up']:g}"
            if key not in {f"{t:g}" for t in TARGETS}:
                continue
            if res["method"] == "connect":
                raise SystemExit(f"error: {path} ran plain `connect`, whose settings its file does not name; "
                                 "summarize ranking folders of named methods (connect-k100-bngamma, ...)")
            method = res["method"]
            r = by_method.setdefault(method, {
                "method": method, "seed": res["seed"], "draw": 0, "protocol": protocol, "source": folder,
                "base_acc": res["base_acc"], "snapshots": {}, "finetuned_acc": {}, "prune_seconds": None,
                "environment": dict({"accelerator": None, "torch_pruning": None}, **res["environment"])})
            r["snapshots"][key] = {"step": res["step"], "speed_up": res["speed_up"], "macs": res["macs"],
                                   "channels": res["channels"], "collapsed_layers": res["collapsed_layers"],
                                   "acc_raw": res["pruned_acc"], "acc_bn": res["pruned_acc_bn_recalibrated"]}
            if res.get("finetuned_acc") is not None:
                schedule = res.get("provenance", {}).get("finetune", {}).get("config", {}).get("schedule")
                if schedule != "cosine":
                    raise SystemExit(f"error: {path} was fine-tuned with schedule {schedule!r}, not this "
                                     "benchmark's cosine epoch; summarize the ranking-cosine folders")
                r["finetuned_acc"][key] = res["finetuned_acc"]
        trajs.extend(by_method.values())
    return trajs, [bases[s] for s in sorted(bases)]


def summarize_method(trajs: Sequence[Dict[str, Any]], target: float) -> Dict[str, Any]:
    """Per-target statistics of one method's trajectories: collapses, and mean/worst of each accuracy."""
    key = f"{target:g}"
    out: Dict[str, Any] = {"trajectories": len(trajs), "collapsed": 0, "collapses": []}
    rows = {"acc_raw": [], "acc_bn": [], "acc_ft": [], "stream": []}
    fine_tuned = 0
    for r in trajs:
        label = f"s{r['seed']}-d{r['draw']}"
        snap = r["snapshots"].get(key, {"unreachable": True})
        ft = r.get("finetuned_acc", {}).get(key)
        fine_tuned += ft is not None
        reasons = collapse_reasons(snap, target, ft)
        if reasons:
            out["collapsed"] += 1
            out["collapses"].append({"at": label, "why": reasons})
        if snap.get("unreachable"):
            rows["acc_raw"].append((None, label))  # no snapshot: no accuracy, but counted as a collapse
            continue
        rows["acc_raw"].append((snap["acc_raw"], label))
        rows["acc_bn"].append((snap["acc_bn"], label))
        rows["acc_ft"].append((ft, label))
        rows["stream"].append((stage_widths(snap["channels"])["stream"][-1], label))
    for name, values in rows.items():
        out[name] = worst_first(values)
    out["fine_tuned"] = fine_tuned
    # Reported beside the collapses, not part of them at 8x (the definition judges accuracy at 16x only).
    out["finetuned_below_70"] = sum(1 for v, _ in rows["acc_ft"] if v is not None and v < FINETUNED_16X_MIN)
    return out


def coverage(trajs: Sequence[Dict[str, Any]], method: str, draws: Sequence[int]) -> List[Tuple[int, int]]:
    """The (seed, draw) pairs a method's trajectories cover.

    A method that never passes the calibration images through the model (:func:`uses_calibration`)
    prunes the same way on every draw, so one trajectory per base covers all of its draws.
    """
    mine = {(r["seed"], r["draw"]) for r in trajs if r["method"] == method}
    if not uses_calibration(method):
        mine = {(s, d) for s, _ in mine for d in draws}
    return sorted(mine)


def choose_default(summary: Dict[str, Any], candidates: Sequence[str], current: str,
                   metric: str = "acc_ft") -> Dict[str, Any]:
    """The rule, written before the runs, for CoNNect's default among ``candidates``.

    1. A candidate qualifies when it covers every (base, draw) pair of the benchmark
       (``summary["expected"]``), has ``metric`` on every trajectory, and **no collapsed
       trajectory** at 8x or 16x.
    2. Among them, the best mean of ``metric`` over 8x and 16x wins; the current default is kept unless
       it collapsed, or the winner's lead over it exceeds the sample std of their paired differences
       (trajectory by trajectory).
    3. If the current default did not collapse but lacks trajectories, or no candidate qualifies, the
       default is kept: the evidence is insufficient to change it.

    Returns:
        ``{"choice", "qualified", "scores", "reason"}``; ``choice`` is the default to use.
    """
    per, expected = summary["methods"], summary["expected"]
    present = [c for c in candidates if c in per]

    def collapsed(c: str) -> int:
        return sum(per[c][t]["collapsed"] for t in ("8", "16"))

    qualified = [c for c in present if per[c]["covered"] == expected and collapsed(c) == 0
                 and all(per[c][t][metric]["n"] == per[c][t]["trajectories"] for t in ("8", "16"))]
    scores = {c: statistics.fmean([per[c][t][metric]["mean"] for t in ("8", "16")]) for c in qualified}
    out = {"qualified": qualified, "scores": scores}
    failed = current in per and collapsed(current) > 0
    if not qualified:
        why = (f"the current default collapsed on {collapsed(current)} trajectory(ies), but no candidate qualifies"
               if failed else "no candidate qualifies")
        return dict(out, choice=current, reason=why + ": the evidence is insufficient to change the default")
    best = max(qualified, key=lambda c: scores[c])
    if failed:
        return dict(out, choice=best, reason=f"the current default collapsed on {collapsed(current)} "
                    f"trajectory(ies); {best} qualifies with the best mean")
    if current not in qualified:
        return dict(out, choice=current, reason="the current default did not collapse but lacks trajectories: "
                    "the evidence is insufficient to change it")
    if best == current:
        return dict(out, choice=current, reason="the current default is best")
    diffs = summary["paired"].get(f"{best}|{current}|{metric}")
    if diffs is None or len(diffs) < 2 or statistics.fmean(diffs) <= statistics.stdev(diffs):
        return dict(out, choice=current,
                    reason=f"{best} leads by less than the spread of the paired differences: the default is kept")
    return dict(out, choice=best, reason=f"{best} leads the current default beyond the spread of the paired differences")


def paired(trajs: Sequence[Dict[str, Any]], a: str, b: str, metric: str) -> List[float]:
    """Per (seed, draw) and target, ``a - b`` of ``metric``, averaged over 8x and 16x (complete pairs only)."""
    def values(r):
        if metric == "acc_ft":
            got = [r.get("finetuned_acc", {}).get(f"{t:g}") for t in TARGETS]
        else:
            got = [r["snapshots"].get(f"{t:g}", {}).get(metric) for t in TARGETS]
        return None if any(v is None for v in got) else statistics.fmean(got)

    by = {(r["method"], r["seed"], r["draw"]): values(r) for r in trajs}
    return [by[(a, s, d)] - by[(b, s, d)] for (m, s, d) in by
            if m == a and by.get((b, s, d)) is not None and by[(a, s, d)] is not None]


def summarize(roots: Sequence[str], output: str, candidates: Optional[Sequence[str]] = None,
              seeds: Sequence[int] = (3, 4, 5, 6, 7), draws: Sequence[int] = (0, 1),
              ranking: Sequence[str] = (), first_wins: bool = False, current: Optional[str] = None) -> str:
    """Write ``summary.json``, ``table.md`` and README's table (``front_page.md``) under ``output``;
    returns ``table.md``'s markdown.

    ``seeds`` and ``draws`` are the benchmark's (base, draw) pairs, which the rule needs covered;
    ``ranking`` adds ranking-benchmark run folders (:func:`read_ranking`) after ``roots``;
    ``first_wins`` takes a trajectory given twice from its first source (:func:`merge_trajectories`);
    ``current`` names the default the rule may replace (default: the library's, :func:`library_default_name`)."""
    trajs, bases = read_results(roots, first_wins)
    if ranking:
        more, more_bases = read_ranking(ranking)
        trajs = merge_trajectories(trajs + more, first_wins)
        bases = sorted({b["seed"]: b for b in more_bases + bases}.values(), key=lambda b: b["seed"])
    if not trajs:
        raise SystemExit(f"error: no trajectories under {list(roots)}")
    current = current or library_default_name()
    # the default the rule may replace first, then the other CoNNect rows, then the built-ins
    order = [current] + [method_name({"method": m}) for m in DEFAULT_METHODS]
    methods = sorted({r["method"] for r in trajs}, key=lambda m: (
        order.index(m) if m in order else 50 if m.startswith("connect") else 99, m))
    summary: Dict[str, Any] = {"definitions": {"stream_min": STREAM_MIN, "conv_min": CONV_MIN,
                                               "finetuned_16x_min": FINETUNED_16X_MIN},
                               "protocol": trajs[0]["protocol"], "bases": [{k: b[k] for k in ("seed", "acc", "seconds")}
                                                                           for b in bases],
                               "methods": {}, "paired": {}, "expected": len(seeds) * len(draws),
                               "seeds": list(seeds), "draws": list(draws)}
    for m in methods:
        mine = [r for r in trajs if r["method"] == m]
        summary["methods"][m] = {f"{t:g}": summarize_method(mine, t) for t in TARGETS}
        summary["methods"][m]["seeds"] = sorted({r["seed"] for r in mine})
        summary["methods"][m]["draws"] = sorted({r["draw"] for r in mine})
        covered = coverage(trajs, m, draws)
        summary["methods"][m]["covered"] = len([p for p in covered if p[0] in seeds and p[1] in draws])
    summary["trajectories"] = [_row(r) for r in sorted(trajs, key=lambda r: (methods.index(r["method"]),
                                                                              r["seed"], r["draw"]))]
    summary["current_default"] = current
    connect = [m for m in methods if m.startswith("connect")]
    for metric in ("acc_bn", "acc_ft"):
        for a in connect:
            if a != current:
                summary["paired"][f"{a}|{current}|{metric}"] = paired(trajs, a, current, metric)
    candidates = list(candidates) if candidates else connect
    summary["rule"] = choose_default(summary, candidates, current, "acc_ft")
    envs = [r["environment"] for r in trajs]
    summary["environment"] = {"threads": sorted({e["threads"] for e in envs}),
                              "accelerator": sorted({e["accelerator"] or "no GPU" for e in envs}),
                              "torch": sorted({e["torch"] for e in envs}),
                              "torch_pruning": sorted({str(e["torch_pruning"]) for e in envs}),
                              "cpus": sorted({e["cpus"] for e in envs}),
                              "load_avg_1min": [min(e["load_avg_1min"] for e in envs),
                                                max(e["load_avg_1min"] for e in envs)]}
    md = _markdown(summary)
    os.makedirs(output, exist_ok=True)
    _write_json(os.path.join(output, "summary.json"), summary)
    with open(os.path.join(output, "table.md"), "w") as f:
        f.write(md)
    with open(os.path.join(output, "front_page.md"), "w") as f:
        f.write(front_page_table(summary))
    return md


def _row(r: Dict[str, Any]) -> Dict[str, Any]:
    """One trajectory in short: per target its fine-tuned accuracy, streams, narrowest last-stage conv."""
    row = {"method": r["method"], "seed": r["seed"], "draw": r["draw"], "prune_seconds": r.get("prune_seconds"),
           "source": r.get("source"), "also_in": r.get("also_in", [])}
    for t in TARGETS:
        key = f"{t:g}"
        snap = r["snapshots"].get(key, {"unreachable": True})
        ft = r.get("finetuned_acc", {}).get(key)
        cell = {"finetuned_acc": ft, "collapsed": bool(collapse_reasons(snap, t, ft))}
        if not snap.get("unreachable"):
            widths = stage_widths(snap["channels"])
            last = f"layer{len(widths['stream'])}."
            cell.update(stream=widths["stream"], acc_bn=snap["acc_bn"],
                        last_stage_min=min(v[1] for k, v in snap["channels"].items() if k.startswith(last)))
        row[key] = cell
    return row


FRONT_PAGE_ROWS = [
    ("connect-k100-bnscale", '**CoNNect, default** (κ = 100, `bn_flow="scale"`)'),
    ("connect-kinf-bnscale", 'CoNNect, connectivity alone (κ = ∞, `"scale"`)'),
    ("connect-k100-bngamma", 'CoNNect, version 0.2.0\'s default (κ = 100, `"gamma"`)'),
    ("l1", "L1"), ("l2", "L2"), ("lamp", "LAMP"), ("random", "random (`RandomImportance`)"),
    ("uniform", "uniform random scores"), ("taylor", "Taylor"),
]
"""README's robustness table: (method name, label), the library's default first."""


def _ranges(values: Sequence[int]) -> str:
    """``[0, 1, 2, 8, 9]`` -> ``"0-2, 8-9"``."""
    runs: List[List[int]] = []
    for v in sorted(values):
        if runs and v == runs[-1][-1] + 1:
            runs[-1].append(v)
        else:
            runs.append([v])
    return ", ".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)


def front_page_table(summary: Dict[str, Any]) -> str:
    """README's table: per criterion of :data:`FRONT_PAGE_ROWS`, its fine-tuned trajectories (and the
    bases they ran on), the 16x collapses, and the mean ± std beside the worst at 8x and 16x."""
    lines = ["| method | fine-tuned trajectories (bases) | collapsed at 16x | 8x: mean ± std | 8x: worst "
             "| 16x: mean ± std | 16x: worst |", "|---|---|---|---|---|---|---|"]
    for method, label in FRONT_PAGE_ROWS:
        per = summary["methods"].get(method)
        if per is None:
            continue
        a, b = per["8"]["acc_ft"], per["16"]["acc_ft"]
        pruned = per["16"]["trajectories"]
        count = f"{b['n']}" if b["n"] == pruned else f"{b['n']} of {pruned} pruned"
        cells = [f"{s['mean']:.1f} ± {s['std']:.1f} | {s['worst']:.1f}" if s["n"] else "– | –" for s in (a, b)]
        lines.append(f"| {label} | {count} ({_ranges(per['seeds'])}) | {per['16']['collapsed']} | "
                     f"{cells[0]} | {cells[1]} |")
    return "\n".join(lines) + "\n"


def _cell(stat: Dict[str, Any]) -> str:
    if not stat["n"]:
        return "–"
    return f"{stat['mean']:.1f} ± {stat['std']:.1f} / **{stat['worst']:.1f}** ({stat['worst_at']})"


def _markdown(summary: Dict[str, Any]) -> str:
    env = summary["environment"]
    bases = summary["bases"]
    base_cells = ", ".join("%d: %.2f" % (b["seed"], b["acc"]) for b in bases)
    lines = [f"Bases (seed: accuracy %): {base_cells}. "
             f"{', '.join(map(str, env['threads']))} thread(s) per job, machine: "
             f"{', '.join(env['accelerator'])} with {', '.join(map(str, env['cpus']))} CPUs, "
             f"load (1 min) {env['load_avg_1min'][0]:.1f}-{env['load_avg_1min'][1]:.1f}; torch "
             f"{', '.join(env['torch'])}, torch-pruning {', '.join(env['torch_pruning'])}.", "",
             f"Collapsed: the last stage's residual stream at <= {STREAM_MIN} channels, a last-stage convolution "
             f"at <= {CONV_MIN} channel, a layer with no path through it, a target never reached, or (16x, fine-tuned) "
             f"accuracy below {FINETUNED_16X_MIN:g} %. Cells: mean ± std / **worst** (its seed and draw).", ""]
    for title, metric in (("After BatchNorm re-estimation (prune only)", "acc_bn"),
                          ("After the cosine fine-tuning epoch", "acc_ft")):
        lines += [f"**{title}**", "",
                  "| method | trajectories (seeds × draws; pairs covered) | collapsed 8x | collapsed 16x | 8x | 16x | "
                  "stage-3 stream at 16x: mean / worst | fine-tuned < 70 % (8x / 16x) |",
                  "|---|---|---|---|---|---|---|---|"]
        for m, per in summary["methods"].items():
            if metric == "acc_ft" and not per["16"]["fine_tuned"] and not per["8"]["fine_tuned"]:
                continue
            a, b = per["8"], per["16"]
            stream = b["stream"]
            lines.append(f"| {m} | {a['trajectories']} ({len(per['seeds'])} × {len(per['draws'])}; "
                         f"{per['covered']}/{summary['expected']}) | "
                         f"{a['collapsed']} | {b['collapsed']} | {_cell(a[metric])} | {_cell(b[metric])} | "
                         + ("–" if not stream["n"] else f"{stream['mean']:.1f} / {stream['worst']}")
                         + (f" | {a['finetuned_below_70']} / {b['finetuned_below_70']} |" if a["fine_tuned"] or b["fine_tuned"]
                            else " | – |"))
        lines.append("")
    lines += ["**Per trajectory** (fine-tuned accuracy %, residual streams of the three stages, narrowest "
              "last-stage convolution; † collapsed; ‡ fine-tuned below 70 % at 8x, which the definition does not "
              "count)", "",
              "| method | base-draw | 8x | 16x | 16x streams | 16x narrowest last-stage conv |", "|---|---|---|---|---|---|"]
    for row in summary["trajectories"]:
        def acc(t: str) -> str:
            v = row[t]["finetuned_acc"]
            mark = " †" if row[t]["collapsed"] else (" ‡" if v is not None and v < FINETUNED_16X_MIN else "")
            return ("–" if v is None else f"{v:.1f}") + mark
        at16 = row["16"]
        lines.append(f"| {row['method']} | s{row['seed']}-d{row['draw']} | {acc('8')} | {acc('16')} | "
                     + ("unreachable | –" if "stream" not in at16 else
                        f"{' · '.join(map(str, at16['stream']))} | {at16['last_stage_min']}") + " |")
    lines.append("")
    doubles = [row for row in summary["trajectories"] if row["also_in"]]
    if doubles:
        lines += ["**Given twice** (taken from the first source; the copies left out):", ""]
        lines += [f"- {row['method']} s{row['seed']}-d{row['draw']}: from {row['source']}; left out: "
                  f"{', '.join(map(str, row['also_in']))}" for row in doubles]
        lines.append("")
    lines += ["**Collapses**", ""]
    for m, per in summary["methods"].items():
        for t in ("8", "16"):
            for c in per[t]["collapses"]:
                lines.append(f"- {m} at {t}x, {c['at']}: {'; '.join(c['why'])}")
    lines.append("")
    rule = summary["rule"]
    scores = ", ".join("%s %.2f" % (c, rule["scores"][c]) for c in rule["qualified"]) or "none"
    lines.append(f"The rule (every one of the {summary['expected']} (base, draw) pairs covered, no collapse, then the "
                 f"best mean fine-tuned accuracy over 8x and 16x; the current default: {summary['current_default']}): "
                 f"**{rule['choice']}** ({rule['reason']}); "
                 f"qualified: {scores}.")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------- CLI
def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p, job: bool = True) -> None:
        p.add_argument("--root", default=os.path.join("runs", "robustness"))
        p.add_argument("--device", default="cpu")
        p.add_argument("--data-dir", default="data", help="Fashion-MNIST's IDX files (Debian's package is found too)")
        p.add_argument("--tiny", action="store_true", help="a tiny recipe for a smoke test (not comparable)")
        if job:
            p.add_argument("--threads", type=int, default=1)

    p = sub.add_parser("run", help="base models, trajectories and fine-tunings in parallel worker processes")
    common(p, job=False)
    p.add_argument("--seeds", type=int, nargs="+", default=[3, 4, 5, 6, 7])
    p.add_argument("--draws", type=int, nargs="+", default=[0, 1])
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    p.add_argument("--finetune", nargs="*", default=[], metavar="METHOD",
                   help="methods whose trajectories get the fine-tuning epoch (right after pruning)")
    p.add_argument("--prune-device", default="cpu", help="where the pruning loops run (evaluation and "
                   "fine-tuning: --device); auto: --device for the methods that pass the calibration images "
                   "through the model at every step, the CPU for the others")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--deadline", type=float, default=None, help="seconds from now: no job starts after it")
    p.add_argument("--hard-deadline", type=float, default=None, help="seconds from now: running jobs are "
                   "stopped; no job starts that would not end before it (by the median finished job)")
    p = sub.add_parser("train")
    common(p)
    p.add_argument("--seed", type=int, required=True)
    p = sub.add_parser("adopt", help="a ranking-benchmark base (its folder: base.pt, base.json) as a base here")
    p.add_argument("folders", nargs="+")
    p.add_argument("--root", default=os.path.join("runs", "robustness"))
    for name in ("prune", "finetune"):
        p = sub.add_parser(name)
        common(p)
        p.add_argument("--seed", type=int, required=True)
        p.add_argument("--draw", type=int, required=True)
        p.add_argument("--method", required=True)
        if name == "prune":
            p.add_argument("--prune-device", default=None, help="where the loop runs (default: --device)")
            p.add_argument("--finetune", action="store_true", help="fine-tune the snapshots right after")
    p = sub.add_parser("summarize")
    p.add_argument("roots", nargs="*", help="this benchmark's --root folders")
    p.add_argument("--ranking", nargs="*", default=[], metavar="FOLDER",
                   help="ranking-benchmark run folders (seed<s>/<method>) fine-tuned with the cosine epoch")
    p.add_argument("--first-wins", action="store_true", help="a trajectory in several sources is taken from the "
                   "first one given (roots in order, then --ranking); the table lists the copies left out")
    p.add_argument("--current", default=None, help="the default the rule may replace, as a method name "
                   "(default: the library's ConnectImportance() settings, e.g. connect-k100-bngamma)")
    p.add_argument("--output", default=os.path.join("benchmarks", "results", "robustness"))
    p.add_argument("--candidates", nargs="*", help="CoNNect specs the rule chooses among (default: every connect row)")
    p.add_argument("--seeds", type=int, nargs="+", default=[3, 4, 5, 6, 7], help="the benchmark's bases")
    p.add_argument("--draws", type=int, nargs="+", default=[0, 1], help="the benchmark's calibration draws")
    args = parser.parse_args(argv)
    if args.command == "summarize":
        if not args.roots and not args.ranking:
            parser.error("summarize needs a --root folder or --ranking folders")
        print(summarize(args.roots, args.output, args.candidates, args.seeds, args.draws, args.ranking,
                        args.first_wins, args.current))
        return 0
    if args.command == "run":
        return run(args)
    if args.command == "adopt":
        for folder in args.folders:
            r = adopt_ranking_base(args.root, folder)
            print(f"base {r['seed']} ({r['acc']:.2f} %) from {folder}")
        return 0
    protocol = dict(TINY if args.tiny else PROTOCOL)
    _setup(args.threads, args.device)
    if args.command == "train":
        r = train_base(args.root, args.seed, protocol, args.data_dir, args.device)
        print(f"base {args.seed}: {r['acc']:.2f} % in {r['seconds']:.0f} s")
    elif args.command == "prune":
        parse_spec(args.method)
        r = prune_trajectory(args.root, args.method, args.seed, args.draw, protocol, args.data_dir, args.device,
                             args.prune_device)
        print(f"{args.method} s{args.seed}-d{args.draw}: " + ", ".join(
            f"{k}x bn {v.get('acc_bn', float('nan')):.1f}" for k, v in r["snapshots"].items())
              + f" in {r['prune_seconds']:.0f} s", flush=True)
        if args.finetune:
            r = finetune(args.root, args.method, args.seed, args.draw, protocol, args.data_dir, args.device)
            print(f"fine-tuned {r['finetuned_acc']} in {r['seconds']:.0f} s")
    else:
        r = finetune(args.root, args.method, args.seed, args.draw, protocol, args.data_dir, args.device)
        print(f"{args.method} s{args.seed}-d{args.draw}: fine-tuned {r['finetuned_acc']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
