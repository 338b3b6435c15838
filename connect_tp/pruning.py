"""Progressive structural pruning to MAC speed-up targets, as in Torch-Pruning's CIFAR benchmark.

The loop follows Torch-Pruning's ``benchmarks/main.py``: a :class:`torch_pruning.pruner.MetaPruner`
with global ranking, ``pruning_ratio=1.0`` reached linearly over ``iterative_steps`` steps and the
final classifier left alone; after every step the MACs are recounted and pruning stops as soon as
``base MACs / MACs`` reaches the target. For gradient-based importances (Taylor and CoNNect) the
gradients of the mean cross-entropy on a fixed calibration set are computed before every step,
with the model in eval mode (BatchNorm uses its running statistics and is not updated).

:func:`progressive_prune` accepts several targets and reports the model each time it first passes
one (2.5x, then 8x, then 16x). Because the per-step ratio schedule does not depend on the target,
the trajectory to 16x passes through exactly the models that separate runs to 2.5x and 8x would
stop at, so one trajectory replaces three runs. A target the schedule cannot reach raises
:class:`UnreachableSpeedUp` as soon as the schedule tops out (its last step, or no layer can lose
another channel), with the highest speed-up reached; the targets reached before are already saved.

:func:`layer_report` lists the channels left in every layer and flags *layer collapse*: a layer
through which no path of non-zero weights leads from the input to the output. It is measured like
CoNNect's connectivity (and SynFlow): a forward pass of an all-ones input through the network with
every weight replaced by its magnitude, no biases, and BatchNorm reduced to its scale
``|gamma| / sqrt(var + eps)``; the flow through a channel is ``sum |W| * dphi/d|W|`` of its weights.
It is zero exactly when every path through the channel crosses a zero weight or a zero BN scale.

Example:
    >>> import torch
    >>> from connect_tp.models import resnet20
    >>> from connect_tp.pruning import build_importance, progressive_prune
    >>> model = resnet20(num_classes=10).eval()
    >>> example = torch.rand(1, 3, 32, 32)
    >>> snaps = progressive_prune(model, example, build_importance("l2"), targets=[2.0],
    ...                           iterative_steps=50, progress=False)
    >>> round(snaps[0].speed_up, 1) >= 2.0
    True
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_pruning as tp
from tqdm.auto import tqdm

# Method names are parsed without torch (the command line checks them before importing it).
from .methods import GRADIENT_METHODS, PRUNING_METHODS, connect_options, normalizer_of, parse_method

__all__ = [
    "PRUNING_METHODS", "GRADIENT_METHODS", "UniformRandomImportance", "parse_method", "connect_options",
    "build_importance", "count_macs_and_params",
    "classifier_layers", "calibration_gradients", "PruneSnapshot", "UnreachableSpeedUp", "progressive_prune",
    "layer_channels", "signal_flow", "layer_report", "calibration_batches", "recalibrate_batchnorm",
]

class UniformRandomImportance(tp.importance.Importance):
    """Every channel of every group gets an independent uniform score: a uniform random baseline.

    With global pruning each channel is then equally likely to go, whatever the size of its group.
    """

    def __init__(self, generator: Optional[torch.Generator] = None):
        self.generator = generator

    @torch.no_grad()
    def __call__(self, group, **kwargs) -> torch.Tensor:
        _, idxs = group[0]
        return torch.rand(len(idxs), generator=self.generator)


def build_importance(method: str, example_inputs: Optional[torch.Tensor] = None,
                     connect_lam: Optional[float] = None, seed: int = 0) -> tp.importance.Importance:
    """The Torch-Pruning importance object for a method name.

    Args:
        method: one of :data:`PRUNING_METHODS`, or ``connect`` with options (:func:`parse_method`);
            ``connect``, ``taylor``, ``l1`` and ``l2`` may end in ``-norm<normalizer>``.
            ``taylor`` is DepGraph's group Taylor importance (the paper's "DepGraph" baseline);
            ``l1``/``l2`` group magnitude; ``lamp`` LAMP; ``random`` Torch-Pruning's random
            importance; ``uniform`` :class:`UniformRandomImportance`; ``connect``
            :class:`connect_tp.importance.ConnectImportance` (library defaults unless options say).
        example_inputs: input shape for CoNNect's uniform connectivity inputs.
        connect_lam: CoNNect's absolute lambda for a plain ``connect`` (None: the library default).
        seed: seed of the uniform baseline's generator.

    Example:
        >>> imp = build_importance("connect-k3-bngamma")
    """
    name, _ = parse_method(method)
    normalizer = normalizer_of(method)  # "mean", Torch-Pruning's default, unless the name ends in -norm<...>
    if name == "connect":
        from .importance import ConnectImportance  # imported here: the module is optional for other methods

        options = connect_options(method)  # a name with options fixes them all (bn_flow included)
        if connect_lam is not None and not options:
            options["lam"] = connect_lam
        return ConnectImportance(example_inputs=example_inputs, **options)
    if name == "taylor":
        return tp.importance.GroupTaylorImportance(normalizer=normalizer)
    if name == "l1":
        return tp.importance.GroupMagnitudeImportance(p=1, normalizer=normalizer)
    if name == "l2":
        return tp.importance.GroupMagnitudeImportance(p=2, normalizer=normalizer)
    if name == "lamp":
        return tp.importance.LAMPImportance(p=2)
    if name == "random":
        return tp.importance.RandomImportance()
    return UniformRandomImportance(torch.Generator().manual_seed(seed))


def count_macs_and_params(model: nn.Module, example_inputs: torch.Tensor) -> Tuple[int, int]:
    """MACs of one forward pass on ``example_inputs`` and the number of parameters."""
    macs, params = tp.utils.count_ops_and_params(model, example_inputs=example_inputs)
    return int(macs), int(params)


def classifier_layers(model: nn.Module) -> List[nn.Module]:
    """The final classifier (the last ``nn.Linear``), which pruning must keep at full width."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1:]


