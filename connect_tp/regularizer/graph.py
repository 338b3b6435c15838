"""The modified forward pass of appendix B, run on a ``torch.fx`` trace of a model.

:class:`ConnectivityGraph` traces a model once and, on every call, walks the trace with a
:class:`~.flow.Flow` in place of activations: the rules for each operation come from
:mod:`.op_rules`, and the graph adds what only the whole trace knows, namely which branch of an
addition is a parameter-free skip (left out, as in the paper) and which tensors to record for
saliency and reachability. From one pass it derives ``log phi_tot``, SynFlow-style saliency and
effective-parameter reachability. It uses torch, ``torch.fx``, :mod:`.flow`, :mod:`.op_rules`
and :mod:`.channel_scaler`, and nothing of Torch-Pruning.
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.fx as fx
import torch.nn as nn

from .channel_scaler import ChannelScaler
from .flow import Binarize, Flow, align, flows_in
from .op_rules import (
    Handler,
    UnsupportedModuleError,
    apply_module,
    apply_weighted,
    call_function,
    check_supported_module,
    edge_weights,
    finish_layer,
    is_weighted_module,
    module_kind,
)

__all__ = ["ConnectivityGraph", "LeafTracer"]


class LeafTracer(fx.Tracer):
    """``torch.fx`` tracer that keeps modules of ``leaf_types`` (scalers, handler types) as leaves."""

    def __init__(self, leaf_types: Tuple[type, ...]):
        super().__init__()
        self._leaf_types = leaf_types

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, self._leaf_types) or super().is_leaf_module(m, qualname)


class ConnectivityGraph:
    """The modified forward pass of appendix B on a ``torch.fx`` trace of a model.

    Traces ``model`` once; every call re-reads the current parameters, so the graph stays valid
    while the model trains, and also after Torch-Pruning has pruned it in place (call
    :meth:`retrace` after replacing modules).

    Module mapping (appendix B of the paper):

    * ``Linear`` / ``Conv1d/2d/3d``: weight replaced by ``theta = |W| / sum |W|``, bias dropped.
    * :class:`ChannelScaler`: factors replaced by ``|delta| / sum |delta|``.
    * BatchNorm / LayerNorm / GroupNorm / InstanceNorm, activations, dropout: identity (in the
      ``"reach"`` mode a BatchNorm channel whose scale is exactly 0 is cut).
    * ``MaxPool`` / ``AdaptiveMaxPool``: the average-pool with the same window.
    * average pools, flatten, reshape, mean, sum, indexing: applied unchanged (linear maps).
    * ``a + b``: if one branch contains no weighted layer that the other lacks (a parameter-free
      identity skip), that branch is left out (``skip_connections="drop"``, the paper's choice);
      otherwise the flows are added. ``skip_connections="keep"`` adds them always.
    * multiplication / division by a Python number: a fixed edge weight ``|c|``; adding a
      constant (a bias) is ignored.
    * anything else raises :class:`UnsupportedModuleError`; map extra module types with
      ``handlers={MyModule: fn}``, where ``fn(module, flow_tensor)`` returns a non-negative linear
      image of the flow (e.g. ``lambda m, x: x`` for a module that only rescales).

    Args:
        model: an ``nn.Module`` that ``torch.fx`` can trace (``nn.Sequential`` always can).
        example_inputs: a tensor (or tuple of tensors) shaped like one model input; only its
            shape is used (the batch dimension is replaced by 1). The all-ones input takes the
            dtype and device of the model's parameters.
        skip_connections: ``"drop"`` (paper) or ``"keep"`` parameter-free skip branches.
        handlers: extra module types and their flow maps.

    Example:
        >>> from connect_tp.models import resnet20
        >>> graph = ConnectivityGraph(resnet20(), torch.randn(1, 3, 32, 32))
        >>> float(graph.log_connectivity().detach()) < 0
        True
    """

    def __init__(
        self,
        model: nn.Module,
        example_inputs: Union[torch.Tensor, Sequence[torch.Tensor]],
        skip_connections: str = "drop",
        handlers: Optional[Mapping[type, Handler]] = None,
    ):
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

    # -- graph construction -------------------------------------------------------------------
    def retrace(self) -> None:
        """Re-trace the model (after modules were added, removed or replaced)."""
        leaf_types = (ChannelScaler,) + tuple(self.handlers)
        try:
            graph = LeafTracer(leaf_types).trace(self.model)
        except Exception as exc:  # fx raises many exception types for untraceable code
            raise UnsupportedModuleError(
                f"{type(self.model).__name__} cannot be traced by torch.fx ({type(exc).__name__}: {exc}). "
                "The connectivity pass needs a traceable model: remove data-dependent control flow "
                "from forward(), or pass handlers={ModuleType: fn} so the offending module is kept "
                "as a leaf."
            ) from exc
        self.graph = graph
        self.modules = dict(self.model.named_modules())
        self._weighted_ancestors = self._compute_weighted_ancestors()
        self._check_supported()

    def _is_weighted(self, node: fx.Node) -> bool:
        return node.op == "call_module" and is_weighted_module(self.modules[node.target], self.handlers)

    def _compute_weighted_ancestors(self) -> Dict[fx.Node, frozenset]:
        anc: Dict[fx.Node, frozenset] = {}
        for node in self.graph.nodes:
            s = set()
            for a in node.all_input_nodes:
                s |= anc[a]
            if self._is_weighted(node):
                s.add(node.target)
            anc[node] = frozenset(s)
        return anc

    def _check_supported(self) -> None:
        for node in self.graph.nodes:
            if node.op == "call_module":
                check_supported_module(node.target, self.modules[node.target], self.handlers)

    # -- the pass -------------------------------------------------------------------------------
    def weighted_modules(self) -> Dict[str, nn.Module]:
        """The layers whose weights enter the connectivity (in execution order)."""
        return {n.target: self.modules[n.target] for n in self.graph.nodes if self._is_weighted(n)}

    def run(self, mode: str = "theta", record: bool = False):
        """Run the modified forward pass.

        Args:
            mode: ``"theta"`` (normalized absolute weights, rescaled per layer in log space) or
                ``"reach"`` (0/1 edge indicators with 0/1 node reachability, for effective
                sparsity).
            record: also return the edge-weight tensor used for every weighted layer and the
                flow tensor after it (``{name: tensor}``), for saliency scores.

        Returns:
            ``log phi_tot`` (``"theta"``; ``-inf`` if disconnected) or the number of reachable
            output units (``"reach"``), and, if ``record``, the two dicts.
        """
        env: Dict[fx.Node, object] = {}
        edge_weights_by_layer: Dict[str, torch.Tensor] = {}
        node_flows: Dict[str, torch.Tensor] = {}
        placeholder_idx = 0
        zero = None
        for node in self.graph.nodes:
            if node.op == "placeholder":
                if placeholder_idx >= len(self._input_specs):
                    env[node] = node.args[0] if node.args else None  # defaulted argument
                    continue
                spec = self._input_specs[placeholder_idx]
                placeholder_idx += 1
                if isinstance(spec, tuple):
                    shape, dtype, device = spec
                    # the flow lives in the parameters' dtype / device (they may have moved)
                    param = next(self.model.parameters(), None)
                    if param is not None and param.is_floating_point():
                        dtype, device = param.dtype, param.device
                    if zero is None:
                        zero = torch.zeros((), dtype=dtype, device=device)
                    env[node] = Flow(torch.ones((1,) + shape, dtype=dtype, device=device), zero)
                else:
                    env[node] = spec
                continue
            if node.op == "output":
                out = fx.node.map_arg(node.args[0], lambda n: env[n])
                flows = flows_in(out)
                if not flows:
                    raise UnsupportedModuleError("the model output does not depend on its input")
                if mode == "theta":
                    result = torch.logsumexp(torch.stack([f.log_total() for f in flows]), 0)
                else:
                    result = sum(f.value.sum() for f in flows)
                return (result, edge_weights_by_layer, node_flows) if record else result
            args = fx.node.map_arg(node.args, lambda n: env[n])
            kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n])
            if node.op == "get_attr":
                obj = self.model
                for part in node.target.split("."):
                    obj = getattr(obj, part)
                env[node] = obj
            elif node.op == "call_module":
                env[node] = self._call_module(node, args, mode, edge_weights_by_layer, node_flows)
            else:
                env[node] = call_function(node, args, kwargs, mode, self._add)
        raise RuntimeError("fx graph has no output node")  # pragma: no cover

    def _call_module(self, node, args, mode, edge_weights_by_layer, node_flows):
        m = self.modules[node.target]
        kind = module_kind(m, self.handlers)
        x = args[0]
        if not isinstance(x, Flow):
            raise UnsupportedModuleError(f"module {node.target!r} is applied to a tensor that does not carry flow")
        if kind in ("weighted", "scaler"):
            w = edge_weights(m, mode)
            edge_weights_by_layer[node.target] = w
            out = finish_layer(Flow(apply_weighted(m, x.value, w), x.log_scale), mode)
            node_flows[node.target] = out.value
            return out
        return apply_module(m, kind, x, mode, self.handlers)

    def _add(self, node, args, mode):
        """``a + b`` on flows, leaving out a parameter-free skip branch under ``"drop"``."""
        operands = [a for a in args[:2] if isinstance(a, Flow)]
        if len(operands) == 1:  # flow + constant: a bias, which connectivity ignores
            return operands[0]
        if self.skip_connections == "drop":
            a_node, b_node = node.args[0], node.args[1]
            wa, wb = self._weighted_ancestors[a_node], self._weighted_ancestors[b_node]
            only_a, only_b = wa - wb, wb - wa
            if only_b and not only_a:
                return args[1]  # branch ``a`` is a parameter-free skip
            if only_a and not only_b:
                return args[0]
        values, ref = align(operands)
        if mode == "reach":
            return Flow(Binarize.apply(values[0] + values[1]), ref)
        return Flow(values[0] + values[1], ref).renormalized()

    # -- quantities -----------------------------------------------------------------------------
    def log_connectivity(self) -> torch.Tensor:
        """``log phi_tot`` (differentiable w.r.t. the model parameters; ``-inf`` if disconnected)."""
        return self.run("theta")

    def saliency(self) -> Dict[str, torch.Tensor]:
        """Connectivity share of every edge: ``theta * d phi / d theta / phi`` (SynFlow, sec. 3.3.1).

        For each weighted layer, a tensor shaped like its weight (or scaler) holding the fraction
        of ``phi_tot`` that flows through each parameter (for convolutions, summed over all
        positions where the kernel entry is used). In a network without skips the shares of each
        layer sum to 1. Rankings equal those of SynFlow's ``|W| * dR/d|W|``, because normalizing a
        layer multiplies every path through it by the same constant.
        """
        with torch.enable_grad():
            log_phi, thetas, _ = self.run("theta", record=True)
            if not torch.isfinite(log_phi):
                return {name: torch.zeros_like(t) for name, t in thetas.items()}
            grads = torch.autograd.grad(log_phi, list(thetas.values()), allow_unused=True)
        return {
            name: (t * (g if g is not None else torch.zeros_like(t))).detach()
            for (name, t), g in zip(thetas.items(), grads)
        }

    def reachability(self) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
        """Which parameters and units lie on an input-output path of non-zero weights.

        Returns:
            ``(effective_params, effective_units)``: for every weighted layer a boolean tensor
            shaped like its weight (True = the weight is non-zero and on some input-output path)
            and a boolean vector over its output channels (True = the unit / channel is reachable
            from the input and reaches the output at some position).
        """
        with torch.enable_grad():
            total, masks, flows = self.run("reach", record=True)
            for v in flows.values():
                v.retain_grad()
            if total.requires_grad and total.item() > 0:
                grads = torch.autograd.grad(total, list(masks.values()) + list(flows.values()), allow_unused=True)
            else:
                grads = [None] * (len(masks) + len(flows))
        params, units = {}, {}
        mask_grads, flow_grads = grads[: len(masks)], grads[len(masks):]
        for (name, mask), g in zip(masks.items(), mask_grads):
            params[name] = (mask > 0) & (g > 0) if g is not None else torch.zeros_like(mask, dtype=torch.bool)
        for (name, value), g in zip(flows.items(), flow_grads):
            m = self.modules[name]
            dim = (m.dim if isinstance(m, ChannelScaler) else (-1 if isinstance(m, nn.Linear) else 1)) % value.dim()
            alive = (value > 0) & (g > 0) if g is not None else torch.zeros_like(value, dtype=torch.bool)
            units[name] = alive.transpose(0, dim).flatten(1).any(1)
        return params, units
