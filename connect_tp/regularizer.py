"""The CoNNect regularizer: connectivity of the normalized network, as a training-time penalty.

CoNNect (Franssen et al., TMLR 2025, section 3.3) measures how well the input layer of a network
is connected to its output layer. Every learnable layer ``k`` is replaced by its *normalized*
absolute weights ``theta_k = |W_k| / sum |W_k|``; the connectivity ``phi_tot`` is the sum, over
all input-output paths, of the product of normalized weights along the path. It is computed by
one modified forward pass on an all-ones input (appendix B): convolutions and linear layers use
``theta`` and no bias, BatchNorm / activations / dropout are the identity, max-pooling becomes
average-pooling and parameter-free identity skips are left out. The regularizer is

    R(W) = -log phi_tot(W),

which goes to +inf as the network disconnects, so gradient descent cannot reach layer collapse.

``phi_tot`` of a deep network is a product of one small factor per layer (about one over the
layer width), so the naive forward pass underflows to 0 in float32 for, e.g., a 100-layer MLP or
ResNet-110. This module therefore rescales the flow after every layer to unit sum and carries the
logarithm of the scale, which gives the exact value of ``log phi_tot`` (and exact gradients: the
detached scale only adds a constant to the log) in any depth.

Structured (channel-level) CoNNect (section 3.3.2) inserts a learnable per-channel scaling
factor ``delta`` (:class:`ChannelScaler`) after convolutions / linear layers. The scalers are
normalized like any other layer, so the regularizer drives the factors of uninformative channels
to zero, and :func:`channel_connectivity_importance` ranks channels by the connectivity that flows
through them. :class:`ConnectPruner` plugs both into Torch-Pruning: ``regularize(model)`` adds
``lambda * dR/dW`` to the gradients in a sparse-training loop, ``step()`` removes the weakest
channels with Torch-Pruning's dependency graph.

Example:
    >>> import torch, torch.nn as nn
    >>> from connect_tp.regularizer import ConnectRegularizer
    >>> model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 5), nn.ReLU(), nn.Linear(5, 1))
    >>> reg = ConnectRegularizer(model, example_inputs=torch.randn(1, 6))
    >>> loss = nn.functional.mse_loss(model(torch.randn(8, 6)), torch.zeros(8, 1)) + 0.1 * reg()
    >>> loss.backward()
"""
from __future__ import annotations

import math
import operator
import warnings
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
import torch_pruning as tp

__all__ = [
    "ChannelScaler",
    "ChannelScalerPruner",
    "ConnectivityGraph",
    "ConnectRegularizer",
    "ConnectPruner",
    "ChannelConnectivityImportance",
    "UnsupportedModuleError",
    "add_channel_scalers",
    "channel_connectivity_importance",
    "channel_scalers",
    "mlp_log_connectivity",
    "normalized_abs",
    "prune_channels",
]

Handler = Callable[[nn.Module, torch.Tensor], torch.Tensor]


class UnsupportedModuleError(TypeError):
    """Raised when the connectivity forward pass meets an operation it does not know how to map."""


# --------------------------------------------------------------------------------------------
# Channel scaling factors (section 3.3.2)
# --------------------------------------------------------------------------------------------
class ChannelScaler(nn.Module):
    """Learnable per-channel scaling factor ``delta`` (section 3.3.2 of the paper).

    Multiplies channel ``c`` of its input by ``scale[c]``. In the connectivity forward pass the
    factors are normalized like a layer's weights (``|delta| / sum |delta|``), so CoNNect
    regularization pushes the factors of whole channels to zero.

    Args:
        num_channels (int): number of channels.
        dim (int): channel dimension of the input: 1 for ``(N, C, ...)`` convolution outputs,
            -1 for the ``(..., C)`` outputs of linear layers.

    Example:
        >>> scaler = ChannelScaler(16)
        >>> scaler(torch.rand(2, 16, 8, 8)).shape
        torch.Size([2, 16, 8, 8])
    """

    def __init__(self, num_channels: int, dim: int = 1):
        super().__init__()
        if num_channels < 1:
            raise ValueError(f"ChannelScaler needs at least one channel, got num_channels={num_channels}")
        self.dim = dim
        self.scale = nn.Parameter(torch.ones(num_channels))

    @property
    def num_channels(self) -> int:
        return self.scale.numel()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dim = self.dim % x.dim()
        shape = [1] * x.dim()
        shape[dim] = -1
        return x * self.scale.view(shape)

    def extra_repr(self) -> str:
        return f"{self.num_channels}, dim={self.dim}"