def calibration_gradients(model: nn.Module, batches: Sequence[Tuple[torch.Tensor, torch.Tensor]],
                          device: Any = "cpu") -> float:
    """Set ``.grad`` of every parameter to the gradient of the mean cross-entropy over ``batches``.

    The model is put in eval mode so that BatchNorm neither changes its statistics nor makes the
    importance depend on the batch composition. Returns the mean loss.
    """
    model.eval()
    model.zero_grad(set_to_none=True)
    total = sum(len(y) for _, y in batches)
    loss_sum = 0.0
    for images, labels in batches:
        images, labels = images.to(device), labels.to(device)
        # Each batch is weighted by its share of the set: the accumulated gradient is that of the set mean.
        loss = F.cross_entropy(model(images), labels, reduction="sum") / total
        loss.backward()
        loss_sum += loss.item()
    return loss_sum


def calibration_batches(dataset, num_samples: int, batch_size: int = 128,
                        seed: int = 0) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """A fixed random set of ``num_samples`` ``(image, label)`` pairs from ``dataset``, in batches.

    Pass a dataset without augmentation: the same images must give the same gradients at every step.
    """
    index = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:num_samples].tolist()
    batches = []
    for start in range(0, len(index), batch_size):
        items = [dataset[i] for i in index[start:start + batch_size]]
        batches.append((torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])))
    return batches


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Sequence[Tuple[torch.Tensor, torch.Tensor]],
                          device: Any = "cpu", in_place: bool = False) -> nn.Module:
    """``model`` (a copy unless ``in_place``) with BatchNorm running statistics re-estimated on ``batches``.

    Pruning removes inputs of the convolutions before each BatchNorm, whose running mean and
    variance still describe the unpruned activations. Re-estimating them (no weight changes) shows
    how much of the accuracy lost at pruning time is this stale normalization. Returned in eval
    mode; each BatchNorm's ``momentum`` is kept.
    """
    if not in_place:
        model = copy.deepcopy(model)
    model.to(device)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over all calibration batches
    model.train()
    for images, _ in batches:
        model(images.to(device))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    return model.eval()


@dataclass
class PruneSnapshot:
    """The pruned model at the first step that reached ``target`` speed-up."""

    target: float
    step: int
    macs: int
    params: int
    speed_up: float
    model: nn.Module = field(repr=False)


class UnreachableSpeedUp(ValueError):
    """The pruning schedule topped out below a speed-up target.

    Attributes:
        target: the first target not reached.
        reached: the highest speed-up the trajectory reached.
        step, iterative_steps: where it stopped, of how many steps.
        snapshots: the targets reached before (already passed to ``on_target``).
    """

    def __init__(self, message: str, *, target: float, reached: float, step: int, iterative_steps: int,
                 snapshots: List["PruneSnapshot"]):
        super().__init__(message)
        self.target, self.reached, self.step, self.iterative_steps = target, reached, step, iterative_steps
        self.snapshots = snapshots


def _nothing_left_to_prune(pruner: tp.pruner.MetaPruner) -> bool:
    """Whether every prunable group is at its limit, so that no later step can prune anything.

    Uses the pruner's own eligibility test; if Torch-Pruning's internals differ, answers False and
    the loop simply runs to the end of the schedule.
    """
    try:
        groups = pruner.DG.get_all_groups(ignored_layers=pruner.ignored_layers,
                                          root_module_types=pruner.root_module_types)
        return not any(pruner._check_pruning_ratio(g) for g in groups)
    except (AttributeError, TypeError):
        return False


