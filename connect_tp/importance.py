"""``ConnectImportance``: the CoNNect group importance for Torch-Pruning.

CoNNect scores each weight with the first-order Taylor importance of the objective

    J(W) = L(data) - lam * log phi_tot(W),

i.e. ``|W * (dL/dW - lam * d log phi_tot / dW)|``, where ``phi_tot`` is the signal-flow connectivity
of :mod:`connect_tp.connectivity`. ``lam`` is one constant for the whole run. By default it is set
from a scale-free *balance* ``kappa``: at the first pruning step,

    lam = kappa * sum|W * dL/dW| / sum|W * d log phi_tot / dW|

(both sums over the weights of every convolution and linear layer), so ``kappa = 1`` gives the two
terms the same Taylor mass whatever the loss reduction, the number of accumulated ``backward()``
calls or the training state; ``kappa = 0`` is Taylor and ``kappa = inf`` connectivity alone. The loss gradient is whatever the user's ``loss.backward()`` left
in ``.grad``; the connectivity gradient is computed by the importance itself, once per pruning step,
and never written into ``.grad``. Scores are reduced to one value per channel of a Torch-Pruning
group exactly as ``tp.importance.GroupTaylorImportance`` does it.

Example:
    >>> import torch, torch_pruning as tp
    >>> from connect_tp import ConnectImportance
    >>> from connect_tp.models import resnet20
    >>> model = resnet20(num_classes=10)
    >>> example_inputs = torch.rand(1, 3, 32, 32)
    >>> imp = ConnectImportance()
    >>> pruner = tp.pruner.MetaPruner(model, example_inputs, importance=imp,
    ...                               pruning_ratio=0.5, ignored_layers=[model.fc])
    >>> model(torch.rand(8, 3, 32, 32)).sum().backward()
    >>> pruner.step()
"""
from __future__ import annotations

import math
import numbers
import sys
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch_pruning as tp
from torch_pruning.pruner import function

from . import engine
from .connectivity import (BN_FLOWS, CENTRED_TOLERANCE, _EvalMode, _explained_input_errors, connectivity_inputs,
                           describe_output_layer, log_connectivity_and_dtype, traced_output)

__all__ = ["BALANCE_SCHEDULES", "ConnectImportance", "DEFAULT_BALANCE", "DEFAULT_BN_FLOW", "MAX_LAMBDA"]

#: Default balance kappa of the connectivity term against the loss term (see the module docstring),
#: picked by the ranking benchmark's rule, fixed before the runs (best mean accuracy after one fine-tuning
#: epoch at 8x and 16x, over seeds 0-2; docs/benchmarks.md, "Choosing kappa"): kappa = 100 scores
#: 81.8 against 300 80.2, inf 78.7, 1000 78.6, 10 77.1 and Taylor 59.3, strictly inside the grid
#: 0.3 ... 1000, inf. Its neighbours and connectivity alone are within the spread over seeds of it,
#: and L2 (82.4) is tied with it. A finite kappa needs loss gradients (``loss.backward()``) before
#: every step. For language models the tiny-LLaMA grid prefers kappa <= 10 (docs/llm.md).
DEFAULT_BALANCE = 100.0

#: Default treatment of BatchNorm in phi_tot (:data:`connect_tp.connectivity.BN_FLOWS`), chosen by
#: the same benchmark's rule among the three treatments at kappa = 100 over seeds 0-2
#: (docs/benchmarks.md, "BatchNorm in phi_tot"): ``"gamma"`` (BatchNorm as ``|gamma| x``, a pure path
#: sum) scores 82.5 against ``"stats"`` 81.8 and ``"identity"`` 78.5; gamma and stats are tied within
#: the spread over seeds, gamma keeps more accuracy before fine-tuning (2x with BatchNorm
#: re-estimated: +6.6 ± 5.9) and does not inflate channels with a tiny running variance.
DEFAULT_BN_FLOW = "gamma"

#: When a finite balance sets lambda: once, at the first step (``"frozen"``, the default), or at
#: every pruning step from the model as it is then (``"every_step"``).
BALANCE_SCHEDULES = ("frozen", "every_step")

#: Largest absolute ``lam`` accepted. Far below float32's range for ``lam * d log phi / dW``, and far
#: above the point where the loss term no longer changes any decision (use ``balance=math.inf``).
MAX_LAMBDA = 1e12

#: Below this ``sum |W * d log phi / dW|`` the connectivity is taken as independent of the weights.
_FLAT_CONNECTIVITY = 1e-6
_SEGMENT_BATCH_ELEMENTS = 1 << 22  # the state fingerprint sums tensors in flat batches of at most this size

_REDUCTIONS = ("sum", "mean", "max", "prod", "first", "gate", None)
_NORMALIZERS = ("sum", "standarization", "mean", "max", "gaussian", "lamp", None)

_OUT_CHANNEL_FNS = (function.prune_conv_out_channels, function.prune_linear_out_channels)
_IN_CHANNEL_FNS = (function.prune_conv_in_channels, function.prune_linear_in_channels)
_NORM_FNS = (
    function.prune_batchnorm_out_channels,
    function.prune_groupnorm_out_channels,
    function.prune_layernorm_out_channels,
)


@dataclass(frozen=True, eq=False)
class _TensorSpec:
    """Shape (beyond the batch dimension), dtype and device of one recorded input tensor.

    Integer and bool tensors (token ids, masks, position ids) also keep their first sample, so
    side inputs are replayed with valid values; floating-point activations are never kept.
    """

    shape: Tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    first: Optional[torch.Tensor] = None

    @classmethod
    def of(cls, x: Any) -> Any:
        """Replace every tensor in a nested input by its spec, so no activation stays alive."""
        if isinstance(x, torch.Tensor):
            first = None
            if not x.is_floating_point() and not x.is_complex() and x.dim() > 0:
                first = x[:1].detach().clone()
            return cls(tuple(x.shape[1:]), x.dtype, x.device, first)
        if isinstance(x, dict):
            return {k: cls.of(v) for k, v in x.items()}
        if isinstance(x, (tuple, list)):
            return type(x)(cls.of(v) for v in x)
        return x

    @classmethod
    def of_batch(cls, x: Any) -> Any:
        """The first sample of every tensor in ``x`` (the structure the connectivity pass needs)."""
        if isinstance(x, torch.Tensor):
            return x[:1].detach() if x.dim() > 0 else x
        if isinstance(x, dict):
            return {k: cls.of_batch(v) for k, v in x.items()}
        if isinstance(x, (tuple, list)):
            return type(x)(cls.of_batch(v) for v in x)
        return x

    @classmethod
    def materialize(cls, x: Any) -> Any:
        """Inverse of :meth:`of`: one-sample tensors (zeros for floats, the kept sample otherwise)."""
        if isinstance(x, cls):
            if x.first is not None:
                return x.first.clone()
            return torch.zeros((1,) + x.shape, dtype=x.dtype, device=x.device)
        if isinstance(x, dict):
            return {k: cls.materialize(v) for k, v in x.items()}
        if isinstance(x, (tuple, list)):
            return type(x)(cls.materialize(v) for v in x)
        return x


_CALL_FAILED = object()


