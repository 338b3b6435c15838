"""connect_tp: CoNNect connectivity-based pruning for Torch-Pruning.

Importing the package imports torch and torch_pruning and nothing else happens.

Example:
    >>> import torch_pruning as tp
    >>> from connect_tp import ConnectImportance
    >>> imp = ConnectImportance()  # where tp.importance.GroupTaylorImportance() would go
"""
from . import models
from .connectivity import ConnectivityError, connectivity_inputs, log_connectivity
from .importance import DEFAULT_LAMBDA, ConnectImportance

__all__ = [
    "ConnectImportance",
    "DEFAULT_LAMBDA",
    "ConnectivityError",
    "connectivity_inputs",
    "log_connectivity",
    "models",
]
__version__ = "0.1.0"
