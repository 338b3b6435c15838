"""connect_tp: CoNNect connectivity-based pruning for Torch-Pruning."""
from . import models

__all__ = ["models"]
__version__ = "0.1.0"
