"""The connectivity engine: one pass of a flow through a model's ``torch.fx`` graph, exact in float32.

CoNNect measures connectivity by pushing a non-negative flow through the network with every
weight replaced by its magnitude. The flow of a deep network grows or shrinks geometrically with
depth (an untrained ResNet-56 reaches e^160, a 200-layer MLP with small weights e^-416), far
outside float32. This module carries every intermediate value as ``value * exp(log_scale)``
(:class:`Scaled`): ``value`` is renormalized to a maximum of 1 after every layer and the
logarithm of the scale, a Python float, is carried alongside. Convolutions, linear layers,
eval-mode BatchNorm, ReLU, pooling, reshapes and residual sums are positively homogeneous in
(signal, additive constants), so dividing the constants (``|b|``, ``|beta|``, running means) by
the accumulated scale together with the signal keeps every value exact, and the detached scale
only adds a constant to ``log phi``: values and gradients are those of the plain forward pass, up
to float32 rounding, at any depth.

Five views of a network share the pass (:data:`VIEWS`); they differ in the edge map (what a
weight contributes) and in the node policy (what the other operations do):

* ``"signal"`` (CoNNect's importance, section 4.2 of the paper): edges ``|W|``, modules as they
  are, with ``|b|``, absolute norm affine parameters, BatchNorm as ``bn_flow`` says
  (:data:`connect_tp.connectivity.BN_FLOWS`), random non-negative inputs.
* ``"structure"`` (the collapse report, :func:`connect_tp.pruning.layer_report`): edges ``|W|``,
  no biases or other additive constants, BatchNorm as its scale ``|gamma| / sqrt(var + eps)``,
  an all-ones input: the weighted sum over input-output paths.
* ``"reach"`` (dead channels and collapse in the layer report): edges ``W != 0`` and every node
  clipped to {0, 1}: whether a path of non-zero weights exists.
* ``"normalized"`` (the regularizer, appendix B of the paper): edges ``theta = |W| / sum |W|``
  per layer (a channel scaler's ``|delta| / sum |delta|``), no biases, BatchNorm / norms /
  activations / dropout as the identity, max-pools as average pools, parameter-free skips left out
  (or kept), an all-ones input.
* ``"effective"`` (effective sparsity, :func:`connect_tp.sparsity.sparsity_report`): the
  ``"normalized"`` node policy on 0/1 edges ``W != 0``, every layer clipped to {0, 1}, a BatchNorm
  channel of scale exactly 0 cut, skips kept.

The last two run on :class:`AppendixBGraph` (a trace that keeps channel scalers and handler
modules as leaves, and the node policy :class:`_AppendixBPass`); they raise
:class:`UnsupportedModuleError` for an operation without a rule instead of falling back.

Operations that are not homogeneous (GELU, softmax, sigmoid, custom modules) are evaluated on the
materialized value ``value * exp(log_scale)``; if that does not fit the dtype the pass raises
:class:`NeedsFallback` and callers use the traced-free path. Models that ``torch.fx`` cannot trace
(Hugging Face language models) take that path directly:
:func:`connect_tp.connectivity.log_connectivity_and_dtype`, a ``torch.func.functional_call``
forward with the same absolute-valued parameters, in the model's precision with float32 and
float64 retries.

This module uses torch and ``torch.fx``; the appendix-B views import ``ChannelScaler`` and
``normalized_abs`` from :mod:`connect_tp.regularizer` when they run (that package imports this
module). :mod:`connect_tp.connectivity` builds the signal view's inputs and checks its result.
"""
from __future__ import annotations

import math
import operator
import weakref
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call



class Binarize(torch.autograd.Function):
    """Forward: reachable-from-input indicator; backward: reachable-to-output indicator.

    Used by the reachability views (``"reach"``, ``"effective"``): both directions stay in {0, 1},
    so path *existence* is computed exactly at any depth, with no underflow.
    """

    @staticmethod
    def forward(ctx, x):
        return (x > 0).to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        return (g > 0).to(g.dtype)


__all__ = ["APPENDIX_B_VIEWS", "AppendixBGraph", "Binarize", "LeafTracer", "VIEWS", "NeedsFallback", "Scaled",
           "UnsupportedModuleError", "layer_flows", "output_flow", "run_traced", "traced_graph"]

VIEWS = ("signal", "structure", "reach", "normalized", "effective")  # the last two: see AppendixBGraph


class NeedsFallback(RuntimeError):
    """The traced pass cannot represent this model exactly; use the traced-free path."""


class Scaled:
    """A tensor ``value * exp(log_scale)`` with ``max |value| <= 1`` after each renormalization."""

    __slots__ = ("value", "log_scale")

    def __init__(self, value: torch.Tensor, log_scale: float = 0.0):
        self.value = value
        self.log_scale = float(log_scale)

    def renormalized(self) -> "Scaled":
        peak = 0.0
        if self.value.numel():  # max |value| as max(max, -min): one pass, no |value| copy
            low, high = self.value.detach().aminmax()
            peak = float(torch.maximum(high, -low))
        if peak == 0.0:
            return self
        if not math.isfinite(peak):
            raise NeedsFallback("a layer's output is not finite even after rescaling")
        return Scaled(self.value / peak, self.log_scale + math.log(peak))

    def rescaled_to(self, log_scale: float) -> torch.Tensor:
        """``value`` expressed at ``log_scale`` (>= its own: the factor is at most 1)."""
        if log_scale == self.log_scale:
            return self.value
        return self.value * math.exp(self.log_scale - log_scale)

    def materialized(self) -> torch.Tensor:
        """The plain value; raises :class:`NeedsFallback` if it does not fit the dtype."""
        if self.log_scale == 0.0:
            return self.value
        finfo = torch.finfo(self.value.dtype)
        if self.log_scale > math.log(finfo.max) or self.log_scale < math.log(finfo.tiny) + 8:
            raise NeedsFallback(f"an operation that is not homogeneous sees a signal of scale e^{self.log_scale:.0f}")
        return self.value * math.exp(self.log_scale)


# ------------------------------------------------------------------------------------------ tracing
_TRACES: "weakref.WeakKeyDictionary[nn.Module, Tuple[tuple, Optional[fx.Graph], Dict[str, str]]]" = \
    weakref.WeakKeyDictionary()
_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _trace(model: nn.Module) -> Tuple[Optional[fx.Graph], Dict[str, str]]:
    signature = tuple((name, type(m)) for name, m in model.named_modules())
    cached = _TRACES.get(model)
    if cached is not None and cached[0] == signature:
        return cached[1], cached[2]
    try:
        graph: Optional[fx.Graph] = fx.Tracer().trace(model)
    except Exception:  # fx raises many exception types for untraceable code
        graph = None
    fused = _conv_batchnorm_pairs(model, graph) if graph is not None else {}
    _TRACES[model] = (signature, graph, fused)
    return graph, fused


def _conv_batchnorm_pairs(model: nn.Module, graph: fx.Graph) -> Dict[str, str]:
    """``{conv node name: BatchNorm node name}`` for each eval BatchNorm that alone reads a convolution.

    The pass folds such a BatchNorm into the convolution's weights (``|W| * scale`` and the shifted
    bias), which gives the same values and gradients and saves one activation per layer.
    """
    modules = dict(model.named_modules())
    pairs = {}
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), _CONV_TYPES):
            continue
        users = list(node.users)
        if len(users) != 1 or users[0].op != "call_module" or users[0].args[:1] != (node,):
            continue
        bn = modules.get(users[0].target)
        if isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.running_mean is not None and len(users[0].args) == 1:
            pairs[node.name] = users[0].name
    return pairs


