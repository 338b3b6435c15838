"""Normalized weights (equation 2) and the batched connectivity of plain MLPs.

``phi_tot`` of a deep network is a product of one small factor per layer (about one over the
layer width), so the naive forward pass underflows to 0 in float32 for, e.g., a 100-layer MLP or
ResNet-110. :func:`mlp_log_connectivity` therefore rescales the flow after every layer to unit
sum and carries the logarithm of the (detached) scale, which gives the exact ``log phi_tot`` and
exact gradients at any depth, batched over many small MLPs. Models in general go through the
connectivity engine (:mod:`connect_tp.engine`, views ``"normalized"`` and ``"effective"``), which
uses :func:`normalized_abs` as its edge map. :func:`normalized_abs` lives in :mod:`connect_tp.edges`
and ``Binarize`` in the engine; both are re-exported here.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..edges import normalized_abs
from ..engine import Binarize  # noqa: F401  (lives in the engine; kept importable here)

__all__ = ["Binarize", "mlp_log_connectivity", "normalized_abs"]


def mlp_log_connectivity(weights: Sequence[torch.Tensor], normalize: bool = True) -> torch.Tensor:
    """``log phi_tot`` of a stack of linear layers, batched over independent networks.

    The same quantity as the engine's ``"normalized"`` view (:class:`~connect_tp.regularizer.ConnectivityGraph`)
    for a plain MLP (biases and activations ignored), written with batched matrix products so that many
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
