"""The engine's pass and the ``"signal"``, ``"structure"`` and ``"reach"`` views.

:class:`_Pass` is the node policy of those three views (the operation tables it dispatches on are
here too); :func:`run_traced` runs a traced graph in any of the five views (:data:`VIEWS`; the
appendix-B ones with :class:`~connect_tp.engine.appendix_b._AppendixBPass`, imported when they
run); :func:`output_flow` picks the flow that connectivity sums and :func:`layer_flows` is the
layer report's structure and reach pass. Uses torch, ``torch.fx`` and :mod:`.scaled`, :mod:`.trace`.
"""
from __future__ import annotations

import collections
import math
import operator
from typing import Any, Dict, Mapping, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from .scaled import (Binarize, NeedsFallback, Scaled, _add, _affine, _aligned, _any_scaled, _clamp, _div,
                     _is_scaled, _materialize, _mul, _multilinear, _scaled_in, _wrap)
from .trace import CONV_TYPES, _AbsFoldedConv, _conv_batchnorm_pairs, _refolds, _trace
from . import rules

VIEWS = ("signal", "structure", "reach", "normalized", "effective")  # the last two: see AppendixBGraph
APPENDIX_B_VIEWS = ("normalized", "effective")  # run through appendix_b.AppendixBGraph


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
    nn.PixelShuffle, nn.PixelUnshuffle, nn.ChannelShuffle, nn.Upsample,
)


def _is_eval_identity(target: Any) -> bool:
    """A function that is the identity in eval mode (torchvision's ``stochastic_depth``)."""
    return getattr(target, "__name__", None) == "stochastic_depth" and \
        str(getattr(target, "__module__", "")).startswith("torchvision")


