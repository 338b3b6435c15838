"""How each operation of a traced model acts on the connectivity flow (appendix B's mapping).

The rules of the modified forward pass, one operation at a time: which module types are weighted
layers (``theta = |W| / sum |W|``, no bias), which are the identity (normalization, activations,
dropout), which are linear maps applied unchanged (average pools, reshapes, sums), how max-pools
become average-pools, and how functions and tensor methods met in a ``torch.fx`` graph map a
:class:`~.flow.Flow`. Unknown operations raise :class:`UnsupportedModuleError`. This module uses
torch, ``torch.fx`` node objects, :mod:`.flow` and :mod:`.channel_scaler`; it does not walk
graphs itself, and the one graph-level rule, which branch of an addition is a parameter-free
skip, is left to :class:`~.graph.ConnectivityGraph` (passed in as ``add``).
"""
from __future__ import annotations

import math
import operator
from typing import Callable, Dict, Mapping, Optional

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .channel_scaler import ChannelScaler
from .flow import Binarize, Flow, align, flows_in, normalized_abs

__all__ = [
    "CONV_TYPES",
    "WEIGHTED_TYPES",
    "AddRule",
    "Handler",
    "UnsupportedModuleError",
    "apply_module",
    "apply_weighted",
    "call_function",
    "check_supported_module",
    "edge_weights",
    "finish_layer",
    "is_weighted_module",
    "module_kind",
    "scaled",
]

Handler = Callable[[nn.Module, torch.Tensor], torch.Tensor]
# (fx node of the addition, its evaluated args, mode) -> the summed flow
AddRule = Callable[[fx.Node, tuple, str], Flow]


class UnsupportedModuleError(TypeError):
    """Raised when the connectivity forward pass meets an operation it does not know how to map."""


CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
WEIGHTED_TYPES = (nn.Linear,) + CONV_TYPES + (ChannelScaler,)
_IDENTITY_MODULES = (
    nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm,
    nn.modules.dropout._DropoutNd, nn.Identity,
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus,
)
_MAXPOOL_TO_AVG = {nn.MaxPool1d: F.avg_pool1d, nn.MaxPool2d: F.avg_pool2d, nn.MaxPool3d: F.avg_pool3d}
_ADAPTIVE_MAX_TO_AVG = {
    nn.AdaptiveMaxPool1d: F.adaptive_avg_pool1d,
    nn.AdaptiveMaxPool2d: F.adaptive_avg_pool2d,
    nn.AdaptiveMaxPool3d: F.adaptive_avg_pool3d,
}
_LINEAR_PARAMETER_FREE_MODULES = (
    nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.Flatten, nn.Unflatten,
)
_IDENTITY_FUNCTIONS = {
    F.relu, torch.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish,
    torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.hardswish, F.hardsigmoid, F.hardtanh, F.softplus,
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
    F.batch_norm, F.layer_norm, F.group_norm, F.instance_norm,
}
_IDENTITY_METHODS = {
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "contiguous", "clone", "float",
}
# Functions / methods that are linear, non-negative maps of their first argument (shape
# manipulation, averaging and summing); they are applied to the flow unchanged.
_LINEAR_FUNCTIONS = {
    torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.squeeze, torch.unsqueeze,
    torch.mean, torch.sum, operator.getitem,
    F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
}
_LINEAR_METHODS = {
    "view", "reshape", "flatten", "permute", "transpose", "squeeze", "unsqueeze", "mean", "sum",
}
_FUNCTIONAL_MAX_TO_AVG = {
    F.max_pool1d: F.avg_pool1d, F.max_pool2d: F.avg_pool2d, F.max_pool3d: F.avg_pool3d,
}
_FUNCTIONAL_ADAPTIVE_MAX_TO_AVG = {
    F.adaptive_max_pool1d: F.adaptive_avg_pool1d,
    F.adaptive_max_pool2d: F.adaptive_avg_pool2d,
    F.adaptive_max_pool3d: F.adaptive_avg_pool3d,
}
_ADD = {operator.add, operator.iadd, torch.add}
_SCALAR_MUL = {operator.mul, operator.imul, torch.mul}
_SCALAR_DIV = {operator.truediv, operator.itruediv, torch.div}


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------
def is_weighted_module(m: nn.Module, handlers: Mapping[type, Handler]) -> bool:
    """Whether ``m``'s parameters enter the connectivity: a linear / conv layer, a scaler, or a
    handler-mapped module that has parameters."""
    return isinstance(m, WEIGHTED_TYPES) or (type(m) in handlers and any(True for _ in m.parameters(recurse=True)))


