"""Training, evaluation and fine-tuning loops with atomic, resumable checkpoints.

One loop, :func:`fit`, serves both the base training and the fine-tuning after pruning: SGD with
momentum, a step schedule (``MultiStepLR``), the best test accuracy kept, and a checkpoint after
every epoch. Checkpoints and JSON results are written atomically (temporary file in the same
folder, then ``os.replace``), so a run killed at any moment leaves either the previous or the new
file, never a truncated one; ``resume=True`` continues after the last completed epoch. The progress
bar advances per batch and shows the running loss and accuracy; a summary line per epoch goes to
the ``log`` callback.

Under ``torchrun`` (``WORLD_SIZE > 1`` in the environment) :func:`init_distributed` starts a process
group (NCCL on CUDA, gloo on CPU) and :func:`fit` trains with ``DistributedDataParallel``; the
global batch size stays the one requested, split across processes, and only rank 0 writes files.

Pruned models have layer widths that the model constructors do not know. A checkpoint therefore
stores the model name and a plain ``state_dict``; :func:`load_model_checkpoint` rebuilds the
model and shrinks every layer to the saved shapes before loading (works with
``torch.load(weights_only=True)``, no pickled modules).

Example:
    >>> from connect_tp.models import resnet20
    >>> from connect_tp.training import fit, evaluate, make_loader
    >>> model = resnet20(num_classes=10, in_channels=1)
    >>> result = fit(model, train_set, test_set, epochs=2, lr=0.1, milestones=[1],
    ...              checkpoint_path="runs/base.pt", resume=True)  # doctest: +SKIP
    >>> result["best_acc"]  # doctest: +SKIP
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, Subset
from tqdm.auto import tqdm

# The file helpers live in connect_tp.files; re-exported here, where they were first defined.
from .files import CheckpointError, atomic_save, atomic_write, atomic_write_json, load_checkpoint, read_json

__all__ = [
    "CheckpointError", "DistributedContext", "init_distributed", "cleanup_distributed",
    "atomic_write", "atomic_save", "atomic_write_json", "load_checkpoint", "read_json",
    "save_model_checkpoint", "load_model_checkpoint", "shrink_to_state_dict",
    "make_loader", "evaluate", "fit", "set_seed", "short_finetune",
]


# ---------------------------------------------------------------------------------------------
# Models of any (pruned) width
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def shrink_to_state_dict(model: nn.Module, state_dict: Dict[str, torch.Tensor]) -> nn.Module:
    """Resize the convolutions, linear and BatchNorm layers of ``model`` to the shapes in ``state_dict``.

    This turns a freshly built (unpruned) model into the architecture of a pruned checkpoint, so
    that ``model.load_state_dict(state_dict)`` succeeds. Only widths change; depth must match.
    """
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            weight = state_dict.get(prefix + "weight")
            if weight is None:
                continue
            module.weight = nn.Parameter(torch.empty_like(weight))
            if module.bias is not None:
                module.bias = nn.Parameter(torch.empty(weight.shape[0]))
            if isinstance(module, nn.Conv2d):
                module.out_channels = weight.shape[0]
                module.in_channels = weight.shape[1] * module.groups
            else:
                module.out_features, module.in_features = weight.shape
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            mean = state_dict.get(prefix + "running_mean")
            if mean is None:
                continue
            n = mean.shape[0]
            module.num_features = n
            if module.affine:
                module.weight = nn.Parameter(torch.empty(n))
                module.bias = nn.Parameter(torch.empty(n))
            module.running_mean = torch.zeros(n)
            module.running_var = torch.ones(n)
    return model


def save_model_checkpoint(path: str, model: nn.Module, arch: Dict[str, Any], **extra: Any) -> None:
    """Atomically save ``model`` (any width) with the arguments that rebuild it.

    Args:
        path: destination file.
        model: the model (unwrapped from DDP).
        arch: ``{"model": name, "num_classes": int, "in_channels": int}`` for
            :func:`connect_tp.models.create_model`.
        **extra: more tensors or plain values to store (epoch, accuracy, ...).
    """
    atomic_save({"arch": dict(arch), "state_dict": model.state_dict(), **extra}, path)


def load_model_checkpoint(path: str, map_location: Any = "cpu"):
    """Rebuild the model saved by :func:`save_model_checkpoint`.

    Returns:
        ``(model, checkpoint)``: the model with the saved widths and weights, and the checkpoint dict.

    Raises:
        CheckpointError: the file is missing or corrupt, or holds something else than a model saved
            by :func:`save_model_checkpoint` (a bare tensor, an unknown ``arch["model"]``, weights
            that do not fit); the message names the file.
    """
    from .models import MODEL_REGISTRY, create_model

    checkpoint = load_checkpoint(path, map_location)
    fix = "it was not written by save_model_checkpoint; delete it and rerun the stage that writes it"
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(checkpoint).__name__}, not a model; {fix}")
    if "arch" not in checkpoint or "state_dict" not in checkpoint:
        raise CheckpointError(f"checkpoint {path} holds no model (keys {sorted(map(str, checkpoint))}); {fix}")
    arch, state_dict = checkpoint["arch"], checkpoint["state_dict"]
    if not isinstance(arch, dict) or not isinstance(state_dict, dict):
        raise CheckpointError(f"checkpoint {path} holds a malformed model (arch {type(arch).__name__}, "
                              f"state_dict {type(state_dict).__name__}); {fix}")
    name = arch.get("model")
    if not isinstance(name, str) or name not in MODEL_REGISTRY:
        raise CheckpointError(f"checkpoint {path} names an unknown model {name!r} (known: "
                              f"{', '.join(sorted(MODEL_REGISTRY))}); {fix}")
    try:
        model = create_model(name, num_classes=arch["num_classes"], in_channels=arch["in_channels"])
        shrink_to_state_dict(model, state_dict)
        model.load_state_dict(state_dict)
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError) as exc:
        detail = " ".join(str(exc).split())  # torch's messages span lines; the error is one
        detail = detail if len(detail) <= 300 else detail[:300] + " ..."
        raise CheckpointError(f"checkpoint {path} does not fit model {name} ({type(exc).__name__}: {detail}); "
                              f"{fix}") from exc
    return model, checkpoint


# ---------------------------------------------------------------------------------------------
# Distributed data parallel
# ---------------------------------------------------------------------------------------------
@dataclass
class DistributedContext:
    """Rank and world size of this process; ``world_size == 1`` when not launched by torchrun."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def init_distributed(device: str = "cpu") -> DistributedContext:
    """Join the process group that ``torchrun`` set up through environment variables.

    Returns a single-process context when ``WORLD_SIZE`` is unset or 1. On CUDA each process uses
    ``cuda:LOCAL_RANK`` (set as the current device) and NCCL; on CPU the gloo backend.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistributedContext()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if str(device).startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
    return DistributedContext(rank, world_size, local_rank)


def cleanup_distributed() -> None:
    """Destroy the process group if one was started."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def set_seed(seed: int) -> None:
    """Seed Python-visible torch RNGs (CPU and CUDA)."""
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