class _InputRecorder:
    """Remembers the structure of the input each top-level model was last called with.

    Torch-Pruning's pruner traces the model with its ``example_inputs`` but does not hand them to
    the importance. Global forward hooks installed when the importance is built see that trace
    (and the user's own forward passes) and keep the input structure of every successful top-level
    call, so ``ConnectImportance()`` works without arguments in Torch-Pruning's usual loop. The
    hooks are removed as soon as the importance has what it needs, so they cost nothing afterwards.
    """

    def __init__(self) -> None:
        self.inputs: "weakref.WeakKeyDictionary[nn.Module, Any]" = weakref.WeakKeyDictionary()
        self._depth = 0
        self._handles = [
            nn.modules.module.register_module_forward_pre_hook(self._enter),
            nn.modules.module.register_module_forward_hook(self._exit, with_kwargs=True, always_call=True),
        ]

    def _enter(self, module: nn.Module, args: Tuple[Any, ...]) -> None:
        self._depth += 1

    def _exit(self, module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any],
              output: Any = _CALL_FAILED) -> None:
        # A failed call (Torch-Pruning first tries model(*example_inputs)) has no output.
        self._depth = max(0, self._depth - 1)
        if self._depth > 0 or output is _CALL_FAILED:
            return
        traced = _pruner_trace_input()
        if isinstance(traced, torch.Tensor):
            # Torch-Pruning's first try, model(*example_inputs), unbinds a tensor along its batch
            # dimension and succeeds on models that accept one unbatched sample (an MLP, an
            # attention block): the input is the example tensor, not the sample the model saw.
            self.inputs[module] = _TensorSpec.of(traced)
        elif kwargs and not args:
            self.inputs[module] = _TensorSpec.of(dict(kwargs))
        elif len(args) == 1 and not kwargs:
            self.inputs[module] = _TensorSpec.of(args[0])
        elif args and not kwargs:
            self.inputs[module] = _TensorSpec.of(tuple(args))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


_NOT_TRACING = object()


def _pruner_trace_input() -> Any:
    """The tensor ``example_inputs`` of a Torch-Pruning dependency-graph trace running now, if any.

    Read from the calling frames: ``DependencyGraph._trace`` calls ``model(*example_inputs)`` before
    ``model(example_inputs)``. Returns ``_NOT_TRACING`` outside such a trace, and for a trace that
    runs the user's own ``forward_fn`` or a tuple or dict of inputs (those calls are what they say).
    """
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "_trace" and frame.f_globals.get("__name__", "").startswith("torch_pruning."):
            local = frame.f_locals
            inputs = local.get("example_inputs", _NOT_TRACING)
            return inputs if local.get("forward_fn") is None else _NOT_TRACING
        frame = frame.f_back
    return _NOT_TRACING


#: Modules whose loops score every group of a step before the model changes (and, for local
#: pruning, change only the group just scored): Torch-Pruning's pruners and the LLM block pruner.
_SWEEPING_CALLERS = ("torch_pruning.pruner.", "connect_tp.llm")


def _called_from_a_pruner(depth: int = 12) -> bool:
    """Whether one of the :data:`_SWEEPING_CALLERS` is among the ``depth`` innermost calling frames."""
    frame = sys._getframe(1)
    for _ in range(depth):
        if frame is None:
            return False
        if frame.f_globals.get("__name__", "").startswith(_SWEEPING_CALLERS):
            return True
        frame = frame.f_back
    return False


# Autograd nodes that save the tensor they were applied to, and where that tensor's edge sits in
# next_functions: when the edge is empty the tensor needed no gradient, i.e. it came from outside the
# model (its input, or a transformation of it that keeps its shape).
_SAVED_INPUTS = {
    "ConvolutionBackward0": ("_saved_input", 0),
    "AddmmBackward0": ("_saved_mat1", 1),
    "MmBackward0": ("_saved_self", 0),
    "EmbeddingBackward0": ("_saved_indices", None),
}


