"""Channel-level CoNNect (section 3.3.2): placing scalers in a model and scoring its channels.

:func:`add_channel_scalers` walks a ``torch.fx`` trace and puts a
:class:`~.channel_scaler.ChannelScaler` after every convolution / linear layer (after its
BatchNorm, where one follows); :func:`channel_connectivity_importance` scores every scaled
channel by the share of ``phi_tot`` that flows through it. Both work on plain models, with no
Torch-Pruning objects (the Torch-Pruning importance built on them is in :mod:`.pruner`). This
module uses torch, ``torch.fx`` (through :class:`~connect_tp.engine.LeafTracer`), the engine's
appendix-B tables (:mod:`connect_tp.engine`), :mod:`.graph` and :mod:`.channel_scaler`.
"""
from __future__ import annotations

from typing import Dict, Iterable, Mapping, Optional, Tuple

import torch
import torch.nn as nn

from .channel_scaler import ChannelScaler, channel_scalers
from ..engine import Handler, LeafTracer, UnsupportedModuleError
from ..engine.trace import CONV_TYPES
from .graph import ConnectivityGraph

WEIGHTED_TYPES = (nn.Linear,) + CONV_TYPES + (ChannelScaler,)

__all__ = ["add_channel_scalers", "channel_connectivity_importance"]


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
        graph = LeafTracer((ChannelScaler,)).trace(model)
    except Exception as exc:
        raise UnsupportedModuleError(f"add_channel_scalers needs a torch.fx-traceable model: {exc}") from exc
    modules = dict(model.named_modules())
    weighted = {n for n in graph.nodes if n.op == "call_module" and isinstance(modules[n.target], WEIGHTED_TYPES)}

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
        if isinstance(m, CONV_TYPES):
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
