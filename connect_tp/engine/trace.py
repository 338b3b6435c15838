"""Tracing and convolution-BatchNorm folding for the engine's pass.

:func:`traced_graph` / ``_trace``: the cached ``torch.fx`` trace of a model (``torch.nn``'s own
leaf modules; re-traced whenever a module, or a plain attribute or buffer shape that a traced
``forward`` reads, changed) with the eval BatchNorms that alone read a convolution
(``_conv_batchnorm_pairs``); ``_AbsFoldedConv``: such a convolution run with ``|W| * scale``
rebuilt in the backward. Uses torch and ``torch.fx``.
"""
from __future__ import annotations

import weakref
from typing import Any, Dict, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn as nn


# ------------------------------------------------------------------------------------------ tracing
#: Traces kept per model: one per signature, the most recent few (a model scored in eval mode and
#: measured in train mode, or alternating between two shapes, keeps both without re-tracing).
_TRACES_PER_MODEL = 2
_TRACES: "weakref.WeakKeyDictionary[nn.Module, Dict[tuple, Tuple[Optional[fx.Graph], Dict[str, str]]]]" = \
    weakref.WeakKeyDictionary()
CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_PLAIN = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device, torch.memory_format)


def _plain(value: Any) -> Any:
    """``value`` as a hashable constant when ``torch.fx`` would bake it into a trace, else ``_OPAQUE``."""
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, (tuple, list, torch.Size)):
        items = tuple(_plain(v) for v in value)
        return _OPAQUE if any(v is _OPAQUE for v in items) else (type(value).__name__, items)
    return _OPAQUE


_OPAQUE = object()


def _signature(model: nn.Module) -> tuple:
    """Everything that shapes the trace of ``model``, so a cached trace is never stale.

    ``torch.fx`` records a module that is not ``torch.nn``'s own by running its ``forward``, and
    bakes into the graph as constants the plain attributes that forward reads
    (``LayerNorm2d.normalized_shape``, an attention's ``num_heads`` and ``head_dim``) and the
    shapes of its buffers and plain tensor attributes; its parameters become ``get_attr`` nodes
    whose shapes are read when the graph runs. Pruning in place changes those attributes and
    shapes. The signature therefore holds, per traced module: its name and type, every attribute
    of a plain type (numbers, strings, flags, dtypes, tuples of them; ``training`` included, as a
    ``forward`` may branch on it), the shape and dtype of every buffer and plain tensor
    attribute, and which parameters exist. A leaf module (``torch.nn``'s own) is one
    ``call_module`` node whose state the pass reads afresh, so only its type and which buffers it
    has count (the BatchNorm folding needs running statistics). Pruning a ResNet therefore keeps
    its trace, while pruning a ConvNeXt's ``LayerNorm2d`` re-traces it.
    """
    tracer = fx.Tracer()
    parts = []
    for name, m in model.named_modules():
        if m is not model and tracer.is_leaf_module(m, name):
            parts.append((name, type(m), tuple(k for k, b in m._buffers.items() if b is not None)))
            continue
        attrs = []
        for key, value in vars(m).items():
            if isinstance(value, torch.Tensor):
                attrs.append((key, tuple(value.shape), value.dtype))
            else:
                value = _plain(value)
                if value is not _OPAQUE:
                    attrs.append((key, value))
        buffers = tuple((k, None if b is None else (tuple(b.shape), b.dtype)) for k, b in m._buffers.items())
        params = tuple((k, p is None) for k, p in m._parameters.items())
        parts.append((name, type(m), tuple(attrs), buffers, params))
    return tuple(parts)


def _trace(model: nn.Module) -> Tuple[Optional[fx.Graph], Dict[str, str]]:
    signature = _signature(model)
    cached = _TRACES.setdefault(model, {})
    if signature in cached:
        cached[signature] = cached.pop(signature)  # most recently used last
        return cached[signature]
    try:
        graph: Optional[fx.Graph] = fx.Tracer().trace(model)
    except Exception:  # fx raises many exception types for untraceable code
        graph = None
    fused = _conv_batchnorm_pairs(model, graph) if graph is not None else {}
    cached[signature] = (graph, fused)
    while len(cached) > _TRACES_PER_MODEL:
        del cached[next(iter(cached))]
    return graph, fused


def _conv_batchnorm_pairs(model: nn.Module, graph: fx.Graph) -> Dict[str, str]:
    """``{conv node name: BatchNorm node name}`` for each eval BatchNorm that alone reads a convolution.

    The pass folds such a BatchNorm into the convolution's weights (``|W| * scale`` and the shifted
    bias), which gives the same values and gradients and saves one activation per layer.
    """
    modules = dict(model.named_modules())
    pairs = {}
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), CONV_TYPES):
            continue
        users = list(node.users)
        if len(users) != 1 or users[0].op != "call_module" or users[0].args[:1] != (node,):
            continue
        bn = modules.get(users[0].target)
        if isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.running_mean is not None and len(users[0].args) == 1:
            pairs[node.name] = users[0].name
    return pairs


def traced_graph(model: nn.Module) -> Optional[fx.Graph]:
    """The ``torch.fx`` graph of ``model``, or ``None`` when ``torch.fx`` cannot trace it.

    Leaf modules are ``torch.nn``'s own, as in ``torch.fx.symbolic_trace``. The graph is cached
    under the model's :func:`_signature` (modules, and what the trace bakes in: plain attributes
    and buffer shapes of the modules it runs through), so pruning in place, which changes
    attributes such as ``normalized_shape``, gives a fresh trace; the pass reads every leaf
    module and parameter afresh.
    """
    return _trace(model)[0]

# ------------------------------------------------------------------------- conv-BatchNorm folding
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