def traced_graph(model: nn.Module) -> Optional[fx.Graph]:
    """The ``torch.fx`` graph of ``model`` (cached while its module structure is unchanged), or ``None``.

    Leaf modules are ``torch.nn``'s own, as in ``torch.fx.symbolic_trace``. Pruning in place keeps
    the graph valid: the pass reads every module and parameter afresh.
    """
    return _trace(model)[0]


# ------------------------------------------------------------------------------------------ helpers
def _is_scaled(x: Any) -> bool:
    return isinstance(x, Scaled)


def _any_scaled(obj: Any) -> bool:
    if isinstance(obj, Scaled):
        return True
    if isinstance(obj, (tuple, list)):
        return any(_any_scaled(o) for o in obj)
    if isinstance(obj, dict):
        return any(_any_scaled(o) for o in obj.values())
    return False


def _map(obj: Any, fn: Callable[[Any], Any]) -> Any:
    if isinstance(obj, (tuple, list)):
        return type(obj)(_map(o, fn) for o in obj)
    if isinstance(obj, dict):
        return {k: _map(v, fn) for k, v in obj.items()}
    return fn(obj)


def _materialize(obj: Any) -> Any:
    return _map(obj, lambda o: o.materialized() if isinstance(o, Scaled) else o)


def _wrap(obj: Any) -> Any:
    """Floating-point tensors of a plain result become :class:`Scaled` at scale 1."""
    return _map(obj, lambda o: Scaled(o) if isinstance(o, torch.Tensor) and o.is_floating_point() else o)


def _as_tensor(c: Any, like: torch.Tensor) -> torch.Tensor:
    return c if isinstance(c, torch.Tensor) else torch.as_tensor(c, dtype=like.dtype, device=like.device)


def _affine(x: Scaled, linear: Callable[[torch.Tensor], torch.Tensor], const: Optional[torch.Tensor]) -> Scaled:
    """``linear(x) + const`` for a linear map and an additive constant, at a common safe scale.

    The new scale is the larger of the signal's and the constant's, so both enter with a factor of
    at most 1 and nothing overflows; the result is renormalized.
    """
    if const is None:
        return Scaled(linear(x.value), x.log_scale).renormalized()
    peak_const = const.detach().abs().amax()
    peak = float(peak_const)
    if peak == 0.0:  # added anyway when it carries a gradient (of zero), as the plain forward does
        out = linear(x.value)
        return Scaled(out + const if const.requires_grad else out, x.log_scale).renormalized()
    if not math.isfinite(peak):
        raise NeedsFallback("an additive constant is not finite")
    log_scale = max(x.log_scale, math.log(peak))
    out = linear(x.rescaled_to(log_scale)) + (const / peak_const) * math.exp(math.log(peak) - log_scale)
    return Scaled(out, log_scale).renormalized()


def _aligned(flows) -> Tuple[list, float]:
    log_scale = max(f.log_scale for f in flows)
    return [f.rescaled_to(log_scale) for f in flows], log_scale


def _add(a: Any, b: Any, alpha: float = 1.0) -> Any:
    if _is_scaled(a) and _is_scaled(b):
        (va, vb), log_scale = _aligned([a, b])
        return Scaled(va + alpha * vb, log_scale).renormalized()
    if _is_scaled(a):
        return _affine(a, lambda v: v, alpha * _as_tensor(b, a.value))
    return _affine(b, lambda v: alpha * v, _as_tensor(a, b.value))


def _mul(a: Any, b: Any) -> Any:
    if _is_scaled(a) and _is_scaled(b):
        return Scaled(a.value * b.value, a.log_scale + b.log_scale).renormalized()
    x, c = (a, b) if _is_scaled(a) else (b, a)
    return Scaled(x.value * c, x.log_scale).renormalized()


def _div(a: Any, b: Any) -> Any:
    if _is_scaled(a) and _is_scaled(b):
        return Scaled(a.value / b.value, a.log_scale - b.log_scale).renormalized()
    if _is_scaled(a):
        return Scaled(a.value / b, a.log_scale).renormalized()
    return Scaled(a / b.value, -b.log_scale).renormalized()


def _multilinear(fn: Callable, args: tuple, kwargs: dict) -> Scaled:
    """A function linear in each tensor argument (matmul, einsum): the scales of the flows add."""
    log_scale = sum(a.log_scale for a in args if _is_scaled(a))
    plain = tuple(a.value if _is_scaled(a) else a for a in args)
    return Scaled(fn(*plain, **kwargs), log_scale).renormalized()


def _clamp(x: Scaled, low: Optional[float], high: Optional[float]) -> Scaled:
    """``clamp(x, low, high)``: the thresholds are divided by the scale (an exact rescaling)."""
    def scaled(t: Optional[float]) -> Optional[float]:
        if t is None or t == 0:
            return t
        try:
            return t * math.exp(-x.log_scale)
        except OverflowError:
            return math.copysign(math.inf, t)
    return Scaled(torch.clamp(x.value, scaled(low), scaled(high)), x.log_scale)


# Operations that commute with a positive scale and take the flow as their first argument.
_HOMOGENEOUS_FUNCTIONS = {
    torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.squeeze, torch.unsqueeze,
    torch.mean, torch.sum, torch.flip, torch.roll, operator.getitem, torch.relu, F.relu,
    F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.max_pool1d, F.max_pool2d, F.max_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.leaky_relu,
    F.interpolate, F.pixel_shuffle, F.pixel_unshuffle, torch.nn.functional.pad,
}
_HOMOGENEOUS_METHODS = {
    "view", "reshape", "flatten", "permute", "transpose", "squeeze", "unsqueeze", "contiguous", "mean",
    "sum", "expand", "expand_as", "repeat", "flip", "roll", "relu", "relu_", "clone", "t", "narrow",
}
_SPLITTING = {torch.chunk, torch.split, torch.unbind}
_SPLITTING_METHODS = {"chunk", "split", "unbind"}
_DROPOUT = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout}
_ADD = {operator.add, operator.iadd, torch.add}
_SUB = {operator.sub, operator.isub, torch.sub}
_MUL = {operator.mul, operator.imul, torch.mul}
_DIV = {operator.truediv, operator.itruediv, torch.div}
_MULTILINEAR = {operator.matmul, torch.matmul, torch.mm, torch.bmm, torch.einsum}
_CONV_FUNCTIONS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}
_PARAMETER_FREE_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.Flatten, nn.Unflatten, nn.ZeroPad2d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d,
    nn.PixelShuffle, nn.PixelUnshuffle, nn.ChannelShuffle,
)


_MAX_TO_AVG = {
    nn.MaxPool1d: F.avg_pool1d, nn.MaxPool2d: F.avg_pool2d, nn.MaxPool3d: F.avg_pool3d,
    nn.AdaptiveMaxPool1d: F.adaptive_avg_pool1d, nn.AdaptiveMaxPool2d: F.adaptive_avg_pool2d,
    nn.AdaptiveMaxPool3d: F.adaptive_avg_pool3d,
}


# ------------------------------------------------------------------------------------------ the pass
class _AbsFoldedConv(torch.autograd.Function):
    """``conv(x, |W| * scale)`` that keeps only ``x``, the signed ``W`` and ``scale`` for the backward.

    The folded weight is rebuilt in the backward (one layer at a time) instead of being kept, with
    ``|W|``, for the whole pass: the same values and gradients (the same operations in the same
    order), two weight-sized tensors per layer less at the peak.
    """

    @staticmethod
    def forward(ctx, x, weight, scale, module):
        ctx.module = module
        ctx.save_for_backward(x, weight, scale)
        return module._conv_forward(x, _abs_folded(weight, scale), None)

    @staticmethod
    def backward(ctx, grad):
        x, weight, scale = ctx.saved_tensors
        m = ctx.module
        dims = weight.dim() - 2
        grad_x, grad_folded, _ = torch.ops.aten.convolution_backward(
            grad, x, _abs_folded(weight, scale), None, m.stride, m.padding, m.dilation, False, [0] * dims,
            m.groups, [ctx.needs_input_grad[0], ctx.needs_input_grad[1] or ctx.needs_input_grad[2], False])
        grad_weight = grad_scale = None
        if ctx.needs_input_grad[1]:
            grad_abs = grad_folded if scale is None else grad_folded * scale.view((-1,) + (1,) * (dims + 1))
            grad_weight = grad_abs * weight.sgn()
        if ctx.needs_input_grad[2]:
            grad_scale = (grad_folded * weight.abs()).sum(dim=tuple(range(1, dims + 2)))
        return grad_x, grad_weight, grad_scale, None