def progressive_prune(model: nn.Module, example_inputs: torch.Tensor, importance: tp.importance.Importance,
                      targets: Sequence[float], *, calibration: Optional[Sequence[Tuple[torch.Tensor, torch.Tensor]]] = None,
                      iterative_steps: int = 400, max_pruning_ratio: float = 1.0, global_pruning: bool = True,
                      ignored_layers: Optional[List[nn.Module]] = None, device: Any = "cpu",
                      on_target: Optional[Callable[[PruneSnapshot], None]] = None,
                      progress: bool = True, desc: str = "prune", bn_refresh_every: int = 0) -> List[PruneSnapshot]:
    """Prune ``model`` in place, step by step, until every speed-up in ``targets`` is reached.

    Args:
        model: the model to prune (modified in place).
        example_inputs: a batch used to trace the dependency graph and count MACs.
        importance: a Torch-Pruning importance (see :func:`build_importance`).
        targets: MAC speed-ups ``base MACs / pruned MACs``, e.g. ``[2.5, 8, 16]``; finite and > 1.
        calibration: ``(images, labels)`` batches; required when ``importance`` is a Taylor
            importance (Taylor and CoNNect), whose gradients are recomputed before every step.
        iterative_steps: steps of the linear schedule from 0 to a pruning ratio of 1.0 (>= 1).
        max_pruning_ratio: the most a layer may lose (1.0: down to a single channel).
        global_pruning: rank channels of all groups together (Torch-Pruning's ``--global-pruning``).
        ignored_layers: layers never pruned (default: the final classifier).
        on_target: called with each snapshot as soon as it is taken (to evaluate or save it).
        progress: show a progress bar with the current speed-up.
        bn_refresh_every: re-estimate the BatchNorm statistics on the calibration images, in place,
            before every ``bn_refresh_every``-th step (0: never, Torch-Pruning's loop). Pruning
            leaves the statistics of the unpruned network, so the loss gradients of later steps
            come from a model whose normalization no longer fits it; a refresh gives every
            criterion the model it is really pruning (data-free ones get the same snapshots'
            statistics). Needs ``calibration``.

    Returns:
        One :class:`PruneSnapshot` per target (a deep copy of the model at that point), in
        ascending target order.

    Raises:
        ValueError: a gradient method (or ``bn_refresh_every``) without calibration data, a target
            that is not a finite number > 1, ``iterative_steps < 1`` or ``bn_refresh_every < 0``.
        UnreachableSpeedUp: the schedule topped out below a target (its last step was taken, or no
            layer can lose another channel); raised at that step, with the highest speed-up reached.
    """
    targets = sorted(float(t) for t in targets)
    if not targets or not all(math.isfinite(t) and t > 1.0 for t in targets):
        raise ValueError(f"speed-up targets must be finite numbers > 1, got {targets}")
    if iterative_steps < 1:
        raise ValueError(f"iterative_steps must be >= 1, got {iterative_steps}")
    needs_grad = isinstance(importance, tp.importance.GroupTaylorImportance) and \
        getattr(importance, "balance", None) != math.inf
    if needs_grad and not calibration:
        raise ValueError("Taylor/CoNNect importance needs calibration batches to compute gradients")
    if isinstance(bn_refresh_every, bool) or not isinstance(bn_refresh_every, int) or bn_refresh_every < 0:
        raise ValueError(f"bn_refresh_every must be an integer >= 0 (0: never), got {bn_refresh_every!r}")
    if bn_refresh_every and not calibration:
        raise ValueError("bn_refresh_every re-estimates BatchNorm statistics on the calibration images: pass calibration=")
    model.to(device).eval()
    example_inputs = example_inputs.to(device)
    pruner = tp.pruner.MetaPruner(
        model, example_inputs, importance=importance, global_pruning=global_pruning, pruning_ratio=1.0,
        max_pruning_ratio=max_pruning_ratio, iterative_steps=iterative_steps,
        ignored_layers=classifier_layers(model) if ignored_layers is None else ignored_layers,
    )
    base_macs, _ = count_macs_and_params(model, example_inputs)
    snapshots: List[PruneSnapshot] = []
    pending = list(targets)
    best, prev_macs = 1.0, base_macs
    with tqdm(total=iterative_steps, desc=desc, disable=not progress, dynamic_ncols=True, unit="step") as bar:
        while pending:
            if bn_refresh_every and pruner.current_step % bn_refresh_every == 0:
                recalibrate_batchnorm(model, calibration, device, in_place=True)
            if needs_grad:
                calibration_gradients(model, calibration, device)
            pruner.step()
            if needs_grad:
                model.zero_grad(set_to_none=True)  # stale gradients would have the old shapes
            macs, params = count_macs_and_params(model, example_inputs)
            speed_up = base_macs / max(macs, 1)
            best = max(best, speed_up)
            bar.update(1)
            bar.set_postfix(speed_up=f"{speed_up:.2f}x", macs=f"{macs / 1e6:.2f}M")
            while pending and speed_up >= pending[0]:
                snap = PruneSnapshot(pending.pop(0), pruner.current_step, macs, params, speed_up,
                                     copy.deepcopy(model))
                snapshots.append(snap)
                if on_target is not None:
                    on_target(snap)
            if not pending:
                break
            end_of_schedule = pruner.current_step >= iterative_steps
            if end_of_schedule or (macs == prev_macs and _nothing_left_to_prune(pruner)):
                why = (f"the ratio schedule ended (step {pruner.current_step} of {iterative_steps})"
                       if end_of_schedule else f"no layer can lose another channel at max_pruning_ratio="
                                               f"{max_pruning_ratio:g} (step {pruner.current_step} of {iterative_steps})")
                raise UnreachableSpeedUp(
                    f"{desc}: target {pending[0]:g}x is out of reach: {why}; the highest speed-up reached is "
                    f"{best:.2f}x. Lower the target to at most {math.floor(best * 100) / 100:g}"
                    + ("" if max_pruning_ratio >= 1.0 else " or raise max_pruning_ratio"),
                    target=pending[0], reached=best, step=pruner.current_step, iterative_steps=iterative_steps,
                    snapshots=snapshots)
            prev_macs = macs
    return snapshots