class ChannelScalerPruner(tp.pruner.function.BasePruningFunc):
    """Torch-Pruning pruning function for :class:`ChannelScaler`.

    Input and output channels are the same channels, so ``prune_in_channels`` is
    ``prune_out_channels``, which makes Torch-Pruning couple the scaler to the layers around it.
    Pass it as ``customized_pruners={ChannelScaler: ChannelScalerPruner()}`` to any Torch-Pruning
    pruner or dependency graph (:class:`ConnectPruner` does this for you).
    """

    TARGET_MODULES = ChannelScaler

    def prune_out_channels(self, layer: ChannelScaler, idxs: Sequence[int]) -> nn.Module:
        keep = sorted(set(range(layer.num_channels)) - set(idxs))
        layer.scale = self._prune_parameter_and_grad(layer.scale, keep, 0)
        return layer

    prune_in_channels = prune_out_channels

    def get_out_channels(self, layer: ChannelScaler) -> int:
        return layer.num_channels

    def get_in_channels(self, layer: ChannelScaler) -> int:
        return layer.num_channels


def channel_scalers(model: nn.Module) -> Dict[str, ChannelScaler]:
    """All :class:`ChannelScaler` modules of ``model`` by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, ChannelScaler)}


# --------------------------------------------------------------------------------------------
# The normalized, rescaled forward pass
# --------------------------------------------------------------------------------------------
def normalized_abs(weight: torch.Tensor, batch_dims: int = 0) -> torch.Tensor:
    """Equation (2) of the paper: ``|W| / sum |W|`` over one layer.

    Args:
        weight: a layer's weight tensor, optionally with ``batch_dims`` leading dimensions that
            index independent networks (each is normalized on its own).
        batch_dims: number of leading batch dimensions.

    An all-zero layer gives all-zero ``theta`` (a disconnected layer), not NaN.
    """
    a = weight.abs()
    total = a.flatten(batch_dims).sum(-1).view(a.shape[:batch_dims] + (1,) * (a.dim() - batch_dims))
    return a / total.clamp_min(torch.finfo(a.dtype).tiny)


class _Flow:
    """Non-negative connectivity flow ``value * exp(log_scale)``; ``value`` has sum 1 (or is 0)."""

    __slots__ = ("value", "log_scale")

    def __init__(self, value: torch.Tensor, log_scale: torch.Tensor):
        self.value = value
        self.log_scale = log_scale

    def renormalized(self) -> "_Flow":
        # The scale is detached: log(sum(y / s)) + log(s) equals log(sum(y)) for any constant s,
        # so values and gradients are exact while every intermediate stays O(1).
        s = self.value.detach().sum()
        s_safe = torch.where(s > 0, s, torch.ones_like(s))
        return _Flow(self.value / s_safe, self.log_scale + torch.log(s_safe))

    def log_total(self) -> torch.Tensor:
        return torch.log(self.value.sum()) + self.log_scale


class _Binarize(torch.autograd.Function):
    """Forward: reachable-from-input indicator; backward: reachable-to-output indicator.

    Used by the reachability pass (effective sparsity): both directions are kept in {0, 1}, so
    path *existence* is computed exactly at any depth, with no underflow.
    """

    @staticmethod
    def forward(ctx, x):
        return (x > 0).to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        return (g > 0).to(g.dtype)


_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_WEIGHTED = (nn.Linear,) + _CONV + (ChannelScaler,)
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


class _Tracer(fx.Tracer):
    def __init__(self, leaf_types: Tuple[type, ...]):
        super().__init__()
        self._leaf_types = leaf_types

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, self._leaf_types) or super().is_leaf_module(m, qualname)


def _flows_in(obj) -> List[_Flow]:
    if isinstance(obj, _Flow):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [f for o in obj for f in _flows_in(o)]
    if isinstance(obj, dict):
        return [f for o in obj.values() for f in _flows_in(o)]
    return []


def _align(flows: Sequence[_Flow]) -> Tuple[List[torch.Tensor], torch.Tensor]:
    """Bring flows to a common scale (the largest), returning their values and that log-scale."""
    ref = torch.stack([f.log_scale for f in flows]).max()
    return [f.value * torch.exp(f.log_scale - ref) for f in flows], ref


class ConnectivityGraph:
    """The modified forward pass of appendix B on a ``torch.fx`` trace of a model.

    Traces ``model`` once; every call re-reads the current parameters, so the graph stays valid
    while the model trains, and also after Torch-Pruning has pruned it in place (call
    :meth:`retrace` after replacing modules).

    Module mapping (appendix B of the paper):

    * ``Linear`` / ``Conv1d/2d/3d``: weight replaced by ``theta = |W| / sum |W|``, bias dropped.
    * :class:`ChannelScaler`: factors replaced by ``|delta| / sum |delta|``.
    * BatchNorm / LayerNorm / GroupNorm / InstanceNorm, activations, dropout: identity.
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
            graph = _Tracer(leaf_types).trace(self.model)
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
        if node.op != "call_module":
            return False
        m = self.modules[node.target]
        return isinstance(m, _WEIGHTED) or (
            type(m) in self.handlers and any(True for _ in m.parameters(recurse=True))
        )

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

    def _module_kind(self, m: nn.Module) -> Optional[str]:
        if type(m) in self.handlers:
            return "handler"
        if isinstance(m, (nn.Linear,) + _CONV):
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

    def _check_supported(self) -> None:
        for node in self.graph.nodes:
            if node.op == "call_module":
                m = self.modules[node.target]
                if self._module_kind(m) is None:
                    raise UnsupportedModuleError(
                        f"module {node.target!r} of type {type(m).__name__} is not supported by the "
                        "CoNNect connectivity pass (supported: Linear, Conv1d/2d/3d, ChannelScaler, "
                        "normalization, activation, dropout and pooling layers). Pass "
                        f"handlers={{{type(m).__name__}: fn}} with fn(module, x) returning the "
                        "non-negative linear image of the flow x."
                    )
                if isinstance(m, _CONV) and m.padding_mode != "zeros":
                    raise UnsupportedModuleError(
                        f"convolution {node.target!r} uses padding_mode={m.padding_mode!r}; only "
                        "zero padding is supported by the connectivity pass"
                    )
                if type(m) in _MAXPOOL_TO_AVG and m.dilation not in (1, (1,), (1, 1), (1, 1, 1)):
                    raise UnsupportedModuleError(
                        f"max-pool {node.target!r} is dilated; average pooling (its replacement "
                        "in the connectivity pass) has no dilation"
                    )

    # -- the pass -------------------------------------------------------------------------------
    def weighted_modules(self) -> Dict[str, nn.Module]:
        """The layers whose weights enter the connectivity (in execution order)."""
        return {n.target: self.modules[n.target] for n in self.graph.nodes if self._is_weighted(n)}

    def _edge_weights(self, m: nn.Module, mode: str) -> torch.Tensor:
        w = m.scale if isinstance(m, ChannelScaler) else m.weight
        if mode == "theta":
            return normalized_abs(w)
        return (w != 0).to(w.dtype).requires_grad_(True)  # "reach": existing edges

    def _apply_weighted(self, m: nn.Module, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if isinstance(m, nn.Linear):
            return F.linear(x, w)
        if isinstance(m, ChannelScaler):
            dim = m.dim % x.dim()
            shape = [1] * x.dim()
            shape[dim] = -1
            return x * w.view(shape)
        conv = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}[type(m)]
        return conv(x, w, None, m.stride, m.padding, m.dilation, m.groups)

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
        edge_weights: Dict[str, torch.Tensor] = {}
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
                    env[node] = _Flow(torch.ones((1,) + shape, dtype=dtype, device=device), zero)
                else:
                    env[node] = spec
                continue
            if node.op == "output":
                out = fx.node.map_arg(node.args[0], lambda n: env[n])
                flows = _flows_in(out)
                if not flows:
                    raise UnsupportedModuleError("the model output does not depend on its input")
                if mode == "theta":
                    result = torch.logsumexp(torch.stack([f.log_total() for f in flows]), 0)
                else:
                    result = sum(f.value.sum() for f in flows)
                return (result, edge_weights, node_flows) if record else result
            args = fx.node.map_arg(node.args, lambda n: env[n])
            kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n])
            if node.op == "get_attr":
                obj = self.model
                for part in node.target.split("."):
                    obj = getattr(obj, part)
                env[node] = obj
            elif node.op == "call_module":
                env[node] = self._call_module(node, args, mode, edge_weights, node_flows)
            else:
                env[node] = self._call_function(node, args, kwargs, mode)
        raise RuntimeError("fx graph has no output node")  # pragma: no cover

    def _finish(self, flow: _Flow, mode: str) -> _Flow:
        if mode == "theta":
            return flow.renormalized()
        return _Flow(_Binarize.apply(flow.value), flow.log_scale)

    def _call_module(self, node, args, mode, edge_weights, node_flows):
        m = self.modules[node.target]
        kind = self._module_kind(m)
        x = args[0]
        if not isinstance(x, _Flow):
            raise UnsupportedModuleError(f"module {node.target!r} is applied to a tensor that does not carry flow")
        if kind in ("weighted", "scaler"):
            w = self._edge_weights(m, mode)
            edge_weights[node.target] = w
            out = self._finish(_Flow(self._apply_weighted(m, x.value, w), x.log_scale), mode)
            node_flows[node.target] = out.value
            return out
        if kind == "handler":
            return self._finish(_Flow(self.handlers[type(m)](m, x.value), x.log_scale), mode)
        if kind == "identity":
            return x
        if kind == "maxpool":
            pool = _MAXPOOL_TO_AVG[type(m)]
            stride = m.stride if m.stride is not None else m.kernel_size
            value = pool(x.value, m.kernel_size, stride, m.padding, m.ceil_mode, count_include_pad=False)
            return _Flow(value, x.log_scale)
        if kind == "adaptive_maxpool":
            return _Flow(_ADAPTIVE_MAX_TO_AVG[type(m)](x.value, m.output_size), x.log_scale)
        return _Flow(m(x.value), x.log_scale)  # "linear": parameter-free linear modules

    def _call_function(self, node, args, kwargs, mode):
        target = node.target
        flows = _flows_in((args, kwargs))
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
            if isinstance(first, _Flow) and len(flows) == 1:
                rest_args = args[1:]
                if is_method:
                    return _Flow(getattr(first.value, target)(*rest_args, **kwargs), first.log_scale)
                return _Flow(target(first.value, *rest_args, **kwargs), first.log_scale)
        if not is_method and target in _FUNCTIONAL_MAX_TO_AVG and isinstance(first, _Flow):
            params = dict(zip(("kernel_size", "stride", "padding", "dilation", "ceil_mode"), args[1:]))
            params.update(kwargs)
            if params.get("dilation", 1) not in (1, (1,), (1, 1), (1, 1, 1)):
                raise UnsupportedModuleError(f"{name}: dilated max-pooling has no average-pool equivalent")
            value = _FUNCTIONAL_MAX_TO_AVG[target](
                first.value, params["kernel_size"], params.get("stride") or params["kernel_size"],
                params.get("padding", 0), params.get("ceil_mode", False), count_include_pad=False,
            )
            return _Flow(value, first.log_scale)
        if not is_method and target in _FUNCTIONAL_ADAPTIVE_MAX_TO_AVG and isinstance(first, _Flow):
            size = args[1] if len(args) > 1 else kwargs["output_size"]
            return _Flow(_FUNCTIONAL_ADAPTIVE_MAX_TO_AVG[target](first.value, size), first.log_scale)
        if (not is_method and target in _ADD) or (is_method and target in ("add", "add_")):
            return self._add(node, args, mode)
        if ((not is_method and target in _SCALAR_MUL) or (is_method and target in ("mul", "mul_"))) and len(args) == 2:
            flow, c = (args[0], args[1]) if isinstance(args[0], _Flow) else (args[1], args[0])
            if isinstance(c, (int, float)) and isinstance(flow, _Flow):
                return self._scaled(flow, abs(c), mode)
        if ((not is_method and target in _SCALAR_DIV) or (is_method and target in ("div", "div_"))) and len(args) == 2:
            if isinstance(args[0], _Flow) and isinstance(args[1], (int, float)) and args[1] != 0:
                return self._scaled(args[0], 1.0 / abs(args[1]), mode)
        if not is_method and target is torch.cat:
            tensors = args[0] if args else kwargs["tensors"]
            dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
            if all(isinstance(t, _Flow) for t in tensors):
                values, ref = _align(tensors)
                return _Flow(torch.cat(values, dim), ref)
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

    @staticmethod
    def _scaled(flow: _Flow, c: float, mode: str) -> _Flow:
        if mode == "reach":
            return flow if c > 0 else _Flow(flow.value * 0, flow.log_scale)
        if c == 0:
            return _Flow(flow.value * 0, flow.log_scale)
        return _Flow(flow.value, flow.log_scale + math.log(c))

    def _add(self, node, args, mode):
        operands = [a for a in args[:2] if isinstance(a, _Flow)]
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
        values, ref = _align(operands)
        if mode == "reach":
            return _Flow(_Binarize.apply(values[0] + values[1]), ref)
        return _Flow(values[0] + values[1], ref).renormalized()

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


