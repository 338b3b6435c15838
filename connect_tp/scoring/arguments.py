"""The checks of :class:`~connect_tp.importance.ConnectImportance`'s constructor arguments.

Every bad argument is a ``ValueError`` at construction that names the argument, what it got and
what it accepts.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Optional

__all__ = ["check_arguments"]

_REDUCTIONS = ("sum", "mean", "max", "prod", "first", "gate", None)
_NORMALIZERS = ("sum", "standarization", "mean", "max", "gaussian", "lamp", None)


def _is_number(x: Any) -> bool:
    """A real number that is not NaN and fits a float (``10**400`` does not; ``math.inf`` does)."""
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        return False
    try:
        return not math.isnan(float(x))
    except (OverflowError, TypeError, ValueError):
        return False


def _shown(x: Any) -> str:
    """``repr(x)``, shortened for numbers with hundreds of digits."""
    text = repr(x)
    return text if len(text) <= 40 else f"{text[:12]}...({len(text)} characters)"


def _check_normalizer(normalizer: Any) -> None:
    if callable(normalizer) or normalizer in _NORMALIZERS:
        return
    if isinstance(normalizer, str) and normalizer.startswith("sentinel_"):
        try:
            q = float(normalizer[len("sentinel_"):])
        except ValueError:
            q = float("nan")
        if 0 <= q < 1:
            return
    raise ValueError(f"unknown normalizer {normalizer!r}; choose one of {_NORMALIZERS}, "
                     "'sentinel_<q>' with 0 <= q < 1 (e.g. 'sentinel_0.5'), or a callable")


def _is_int(x: Any, low: int) -> bool:
    return not isinstance(x, bool) and isinstance(x, int) and x >= low


def check_arguments(lam: Optional[float], balance: Optional[float], n_samples: Any, group_reduction: Any,
                    normalizer: Any, bn_flow: Any, seed: Any, chunk_size: Any, balance_schedule: Any, *,
                    max_lambda: float, bn_flows: tuple, schedules: tuple) -> None:
    """Raise a ``ValueError`` naming the first bad argument (``balance`` is the resolved one)."""
    if lam is not None and not (_is_number(lam) and 0 <= lam <= max_lambda):
        raise ValueError(f"lam must be a number in [0, {max_lambda:g}], got {_shown(lam)}; for the "
                         "connectivity term alone use balance=math.inf")
    if balance is not None and not (_is_number(balance) and balance >= 0):
        raise ValueError(f"balance must be a number >= 0 that fits a float (math.inf allowed), "
                         f"got {_shown(balance)}")
    if not _is_int(n_samples, 1):
        raise ValueError(f"n_samples must be an integer >= 1, got {n_samples!r}")
    if group_reduction not in _REDUCTIONS:
        raise ValueError(f"unknown group_reduction {group_reduction!r}; choose one of {_REDUCTIONS}")
    _check_normalizer(normalizer)
    if bn_flow not in bn_flows:
        raise ValueError(f"unknown bn_flow {bn_flow!r}; choose one of {bn_flows}")
    if seed is not None and not _is_int(seed, 0):
        raise ValueError(f"seed must be an integer >= 0 or None, got {seed!r}")
    if chunk_size is not None and not _is_int(chunk_size, 1):
        raise ValueError(f"chunk_size must be an integer >= 1 or None, got {chunk_size!r}")
    if balance_schedule not in schedules:
        raise ValueError(f"unknown balance_schedule {balance_schedule!r}; choose one of {schedules}")
    if balance_schedule != "frozen" and (balance is None or balance in (0, math.inf)):
        given = f"lam={_shown(lam)}" if lam is not None else f"balance={balance!r}"
        raise ValueError(f"balance_schedule={balance_schedule!r} re-derives lambda from a finite, positive balance, "
                         f"but {given} fixes lambda for the whole run; use balance_schedule='frozen' or a "
                         "finite balance")
