"""The modified forward pass of appendix B, by its public name: :class:`ConnectivityGraph`.

The pass itself is the connectivity engine's (:mod:`connect_tp.engine`): the views
``"normalized"`` (``theta = |W| / sum |W|``, the regularizer's connectivity) and ``"effective"``
(0/1 reachability, effective sparsity) of :class:`~connect_tp.engine.AppendixBGraph`, which
traces the model with channel scalers and handler modules as leaves and runs it through
:func:`~connect_tp.engine.run_traced` with the appendix-B node policy. This module keeps the name
and the documentation; it uses torch and the engine, and nothing of Torch-Pruning.
"""
from __future__ import annotations

from ..engine import AppendixBGraph, LeafTracer

__all__ = ["ConnectivityGraph", "LeafTracer"]


class ConnectivityGraph(AppendixBGraph):
    """The modified forward pass of appendix B on a ``torch.fx`` trace of a model.

    Traces ``model`` once; every call re-reads the current parameters, so the graph stays valid
    while the model trains, and also after Torch-Pruning has pruned it in place (call
    :meth:`retrace` after replacing modules). The pass is the engine's
    (:class:`connect_tp.engine.AppendixBGraph`, views ``"normalized"`` and ``"effective"``).

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

    Methods: ``log_connectivity()`` (``log phi_tot``, differentiable), ``saliency()`` (SynFlow
    shares ``theta * d phi / d theta / phi`` per edge), ``reachability()`` (effective parameters
    and units), ``run(mode="theta" | "reach", record=False)``, ``weighted_modules()``,
    ``retrace()``.

    Example:
        >>> import torch
        >>> from connect_tp.models import resnet20
        >>> graph = ConnectivityGraph(resnet20(), torch.randn(1, 3, 32, 32))
        >>> float(graph.log_connectivity().detach()) < 0
        True
    """