def _abs_folded(weight: torch.Tensor, scale: Optional[torch.Tensor]) -> torch.Tensor:
    w = weight.abs()
    return w if scale is None else w * scale.view((-1,) + (1,) * (w.dim() - 1))


def _refolds(m: nn.Module, weight: Optional[torch.Tensor]) -> bool:
    """Whether :class:`_AbsFoldedConv` can run this convolution (zero padding given as numbers)."""
    return (weight is not None and weight.is_floating_point() and m.padding_mode == "zeros"
            and not isinstance(m.padding, str) and not getattr(m, "transposed", False))


class _Pass:
    """One run of a traced graph in one view. ``params`` are the model's (signed) parameters."""

    keep_layer_outputs = True  # run_traced(layer_outputs=False) turns it off for one pass

    def __init__(self, model: nn.Module, params: Mapping[str, torch.Tensor], view: str, bn_flow: str,
                 fused: Optional[Dict[str, str]] = None):
        self.model = model
        self.fused = fused or {}  # conv module -> the BatchNorm module folded into it
        self.folded = {bn: True for bn in self.fused.values()}
        self.params = params
        self.view = view
        self.bn_flow = bn_flow
        self.buffers = dict(model.named_buffers())
        self._abs: Dict[str, torch.Tensor] = {}
        self.layer_outputs: Dict[str, Scaled] = {}

    # -- parameters in this view
    def param(self, name: str) -> Optional[torch.Tensor]:
        if name not in self.params:
            return None
        if self.view == "reach":
            return self.params[name]  # already the 0/1 edge indicators (see run_traced)
        if name not in self._abs:
            self._abs[name] = self.params[name].abs()
        return self._abs[name]

    def const(self, name: str) -> Optional[torch.Tensor]:
        """An additive constant (a bias): absent in the structure and reach views."""
        return self.param(name) if self.view == "signal" else None

    # -- nodes
    def call_module(self, target: str, args: tuple, kwargs: dict) -> Any:
        m = self.model.get_submodule(target)
        x = args[0] if args else None
        prefix = target + "."
        if not _is_scaled(x):
            return self.generic_module(m, prefix, args, kwargs)
        if isinstance(m, nn.Linear):
            w = self.param(prefix + "weight")
            return self.finish(target, _affine(x, lambda v: F.linear(v, w), self.const(prefix + "bias")))
        if isinstance(m, _CONV_TYPES):
            raw = self.params.get(prefix + "weight") if self.view != "reach" else None
            refold = _refolds(m, raw)
            w = raw if refold else self.param(prefix + "weight")
            b = self.const(prefix + "bias")
            bn_target = self.fused.get(target)
            fold_scale = None
            if bn_target is not None:  # fold the BatchNorm that alone reads this convolution
                scale, shift = self.bn_affine(self.model.get_submodule(bn_target), bn_target + ".", w.dtype)
                if scale is not None:
                    if refold:
                        fold_scale = scale
                    else:
                        w = w * scale.view((-1,) + (1,) * (w.dim() - 1))
                    b = None if b is None else b * scale
                if shift is not None:
                    b = shift if b is None else b + shift
            if b is not None:
                b = b.view((-1,) + (1,) * (x.value.dim() - 2))
            if refold:  # |W| (and the BatchNorm scale) applied inside, rebuilt in the backward
                return self.finish(target, _affine(x, lambda v: _AbsFoldedConv.apply(v, w, fold_scale, m), b))
            return self.finish(target, _affine(x, lambda v: m._conv_forward(v, w, None), b))
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            return self.batchnorm(m, prefix, x)
        if isinstance(m, (nn.ReLU, nn.LeakyReLU, nn.Identity)) or isinstance(m, nn.modules.dropout._DropoutNd) \
                or isinstance(m, nn.Dropout) or isinstance(m, nn.AlphaDropout):
            if isinstance(m, nn.ReLU):
                return self.node(Scaled(F.relu(x.value), x.log_scale))
            if isinstance(m, nn.LeakyReLU):
                return self.node(Scaled(F.leaky_relu(x.value, m.negative_slope), x.log_scale))
            return x
        if isinstance(m, nn.Hardtanh):  # ReLU6 included
            return self.node(_clamp(x, m.min_val, m.max_val))
        if self.view == "reach" and type(m) in _MAX_TO_AVG:
            # a max passes on one input per window; reachability needs every non-zero input
            if isinstance(m, (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)):
                return self.node(Scaled(_MAX_TO_AVG[type(m)](x.value, m.output_size)))
            stride = m.stride if m.stride is not None else m.kernel_size
            return self.node(Scaled(_MAX_TO_AVG[type(m)](x.value, m.kernel_size, stride, m.padding, m.ceil_mode,
                                                         count_include_pad=False)))
        if isinstance(m, _PARAMETER_FREE_MODULES):
            return self.node(Scaled(m(x.value), x.log_scale))
        if isinstance(m, (nn.LayerNorm, nn.GroupNorm)) and self.view == "signal":
            return self.norm(m, prefix, x)
        if self.view != "signal":
            raise NeedsFallback(f"module {target!r} ({type(m).__name__}) has no rule in the {self.view!r} view")
        return self.generic_module(m, prefix, args, kwargs)

    def finish(self, target: str, out: Scaled) -> Scaled:
        out = self.node(out)
        if self.keep_layer_outputs:
            self.layer_outputs[target] = out
        return out

    def node(self, x: Scaled) -> Scaled:
        if self.view == "reach":
            return Scaled(Binarize.apply(x.value))
        return x

    def bn_affine(self, m: nn.Module, prefix: str, dtype: torch.dtype) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """An eval BatchNorm in this view as ``x * scale + shift`` per channel (``None``: 1 or 0)."""
        mode = self.bn_flow if self.view == "signal" else "gamma_over_sigma"
        if mode == "identity":
            return None, None
        gamma = self.param(prefix + "weight") if m.affine else None
        shift = None
        if mode == "gamma":
            scale = gamma
        else:
            inv_std = torch.rsqrt(self.buffers[prefix + "running_var"] + m.eps).to(dtype)
            scale = inv_std if gamma is None else gamma * inv_std
            if mode == "stats":
                shift = -self.buffers[prefix + "running_mean"].to(dtype) * scale
                if m.affine:
                    shift = shift + self.param(prefix + "bias")
        if self.view == "reach" and scale is not None:
            scale = (scale != 0).to(dtype)
        return scale, shift

    def batchnorm(self, m: nn.Module, prefix: str, x: Scaled) -> Scaled:
        if self.folded.get(prefix[:-1]):
            return x  # already folded into the convolution that feeds it
        scale, shift = self.bn_affine(m, prefix, x.value.dtype)
        if scale is None and shift is None:
            return x
        shape = (1, -1) + (1,) * (x.value.dim() - 2)
        linear = (lambda v: v) if scale is None else (lambda v: v * scale.view(shape))
        return self.node(_affine(x, linear, None if shift is None else shift.view(shape)))

    def norm(self, m: nn.Module, prefix: str, x: Scaled) -> Scaled:
        """LayerNorm / GroupNorm: scale-free up to eps, which is rescaled with the signal."""
        try:
            eps = m.eps * math.exp(-2.0 * x.log_scale)
        except OverflowError:
            eps = math.inf
        if not math.isfinite(eps) or eps > torch.finfo(x.value.dtype).max:
            raise NeedsFallback("a normalization layer sees a signal far below its eps")
        w, b = self.param(prefix + "weight"), self.param(prefix + "bias")
        if isinstance(m, nn.LayerNorm):
            return Scaled(F.layer_norm(x.value, m.normalized_shape, w, b, eps)).renormalized()
        return Scaled(F.group_norm(x.value, m.num_groups, w, b, eps)).renormalized()

    def generic_module(self, m: nn.Module, prefix: str, args: tuple, kwargs: dict) -> Any:
        """Any other module: evaluated on plain values with |parameters|."""
        own = {n: self.param(prefix + n) for n, _ in m.named_parameters()}
        own.update({n: b for n, b in m.named_buffers()})
        out = functional_call(m, own, _materialize(args), _materialize(kwargs))
        return _wrap(out)

    def call_function(self, node: fx.Node, args: tuple, kwargs: dict) -> Any:
        target, is_method = node.target, node.op == "call_method"
        if not _any_scaled((args, kwargs)):
            return getattr(args[0], target)(*args[1:], **kwargs) if is_method else target(*args, **kwargs)
        first = args[0] if args else None
        name = target if is_method else None

        def is_(functions, methods=()):
            return (name in methods) if is_method else (target in functions)

        if is_(_ADD, ("add", "add_")) and len(args) == 2:
            return self.node(_add(args[0], args[1], kwargs.get("alpha", 1)))
        if is_(_SUB, ("sub", "sub_")) and len(args) == 2:
            return self.node(_add(args[0], args[1], -kwargs.get("alpha", 1)))
        if is_(_MUL, ("mul", "mul_")) and len(args) == 2:
            return self.node(_mul(args[0], args[1]))
        if is_(_DIV, ("div", "div_")) and len(args) == 2 and "rounding_mode" not in kwargs:
            return self.node(_div(args[0], args[1]))
        if is_({operator.neg, torch.neg}, ("neg",)):
            return Scaled(-first.value, first.log_scale)
        if is_(_MULTILINEAR, ("matmul", "mm", "bmm")) and not kwargs:
            if target is torch.einsum:
                return self.node(_multilinear(lambda *a: torch.einsum(*a), args, {}))
            fn = (lambda a, b: a @ b)
            return self.node(_multilinear(fn, args, {}))
        if is_({F.linear}) and _is_scaled(first) and not _any_scaled(args[1:]):
            w = args[1] if len(args) > 1 else kwargs["weight"]
            b = args[2] if len(args) > 2 else kwargs.get("bias")
            return self.node(_affine(first, lambda v: F.linear(v, w), b if self.view == "signal" else None))
        if is_(_CONV_FUNCTIONS) and _is_scaled(first) and not _any_scaled(args[1:]):
            w = args[1] if len(args) > 1 else kwargs["weight"]
            b = args[2] if len(args) > 2 else kwargs.get("bias")
            rest = args[3:]
            if b is not None and self.view == "signal":
                b = b.view((-1,) + (1,) * (first.value.dim() - 2))
            else:
                b = None
            return self.node(_affine(first, lambda v: target(v, w, None, *rest, **kwargs), b))
        if is_(_DROPOUT):
            return first
        if is_({F.hardtanh, F.relu6}) and _is_scaled(first):
            if target is F.relu6:
                return self.node(_clamp(first, 0.0, 6.0))
            low = args[1] if len(args) > 1 else kwargs.get("min_val", -1.0)
            high = args[2] if len(args) > 2 else kwargs.get("max_val", 1.0)
            return self.node(_clamp(first, low, high))
        if is_({torch.clamp}, ("clamp", "clamp_")) and _is_scaled(first) and not _any_scaled(args[1:]):
            low = args[1] if len(args) > 1 else kwargs.get("min")
            high = args[2] if len(args) > 2 else kwargs.get("max")
            if not isinstance(low, torch.Tensor) and not isinstance(high, torch.Tensor):
                return self.node(_clamp(first, low, high))
        if is_({torch.cat, torch.stack}) and isinstance(first, (list, tuple)) and all(_is_scaled(t) for t in first):
            values, log_scale = _aligned(first)
            return Scaled(target(values, *args[1:], **kwargs), log_scale)
        if (is_(_HOMOGENEOUS_FUNCTIONS, _HOMOGENEOUS_METHODS) and _is_scaled(first)
                and not _any_scaled((args[1:], kwargs))):
            if target is torch.nn.functional.pad and (kwargs.get("mode", "constant") != "constant"
                                                    or (args[3] if len(args) > 3 else kwargs.get("value", 0)) not in (0, None)):
                pass  # a non-zero padding value is an additive constant: evaluated plainly below
            else:
                value = getattr(first.value, target)(*args[1:], **kwargs) if is_method else \
                    target(first.value, *args[1:], **kwargs)
                if target in (torch.relu, F.relu) or name in ("relu", "relu_") or target is F.leaky_relu:
                    return self.node(Scaled(value, first.log_scale))
                return Scaled(value, first.log_scale)
        if is_(_SPLITTING, _SPLITTING_METHODS) and _is_scaled(first) and not _any_scaled((args[1:], kwargs)):
            parts = getattr(first.value, target)(*args[1:], **kwargs) if is_method else \
                target(first.value, *args[1:], **kwargs)
            return type(parts)(Scaled(p, first.log_scale) for p in parts)
        if target is getattr and _is_scaled(first):
            return getattr(first.value, args[1])
        if is_method and target in ("size", "dim", "numel", "type_as", "to", "float", "double", "half") \
                and _is_scaled(first):
            value = getattr(first.value, target)(*args[1:], **kwargs)
            return Scaled(value, first.log_scale) if isinstance(value, torch.Tensor) else value
        if self.view != "signal":
            label = target if is_method else getattr(target, "__name__", str(target))
            raise NeedsFallback(f"operation {label!r} has no rule in the {self.view!r} view")
        plain_args, plain_kwargs = _materialize(args), _materialize(kwargs)
        out = getattr(plain_args[0], target)(*plain_args[1:], **plain_kwargs) if is_method else \
            target(*plain_args, **plain_kwargs)
        return _wrap(out)


