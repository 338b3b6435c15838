"""Signal-view rules for the modules that break a positive path sum.

CoNNect's connectivity is a sum over input-output paths of products of ``|W|``, measured as one
forward pass of a network with absolute parameters on inputs in [0, 1). That forward pass is a
path sum as long as every node is linear, a ReLU, a pooling or a sum. Other modules break it; each
rule below says what the ``"signal"`` view does instead, and docs/engine.md gives the measurement
behind it:

* **Saturating activations** (ReLU6, Hardtanh, ``clamp``, and the ceiling inside Hardsigmoid):
  the upper bound is open (:func:`open_clamp`). With ``|W|`` and inputs >= 0 the flow of a
  MobileNetV2 is far above 6 in every layer, so an exact clamp passes a constant and nothing before
  it gets a connectivity gradient. Lower bounds are kept, divided by the log scale (exact).
* **ReLU-like smooth activations** (GELU, SiLU, Hardswish, Mish, ELU, CELU, SELU):
  evaluated exactly where the value fits the dtype; where it does not, they are their asymptote,
  which is then exact to rounding (:func:`relu_like`): ``slope * relu(x)`` for a flow far above 1
  (GELU(x) = x once x > 10), ``slope0 * x`` for a flow far below 1 (GELU(x) = x / 2 near 0).
  No fall back to a slower path.
* **Gates** (sigmoid, hard sigmoid, as in squeeze-excitation): a switch with elasticity 1
  (:func:`gate`). With ``|W|`` the gate's input ``z`` is a huge path sum, the exact gate is 1 and
  its gradient 0, so the squeeze-excitation layers would get no connectivity gradient. The rule
  keeps the value 1 (0 for a negative input) and passes ``d log z``: ``x * gate(z)`` changes like
  the product of path sums ``x * z`` would, relative to its value. (The product itself doubles the
  log scale at every gate, and the skip paths then vanish next to the gated ones: RegNetY's
  projection shortcuts got a gradient of exactly 0.)
* **LayerNorm, GroupNorm, RMSNorm**: no centering (:func:`uncentered_norm`): ``x / rms(x) * |gamma|
  + |beta|``. Subtracting the mean of a non-negative flow makes half of it negative, and a ViT's
  output sum goes negative (``log phi`` undefined). The division by the RMS is scale-free, so the
  log scale restarts at the norm.
* **Zero-initialised layers** (an all-zero weight: timm's last BatchNorm gamma of every residual
  block, a ViT head): measured as all-ones (:func:`zero_initialised`), with a
  :class:`ConnectivityRuleWarning` naming them. A zero gamma or head makes every path through it
  zero, so the layers before it would get no gradient, or ``phi = 0``.
* **An output softmax, log-softmax or sigmoid**: skipped (:func:`output_activations`); the flow of
  its input (the logits) is measured, with a warning. A softmax output sums to the batch size
  whatever the weights.
* **cat / stack with constant tensors** (CoordConv coordinate channels): the constants are
  additive constants, divided by the log scale with the flow (:func:`concat`); the sign proof
  treats such a result as of unknown sign.

Uses torch only (and :mod:`.scaled`).
"""
from __future__ import annotations

import math
import warnings
import weakref
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Set

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .scaled import NeedsFallback, Scaled, _affine, _clamp, nested_leaves


class ConnectivityRuleWarning(UserWarning):
    """The signal view measured some layers by a rule the user should know about (named in the text)."""


# ------------------------------------------------------------------------- saturating activations
def open_clamp(x: Scaled, low: Optional[float], high: Optional[float]) -> Scaled:
    """``clamp(x, low, high)`` with a positive upper bound left open; the lower bound is exact."""
    return _clamp(x, low, open_high(low, high))


def open_high(low: Optional[float], high: Optional[float]) -> Optional[float]:
    """The upper bound :func:`open_clamp` keeps (``None`` when it is opened)."""
    if high is not None and high > 0 and (low is None or low < high):
        return None
    return high


# ------------------------------------------------------------------- ReLU-like smooth activations
def _gelu(approximate: str = "none") -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda v: F.gelu(v, approximate=approximate)


