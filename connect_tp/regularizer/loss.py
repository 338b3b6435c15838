"""The CoNNect regularizer ``R(W) = -log phi_tot(W)`` as a training-time penalty (equation 6).

:class:`ConnectRegularizer` wraps a :class:`~.graph.ConnectivityGraph` of the model: calling it
gives a differentiable scalar to add to the loss, and :meth:`ConnectRegularizer.add_grad_` adds
``lambda * dR/dW`` straight to the gradients after ``loss.backward()``, for training loops that
regularize that way (Torch-Pruning's ``pruner.regularize(model)``, see :mod:`.pruner`). It uses
torch, :mod:`.graph` (the engine's ``"normalized"`` view), :mod:`connect_tp.engine` (for the
``Handler`` type) and :mod:`.channel_scaler`.
"""
from __future__ import annotations

import warnings
from typing import List, Mapping, Optional

import torch
import torch.nn as nn

from .channel_scaler import ChannelScaler
from .graph import ConnectivityGraph
from ..engine import Handler

__all__ = ["ConnectRegularizer"]


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