def run_traced(
    model: nn.Module,
    inputs: Any,
    params: Optional[Mapping[str, torch.Tensor]] = None,
    view: str = "signal",
    bn_flow: str = "stats",
    graph: Optional[fx.Graph] = None,
    policy: Optional[Mapping[str, Any]] = None,
    layer_outputs: bool = True,
) -> Tuple[Any, Dict[str, Scaled]]:
    """Run ``model``'s traced graph on ``inputs`` in one view; the output keeps its :class:`Scaled` flows.

    Args:
        model: the model (its modules and buffers are read at run time; it is not modified and
            its training flags are ignored: the pass is an eval-mode pass).
        inputs: a tensor, a tuple of positional inputs, or a dict of inputs by argument name.
            Floating-point tensors carry the flow; others (token ids) are used as they are.
        params: the tensors standing for the model's parameters, by name (gradients flow to them);
            defaults to the model's own. The pass takes their absolute values, except in the
            ``"reach"`` view, where they are the 0/1 edge indicators themselves (by default
            ``param != 0``).
        view: one of :data:`VIEWS`.
        bn_flow: BatchNorm treatment of the ``"signal"`` view.
        graph: a graph from :func:`traced_graph` (traced here when omitted).
        policy: for the appendix-B views (``"normalized"``, ``"effective"``) only, the node
            policy's settings ``{"graph": AppendixBGraph, "skip_connections": ...}``; those views
            run on that object's leaf trace, with no BatchNorm folding (use :class:`AppendixBGraph`).
        layer_outputs: keep the flow after every linear and convolution layer (``False``: the
            returned dict is empty and each layer's output is freed once the next layers used it,
            which is what a caller that only wants ``log phi`` and its gradient needs).

    Returns:
        ``(output, layer_outputs)``: the model's output structure with :class:`Scaled` in place of
        flow tensors, and the flow after every linear and convolution layer by module name.

    Raises:
        NeedsFallback: the model cannot be traced, or an operation cannot be represented exactly.
    """
    if view not in VIEWS:
        raise ValueError(f"unknown view {view!r}; choose one of {VIEWS}")
    if view in APPENDIX_B_VIEWS:  # the caller's leaf trace; BatchNorm is the identity, nothing to fold
        if graph is None or policy is None:
            raise ValueError(f"the {view!r} view runs through AppendixBGraph (it needs its trace and policy)")
        traced, fused_nodes = graph, {}
    else:
        traced, fused_nodes = _trace(model)
    if graph is None:
        graph = traced
    elif view not in APPENDIX_B_VIEWS:
        fused_nodes = _conv_batchnorm_pairs(model, graph)
    if graph is None:
        raise NeedsFallback(f"{type(model).__name__} cannot be traced by torch.fx")
    targets = {n.name: n.target for n in graph.nodes}
    fused = {targets[conv]: targets[bn] for conv, bn in fused_nodes.items()}
    if len(set(fused.values())) != len(fused) or any(
            sum(1 for n in graph.nodes if n.op == "call_module" and n.target in (c, b)) != 2
            for c, b in fused.items()):
        fused = {}  # a module called more than once: no folding
    if params is None:
        params = dict(model.named_parameters())
        if view == "reach":
            params = {n: (p.detach() != 0).to(p.dtype) for n, p in params.items()}
    run = _AppendixBPass(model, params, view, **policy) if view in APPENDIX_B_VIEWS else \
        _Pass(model, params, view, bn_flow, fused)
    run.keep_layer_outputs = layer_outputs
    env: Dict[fx.Node, Any] = {}
    # Each value is dropped after its last user ran: autograd keeps what the backward needs, the
    # rest (layer outputs a ReLU replaced, residual inputs after the sum) is freed at once.
    last_user = {used: node for node in graph.nodes for used in node.all_input_nodes}
    dead_after: Dict[fx.Node, list] = {}
    for used, node in last_user.items():
        dead_after.setdefault(node, []).append(used)
    positional = list(inputs) if isinstance(inputs, (tuple, list)) else [inputs]
    placeholder_index = 0
    for node in graph.nodes:
        if node.op == "placeholder":
            if isinstance(inputs, Mapping):
                value = inputs.get(node.target, node.args[0] if node.args else None)
            elif placeholder_index < len(positional):
                value = positional[placeholder_index]
            else:
                value = node.args[0] if node.args else None
            placeholder_index += 1
            env[node] = Scaled(value) if isinstance(value, torch.Tensor) and value.is_floating_point() else value
            continue
        args = fx.node.map_arg(node.args, lambda n: env[n])
        kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n])
        if node.op == "output":
            return args[0], run.layer_outputs
        if node.op == "get_attr":
            value = run.param(node.target)
            if value is None:
                obj: Any = model
                for part in node.target.split("."):
                    obj = getattr(obj, part)
                value = obj
            env[node] = value
        elif node.op == "call_module":
            env[node] = run.call_module(node.target, args, kwargs)
        else:
            env[node] = run.call_function(node, args, kwargs)
        for used in dead_after.get(node, ()):
            env.pop(used, None)
    raise RuntimeError("fx graph has no output node")  # pragma: no cover