_RMS_NORM = (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()


_MAX_TO_AVG = {
    nn.MaxPool1d: F.avg_pool1d, nn.MaxPool2d: F.avg_pool2d, nn.MaxPool3d: F.avg_pool3d,
    nn.AdaptiveMaxPool1d: F.adaptive_avg_pool1d, nn.AdaptiveMaxPool2d: F.adaptive_avg_pool2d,
    nn.AdaptiveMaxPool3d: F.adaptive_avg_pool3d,
}


# ------------------------------------------------------------------------------------------ the pass
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
        # all-zero weights measured as all-ones in the signal view (rules.zero_initialised)
        self.zero_init = rules.zero_initialised(model, params) if view == "signal" else set()

    # -- parameters in this view
    def param(self, name: str) -> Optional[torch.Tensor]:
        if name not in self.params:
            return None
        if self.view == "reach":
            return self.params[name]  # already the 0/1 edge indicators (see run_traced)
        if name not in self._abs:
            p = self.params[name]
            # p is 0 there: |p| + 1 is all-ones and keeps the (zero) gradient to p
            self._abs[name] = p.abs() + 1.0 if name in self.zero_init else p.abs()
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
        if isinstance(m, CONV_TYPES):
            raw = self.params.get(prefix + "weight") if self.view != "reach" else None
            refold = _refolds(m, raw) and prefix + "weight" not in self.zero_init
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
        if isinstance(m, nn.Hardtanh):  # ReLU6 included; the ceiling is open (rules.open_clamp)
            return self.node(rules.open_clamp(x, m.min_val, m.max_val))
        if isinstance(m, nn.PReLU) and self.view != "reach":  # positively homogeneous, slope |a| below 0
            return self.node(Scaled(F.prelu(x.value, self.param(prefix + "weight")), x.log_scale))
        if self.view == "reach" and type(m) in _MAX_TO_AVG:
            # a max passes on one input per window; reachability needs every non-zero input
            if isinstance(m, (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)):
                return self.node(Scaled(_MAX_TO_AVG[type(m)](x.value, m.output_size)))
            stride = m.stride if m.stride is not None else m.kernel_size
            return self.node(Scaled(_MAX_TO_AVG[type(m)](x.value, m.kernel_size, stride, m.padding, m.ceil_mode,
                                                         count_include_pad=False)))
        if isinstance(m, _PARAMETER_FREE_MODULES):
            return self.node(Scaled(m(x.value), x.log_scale))
        if isinstance(m, (nn.LayerNorm, nn.GroupNorm) + _RMS_NORM) and self.view == "signal":
            return self.norm(m, prefix, x)
        if self.view == "signal" and type(m) in rules.RELU_LIKE_MODULES:
            return rules.relu_like(x, *rules.RELU_LIKE_MODULES[type(m)](m))
        if self.view == "signal" and isinstance(m, rules.GATE_MODULES):
            return rules.gate(x)
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
        gamma = self.param(prefix + "weight") if m.affine else None
        beta = self.param(prefix + "bias") if m.affine else None
        return self.bn_scale_shift(self.buffers[prefix + "running_mean"], self.buffers[prefix + "running_var"],
                                   gamma, beta, m.eps, dtype)

    def bn_scale_shift(self, mean: torch.Tensor, var: torch.Tensor, gamma: Optional[torch.Tensor],
                       beta: Optional[torch.Tensor], eps: float,
                       dtype: torch.dtype) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """BatchNorm with running statistics as ``x * scale + shift`` in this view (``bn_flow`` in the
        signal view; the linear scale ``|gamma| / sigma`` in the others); ``None``: 1 or 0."""
        mode = self.bn_flow if self.view == "signal" else "scale"
        if mode == "identity":
            return None, None
        shift = None
        if mode == "gamma":
            scale = gamma
        else:
            inv_std = torch.rsqrt(var + eps).to(dtype)
            scale = inv_std if gamma is None else gamma * inv_std
            if mode == "stats":
                shift = -mean.to(dtype) * scale
                if beta is not None:
                    shift = shift + beta
        if self.view == "reach" and scale is not None:
            scale = (scale != 0).to(dtype)
        return scale, shift

    def batchnorm(self, m: nn.Module, prefix: str, x: Scaled) -> Scaled:
        if self.folded.get(prefix[:-1]):
            return x  # already folded into the convolution that feeds it
        return self.scale_shift(x, *self.bn_affine(m, prefix, x.value.dtype))

    def scale_shift(self, x: Scaled, scale: Optional[torch.Tensor], shift: Optional[torch.Tensor]) -> Scaled:
        """``x * scale + shift`` per channel (dimension 1); ``None`` is 1 or 0."""
        if scale is None and shift is None:
            return x
        shape = (1, -1) + (1,) * (x.value.dim() - 2)
        linear = (lambda v: v) if scale is None else (lambda v: v * scale.view(shape))
        return self.node(_affine(x, linear, None if shift is None else shift.view(shape)))

    def functional_batchnorm(self, x: Scaled, args: tuple, kwargs: dict) -> Scaled:
        """``F.batch_norm`` with running statistics (timm's BatchNormAct2d): as a BatchNorm module.

        The pass is an eval pass, so the running statistics are used whatever ``training`` flag
        the trace recorded; without them (batch statistics) it is evaluated as it is.
        """
        def arg(i: int, name: str, default: Any = None) -> Any:
            return args[i] if len(args) > i else kwargs.get(name, default)

        mean, var, gamma, beta = arg(1, "running_mean"), arg(2, "running_var"), arg(3, "weight"), arg(4, "bias")
        eps = arg(7, "eps", 1e-5)
        if mean is None or var is None:
            return _wrap(F.batch_norm(x.materialized(), mean, var, gamma, beta, True, 0.0, eps))
        scale, shift = self.bn_scale_shift(mean, var, gamma, beta, eps, x.value.dtype)
        return self.scale_shift(x, scale, shift)

    def norm(self, m: nn.Module, prefix: str, x: Scaled) -> Scaled:
        """LayerNorm / GroupNorm / RMSNorm without centering (:func:`.rules.uncentered_norm`)."""
        w, b = self.param(prefix + "weight"), self.param(prefix + "bias")
        if isinstance(m, nn.GroupNorm):
            return rules.group_norm(x, m.num_groups, w, b, m.eps)
        eps = getattr(m, "eps", None)
        eps = torch.finfo(x.value.dtype).eps if eps is None else eps
        return rules.layer_norm(x, m.normalized_shape, w, b, eps)

    def generic_module(self, m: nn.Module, prefix: str, args: tuple, kwargs: dict) -> Any:
        """Any other module: evaluated on plain values with |parameters|."""
        own = {n: self.param(prefix + n) for n, _ in m.named_parameters()}
        own.update({n: b for n, b in m.named_buffers()})
        try:
            plain_args, plain_kwargs = _materialize(args), _materialize(kwargs)
        except NeedsFallback as exc:
            raise NeedsFallback(f"module {prefix[:-1]!r} ({type(m).__name__}) has no signal-flow rule, and {exc}") from None
        return _wrap(functional_call(m, own, plain_args, plain_kwargs))

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
        if is_(_DROPOUT) or (not is_method and _is_eval_identity(target)):
            return first  # the pass is an eval pass, whatever training flag the trace recorded
        if is_({F.hardtanh, F.relu6}) and _is_scaled(first):  # the ceiling is open (rules.open_clamp)
            if target is F.relu6:
                return self.node(rules.open_clamp(first, 0.0, 6.0))
            low = args[1] if len(args) > 1 else kwargs.get("min_val", -1.0)
            high = args[2] if len(args) > 2 else kwargs.get("max_val", 1.0)
            return self.node(rules.open_clamp(first, low, high))
        if is_({torch.clamp}, ("clamp", "clamp_")) and _is_scaled(first) and not _any_scaled(args[1:]):
            low = args[1] if len(args) > 1 else kwargs.get("min")
            high = args[2] if len(args) > 2 else kwargs.get("max")
            if not isinstance(low, torch.Tensor) and not isinstance(high, torch.Tensor):
                return self.node(rules.open_clamp(first, low, high))
        if is_({torch.cat, torch.stack}) and isinstance(first, (list, tuple)) and any(_is_scaled(t) for t in first) \
                and all(_is_scaled(t) or isinstance(t, torch.Tensor) for t in first):
            if all(_is_scaled(t) for t in first):
                values, log_scale = _aligned(first)
                return Scaled(target(values, *args[1:], **kwargs), log_scale)
            return rules.concat(target, list(first), args[1:], kwargs)  # constants: rescaled with the flow
        if self.view == "signal" and _is_scaled(first) and not _any_scaled((args[1:], kwargs)):
            if is_(rules.RELU_LIKE_FUNCTIONS, rules.RELU_LIKE_METHODS):
                return rules.relu_like(first, *rules.relu_like_function(target, args, kwargs))
            if is_(rules.GATE_FUNCTIONS, rules.GATE_METHODS):
                return rules.gate(first)
        if is_({F.batch_norm}) and _is_scaled(first) and not _any_scaled((args[1:], kwargs)):
            return self.functional_batchnorm(first, args, kwargs)
        if self.view == "signal" and is_(rules.NORM_FUNCTIONS) and _is_scaled(first) \
                and not _any_scaled((args[1:], kwargs)):
            return rules.norm_function(target, first, args, kwargs)
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
        try:
            plain_args, plain_kwargs = _materialize(args), _materialize(kwargs)
        except NeedsFallback as exc:
            label = target if is_method else getattr(target, "__name__", str(target))
            raise NeedsFallback(f"operation {label!r} (node {node.name!r}) has no signal-flow rule, and {exc}") from None
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
    inspect: Optional[Any] = None,
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
        inspect: called as ``inspect(node, value, args, kwargs)`` after every computed node, with
            the node's input values (it may raise to stop the pass; :func:`affine_on_samples` uses it).

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
    if fused:
        calls = collections.Counter(n.target for n in graph.nodes if n.op == "call_module")
        if len(set(fused.values())) != len(fused) or any(calls[c] + calls[b] != 2 for c, b in fused.items()):
            fused = {}  # a module called more than once: no folding
    if params is None:
        params = dict(model.named_parameters())
        if view == "reach":
            params = {n: (p.detach() != 0).to(p.dtype) for n, p in params.items()}
    if view in APPENDIX_B_VIEWS:
        from .appendix_b import _AppendixBPass  # imported on use: appendix_b imports this module
        run = _AppendixBPass(model, params, view, **policy)
    else:
        run = _Pass(model, params, view, bn_flow, fused)
    run.keep_layer_outputs = layer_outputs
    # a softmax / log-softmax / sigmoid that the model returns is measured on its input (rules.py)
    output_activations = rules.output_activations(model, graph) if view == "signal" else {}
    skipped = []
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
            if run.zero_init:
                rules.warn_once(model, rules.zero_initialised_message(run.zero_init))
            if skipped:
                rules.warn_once(model, rules.output_activation_message(skipped))
            return args[0], run.layer_outputs
        if node.op == "get_attr":
            value = run.param(node.target)
            if value is None:
                obj: Any = model
                for part in node.target.split("."):
                    obj = getattr(obj, part)
                value = obj
            env[node] = value
        elif node in output_activations and args and _is_scaled(args[0]):
            env[node] = args[0]
            skipped.append(output_activations[node])
        elif node.op == "call_module":
            env[node] = run.call_module(node.target, args, kwargs)
        else:
            env[node] = run.call_function(node, args, kwargs)
        if inspect is not None:
            inspect(node, env[node], args, kwargs)
        for used in dead_after.get(node, ()):
            env.pop(used, None)
    raise RuntimeError("fx graph has no output node")  # pragma: no cover


class _NotAffine(Exception):
    """Raised inside :func:`affine_on_samples`'s pass at the first node that is not affine on the samples."""


def affine_on_samples(model: nn.Module, samples: torch.Tensor, params: Mapping[str, torch.Tensor],
                      bn_flow: str) -> bool:
    """Whether the signal flow is affine on the convex hull of ``samples`` (a batch of inputs).

    Then the mean over the samples of any output, and its gradient by the parameters, are those of
    the one mean input, so :class:`~connect_tp.importance.ConnectImportance` differentiates one
    sample instead of ``n``. The test: one pass without gradients on the samples, in which every
    node must be affine by itself (convolutions, linear layers, eval BatchNorm, sums, average
    pooling, reshapes, a product with a constant) or piecewise linear with every sample on the
    same piece: a ReLU (or leaky ReLU) input never positive for one sample and negative for
    another, a clamp's input never on both sides of either bound, a max-pool choosing the same
    entry of every window for every sample. The pieces are convex, so the whole hull then runs on
    them and the flow is affine there; any other operation (a norm, a product of two flows, a smooth
    activation, a BatchNorm without running statistics) fails the test and the caller
    differentiates every sample. Exact: no tolerance. The pass keeps nothing alive and stops at
    the first node that fails.
    """
    n = samples.shape[0]

    def check(node: fx.Node, value: Any, args: tuple, kwargs: dict) -> None:
        if not _scaled_in(value):
            return  # sizes, dtypes: no flow
        kind, x, low, high = _piece_rule(model, node, args, kwargs)
        if kind == "linear":
            return
        if kind is None or not isinstance(x, Scaled) or x.value.dim() == 0 or x.value.shape[0] != n:
            raise _NotAffine(node.name)
        v = x.value
        if kind == "maxpool":
            indices = _max_pool_indices(model, node, v, args, kwargs)
            if indices is None or not bool((indices == indices[:1]).all()):
                raise _NotAffine(node.name)
            return
        lowest = highest = None  # per unit, over the samples: one reduction for both kinks
        for bound in (low, high):  # a kink: no sample strictly on each side of it
            if bound is None:
                continue
            try:
                threshold = bound * math.exp(-x.log_scale) if bound else 0.0
            except OverflowError:
                threshold = math.copysign(math.inf, bound)
            if lowest is None:
                lowest, highest = torch.aminmax(v, dim=0)
            if bool(((highest > threshold) & (lowest < threshold)).any()):
                raise _NotAffine(node.name)

    with torch.no_grad():
        try:
            run_traced(model, samples, params, "signal", bn_flow, layer_outputs=False, inspect=check)
        except _NotAffine:
            return False
    return True


def affine_by_signs(model: nn.Module, bn_flow: str, graph: Optional[fx.Graph] = None) -> bool:
    """Whether the signal flow is affine on all non-negative inputs, proved from the graph alone (no pass).

    A sufficient condition for :func:`affine_on_samples` that costs no forward pass: in the signal
    view every weight, bias and (with ``bn_flow`` ``"gamma"``, ``"scale"`` or ``"identity"``) BatchNorm
    factor is non-negative, so convolutions, linear layers, BatchNorm, sums, concatenations, average pooling
    and reshapes map non-negative flows to non-negative flows (exactly, in floating point too: sums
    and products of non-negative numbers never round below zero), and a ReLU (or leaky ReLU) that
    only sees non-negative inputs is the identity. If every ReLU of the graph is reached by
    non-negative flows only, and every other node is one of those or affine by itself, then the
    flow is affine on the whole non-negative orthant, which holds the uniform [0, 1) samples. A
    max-pool, a clamp with an upper bound, a subtraction or a product with a tensor before a ReLU,
    BatchNorm with ``"stats"`` (its shift ``-mean * scale`` can be negative) and any operation
    without a rule here make the answer ``False``: the caller then runs the sample test.
    """
    graph = graph if graph is not None else _trace(model)[0]
    if graph is None:
        return False
    nonneg: Dict[fx.Node, bool] = {}  # flow nodes only: whether the flow is known to be >= 0
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        return False  # which inputs carry the flow is known at run time only
    for node in graph.nodes:
        if node.op == "placeholder":
            nonneg[node] = True
            continue
        if node.op == "output":
            return True
        flows = [a for a in node.all_input_nodes if a in nonneg]
        if not flows or node.op == "get_attr":
            continue  # sizes, constants: no flow
        if node.op == "call_method" and node.target in _SHAPE_METHODS or \
                node.op == "call_function" and node.target is getattr:
            continue  # x.size(), x.shape: numbers, not flow
        rule = _sign_rule(model, node, bn_flow)
        if node.op != "call_module" and node.target in _PRODUCTS:
            operands = [a for a in list(node.args) + list(node.kwargs.values()) if isinstance(a, fx.Node) and a in nonneg]
            if len(operands) != 1 or node.args[:1] != (operands[0],):
                return False  # a product of two flows (x * x too), or a flow in a denominator: not affine
        inputs_nonneg = all(nonneg[a] for a in flows)
        if rule == "keeps" and node.op == "call_function" and node.target in (torch.cat, torch.stack):
            tensors = node.args[0] if node.args else node.kwargs.get("tensors", ())
            if not isinstance(tensors, (list, tuple)) or any(not isinstance(t, fx.Node) or t not in nonneg
                                                              for t in tensors):
                nonneg[node] = False  # a constant tensor (coordinates, padding) of unknown sign
                continue
        if rule == "keeps":
            nonneg[node] = inputs_nonneg and _constants_nonneg(node, flows)
        elif rule == "relu" and inputs_nonneg and len(flows) == 1:
            nonneg[node] = True
        elif rule == "linear":
            nonneg[node] = False
        else:
            return False  # a kink some input may cross, or an operation not known to be affine
    return False  # pragma: no cover (fx graphs end with an output node)


_SHAPE_METHODS = {"size", "dim", "numel"}
_ARITHMETIC = _ADD | _MUL | _DIV | {"add", "add_", "mul", "mul_", "div", "div_"}
_PRODUCTS = _MUL | _DIV | {"mul", "mul_", "div", "div_"}
# flow operations whose output is >= 0 when their flow inputs and other arguments are (modules:
# _LINEAR_MODULES, whose only additive constant is a constant pad's value)
_SIGN_KEEPING_FUNCTIONS = {
    torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.squeeze, torch.unsqueeze,
    torch.mean, torch.sum, torch.flip, torch.roll, operator.getitem, torch.cat, torch.stack,
    F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
} | _ADD | _MUL | _DIV | _DROPOUT | _SPLITTING
_SIGN_KEEPING_METHODS = (_HOMOGENEOUS_METHODS - {"relu", "relu_"}) | _SPLITTING_METHODS \
    | {"add", "add_", "mul", "mul_", "div", "div_", "type_as", "to", "float", "double", "half"}


def _sign_rule(model: nn.Module, node: fx.Node, bn_flow: str) -> Optional[str]:
    """For :func:`affine_by_signs`: ``"keeps"`` (>= 0 in, >= 0 out), ``"relu"``, ``"linear"`` (affine,
    sign unknown) or ``None`` (not known to be affine)."""
    target = node.target
    if node.op == "call_module":
        m = model.get_submodule(target)
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if m.running_mean is None:
                return None  # batch statistics: not affine
            return "keeps" if bn_flow in ("gamma", "scale", "identity") else "linear"
        if isinstance(m, (nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d)):
            return "keeps" if m.value >= 0 else "linear"
        if isinstance(m, _LINEAR_MODULES):  # |W|, |b|: no negative constant
            return "keeps"
        if isinstance(m, nn.Upsample):  # nearest and (bi/tri)linear: convex combinations; bicubic is not
            return "keeps" if m.mode in ("nearest", "linear", "bilinear", "trilinear") else "linear"
        if isinstance(m, (nn.ReLU, nn.LeakyReLU, nn.PReLU)):
            return "relu"
        if isinstance(m, nn.Hardtanh):  # ReLU6 included
            return _clamp_sign_rule(m.min_val, m.max_val)
        return None
    if node.op == "call_method":
        if target in ("relu", "relu_"):
            return "relu"
        if target in ("clamp", "clamp_"):
            return _clamp_sign_rule(*_clamp_bounds(node.args, node.kwargs))
        return "keeps" if target in _SIGN_KEEPING_METHODS else None
    if node.op != "call_function":
        return None
    if target in _RELU_FUNCTIONS:
        return "relu"
    if target is F.relu6:
        return "relu"
    if target is F.hardtanh:
        return _clamp_sign_rule(node.args[1] if len(node.args) > 1 else node.kwargs.get("min_val", -1.0),
                                node.args[2] if len(node.args) > 2 else node.kwargs.get("max_val", 1.0))
    if target is torch.clamp:
        return _clamp_sign_rule(*_clamp_bounds(node.args, node.kwargs))
    if target in _SIGN_KEEPING_FUNCTIONS:
        return "keeps"
    if target in _SUB or target in _CONV_FUNCTIONS or target is F.linear or target in (operator.neg, torch.neg):
        return "linear"  # affine in the flow (a weight passed as a tensor need not be |W|)
    return None


def _clamp_bounds(args: tuple, kwargs: dict) -> tuple:
    return (args[1] if len(args) > 1 else kwargs.get("min"), args[2] if len(args) > 2 else kwargs.get("max"))


def _clamp_sign_rule(low: Any, high: Any) -> Optional[str]:
    """A clamp whose floor is <= 0 (or absent) and whose ceiling the signal view opens is the
    identity on flows >= 0, as a ReLU is (``"relu"``); anything else is a kink they can cross."""
    numbers = all(b is None or (isinstance(b, (int, float)) and not isinstance(b, bool)) for b in (low, high))
    if not numbers or rules.open_high(low, high) is not None or (low is not None and low > 0):
        return None
    return "relu"


def _constants_nonneg(node: fx.Node, flows: list) -> bool:
    """Whether a sign-keeping node's other operands are non-negative numbers (or absent)."""
    if node.op == "call_module" or node.target not in _ARITHMETIC:
        return True  # reshapes, pooling, layers: no operand adds to or scales the flow
    for a in list(node.args) + list(node.kwargs.values()):
        if isinstance(a, fx.Node):
            if a in flows:
                continue
            return False  # a tensor operand of unknown sign
        if not (isinstance(a, (int, float)) and not isinstance(a, bool) and a >= 0):
            return False  # a negative number, or anything else that is not a number >= 0
    return True


_LINEAR_MODULES = CONV_TYPES + (
    nn.Linear, nn.Identity, nn.Dropout, nn.modules.dropout._DropoutNd,
    nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.Flatten, nn.Unflatten, nn.ZeroPad2d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d,
    nn.PixelShuffle, nn.PixelUnshuffle, nn.ChannelShuffle,
)
_MAX_POOL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d,
                     nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
_RELU_FUNCTIONS = {torch.relu, F.relu, F.leaky_relu}
_MAX_POOL_FUNCTIONS = {F.max_pool1d, F.max_pool2d, F.max_pool3d,
                       F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d}
# affine in the flow (constant padding, nearest / linear interpolation included)
_LINEAR_FUNCTIONS = (_HOMOGENEOUS_FUNCTIONS - _RELU_FUNCTIONS - _MAX_POOL_FUNCTIONS) | _ADD | _SUB | _DROPOUT \
    | _SPLITTING | {torch.cat, torch.stack, operator.neg, torch.neg}
_LINEAR_METHODS = (_HOMOGENEOUS_METHODS - {"relu", "relu_"}) | _SPLITTING_METHODS \
    | {"add", "add_", "sub", "sub_", "neg", "type_as", "to", "float", "double", "half"}


def _piece_rule(model: nn.Module, node: fx.Node, args: tuple, kwargs: dict) -> Tuple[Optional[str], Any, Any, Any]:
    """``(kind, flow input, low, high)`` of a node for :func:`affine_on_samples`.

    ``kind`` is ``"linear"``, ``"kinks"`` (kinks at ``low`` and ``high``), ``"maxpool"`` or
    ``None`` (not piecewise linear, or not known to be).
    """
    first = args[0] if args else None
    target = node.target
    if node.op == "call_module":
        m = model.get_submodule(target)
        if isinstance(m, nn.modules.batchnorm._BatchNorm):  # eval statistics: affine; batch statistics: not
            return ("linear" if m.running_mean is not None else None), first, None, None
        if isinstance(m, _LINEAR_MODULES) or isinstance(m, nn.Upsample):
            return "linear", first, None, None
        if isinstance(m, (nn.ReLU, nn.LeakyReLU, nn.PReLU)):
            return "kinks", first, 0.0, None
        if isinstance(m, nn.Hardtanh):  # ReLU6 included; the signal view opens the ceiling
            return "kinks", first, m.min_val, rules.open_high(m.min_val, m.max_val)
        if isinstance(m, _MAX_POOL_MODULES):
            return "maxpool", first, None, None
        return None, first, None, None
    flows = _scaled_in((args, kwargs))
    if node.op == "call_method":
        name = target
        if name in _LINEAR_METHODS:
            return "linear", first, None, None
        if name in ("relu", "relu_"):
            return "kinks", first, 0.0, None
        if name in ("mul", "mul_", "div", "div_", "matmul") and len(flows) == 1:
            return "linear", first, None, None
        if name in ("clamp", "clamp_") and not isinstance(args[1] if len(args) > 1 else None, torch.Tensor):
            low = args[1] if len(args) > 1 else kwargs.get("min")
            high = args[2] if len(args) > 2 else kwargs.get("max")
            if not isinstance(high, torch.Tensor):
                return "kinks", first, low, rules.open_high(low, high)
        return None, first, None, None
    if node.op != "call_function":
        return "linear", first, None, None
    if target in _RELU_FUNCTIONS:
        return "kinks", first, 0.0, None
    if target is F.relu6:
        return "kinks", first, 0.0, None
    if target is F.hardtanh:
        low = args[1] if len(args) > 1 else kwargs.get("min_val", -1.0)
        high = args[2] if len(args) > 2 else kwargs.get("max_val", 1.0)
        return "kinks", first, low, rules.open_high(low, high)
    if target is torch.clamp:
        low = args[1] if len(args) > 1 else kwargs.get("min")
        high = args[2] if len(args) > 2 else kwargs.get("max")
        if not isinstance(low, torch.Tensor) and not isinstance(high, torch.Tensor):
            return "kinks", first, low, rules.open_high(low, high)
        return None, first, None, None
    if target in _MAX_POOL_FUNCTIONS:
        return "maxpool", first, None, None
    if target in _CONV_FUNCTIONS or target is F.linear:  # the weight must be a constant
        return ("linear" if len(flows) == 1 and _is_scaled(first) else None), first, None, None
    if target in _LINEAR_FUNCTIONS:
        return "linear", first, None, None
    if (target in _MUL or target in _DIV or target in _MULTILINEAR) and len(flows) == 1:
        return "linear", first, None, None
    return None, first, None, None


def _max_pool_indices(model: nn.Module, node: fx.Node, v: torch.Tensor, args: tuple,
                      kwargs: dict) -> Optional[torch.Tensor]:
    """The entry each window of a max-pool node picks, per sample (``None``: cannot tell)."""
    try:
        if node.op == "call_module":
            m = model.get_submodule(node.target)
            if isinstance(m, (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)):
                fn = {nn.AdaptiveMaxPool1d: F.adaptive_max_pool1d, nn.AdaptiveMaxPool2d: F.adaptive_max_pool2d,
                      nn.AdaptiveMaxPool3d: F.adaptive_max_pool3d}[type(m)]
                return fn(v, m.output_size, return_indices=True)[1]
            fn = {nn.MaxPool1d: F.max_pool1d, nn.MaxPool2d: F.max_pool2d, nn.MaxPool3d: F.max_pool3d}[type(m)]
            return fn(v, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode, return_indices=True)[1]
        plain_args = (v,) + tuple(_materialize(args[1:]))
        plain_kwargs = {k: w for k, w in _materialize(kwargs).items() if k != "return_indices"}
        return node.target(*plain_args, **plain_kwargs, return_indices=True)[1]
    except (TypeError, KeyError, RuntimeError):
        return None


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
    layers = {name: m for name, m in model.named_modules() if isinstance(m, (nn.Linear,) + CONV_TYPES)}
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


def locate_flow_loss(model: nn.Module, inputs: Any, params: Optional[Mapping[str, torch.Tensor]] = None,
                     bn_flow: str = "stats") -> Dict[str, str]:
    """Where the signal flow first vanishes and where it first turns negative, for error messages.

    One pass without gradients. ``"vanishes"``: the first node whose flow is zero in every entry
    while a flow it reads is not; ``"negative"``: the first node whose flow has a negative entry
    while the flows it reads have none. Each is described as ``'name' (Type)`` for a module, or
    ``the function f (node n)``. Returns the keys it found (an empty dict when the model cannot be
    traced or nothing was found).
    """
    found: Dict[str, str] = {}

    def describe(node: fx.Node) -> str:
        if node.op == "call_module":
            return f"{node.target!r} ({type(model.get_submodule(node.target)).__name__})"
        label = node.target if node.op == "call_method" else getattr(node.target, "__name__", str(node.target))
        return f"the function {label} (node {node.name!r})"

    def check(node: fx.Node, value: Any, args: tuple, kwargs: dict) -> None:
        outs, ins = _scaled_in(value), _scaled_in((args, kwargs))
        if not outs or not ins:
            return
        if "vanishes" not in found and all(not bool(o.value.any()) for o in outs) \
                and any(bool(i.value.any()) for i in ins):
            found["vanishes"] = describe(node)
        if "negative" not in found and any(bool((o.value < 0).any()) for o in outs) \
                and not any(bool((i.value < 0).any()) for i in ins):
            found["negative"] = describe(node)

    try:
        with torch.no_grad():
            run_traced(model, inputs, params, "signal", bn_flow, layer_outputs=False, inspect=check)
    except Exception:  # a courtesy for an error message: never raise from here
        pass
    return found
