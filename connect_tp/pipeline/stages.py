"""The stages of the pruning benchmark: train the base model, prune it, fine-tune the pruned models.

Each stage reads and writes the run folder (:mod:`connect_tp.pipeline.rundir`) and checks, before
any training or pruning starts, every file it would resume or reuse: its fingerprint must match
the config of this command and the hash of the parent file on disk now
(:mod:`connect_tp.pipeline.provenance`). A mismatch is a :class:`ProvenanceError` naming the file,
both values and the fixes; with ``force`` the mismatched file is redone instead. Files written by
an older connect-tp without a fingerprint are accepted after the fields they carry are checked,
with a note. The base model is the best epoch of ``base.pt``; pruning runs one trajectory per
method and snapshots every target on the way (:func:`connect_tp.pruning.progressive_prune`);
fine-tuning adds its numbers to the pruning result, merged with the file on disk at write time.
Under ``torchrun`` training and fine-tuning run data-parallel; pruning and all writes happen on
rank 0. The caller holds the folder's lock (:mod:`connect_tp.pipeline.lock`).
"""
from __future__ import annotations

import copy
import os
import platform
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch

from ..data import DATASETS, load_datasets
from ..models import create_model
from ..pruning import (build_importance, calibration_batches, count_macs_and_params, layer_report,
                       parse_method, progressive_prune, recalibrate_batchnorm, UnreachableSpeedUp)
from ..training import (DistributedContext, evaluate, fit, load_model_checkpoint, make_loader, save_model_checkpoint,
                        set_seed, short_finetune)
from .config import finetune_config, prune_config, short_finetune_config, train_config
from .console import note, say
from ..files import CheckpointError, load_checkpoint, sha256_file
from .provenance import (ProvenanceError, check_fingerprint, check_legacy_fields, describe_differences, fingerprint,
                         normalize, short_hash)
from .rundir import RunFolder, tag

__all__ = ["Context", "stage_train", "stage_prune", "stage_finetune", "run_environment"]

_FIX_TRAIN = "add --force to train the base again from scratch (replacing base.pt and base.json), or give a new --out"
_FIX_PRUNE = "add --force to prune it again (replacing the pruned model and its result), or give a new --out"
_FIX_PRUNE_INPUT = ("prune it again from the current base (`connect-tp prune --resume --force` with this run's "
                    "options), or give a new --out")
_FIX_FINETUNE = "add --force to fine-tune it again from the current pruned model, or give a new --out"


def _torch_pruning_version() -> Optional[str]:
    import torch_pruning
    from importlib import metadata

    # The distribution's version first: a release may leave the module's __version__ unchanged
    # (torch-pruning 1.6.1 still says 1.6.0); __version__ only where there is no metadata.
    try:
        return metadata.version("torch-pruning")
    except metadata.PackageNotFoundError:
        return getattr(torch_pruning, "__version__", None)


def run_environment(device: Any = "cpu") -> Dict[str, Any]:
    """What a timing or a result depends on besides the config: versions, threads, machine load, and the
    accelerator when the run used one (None for a CPU run, also on a machine that has a GPU)."""
    return {"torch": torch.__version__, "torch_pruning": _torch_pruning_version(),
            "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "machine": platform.machine(),
            "load_avg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "accelerator": torch.cuda.get_device_name(torch.device(device))
            if str(device).startswith("cuda") and torch.cuda.is_available() else None}


def _load_dict_checkpoint(path: str) -> Dict[str, Any]:
    """A checkpoint of this pipeline (always a dict), or :class:`CheckpointError` naming the file."""
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(ckpt).__name__}, not a checkpoint written by "
                              f"connect-tp; delete it and rerun the stage that writes it (without --resume)")
    return ckpt


def _mtime(path: str) -> float:
    return os.stat(path).st_mtime