def output_flow(output: Any) -> Any:
    """The flow of a model's output that connectivity sums: its logits.

    A :class:`Scaled`, a dict's (or ``ModelOutput``'s) ``logits``, else the first flow with a batch
    dimension in a dict, tuple or list (a 0-dim loss is skipped). Returns ``None`` when the output
    holds no flow.
    """
    if isinstance(output, Scaled):
        return output
    logits = output.get("logits") if isinstance(output, Mapping) else getattr(output, "logits", None)
    if isinstance(logits, Scaled):
        return logits
    items = list(output.values()) if isinstance(output, Mapping) else \
        list(output) if isinstance(output, (tuple, list)) else []
    for item in items:
        found = output_flow(item)
        if found is not None and found.value.dim() > 0:
            return found
    return None


def layer_flows(model: nn.Module, example_inputs: Any) -> Dict[str, Any]:
    """The structural flow of a network and, per layer and output channel, its share and reachability.

    Two views of one traced pass on an all-ones input (one sample, the model's dtype):

    * ``"structure"``: ``phi`` is the sum over input-output paths of the product of ``|W|`` and
      BatchNorm scales ``|gamma| / sqrt(var + eps)`` (no biases, no shifts); the *share* of an
      output channel is ``sum |W_c| * d log phi / d |W_c|``, the fraction of ``phi`` through it.
    * ``"reach"``: whether a path of non-zero weights (and non-zero BatchNorm scales) leads from the
      input through the channel to the output, exactly, whatever the magnitudes.

    Returns:
        ``{"log_phi": float (-inf when no path is left), "shares": {layer: float64 tensor},
        "alive": {layer: bool tensor}, "connected": bool}`` for every convolution and linear layer.

    Raises:
        NeedsFallback: the model cannot be traced or has an operation without a rule.
    """
    first = example_inputs[0] if isinstance(example_inputs, (tuple, list)) else example_inputs
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    device = next((p.device for p in model.parameters()), first.device)
    ones = torch.ones((1,) + tuple(first.shape[1:]), dtype=dtype, device=device)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, (nn.Linear,) + _CONV_TYPES)}
    params = {n: p.detach() for n, p in model.named_parameters()}
    weights = {name: params[name + ".weight"].clone().requires_grad_(True) for name in layers}
    params.update({name + ".weight": w for name, w in weights.items()})
    result: Dict[str, Any] = {}
    with torch.enable_grad():
        out, _ = run_traced(model, ones, params, "structure")
        flow = output_flow(out)
        total = flow.value.double().sum() if flow is not None else torch.zeros((), dtype=torch.float64)
        if float(total.detach()) > 0:
            grads = torch.autograd.grad(torch.log(total), list(weights.values()), allow_unused=True)
            result["log_phi"] = math.log(float(total.detach())) + flow.log_scale
        else:
            grads = [None] * len(weights)
            result["log_phi"] = -math.inf
        result["shares"] = {
            name: (w.detach().double() * g.double()).flatten(1).sum(1) if g is not None
            else torch.zeros(w.shape[0], dtype=torch.float64, device=w.device)
            for (name, w), g in zip(weights.items(), grads)}
        masks = {n: (p != 0).to(dtype).requires_grad_(True) for n, p in params.items()}
        out, _ = run_traced(model, ones, {**params, **masks}, "reach")
        flow = output_flow(out)
        reach_total = flow.value.sum() if flow is not None else torch.zeros(())
        wanted = [masks[name + ".weight"] for name in layers]
        if float(reach_total.detach()) > 0:
            mask_grads = torch.autograd.grad(reach_total, wanted, allow_unused=True)
        else:
            mask_grads = [None] * len(wanted)
    result["alive"] = {
        name: ((m.detach() > 0) & (g > 0)).flatten(1).any(1) if g is not None
        else torch.zeros(m.shape[0], dtype=torch.bool, device=m.device)
        for name, m, g in zip(layers, wanted, mask_grads)}
    result["connected"] = float(reach_total.detach()) > 0
    return result


# ------------------------------------------------------------------------------ appendix-B views
# The regularizer's connectivity (section 3.3 and appendix B of the paper) and effective sparsity
# run on this same pass with their own edge maps and node policy (:class:`_AppendixBPass`), on a
# trace that keeps channel scalers and handler modules as leaves (:class:`AppendixBGraph`).
APPENDIX_B_VIEWS = ("normalized", "effective")
Handler = Callable[[nn.Module, torch.Tensor], torch.Tensor]


