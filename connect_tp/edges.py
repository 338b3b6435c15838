"""The edge weights of the connectivity graph, shared by the engine and the regularizer.

Two pieces that both :mod:`connect_tp.engine` (the appendix-B views) and :mod:`connect_tp.regularizer`
need: :func:`normalized_abs`, equation (2) of the paper (a layer's ``|W| / sum |W|``), and
:class:`ChannelScaler`, the learnable per-channel factors ``delta`` of section 3.3.2, whose factors
are one more layer of edges. They live here, below both packages, so that neither package imports
the other's internals; this module uses torch alone. The regularizer re-exports both names
(``connect_tp.regularizer.ChannelScaler``, ``connect_tp.regularizer.flow.normalized_abs``).
"""
from __future__ import annotations

from typing import Dict

import torch
import torch.nn as nn

__all__ = ["ChannelScaler", "channel_scalers", "normalized_abs"]


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


def channel_scalers(model: nn.Module) -> Dict[str, ChannelScaler]:
    """All :class:`ChannelScaler` modules of ``model`` by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, ChannelScaler)}