_SELU_SCALE, _SELU_ALPHA = 1.0507009873554805, 1.6732632423543772
#: module type -> (function of the plain value, slope far above 0, slope at 0: one number, or
#: (right, left) where the two sides differ)
RELU_LIKE_MODULES: Dict[type, Callable[[nn.Module], tuple]] = {
    nn.GELU: lambda m: (_gelu(m.approximate), 1.0, 0.5),
    nn.SiLU: lambda m: (F.silu, 1.0, 0.5),
    nn.Hardswish: lambda m: (F.hardswish, 1.0, 0.5),
    nn.Mish: lambda m: (F.mish, 1.0, math.tanh(math.log(2.0))),
    nn.ELU: lambda m: ((lambda v: F.elu(v, m.alpha)), 1.0, (1.0, m.alpha)),
    nn.CELU: lambda m: ((lambda v: F.celu(v, m.alpha)), 1.0, 1.0),
    nn.SELU: lambda m: (F.selu, _SELU_SCALE, (_SELU_SCALE, _SELU_SCALE * _SELU_ALPHA)),
}
RELU_LIKE_FUNCTIONS = {F.gelu, F.silu, F.hardswish, F.mish, F.elu, F.celu, F.selu}
RELU_LIKE_METHODS = {"gelu"}
_SLOPES = {F.gelu: (1.0, 0.5), F.silu: (1.0, 0.5), F.hardswish: (1.0, 0.5), F.mish: (1.0, math.tanh(math.log(2.0))),
           F.elu: (1.0, 1.0), F.celu: (1.0, 1.0), F.selu: (_SELU_SCALE, (_SELU_SCALE, _SELU_SCALE * _SELU_ALPHA)),
           "gelu": (1.0, 0.5)}


def relu_like_function(target: Any, args: tuple, kwargs: dict) -> tuple:
    """``(function of the plain value, slope far above 0, slope at 0)`` of a functional call."""
    def arg(i: int, name: str, default: Any) -> Any:
        return args[i] if len(args) > i else kwargs.get(name, default)

    if target in (F.gelu, "gelu"):
        approximate = arg(1, "approximate", "none")
        fn = lambda v: F.gelu(v, approximate=approximate)  # noqa: E731
    elif target in (F.elu, F.celu):
        alpha = arg(1, "alpha", 1.0)
        fn = lambda v: target(v, alpha)  # noqa: E731
        if target is F.elu:  # slope alpha left of 0 (CELU's is 1 on both sides)
            return fn, 1.0, (1.0, alpha)
    else:
        fn = target  # silu, hardswish, mish, selu: no parameter but the inplace flag
    return (fn,) + _SLOPES[target]


def relu_like(x: Scaled, fn: Callable[[torch.Tensor], torch.Tensor], slope_high: float, slope_zero: Any) -> Scaled:
    """An activation that is ``slope_high * x`` far above 0, about 0 far below and ``slope_zero * x`` near 0.

    Exact where ``value * e^log_scale`` fits the dtype. Otherwise the scale is beyond e^88 (float32),
    where every entry that is not negligible next to the largest is far from 0, or below e^-79,
    where all are near 0; there the asymptote is the function to rounding. ``slope_zero`` is one
    number, or ``(right, left)`` for an activation whose two sides differ at 0 (ELU, SELU).
    """
    finfo = torch.finfo(x.value.dtype)
    if x.log_scale > math.log(finfo.max):
        return Scaled(F.relu(x.value) * slope_high if slope_high != 1.0 else F.relu(x.value), x.log_scale)
    if x.log_scale < math.log(finfo.tiny) + 8:
        if isinstance(slope_zero, tuple):
            right, left = slope_zero
            return Scaled(torch.where(x.value > 0, x.value * right, x.value * left), x.log_scale)
        return Scaled(x.value * slope_zero, x.log_scale)
    return Scaled(fn(x.materialized())).renormalized()


# ------------------------------------------------------------------------------------------- gates
GATE_MODULES = (nn.Sigmoid, nn.Hardsigmoid)
GATE_FUNCTIONS = {torch.sigmoid, F.sigmoid, F.hardsigmoid}
GATE_METHODS = {"sigmoid", "sigmoid_"}


def gate(x: Scaled) -> Scaled:
    """A sigmoid or hard-sigmoid gate as a switch with elasticity 1 (see the module's docstring).

    Value: 1 where the gate's input is positive (the gate is open: a path sum of ``|W|`` is far
    beyond the sigmoid's range, where the exact gate is 1 to rounding), 0 where it is negative and
    1/2 at 0. Gradient: an open gate passes ``d log z``, so the flow ``x * gate(z)`` changes with
    the relative change of the gate's input path sum ``z``, as the product ``x * z`` would, while
    its value stays that of ``x`` (a product would double the log scale at every gate and drown
    the skip paths).
    """
    v = x.value
    open_ = v > 0
    safe = torch.where(open_, v.detach(), torch.ones_like(v))
    closed = torch.where(v < 0, torch.zeros_like(v), torch.full_like(v, 0.5))
    return Scaled(torch.where(open_, v / safe, closed))