class UnsupportedModuleError(TypeError):
    """Raised when an appendix-B view meets an operation it does not know how to map."""


def _channel_scaler_type() -> type:
    # imported on use: connect_tp.regularizer imports this module
    from .regularizer.channel_scaler import ChannelScaler
    return ChannelScaler


_B_IDENTITY_MODULES = (
    nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm,
    nn.modules.dropout._DropoutNd, nn.Identity,
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus,
)
_B_LINEAR_MODULES = (
    nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.Flatten, nn.Unflatten,
)
_ADAPTIVE_MAX_TYPES = (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
_B_IDENTITY_FUNCTIONS = {
    F.relu, torch.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish,
    torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.hardswish, F.hardsigmoid, F.hardtanh, F.softplus,
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
    F.batch_norm, F.layer_norm, F.group_norm, F.instance_norm,
}
_B_IDENTITY_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "contiguous", "clone", "float"}
# linear, non-negative maps of their first argument, applied to the flow unchanged
_B_LINEAR_FUNCTIONS = {
    torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.squeeze, torch.unsqueeze,
    torch.mean, torch.sum, operator.getitem,
    F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
}
_B_LINEAR_METHODS = {"view", "reshape", "flatten", "permute", "transpose", "squeeze", "unsqueeze", "mean", "sum"}
_B_FUNCTIONAL_MAX_TO_AVG = {F.max_pool1d: F.avg_pool1d, F.max_pool2d: F.avg_pool2d, F.max_pool3d: F.avg_pool3d}
_B_FUNCTIONAL_ADAPTIVE_MAX_TO_AVG = {
    F.adaptive_max_pool1d: F.adaptive_avg_pool1d, F.adaptive_max_pool2d: F.adaptive_avg_pool2d,
    F.adaptive_max_pool3d: F.adaptive_avg_pool3d,
}


def appendix_b_module_kind(m: nn.Module, handlers: Mapping[type, Handler]) -> Optional[str]:
    """The appendix-B rule for module ``m``: ``"handler"``, ``"weighted"`` (linear / conv),
    ``"scaler"``, ``"identity"``, ``"maxpool"``, ``"adaptive_maxpool"``, ``"linear"`` or ``None``."""
    if type(m) in handlers:
        return "handler"
    if isinstance(m, (nn.Linear,) + _CONV_TYPES):
        return "weighted"
    if isinstance(m, _channel_scaler_type()):
        return "scaler"
    if isinstance(m, _B_IDENTITY_MODULES):
        return "identity"
    if type(m) in _MAX_TO_AVG:
        return "adaptive_maxpool" if isinstance(m, _ADAPTIVE_MAX_TYPES) else "maxpool"
    if isinstance(m, _B_LINEAR_MODULES):
        return "linear"
    return None


def _b_is_weighted(m: nn.Module, handlers: Mapping[type, Handler]) -> bool:
    """Whether ``m``'s parameters enter the connectivity (layer, scaler, or parameterized handler module)."""
    return appendix_b_module_kind(m, handlers) in ("weighted", "scaler") or \
        (type(m) in handlers and any(True for _ in m.parameters(recurse=True)))


def _b_check_module(name: str, m: nn.Module, handlers: Mapping[type, Handler]) -> None:
    if appendix_b_module_kind(m, handlers) is None:
        raise UnsupportedModuleError(
            f"module {name!r} of type {type(m).__name__} is not supported by the "
            "CoNNect connectivity pass (supported: Linear, Conv1d/2d/3d, ChannelScaler, "
            "normalization, activation, dropout and pooling layers). Pass "
            f"handlers={{{type(m).__name__}: fn}} with fn(module, x) returning the "
            "non-negative linear image of the flow x."
        )
    if isinstance(m, _CONV_TYPES) and m.padding_mode != "zeros":
        raise UnsupportedModuleError(
            f"convolution {name!r} uses padding_mode={m.padding_mode!r}; only "
            "zero padding is supported by the connectivity pass"
        )
    if type(m) in _MAX_TO_AVG and not isinstance(m, _ADAPTIVE_MAX_TYPES) \
            and m.dilation not in (1, (1,), (1, 1), (1, 1, 1)):
        raise UnsupportedModuleError(
            f"max-pool {name!r} is dilated; average pooling (its replacement "
            "in the connectivity pass) has no dilation"
        )


def _scaled_in(obj: Any) -> list:
    """Every :class:`Scaled` inside ``obj`` (nested tuples / lists / dicts)."""
    if isinstance(obj, Scaled):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [f for o in obj for f in _scaled_in(o)]
    if isinstance(obj, dict):
        return [f for o in obj.values() for f in _scaled_in(o)]
    return []


class LeafTracer(fx.Tracer):
    """``torch.fx`` tracer that keeps modules of ``leaf_types`` (scalers, handler types) as leaves."""

    def __init__(self, leaf_types: Tuple[type, ...]):
        super().__init__()
        self._leaf_types = leaf_types

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, self._leaf_types) or super().is_leaf_module(m, qualname)


