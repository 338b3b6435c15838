"""The CoNNect regularizer: connectivity of the normalized network, as a training-time penalty.

CoNNect (Franssen et al., TMLR 2025, section 3.3) measures how well the input layer of a network
is connected to its output layer. Every learnable layer ``k`` is replaced by its *normalized*
absolute weights ``theta_k = |W_k| / sum |W_k|``; the connectivity ``phi_tot`` is the sum, over
all input-output paths, of the product of normalized weights along the path. It is computed by
one modified forward pass on an all-ones input (appendix B): convolutions and linear layers use
``theta`` and no bias, BatchNorm / activations / dropout are the identity, max-pooling becomes
average-pooling and parameter-free identity skips are left out. The regularizer is

    R(W) = -log phi_tot(W),

which goes to +inf as the network disconnects, so gradient descent cannot reach layer collapse.
The pass carries the flow in log space, so ``log phi_tot`` and its gradients are exact at any
depth (a naive float32 pass underflows to 0 for, e.g., ResNet-110).

Structured (channel-level) CoNNect (section 3.3.2) inserts a learnable per-channel scaling
factor ``delta`` (:class:`ChannelScaler`) after convolutions / linear layers. The scalers are
normalized like any other layer, so the regularizer drives the factors of uninformative channels
to zero, and :func:`channel_connectivity_importance` ranks channels by the connectivity that flows
through them. :class:`ConnectPruner` plugs both into Torch-Pruning: ``regularize(model)`` adds
``lambda * dR/dW`` to the gradients in a sparse-training loop, ``step()`` removes the weakest
channels with Torch-Pruning's dependency graph.

This package re-exports its public names; each module holds one idea and may import only the
modules listed before it:

* :mod:`.flow`: ``normalized_abs`` (equation 2), ``mlp_log_connectivity`` (batched plain MLPs).
* :mod:`.channel_scaler`: the ``ChannelScaler`` module.
* :mod:`.graph`: ``ConnectivityGraph``, the public name of the connectivity engine's appendix-B
  views (:class:`connect_tp.engine.AppendixBGraph`: the rules for every operation, the log-space
  flow and ``UnsupportedModuleError`` live in :mod:`connect_tp.engine`).
* :mod:`.loss`: ``ConnectRegularizer``, ``R = -log phi_tot``.
* :mod:`.channels`: ``add_channel_scalers``, ``channel_connectivity_importance``.
* :mod:`.pruner`: the Torch-Pruning hooks (``ConnectPruner`` and friends).

Example:
    >>> import torch, torch.nn as nn
    >>> from connect_tp.regularizer import ConnectRegularizer
    >>> model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 5), nn.ReLU(), nn.Linear(5, 1))
    >>> reg = ConnectRegularizer(model, example_inputs=torch.randn(1, 6))
    >>> loss = nn.functional.mse_loss(model(torch.randn(8, 6)), torch.zeros(8, 1)) + 0.1 * reg()
    >>> loss.backward()
"""
from .channel_scaler import ChannelScaler, channel_scalers
from .channels import add_channel_scalers, channel_connectivity_importance
from .flow import mlp_log_connectivity, normalized_abs
from .graph import ConnectivityGraph
from .loss import ConnectRegularizer
from ..engine import UnsupportedModuleError
from .pruner import ChannelConnectivityImportance, ChannelScalerPruner, ConnectPruner, prune_channels

__all__ = [
    "ChannelScaler",
    "ChannelScalerPruner",
    "ConnectivityGraph",
    "ConnectRegularizer",
    "ConnectPruner",
    "ChannelConnectivityImportance",
    "UnsupportedModuleError",
    "add_channel_scalers",
    "channel_connectivity_importance",
    "channel_scalers",
    "mlp_log_connectivity",
    "normalized_abs",
    "prune_channels",
]