# --------------------------------------------------------------------------------------------
# The regularizer
# --------------------------------------------------------------------------------------------
class ConnectRegularizer(nn.Module):
    """``R(W) = -log phi_tot(W)``, the CoNNect regularizer (equation 6 of the paper).

    Calling the regularizer returns a differentiable scalar; add ``lambda * R`` to the loss, or
    call :meth:`add_grad_` after ``loss.backward()`` to add ``lambda * dR/dW`` to the gradients
    (what :class:`ConnectPruner.regularize` does inside Torch-Pruning training loops).

    Args:
        model: the network (``nn.Sequential`` or ``torch.fx``-traceable, residual ones included).
        example_inputs: one input (the batch size is ignored); used for its shape.
        handlers: extra module types, see :class:`ConnectivityGraph`.

    Example:
        >>> from connect_tp.models import resnet20
        >>> model = resnet20()
        >>> reg = ConnectRegularizer(model, torch.randn(1, 3, 32, 32))
        >>> r = reg()                       # finite, differentiable
        >>> (0.1 * r).backward()
    """

    def __init__(self, model: nn.Module, example_inputs, handlers: Optional[Mapping[type, Handler]] = None):
        super().__init__()
        # Not registered as a submodule: the regularizer must not own (or re-save) the model.
        object.__setattr__(self, "graph", ConnectivityGraph(model, example_inputs, "drop", handlers))

    @property
    def model(self) -> nn.Module:
        return self.graph.model

    def forward(self) -> torch.Tensor:
        return -self.graph.log_connectivity()

    def parameters_regularized(self) -> List[nn.Parameter]:
        """The parameters R depends on (weights of linear/conv layers, channel scales)."""
        out = []
        for m in self.graph.weighted_modules().values():
            out.extend([m.scale] if isinstance(m, ChannelScaler) else [m.weight])
        return out

    def add_grad_(self, reg: float) -> float:
        """Add ``reg * dR/dW`` to ``.grad`` of the regularized parameters; returns R.

        If the network is already disconnected (R = +inf) the gradient is undefined; nothing is
        added and a warning is issued.
        """
        params = self.parameters_regularized()
        with torch.enable_grad():
            r = self.forward()
            if not torch.isfinite(r):
                warnings.warn("CoNNect: the network is disconnected (R = inf); no regularization gradient added")
                return float(r.detach())
            grads = torch.autograd.grad(r, params, allow_unused=True)
        with torch.no_grad():
            for p, g in zip(params, grads):
                if g is None:
                    continue
                if p.grad is None:
                    p.grad = reg * g
                else:
                    p.grad.add_(g, alpha=reg)
        return float(r.detach())


