"""The appendix-B views of the engine: ``"normalized"`` (the regularizer) and ``"effective"``.

The rules for every module and function of appendix B (``appendix_b_module_kind``, the
``_B_*`` tables, :class:`UnsupportedModuleError`), the leaf trace that keeps channel scalers and
handler modules (:class:`LeafTracer`), the node policy :class:`_AppendixBPass` (a subclass of the
engine's :class:`~connect_tp.engine.views._Pass`) and :class:`AppendixBGraph`, which runs
:func:`~connect_tp.engine.views.run_traced` with its edge map. Uses torch, ``torch.fx``, the rest
of the engine, and ``ChannelScaler`` / ``normalized_abs`` from :mod:`connect_tp.edges` (a module
below both the engine and the regularizer, so the engine never imports the regularizer).
"""
from __future__ import annotations

import math
import operator
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..edges import ChannelScaler, normalized_abs
from .scaled import Binarize, Scaled, _aligned, _any_scaled, _scaled_in
from .trace import CONV_TYPES
from .views import APPENDIX_B_VIEWS, _ADD, _DIV, _MAX_TO_AVG, _MUL, _Pass, run_traced


# ------------------------------------------------------------------------------ appendix-B views
# The regularizer's connectivity (section 3.3 and appendix B of the paper) and effective sparsity
# run on this same pass with their own edge maps and node policy (:class:`_AppendixBPass`), on a
# trace that keeps channel scalers and handler modules as leaves (:class:`AppendixBGraph`).
Handler = Callable[[nn.Module, torch.Tensor], torch.Tensor]


class UnsupportedModuleError(TypeError):
    """Raised when an appendix-B view meets an operation it does not know how to map."""


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
    if isinstance(m, (nn.Linear,) + CONV_TYPES):
        return "weighted"
    if isinstance(m, ChannelScaler):
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
    if isinstance(m, CONV_TYPES) and m.padding_mode != "zeros":
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
            graph = LeafTracer((ChannelScaler,) + tuple(self.handlers)).trace(self.model)
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
        scaler = ChannelScaler
        units = {}
        for (name, value), g in zip(values.items(), value_grads):
            m = self.modules[name]
            dim = (m.dim if isinstance(m, scaler) else (-1 if isinstance(m, nn.Linear) else 1)) % value.dim()
            alive = (value > 0) & (g > 0) if g is not None else torch.zeros_like(value, dtype=torch.bool)
            units[name] = alive.transpose(0, dim).flatten(1).any(1)
        return params, units