# ---------------------------------------------------------------------------------------------
# Loops
# ---------------------------------------------------------------------------------------------
def make_loader(dataset: Dataset, batch_size: int, train: bool, ctx: Optional[DistributedContext] = None,
                seed: int = 0, epoch: int = 0, num_workers: int = 0) -> DataLoader:
    """A loader that shuffles reproducibly per ``(seed, epoch)`` and shards across DDP ranks.

    Training data is split by ``DistributedSampler`` (each rank gets ``batch_size / world_size``
    per step, so the global batch is unchanged); test data is split into disjoint strided shards
    whose results :func:`evaluate` sums across ranks.
    """
    ctx = ctx or DistributedContext()
    per_rank_batch = max(1, batch_size // ctx.world_size)
    pin = torch.cuda.is_available()
    if train:
        if ctx.enabled:
            sampler = DistributedSampler(dataset, ctx.world_size, ctx.rank, shuffle=True, seed=seed)
            sampler.set_epoch(epoch)
        else:
            sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
        return DataLoader(dataset, per_rank_batch, sampler=sampler, num_workers=num_workers,
                          pin_memory=pin, drop_last=False)
    if ctx.enabled:
        dataset = Subset(dataset, range(ctx.rank, len(dataset), ctx.world_size))
    return DataLoader(dataset, per_rank_batch, shuffle=False, num_workers=num_workers, pin_memory=pin)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: Any = "cpu",
             ctx: Optional[DistributedContext] = None) -> Dict[str, float]:
    """Top-1 accuracy (percent) and mean cross-entropy of ``model`` on ``loader``.

    Under DDP every rank evaluates its shard and the counts are summed, so all ranks return the
    accuracy on the whole test set.
    """
    was_training = model.training
    model.eval()
    stats = torch.zeros(3, dtype=torch.float64, device=device)  # correct, loss sum, count
    for images, labels in loader:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        logits = model(images)
        stats[0] += (logits.argmax(1) == labels).sum()
        stats[1] += F.cross_entropy(logits, labels, reduction="sum")
        stats[2] += labels.numel()
    if ctx is not None and ctx.enabled:
        dist.all_reduce(stats)
    model.train(was_training)
    n = max(stats[2].item(), 1.0)
    return {"acc": 100.0 * stats[0].item() / n, "loss": stats[1].item() / n}