def mlp_log_connectivity(weights: Sequence[torch.Tensor], normalize: bool = True) -> torch.Tensor:
    """``log phi_tot`` of a stack of linear layers, batched over independent networks.

    The same rescaled computation as :class:`ConnectivityGraph` for a plain MLP (biases and
    activations ignored), written with batched matrix products so that many small networks can
    be regularized at once (the layer-collapse benchmark trains 300 MLPs side by side).

    Args:
        weights: ``W_1, ..., W_L`` with shapes ``(*batch, out_k, in_k)``.
        normalize: apply equation (2); ``False`` takes ``weights`` as the (non-negative) edge
            weights ``theta`` themselves, e.g. to differentiate with respect to ``theta``.

    Returns:
        Tensor of shape ``batch``: ``log phi_tot`` per network (``-inf`` where disconnected).

    Example:
        >>> ws = [torch.randn(100, 5, 6), torch.randn(100, 1, 5)]   # 100 nets 6-5-1
        >>> mlp_log_connectivity(ws).shape
        torch.Size([100])
    """
    if not weights:
        raise ValueError("mlp_log_connectivity needs at least one weight matrix")
    batch = weights[0].shape[:-2]
    flow = torch.ones(batch + (weights[0].shape[-1], 1), dtype=weights[0].dtype, device=weights[0].device)
    log_scale = torch.zeros(batch, dtype=flow.dtype, device=flow.device)
    for w in weights:
        if w.shape[:-2] != batch or w.shape[-1] != flow.shape[-2]:
            raise ValueError(
                f"weight of shape {tuple(w.shape)} does not chain: expected (*{tuple(batch)}, out, {flow.shape[-2]})"
            )
        flow = (normalized_abs(w, batch_dims=len(batch)) if normalize else w) @ flow
        s = flow.detach().sum((-2, -1))
        s_safe = torch.where(s > 0, s, torch.ones_like(s))
        flow = flow / s_safe[..., None, None]
        log_scale = log_scale + torch.log(s_safe)
    return torch.log(flow.sum((-2, -1))) + log_scale


