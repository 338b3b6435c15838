"""Tracing and convolution-BatchNorm folding for the engine's pass.

:func:`traced_graph` / ``_trace``: the cached ``torch.fx`` trace of a model (``torch.nn``'s own
leaf modules) with the eval BatchNorms that alone read a convolution
(``_conv_batchnorm_pairs``); ``_AbsFoldedConv``: such a convolution run with ``|W| * scale``
rebuilt in the backward. Uses torch and ``torch.fx``.
"""
from __future__ import annotations

import weakref
from typing import Dict, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn as nn


# ------------------------------------------------------------------------------------------ tracing
_TRACES: "weakref.WeakKeyDictionary[nn.Module, Tuple[tuple, Optional[fx.Graph], Dict[str, str]]]" = \
    weakref.WeakKeyDictionary()
CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


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
    """The ``torch.fx`` graph of ``model`` (cached while its module structure is unchanged), or ``None``.

    Leaf modules are ``torch.nn``'s own, as in ``torch.fx.symbolic_trace``. Pruning in place keeps
    the graph valid: the pass reads every module and parameter afresh.
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