def module_kind(m: nn.Module, handlers: Mapping[type, Handler]) -> Optional[str]:
    """The rule that maps ``m``: ``"handler"``, ``"weighted"``, ``"scaler"``, ``"identity"``,
    ``"maxpool"``, ``"adaptive_maxpool"``, ``"linear"``, or ``None`` (unsupported)."""
    if type(m) in handlers:
        return "handler"
    if isinstance(m, (nn.Linear,) + CONV_TYPES):
        return "weighted"
    if isinstance(m, ChannelScaler):
        return "scaler"
    if isinstance(m, _IDENTITY_MODULES):
        return "identity"
    if type(m) in _MAXPOOL_TO_AVG:
        return "maxpool"
    if type(m) in _ADAPTIVE_MAX_TO_AVG:
        return "adaptive_maxpool"
    if isinstance(m, _LINEAR_PARAMETER_FREE_MODULES):
        return "linear"
    return None


def check_supported_module(name: str, m: nn.Module, handlers: Mapping[type, Handler]) -> None:
    """Raise :class:`UnsupportedModuleError` if the pass cannot map module ``m`` (called ``name``)."""
    if module_kind(m, handlers) is None:
        raise UnsupportedModuleError(
            f"module {name!r} of type {type(m).__name__} is not supported by the "
            "CoNNect connectivity pass (supported: Linear, Conv1d/2d/3d, ChannelScaler, "
            "normalization, activation, dropout and pooling layers). Pass "
            f"handlers={{{type(m).__name__}: fn}} with fn(module, x) returning the "
            "non-negative linear image of the flow x."
        )
    if isinstance(m, CONV_TYPES) and m.padding_mode != "zeros":
        raise UnsupportedModuleError(
            f"convolution {name!r} uses padding_mode={m.padding_mode!r}; only "
            "zero padding is supported by the connectivity pass"
        )
    if type(m) in _MAXPOOL_TO_AVG and m.dilation not in (1, (1,), (1, 1), (1, 1, 1)):
        raise UnsupportedModuleError(
            f"max-pool {name!r} is dilated; average pooling (its replacement "
            "in the connectivity pass) has no dilation"
        )


def edge_weights(m: nn.Module, mode: str) -> torch.Tensor:
    """The edge weights of a weighted layer or scaler: ``theta`` (``"theta"``) or 0/1 existing
    edges that require grad (``"reach"``)."""
    w = m.scale if isinstance(m, ChannelScaler) else m.weight
    if mode == "theta":
        return normalized_abs(w)
    return (w != 0).to(w.dtype).requires_grad_(True)  # "reach": existing edges


