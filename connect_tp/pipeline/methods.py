"""Pruning-criterion names, re-exported from :mod:`connect_tp.methods` where they now live."""
from ..methods import (GRADIENT_METHODS, NAMED_BN_FLOW, NORMALIZER_NAMES, PRUNING_METHODS,  # noqa: F401
                       connect_options, normalizer_of, parse_method)

__all__ = ["PRUNING_METHODS", "GRADIENT_METHODS", "NORMALIZER_NAMES", "NAMED_BN_FLOW", "parse_method",
           "connect_options", "normalizer_of"]
