"""The connectivity flow in log space: normalized weights and a flow that cannot underflow.

``phi_tot`` of a deep network is a product of one small factor per layer (about one over the
layer width), so the naive forward pass underflows to 0 in float32 for, e.g., a 100-layer MLP or
ResNet-110. The pass therefore rescales the flow after every layer to unit sum and carries the
logarithm of the scale (:class:`Flow`), which gives the exact value of ``log phi_tot`` (and exact
gradients: the detached scale only adds a constant to the log) in any depth. This module holds
that representation, equation (2)'s :func:`normalized_abs`, the 0/1 reachability variant
(:class:`Binarize`) and :func:`mlp_log_connectivity`, the same computation batched over many
plain MLPs. It uses torch alone and knows nothing of modules or graphs.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch

__all__ = ["Binarize", "Flow", "align", "flows_in", "mlp_log_connectivity", "normalized_abs"]


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


class Flow:
    """Non-negative connectivity flow ``value * exp(log_scale)``; ``value`` has sum 1 (or is 0)."""

    __slots__ = ("value", "log_scale")

    def __init__(self, value: torch.Tensor, log_scale: torch.Tensor):
        self.value = value
        self.log_scale = log_scale

    def renormalized(self) -> "Flow":
        # The scale is detached: log(sum(y / s)) + log(s) equals log(sum(y)) for any constant s,
        # so values and gradients are exact while every intermediate stays O(1).
        s = self.value.detach().sum()
        s_safe = torch.where(s > 0, s, torch.ones_like(s))
        return Flow(self.value / s_safe, self.log_scale + torch.log(s_safe))

    def log_total(self) -> torch.Tensor:
        return torch.log(self.value.sum()) + self.log_scale


class Binarize(torch.autograd.Function):
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


def flows_in(obj) -> List[Flow]:
    """Every :class:`Flow` inside ``obj`` (a flow, or nested tuples / lists / dicts of them)."""
    if isinstance(obj, Flow):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [f for o in obj for f in flows_in(o)]
    if isinstance(obj, dict):
        return [f for o in obj.values() for f in flows_in(o)]
    return []


def align(flows: Sequence[Flow]) -> Tuple[List[torch.Tensor], torch.Tensor]:
    """Bring flows to a common scale (the largest), returning their values and that log-scale."""
    ref = torch.stack([f.log_scale for f in flows]).max()
    return [f.value * torch.exp(f.log_scale - ref) for f in flows], ref


def mlp_log_connectivity(weights: Sequence[torch.Tensor], normalize: bool = True) -> torch.Tensor:
    """``log phi_tot`` of a stack of linear layers, batched over independent networks.

    The same rescaled computation as :class:`~connect_tp.regularizer.ConnectivityGraph` for a
    plain MLP (biases and activations ignored), written with batched matrix products so that many
    small networks can be regularized at once (the layer-collapse benchmark trains 300 MLPs side
    by side).

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