class Context:
    """What the stages of one command share: config, run folder, options, data (loaded on first use)."""

    def __init__(self, cfg: Dict[str, Any], run: RunFolder, dist: Optional[DistributedContext] = None, *,
                 resume: bool = False, force: bool = False, data_dir: str = "data", download: bool = False,
                 workers: int = 0):
        self.cfg, self.run, self.dist = cfg, run, dist or DistributedContext()
        self.resume, self.force, self.data_dir, self.download, self.workers = resume, force, data_dir, download, workers
        info = DATASETS[cfg["dataset"]]
        self.arch = {"model": cfg["model"], "num_classes": info.num_classes, "in_channels": info.in_channels}
        self.example_inputs = torch.rand(1, info.in_channels, 32, 32)
        self._data = None

    def data(self):
        """``(train_set, test_set, info)``, loaded once."""
        if self._data is None:
            cfg = self.cfg
            self._data = load_datasets(cfg["dataset"], self.data_dir, self.download, cfg["train_subset"],
                                       cfg["test_subset"], seed=cfg["seed"])
            self.log(f"data: {cfg['dataset']}, {len(self._data[0])} training / {len(self._data[1])} test images")
        return self._data

    @property
    def train_set(self):
        return self.data()[0]

    @property
    def test_set(self):
        return self.data()[1]

    def test_loader(self):
        return make_loader(self.test_set, self.cfg["batch_size"] * 2, False, self.dist, num_workers=self.workers)

    def calibration(self):
        return calibration_batches(self.train_set.without_augmentation(), self.cfg["calibration_samples"],
                                   self.cfg["batch_size"], seed=self.cfg["seed"])

    def log(self, message: str) -> None:
        if self.dist.is_main:
            say(message)

    def note(self, message: str) -> None:
        if self.dist.is_main:
            note(message)


def _unless_forced(ctx: "Context", exc: ProvenanceError, redo: str) -> None:
    """A provenance mismatch is an error, unless ``--force`` was given: then say what is redone."""
    if not ctx.force:
        raise exc
    ctx.note(f"note: --force: {redo} ({exc})")


def _check_training_checkpoint(path: str, ckpt: Any, want: Dict[str, Any], *, what: str, fix: str,
                               parent_sha: Optional[str] = None, parent_name: str = "",
                               parent_path: Optional[str] = None, legacy_ok: bool = True) -> Optional[str]:
    """Check a per-epoch checkpoint before resuming it; returns a note for a legacy one."""
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"checkpoint {path} holds no training state; delete it and rerun")
    recorded = ckpt.get("provenance")
    if recorded is not None:
        check_fingerprint(path, recorded, want, what=what, parent_sha=parent_sha, parent_name=parent_name, fix=fix)
        return None
    if not legacy_ok:
        raise ProvenanceError(f"{path} has no fingerprint (written by an older connect-tp) while its {parent_name} "
                              f"has one, so it was made from an older {parent_name}; {fix}")
    if parent_path is not None and os.path.isfile(parent_path) and _mtime(path) < _mtime(parent_path):
        raise ProvenanceError(f"{path} has no fingerprint and is older than {parent_path}, so it was made from an "
                              f"earlier {parent_name}; {fix}")
    scheduler = ckpt.get("scheduler") if isinstance(ckpt.get("scheduler"), dict) else {}
    arch = ckpt.get("arch") if isinstance(ckpt.get("arch"), dict) else {}
    carried = {"model": arch.get("model"),
               "milestones": sorted(int(m) for m in (scheduler.get("milestones") or {})),
               "lr": (scheduler.get("base_lrs") or [None])[0]}
    wanted = {"model": want["model"], "milestones": sorted(want["milestones"]), "lr": want["lr"]}
    message = check_legacy_fields(path, carried, wanted, what=what, fix=fix)
    epoch = ckpt.get("epoch")
    if not isinstance(epoch, int) or epoch + 1 > want["epochs"]:
        raise ProvenanceError(f"{path} holds {what} written without a fingerprint after {epoch + 1 if isinstance(epoch, int) else '?'} "
                              f"epochs, more than the {want['epochs']} this command asks for; {fix}")
    return message + f"; resuming after epoch {epoch + 1} of {want['epochs']}"


# ------------------------------------------------------------------------------------------------
# Train
# ------------------------------------------------------------------------------------------------
def _check_base_result(ctx: Context, base: Dict[str, Any], want: Dict[str, Any]) -> Optional[str]:
    """Check a finished ``base.json`` (and ``base.pt``) against this command; a note for legacy files."""
    run = ctx.run
    recorded = base.get("provenance")
    if recorded is not None:
        check_fingerprint(run.base_json, recorded, want, what="a base model", fix=_FIX_TRAIN)
        expected = ((recorded.get("output") or {}).get("sha256"))
        if not os.path.isfile(run.base_ckpt):
            raise ProvenanceError(f"{run.base_ckpt} is missing although {run.base_json} is there; {_FIX_TRAIN}")
        actual = sha256_file(run.base_ckpt)
        if actual != expected:
            raise ProvenanceError(f"{run.base_ckpt} (sha256 {short_hash(actual)}) is not the model {run.base_json} "
                                  f"was written for (sha256 {short_hash(expected)}); {_FIX_TRAIN}")
        return None
    wanted = {k: want[k] for k in ("preset", "seed", "dataset", "model", "epochs")}
    message = check_legacy_fields(run.base_json, base, wanted, what="a base model", fix=_FIX_TRAIN)
    if not os.path.isfile(run.base_ckpt):
        raise ProvenanceError(f"{run.base_ckpt} is missing although {run.base_json} is there; {_FIX_TRAIN}")
    if _mtime(run.base_ckpt) > _mtime(run.base_json) + 1.0:
        raise ProvenanceError(f"{run.base_ckpt} was written after {run.base_json} (a training started since); "
                              f"finish it with --resume or {_FIX_TRAIN}")
    return message