# ------------------------------------------------------------------------------------------- norms
def _eps_at(x: Scaled, eps: float) -> Optional[float]:
    """``eps`` at the flow's scale (``eps e^{-2s}``), or ``None`` when it exceeds the dtype."""
    try:
        scaled = eps * math.exp(-2.0 * x.log_scale)
    except OverflowError:
        return None
    return scaled if scaled <= torch.finfo(x.value.dtype).max else None


def uncentered_norm(x: Scaled, dims: tuple, eps: float, weight: Optional[torch.Tensor],
                    bias: Optional[torch.Tensor]) -> Scaled:
    """``x / sqrt(mean(x^2 over dims) + eps) * |weight| + |bias|`` (weight and bias already absolute).

    The RMS is taken at the flow's scale with ``eps`` rescaled, so the result is exact at any scale;
    a flow so far below ``sqrt(eps)`` that the rescaled ``eps`` overflows is divided by
    ``sqrt(eps)`` alone (to rounding, the norm's value there).
    """
    v = x.value
    eps_here = _eps_at(x, eps)
    if eps_here is None:
        out = Scaled(v, x.log_scale - 0.5 * math.log(eps))
    else:
        rms = torch.sqrt(v.pow(2).mean(dim=dims, keepdim=True) + eps_here)
        out = Scaled(v / rms)
    if weight is not None:
        out = Scaled(out.value * weight, out.log_scale)
    return _affine(out, lambda t: t, bias)


def layer_norm(x: Scaled, normalized_shape: Iterable[int], weight, bias, eps: float) -> Scaled:
    dims = tuple(range(-len(tuple(normalized_shape)), 0))
    return uncentered_norm(x, dims, eps, weight, bias)


def group_norm(x: Scaled, num_groups: int, weight, bias, eps: float) -> Scaled:
    v = x.value
    n, c = v.shape[0], v.shape[1]
    grouped = Scaled(v.reshape(n, num_groups, -1), x.log_scale)
    out = uncentered_norm(grouped, (2,), eps, None, None)
    shape = (1, c) + (1,) * (v.dim() - 2)
    out = Scaled(out.value.reshape(v.shape), out.log_scale)
    if weight is not None:
        out = Scaled(out.value * weight.view(shape), out.log_scale)
    return _affine(out, lambda t: t, None if bias is None else bias.view(shape))


NORM_FUNCTIONS = {F.layer_norm, F.group_norm} | ({F.rms_norm} if hasattr(F, "rms_norm") else set())


def norm_function(target: Any, x: Scaled, args: tuple, kwargs: dict) -> Scaled:
    """``F.layer_norm`` / ``F.group_norm`` / ``F.rms_norm`` called on a flow, uncentered."""
    def arg(i: int, name: str, default: Any = None) -> Any:
        return args[i] if len(args) > i else kwargs.get(name, default)

    if target is F.group_norm:
        return group_norm(x, arg(1, "num_groups"), arg(2, "weight"), arg(3, "bias"), arg(4, "eps", 1e-5))
    shape = arg(1, "normalized_shape")
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    if target is F.layer_norm:
        return layer_norm(x, shape, arg(2, "weight"), arg(3, "bias"), arg(4, "eps", 1e-5))
    eps = arg(3, "eps")
    eps = torch.finfo(x.value.dtype).eps if eps is None else eps
    return layer_norm(x, shape, arg(2, "weight"), None, eps)


# --------------------------------------------------------------------------------- zero-initialised
_ZERO_RULE_TYPES = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