def apply_weighted(m: nn.Module, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Layer ``m`` applied to the flow tensor ``x`` with edge weights ``w`` and no bias."""
    if isinstance(m, nn.Linear):
        return F.linear(x, w)
    if isinstance(m, ChannelScaler):
        dim = m.dim % x.dim()
        shape = [1] * x.dim()
        shape[dim] = -1
        return x * w.view(shape)
    conv = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}[type(m)]
    return conv(x, w, None, m.stride, m.padding, m.dilation, m.groups)


def finish_layer(flow: Flow, mode: str) -> Flow:
    """After a weighted layer: rescale to unit sum (``"theta"``) or back to 0/1 (``"reach"``)."""
    if mode == "theta":
        return flow.renormalized()
    return Flow(Binarize.apply(flow.value), flow.log_scale)


def apply_module(m: nn.Module, kind: str, x: Flow, mode: str, handlers: Mapping[type, Handler]) -> Flow:
    """Map flow ``x`` through module ``m`` of any ``kind`` but ``"weighted"`` / ``"scaler"``
    (those go through :func:`edge_weights` and :func:`apply_weighted`, whose tensors the graph
    records)."""
    if kind == "handler":
        return finish_layer(Flow(handlers[type(m)](m, x.value), x.log_scale), mode)
    if kind == "identity":
        if mode == "reach" and isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
            # a BatchNorm scale of exactly 0 cuts its channel (as in the engine's reach view)
            shape = [1] * x.value.dim()
            shape[1 if x.value.dim() > 1 else 0] = -1
            return Flow(x.value * (m.weight.detach() != 0).to(x.value.dtype).view(shape), x.log_scale)
        return x
    if kind == "maxpool":
        pool = _MAXPOOL_TO_AVG[type(m)]
        stride = m.stride if m.stride is not None else m.kernel_size
        value = pool(x.value, m.kernel_size, stride, m.padding, m.ceil_mode, count_include_pad=False)
        return Flow(value, x.log_scale)
    if kind == "adaptive_maxpool":
        return Flow(_ADAPTIVE_MAX_TO_AVG[type(m)](x.value, m.output_size), x.log_scale)
    return Flow(m(x.value), x.log_scale)  # "linear": parameter-free linear modules


# --------------------------------------------------------------------------------------------
# Functions and tensor methods
# --------------------------------------------------------------------------------------------
def scaled(flow: Flow, c: float, mode: str) -> Flow:
    """``flow`` times the non-negative constant ``c`` (a fixed edge weight)."""
    if mode == "reach":
        return flow if c > 0 else Flow(flow.value * 0, flow.log_scale)
    if c == 0:
        return Flow(flow.value * 0, flow.log_scale)
    return Flow(flow.value, flow.log_scale + math.log(c))


def call_function(node: fx.Node, args: tuple, kwargs: Dict, mode: str, add: AddRule):
    """Evaluate a ``call_function`` / ``call_method`` node on evaluated ``args`` / ``kwargs``.

    Nodes that touch no flow (shape arithmetic) are evaluated normally; the others follow the
    rules above.

    Args:
        node: the ``torch.fx`` node (its ``op``, ``target`` and, for errors, ``name``).
        args: the node's arguments, with earlier nodes replaced by their values / flows.
        kwargs: the node's keyword arguments, likewise.
        mode: ``"theta"`` or ``"reach"``, see :meth:`~.graph.ConnectivityGraph.run`.
        add: what an addition does (the graph decides whether a branch is a skip to leave out).

    Returns:
        A :class:`~.flow.Flow`, or the plain value of a node that touches no flow.

    Raises:
        UnsupportedModuleError: for an operation with no rule.
    """
    target = node.target
    flows = flows_in((args, kwargs))
    if not flows:  # pure shape arithmetic (x.size(0), etc.): evaluate normally
        if node.op == "call_method":
            return getattr(args[0], target)(*args[1:], **kwargs)
        return target(*args, **kwargs)
    first = args[0] if args else None
    is_method = node.op == "call_method"
    if target is operator.getitem and isinstance(first, (tuple, list, dict)):
        return first[args[1]]  # picking one output of a multi-output module
    name = target if is_method else getattr(target, "__name__", str(target))

    if (not is_method and target in _IDENTITY_FUNCTIONS) or (is_method and target in _IDENTITY_METHODS):
        return first
    if (not is_method and target in _LINEAR_FUNCTIONS) or (is_method and target in _LINEAR_METHODS):
        if isinstance(first, Flow) and len(flows) == 1:
            rest_args = args[1:]
            if is_method:
                return Flow(getattr(first.value, target)(*rest_args, **kwargs), first.log_scale)
            return Flow(target(first.value, *rest_args, **kwargs), first.log_scale)
    if not is_method and target in _FUNCTIONAL_MAX_TO_AVG and isinstance(first, Flow):
        params = dict(zip(("kernel_size", "stride", "padding", "dilation", "ceil_mode"), args[1:]))
        params.update(kwargs)
        if params.get("dilation", 1) not in (1, (1,), (1, 1), (1, 1, 1)):
            raise UnsupportedModuleError(f"{name}: dilated max-pooling has no average-pool equivalent")
        value = _FUNCTIONAL_MAX_TO_AVG[target](
            first.value, params["kernel_size"], params.get("stride") or params["kernel_size"],
            params.get("padding", 0), params.get("ceil_mode", False), count_include_pad=False,
        )
        return Flow(value, first.log_scale)
    if not is_method and target in _FUNCTIONAL_ADAPTIVE_MAX_TO_AVG and isinstance(first, Flow):
        size = args[1] if len(args) > 1 else kwargs["output_size"]
        return Flow(_FUNCTIONAL_ADAPTIVE_MAX_TO_AVG[target](first.value, size), first.log_scale)
    if (not is_method and target in _ADD) or (is_method and target in ("add", "add_")):
        return add(node, args, mode)
    if ((not is_method and target in _SCALAR_MUL) or (is_method and target in ("mul", "mul_"))) and len(args) == 2:
        flow, c = (args[0], args[1]) if isinstance(args[0], Flow) else (args[1], args[0])
        if isinstance(c, (int, float)) and isinstance(flow, Flow):
            return scaled(flow, abs(c), mode)
    if ((not is_method and target in _SCALAR_DIV) or (is_method and target in ("div", "div_"))) and len(args) == 2:
        if isinstance(args[0], Flow) and isinstance(args[1], (int, float)) and args[1] != 0:
            return scaled(args[0], 1.0 / abs(args[1]), mode)
    if not is_method and target is torch.cat:
        tensors = args[0] if args else kwargs["tensors"]
        dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
        if all(isinstance(t, Flow) for t in tensors):
            values, ref = align(tensors)
            return Flow(torch.cat(values, dim), ref)
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