def stage_train(ctx: Context) -> Dict[str, Any]:
    """Train the base model; with ``resume`` a matching finished base is kept and a matching checkpoint resumed."""
    cfg, run = ctx.cfg, ctx.run
    since, start = run.mark(), time.time()
    want = train_config(cfg)
    fp = fingerprint("train", want)
    resume_ckpt = ctx.resume
    if ctx.resume and os.path.isfile(run.base_json):
        base = run.read_base()
        try:
            message = _check_base_result(ctx, base, want)
        except ProvenanceError as exc:
            _unless_forced(ctx, exc, "training the base again from scratch")
            resume_ckpt = False
        else:
            if message:
                ctx.note(message)
            ctx.log(f"train: the base model in {run.base_json} is done (accuracy {base['acc']:.2f}%), skipped; "
                    f"{run.summary(since)}")
            return base
    if resume_ckpt and os.path.isfile(run.base_ckpt):
        ckpt = _load_dict_checkpoint(run.base_ckpt)
        try:
            message = _check_training_checkpoint(run.base_ckpt, ckpt, want, what="a partly trained base model",
                                                 fix=_FIX_TRAIN)
        except ProvenanceError as exc:
            _unless_forced(ctx, exc, f"discarding {run.base_ckpt} and training from scratch")
            resume_ckpt = False
        else:
            if message:
                ctx.note(message)
                fp["adopted"] = f"resumed from a base.pt without fingerprint after epoch {ckpt['epoch'] + 1}"
            else:
                if ckpt["provenance"].get("adopted"):
                    fp["adopted"] = ckpt["provenance"]["adopted"]
                ctx.log(f"train: resuming {run.base_ckpt} after epoch {ckpt['epoch'] + 1} of {cfg['base_epochs']}")
    else:
        resume_ckpt = False
    # The data first: a dataset that cannot be read must stop the command before the old base is removed.
    train_set, test_set, _ = ctx.data()
    if not resume_ckpt and ctx.dist.is_main:
        for path in (run.base_json, run.base_ckpt):
            if os.path.isfile(path):
                os.remove(path)  # a new base: the old files must not be taken for it if this run stops early
                ctx.note(f"note: removed {path} of the previous base model (training a new one; pruned models "
                         f"of the old base will be refused until pruned again)")
    ctx.dist.barrier()
    set_seed(cfg["seed"])
    model = create_model(cfg["model"], ctx.arch["num_classes"], ctx.arch["in_channels"])
    run.record_partial(run.base_ckpt, ckpt["epoch"] + 1 if resume_ckpt else 0, cfg["base_epochs"])
    out = fit(model, train_set, test_set, epochs=cfg["base_epochs"], lr=cfg["base_lr"],
              milestones=cfg["base_milestones"], weight_decay=cfg["weight_decay"], batch_size=cfg["batch_size"],
              device=cfg["device"], checkpoint_path=run.base_ckpt, resume=resume_ckpt, seed=cfg["seed"],
              ctx=ctx.dist, num_workers=ctx.workers, desc="train", arch=ctx.arch,
              checkpoint_extra={"provenance": fp},
              on_epoch=lambda done: run.record_partial(run.base_ckpt, done, cfg["base_epochs"]), log=ctx.log)
    macs, params = count_macs_and_params(model.cpu(), ctx.example_inputs)
    result = {"preset": cfg["preset"], "seed": cfg["seed"], "dataset": cfg["dataset"], "model": cfg["model"],
              "epochs": cfg["base_epochs"], "acc": out["best_acc"], "final_acc": out["final_acc"],
              "macs": macs, "params": params, "seconds": time.time() - start, "history": out["history"]}
    if ctx.dist.is_main:
        run.record(run.base_ckpt)
        result["provenance"] = dict(fp, output={"path": run.rel(run.base_ckpt), "sha256": sha256_file(run.base_ckpt)})
        result["environment"] = run_environment(cfg["device"])
        run.write_json(result, run.base_json)
    ctx.dist.barrier()
    ctx.log(f"train: base accuracy {out['best_acc']:.2f}% ({macs / 1e6:.1f} M MACs) in {time.time() - start:.0f} s; "
            f"{run.summary(since)}")
    return result


