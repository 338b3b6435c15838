"""Names of the pruning criteria, and how a name with options is read.

This module only parses names (no torch import), so that the command line can check
``--methods`` before any heavy import; :mod:`connect_tp.pruning` turns a name into a Torch-Pruning
importance object and re-exports these functions. :func:`parse_method` also checks the range of
every number a name carries (a balance ``kappa >= 0``, a finite ``lambda >= 0``), so a bad name is
refused before any model or data is loaded.

``connect`` takes options in its name: ``connect-k<kappa>`` (balance, ``inf`` allowed),
``connect-lam<lambda>`` (the absolute form) and ``-bn<stats|gamma|scale|identity>``, e.g.
``connect-k3-bngamma``. ``connect``, ``taylor``, ``l1`` and ``l2`` also take ``-norm<normalizer>``
last (:data:`NORMALIZER_NAMES`), Torch-Pruning's per-group score normalization (``mean`` when
absent, its default and the protocol's), e.g. ``connect-k100-bngamma-normsum`` or ``l1-normsum``.
``lamp``, ``random`` and ``uniform`` take no options.

A name with options means the same criterion whatever the library's defaults: without ``-bn`` it
is ``bn_flow="stats"``, the treatment every such name meant when the ranking benchmark's results
were made (:func:`connect_options`). Plain ``connect`` is ``ConnectImportance()``, the library
defaults of the day, and the ``connect-tp`` pipeline records them in the run's fingerprints.
"""
from __future__ import annotations

import math
import re
from typing import Any, Dict, Optional, Tuple

__all__ = ["PRUNING_METHODS", "GRADIENT_METHODS", "NORMALIZER_NAMES", "NAMED_BN_FLOW", "MAX_LAMBDA", "BN_FLOW_NAMES",
           "parse_method", "connect_options", "normalizer_of"]

PRUNING_METHODS = ("connect", "taylor", "l1", "l2", "lamp", "random", "uniform")
"""Importance criteria known to :func:`connect_tp.pruning.build_importance` (``connect`` also takes options)."""

GRADIENT_METHODS = frozenset({"connect", "taylor"})
"""Methods whose importance needs ``loss.backward()`` on calibration data before each step."""

NORMALIZER_NAMES = ("mean", "sum", "max", "none", "standarization", "gaussian")
"""Normalizers a ``-norm<name>`` suffix may name (Torch-Pruning's spelling; ``none`` is ``normalizer=None``)."""

MAX_LAMBDA = 1e12
"""Largest ``-lam<lambda>`` a name may give (:data:`connect_tp.importance.MAX_LAMBDA`, kept torch-free here)."""

BN_FLOW_NAMES = ("stats", "gamma", "scale", "identity")
"""BatchNorm treatments a ``-bn<flow>`` suffix may name (:data:`connect_tp.connectivity.BN_FLOWS`)."""

_NORMALIZABLE = ("connect", "taylor", "l1", "l2")  # the others fix their own normalization (LAMP) or have none
_NORM_SUFFIX = re.compile(r"-norm(?P<norm>[a-z]*)$")
_CONNECT_SPEC = re.compile(r"^connect(?:-k(?P<balance>inf|[0-9.e+-]+))?(?:-lam(?P<lam>[0-9.e+-]+))?"
                           r"(?:-bn(?P<bn_flow>[a-z]+))?$")