class _AppendixBPass(_Pass):
    """The node policy of the appendix-B views, on the engine's pass and :class:`Scaled` flows.

    ``params`` holds the edge map, by parameter name: ``theta = |W| / sum |W|`` (``"normalized"``)
    or the 0/1 indicators ``W != 0`` (``"effective"``) of every linear / conv weight and channel
    scaler; they are used as they are. Weighted layers drop their bias; BatchNorm, other norms,
    activations and dropout are the identity (in ``"effective"`` a BatchNorm channel whose scale
    is exactly 0 is cut); max-pools are average pools; an addition leaves out a parameter-free
    skip branch when ``skip_connections == "drop"``; ``c * x`` is a fixed edge ``|c|``; adding a
    constant is ignored. After a weighted layer the flow is renormalized (``"normalized"``) or
    clipped to {0, 1} (``"effective"``, with :class:`Binarize`, exact at any depth).
    """

    def __init__(self, model: nn.Module, params: Mapping[str, torch.Tensor], view: str,
                 graph: "AppendixBGraph", skip_connections: str = "drop"):
        super().__init__(model, params, view, "identity", {})
        self.program = graph
        self.skip_connections = skip_connections

    def param(self, name: str) -> Optional[torch.Tensor]:
        return self.params.get(name)

    def _finish(self, target: Optional[str], out: Scaled) -> Scaled:
        if self.view == "normalized":
            out = out.renormalized()
        else:
            out = Scaled(Binarize.apply(out.value), out.log_scale)
        if target is not None:
            self.layer_outputs[target] = out
        return out

    def call_module(self, target: str, args: tuple, kwargs: dict) -> Any:
        m = self.program.modules[target]
        handlers = self.program.handlers
        kind = appendix_b_module_kind(m, handlers)
        x = args[0] if args else None
        if not isinstance(x, Scaled):
            raise UnsupportedModuleError(f"module {target!r} is applied to a tensor that does not carry flow")
        if kind == "weighted":
            w = self.params[target + ".weight"]
            value = F.linear(x.value, w) if isinstance(m, nn.Linear) else m._conv_forward(x.value, w, None)
            return self._finish(target, Scaled(value, x.log_scale))
        if kind == "scaler":
            shape = [1] * x.value.dim()
            shape[m.dim % x.value.dim()] = -1
            return self._finish(target, Scaled(x.value * self.params[target + ".scale"].view(shape), x.log_scale))
        if kind == "handler":
            return self._finish(None, Scaled(handlers[type(m)](m, x.value), x.log_scale))
        if kind == "identity":
            if self.view == "effective" and isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
                shape = [1] * x.value.dim()
                shape[1 if x.value.dim() > 1 else 0] = -1
                return Scaled(x.value * (m.weight.detach() != 0).to(x.value.dtype).view(shape), x.log_scale)
            return x
        if kind == "maxpool":
            stride = m.stride if m.stride is not None else m.kernel_size
            value = _MAX_TO_AVG[type(m)](x.value, m.kernel_size, stride, m.padding, m.ceil_mode,
                                         count_include_pad=False)
            return Scaled(value, x.log_scale)
        if kind == "adaptive_maxpool":
            return Scaled(_MAX_TO_AVG[type(m)](x.value, m.output_size), x.log_scale)
        if kind == "linear":
            return Scaled(m(x.value), x.log_scale)
        _b_check_module(target, m, handlers)
        raise UnsupportedModuleError(f"module {target!r} has no rule")  # pragma: no cover

    def _scaled_by(self, x: Scaled, c: float) -> Scaled:
        """``x`` times the non-negative constant ``c`` (a fixed edge weight)."""
        if self.view == "effective":
            return x if c > 0 else Scaled(x.value * 0, x.log_scale)
        if c == 0:
            return Scaled(x.value * 0, x.log_scale)
        return Scaled(x.value, x.log_scale + math.log(c))

    def _add_flows(self, node: fx.Node, args: tuple) -> Scaled:
        operands = [a for a in args[:2] if isinstance(a, Scaled)]
        if len(operands) == 1:  # flow + constant: a bias, which connectivity ignores
            return operands[0]
        if self.skip_connections == "drop":
            ancestors = self.program.weighted_ancestors
            wa, wb = ancestors[node.args[0]], ancestors[node.args[1]]
            only_a, only_b = wa - wb, wb - wa
            if only_b and not only_a:
                return args[1]  # branch ``a`` is a parameter-free skip
            if only_a and not only_b:
                return args[0]
        (va, vb), log_scale = _aligned(operands)
        if self.view == "effective":
            return Scaled(Binarize.apply(va + vb), log_scale)
        return Scaled(va + vb, log_scale).renormalized()

    def call_function(self, node: fx.Node, args: tuple, kwargs: dict) -> Any:
        target, is_method = node.target, node.op == "call_method"
        if not _any_scaled((args, kwargs)):  # shape arithmetic: evaluated normally
            return getattr(args[0], target)(*args[1:], **kwargs) if is_method else target(*args, **kwargs)
        first = args[0] if args else None
        if target is operator.getitem and isinstance(first, (tuple, list, dict)):
            return first[args[1]]  # one output of a multi-output module
        name = target if is_method else getattr(target, "__name__", str(target))

        def is_(functions, methods=()):
            return (target in methods) if is_method else (target in functions)

        if is_(_B_IDENTITY_FUNCTIONS, _B_IDENTITY_METHODS):
            return first
        if is_(_B_LINEAR_FUNCTIONS, _B_LINEAR_METHODS) and isinstance(first, Scaled) \
                and len(_scaled_in((args, kwargs))) == 1:
            value = getattr(first.value, target)(*args[1:], **kwargs) if is_method else \
                target(first.value, *args[1:], **kwargs)
            return Scaled(value, first.log_scale)
        if not is_method and target in _B_FUNCTIONAL_MAX_TO_AVG and isinstance(first, Scaled):
            params = dict(zip(("kernel_size", "stride", "padding", "dilation", "ceil_mode"), args[1:]))
            params.update(kwargs)
            if params.get("dilation", 1) not in (1, (1,), (1, 1), (1, 1, 1)):
                raise UnsupportedModuleError(f"{name}: dilated max-pooling has no average-pool equivalent")
            value = _B_FUNCTIONAL_MAX_TO_AVG[target](
                first.value, params["kernel_size"], params.get("stride") or params["kernel_size"],
                params.get("padding", 0), params.get("ceil_mode", False), count_include_pad=False)
            return Scaled(value, first.log_scale)
        if not is_method and target in _B_FUNCTIONAL_ADAPTIVE_MAX_TO_AVG and isinstance(first, Scaled):
            size = args[1] if len(args) > 1 else kwargs["output_size"]
            return Scaled(_B_FUNCTIONAL_ADAPTIVE_MAX_TO_AVG[target](first.value, size), first.log_scale)
        if is_(_ADD, ("add", "add_")):
            return self._add_flows(node, args)
        if is_(_MUL, ("mul", "mul_")) and len(args) == 2:
            flow, c = (args[0], args[1]) if isinstance(args[0], Scaled) else (args[1], args[0])
            if isinstance(c, (int, float)) and isinstance(flow, Scaled):
                return self._scaled_by(flow, abs(c))
        if is_(_DIV, ("div", "div_")) and len(args) == 2:
            if isinstance(args[0], Scaled) and isinstance(args[1], (int, float)) and args[1] != 0:
                return self._scaled_by(args[0], 1.0 / abs(args[1]))
        if not is_method and target is torch.cat:
            tensors = args[0] if args else kwargs["tensors"]
            dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
            if all(isinstance(t, Scaled) for t in tensors):
                values, log_scale = _aligned(tensors)
                return Scaled(torch.cat(values, dim), log_scale)
        if not is_method and target is getattr:  # x.shape, x.dtype, ...
            return getattr(first.value, args[1])
        if is_method and target in ("size", "dim"):
            return getattr(first.value, target)(*args[1:], **kwargs)
        raise UnsupportedModuleError(
            f"operation {name!r} (fx node {node.name!r}) is not supported by the CoNNect "
            "connectivity pass: only activations, pooling, shape operations, additions, "
            "concatenation and multiplication by constants can act on the flow. Wrap the code in a "
            "module and pass handlers={ThatModule: fn}."
        )