# --------------------------------------------------------------------------------------------
# Channel level: inserting scalers, importance, Torch-Pruning integration
# --------------------------------------------------------------------------------------------
def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, module)


def add_channel_scalers(
    model: nn.Module,
    layer_types: Tuple[type, ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear),
    ignored_layers: Iterable[nn.Module] = (),
    skip_output_layers: bool = True,
) -> Dict[str, ChannelScaler]:
    """Insert a :class:`ChannelScaler` after every convolution / linear layer (in place).

    The scaler goes after the layer's BatchNorm when the layer feeds one directly (a factor in
    front of BatchNorm would be normalized away by it), otherwise right after the layer. The
    module at that position is replaced by ``nn.Sequential(module, scaler)``, so parameter
    names gain a ``.0`` (e.g. ``bn1.weight`` becomes ``bn1.0.weight``).

    Args:
        model: a ``torch.fx``-traceable model.
        layer_types: the layers to follow with a scaler.
        ignored_layers: layers that get no scaler.
        skip_output_layers: give no scaler to layers whose output reaches the model output
            without passing another convolution / linear layer (their channels are the classes).

    Returns:
        ``{name of the scaled module: scaler}``.

    Example:
        >>> from connect_tp.models import resnet20
        >>> model = resnet20()
        >>> scalers = add_channel_scalers(model)
        >>> len(scalers)   # every convolution, the 1x1 shortcuts included; not the classifier
        21
    """
    if channel_scalers(model):
        raise ValueError("model already has ChannelScaler modules; add_channel_scalers was called twice")
    ignored = {id(m) for layer in ignored_layers for m in layer.modules()}
    try:
        graph = _Tracer((ChannelScaler,)).trace(model)
    except Exception as exc:
        raise UnsupportedModuleError(f"add_channel_scalers needs a torch.fx-traceable model: {exc}") from exc
    modules = dict(model.named_modules())
    weighted = {n for n in graph.nodes if n.op == "call_module" and isinstance(modules[n.target], _WEIGHTED)}

    output_layers = set()
    if skip_output_layers:
        # walk back from the output, stopping at the first weighted layer on each path
        stack = [n for n in graph.nodes if n.op == "output"]
        seen = set()
        while stack:
            n = stack.pop()
            for a in n.all_input_nodes:
                if a in seen:
                    continue
                seen.add(a)
                if a in weighted:
                    output_layers.add(a.target)
                else:
                    stack.append(a)

    targets: Dict[str, Tuple[int, int]] = {}
    for node in graph.nodes:
        if node.op != "call_module":
            continue
        m = modules[node.target]
        if not isinstance(m, layer_types) or id(m) in ignored or node.target in output_layers:
            continue
        if isinstance(m, _CONV):
            channels, dim = m.out_channels, 1
        elif isinstance(m, nn.Linear):
            channels, dim = m.out_features, -1
        else:
            raise ValueError(f"add_channel_scalers: cannot scale {type(m).__name__} {node.target!r}")
        where = node.target
        users = list(node.users)
        if (
            len(users) == 1 and users[0].op == "call_module"
            and isinstance(modules[users[0].target], nn.modules.batchnorm._BatchNorm)
        ):
            where = users[0].target
        if where in targets:
            raise ValueError(f"module {where!r} is called more than once; cannot place a single scaler after it")
        targets[where] = (channels, dim)

    scalers = {}
    for where, (channels, dim) in targets.items():
        scaler = ChannelScaler(channels, dim)
        original = model.get_submodule(where)
        param = next(original.parameters(), None)
        if param is not None:
            scaler.to(device=param.device, dtype=param.dtype)
        _set_submodule(model, where, nn.Sequential(original, scaler))
        scalers[where] = scaler
    return scalers


