"""connect_tp: CoNNect connectivity-based pruning for Torch-Pruning.

Importing the package imports torch and torch_pruning and nothing else happens.

Example:
    >>> import torch_pruning as tp
    >>> from connect_tp import ConnectImportance
    >>> imp = ConnectImportance()  # where tp.importance.GroupTaylorImportance() would go
"""
from . import llm, models
from .connectivity import ConnectivityError, connectivity_inputs, log_connectivity
from .importance import DEFAULT_BALANCE, DEFAULT_BN_FLOW, ConnectImportance
from .regularizer import (
    ChannelScaler,
    ChannelScalerPruner,
    ConnectPruner,
    ConnectRegularizer,
    UnsupportedModuleError,
    add_channel_scalers,
    channel_connectivity_importance,
)
from .sparsity import direct_sparsity, effective_sparsity, is_layer_collapsed, sparsity_report
from .unstructured import layerwise_masks, magnitude_scores, snip_scores, synflow_scores

__all__ = [
    "ConnectImportance",
    "DEFAULT_BALANCE",
    "DEFAULT_BN_FLOW",
    "ConnectivityError",
    "ConnectRegularizer",
    "ConnectPruner",
    "ChannelScaler",
    "ChannelScalerPruner",
    "UnsupportedModuleError",
    "add_channel_scalers",
    "channel_connectivity_importance",
    "direct_sparsity",
    "effective_sparsity",
    "is_layer_collapsed",
    "sparsity_report",
    "layerwise_masks",
    "magnitude_scores",
    "snip_scores",
    "synflow_scores",
    "connectivity_inputs",
    "log_connectivity",
    "llm",
    "models",
]
__version__ = "0.1.0"
