"""The scaled representation of a flow and its arithmetic.

:class:`Scaled` is a tensor ``value * exp(log_scale)`` with ``value`` renormalized to a maximum of 1
and the log of the scale a Python float; :class:`NeedsFallback` is raised when a value cannot be
represented exactly. The helpers walk nested outputs (``map_nested``, ``nested_leaves``, ``_wrap``, ``_materialize``) and
combine flows at a common safe scale (``_affine``, ``_add``, ``_mul``, ``_div``, ``_multilinear``,
``_clamp``); :class:`Binarize` is the 0/1 indicator of the reachability views. Uses torch only.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterator, Mapping, Optional, Tuple

import torch


class Binarize(torch.autograd.Function):
    """Forward: reachable-from-input indicator; backward: reachable-to-output indicator.

    Used by the reachability views (``"reach"``, ``"effective"``): both directions stay in {0, 1},
    so path *existence* is computed exactly at any depth, with no underflow.
    """

    @staticmethod
    def forward(ctx, x):
        return (x > 0).to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        return (g > 0).to(g.dtype)


class NeedsFallback(RuntimeError):
    """The traced pass cannot represent this model exactly; use the traced-free path."""


class Scaled:
    """A tensor ``value * exp(log_scale)`` with ``max |value| <= 1`` after each renormalization."""

    __slots__ = ("value", "log_scale")

    def __init__(self, value: torch.Tensor, log_scale: float = 0.0):
        self.value = value
        self.log_scale = float(log_scale)

    def renormalized(self) -> "Scaled":
        peak = 0.0
        if self.value.numel():  # max |value| as max(max, -min): one pass, no |value| copy
            low, high = self.value.detach().aminmax()
            peak = float(torch.maximum(high, -low))
        if peak == 0.0:
            return self
        if not math.isfinite(peak):
            raise NeedsFallback("a layer's output is not finite even after rescaling")
        return Scaled(self.value / peak, self.log_scale + math.log(peak))

    def rescaled_to(self, log_scale: float) -> torch.Tensor:
        """``value`` expressed at ``log_scale`` (>= its own: the factor is at most 1)."""
        if log_scale == self.log_scale:
            return self.value
        return self.value * math.exp(self.log_scale - log_scale)

    def materialized(self) -> torch.Tensor:
        """The plain value; raises :class:`NeedsFallback` if it does not fit the dtype."""
        if self.log_scale == 0.0:
            return self.value
        finfo = torch.finfo(self.value.dtype)
        if self.log_scale > math.log(finfo.max) or self.log_scale < math.log(finfo.tiny) + 8:
            raise NeedsFallback(f"an operation that is not homogeneous sees a signal of scale e^{self.log_scale:.0f}")
        return self.value * math.exp(self.log_scale)

# ------------------------------------------------------------------------------------------ helpers
def _is_scaled(x: Any) -> bool:
    return isinstance(x, Scaled)


def nested_leaves(obj: Any) -> Iterator[Any]:
    """Every leaf of a nested structure: the items of tuples, lists and mappings, recursively."""
    if isinstance(obj, (tuple, list)):
        for o in obj:
            yield from nested_leaves(o)
    elif isinstance(obj, Mapping):
        for o in obj.values():
            yield from nested_leaves(o)
    else:
        yield obj


def _scaled_in(obj: Any) -> list:
    """Every :class:`Scaled` inside ``obj`` (nested tuples / lists / dicts)."""
    return [o for o in nested_leaves(obj) if isinstance(o, Scaled)]


def _any_scaled(obj: Any) -> bool:
    if isinstance(obj, Scaled):
        return True
    if isinstance(obj, (tuple, list)):
        return any(_any_scaled(o) for o in obj)
    if isinstance(obj, dict):
        return any(_any_scaled(o) for o in obj.values())
    return False


def map_nested(obj: Any, fn: Callable[[Any], Any]) -> Any:
    """``obj`` with ``fn`` applied to every leaf; tuples and lists keep their type, dicts become dicts."""
    if isinstance(obj, (tuple, list)):
        return type(obj)(map_nested(o, fn) for o in obj)
    if isinstance(obj, dict):
        return {k: map_nested(v, fn) for k, v in obj.items()}
    return fn(obj)


def _materialize(obj: Any) -> Any:
    return map_nested(obj, lambda o: o.materialized() if isinstance(o, Scaled) else o)


def _wrap(obj: Any) -> Any:
    """Floating-point tensors of a plain result become :class:`Scaled` at scale 1."""
    return map_nested(obj, lambda o: Scaled(o) if isinstance(o, torch.Tensor) and o.is_floating_point() else o)


def _as_tensor(c: Any, like: torch.Tensor) -> torch.Tensor:
    return c if isinstance(c, torch.Tensor) else torch.as_tensor(c, dtype=like.dtype, device=like.device)


def _affine(x: Scaled, linear: Callable[[torch.Tensor], torch.Tensor], const: Optional[torch.Tensor]) -> Scaled:
    """``linear(x) + const`` for a linear map and an additive constant, at a common safe scale.

    The new scale is the larger of the signal's and the constant's, so both enter with a factor of
    at most 1 and nothing overflows; the result is renormalized.
    """
    if const is None:
        return Scaled(linear(x.value), x.log_scale).renormalized()
    peak_const = const.detach().abs().amax()
    peak = float(peak_const)
    if peak == 0.0:  # added anyway when it carries a gradient (of zero), as the plain forward does
        out = linear(x.value)
        return Scaled(out + const if const.requires_grad else out, x.log_scale).renormalized()
    if not math.isfinite(peak):
        raise NeedsFallback("an additive constant is not finite")
    log_scale = max(x.log_scale, math.log(peak))
    out = linear(x.rescaled_to(log_scale)) + (const / peak_const) * math.exp(math.log(peak) - log_scale)
    return Scaled(out, log_scale).renormalized()


def _aligned(flows) -> Tuple[list, float]:
    log_scale = max(f.log_scale for f in flows)
    return [f.rescaled_to(log_scale) for f in flows], log_scale


def _add(a: Any, b: Any, alpha: float = 1.0) -> Any:
    if _is_scaled(a) and _is_scaled(b):
        (va, vb), log_scale = _aligned([a, b])
        return Scaled(va + alpha * vb, log_scale).renormalized()
    if _is_scaled(a):
        return _affine(a, lambda v: v, alpha * _as_tensor(b, a.value))
    return _affine(b, lambda v: alpha * v, _as_tensor(a, b.value))


def _mul(a: Any, b: Any) -> Any:
    if _is_scaled(a) and _is_scaled(b):
        return Scaled(a.value * b.value, a.log_scale + b.log_scale).renormalized()
    x, c = (a, b) if _is_scaled(a) else (b, a)
    return Scaled(x.value * c, x.log_scale).renormalized()


def _div(a: Any, b: Any) -> Any:
    if _is_scaled(a) and _is_scaled(b):
        return Scaled(a.value / b.value, a.log_scale - b.log_scale).renormalized()
    if _is_scaled(a):
        return Scaled(a.value / b, a.log_scale).renormalized()
    return Scaled(a / b.value, -b.log_scale).renormalized()


def _multilinear(fn: Callable, args: tuple, kwargs: dict) -> Scaled:
    """A function linear in each tensor argument (matmul, einsum): the scales of the flows add."""
    log_scale = sum(a.log_scale for a in args if _is_scaled(a))
    plain = tuple(a.value if _is_scaled(a) else a for a in args)
    return Scaled(fn(*plain, **kwargs), log_scale).renormalized()


def _clamp(x: Scaled, low: Optional[float], high: Optional[float]) -> Scaled:
    """``clamp(x, low, high)``: the thresholds are divided by the scale (an exact rescaling)."""
    def scaled(t: Optional[float]) -> Optional[float]:
        if t is None or t == 0:
            return t
        try:
            return t * math.exp(-x.log_scale)
        except OverflowError:
            return math.copysign(math.inf, t)
    return Scaled(torch.clamp(x.value, scaled(low), scaled(high)), x.log_scale)
