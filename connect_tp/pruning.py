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
stop at, so one trajectory replaces three runs.

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
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_pruning as tp
from tqdm.auto import tqdm

__all__ = [
    "PRUNING_METHODS", "GRADIENT_METHODS", "UniformRandomImportance", "parse_method", "needs_gradients",
    "build_importance", "count_macs_and_params",
    "classifier_layers", "calibration_gradients", "PruneSnapshot", "progressive_prune",
    "layer_channels", "signal_flow", "layer_report", "calibration_batches", "recalibrate_batchnorm",
]

PRUNING_METHODS = ("connect", "taylor", "l1", "l2", "lamp", "random", "uniform")
"""Importance criteria known to :func:`build_importance` (``connect`` also takes options, see there)."""

GRADIENT_METHODS = frozenset({"connect", "taylor"})
"""Methods whose importance needs ``loss.backward()`` on calibration data before each step."""

_CONNECT_SPEC = re.compile(r"^connect(?:-k(?P<balance>inf|[0-9.e+-]+))?(?:-lam(?P<lam>[0-9.e+-]+))?"
                           r"(?:-bn(?P<bn_flow>[a-z]+))?$")


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


def parse_method(method: str) -> Tuple[str, Dict[str, Any]]:
    """Split a method name into the criterion and its options.

    ``connect`` takes options in its name: ``connect-k<kappa>`` (balance, ``inf`` allowed),
    ``connect-lam<lambda>`` (the absolute form) and ``-bn<stats|gamma|identity>``, e.g.
    ``connect-k3-bngamma``. Other methods take none.

    Raises:
        ValueError: an unknown method or malformed options, naming the accepted forms.
    """
    if method in PRUNING_METHODS:
        return method, {}
    match = _CONNECT_SPEC.match(method)
    if match is None:
        raise ValueError(f"unknown pruning method {method!r}; choose one of {list(PRUNING_METHODS)}, or "
                         "connect-k<kappa>[-bn<stats|gamma|identity>] / connect-lam<lambda>[-bn...]")
    options: Dict[str, Any] = {}
    try:
        if match["balance"] is not None:
            options["balance"] = math.inf if match["balance"] == "inf" else float(match["balance"])
        if match["lam"] is not None:
            options["lam"] = float(match["lam"])
    except ValueError:
        raise ValueError(f"malformed number in pruning method {method!r}") from None
    if match["bn_flow"] is not None:
        options["bn_flow"] = match["bn_flow"]
    return "connect", options


def build_importance(method: str, example_inputs: Optional[torch.Tensor] = None,
                     connect_lam: Optional[float] = None, seed: int = 0) -> tp.importance.Importance:
    """The Torch-Pruning importance object for a method name.

    Args:
        method: one of :data:`PRUNING_METHODS`, or ``connect`` with options (:func:`parse_method`).
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
    name, options = parse_method(method)
    if name == "connect":
        from .importance import ConnectImportance  # imported here: the module is optional for other methods

        if connect_lam is not None and not options:
            options["lam"] = connect_lam
        return ConnectImportance(example_inputs=example_inputs, **options)
    if name == "taylor":
        return tp.importance.GroupTaylorImportance()
    if name == "l1":
        return tp.importance.GroupMagnitudeImportance(p=1)
    if name == "l2":
        return tp.importance.GroupMagnitudeImportance(p=2)
    if name == "lamp":
        return tp.importance.LAMPImportance(p=2)
    if name == "random":
        return tp.importance.RandomImportance()
    return UniformRandomImportance(torch.Generator().manual_seed(seed))


def needs_gradients(method: str) -> bool:
    """Whether the method's importance reads ``.grad`` (data-free CoNNect, ``connect-kinf``, does not)."""
    name, options = parse_method(method)
    return name in GRADIENT_METHODS and options.get("balance") != math.inf


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
                          device: Any = "cpu") -> nn.Module:
    """A copy of ``model`` whose BatchNorm running statistics are re-estimated on ``batches``.

    Pruning removes inputs of the convolutions before each BatchNorm, whose running mean and
    variance still describe the unpruned activations. Re-estimating them (no weight changes) shows
    how much of the accuracy lost at pruning time is this stale normalization.
    """
    model = copy.deepcopy(model).to(device)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over all calibration batches
    model.train()
    for images, _ in batches:
        model(images.to(device))
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


