"""Learnable per-channel scaling factors ``delta`` (section 3.3.2 of the paper).

Structured CoNNect puts a :class:`ChannelScaler` after convolutions / linear layers; the
connectivity pass normalizes its factors like a layer's weights, so the regularizer drives the
factors of uninformative channels to zero. This module holds only the ``nn.Module`` and a finder;
it uses torch alone, so every other module of the package may import it (placing scalers in a
model is :mod:`.channels`, pruning them with Torch-Pruning is :mod:`.pruner`).
"""
from __future__ import annotations

from typing import Dict

import torch
import torch.nn as nn

__all__ = ["ChannelScaler", "channel_scalers"]


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
