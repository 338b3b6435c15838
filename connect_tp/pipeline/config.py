"""Recipes of the pruning benchmark: presets, command-line overrides, and the config each file depends on.

A *preset* is a complete recipe (dataset, model, training and fine-tuning schedules, pruning
steps, speed-up targets, methods). :func:`resolve_config` applies the command-line overrides and
checks every value before any work starts. The ``*_config`` functions cut out the part of the
config that a file depends on: that part, with the hash of the parent file, is the file's
fingerprint (:mod:`connect_tp.pipeline.provenance`). Nothing here imports torch, so the command
line can build its parser and check its arguments in a fraction of a second.

Presets:
    ``paper-resnet56``: ResNet-56 / CIFAR-10, speed-ups 2.5x and 16x (Table 1 of the paper).
    ``paper-vgg19``: VGG-19-BN / CIFAR-100, speed-ups 8x and 16x.
    ``offline``: ResNet-20 / Fashion-MNIST (10k training images), 2.5x/8x/16x, for a 2-core CPU.
    ``ranking``: ResNet-20 / all of Fashion-MNIST, five targets, every criterion (docs/benchmarks.md).
    ``ranking-resnet56``: the same with ResNet-56 and 3 fine-tuning epochs, for a GPU.
    ``ranking-cosine``: ``ranking`` with the fine-tuning rate decayed to 0 within the epoch.
    ``smoke``: the offline recipe on a few hundred images, for tests and CI.
"""
from __future__ import annotations

import copy
import math
import os
import re
from typing import Any, Dict, List, Optional

from ..methods import MAX_LAMBDA, parse_method

__all__ = ["PRESETS", "PRESET_CAVEATS", "ConfigError", "default_out", "resolve_config", "train_config", "prune_config",
           "finetune_config", "short_finetune_config", "check_speed_up", "check_positive_int", "check_device"]

_PAPER_COMMON = dict(
    train_subset=None, test_subset=None, batch_size=128,
    base_epochs=200, base_lr=0.1, base_milestones=[120, 150, 180],
    ft_epochs=100, ft_lr=0.01, ft_milestones=[60, 80], weight_decay=5e-4,
    iterative_steps=400, calibration_samples=1280, methods=["connect", "taylor", "l2"],
)

PRESETS: Dict[str, Dict[str, Any]] = {
    "paper-resnet56": dict(_PAPER_COMMON, dataset="cifar10", model="resnet56", speed_ups=[2.5, 16.0]),
    "paper-vgg19": dict(_PAPER_COMMON, dataset="cifar100", model="vgg19_bn", speed_ups=[8.0, 16.0]),
    # Sized for a 2-core CPU (docs/benchmarks.md gives the measured time and conditions).
    "offline": dict(
        dataset="fashion_mnist", model="resnet20", train_subset=10000, test_subset=2000, batch_size=128,
        base_epochs=4, base_lr=0.05, base_milestones=[2, 3],
        ft_epochs=1, ft_lr=0.01, ft_milestones=[], weight_decay=5e-4,
        iterative_steps=100, calibration_samples=256, speed_ups=[2.5, 8.0, 16.0],
        methods=["connect", "taylor", "l2", "random"],
    ),
    # The benchmark that ranks the criteria: all of Fashion-MNIST, a base model above 92 %,
    # Torch-Pruning's 400-step global loop, about 2 hours per seed on 2 CPU cores.
    "ranking": dict(
        dataset="fashion_mnist", model="resnet20", train_subset=None, test_subset=None, batch_size=128,
        base_epochs=8, base_lr=0.1, base_milestones=[4, 6],
        ft_epochs=1, ft_lr=0.01, ft_milestones=[], weight_decay=5e-4,
        iterative_steps=400, calibration_samples=256, speed_ups=[1.5, 2.0, 2.5, 8.0, 16.0],
        ft_speed_ups=[2.5, 8.0, 16.0], short_ft_steps=50,
        methods=["connect", "taylor", "l1", "l2", "lamp", "random", "uniform"],
    ),
    # The same protocol on a GPU with the deeper ResNet-56 and longer fine-tuning
    # (3 epochs on all 60k, LR divided by 10 for the last one).
    "ranking-resnet56": dict(
        dataset="fashion_mnist", model="resnet56", train_subset=None, test_subset=None, batch_size=128,
        base_epochs=8, base_lr=0.1, base_milestones=[4, 6],
        ft_epochs=3, ft_lr=0.01, ft_milestones=[2], weight_decay=5e-4,
        iterative_steps=400, calibration_samples=256, speed_ups=[1.5, 2.0, 2.5, 8.0, 16.0],
        ft_speed_ups=[2.5, 8.0, 16.0], short_ft_steps=50,
        methods=["connect", "taylor", "l1", "l2", "lamp", "random", "uniform"],
    ),
    # The ranking protocol with the one fine-tuning epoch's learning rate decayed to 0 by a per-batch
    # cosine: three data orders of one pruned L2 model spread +-7.5 points at 16x with the constant
    # rate and +-2.3 with the cosine (benchmarks/studies/finetune_noise.py, docs/benchmarks.md).
    "smoke": dict(
        dataset="fashion_mnist", model="resnet20", train_subset=256, test_subset=128, batch_size=64,
        base_epochs=1, base_lr=0.05, base_milestones=[],
        ft_epochs=1, ft_lr=0.01, ft_milestones=[], weight_decay=5e-4,
        iterative_steps=40, calibration_samples=64, speed_ups=[2.5, 8.0, 16.0],
        methods=["connect", "taylor", "l2", "random"],
    ),
}

