"""When :class:`~connect_tp.importance.ConnectImportance` recomputes the connectivity gradient.

The gradient ``d log phi_tot / dW`` depends on every parameter and buffer of the model, so it is
cached under a fingerprint of the model's state (:func:`state_key`: identities, versions,
shapes and two value sums per tensor, which also tell whether every value is finite).
Torch-Pruning scores every group of a step before the model changes, so inside its pruners (and
:class:`connect_tp.llm.LLMBlockPruner`) the fingerprint is taken once per step, a *sweep*
(:class:`CachedGradient`); scoring by hand fingerprints at every call, so it never reads a stale
gradient. :func:`check_not_meta` and :func:`check_finite` name a model that cannot be scored.
"""
from __future__ import annotations

import math
import sys
import weakref
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

__all__ = ["CachedGradient", "batches_of_elements", "called_from_a_pruner", "check_finite", "check_not_meta",
           "state_key"]

SEGMENT_BATCH_ELEMENTS = 1 << 22  # the state fingerprint sums tensors in flat batches of at most this size


#: Modules whose loops score every group of a step before the model changes (and, for local
#: pruning, change only the group just scored): Torch-Pruning's pruners and the LLM block pruner.
_SWEEPING_CALLERS = ("torch_pruning.pruner.", "connect_tp.llm")


def called_from_a_pruner(depth: int = 12) -> bool:
    """Whether one of the :data:`_SWEEPING_CALLERS` is among the ``depth`` innermost calling frames."""
    frame = sys._getframe(1)
    for _ in range(depth):
        if frame is None:
            return False
        if frame.f_globals.get("__name__", "").startswith(_SWEEPING_CALLERS):
            return True
        frame = frame.f_back
    return False


def batches_of_elements(items: Sequence[Any], limit: int,
                         size: Callable[[Any], int] = lambda t: t.numel()) -> List[List[Any]]:
    """Consecutive runs of ``items`` holding at most ``limit`` elements each (a larger item alone)."""
    batches: List[List[Any]] = []
    filled = limit + 1
    for item in items:
        if filled + size(item) > limit:
            batches.append([])
            filled = 0
        batches[-1].append(item)
        filled += size(item)
    return batches


def check_not_meta(model: nn.Module) -> None:
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.device.type == "meta":
            raise ValueError(
                f"ConnectImportance cannot score a model on the meta device ({name!r} has no data): materialize "
                "its weights first (e.g. model.to_empty(device=...) and load a state dict)")


def check_finite(params: Dict[str, torch.Tensor]) -> None:
    for name, p in params.items():
        if p.is_floating_point() and not bool(torch.isfinite(p).all()):
            bad = "NaN" if bool(torch.isnan(p).any()) else "infinite"
            raise ValueError(f"parameter {name!r} holds {bad} values: CoNNect cannot score a model with "
                             "non-finite weights; check the training run that produced them")


def state_key(model: nn.Module) -> Tuple[tuple, bool]:
    """What the connectivity gradient depends on, and whether every value is finite.

    The key holds every parameter's and floating-point buffer's identity, version, shape,
    dtype, device and ``requires_grad``, and two value fingerprints per tensor (its sum and its L1 norm). Pruning
    replaces parameters and optimizer steps bump ``_version``, but edits through ``.data`` and
    BatchNorm re-estimation do neither, so the values enter the key too; the L1 norms are
    computed with one multi-tensor kernel per dtype and double as the finiteness check.
    """
    tensors = list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()]
    # requires_grad too: the gradient is computed for the parameters that require one (a streamed
    # LLM step scores one layer at a time by switching it), so a new set needs a new gradient
    ident = tuple((id(t), t._version, tuple(t.shape), t.dtype, str(t.device), t.requires_grad) for t in tensors)
    tensors = [t.detach() for t in tensors]
    if not tensors:
        return ident, True
    by_kind: Dict[Tuple[torch.dtype, torch.device], List[torch.Tensor]] = {}
    for t in tensors:
        by_kind.setdefault((t.dtype, t.device), []).append(t)
    parts = []
    with torch.no_grad():
        for group in by_kind.values():
            parts.append(torch.stack(torch._foreach_norm(group, 1)).to(torch.float64))
            # every tensor's sum from flat copies of a few MB (one segmented reduction per batch,
            # not one call per tensor); a tensor larger than a batch is summed by itself
            for batch in batches_of_elements(group, SEGMENT_BATCH_ELEMENTS):
                if len(batch) == 1:
                    parts.append(batch[0].sum().reshape(1).to(torch.float64))
                    continue
                try:
                    lengths = torch.tensor([t.numel() for t in batch], device=batch[0].device)
                    flat = torch.cat([t.reshape(-1) for t in batch])
                    parts.append(torch.segment_reduce(flat, "sum", lengths=lengths, unsafe=True).to(torch.float64))
                    del flat
                except RuntimeError:  # a dtype or device without a segmented sum
                    parts += [t.sum().reshape(1).to(torch.float64) for t in batch]
    values = torch.cat([p.cpu() for p in parts]).tolist()
    return ident + tuple(values), all(math.isfinite(v) for v in values)