class AppendixBGraph:
    """A model traced for the appendix-B views of the engine: ``"normalized"`` and ``"effective"``.

    The regularizer's connectivity (CoNNect, section 3.3 and appendix B): every linear / conv
    layer's weights as ``theta = |W| / sum |W|`` (a :class:`~connect_tp.regularizer.ChannelScaler`'s
    factors as ``|delta| / sum |delta|``), no biases, BatchNorm / norms / activations / dropout as
    the identity, max-pooling as average pooling, parameter-free skips left out
    (``skip_connections="drop"``, the paper's choice) or kept, on an all-ones input. The
    ``"effective"`` view runs the same node policy on 0/1 edges (``W != 0``) with every layer's
    output clipped to {0, 1} and a BatchNorm channel of scale exactly 0 cut: whether a path of
    non-zero weights exists (effective sparsity, layer collapse).

    Traces ``model`` once (scalers and ``handlers`` types stay leaves); every run re-reads the
    parameters, so the graph stays valid while the model trains and after in-place pruning (call
    :meth:`retrace` after replacing modules). Both views run through :func:`run_traced`.

    Args:
        model: a ``torch.fx``-traceable model.
        example_inputs: a tensor (or tuple) shaped like one input; only its shape is used.
        skip_connections: ``"drop"`` or ``"keep"`` parameter-free skip branches.
        handlers: ``{ModuleType: fn}``, ``fn(module, flow)`` a non-negative linear image of the flow.

    Raises:
        UnsupportedModuleError: the model cannot be traced or has a module without a rule.
    """

    def __init__(self, model: nn.Module, example_inputs: Any, skip_connections: str = "drop",
                 handlers: Optional[Mapping[type, Handler]] = None):
        if skip_connections not in ("drop", "keep"):
            raise ValueError(f"skip_connections must be 'drop' or 'keep', got {skip_connections!r}")
        self.model = model
        self.skip_connections = skip_connections
        self.handlers: Dict[type, Handler] = dict(handlers or {})
        inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
        for x in inputs:
            if isinstance(x, torch.Tensor) and not x.is_floating_point():
                raise ValueError(
                    f"example_inputs must be floating-point tensors (got dtype {x.dtype}); the "
                    "connectivity pass feeds an all-ones input of the same shape"
                )
        self._input_specs = [
            (tuple(x.shape[1:]), x.dtype, x.device) if isinstance(x, torch.Tensor) else x for x in inputs
        ]
        self.retrace()

    def retrace(self) -> None:
        """Re-trace the model (after modules were added, removed or replaced)."""
        try:
            graph = LeafTracer((_channel_scaler_type(),) + tuple(self.handlers)).trace(self.model)
        except Exception as exc:  # fx raises many exception types for untraceable code
            raise UnsupportedModuleError(
                f"{type(self.model).__name__} cannot be traced by torch.fx ({type(exc).__name__}: {exc}). "
                "The connectivity pass needs a traceable model: remove data-dependent control flow "
                "from forward(), or pass handlers={ModuleType: fn} so the offending module is kept "
                "as a leaf."
            ) from exc
        self.graph = graph
        self.modules = dict(self.model.named_modules())
        weighted = {n for n in graph.nodes if n.op == "call_module"
                    and _b_is_weighted(self.modules[n.target], self.handlers)}
        ancestors: Dict[fx.Node, frozenset] = {}
        for node in graph.nodes:
            found = set()
            for a in node.all_input_nodes:
                found |= ancestors[a]
            if node in weighted:
                found.add(node.target)
            ancestors[node] = frozenset(found)
        self.weighted_ancestors = ancestors
        self._weighted = [n.target for n in graph.nodes if n in weighted]
        for node in graph.nodes:
            if node.op == "call_module":
                _b_check_module(node.target, self.modules[node.target], self.handlers)

    def weighted_modules(self) -> Dict[str, nn.Module]:
        """The layers whose parameters enter the connectivity, in execution order."""
        return {name: self.modules[name] for name in self._weighted}

    def _edge_parameters(self) -> Dict[str, Tuple[str, torch.Tensor]]:
        """``{layer: (parameter name, parameter)}`` of every linear / conv layer and scaler."""
        out = {}
        for name, m in self.weighted_modules().items():
            kind = appendix_b_module_kind(m, self.handlers)
            if kind == "weighted":
                out[name] = (name + ".weight", m.weight)
            elif kind == "scaler":
                out[name] = (name + ".scale", m.scale)
        return out

    def edges(self, view: str = "normalized") -> Dict[str, torch.Tensor]:
        """The edge map of a view by layer: ``theta`` (differentiable in the weights) or 0/1 leaves
        ``W != 0`` that require grad."""
        from .regularizer.flow import normalized_abs
        for name, (_, p) in self._edge_parameters().items():
            if not bool(torch.isfinite(p.detach()).all()):  # would surface later as a vague overflow
                raise FloatingPointError(f"layer {name!r} has non-finite weights (NaN or inf): the connectivity "
                                         "of appendix B is undefined; fix the training that produced them "
                                         "(e.g. a lower learning rate) or reload a finite checkpoint")
        if view == "normalized":
            return {name: normalized_abs(p) for name, (_, p) in self._edge_parameters().items()}
        if view == "effective":
            return {name: (p.detach() != 0).to(p.dtype).requires_grad_(True)
                    for name, (_, p) in self._edge_parameters().items()}
        raise ValueError(f"unknown appendix-B view {view!r}; choose one of {APPENDIX_B_VIEWS}")

    def inputs(self) -> list:
        """The all-ones inputs, in the dtype and device of the model's parameters."""
        param = next(self.model.parameters(), None)
        out = []
        for spec in self._input_specs:
            if isinstance(spec, tuple):
                shape, dtype, device = spec
                if param is not None and param.is_floating_point():
                    dtype, device = param.dtype, param.device
                out.append(torch.ones((1,) + shape, dtype=dtype, device=device))
            else:
                out.append(spec)
        return out

    def flows(self, view: str = "normalized", edges: Optional[Mapping[str, torch.Tensor]] = None
              ) -> Tuple[list, Dict[str, Scaled]]:
        """One pass in ``view``: the output flows and the flow after every layer / scaler by name."""
        if view not in APPENDIX_B_VIEWS:
            raise ValueError(f"unknown appendix-B view {view!r}; choose one of {APPENDIX_B_VIEWS}")
        if edges is None:
            edges = self.edges(view)
        names = self._edge_parameters()
        params = {names[layer][0]: t for layer, t in edges.items()}
        out, layer_outputs = run_traced(self.model, self.inputs(), params, view, graph=self.graph,
                                        policy={"graph": self, "skip_connections": self.skip_connections})
        flows = _scaled_in(out)
        if not flows:
            raise UnsupportedModuleError("the model output does not depend on its input")
        return flows, layer_outputs

    def run(self, mode: str = "theta", record: bool = False):
        """``log phi_tot`` (``"theta"`` / ``"normalized"``; ``-inf`` if disconnected) or the number of
        reachable output units (``"reach"`` / ``"effective"``), and, if ``record``, the edge tensor
        of every layer and the flow tensor after it (``{name: tensor}``)."""
        view = {"theta": "normalized", "reach": "effective"}.get(mode, mode)
        edges = self.edges(view)
        flows, layer_outputs = self.flows(view, edges)
        if view == "normalized":
            result = torch.logsumexp(torch.stack([torch.log(f.value.sum()) + f.log_scale for f in flows]), 0)
        else:
            result = sum(f.value.sum() for f in flows)
        if not record:
            return result
        return result, dict(edges), {name: f.value for name, f in layer_outputs.items()}

    def log_connectivity(self) -> torch.Tensor:
        """``log phi_tot`` (differentiable w.r.t. the model parameters; ``-inf`` if disconnected)."""
        return self.run("normalized")

    def saliency(self) -> Dict[str, torch.Tensor]:
        """Share of ``phi_tot`` through every edge, ``theta * d log phi / d theta``, by layer."""
        edges = {name: t.detach().requires_grad_(True) for name, t in self.edges("normalized").items()}
        with torch.enable_grad():
            flows, _ = self.flows("normalized", edges)
            log_phi = torch.logsumexp(torch.stack([torch.log(f.value.sum()) + f.log_scale for f in flows]), 0)
            if not torch.isfinite(log_phi):
                return {name: torch.zeros_like(t) for name, t in edges.items()}
            grads = torch.autograd.grad(log_phi, list(edges.values()), allow_unused=True)
        return {name: (t * (g if g is not None else torch.zeros_like(t))).detach()
                for (name, t), g in zip(edges.items(), grads)}

    def reachability(self) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
        """Which parameters and units lie on an input-output path of non-zero weights.

        Returns ``(effective_params, effective_units)``: per layer / scaler a boolean tensor shaped
        like its weight (non-zero and on a path) and a boolean vector over its output channels
        (reachable from the input and reaching the output at some position).
        """
        with torch.enable_grad():
            total, masks, values = self.run("effective", record=True)
            if total.requires_grad and total.item() > 0:
                grads = torch.autograd.grad(total, list(masks.values()) + list(values.values()), allow_unused=True)
            else:
                grads = [None] * (len(masks) + len(values))
        mask_grads, value_grads = grads[: len(masks)], grads[len(masks):]
        params = {name: (m > 0) & (g > 0) if g is not None else torch.zeros_like(m, dtype=torch.bool)
                  for (name, m), g in zip(masks.items(), mask_grads)}
        scaler = _channel_scaler_type()
        units = {}
        for (name, value), g in zip(values.items(), value_grads):
            m = self.modules[name]
            dim = (m.dim if isinstance(m, scaler) else (-1 if isinstance(m, nn.Linear) else 1)) % value.dim()
            alive = (value > 0) & (g > 0) if g is not None else torch.zeros_like(value, dtype=torch.bool)
            units[name] = alive.transpose(0, dim).flatten(1).any(1)
        return params, units