# The ranking protocol with the one fine-tuning epoch's learning rate decayed to 0 by a per-batch
# cosine: three data orders of one pruned L2 model spread +-7.5 points at 16x with the constant rate
# and +-2.3 with the cosine (benchmarks/studies/finetune_noise.py, docs/benchmarks.md). As its own preset it
# has its own run folders; `--preset ranking --ft-schedule cosine` reuses a ranking seed's base model.
PRESETS["ranking-cosine"] = dict(PRESETS["ranking"], ft_schedule="cosine")


def _demo_caveat(preset: str, role: str) -> str:
    p = PRESETS[preset]

    def count(n: int, what: str) -> str:
        return f"{n:,} {what}{'' if n == 1 else 's'}"

    return (f"preset {preset} is {role} ({count(p['train_subset'], 'training image')}, "
            f"{count(p['base_epochs'], 'base epoch')}, {count(p['ft_epochs'], 'fine-tuning epoch')}): it shows "
            f"that every stage runs, but its "
            f"differences between methods are within the seed-to-seed spread, so it cannot rank them; "
            f"compare methods with --preset ranking")


PRESET_CAVEATS: Dict[str, str] = {
    "offline": _demo_caveat("offline", "a smoke-scale demo"),
    "smoke": _demo_caveat("smoke", "a test-sized run"),
}
"""What a table or plot of a preset must say about it (a demo's numbers are not a ranking)."""


class ConfigError(ValueError):
    """An argument or config value is out of range (the message names it and the accepted range)."""


FT_SCHEDULES = ("step", "cosine")
"""Fine-tuning learning-rate schedules (:func:`connect_tp.training.fit`'s ``schedule``)."""


def check_positive_int(name: str, value: Any, minimum: int = 1) -> int:
    """``value`` as an int ``>= minimum``, or :class:`ConfigError` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def check_speed_up(value: Any, name: str = "--speed-up") -> float:
    """A MAC speed-up target: a finite number > 1."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number > 1, got {value!r}") from None
    if not math.isfinite(value) or value <= 1.0:
        raise ConfigError(f"{name} must be a finite number > 1 (a MAC speed-up: base MACs / pruned MACs), "
                          f"got {value:g}")
    return value


_DEVICE = re.compile(r"^(cpu|cuda(:[0-9]+)?)$")