def layer_channels(model: nn.Module) -> Dict[str, List[int]]:
    """``{layer name: [in channels, out channels]}`` for every convolution and linear layer."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            out[name] = [m.in_channels, m.out_channels]
        elif isinstance(m, nn.Linear):
            out[name] = [m.in_features, m.out_features]
    return out


def signal_flow(model: nn.Module, example_inputs: torch.Tensor) -> Tuple[float, Dict[str, torch.Tensor]]:
    """Total signal flow ``phi`` of the network and the flow through each output channel of each layer.

    The network is evaluated on an all-ones input with ``|W|`` for every weight, no biases and
    BatchNorm reduced to ``|gamma| / sqrt(running_var + eps)``; ReLU and max-pooling then pass all
    values unchanged. ``phi`` is the sum of the outputs (the number of weighted input-output
    paths), and the flow through output channel ``c`` of a layer is ``sum(|W[c]| * dphi/d|W[c]|)``.
    The pass is :func:`connect_tp.engine.layer_flows` (per-layer log scale, exact at any depth in
    the model's own precision); ``phi`` and the flows are returned in float64, so they underflow
    to 0 only below ~1e-308 (:func:`layer_report` judges connectivity by reachability, not by them).

    Returns:
        ``(phi, {layer name: flow per output channel})`` for convolutions and linear layers.
    """
    from .engine import layer_flows

    flows = layer_flows(model, example_inputs)
    phi = math.exp(flows["log_phi"]) if flows["log_phi"] < 709 else math.inf
    return phi, {name: share * phi for name, share in flows["shares"].items()}


def layer_report(model: nn.Module, example_inputs: torch.Tensor) -> Dict[str, Any]:
    """Channels left per layer and layer-collapse flags.

    Returns:
        ``{"channels": {layer: [in, out]}, "signal_flow": phi, "log_signal_flow": log phi,
        "collapsed_layers": [...], "dead_channels": {layer: n}, "network_disconnected": bool}``.
        A channel is *dead* when no path of non-zero weights and BatchNorm scales leads from the
        input through it to the output, a layer is *collapsed* when all its channels are dead, and
        the network is disconnected when no path is left at all. These flags come from an exact
        0/1 reachability pass (:func:`connect_tp.engine.layer_flows`), so a connected network whose
        flow is tiny (a deep network with small weights) is never reported as disconnected.
    """
    from .engine import layer_flows

    flows = layer_flows(model, example_inputs)
    log_phi = flows["log_phi"]
    alive = flows["alive"]
    collapsed = [name for name, a in alive.items() if not bool(a.any())]
    dead = {name: int((~a).sum()) for name, a in alive.items() if int((~a).sum()) > 0}
    phi = math.exp(log_phi) if log_phi < 709 else math.inf
    return {"channels": layer_channels(model), "signal_flow": phi, "log_signal_flow": log_phi,
            "collapsed_layers": collapsed, "dead_channels": dead, "network_disconnected": not flows["connected"]}