def channel_connectivity_importance(
    model: nn.Module, example_inputs, handlers: Optional[Mapping[type, Handler]] = None
) -> Dict[ChannelScaler, torch.Tensor]:
    """Connectivity importance of every scaled channel (section 3.3.2).

    ``I_{k,c} = theta_c * d phi_tot / d theta_c``, the connectivity flowing through channel
    ``c`` (flow into the channel times its normalized factor times the flow out of it, summed
    over the channel's positions), returned as a share of ``phi_tot``: in a network without
    parameter-free skips the importances of one scaler sum to 1.

    Returns:
        ``{scaler: importance vector}`` for every :class:`ChannelScaler` of ``model``.
    """
    graph = ConnectivityGraph(model, example_inputs, "drop", handlers)
    sal = graph.saliency()
    return {graph.modules[name]: s for name, s in sal.items() if isinstance(graph.modules[name], ChannelScaler)}


class ChannelConnectivityImportance(tp.importance.Importance):
    """Torch-Pruning importance: summed connectivity importance of the group's scaled channels.

    Groups that contain no :class:`ChannelScaler` get ``None`` (Torch-Pruning leaves them
    unpruned). Scores are computed once per pruning step for the whole model; call
    :meth:`reset` (``ConnectPruner.step`` does) before a new step.

    Args:
        model: the network with scalers (see :func:`add_channel_scalers`).
        example_inputs: one input, for its shape.
    """

    def __init__(self, model: nn.Module, example_inputs, handlers: Optional[Mapping[type, Handler]] = None):
        self.model = model
        self.example_inputs = example_inputs
        self.handlers = handlers
        self._scores: Optional[Dict[ChannelScaler, torch.Tensor]] = None

    def reset(self) -> None:
        self._scores = None

    @torch.no_grad()
    def __call__(self, group) -> Optional[torch.Tensor]:
        if self._scores is None:
            self._scores = channel_connectivity_importance(self.model, self.example_inputs, self.handlers)
        total = None
        for i, (dep, idxs) in enumerate(group):
            layer = dep.target.module
            if not isinstance(layer, ChannelScaler) or layer not in self._scores:
                continue
            score = self._scores[layer]
            if score.numel() != layer.num_channels:  # pruned since the scores were computed
                self._scores = channel_connectivity_importance(self.model, self.example_inputs, self.handlers)
                score = self._scores[layer]
            root_idxs = group[i].root_idxs
            if total is None:
                total = torch.zeros(len(group[0].idxs), dtype=score.dtype, device=score.device)
            total.index_add_(0, torch.tensor(root_idxs, device=score.device), score[idxs])
        return total