def check_device(value: Any, name: str = "--device") -> str:
    """A device the pipeline can train on: ``cpu``, ``cuda`` or ``cuda:<index>`` (checked without torch).

    Whether CUDA (and that index) is there is checked by the command line once torch is imported,
    still before any work.
    """
    if not isinstance(value, str) or not _DEVICE.match(value):
        why = (" (the meta device holds no data: nothing can be trained or evaluated on it)"
               if str(value).split(":")[0] == "meta" else "")
        raise ConfigError(f"{name} must be cpu, cuda or cuda:<index>, got {value!r}{why}")
    return value


def default_out(preset: str, seed: int) -> str:
    """The run folder used when ``--out`` is not given."""
    return os.path.join("runs", preset, f"seed{seed}")


def resolve_config(preset: str, seed: int = 0, *, out: Optional[str] = None, device: str = "cpu",
                   methods: Optional[List[str]] = None, speed_ups: Optional[List[float]] = None,
                   epochs: Optional[int] = None, ft_epochs: Optional[int] = None,
                   iterative_steps: Optional[int] = None, calibration_samples: Optional[int] = None,
                   short_ft_steps: Optional[int] = None, connect_lam: Optional[float] = None,
                   max_pruning_ratio: float = 1.0, ft_schedule: Optional[str] = None,
                   bn_refresh_every: Optional[int] = None) -> Dict[str, Any]:
    """The preset with the overrides applied, every value checked.

    Raises:
        ConfigError: an unknown preset or method, or a value out of range (named in the message).
    """
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    cfg = copy.deepcopy(PRESETS[preset])
    cfg.update(preset=preset, seed=check_positive_int("--seed", seed, 0), device=check_device(device))
    for key, value in (("methods", methods), ("base_epochs", epochs), ("ft_epochs", ft_epochs),
                       ("iterative_steps", iterative_steps), ("calibration_samples", calibration_samples),
                       ("short_ft_steps", short_ft_steps), ("bn_refresh_every", bn_refresh_every)):
        if value is not None:
            cfg[key] = value
    if ft_schedule is not None:
        cfg["ft_schedule"] = ft_schedule
    if cfg.setdefault("ft_schedule", "step") not in FT_SCHEDULES:
        raise ConfigError(f"--ft-schedule must be one of {', '.join(FT_SCHEDULES)}, got {cfg['ft_schedule']!r}")
    for key, flag, minimum in (("base_epochs", "--epochs", 1), ("ft_epochs", "--ft-epochs", 1),
                               ("iterative_steps", "--iterative-steps", 1),
                               ("calibration_samples", "--calibration-samples", 1),
                               ("short_ft_steps", "--short-ft-steps", 0), ("batch_size", "batch_size", 1),
                               ("bn_refresh_every", "--bn-refresh-every", 0)):
        cfg.setdefault(key, 0)
        check_positive_int(flag, cfg[key], minimum)
    for method in cfg["methods"]:
        try:
            parse_method(method)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    cfg["methods"] = list(dict.fromkeys(cfg["methods"]))  # each once, in the order given
    explicit = speed_ups is not None
    cfg["speed_ups"] = sorted({check_speed_up(s) for s in (speed_ups if explicit else cfg["speed_ups"])})
    # Targets fine-tuned: the preset's subset, or every target given on the command line.
    preset_ft = cfg.get("ft_speed_ups") or cfg["speed_ups"]
    cfg["ft_speed_ups"] = list(cfg["speed_ups"]) if explicit else sorted(float(s) for s in preset_ft
                                                                         if float(s) in cfg["speed_ups"])
    if connect_lam is not None and not (math.isfinite(connect_lam) and 0 <= connect_lam <= MAX_LAMBDA):
        raise ConfigError(f"--connect-lam must be a finite number >= 0 and <= {MAX_LAMBDA:g}, got {connect_lam:g}")
    if not (isinstance(max_pruning_ratio, (int, float)) and 0.0 < max_pruning_ratio <= 1.0):
        raise ConfigError(f"--max-pruning-ratio must be in (0, 1], got {max_pruning_ratio!r}")
    cfg["base_milestones"] = [m for m in cfg["base_milestones"] if m < cfg["base_epochs"]]
    cfg["ft_milestones"] = [m for m in cfg["ft_milestones"] if m < cfg["ft_epochs"]]
    cfg["connect_lam"] = connect_lam
    cfg["max_pruning_ratio"] = float(max_pruning_ratio)
    cfg["out"] = out or default_out(preset, seed)
    return cfg