def short_finetune(model: nn.Module, train_set: Dataset, *, steps: int, lr: float, weight_decay: float = 5e-4,
                   momentum: float = 0.9, batch_size: int = 128, device: Any = "cpu", seed: int = 0,
                   desc: Optional[str] = None) -> nn.Module:
    """``steps`` SGD steps at a constant learning rate on reproducibly shuffled batches; returns the model.

    A fixed budget far below an epoch: it repairs stale BatchNorm statistics and a little more, so
    the accuracy after it still reflects which channels the criterion kept. With ``desc`` a
    progress bar shows the steps and the running loss and accuracy.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    model = model.to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    done = 0
    meter = _Meter()
    with tqdm(total=steps, desc=desc, disable=desc is None, dynamic_ncols=True, unit="batch") as bar:
        while done < steps:
            for images, labels in make_loader(train_set, batch_size, True, seed=seed, epoch=done):
                images, labels = images.to(device), labels.to(device)
                logits = model(images)
                loss = F.cross_entropy(logits, labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                done += 1
                meter.add(loss, logits, labels)
                bar.update(1)
                bar.set_postfix(meter.postfix(), refresh=False)
                if done == steps:
                    break
    return model.eval()


class _Meter:
    """Running mean loss and accuracy of the training batches seen so far (for progress bars)."""

    def __init__(self) -> None:
        self.loss_sum, self.correct, self.seen = 0.0, 0, 0

    def add(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> float:
        value = loss.item()
        self.loss_sum += value * labels.numel()
        self.correct += int((logits.argmax(1) == labels).sum())
        self.seen += labels.numel()
        return value

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.seen, 1)

    @property
    def acc(self) -> float:
        return 100.0 * self.correct / max(self.seen, 1)

    def postfix(self, **extra: str) -> Dict[str, str]:
        return dict(extra, loss=f"{self.loss:.3f}", acc=f"{self.acc:.1f}%")


def fit(model: nn.Module, train_set: Dataset, test_set: Dataset, *, epochs: int, lr: float,
        milestones: Sequence[int], gamma: float = 0.1, weight_decay: float = 5e-4, momentum: float = 0.9,
        batch_size: int = 128, device: Any = "cpu", checkpoint_path: Optional[str] = None,
        resume: bool = False, seed: int = 0, ctx: Optional[DistributedContext] = None,
        num_workers: int = 0, desc: str = "train", arch: Optional[Dict[str, Any]] = None,
        checkpoint_extra: Optional[Dict[str, Any]] = None, on_epoch: Optional[Callable[[int], None]] = None,
        log: Optional[Callable[[str], None]] = None, progress: bool = True,
        schedule: str = "step") -> Dict[str, Any]:
    """Train ``model`` with SGD and a learning-rate schedule; checkpoint every epoch; keep the best accuracy.

    Args:
        model: trained in place; on return it holds the weights of the best epoch.
        train_set, test_set: datasets of ``(image, label)``.
        epochs, lr, milestones, gamma, weight_decay, momentum, batch_size: the SGD recipe
            (``MultiStepLR`` multiplies the learning rate by ``gamma`` at each milestone epoch).
        device: ``"cpu"``, ``"cuda"``, ...
        checkpoint_path: where the per-epoch checkpoint goes (None: no checkpoint, no resume).
        resume: continue from ``checkpoint_path`` if it exists (its model must have the same widths).
        seed: seeds the shuffling and augmentation of every epoch, so a resumed run repeats the
            epochs it would have run.
        ctx: distributed context from :func:`init_distributed` (None: single process).
        desc: label of the progress bar.
        arch: model-constructor arguments stored in the checkpoint (see :func:`save_model_checkpoint`).
        checkpoint_extra: more plain values stored in every checkpoint (e.g. a fingerprint).
        on_epoch: called with the number of completed epochs after each checkpoint is written.
        log: called with a one-line summary after every epoch (rank 0 only).
        progress: show a progress bar that advances per batch with the running loss and accuracy.
        schedule: ``"step"`` (``MultiStepLR`` at ``milestones``) or ``"cosine"``: the learning rate
            follows a cosine from ``lr`` to 0 over every batch of the run (``milestones`` unused),
            so a one-epoch fine-tuning ends at a small step size instead of a noisy end point.

    Returns:
        ``{"best_acc", "final_acc", "epochs_run", "resumed_from_epoch", "history"}``; ``history``
        lists ``{"epoch", "lr", "train_loss", "train_acc", "test_acc"}`` per epoch.

    Raises:
        CheckpointError: ``resume`` was asked and the checkpoint is corrupt or of another model.
    """
    ctx = ctx or DistributedContext()
    model.to(device)
    net: nn.Module = model
    if ctx.enabled:
        ids = [ctx.local_rank] if str(device).startswith("cuda") else None
        net = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    batches = len(make_loader(train_set, batch_size, True, ctx, seed, 0, 0))
    if schedule == "step":
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(milestones), gamma=gamma)
    elif schedule == "cosine":  # stepped per batch
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs * batches))
    else:
        raise ValueError(f"schedule must be 'step' or 'cosine', got {schedule!r}")
    start_epoch, best_acc, history = 0, -1.0, []
    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    resumed_from = None

    if resume and checkpoint_path and os.path.isfile(checkpoint_path):
        state = load_checkpoint(checkpoint_path, map_location=device)
        if not isinstance(state, dict):
            raise CheckpointError(f"checkpoint {checkpoint_path} holds a {type(state).__name__}, not a training "
                                  f"state; delete it or run without --resume")
        if state.get("schedule", "step") != schedule:  # a scheduler's state loads into the other without error
            raise CheckpointError(f"checkpoint {checkpoint_path} was written with schedule "
                                  f"{state.get('schedule', 'step')!r}, this run uses {schedule!r}; "
                                  f"delete it or run without --resume")
        try:
            model.load_state_dict(state["state_dict"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            start_epoch, best_acc, history = state["epoch"] + 1, state["best_acc"], list(state["history"])
            best_state = state["best_state_dict"]
        except (KeyError, RuntimeError, ValueError, TypeError) as exc:
            raise CheckpointError(f"checkpoint {checkpoint_path} does not match this run ({exc}); "
                                  f"delete it or run without --resume") from exc
        resumed_from = state["epoch"]

    show = progress and ctx.is_main
    with tqdm(total=epochs * batches, initial=min(start_epoch, epochs) * batches, desc=desc, disable=not show,
              dynamic_ncols=True, unit="batch") as bar:
        for epoch in range(start_epoch, epochs):
            net.train()
            epoch_lr = optimizer.param_groups[0]["lr"]
            # Per-epoch seeding makes augmentation and shuffling of epoch e identical with or without resume.
            set_seed(seed * 100003 + epoch)
            loader = make_loader(train_set, batch_size, True, ctx, seed, epoch, num_workers)
            meter = _Meter()
            for images, labels in loader:
                images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
                logits = net(images)
                loss = F.cross_entropy(logits, labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if schedule == "cosine":
                    scheduler.step()
                value = meter.add(loss, logits, labels)
                if not math.isfinite(value):
                    raise FloatingPointError(f"{desc}: loss became {value} in epoch {epoch}; lower the learning rate")
                bar.update(1)
                bar.set_postfix(meter.postfix(epoch=f"{epoch + 1}/{epochs}"), refresh=False)
            if schedule == "step":
                scheduler.step()
            acc = evaluate(model, make_loader(test_set, batch_size * 2, False, ctx, num_workers=num_workers),
                           device, ctx)["acc"]
            if acc > best_acc:
                best_acc = acc
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            history.append({"epoch": epoch, "lr": epoch_lr, "train_loss": meter.loss, "train_acc": meter.acc,
                            "test_acc": acc})
            bar.set_postfix(meter.postfix(epoch=f"{epoch + 1}/{epochs}", test=f"{acc:.2f}%"), refresh=False)
            if checkpoint_path and ctx.is_main:
                save_model_checkpoint(checkpoint_path, model, arch or {}, epoch=epoch, best_acc=best_acc,
                                      history=history, best_state_dict=best_state,
                                      optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                                      schedule=schedule,
                                      **(checkpoint_extra or {}))
            if ctx.is_main:
                if on_epoch is not None:
                    on_epoch(epoch + 1)
                if log is not None:
                    log(f"{desc}: epoch {epoch + 1}/{epochs}, lr {epoch_lr:g}, train loss {meter.loss:.3f}, "
                        f"train acc {meter.acc:.2f}%, test acc {acc:.2f}% (best {best_acc:.2f}%)")
            ctx.barrier()
    final_acc = history[-1]["test_acc"] if history else best_acc
    model.load_state_dict(best_state)
    return {"best_acc": best_acc, "final_acc": final_acc, "epochs_run": max(epochs - start_epoch, 0),
            "resumed_from_epoch": resumed_from, "history": history}