class ConnectPruner(tp.pruner.BasePruner):
    """Torch-Pruning pruner with CoNNect sparse training and connectivity-based channel pruning.

    Drop-in for Torch-Pruning's sparse-training loop: call ``update_regularizer()`` once before
    training and ``regularize(model)`` after every ``loss.backward()``; it adds
    ``reg * dR/dW`` (R = -log phi_tot) to the gradients, like ``GroupNormPruner.regularize``. Then
    ``step()`` removes the channels with the lowest connectivity importance
    (:class:`ChannelConnectivityImportance`) through the dependency graph, so the network really
    gets smaller.

    Args:
        model: the network, with :class:`ChannelScaler` modules (see :func:`add_channel_scalers`)
            unless another ``importance`` is given.
        example_inputs: a dummy input for tracing.
        reg: the regularization strength ``lambda``.
        importance: a Torch-Pruning importance; defaults to
            :class:`ChannelConnectivityImportance`.
        handlers: extra module types for the connectivity pass.
        **kwargs: passed on to ``torch_pruning.pruner.BasePruner`` (``pruning_ratio``,
            ``ignored_layers``, ``global_pruning``, ...).

    Example:
        >>> import torch_pruning as tp
        >>> from connect_tp.models import resnet20
        >>> model = resnet20()
        >>> scalers = add_channel_scalers(model)
        >>> x = torch.randn(1, 3, 32, 32)
        >>> pruner = ConnectPruner(model, x, reg=1e-2, pruning_ratio=0.5, ignored_layers=[model.fc])
        >>> pruner.update_regularizer()
        >>> for images, labels in []:          # your training loop
        ...     loss = torch.nn.functional.cross_entropy(model(images), labels)
        ...     loss.backward()
        ...     pruner.regularize(model)       # adds reg * dR/dW to .grad
        ...     optimizer.step(); optimizer.zero_grad()
        >>> pruner.step()
        >>> model(x).shape
        torch.Size([1, 10])
    """

    def __init__(
        self,
        model: nn.Module,
        example_inputs,
        reg: float = 1e-1,
        importance: Optional[Callable] = None,
        handlers: Optional[Mapping[type, Handler]] = None,
        customized_pruners: Optional[dict] = None,
        **kwargs,
    ):
        if reg < 0 or not math.isfinite(reg):
            raise ValueError(f"reg must be a finite non-negative number, got {reg}")
        if importance is None:
            if not channel_scalers(model):
                raise ValueError(
                    "ConnectPruner's default importance ranks ChannelScaler channels, but the model "
                    "has none: call add_channel_scalers(model) first, or pass importance=..."
                )
            importance = ChannelConnectivityImportance(model, example_inputs, handlers)
        pruners = {ChannelScaler: ChannelScalerPruner()}
        pruners.update(customized_pruners or {})
        super().__init__(model, example_inputs, importance, customized_pruners=pruners, **kwargs)
        self.reg = reg
        self._example_inputs = example_inputs
        self._handlers = handlers
        self.regularizer = ConnectRegularizer(model, example_inputs, handlers)

    def update_regularizer(self) -> None:
        """Re-trace the connectivity graph (call after the model's structure changed)."""
        self.regularizer = ConnectRegularizer(self.model, self._example_inputs, self._handlers)

    def regularize(self, model: Optional[nn.Module] = None, reg: Optional[float] = None) -> float:
        """Add ``reg * dR/dW`` to the gradients (call after ``loss.backward()``); returns R."""
        if model is not None and model is not self.model:
            raise ValueError("regularize() got a different model than the one this pruner was built for")
        return self.regularizer.add_grad_(self.reg if reg is None else reg)

    def step(self, interactive: bool = False):
        if isinstance(self.importance, ChannelConnectivityImportance):
            self.importance.reset()
        return super().step(interactive)


def prune_channels(
    model: nn.Module, example_inputs, pruning_ratio: float, ignored_layers: Optional[List[nn.Module]] = None, **kwargs
) -> nn.Module:
    """One-shot structured pruning of the lowest-connectivity channels (scalers required).

    A thin wrapper around :class:`ConnectPruner`; ``kwargs`` go to Torch-Pruning.

    Example:
        >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
        >>> _ = add_channel_scalers(model)
        >>> prune_channels(model, torch.randn(1, 8), pruning_ratio=0.5)[0][0].out_features
        8
    """
    pruner = ConnectPruner(model, example_inputs, pruning_ratio=pruning_ratio, ignored_layers=ignored_layers, **kwargs)
    pruner.step()
    return model