# ------------------------------------------------------------------------------------------------
# What each file depends on (the config part of its fingerprint)
# ------------------------------------------------------------------------------------------------
_DATA = ("preset", "seed", "dataset", "model", "train_subset", "test_subset", "batch_size")


def train_config(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """What the base model (``base.pt``, ``base.json``) depends on."""
    return dict({k: cfg[k] for k in _DATA}, epochs=cfg["base_epochs"], lr=cfg["base_lr"],
                milestones=list(cfg["base_milestones"]), weight_decay=cfg["weight_decay"])


def prune_config(cfg: Dict[str, Any], method: str, target: float) -> Dict[str, Any]:
    """What a pruned model and its result depend on (besides the base model it was pruned from).

    The other targets of the same trajectory do not matter: the schedule does not depend on them.
    """
    lam = cfg["connect_lam"] if method == "connect" else None  # the override applies to plain connect only
    out = dict({k: cfg[k] for k in _DATA}, method=method, target_speed_up=float(target),
               iterative_steps=cfg["iterative_steps"], calibration_samples=cfg["calibration_samples"],
               max_pruning_ratio=cfg["max_pruning_ratio"], connect_lam=lam)
    out.update(_connect_defaults(method, lam))
    if cfg.get("bn_refresh_every"):  # absent when off: older files stay valid
        out["bn_refresh_every"] = cfg["bn_refresh_every"]
    return out


def _connect_defaults(method: str, lam: Optional[float]) -> Dict[str, Any]:
    """The library defaults a ``connect`` name leaves open, so that a changed default is a changed config.

    A name with a strength fixes its BatchNorm treatment too
    (:func:`connect_tp.methods.connect_options`), so only plain ``connect`` records the
    default treatment; a name without a strength (plain, or ``connect-bn<flow>``) and without
    ``--connect-lam`` records the default balance. Both defaults changed before version 0.2.0 (balance inf ->
    100, BatchNorm "stats" -> "gamma") and the BatchNorm one again in 0.3.0 ("gamma" -> "scale"): a
    folder pruned under older ones is refused (``--force`` redoes it), not reused.
    """
    criterion, options = parse_method(method)
    if criterion != "connect":
        return {}
    from ..importance import DEFAULT_BALANCE, DEFAULT_BN_FLOW  # imported on use: config stays torch-free

    out: Dict[str, Any] = {}
    if not set(options) - {"normalizer"}:  # plain connect, with or without -norm<normalizer>
        out["connect_bn_flow"] = DEFAULT_BN_FLOW
    if lam is None and "balance" not in options and "lam" not in options:
        out["connect_balance"] = "inf" if DEFAULT_BALANCE == math.inf else DEFAULT_BALANCE
    return out


def finetune_config(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """What a fine-tuned model and its accuracy depend on (besides the pruned model)."""
    out = dict({k: cfg[k] for k in _DATA}, epochs=cfg["ft_epochs"], lr=cfg["ft_lr"],
               milestones=list(cfg["ft_milestones"]), weight_decay=cfg["weight_decay"])
    if cfg.get("ft_schedule", "step") != "step":  # absent for the step schedule: older files stay valid
        out["schedule"] = cfg["ft_schedule"]
    return out


def short_finetune_config(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """What the short fixed-budget fine-tuning result depends on (besides the pruned model)."""
    return dict({k: cfg[k] for k in _DATA}, steps=cfg["short_ft_steps"], lr=cfg["ft_lr"],
                weight_decay=cfg["weight_decay"])
