"""Unstructured (weight-level) pruning: magnitude, SynFlow and SNIP scores, layer-local masks.

Scores are dictionaries ``{layer name: tensor shaped like the layer's weight}`` over the
``Linear`` and ``Conv1d/2d/3d`` layers of a model, so every scorer plugs into the same
:func:`layerwise_masks` / :func:`apply_masks`:

* magnitude (LeCun et al., 1989): ``|W|``;
* SynFlow (Tanaka et al., 2020), as used by CoNNect (section 3.3.1):
  ``I_ij = a_in(i) * theta_ij * a_out(j)``, the connectivity through each weight, from the
  modified forward pass of :class:`~connect_tp.regularizer.ConnectivityGraph`;
* SNIP (Lee et al., 2019): ``|W * dL/dW|`` on a batch of data (the baseline).

The ``mlp_*`` variants work on stacks of weight matrices with leading batch dimensions, for
experiments that train many small MLPs side by side.

Example:
    >>> import torch, torch.nn as nn
    >>> from connect_tp.unstructured import synflow_scores, layerwise_masks, apply_masks
    >>> model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 1))
    >>> masks = layerwise_masks(synflow_scores(model, torch.randn(1, 6)), sparsity=0.8)
    >>> handle = apply_masks(model, masks)   # zeroes pruned weights and keeps them at zero
    >>> int(model[0].weight.count_nonzero())
    6
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Mapping, Sequence

import torch
import torch.nn as nn

from .regularizer import ConnectivityGraph, mlp_log_connectivity, normalized_abs

__all__ = [
    "MaskHandle",
    "apply_masks",
    "layerwise_masks",
    "magnitude_scores",
    "mlp_synflow_scores",
    "num_kept",
    "prunable_layers",
    "snip_scores",
    "synflow_scores",
]

_PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def prunable_layers(model: nn.Module) -> Dict[str, nn.Module]:
    """The ``Linear`` / ``Conv`` layers of ``model`` by qualified name (the keys of all scores)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, _PRUNABLE)}


def magnitude_scores(model: nn.Module) -> Dict[str, torch.Tensor]:
    """``|W|`` for every prunable layer."""
    return {name: m.weight.detach().abs() for name, m in prunable_layers(model).items()}


def synflow_scores(model: nn.Module, example_inputs, handlers=None) -> Dict[str, torch.Tensor]:
    """SynFlow saliency ``a_in * theta * a_out`` of every weight (section 3.3.1).

    Computed with the CoNNect modified forward pass (normalized weights, BatchNorm and
    activations as identity, parameter-free skips left out), in log space so it stays finite in
    deep networks; each score is the share of ``phi_tot`` that flows through that weight. A
    network that is already disconnected scores 0 everywhere.
    """
    graph = ConnectivityGraph(model, example_inputs, "drop", handlers)
    layers = prunable_layers(model)
    return {name: s for name, s in graph.saliency().items() if name in layers}


def mlp_synflow_scores(weights: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """SynFlow saliency for a (batched) stack of linear layers, see :func:`mlp_log_connectivity`.

    Returns one tensor per layer, shaped like the weights: the share of each network's
    connectivity that flows through each weight (0 for disconnected networks).
    """
    thetas = [normalized_abs(w.detach(), batch_dims=w.dim() - 2).requires_grad_(True) for w in weights]
    with torch.enable_grad():
        log_phi = mlp_log_connectivity(thetas, normalize=False)
        finite = torch.isfinite(log_phi)
        grads = torch.autograd.grad(torch.where(finite, log_phi, torch.zeros_like(log_phi)).sum(), thetas)
    keep = finite.view(finite.shape + (1, 1))  # disconnected networks get NaN gradients from log(0)
    return [torch.where(keep, t * g, torch.zeros_like(t)).detach() for t, g in zip(thetas, grads)]


def snip_scores(
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    targets: torch.Tensor,
) -> Dict[str, torch.Tensor]:
    """SNIP connection sensitivity ``|W * dL/dW|`` on one batch (Lee et al., 2019).

    The model's existing ``.grad`` values are left untouched.
    """
    layers = prunable_layers(model)
    weights = [m.weight for m in layers.values()]
    with torch.enable_grad():
        loss = loss_fn(model(inputs), targets)
        grads = torch.autograd.grad(loss, weights, allow_unused=True)
    return {
        name: (w.detach() * (g if g is not None else torch.zeros_like(w))).abs()
        for name, w, g in zip(layers, weights, grads)
    }


def _check_sparsity(sparsity: float) -> None:
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1) (fraction of weights removed per layer), got {sparsity}")


def num_kept(numel: int, sparsity: float) -> int:
    """Weights kept in a layer of ``numel`` weights: ``numel - floor(sparsity * numel)`` (>= 1)."""
    _check_sparsity(sparsity)
    # the small tolerance keeps e.g. 0.96 * 25 (= 23.999999999999996 in floating point) at 24
    return numel - int(math.floor(sparsity * numel + 1e-9))


def layerwise_masks(scores, sparsity: float, batch_dims: int = 0):
    """Layer-local pruning: in every layer keep the highest-scoring weights.

    Each layer of ``n`` weights keeps ``n - floor(sparsity * n)`` of them (at least one), e.g.
    at 96% a 6x5 layer keeps 2 weights and a 5x1 layer keeps 1. Ties are broken by position.

    Args:
        scores: ``{name: score}`` (returns a dict) or a sequence of tensors (returns a list).
        sparsity: fraction of each layer's weights to remove, in ``[0, 1)``.
        batch_dims: leading dimensions that index independent networks (masks per network).

    Returns:
        Boolean masks shaped like the scores (True = keep).
    """
    _check_sparsity(sparsity)

    def one(score: torch.Tensor) -> torch.Tensor:
        flat = score.reshape(score.shape[:batch_dims] + (-1,))
        keep = num_kept(flat.shape[-1], sparsity)
        idx = flat.topk(keep, dim=-1, sorted=False).indices
        mask = torch.zeros_like(flat, dtype=torch.bool).scatter_(-1, idx, True)
        return mask.reshape(score.shape)

    if isinstance(scores, Mapping):
        return {name: one(s) for name, s in scores.items()}
    return [one(s) for s in scores]


class MaskHandle:
    """Keeps pruned weights at zero; ``remove()`` stops enforcing the masks."""

    def __init__(self, hooks: List[torch.utils.hooks.RemovableHandle]):
        self._hooks = hooks

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []


def apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> MaskHandle:
    """Zero the pruned weights of ``model`` and keep them zero during fine-tuning.

    Pruned entries get a zero gradient, so SGD / Adam (with or without coupled weight decay)
    never move them. With decoupled weight decay (AdamW) they also stay zero.

    Args:
        model: the model the masks were computed for.
        masks: ``{layer name: boolean keep-mask}`` as returned by :func:`layerwise_masks`.

    Returns:
        A :class:`MaskHandle`.
    """
    layers = prunable_layers(model)
    hooks = []
    for name, mask in masks.items():
        if name not in layers:
            raise KeyError(f"mask for {name!r}, which is not a Linear/Conv layer of the model; known: {sorted(layers)}")
        w = layers[name].weight
        if mask.shape != w.shape:
            raise ValueError(f"mask for {name!r} has shape {tuple(mask.shape)}, weight has {tuple(w.shape)}")
        keep = mask.to(device=w.device, dtype=w.dtype)
        with torch.no_grad():
            w.mul_(keep)
        hooks.append(w.register_hook(lambda g, keep=keep: g * keep))
    return MaskHandle(hooks)
