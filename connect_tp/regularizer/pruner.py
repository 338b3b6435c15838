"""Torch-Pruning integration: CoNNect sparse training and connectivity-ranked channel pruning.

Everything here speaks Torch-Pruning's interfaces. :class:`ChannelScalerPruner` tells its
dependency graph how to prune a :class:`~.channel_scaler.ChannelScaler`;
:class:`ChannelConnectivityImportance` is a ``tp.importance.Importance`` built on
:func:`~.channels.channel_connectivity_importance`; :class:`ConnectPruner` is a
``tp.pruner.BasePruner`` whose ``regularize(model)`` adds the gradient of
:class:`~.loss.ConnectRegularizer` and whose ``step()`` removes the weakest channels;
:func:`prune_channels` does one such step. This is the only module of the package that imports
``torch_pruning``; it uses all the others.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import torch
import torch.nn as nn
import torch_pruning as tp

from .channel_scaler import ChannelScaler, channel_scalers
from .channels import channel_connectivity_importance
from .loss import ConnectRegularizer
from ..engine import Handler

__all__ = ["ChannelConnectivityImportance", "ChannelScalerPruner", "ConnectPruner", "prune_channels"]


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
        >>> from connect_tp.regularizer import add_channel_scalers
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
        >>> from connect_tp.regularizer import add_channel_scalers
        >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
        >>> _ = add_channel_scalers(model)
        >>> prune_channels(model, torch.randn(1, 8), pruning_ratio=0.5)[0][0].out_features
        8
    """
    pruner = ConnectPruner(model, example_inputs, pruning_ratio=pruning_ratio, ignored_layers=ignored_layers, **kwargs)
    pruner.step()
    return model