def zero_initialised(model: nn.Module, params: Mapping[str, torch.Tensor]) -> Set[str]:
    """Names of the ``weight`` parameters (conv, linear, norm) that are zero in every entry."""
    modules = dict(model.named_modules())
    names = []
    for name, p in params.items():
        owner, _, attr = name.rpartition(".")
        if attr == "weight" and isinstance(modules.get(owner), _ZERO_RULE_TYPES) and isinstance(p, torch.Tensor) \
                and p.is_floating_point() and p.numel() and p.device.type != "meta":
            names.append(name)
    if not names:
        return set()
    with torch.no_grad():
        # a tensor whose first entry is not zero is not all-zero: one small read per tensor (one sync
        # per device) instead of a pass over every weight; only the rest are checked in full
        firsts = {}
        for n in names:
            firsts.setdefault(params[n].device, []).append(n)
        candidates = []
        for group in firsts.values():
            heads = torch.cat([params[n].detach().reshape(-1)[:1].float() for n in group])
            candidates += [n for n, h in zip(group, (heads == 0).tolist()) if h]
        return {n for n in candidates if not bool(params[n].detach().any())}


# ------------------------------------------------------------------------------- output activations
_OUTPUT_FUNCTIONS = {torch.softmax, F.softmax, torch.log_softmax, F.log_softmax, torch.sigmoid, F.sigmoid}
_OUTPUT_METHODS = {"softmax", "log_softmax", "sigmoid"}
_OUTPUT_MODULES = (nn.Softmax, nn.LogSoftmax, nn.Softmax2d, nn.Sigmoid)


def _returned_nodes(arg: Any) -> List[fx.Node]:
    return [n for n in nested_leaves(arg) if isinstance(n, fx.Node)]


def output_activations(model: nn.Module, graph: fx.Graph) -> Dict[fx.Node, str]:
    """``{node: label}`` of the softmax / log-softmax / sigmoid nodes that the model returns directly."""
    found: Dict[fx.Node, str] = {}
    for node in graph.nodes:
        if node.op != "output":
            continue
        for n in _returned_nodes(node.args[0] if node.args else None):
            if len(n.users) != 1:
                continue  # also read inside the model (an argmax, a loss): keep it as it is
            if n.op == "call_module":
                m = model.get_submodule(n.target)
                if isinstance(m, _OUTPUT_MODULES):
                    found[n] = f"{n.target!r} ({type(m).__name__})"
            elif n.op == "call_method" and n.target in _OUTPUT_METHODS or \
                    n.op == "call_function" and n.target in _OUTPUT_FUNCTIONS:
                name = n.target if n.op == "call_method" else getattr(n.target, "__name__", str(n.target))
                found[n] = f"the function {name}"
    return found


# ------------------------------------------------------------------------------- cat / stack
def concat(target: Callable, items: list, rest: tuple, kwargs: dict) -> Scaled:
    """``torch.cat`` / ``torch.stack`` of flows and constant tensors, at a common safe scale.

    The constants are additive constants: divided by the scale together with the flows (exact).
    """
    flows = [t for t in items if isinstance(t, Scaled)]
    log_scale = max(f.log_scale for f in flows)
    for t in items:
        if isinstance(t, torch.Tensor) and t.numel():
            peak = float(t.detach().abs().amax())
            if not math.isfinite(peak):
                raise NeedsFallback("a constant concatenated with the flow is not finite")
            if peak > 0:
                log_scale = max(log_scale, math.log(peak))
    values = [t.rescaled_to(log_scale) if isinstance(t, Scaled) else t * math.exp(-log_scale) for t in items]
    return Scaled(target(values, *rest, **kwargs), log_scale).renormalized()


# -------------------------------------------------------------------------------------- warnings
_WARNED: "weakref.WeakKeyDictionary[nn.Module, set]" = weakref.WeakKeyDictionary()


def warn_once(model: nn.Module, message: str) -> None:
    """A :class:`ConnectivityRuleWarning` with ``message``, once per model object and message."""
    try:
        seen = _WARNED.setdefault(model, set())
    except TypeError:  # a module that cannot be weakly referenced: warn every time
        seen = set()
    if message in seen:
        return
    seen.add(message)
    warnings.warn(message, ConnectivityRuleWarning, stacklevel=4)


def zero_initialised_message(names: Iterable[str]) -> str:
    names = sorted(names)
    shown = ", ".join(repr(n) for n in names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
    return (f"connectivity: {len(names)} weight tensor(s) are zero in every entry (zero-initialised): {shown}. "
            "Every path through them would carry no flow, so the layers they gate would get no connectivity "
            "gradient (or phi = 0). The signal view measures them as all-ones instead; their own scores stay 0 "
            "(|W| = 0).")


def output_activation_message(labels: Iterable[str]) -> str:
    return (f"connectivity: the model's output comes from {', '.join(sorted(set(labels)))}, which normalizes it "
            "(its sum does not depend on the weights). Connectivity is measured on its input (the logits) "
            "instead.")

