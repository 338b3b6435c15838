"""connect_tp: CoNNect connectivity-based pruning for Torch-Pruning.

Importing the package is instant: each name below is imported on first use (so the ``connect-tp``
command line answers ``--help`` without loading torch); nothing else happens on import.

Example:
    >>> import torch_pruning as tp
    >>> from connect_tp import ConnectImportance
    >>> imp = ConnectImportance()  # where tp.importance.GroupTaylorImportance() would go
"""
import importlib
from typing import Any

# Where each public name lives; imported on first attribute access (PEP 562).
_LAZY = {
    # submodules that importing the package used to load (None: the module itself)
    "llm": None, "models": None, "connectivity": None, "importance": None, "regularizer": None, "sparsity": None,
    "unstructured": None,
    "ConnectivityError": "connectivity", "connectivity_inputs": "connectivity", "log_connectivity": "connectivity",
    "DEFAULT_BALANCE": "importance", "DEFAULT_BN_FLOW": "importance", "ConnectImportance": "importance",
    "ChannelScaler": "regularizer", "ChannelScalerPruner": "regularizer", "ConnectPruner": "regularizer",
    "ConnectRegularizer": "regularizer", "UnsupportedModuleError": "regularizer",
    "add_channel_scalers": "regularizer", "channel_connectivity_importance": "regularizer",
    "direct_sparsity": "sparsity", "effective_sparsity": "sparsity", "is_layer_collapsed": "sparsity",
    "sparsity_report": "sparsity",
    "layerwise_masks": "unstructured", "magnitude_scores": "unstructured", "snip_scores": "unstructured",
    "synflow_scores": "unstructured",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(f".{_LAZY[name] or name}", __name__)
    value = module if _LAZY[name] is None else getattr(module, name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


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
__version__ = "0.3.0"