# ------------------------------------------------------------------------------------------------
# The base, as the later stages see it
# ------------------------------------------------------------------------------------------------
@dataclass
class _Base:
    result: Dict[str, Any]
    sha: Optional[str]  # SHA-256 of base.pt (None: unknown, a legacy base.json without base.pt)
    legacy: bool
    model: Optional[torch.nn.Module] = None


def _load_base(ctx: Context, need_model: bool) -> _Base:
    cfg, run = ctx.cfg, ctx.run
    if not os.path.isfile(run.base_json):
        raise CheckpointError(f"{run.base_json} is missing: there is no finished base model in {run.out}; run "
                              f"`connect-tp train` with this --preset, --seed and --out first")
    base = run.read_base()
    wanted = {k: cfg[k] for k in ("preset", "seed", "dataset", "model")}
    diffs = [(k, base.get(k), v) for k, v in wanted.items() if base.get(k) != v]
    if diffs:
        raise ProvenanceError(f"{run.base_json} is the base model of another run ({describe_differences(diffs)}); "
                              f"give that run's --preset/--seed, or a new --out")
    recorded = base.get("provenance")
    legacy = recorded is None
    if not legacy:
        sha = (recorded.get("output") or {}).get("sha256")
        if need_model or os.path.isfile(run.base_ckpt):
            if not os.path.isfile(run.base_ckpt):
                raise CheckpointError(f"{run.base_ckpt} is missing although {run.base_json} is there; train the "
                                      f"base again (`connect-tp train --force`) or give a new --out")
            actual = sha256_file(run.base_ckpt)
            if actual != sha:
                raise ProvenanceError(f"{run.base_ckpt} (sha256 {short_hash(actual)}) is not the model {run.base_json} "
                                      f"was written for (sha256 {short_hash(sha)}): a training of a new base started "
                                      f"since; finish it with `connect-tp train --resume`, or train again with "
                                      f"`connect-tp train --force`")
    else:
        sha = sha256_file(run.base_ckpt) if os.path.isfile(run.base_ckpt) else None
        if sha is None and need_model:
            raise CheckpointError(f"{run.base_ckpt} is missing although {run.base_json} is there; train the base "
                                  f"again (`connect-tp train --force`) or give a new --out")
        if sha is not None and _mtime(run.base_ckpt) > _mtime(run.base_json) + 1.0:
            raise ProvenanceError(f"{run.base_ckpt} was written after {run.base_json} (a training of a new base "
                                  f"started since); finish it with `connect-tp train --resume`, or train again "
                                  f"with `connect-tp train --force`")
        ctx.note(f"note: {run.base_json} has no fingerprint (written by an older connect-tp); accepted as the base "
                 f"of this run because its preset, seed, dataset and model match")
    model = None
    if need_model:
        model, checkpoint = load_model_checkpoint(run.base_ckpt)
        if "best_state_dict" not in checkpoint:
            raise CheckpointError(f"checkpoint {run.base_ckpt} holds no best_state_dict; it is not a base model "
                                  f"written by `connect-tp train`")
        try:
            model.load_state_dict(checkpoint["best_state_dict"])  # the best epoch is the base model
        except (RuntimeError, TypeError, ValueError, AttributeError) as exc:
            raise CheckpointError(f"checkpoint {run.base_ckpt}: its best_state_dict does not fit model "
                                  f"{cfg['model']} ({type(exc).__name__}: {exc}); train the base again "
                                  f"(`connect-tp train --force`) or give a new --out") from exc
    return _Base(base, sha, legacy, model)


