"""Direct and effective sparsity, and layer-collapse detection.

*Direct sparsity* is the fraction of weights that are zero. *Effective sparsity* (Vysogorets &
Kempe, JMLR 2023) also counts the weights that are non-zero but lie on no input-output path of
non-zero weights: once the neurons with no path from the input, or no path to the output, are
removed, those weights cannot influence the output. *Layer collapse* (Tanaka et al., 2020) is
the extreme case: no input-output path is left at all, the effective sparsity is 100% and the
network computes a constant.

Reachability is the connectivity engine's ``"effective"`` view
(:class:`connect_tp.engine.AppendixBGraph`): one forward and one backward pass of 0/1 indicators
through the network's ``torch.fx`` trace, with BatchNorm and activations as identity (a BatchNorm
channel of scale exactly 0 is cut), max-pooling as average-pooling, and skip connections *kept*,
since an identity skip is a real path; it is exact at any depth.

Example:
    >>> import torch, torch.nn as nn
    >>> from connect_tp.sparsity import sparsity_report
    >>> model = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 1))
    >>> with torch.no_grad():
    ...     model[2].weight[0, 1] = 0.0          # hidden unit 1 no longer reaches the output
    >>> report = sparsity_report(model, torch.randn(1, 3))
    >>> report.direct, report.effective       # 1 of 8 weights is zero, 4 of 8 are dead
    (0.125, 0.5)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn as nn

from .engine import AppendixBGraph
from .unstructured import prunable_layers

__all__ = [
    "LayerSparsity",
    "SparsityReport",
    "direct_sparsity",
    "effective_sparsity",
    "is_layer_collapsed",
    "mlp_effective_masks",
    "mlp_layer_collapse",
    "sparsity_report",
]


@dataclass
class LayerSparsity:
    """Counts for one ``Linear`` / ``Conv`` layer."""

    weights: int
    nonzero: int
    effective: int
    units: int
    effective_units: int


@dataclass
class SparsityReport:
    """Direct and effective sparsity of a network (fractions of the prunable weights)."""

    direct: float
    effective: float
    collapsed: bool
    layers: Dict[str, LayerSparsity] = field(default_factory=dict)


def direct_sparsity(model: nn.Module) -> float:
    """Fraction of the ``Linear`` / ``Conv`` weights of ``model`` that are exactly zero."""
    layers = prunable_layers(model)
    if not layers:
        raise ValueError("model has no Linear or Conv layers")
    total = sum(m.weight.numel() for m in layers.values())
    zero = sum(int((m.weight == 0).sum()) for m in layers.values())
    return zero / total


def sparsity_report(model: nn.Module, example_inputs, handlers=None) -> SparsityReport:
    """Direct and effective sparsity, per layer and in total, and whether the network collapsed.

    Args:
        model: a ``torch.fx``-traceable model (zeros in its weights are the pruned connections;
            a zero :class:`~connect_tp.regularizer.ChannelScaler` factor cuts its channel).
        example_inputs: one input, for its shape.
        handlers: extra module types, see :class:`~connect_tp.regularizer.ConnectivityGraph`.
    """
    graph = AppendixBGraph(model, example_inputs, skip_connections="keep", handlers=handlers)
    effective_params, effective_units = graph.reachability()
    layers = prunable_layers(model)
    if not layers:
        raise ValueError("model has no Linear or Conv layers")
    per_layer = {}
    for name, m in layers.items():
        eff = effective_params.get(name)
        units = effective_units.get(name)
        n_units = m.out_features if isinstance(m, nn.Linear) else m.out_channels
        per_layer[name] = LayerSparsity(
            weights=m.weight.numel(),
            nonzero=int(m.weight.count_nonzero()),
            # a layer the pass never reaches (not on the input-output graph) is dead
            effective=int(eff.sum()) if eff is not None else 0,
            units=n_units,
            effective_units=int(units.sum()) if units is not None else 0,
        )
    total = sum(l.weights for l in per_layer.values())
    nonzero = sum(l.nonzero for l in per_layer.values())
    effective = sum(l.effective for l in per_layer.values())
    collapsed = not any(bool(v.any()) for v in effective_params.values())
    return SparsityReport(
        direct=1.0 - nonzero / total, effective=1.0 - effective / total, collapsed=collapsed, layers=per_layer
    )


def effective_sparsity(model: nn.Module, example_inputs, handlers=None) -> float:
    """Fraction of weights that are zero or on no input-output path (Vysogorets & Kempe, 2023)."""
    return sparsity_report(model, example_inputs, handlers).effective


def is_layer_collapsed(model: nn.Module, example_inputs, handlers=None) -> bool:
    """True if no path of non-zero weights connects the input to the output."""
    return sparsity_report(model, example_inputs, handlers).collapsed


def mlp_effective_masks(weights: Sequence[torch.Tensor]) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """Effective weights and units of a (batched) stack of linear layers.

    Args:
        weights: ``W_1, ..., W_L`` with shapes ``(*batch, out_k, in_k)``; zeros are pruned.

    Returns:
        ``(weight_masks, unit_masks)``: for each layer a boolean tensor shaped like ``W_k``
        (non-zero and on an input-output path) and a boolean tensor ``(*batch, out_k)`` (the
        layer's output units that are reachable from the input and reach the output).
    """
    nz = [(w != 0) for w in weights]
    # forward reachability of every layer's inputs: reach_in[k] has shape (*batch, in_k)
    reach = torch.ones(weights[0].shape[:-2] + (weights[0].shape[-1],), dtype=torch.bool, device=weights[0].device)
    reach_in = []
    for m in nz:
        reach_in.append(reach)
        reach = (m & reach.unsqueeze(-2)).any(-1)
    # backward reachability of every layer's outputs: to_out[k] has shape (*batch, out_k)
    to_out = [None] * len(nz)
    back = torch.ones(weights[-1].shape[:-1], dtype=torch.bool, device=weights[-1].device)
    for k in range(len(nz) - 1, -1, -1):
        to_out[k] = back
        back = (nz[k] & back.unsqueeze(-1)).any(-2)
    weight_masks = [nz[k] & to_out[k].unsqueeze(-1) & reach_in[k].unsqueeze(-2) for k in range(len(nz))]
    unit_masks = [
        to_out[k] & (reach_in[k + 1] if k + 1 < len(nz) else (nz[k] & reach_in[k].unsqueeze(-2)).any(-1))
        for k in range(len(nz))
    ]
    return weight_masks, unit_masks


def mlp_layer_collapse(weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """Boolean tensor over the batch dimensions: True where no input-output path is left."""
    weight_masks, _ = mlp_effective_masks(weights)
    return ~weight_masks[-1].flatten(-2).any(-1)