def progressive_prune(model: nn.Module, example_inputs: torch.Tensor, importance: tp.importance.Importance,
                      targets: Sequence[float], *, calibration: Optional[Sequence[Tuple[torch.Tensor, torch.Tensor]]] = None,
                      iterative_steps: int = 400, max_pruning_ratio: float = 1.0, global_pruning: bool = True,
                      ignored_layers: Optional[List[nn.Module]] = None, device: Any = "cpu",
                      on_target: Optional[Callable[[PruneSnapshot], None]] = None,
                      progress: bool = True, desc: str = "prune") -> List[PruneSnapshot]:
    """Prune ``model`` in place, step by step, until every speed-up in ``targets`` is reached.

    Args:
        model: the model to prune (modified in place).
        example_inputs: a batch used to trace the dependency graph and count MACs.
        importance: a Torch-Pruning importance (see :func:`build_importance`).
        targets: MAC speed-ups ``base MACs / pruned MACs``, e.g. ``[2.5, 8, 16]``.
        calibration: ``(images, labels)`` batches; required when ``importance`` is a Taylor
            importance (Taylor and CoNNect), whose gradients are recomputed before every step.
        iterative_steps: steps of the linear schedule from 0 to a pruning ratio of 1.0.
        max_pruning_ratio: the most a layer may lose (1.0: down to a single channel).
        global_pruning: rank channels of all groups together (Torch-Pruning's ``--global-pruning``).
        ignored_layers: layers never pruned (default: the final classifier).
        on_target: called with each snapshot as soon as it is taken (to evaluate or save it).
        progress: show a progress bar with the current speed-up.

    Returns:
        One :class:`PruneSnapshot` per target (a deep copy of the model at that point), in
        ascending target order.

    Raises:
        ValueError: a gradient method without calibration data, or a target that the schedule
            cannot reach within ``iterative_steps``.
    """
    targets = sorted(float(t) for t in targets)
    if not targets or targets[0] <= 1.0:
        raise ValueError(f"speed-up targets must be > 1, got {targets}")
    needs_grad = isinstance(importance, tp.importance.GroupTaylorImportance) and \
        getattr(importance, "balance", None) != math.inf
    if needs_grad and not calibration:
        raise ValueError("Taylor/CoNNect importance needs calibration batches to compute gradients")
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
    speed_up = 1.0
    bar = tqdm(total=iterative_steps, desc=desc, disable=not progress, dynamic_ncols=True)
    while pending:
        if pruner.current_step >= iterative_steps:
            raise ValueError(f"{desc}: reached only {speed_up:.2f}x after {iterative_steps} steps, "
                             f"target {pending[0]}x is out of reach; lower the target or raise max_pruning_ratio")
        if needs_grad:
            calibration_gradients(model, calibration, device)
        pruner.step()
        if needs_grad:
            model.zero_grad(set_to_none=True)  # stale gradients would have the old shapes
        macs, params = count_macs_and_params(model, example_inputs)
        speed_up = base_macs / max(macs, 1)
        bar.update(1)
        bar.set_postfix(speed_up=f"{speed_up:.2f}x", macs=f"{macs / 1e6:.2f}M")
        while pending and speed_up >= pending[0]:
            snap = PruneSnapshot(pending.pop(0), pruner.current_step, macs, params, speed_up, copy.deepcopy(model))
            snapshots.append(snap)
            if on_target is not None:
                on_target(snap)
    bar.close()
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

    The network is evaluated on an all-ones input in float64 with ``|W|`` for every weight, no
    biases and BatchNorm reduced to ``|gamma| / sqrt(running_var + eps)``; ReLU and max-pooling
    then pass all values unchanged. ``phi`` is the sum of the outputs (the number of weighted
    input-output paths), and the flow through output channel ``c`` of a layer is
    ``sum(|W[c]| * dphi/d|W[c]|)``.

    Returns:
        ``(phi, {layer name: flow per output channel})`` for convolutions and linear layers.
    """
    net = copy.deepcopy(model).double().eval()
    weights = {}
    with torch.no_grad():
        for name, m in net.named_modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.abs_()
                if m.bias is not None:
                    m.bias.zero_()
                weights[name] = m.weight
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                if m.affine:
                    m.weight.abs_()
                    m.bias.zero_()
                m.running_mean.zero_()
    for p in net.parameters():
        p.requires_grad_(p.dim() > 1)
    ones = torch.ones_like(example_inputs[:1], dtype=torch.float64)
    phi = net(ones).sum()
    phi.backward()
    flows = {name: (w * w.grad).flatten(1).sum(1).detach() if w.grad is not None else torch.zeros(w.shape[0], dtype=torch.float64)
             for name, w in weights.items()}
    return float(phi.detach()), flows


def layer_report(model: nn.Module, example_inputs: torch.Tensor) -> Dict[str, Any]:
    """Channels left per layer and layer-collapse flags.

    Returns:
        ``{"channels": {layer: [in, out]}, "signal_flow": phi, "collapsed_layers": [...],
        "dead_channels": {layer: n}, "network_disconnected": bool}``. A layer is *collapsed* when
        no signal flows through any of its channels; ``network_disconnected`` when ``phi == 0``.
    """
    phi, flows = signal_flow(model, example_inputs)
    collapsed = [name for name, f in flows.items() if float(f.sum()) == 0.0]
    dead = {name: int((f == 0).sum()) for name, f in flows.items() if int((f == 0).sum()) > 0}
    return {"channels": layer_channels(model), "signal_flow": phi, "collapsed_layers": collapsed,
            "dead_channels": dead, "network_disconnected": phi == 0.0}
