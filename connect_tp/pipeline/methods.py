"""Pruning-criterion names, re-exported from :mod:`connect_tp.methods` where they now live."""
from ..methods import (BN_FLOW_NAMES, GRADIENT_METHODS, MAX_LAMBDA, NAMED_BN_FLOW, NORMALIZER_NAMES,  # noqa: F401
                       PRUNING_METHODS, connect_options, normalizer_of, parse_method)

__all__ = ["PRUNING_METHODS", "GRADIENT_METHODS", "NORMALIZER_NAMES", "NAMED_BN_FLOW", "MAX_LAMBDA", "BN_FLOW_NAMES",
           "parse_method", "connect_options", "normalizer_of"]