def _check_pruned(ctx: Context, method: str, speed_up: float, base: _Base, *, check_config: bool,
                  fix: str) -> Tuple[Dict[str, Any], str, bool, Optional[str]]:
    """Check a pruned model and its result; returns ``(result, pruned sha, legacy, note)``.

    ``check_config``: compare the pruning config too (the prune stage); fine-tuning only checks that
    the result and the model belong together and come from the current base.
    """
    cfg, run = ctx.cfg, ctx.run
    result_path, pruned_path = run.result(method, speed_up), run.pruned(method, speed_up)
    result = run.read_result(method, speed_up)
    if not os.path.isfile(pruned_path):
        raise CheckpointError(f"{pruned_path} is missing although {result_path} is there; {fix}")
    pruned_sha = sha256_file(pruned_path)
    for key in ("preset", "seed"):
        if result[key] != cfg[key]:
            raise ProvenanceError(f"{result_path} belongs to another run ({key}={result[key]!r} there, "
                                  f"{cfg[key]!r} here); give that run's options, or a new --out")
    recorded = (result.get("provenance") or {}).get("prune")
    if recorded is not None:
        want = prune_config(cfg, method, speed_up)
        if not check_config:
            want = dict(recorded.get("config") or {}, **{k: want[k] for k in ("preset", "seed", "method",
                                                                                 "target_speed_up")})
        check_fingerprint(result_path, recorded, want, what="a pruning result", parent_sha=base.sha,
                          parent_name="base model", fix=fix)
        expected = (recorded.get("output") or {}).get("sha256")
        if expected != pruned_sha:
            raise ProvenanceError(f"{pruned_path} (sha256 {short_hash(pruned_sha)}) is not the pruned model "
                                  f"{result_path} describes (sha256 {short_hash(expected)}): they come from "
                                  f"different prune runs; {fix}")
        return result, pruned_sha, False, None
    # Written by an older connect-tp: check what it carries.
    if not base.legacy:
        raise ProvenanceError(f"{result_path} has no fingerprint (written by an older connect-tp) while the base "
                              f"model has one, so it was pruned from an older base; {fix}")
    if os.path.isfile(run.base_ckpt) and _mtime(pruned_path) < _mtime(run.base_ckpt):
        raise ProvenanceError(f"{pruned_path} has no fingerprint and is older than {run.base_ckpt}, so it was "
                              f"pruned from an earlier base; {fix}")
    wanted = {"preset": cfg["preset"], "seed": cfg["seed"], "dataset": cfg["dataset"], "model": cfg["model"],
              "method": method, "target_speed_up": float(speed_up)}
    if check_config:
        wanted.update(iterative_steps=cfg["iterative_steps"], max_pruning_ratio=cfg["max_pruning_ratio"])
    message = check_legacy_fields(result_path, result, wanted, what="a pruning result", fix=fix)
    base_result = base.result
    for key, base_key in (("base_acc", "acc"), ("base_macs", "macs"), ("base_params", "params")):
        if key in result and normalize(result[key]) != normalize(base_result.get(base_key)):
            raise ProvenanceError(f"{result_path} was pruned from another base model ({key}={result[key]!r} there, "
                                  f"{base_key}={base_result.get(base_key)!r} in {run.base_json}); {fix}")
    speed = _load_dict_checkpoint(pruned_path).get("speed_up")
    if speed is not None and abs(float(speed) - float(result["speed_up"])) > 1e-9:
        raise ProvenanceError(f"{pruned_path} (speed-up {float(speed):.4f}x) is not the pruned model {result_path} "
                              f"describes ({result['speed_up']:.4f}x); {fix}")
    return result, pruned_sha, True, message


# ------------------------------------------------------------------------------------------------
# Prune
# ------------------------------------------------------------------------------------------------
def stage_prune(ctx: Context) -> List[Dict[str, Any]]:
    """Prune the base model with every method to every target; one trajectory per method (rank 0)."""
    cfg, run = ctx.cfg, ctx.run
    since, start = run.mark(), time.time()
    if not ctx.dist.is_main:
        ctx.dist.barrier()
        return []
    base = _load_base(ctx, need_model=True)
    plan: Dict[str, List[float]] = {}
    for method in cfg["methods"]:  # every check before any pruning
        plan[method] = []
        for speed_up in cfg["speed_ups"]:
            if not (ctx.resume and os.path.isfile(run.result(method, speed_up))
                    and os.path.isfile(run.pruned(method, speed_up))):
                plan[method].append(speed_up)
                continue
            try:
                _, _, _, message = _check_pruned(ctx, method, speed_up, base, check_config=True, fix=_FIX_PRUNE)
            except (ProvenanceError, CheckpointError) as exc:
                if not ctx.force:
                    raise
                ctx.note(f"note: --force: pruning {tag(method, speed_up)} again ({exc})")
                plan[method].append(speed_up)
            else:
                if message:
                    ctx.note(message)
    results: List[Dict[str, Any]] = []
    if any(plan.values()):
        calibration = ctx.calibration()
        for method in cfg["methods"]:
            if plan[method]:
                results += _prune_method(ctx, method, plan[method], base, calibration)
            else:
                ctx.log(f"prune {method}: every target is done, skipped")
    ctx.dist.barrier()
    ctx.log(f"prune: done in {time.time() - start:.0f} s; {run.summary(since)}")
    return results