class CachedGradient:
    """The caching part of :class:`~connect_tp.importance.ConnectImportance` (a base class).

    Holds the connectivity gradients by parameter identity, the fingerprint they were computed
    under and the sweep being scored. :meth:`_full_refresh` asks the importance for the steps that
    belong to the CoNNect score: ``_prepare_lambda`` (a new model or schedule), ``_decide_loss``,
    ``_connectivity_gradients`` and ``_after_refresh`` (the balance's lambda).
    """

    def _init_cache(self) -> None:
        self._cache_key: Optional[tuple] = None
        self._connectivity_grads: Dict[int, torch.Tensor] = {}
        self._cached_params: Dict[int, "weakref.ref[torch.Tensor]"] = {}
        self._sweep_model: Optional[nn.Module] = None
        self._sweep_roots: set = set()
        self._sweep_params: List[torch.Tensor] = []

    _reset_cache = _init_cache

    @staticmethod
    def _sweep_root(group) -> Optional[tuple]:
        """The layer and pruning function a group is rooted at (Torch-Pruning asks for each once per step)."""
        try:
            dep, _ = next(iter(group))
        except (StopIteration, TypeError, ValueError):
            return None
        return (id(dep.target.module), dep.handler)

    def _is_cached(self, group) -> bool:
        """Whether the cached connectivity gradients still belong to the parameters this group scores."""
        if self.lam == 0:
            return True
        for dep, _ in group:
            layer = dep.target.module
            for p in (getattr(layer, "weight", None), getattr(layer, "bias", None)):
                if isinstance(p, nn.Parameter) and p.requires_grad:
                    ref = self._cached_params.get(id(p))
                    if ref is None or ref() is not p:
                        return False
        return True

    def _refresh(self, model: nn.Module, graph: Any = None, group: Any = None) -> None:
        """Decide whether this call uses the loss; make sure d log phi_tot / dW is that of the model now.

        Torch-Pruning scores every group once per pruning step (a *sweep*) and changes the model only
        between steps (global pruning) or right after scoring a group (local pruning, which replaces
        that group's parameters). The model's state is therefore fingerprinted (and the gradient
        recomputed if it changed) at the first call of each sweep, that is whenever a group's root is
        scored a second time or a group's parameters are not those the cache was computed for; the
        other calls of the sweep only decide, per call, whether loss gradients exist. A call from
        anywhere else (a user scoring groups by hand, who may edit weights in between) fingerprints
        the model every time, so it never reads a stale gradient.
        """
        root = self._sweep_root(group) if group is not None else None
        new_sweep = (model is not self._sweep_model or root is None or root in self._sweep_roots
                     or not self._is_cached(group) or not called_from_a_pruner())
        if new_sweep:
            self._full_refresh(model, graph)
            self._sweep_model, self._sweep_roots = model, set()
        else:
            self._decide_loss(self._sweep_params)
        if root is not None:
            self._sweep_roots.add(root)

    def _full_refresh(self, model: nn.Module, graph: Any = None, resolve: bool = True) -> None:
        """Fingerprint the model; recompute the connectivity gradient if it changed (``resolve``: and lambda)."""
        params = dict(model.named_parameters())
        check_not_meta(model)
        self._sweep_params = list(params.values())
        self._prepare_lambda(model, resolve)
        self._decide_loss(self._sweep_params)
        key, finite = state_key(model)
        if not finite:
            check_finite(params)
        if self.lam == 0:
            return
        if key != self._cache_key:
            self._connectivity_grads, self._cached_params = {}, {}  # free the stale ones first
            self._connectivity_grads = self._connectivity_gradients(model, params, graph)
            # the parameters the gradient was computed for (a streamed LLM step switches requires_grad)
            self._cached_params = {id(p): weakref.ref(p) for p in params.values() if p.requires_grad}
            self._cache_key = key
        self._after_refresh(model, resolve)