def parse_method(method: str) -> Tuple[str, Dict[str, Any]]:
    """Split a method name into the criterion and its options.

    Raises:
        ValueError: an unknown method, malformed options, or a number out of range (a negative
            kappa, a lambda outside ``[0, MAX_LAMBDA]``, kappa and lambda both given), naming the
            accepted forms.

    Example:
        >>> parse_method("connect-k3-bngamma")
        ('connect', {'balance': 3.0, 'bn_flow': 'gamma'})
    """
    suffix = _NORM_SUFFIX.search(method)
    if suffix is not None:
        base, norm = method[:suffix.start()], suffix["norm"]
        if norm not in NORMALIZER_NAMES:
            raise ValueError(f"unknown normalizer {norm!r} in pruning method {method!r}; choose one of "
                             f"{list(NORMALIZER_NAMES)}")
        criterion, options = parse_method(base)
        if criterion not in _NORMALIZABLE or "normalizer" in options:
            raise ValueError(f"pruning method {method!r}: only {list(_NORMALIZABLE)} take one -norm<normalizer> "
                             "suffix (LAMP fixes its own normalization; random and uniform have none)")
        return criterion, dict(options, normalizer=norm)
    if method in PRUNING_METHODS:
        return method, {}
    match = _CONNECT_SPEC.match(method)
    if match is None:
        raise ValueError(f"unknown pruning method {method!r}; choose one of {list(PRUNING_METHODS)}, or "
                         "connect-k<kappa>[-bn<stats|gamma|scale|identity>] / connect-lam<lambda>[-bn...], each "
                         "optionally ending in -norm<normalizer>")
    options: Dict[str, Any] = {}
    try:
        if match["balance"] is not None:
            options["balance"] = math.inf if match["balance"] == "inf" else float(match["balance"])
        if match["lam"] is not None:
            options["lam"] = float(match["lam"])
    except ValueError:
        raise ValueError(f"malformed number in pruning method {method!r}") from None
    # Every range ConnectImportance checks is checked here too, so a bad name is refused before
    # the base model and the data are loaded.
    if "balance" in options and "lam" in options:
        raise ValueError(f"pruning method {method!r} gives both a balance (-k) and a lambda (-lam); give one")
    balance = options.get("balance")
    if balance is not None and not (balance >= 0 and (math.isfinite(balance) or match["balance"] == "inf")):
        raise ValueError(f"pruning method {method!r}: the balance kappa must be a finite number >= 0, or inf for "
                         f"the connectivity term alone (connect-kinf), got {match['balance']}")
    lam = options.get("lam")
    if lam is not None and not (0 <= lam <= MAX_LAMBDA):
        raise ValueError(f"pruning method {method!r}: lambda must be a number in [0, {MAX_LAMBDA:g}], got "
                         f"{match['lam']}; for the connectivity term alone use connect-kinf")
    if match["bn_flow"] is not None:
        if match["bn_flow"] not in BN_FLOW_NAMES:
            raise ValueError(f"pruning method {method!r}: unknown BatchNorm treatment -bn{match['bn_flow']}; "
                             f"choose one of {', '.join('-bn' + f for f in BN_FLOW_NAMES)}")
        options["bn_flow"] = match["bn_flow"]
    return "connect", options


NAMED_BN_FLOW = "stats"
"""BatchNorm treatment of a ``connect-k<kappa>`` / ``connect-lam<lambda>`` name without ``-bn``."""


def connect_options(method: str) -> Dict[str, Any]:
    """The :class:`~connect_tp.importance.ConnectImportance` arguments a ``connect`` name fixes.

    Plain ``connect`` fixes none (the library defaults apply). A name with a strength fixes the
    BatchNorm treatment too: :data:`NAMED_BN_FLOW` unless it says ``-bn<flow>``, so that a name
    never changes meaning when a default does.

    Example:
        >>> connect_options("connect-k100")
        {'balance': 100.0, 'bn_flow': 'stats'}
        >>> connect_options("connect")
        {}
    """
    name, options = parse_method(method)
    if name != "connect":
        raise ValueError(f"{method!r} is not a connect method")
    if "normalizer" in options:
        options["normalizer"] = _normalizer_arg(options["normalizer"])
    if set(options) - {"normalizer"} and "bn_flow" not in options:
        options["bn_flow"] = NAMED_BN_FLOW
    return options


def normalizer_of(method: str) -> Optional[str]:
    """The Torch-Pruning ``normalizer`` argument a method name asks for (``"mean"`` without ``-norm``).

    Example:
        >>> normalizer_of("l1-normnone") is None, normalizer_of("connect-k100-normsum"), normalizer_of("l2")
        (True, 'sum', 'mean')
    """
    return _normalizer_arg(parse_method(method)[1].get("normalizer", "mean"))


def _normalizer_arg(name: str) -> Optional[str]:
    return None if name == "none" else name