def _prune_method(ctx: Context, method: str, todo: List[float], base: _Base, calibration) -> List[Dict[str, Any]]:
    cfg, run, device = ctx.cfg, ctx.run, ctx.cfg["device"]
    model = copy.deepcopy(base.model).to(device)
    set_seed(cfg["seed"])  # random importance draws from the global generator
    importance = build_importance(method, ctx.example_inputs.to(device), cfg["connect_lam"], seed=cfg["seed"])
    test_loader = ctx.test_loader()
    results: List[Dict[str, Any]] = []
    start = time.time()

    def on_target(snap) -> None:
        if snap.target not in todo:
            return
        pruned_path = run.pruned(method, snap.target)
        pruned = snap.model.to(device)
        acc = evaluate(pruned, test_loader, device)["acc"]
        acc_recal = evaluate(recalibrate_batchnorm(pruned, calibration, device), test_loader, device)["acc"]
        report = layer_report(pruned.cpu(), ctx.example_inputs)
        fp = fingerprint("prune", prune_config(cfg, method, snap.target), parent=(run.rel(run.base_ckpt), base.sha))
        save_model_checkpoint(pruned_path, pruned.cpu(), ctx.arch, speed_up=snap.speed_up, provenance=fp)
        run.record(pruned_path)
        pruned_sha = sha256_file(pruned_path)
        base_result = base.result
        result = {
            "preset": cfg["preset"], "seed": cfg["seed"], "dataset": cfg["dataset"], "model": cfg["model"],
            "method": method, "target_speed_up": snap.target, "speed_up": snap.speed_up, "step": snap.step,
            "iterative_steps": cfg["iterative_steps"], "max_pruning_ratio": cfg["max_pruning_ratio"],
            "calibration_samples": cfg["calibration_samples"], "bn_refresh_every": cfg.get("bn_refresh_every", 0),
            "macs": snap.macs, "params": snap.params, "base_macs": base_result["macs"],
            "base_params": base_result["params"], "base_acc": base_result["acc"], "pruned_acc": acc,
            "pruned_acc_bn_recalibrated": acc_recal, "finetuned_acc": None, "prune_seconds": time.time() - start,
            "channels": report["channels"], "collapsed_layers": report["collapsed_layers"],
            "dead_channels": report["dead_channels"], "network_disconnected": report["network_disconnected"],
            "signal_flow": report["signal_flow"],
        }
        if parse_method(method)[0] == "connect":
            # The lambda actually used (a balance resolves to one at the first step) and the options.
            result.update(connect_lam=importance.lam, connect_balance=importance.balance,
                          bn_flow=importance.bn_flow)
        result["environment"] = run_environment(cfg["device"])
        result["provenance"] = {"prune": dict(fp, output={"path": run.rel(pruned_path), "sha256": pruned_sha})}
        run.write_prune_result(method, snap.target, result, pruned_sha, ctx.note)
        results.append(result)
        flag = " LAYER COLLAPSE" if report["collapsed_layers"] else ""
        ctx.log(f"prune {method}: {snap.speed_up:.2f}x at step {snap.step}, {snap.params / 1e3:.1f}k params, "
                f"acc {acc:.2f}% (BN recalibrated {acc_recal:.2f}%){flag}")

    # The trajectory does not depend on the targets: stop at the highest one still to do.
    targets = [s for s in cfg["speed_ups"] if s <= max(todo)]
    try:
        progressive_prune(model, ctx.example_inputs, importance, targets,
                          calibration=calibration,  # used only by importances that read .grad
                          iterative_steps=cfg["iterative_steps"], max_pruning_ratio=cfg["max_pruning_ratio"],
                          device=device, on_target=on_target, desc=f"prune {method}",
                          bn_refresh_every=cfg.get("bn_refresh_every", 0))
    except UnreachableSpeedUp as exc:
        saved = [f"{s.target:g}x" for s in exc.snapshots if s.target in todo]
        raise UnreachableSpeedUp(
            f"{exc} (--speed-up); " + (f"the targets reached are saved ({', '.join(saved)})" if saved
                                       else f"nothing was saved for {method}"),
            target=exc.target, reached=exc.reached, step=exc.step, iterative_steps=exc.iterative_steps,
            snapshots=exc.snapshots) from None
    return results


# ------------------------------------------------------------------------------------------------
# Fine-tune
# ------------------------------------------------------------------------------------------------
@dataclass
class _Job:
    method: str
    speed_up: float
    pruned_sha: str
    pruned_legacy: bool
    short: bool = False
    full: bool = True
    resume_ckpt: bool = False