def _inputs_from_graph(graph: Any) -> Optional[Any]:
    """The model input a Torch-Pruning ``DependencyGraph`` was traced with, if it can be told for sure.

    The graph keeps the autograd nodes of its trace, and a convolution, linear layer or embedding
    applied directly to the input saves that input. The input is recovered only when the trace
    shows exactly one such tensor (by storage) that is not a parameter or buffer of the model;
    models with several inputs, or whose first layers see only tensors computed inside
    ``forward``, give ``None``.
    """
    model = getattr(graph, "model", None)
    nodes = getattr(graph, "module2node", None)
    if model is None or not nodes:
        return None
    owned = {t.data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    found: Dict[Tuple[int, Tuple[int, ...]], torch.Tensor] = {}
    for node in nodes.values():
        grad_fn = getattr(node, "grad_fn", None)
        rule = _SAVED_INPUTS.get(type(grad_fn).__name__)
        if rule is None:
            continue
        attr, edge = rule
        try:
            if edge is not None and grad_fn.next_functions[edge][0] is not None:
                continue  # the layer's input is an activation of the model, not its input
            saved = getattr(grad_fn, attr)
        except (RuntimeError, AttributeError, IndexError):  # freed by a backward through the trace
            continue
        if not isinstance(saved, torch.Tensor) or saved.dim() == 0 or saved.data_ptr() in owned:
            continue
        found[(saved.data_ptr(), tuple(saved.shape))] = saved
    if len(found) != 1:
        return None
    return _TensorSpec.of_batch(next(iter(found.values())))


class _NotBatched(Exception):
    """A connectivity input whose first dimension is not the batch of random samples."""


def _batch_slice(x: Any, n: int, start: int, stop: int) -> Any:
    """Samples ``start:stop`` of every batched tensor in a nested input of batch ``n``."""
    if start == 0 and stop == n:
        return x
    if isinstance(x, torch.Tensor):
        if x.dim() == 0:
            return x
        if x.shape[0] != n:
            raise _NotBatched
        return x[start:stop]
    if isinstance(x, dict):
        return {k: _batch_slice(v, n, start, stop) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_batch_slice(v, n, start, stop) for v in x)
    return x


def _is_number(x: Any) -> bool:
    """A real number that is not NaN and fits a float (``10**400`` does not; ``math.inf`` does)."""
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        return False
    try:
        return not math.isnan(float(x))
    except (OverflowError, TypeError, ValueError):
        return False


def _shown(x: Any) -> str:
    """``repr(x)``, shortened for numbers with hundreds of digits."""
    text = repr(x)
    return text if len(text) <= 40 else f"{text[:12]}...({len(text)} characters)"


def _lam_of_endpoint(balance: float) -> Optional[float]:
    """The lambda a balance fixes before any step: 0 for Taylor, inf for connectivity alone."""
    if balance == 0:
        return 0.0
    if balance == math.inf:
        return math.inf
    return None  # resolved at the first step


def _check_normalizer(normalizer: Any) -> None:
    if callable(normalizer) or normalizer in _NORMALIZERS:
        return
    if isinstance(normalizer, str) and normalizer.startswith("sentinel_"):
        try:
            q = float(normalizer[len("sentinel_"):])
        except ValueError:
            q = float("nan")
        if 0 <= q < 1:
            return
    raise ValueError(f"unknown normalizer {normalizer!r}; choose one of {_NORMALIZERS}, "
                     "'sentinel_<q>' with 0 <= q < 1 (e.g. 'sentinel_0.5'), or a callable")


def _model_dtype_device(model: nn.Module) -> Tuple[Optional[torch.dtype], Optional[torch.device]]:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype, p.device
    return None, None


def _follow_model(inputs: Any, model: nn.Module) -> Any:
    """Move every tensor of ``inputs`` to the model's device, floats also to its dtype."""
    dtype, device = _model_dtype_device(model)
    if device is None:
        return inputs
    if device.type == "meta":
        raise ValueError("ConnectImportance cannot measure connectivity of a model on the meta device: "
                         "materialize its weights first (e.g. model.to_empty(device=...) and load a state dict)")

    def move(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return x.to(device=device, dtype=dtype) if x.is_floating_point() else x.to(device)
        if isinstance(x, dict):
            return {k: move(v) for k, v in x.items()}
        if isinstance(x, (tuple, list)):
            return type(x)(move(v) for v in x)
        return x

    return move(inputs)


def _batches_of_elements(items: Sequence[Any], limit: int,
                         size: Callable[[Any], int] = lambda t: t.numel()) -> List[List[Any]]:
    """Consecutive runs of ``items`` holding at most ``limit`` elements each (a larger item alone)."""
    batches: List[List[Any]] = []
    filled = limit + 1
    for item in items:
        if filled + size(item) > limit:
            batches.append([])
            filled = 0
        batches[-1].append(item)
        filled += size(item)
    return batches


def _check_not_meta(model: nn.Module) -> None:
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.device.type == "meta":
            raise ValueError(
                f"ConnectImportance cannot score a model on the meta device ({name!r} has no data): materialize "
                "its weights first (e.g. model.to_empty(device=...) and load a state dict)")


def _check_finite(params: Dict[str, torch.Tensor]) -> None:
    for name, p in params.items():
        if p.is_floating_point() and not bool(torch.isfinite(p).all()):
            bad = "NaN" if bool(torch.isnan(p).any()) else "infinite"
            raise ValueError(f"parameter {name!r} holds {bad} values: CoNNect cannot score a model with "
                             "non-finite weights; check the training run that produced them")


class ConnectImportance(tp.importance.TaylorImportance):
    """CoNNect importance: Taylor importance of ``J = L - lam * log phi_tot``.

    A drop-in replacement for ``tp.importance.GroupTaylorImportance``: build the pruner with it, run
    ``loss.backward()`` on calibration data before each ``pruner.step()``, and nothing else changes.
    Per parameter the score is ``|W * (dL/dW - lam * d log phi_tot / dW)|``; per channel the scores
    are summed over the channel's weights and reduced over the group with ``group_reduction`` and
    ``normalizer``, the same way Torch-Pruning reduces Taylor scores (out-channels, in-channels,
    grouped convolutions, ``root_idxs``).

    The strength of the connectivity term is given either as ``balance`` (kappa, scale-free, the
    default) or as the paper's absolute ``lam``, never both. With ``balance``, ``lam`` is set at the
    first pruning step to ``kappa * (loss Taylor mass) / (connectivity Taylor mass)`` and kept for
    the rest of the run (:attr:`lam` shows it; :meth:`reset` forgets it). ``balance=0`` is exactly
    ``GroupTaylorImportance``; ``balance=math.inf`` scores with the connectivity term alone and
    needs no gradients (data-free pruning).

    ``log phi_tot`` is the signal-flow connectivity (:func:`connect_tp.connectivity.log_connectivity`):
    the model in eval mode with ``|W|``, ``|b|`` and absolute norm affine parameters, BatchNorm as
    ``bn_flow`` says, fed ``n_samples`` inputs uniform in [0, 1) (token ids uniform over the
    vocabulary; masks and other side inputs keep valid values), measured by
    :mod:`connect_tp.engine` in the model's own precision. Its gradient is computed once per
    pruning step (whenever the model's parameters or buffers changed; :meth:`_refresh` says when
    that is checked) and kept out of ``.grad``. An importance built after the pruner traced the
    model reads the input from the group's dependency graph when it shows a single model input.

    Example:
        >>> imp = ConnectImportance(balance=1.0)          # the blend: both terms weigh the same
        >>> pruner = tp.pruner.MetaPruner(model, example_inputs, importance=imp,
        ...                               global_pruning=True, pruning_ratio=1.0,
        ...                               iterative_steps=400, ignored_layers=[model.fc])
        >>> for _ in range(400):
        ...     model.zero_grad()
        ...     torch.nn.functional.cross_entropy(model(x), y).backward()
        ...     pruner.step()
        >>> imp.lam                                       # the lambda the balance resolved to

    Args:
        lam: absolute weight of the connectivity term (0 <= lam <= :data:`MAX_LAMBDA`), the paper's
            form. Without ``.grad`` on the model a step scores with the connectivity term alone
            (data-free) and warns once.
        balance: scale-free weight kappa >= 0 (``math.inf`` allowed); the default when ``lam`` is
            not given is :data:`DEFAULT_BALANCE`. A finite kappa needs loss gradients at every step.
        n_samples: number of random inputs phi_tot is averaged over (>= 1).
        example_inputs: an input of the model's shape. Optional: when omitted, the input the
            pruner traced the model with is used. Floating-point inputs follow the model's dtype
            and device at every step.
        group_reduction: how scores of the layers in one group are combined ("mean", "sum", "max",
            "prod", "first", "gate" or None), as in Torch-Pruning.
        normalizer: how a group's scores are normalized ("mean", "sum", "max", "standarization",
            "gaussian", "lamp", "sentinel_<q>" with 0 <= q < 1, a callable or None).
        bias: also score biases.
        batchnorm: also score the affine parameters of BatchNorm/GroupNorm layers. Off by default,
            which matches ``GroupTaylorImportance`` (its normalization branch never fires for
            BatchNorm); on, a channel whose BN scale carries its signal gets that credit too.
        bn_flow: how BatchNorm enters phi_tot: "stats", "gamma" or "identity"
            (:data:`connect_tp.connectivity.BN_FLOWS`).
        target_types: layer types that are scored.
        seed: seed of the random connectivity inputs (an int >= 0, or ``None``: torch's global
            generator).
        chunk_size: how many of the ``n_samples`` random inputs one connectivity pass runs (an
            int >= 1, or ``None``: all of them in one pass, the default). Smaller chunks keep fewer
            activations alive for the backward (about ``chunk_size / n_samples`` of them) and cost
            one pass per chunk; the per-chunk sums are combined with their log scales, so
            ``log phi_tot`` and its gradient, hence the scores, are the same up to float32 rounding.
            Only the fx engine path chunks: a model it cannot trace (Hugging Face language models)
            runs all samples at once and a ``RuntimeWarning`` says so.
        balance_schedule: when a finite ``balance`` sets lambda: ``"frozen"`` (the default) at the
            first step, kept for the run; ``"every_step"`` again at every pruning step, from the
            masses of the model as it is then (the two terms keep the ratio kappa as the model
            shrinks and its gradients change). Only a finite, positive balance has a lambda to
            re-derive; with ``lam=``, ``balance=0`` or ``balance=math.inf`` only ``"frozen"`` is valid.
    """

    def __init__(
        self,
        lam: Optional[float] = None,
        balance: Optional[float] = None,
        n_samples: int = 4,
        example_inputs: Any = None,
        group_reduction: Optional[str] = "mean",
        normalizer: Any = "mean",
        bias: bool = False,
        batchnorm: bool = False,
        bn_flow: str = DEFAULT_BN_FLOW,
        target_types: Sequence[type] = (nn.modules.conv._ConvNd, nn.Linear,
                                        nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm),
        seed: Optional[int] = 0,
        chunk_size: Optional[int] = None,
        balance_schedule: str = "frozen",
    ):
        if lam is not None and balance is not None:
            raise ValueError("give either lam (absolute) or balance (scale-free), not both")
        if lam is not None and not (_is_number(lam) and 0 <= lam <= MAX_LAMBDA):
            raise ValueError(f"lam must be a number in [0, {MAX_LAMBDA:g}], got {_shown(lam)}; for the "
                             "connectivity term alone use balance=math.inf")
        #: Whether the strength is the library default (neither ``lam`` nor ``balance`` given): a
        #: caller that knows the model family can say that the default was chosen on CNNs.
        self.default_strength = balance is None and lam is None
        if self.default_strength:
            balance = DEFAULT_BALANCE
        if balance is not None and not (_is_number(balance) and balance >= 0):
            raise ValueError(f"balance must be a number >= 0 that fits a float (math.inf allowed), "
                             f"got {_shown(balance)}")
        if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
            raise ValueError(f"n_samples must be an integer >= 1, got {n_samples!r}")
        if group_reduction not in _REDUCTIONS:
            raise ValueError(f"unknown group_reduction {group_reduction!r}; choose one of {_REDUCTIONS}")
        _check_normalizer(normalizer)
        if bn_flow not in BN_FLOWS:
            raise ValueError(f"unknown bn_flow {bn_flow!r}; choose one of {BN_FLOWS}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise ValueError(f"seed must be an integer >= 0 or None, got {seed!r}")
        if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                       or chunk_size < 1):
            raise ValueError(f"chunk_size must be an integer >= 1 or None, got {chunk_size!r}")
        if balance_schedule not in BALANCE_SCHEDULES:
            raise ValueError(f"unknown balance_schedule {balance_schedule!r}; choose one of {BALANCE_SCHEDULES}")
        if balance_schedule != "frozen" and (balance is None or balance in (0, math.inf)):
            given = f"lam={_shown(lam)}" if lam is not None else f"balance={balance!r}"
            raise ValueError(f"balance_schedule={balance_schedule!r} re-derives lambda from a finite, positive balance, "
                             f"but {given} fixes lambda for the whole run; use balance_schedule='frozen' or a "
                             "finite balance")
        super().__init__(group_reduction=group_reduction, normalizer=normalizer, bias=bias,
                         target_types=list(target_types))
        self.balance = None if balance is None else float(balance)
        self._fixed_lam = None if lam is None else float(lam)
        self.lam: Optional[float] = self._fixed_lam if self.balance is None else _lam_of_endpoint(self.balance)
        self.n_samples = n_samples
        self.example_inputs = example_inputs
        self._given_inputs = example_inputs  # what reset() goes back to (recorded inputs are forgotten)
        self.batchnorm = batchnorm
        self.bn_flow = bn_flow
        self.seed = seed
        self.chunk_size = chunk_size
        self.balance_schedule = balance_schedule
        # Only a connectivity term needs the input shape; pure Taylor never watches forwards.
        self._recorder = _InputRecorder() if example_inputs is None and self.lam != 0 else None
        self._recorded_inputs: Any = None  # the input the recorder or the graph gave (not the user's)
        self._input_model: Optional["weakref.ref[nn.Module]"] = None  # the model recorded inputs belong to
        self._lam_model: Optional["weakref.ref[nn.Module]"] = None  # the model a balance resolved lambda on
        self._cache_key: Optional[tuple] = None
        self._connectivity_grads: Dict[int, torch.Tensor] = {}
        self._cached_params: Dict[int, "weakref.ref[torch.Tensor]"] = {}
        self._sweep_model: Optional[nn.Module] = None
        self._sweep_roots: set = set()
        self._sweep_params: List[torch.Tensor] = []
        self._use_loss = True
        self._warned_data_free = False
        self._warned_flat = False
        self._warned_chunks = False
        self._fallback_reason: Optional[str] = None  # why the last engine pass handed over to the general one
        self._warned_fallback = False
        self._warned_clamp = False
        self._flat = False  # whether the last connectivity gradient was rounding noise (a normalized output)
        self._warned_groups: set = set()  # layer names of groups already warned about (all-zero scores)
        self.last_log_connectivity: Optional[float] = None
        #: Which pass computed the last connectivity gradient: ``"scaled-<dtype>"`` (the engine's
        #: log-scaled pass in the model's precision, e.g. ``"scaled-float32"``), ``"general-<dtype>"``
        #: (the traced-free ``functional_call`` pass, in the precision that measured phi finitely,
        #: e.g. ``"general-float64"``), or ``None`` before the first measurement.
        self.engine_path: Optional[str] = None
        #: Whether the last connectivity gradient came from the one mean input (the flow was affine
        #: on the random inputs, so the mean of their flows is the flow of their mean; docs/engine.md).
        self.used_mean_sample = False
        #: How many times the connectivity gradient was computed (once per pruning step).
        self.connectivity_evaluations = 0
        self._dtype: Optional[torch.dtype] = None  # precision that last measured phi_tot finitely

    def __del__(self) -> None:
        recorder = getattr(self, "_recorder", None)
        if recorder is not None:
            recorder.remove()

    def reset(self) -> None:
        """Forget everything learnt from the last model, for a new run.

        Forgets the lambda a balance resolved to, the cached gradients, the input recorded from
        the pruner's trace (inputs given as ``example_inputs=`` stay), the precision that last
        measured phi_tot, and which warnings were given. Call it before building the next pruner,
        so that its trace is recorded again.
        """
        if self.balance is not None:
            self.lam = _lam_of_endpoint(self.balance)
        self._lam_model = None
        self._cache_key = None
        self._connectivity_grads = {}
        self._cached_params = {}
        self._sweep_model, self._sweep_roots = None, set()
        self.example_inputs, self._recorded_inputs, self._input_model = self._given_inputs, None, None
        self._dtype = None
        if self.example_inputs is None and self.lam != 0 and self._recorder is None:
            self._recorder = _InputRecorder()
        self._flat = self._warned_flat = self._warned_fallback = self._warned_clamp = False
        self._warned_data_free, self._warned_groups = False, set()
        self.engine_path, self.last_log_connectivity = None, None

    @property
    def data_free(self) -> bool:
        """Whether the last step scored with the connectivity term alone."""
        return not self._use_loss

    # ------------------------------------------------------------------ connectivity gradients
    def _inputs_for(self, model: nn.Module, graph: Any = None) -> Any:
        """The model's input structure: given, recorded from the pruner's trace, or read from the graph.

        An input recorded for one model is never used for another: a second model's input is looked
        up again (the recorder, then its dependency graph).
        """
        inputs = self.example_inputs
        if inputs is not None and inputs is self._recorded_inputs:
            owner = self._input_model() if self._input_model is not None else None
            if owner is not model:
                inputs = None
        if inputs is None:
            recorded = self._recorder.inputs.get(model) if self._recorder is not None else None
            if recorded is not None:
                inputs = _TensorSpec.materialize(recorded)
            else:
                inputs = _inputs_from_graph(graph)
                if inputs is None:
                    raise ValueError(
                        "ConnectImportance cannot tell the model's input shape: it was not built (or reset()) "
                        "before the pruner traced the model, and the group's dependency graph does not show a "
                        "single model input. Pass it explicitly: ConnectImportance(example_inputs=...)."
                    )
            inputs = _follow_model(inputs, model)
            self.example_inputs = self._recorded_inputs = _TensorSpec.of_batch(inputs)  # kept for this model
            self._input_model = weakref.ref(model)
        if self._recorder is not None:  # the input is known (found, or given later as llm.LLMBlockPruner does):
            self._recorder.remove()    # stop watching every forward pass
            self._recorder = None
        return _follow_model(inputs, model)

    @staticmethod
    def _state_key(model: nn.Module) -> Tuple[tuple, bool]:
        """What the connectivity gradient depends on, and whether every value is finite.

        The key holds every parameter's and floating-point buffer's identity, version, shape,
        dtype, device and ``requires_grad``, and two value fingerprints per tensor (its sum and its L1 norm). Pruning
        replaces parameters and optimizer steps bump ``_version``, but edits through ``.data`` and
        BatchNorm re-estimation do neither, so the values enter the key too; the L1 norms are
        computed with one multi-tensor kernel per dtype and double as the finiteness check.
        """
        tensors = list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()]
        # requires_grad too: the gradient is computed for the parameters that require one (a streamed
        # LLM step scores one layer at a time by switching it), so a new set needs a new gradient
        ident = tuple((id(t), t._version, tuple(t.shape), t.dtype, str(t.device), t.requires_grad) for t in tensors)
        tensors = [t.detach() for t in tensors]
        if not tensors:
            return ident, True
        by_kind: Dict[Tuple[torch.dtype, torch.device], List[torch.Tensor]] = {}
        for t in tensors:
            by_kind.setdefault((t.dtype, t.device), []).append(t)
        parts = []
        with torch.no_grad():
            for group in by_kind.values():
                parts.append(torch.stack(torch._foreach_norm(group, 1)).to(torch.float64))
                # every tensor's sum from flat copies of a few MB (one segmented reduction per batch,
                # not one call per tensor); a tensor larger than a batch is summed by itself
                for batch in _batches_of_elements(group, _SEGMENT_BATCH_ELEMENTS):
                    if len(batch) == 1:
                        parts.append(batch[0].sum().reshape(1).to(torch.float64))
                        continue
                    try:
                        lengths = torch.tensor([t.numel() for t in batch], device=batch[0].device)
                        flat = torch.cat([t.reshape(-1) for t in batch])
                        parts.append(torch.segment_reduce(flat, "sum", lengths=lengths, unsafe=True).to(torch.float64))
                        del flat
                    except RuntimeError:  # a dtype or device without a segmented sum
                        parts += [t.sum().reshape(1).to(torch.float64) for t in batch]
        values = torch.cat([p.cpu() for p in parts]).tolist()
        return ident + tuple(values), all(math.isfinite(v) for v in values)

    @staticmethod
    def _sweep_root(group) -> Optional[tuple]:
        """The layer and pruning function a group is rooted at (Torch-Pruning asks for each once per step)."""
        try:
            dep, _ = next(iter(group))
        except (StopIteration, TypeError, ValueError):
            return None
        return (id(dep.target.module), dep.handler)

    def _is_cached(self, group) -> bool:
        """Whether the cached connectivity gradients still belong to the parameters this group scores."""
        if self.lam == 0:
            return True
        for dep, _ in group:
            layer = dep.target.module
            for p in (getattr(layer, "weight", None), getattr(layer, "bias", None)):
                if isinstance(p, nn.Parameter) and p.requires_grad:
                    ref = self._cached_params.get(id(p))
                    if ref is None or ref() is not p:
                        return False
        return True

    def _refresh(self, model: nn.Module, graph: Any = None, group: Any = None) -> None:
        """Decide whether this call uses the loss; make sure d log phi_tot / dW is that of the model now.

        Torch-Pruning scores every group once per pruning step (a *sweep*) and changes the model only
        between steps (global pruning) or right after scoring a group (local pruning, which replaces
        that group's parameters). The model's state is therefore fingerprinted (and the gradient
        recomputed if it changed) at the first call of each sweep, that is whenever a group's root is
        scored a second time or a group's parameters are not those the cache was computed for; the
        other calls of the sweep only decide, per call, whether loss gradients exist. A call from
        anywhere else (a user scoring groups by hand, who may edit weights in between) fingerprints
        the model every time, so it never reads a stale gradient.
        """
        root = self._sweep_root(group) if group is not None else None
        new_sweep = (model is not self._sweep_model or root is None or root in self._sweep_roots
                     or not self._is_cached(group) or not _called_from_a_pruner())
        if new_sweep:
            self._full_refresh(model, graph)
            self._sweep_model, self._sweep_roots = model, set()
        else:
            self._decide_loss(self._sweep_params)
        if root is not None:
            self._sweep_roots.add(root)

    def _decide_loss(self, params: Sequence[torch.Tensor]) -> None:
        has_grad = any(p.grad is not None for p in params)
        self._use_loss = self.balance != math.inf and has_grad
        if not has_grad and self.lam == 0:
            raise RuntimeError(
                "ConnectImportance with lam=0 / balance=0 is Taylor importance and needs loss gradients: "
                "run loss.backward() before pruner.step(), or use balance=math.inf for data-free pruning."
            )
        if not has_grad and self.balance is not None and self.balance != math.inf:
            raise RuntimeError(
                f"ConnectImportance(balance={self.balance:g}) weighs the connectivity term against the loss "
                "and found no .grad on the model: run loss.backward() on calibration data before each "
                "pruner.step(), or use balance=math.inf for data-free pruning."
            )
        if not has_grad and self.balance is None and not self._warned_data_free:
            warnings.warn(
                "ConnectImportance found no .grad on the model: scoring with the connectivity term "
                "alone (data-free CoNNect). Run loss.backward() before pruner.step() to include the loss.",
                stacklevel=5,
            )
            self._warned_data_free = True

    def _full_refresh(self, model: nn.Module, graph: Any = None, resolve: bool = True) -> None:
        params = dict(model.named_parameters())
        _check_not_meta(model)
        self._sweep_params = list(params.values())
        owner = self._lam_model() if self._lam_model is not None else None
        if self._lam_model is not None and owner is not model:
            # lambda and the measuring precision belong to the model they were found on; a balance is
            # scale-free, so a new model resolves its own lambda (kappa means the same on both)
            self.lam, self._lam_model, self._dtype, self._flat = None, None, None, False
        elif resolve and self.balance_schedule == "every_step" and self._lam_model is not None and not self._flat:
            self.lam = None  # re-derived below from the masses of the model as it is now
        self._decide_loss(self._sweep_params)
        key, finite = self._state_key(model)
        if not finite:
            _check_finite(params)
        if self.lam == 0:
            return
        if key != self._cache_key:
            self._connectivity_grads, self._cached_params = {}, {}  # free the stale ones first
            self._connectivity_grads = self._connectivity_gradients(model, params, graph)
            # the parameters the gradient was computed for (a streamed LLM step switches requires_grad)
            self._cached_params = {id(p): weakref.ref(p) for p in params.values() if p.requires_grad}
            self._cache_key = key
        if self._flat and not self._use_loss:
            raise RuntimeError(
                "ConnectImportance cannot score without loss gradients here: log phi_tot does not depend on the "
                "weights (see the warning above), so the connectivity term is zero for every layer. Prune a "
                "model that returns the values before its normalizing layer, or run loss.backward() and use a "
                "finite balance.")
        if self.lam is None and resolve:  # a finite balance resolves to lambda at the first step, then stays
            # a connectivity that does not depend on the weights has no lambda: the run is Taylor (warned)
            self.lam = 0.0 if self._flat else self.lambda_from_masses(*self._masses(model))
            self._lam_model = weakref.ref(model)

    def _connectivity_gradients(self, model: nn.Module, params: Dict[str, torch.Tensor],
                                graph: Any = None) -> Dict[int, torch.Tensor]:
        inputs = self._inputs_for(model, graph)
        names = [n for n, p in params.items() if p.requires_grad]
        leaves = {n: params[n].detach().requires_grad_(True) for n in names}
        frozen = {n: p.detach() for n, p in params.items() if n not in leaves}
        native = next((p.dtype for p in params.values() if p.is_floating_point()), torch.float32)
        self._fallback_reason = None
        with torch.enable_grad():
            traced = self._traced_gradients(model, inputs, leaves, frozen) if self._dtype is None else None
            if traced is not None:
                self.last_log_connectivity, grads = traced
                self.engine_path = f"scaled-{str(native).replace('torch.', '')}"
            else:  # untraceable, not exactly representable, or a result the general path must judge
                if self.chunk_size is not None and self.chunk_size < self.n_samples and not self._warned_chunks:
                    self._warned_chunks = True
                    warnings.warn(f"ConnectImportance(chunk_size={self.chunk_size}) has no effect on this model: "
                                  "it takes the general (traced-free) connectivity pass, which runs all "
                                  f"n_samples={self.n_samples} inputs at once; lower n_samples to save memory",
                                  RuntimeWarning, stacklevel=2)
                log_phi, self._dtype = log_connectivity_and_dtype(
                    model, inputs, self.n_samples, self.seed, {**leaves, **frozen}, self._dtype, self.bn_flow)
                grads = torch.autograd.grad(log_phi, list(leaves.values()), allow_unused=True)
                self.last_log_connectivity = log_phi.item()
                del log_phi
                self.engine_path = f"general-{str(self._dtype or native).replace('torch.', '')}"
                if self._fallback_reason is not None and not self._warned_fallback:
                    self._warned_fallback = True
                    warnings.warn(f"ConnectImportance: the engine's log-scaled pass cannot run this model "
                                  f"({self._fallback_reason}); the connectivity gradient comes from the general "
                                  f"pass instead (torch.func.functional_call in {self.engine_path[8:]}), which is "
                                  "slower and keeps more activations. imp.engine_path says which pass ran.",
                                  RuntimeWarning, stacklevel=2)
        self.connectivity_evaluations += 1
        self._flat = self._check_depends_on_weights(model, inputs, names, params, grads)
        if self._flat:  # rounding noise, not a gradient: the connectivity term is dropped (warned)
            return {}
        # Kept in float32 at least: a half-precision copy would round the small gradients that lam multiplies.
        return {id(params[n]): g.to(torch.promote_types(params[n].dtype, torch.float32))
                for n, g in zip(names, grads) if g is not None}

    def _traced_gradients(self, model: nn.Module, inputs: Any, leaves: Dict[str, torch.Tensor],
                          frozen: Dict[str, torch.Tensor]) -> Optional[Tuple[float, List[Optional[torch.Tensor]]]]:
        """``log phi_tot`` and its gradient by the leaves, through the engine, ``chunk_size`` samples a pass.

        The random inputs are those of :func:`connect_tp.connectivity.log_connectivity` (one draw of
        ``n_samples``, split along the batch). Chunk ``c`` gives the sum ``S_c`` of its output at
        log scale ``s_c``; ``phi_tot = sum_c S_c e^{s_c} / n_samples`` and
        ``d log phi_tot = sum_c w_c d log S_c`` with ``w_c = S_c e^{s_c} / sum_j S_j e^{s_j}``. Each
        chunk's backward accumulates ``u_c d log S_c`` into the leaves' ``.grad`` (in place, so one
        gradient per parameter is alive), with ``u_c = e^{log S_c + s_c - top}`` relative to the
        largest chunk so far (``top``); when a later chunk is larger, the sum so far is rescaled,
        and at the end it is divided by ``sum_c u_c``. With one chunk this is the plain gradient of
        ``log S``. The pass keeps no layer outputs and frees each value after its last use.

        First, the flow is shown affine on the random inputs, from the graph when it can be
        (:func:`connect_tp.engine.affine_by_signs`: every ReLU sees non-negative flows only, as in a
        ReLU network with ``bn_flow="gamma"`` and no max-pool), else by a pass without gradients
        (:func:`connect_tp.engine.affine_on_samples`: every sample on the same linear piece of
        every ReLU, clamp and max-pool, and no other non-linearity). Then ``phi_tot`` (the mean of
        the samples' flows) and its gradient are those of the one mean input, and only that one is
        differentiated: a quarter of the activations at the default ``n_samples=4``, and a cheaper
        backward.

        Returns ``None`` (and leaves no ``.grad``) when the general path must measure instead: the
        model is not traceable, an operation cannot be represented exactly, an input is not
        batched, or a chunk's sum is not positive and finite (the general path then raises its
        explanation) or the output is centred.
        """
        with _EvalMode(model):  # traced as the pass runs it (a forward may branch on self.training)
            if engine.traced_graph(model) is None:
                return None
        n = self.n_samples
        generator = None if self.seed is None else torch.Generator().manual_seed(self.seed)
        samples = connectivity_inputs(model, inputs, n, generator)
        params = {**leaves, **frozen}
        self.used_mean_sample = False
        if n > 1 and isinstance(samples, torch.Tensor) and samples.is_floating_point():
            # the draws are uniform on [0, 1): a graph whose ReLUs only see non-negative flows needs no test pass
            with _EvalMode(model):  # the graph of the eval-mode trace, the one the pass runs
                affine = engine.affine_by_signs(model, self.bn_flow) and bool(samples.min() >= 0)
            if not affine:
                try:
                    with _EvalMode(model), _explained_input_errors(samples):
                        affine = engine.affine_on_samples(model, samples, params, self.bn_flow)
                except engine.NeedsFallback as exc:
                    self._fallback_reason = str(exc)
                    return None
            if affine:  # the mean of the n flows and its gradient are those of the mean input
                samples, n, self.used_mean_sample = samples.mean(0, keepdim=True), 1, True
        size = n if self.chunk_size is None else min(self.chunk_size, n)
        wanted = list(leaves.values())
        top, total_weight, magnitudes = -math.inf, 0.0, []

        def abandon() -> None:
            for leaf in wanted:
                leaf.grad = None

        for start in range(0, n, size):
            try:
                chunk = _batch_slice(samples, n, start, min(start + size, n))
                with _EvalMode(model), _explained_input_errors(chunk):
                    out, _ = engine.run_traced(model, chunk, params, "signal", self.bn_flow, layer_outputs=False)
            except (engine.NeedsFallback, _NotBatched) as exc:
                if isinstance(exc, engine.NeedsFallback):
                    self._fallback_reason = str(exc)
                return abandon()
            tensor, log_scale = traced_output(out)
            del out
            if log_scale is None or not tensor.requires_grad:
                return abandon()
            total = tensor.double().sum()
            value = float(total.detach())
            if not (math.isfinite(value) and value > 0):
                return abandon()
            magnitudes.append(math.log(float(tensor.detach().abs().sum(dtype=torch.float64))) + log_scale)
            log_sum = math.log(value) + log_scale
            if log_sum > top:
                if total_weight > 0:  # the sum so far, relative to the new largest chunk
                    factor = math.exp(top - log_sum)
                    torch._foreach_mul_([g for g in (leaf.grad for leaf in wanted) if g is not None], factor)
                    total_weight *= factor
                top = log_sum
            weight = math.exp(log_sum - top)
            total_weight += weight
            objective = torch.log(total) if weight == 1.0 else torch.log(total) * weight
            del tensor, total
            torch.autograd.backward(objective, inputs=wanted)
            del objective
        log_total = top + math.log(total_weight)
        magnitude = max(magnitudes)
        log_magnitude = magnitude + math.log(sum(math.exp(m - magnitude) for m in magnitudes))
        if log_total <= math.log(CENTRED_TOLERANCE) + log_magnitude:
            return abandon()
        grads = [leaf.grad for leaf in wanted]
        if total_weight != 1.0:
            torch._foreach_div_([g for g in grads if g is not None], total_weight)
        for leaf in wanted:
            leaf.grad = None
        return log_total - math.log(n), grads

    def _check_depends_on_weights(self, model: nn.Module, inputs: Any, names: List[str],
                                  params: Dict[str, torch.Tensor], grads: Sequence[Optional[torch.Tensor]]) -> bool:
        """Whether log phi_tot does not depend on the weights' magnitudes (a normalized output); warns once.

        ``sum |W * d log phi / dW|`` is about the number of layers on a path for any network whose
        output grows with its weights; it is 0 up to rounding when the last layer normalizes the
        output, e.g. a softmax (phi_tot is then the number of rows, a constant). At or below
        ``_FLAT_CONNECTIVITY`` the gradient is rounding noise and the caller drops it: the scores
        are the loss term's alone (Taylor's), whichever strength was given.
        """
        pairs = [(params[n].detach(), g) for n, g in zip(names, grads) if g is not None]
        if pairs and len({(w.device, w.dtype, g.dtype) for w, g in pairs}) == 1:
            # multi-tensor kernels over batches of a few MB: the products of one batch alive at a time
            norms = []
            for part in _batches_of_elements(pairs, _SEGMENT_BATCH_ELEMENTS, size=lambda pair: pair[0].numel()):
                norms += torch._foreach_norm(torch._foreach_mul([w for w, _ in part], [g for _, g in part]), 1)
        else:
            norms = [torch.linalg.vector_norm(w * g, 1) for w, g in pairs]
        # Summed on the CPU: the parameters of a split model (device_map="auto") sit on several devices.
        mass = float(sum(x.to("cpu", torch.float64) for x in norms)) if norms else 0.0
        if mass > _FLAT_CONNECTIVITY:
            return False
        if self._warned_flat or not self._use_loss:
            return True  # without a loss term the step raises, naming this cause
        self._warned_flat = True
        try:
            layer = describe_output_layer(model, connectivity_inputs(model, inputs, 1, torch.Generator().manual_seed(0)))
        except Exception:  # the description is a courtesy: never fail the step over it
            layer = "its last layer"
        warnings.warn(
            f"ConnectImportance: log phi_tot does not depend on the weights (sum |W * dlogphi/dW| = {mass:.2g}): "
            f"the model's output comes from {layer}, which normalizes it (a softmax, or a norm without "
            "affine), so the connectivity gradient is rounding noise: it is dropped and the scores are "
            "Taylor's (a balance resolves to lambda = 0). Prune a model that returns the values before that "
            "layer (e.g. the logits).",
            stacklevel=4,
        )
        return True

    def taylor_masses(self, model: nn.Module) -> Tuple[float, float]:
        """``(sum |W dL/dW|, sum |W d log phi / dW|)`` over the conv and linear weights that have both now.

        The loss term is read from ``.grad``; the connectivity gradient is computed first if the
        model changed since the last one (for the parameters that require a gradient). A finite
        ``balance`` resolves to ``lam = balance * loss mass / connectivity mass`` at the first step;
        a caller that sees the model a part at a time (:class:`connect_tp.llm.LLMBlockPruner` with
        ``layers_per_pass``) sums the masses of every part and calls :meth:`lambda_from_masses`.
        """
        self._full_refresh(model, resolve=False)
        return self._masses(model)

    def _masses(self, model: nn.Module) -> Tuple[float, float]:
        loss_mass, conn_mass = 0.0, 0.0
        for m in model.modules():
            w = getattr(m, "weight", None)
            if not isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)) or not isinstance(w, torch.Tensor):
                continue
            if w.grad is not None:
                loss_mass += float((w.detach() * w.grad).abs().sum(dtype=torch.float64))
            g = self._connectivity_grads.get(id(w))
            if g is not None:
                conn_mass += float((w.detach() * g).abs().sum(dtype=torch.float64))
        return loss_mass, conn_mass

    def lambda_from_masses(self, loss_mass: float, conn_mass: float, fix: bool = False) -> float:
        """``balance * loss_mass / conn_mass``, with the errors a finite balance can meet; ``fix`` keeps it."""
        if self.balance is None or self.balance in (0.0, math.inf):
            raise ValueError(f"only a finite, positive balance resolves to a lambda (balance={self.balance})")
        if not (loss_mass > 0 and math.isfinite(loss_mass)):
            raise RuntimeError(
                f"ConnectImportance(balance={self.balance:g}) found a loss Taylor mass of {loss_mass:g} "
                "(the .grad of the convolution and linear weights is zero or not finite): compute the "
                "gradient of a real loss on calibration data before pruner.step(), or pass lam= or "
                "balance=math.inf."
            )
        if not conn_mass > _FLAT_CONNECTIVITY:
            raise RuntimeError(f"the connectivity Taylor mass is {conn_mass:.2g}, rounding noise: the model's output "
                               "does not depend on its weights' magnitudes (see the warning above)")
        lam = self.balance * loss_mass / conn_mass
        if not lam <= MAX_LAMBDA:  # also catches an overflow to inf
            if not self._warned_clamp:
                self._warned_clamp = True
                warnings.warn(
                    f"ConnectImportance(balance={self.balance:g}) resolves to lambda = {lam:.3g}, above MAX_LAMBDA = "
                    f"{MAX_LAMBDA:g}; lambda is clamped to {MAX_LAMBDA:g}, where the loss term no longer changes "
                    "the ranking. Use balance=math.inf for the connectivity term alone.", UserWarning, stacklevel=3)
            lam = MAX_LAMBDA
        if fix:
            self.lam = lam
        return lam

    def objective_gradient(self, param: torch.Tensor) -> Optional[torch.Tensor]:
        """``dJ/dW = dL/dW - lam * d log phi_tot / dW`` for one parameter of the current model.

        With the connectivity term alone (``balance=math.inf`` or no ``.grad``) it is
        ``-d log phi_tot / dW``. Returns ``None`` when neither term exists.
        """
        loss_grad = param.grad if self._use_loss else None
        conn_grad = self._connectivity_grads.get(id(param)) if self.lam != 0 else None
        if conn_grad is None:
            return loss_grad
        if loss_grad is None:
            return -conn_grad
        # lam * conn_grad is formed in float32 (or the parameter's wider dtype), then cast back.
        return (loss_grad.to(conn_grad.dtype) - self.lam * conn_grad).to(loss_grad.dtype)


    def _score_gradient(self, param: torch.Tensor) -> Optional[torch.Tensor]:
        """:meth:`objective_gradient` up to its sign, which no score sees (scores are ``|W * g|``).

        With the connectivity term alone this is the cached gradient itself, so scoring a group
        allocates no negated copy of it.
        """
        if self.lam != 0 and (not self._use_loss or param.grad is None):
            conn_grad = self._connectivity_grads.get(id(param))
            if conn_grad is not None:
                return conn_grad
        return self.objective_gradient(param)

    # ------------------------------------------------------------------ scoring
    @staticmethod
    def _model_of(group) -> nn.Module:
        graph = getattr(group, "_DG", None)
        if graph is None or getattr(graph, "model", None) is None:
            raise ValueError(
                "ConnectImportance needs groups from a Torch-Pruning DependencyGraph "
                "(DG.get_pruning_group / pruner.step); this group has no graph attached."
            )
        return graph.model

    def _channel_scores(self, layer: nn.Module, prune_fn: Callable, idxs: List[int],
                        gradient: Callable[[torch.Tensor], Optional[torch.Tensor]]) -> List[torch.Tensor]:
        """Per-channel scores ``|W * gradient(W)|`` of one member of a group (weight, and bias if asked)."""
        scores = []
        transposed = getattr(layer, "transposed", False)
        if prune_fn in _OUT_CHANNEL_FNS:
            grad = gradient(layer.weight)
            if grad is not None:
                w, g = layer.weight.data, grad
                if transposed:
                    w, g = w.transpose(1, 0), g.transpose(1, 0)
                scores.append((w[idxs] * g[idxs]).flatten(1).abs().sum(1))
            scores += self._bias_scores(layer, idxs, gradient)
        elif prune_fn in _IN_CHANNEL_FNS:
            grad = gradient(layer.weight)
            if grad is not None:
                w, g = layer.weight.data, grad
                if not transposed:
                    w, g = w.transpose(0, 1), g.transpose(0, 1)
                local = (w * g).flatten(1).abs().sum(1)
                # A grouped conv sees only in_channels / groups inputs per filter: repeat per group.
                if prune_fn == function.prune_conv_in_channels and layer.groups not in (1, layer.in_channels):
                    local = local.repeat(layer.groups)
                scores.append(local[idxs])
        elif prune_fn in _NORM_FNS:
            is_layernorm = prune_fn == function.prune_layernorm_out_channels
            affine = layer.elementwise_affine if is_layernorm else layer.affine
            if affine and (is_layernorm or self.batchnorm):
                grad = gradient(layer.weight)
                if grad is not None:
                    scores.append((layer.weight.data[idxs] * grad[idxs]).abs())
                scores += self._bias_scores(layer, idxs, gradient)
        return scores

    def _bias_scores(self, layer: nn.Module, idxs: List[int],
                     gradient: Callable[[torch.Tensor], Optional[torch.Tensor]]) -> List[torch.Tensor]:
        if not self.bias or getattr(layer, "bias", None) is None:
            return []
        grad = gradient(layer.bias)
        return [] if grad is None else [(layer.bias.data[idxs] * grad[idxs]).abs()]

    def _group_scores(self, group, gradient: Callable[[torch.Tensor], Optional[torch.Tensor]]) -> Optional[torch.Tensor]:
        """One score per channel of ``group``, reduced over its layers; ``None`` when no layer is scored."""
        group_imp, group_idxs = [], []
        for i, (dep, idxs) in enumerate(group):
            layer = dep.target.module
            if not isinstance(layer, tuple(self.target_types)):
                continue
            for local in self._channel_scores(layer, dep.handler, idxs, gradient):
                group_imp.append(local)
                group_idxs.append(group[i].root_idxs)
        if not group_imp:  # groups without scored layers are left to the pruner's defaults
            return None
        return self._reduce(group_imp, group_idxs)

    def _scores_without_signal(self, group) -> Tuple[torch.Tensor, str]:
        """Scores for a group whose objective scores are all zero (every normalizer would give 0/0 = NaN).

        The loss term alone when it exists and is not zero there, else the weights' magnitudes
        ``|W|`` (per channel, reduced like the other scores). Warns once per group, naming its layers.
        """
        loss = None
        if self._use_loss and self.lam != 0:
            loss = self._group_scores(group, lambda p: p.grad)
        if loss is not None and bool(loss.any()):
            scores, what = loss, "the loss term alone (Taylor's scores)"
        else:
            scores, what = self._group_scores(group, torch.ones_like), "the weights' magnitudes |W|"
        names = {m: n for n, m in self._model_of(group).named_modules()}
        layers = tuple(sorted({names.get(dep.target.module) or type(dep.target.module).__name__ for dep, _ in group
                               if isinstance(dep.target.module, tuple(self.target_types))}))
        if layers not in self._warned_groups:
            self._warned_groups.add(layers)
            term = "|W * dL/dW|" if self.lam == 0 else ("|W * d log phi/dW|" if not self._use_loss
                                                         else "|W * (dL/dW - lam * d log phi/dW)|")
            warnings.warn(
                f"ConnectImportance: every score {term} of the group of {', '.join(layers[:6])}"
                f"{' ...' if len(layers) > 6 else ''} is zero (no gradient reaches these layers), which the "
                f"{self.normalizer!r} normalizer would turn into NaN; this group is scored by {what} instead.",
                UserWarning, stacklevel=4)
        return scores, what

    @torch.no_grad()
    def __call__(self, group) -> Optional[torch.Tensor]:
        self._refresh(self._model_of(group), getattr(group, "_DG", None), group)
        scores = self._group_scores(group, self._score_gradient)
        if scores is None:
            return None
        if not bool(scores.any()):
            scores, _ = self._scores_without_signal(group)
            if not bool(scores.any()):  # every weight of the group is zero: no ranking exists, and no NaN
                return scores
        return self._normalize(scores, self.normalizer)