def _check_finetune_record(ctx: Context, path: str, result: Dict[str, Any], recorded: Optional[Dict[str, Any]],
                           want: Dict[str, Any], job: "_Job", legacy_fields: Dict[str, Any], what: str) -> None:
    """Check a (short or full) fine-tuning result against its fingerprint, or, for a result written by
    an older connect-tp without one, against the fields it carries; raise :class:`ProvenanceError`."""
    if recorded is not None:
        check_fingerprint(path, recorded, want, what=what, parent_sha=job.pruned_sha,
                          parent_name="pruned model", fix=_FIX_FINETUNE)
        return
    if not job.pruned_legacy:
        raise ProvenanceError(f"{path} holds {what} without fingerprint (written by an older connect-tp) for a "
                              f"pruned model that has one, so it belongs to an older pruned model; {_FIX_FINETUNE}")
    ctx.note(check_legacy_fields(path, result, legacy_fields, what=what, fix=_FIX_FINETUNE))


def _plan_short(ctx: Context, result: Dict[str, Any], job: _Job) -> bool:
    cfg, run = ctx.cfg, ctx.run
    if not cfg["short_ft_steps"]:
        return False
    recorded = (result.get("provenance") or {}).get("short_finetune")
    if not ctx.resume or (recorded is None and result.get("short_finetuned_acc") is None):
        return True
    path = run.result(job.method, job.speed_up)
    try:
        _check_finetune_record(ctx, path, result, recorded, short_finetune_config(cfg), job,
                               {"short_finetune_steps": cfg["short_ft_steps"]}, "a short fine-tuning result")
    except ProvenanceError as exc:
        _unless_forced(ctx, exc, f"running the short fine-tuning of {tag(job.method, job.speed_up)} again")
        return True
    return False


def _plan_full(ctx: Context, result: Dict[str, Any], job: _Job) -> Tuple[bool, bool]:
    """``(run it, resume its checkpoint)``."""
    cfg, run = ctx.cfg, ctx.run
    want = finetune_config(cfg)
    path, ckpt_path = run.result(job.method, job.speed_up), run.finetuned(job.method, job.speed_up)
    pruned_path = run.pruned(job.method, job.speed_up)
    if not ctx.resume:
        return True, False
    if result.get("finetuned_acc") is not None:
        recorded = (result.get("provenance") or {}).get("finetune")
        try:
            _check_finetune_record(ctx, path, result, recorded, want, job, {"finetune_epochs": cfg["ft_epochs"]},
                                   "a fine-tuning result")
            expected = (recorded or {}).get("output", {}).get("sha256")
            if recorded is not None and os.path.isfile(ckpt_path) and sha256_file(ckpt_path) != expected:
                raise ProvenanceError(f"{ckpt_path} is not the checkpoint {path} was written from (sha256 "
                                      f"{short_hash(sha256_file(ckpt_path))} vs {short_hash(expected)}); "
                                      f"{_FIX_FINETUNE}")
            return False, False
        except ProvenanceError as exc:
            _unless_forced(ctx, exc, f"fine-tuning {tag(job.method, job.speed_up)} again")
            return True, False
    if os.path.isfile(ckpt_path):
        try:
            message = _check_training_checkpoint(
                ckpt_path, _load_dict_checkpoint(ckpt_path), want, what="a partly fine-tuned model", fix=_FIX_FINETUNE,
                parent_sha=job.pruned_sha, parent_name="pruned model", parent_path=pruned_path,
                legacy_ok=job.pruned_legacy)
        except ProvenanceError as exc:
            _unless_forced(ctx, exc, f"discarding {ckpt_path} and fine-tuning from the start")
            return True, False
        if message:
            ctx.note(message)
        return True, True
    return True, False


def stage_finetune(ctx: Context) -> List[Dict[str, Any]]:
    """Fine-tune every pruned model; the best test accuracy is recorded as ``finetuned_acc``."""
    cfg, run = ctx.cfg, ctx.run
    since, start = run.mark(), time.time()
    base = _load_base(ctx, need_model=False)
    if base.sha is None:
        ctx.note(f"note: {run.base_ckpt} is missing, so the pruned models cannot be checked against it")
    jobs: List[_Job] = []
    for method in cfg["methods"]:  # every check before any training
        for speed_up in cfg["ft_speed_ups"]:
            if not os.path.isfile(run.result(method, speed_up)):
                raise CheckpointError(f"{run.result(method, speed_up)} is missing: {method} was not pruned to "
                                      f"{speed_up:g}x in {run.out}; run `connect-tp prune` with the same options first")
            result, pruned_sha, legacy, message = _check_pruned(ctx, method, speed_up, base, check_config=False,
                                                                fix=_FIX_PRUNE_INPUT)
            if message:
                ctx.note(message)
            job = _Job(method, speed_up, pruned_sha, legacy)
            job.short = _plan_short(ctx, result, job)
            job.full, job.resume_ckpt = _plan_full(ctx, result, job)
            if job.short or job.full:
                # Its hash matched; its content must be a model too, before any fine-tuning starts.
                load_model_checkpoint(run.pruned(method, speed_up))
            jobs.append(job)
    results = []
    for job in jobs:
        results.append(_finetune_one(ctx, job))
    ctx.log(f"finetune: done in {time.time() - start:.0f} s; {run.summary(since)}")
    return results


def _finetune_one(ctx: Context, job: _Job) -> Dict[str, Any]:
    cfg, run, device = ctx.cfg, ctx.run, ctx.cfg["device"]
    name = tag(job.method, job.speed_up)
    pruned_path, ckpt_path = run.pruned(job.method, job.speed_up), run.finetuned(job.method, job.speed_up)
    parent = (run.rel(pruned_path), job.pruned_sha)
    result = run.read_result(job.method, job.speed_up)
    if job.short:
        # A short fixed budget beside the full one: it repairs less, so it separates criteria more.
        model, _ = load_model_checkpoint(pruned_path)
        fp = fingerprint("short_finetune", short_finetune_config(cfg), parent=parent)
        short = short_finetune(model, ctx.train_set, steps=cfg["short_ft_steps"], lr=cfg["ft_lr"],
                               weight_decay=cfg["weight_decay"], batch_size=cfg["batch_size"], device=device,
                               seed=cfg["seed"], desc=f"short-finetune {name}" if ctx.dist.is_main else None)
        acc = evaluate(short, ctx.test_loader(), device, ctx.dist)["acc"]
        if ctx.dist.is_main:
            result = run.write_finetune_result(job.method, job.speed_up, "short_finetune",
                                               {"short_finetuned_acc": acc, "short_finetune_steps": cfg["short_ft_steps"]},
                                               fp, job.pruned_sha)
        ctx.dist.barrier()
        ctx.log(f"finetune {name}: {cfg['short_ft_steps']} steps -> {acc:.2f}%")
    if not job.full:
        ctx.log(f"finetune {name}: done ({result['finetuned_acc']:.2f}%), skipped")
        return result
    model, _ = load_model_checkpoint(pruned_path)
    fp = fingerprint("finetune", finetune_config(cfg), parent=parent)
    epoch = 0
    if job.resume_ckpt:
        epoch = _load_dict_checkpoint(ckpt_path).get("epoch", -1) + 1
        ctx.log(f"finetune {name}: resuming {ckpt_path} after epoch {epoch} of {cfg['ft_epochs']}")
    elif ctx.dist.is_main:
        # Starting over: the old checkpoint and numbers must not be taken for this run's if it stops early.
        if os.path.isfile(ckpt_path):
            os.remove(ckpt_path)
        if run.clear_result_section(job.method, job.speed_up, "finetune"):
            ctx.note(f"note: {run.result(job.method, job.speed_up)}: cleared the old fine-tuning numbers "
                     f"(fine-tuning again from the start)")
    ctx.dist.barrier()
    start = time.time()
    run.record_partial(ckpt_path, epoch, cfg["ft_epochs"])
    out = fit(model, ctx.train_set, ctx.test_set, epochs=cfg["ft_epochs"], lr=cfg["ft_lr"],
              milestones=cfg["ft_milestones"], weight_decay=cfg["weight_decay"], batch_size=cfg["batch_size"],
              device=device, checkpoint_path=ckpt_path, resume=job.resume_ckpt, seed=cfg["seed"], ctx=ctx.dist,
              num_workers=ctx.workers, desc=f"finetune {name}", arch=ctx.arch, checkpoint_extra={"provenance": fp},
              on_epoch=lambda done: run.record_partial(ckpt_path, done, cfg["ft_epochs"]), log=ctx.log,
              schedule=cfg.get("ft_schedule", "step"))
    if ctx.dist.is_main:
        run.record(ckpt_path)
        fp = dict(fp, output={"path": run.rel(ckpt_path), "sha256": sha256_file(ckpt_path)})
        result = run.write_finetune_result(
            job.method, job.speed_up, "finetune",
            {"finetuned_acc": out["best_acc"], "finetune_epochs": cfg["ft_epochs"],
             "finetune_seconds": time.time() - start, "finetune_history": out["history"],
             "finetune_world_size": ctx.dist.world_size}, fp, job.pruned_sha)
    ctx.dist.barrier()
    ctx.log(f"finetune {name}: {result['pruned_acc']:.2f}% -> {out['best_acc']:.2f}%")
    return result
