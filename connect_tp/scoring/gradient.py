"""The connectivity gradient ``d log phi_tot / dW`` of :class:`~connect_tp.importance.ConnectImportance`.

:class:`ConnectivityGradient` (a base of the importance) computes it once per change of the
model: through the engine's log-scaled pass (:mod:`connect_tp.engine`), ``chunk_size`` random
inputs at a time, or from the one mean input when the flow is affine on them
(``_traced_gradients``); else through the general pass of
:func:`connect_tp.connectivity.log_connectivity_and_dtype`, with a warning when the engine said
why. It records which pass ran (``engine_path``) and drops a gradient that is rounding noise
(a normalized output, ``_check_depends_on_weights``).
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .. import engine
from ..connectivity import (CENTRED_TOLERANCE, _EvalMode, _explained_input_errors, connectivity_inputs,
                            describe_output_layer, log_connectivity_and_dtype, traced_output)
from .cache import SEGMENT_BATCH_ELEMENTS, batches_of_elements

__all__ = ["ConnectivityGradient", "FLAT_CONNECTIVITY"]

#: Below this ``sum |W * d log phi / dW|`` the connectivity is taken as independent of the weights.
FLAT_CONNECTIVITY = 1e-6


class _NotBatched(Exception):
    """A connectivity input whose first dimension is not the batch of random samples."""


def _batch_slice(x: Any, n: int, start: int, stop: int) -> Any:
    """Samples ``start:stop`` of every batched tensor in a nested input of batch ``n``."""
    if start == 0 and stop == n:
        return x

    def cut(t: Any) -> Any:
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            return t
        if t.shape[0] != n:
            raise _NotBatched
        return t[start:stop]

    return engine.map_nested(x, cut)


class ConnectivityGradient:
    """The gradient part of :class:`~connect_tp.importance.ConnectImportance` (a base class).

    Reads the importance's ``n_samples``, ``seed``, ``bn_flow``, ``chunk_size`` and
    ``_use_loss``, and its input (``_inputs_for``).
    """

    def _init_gradient(self) -> None:
        self._dtype: Optional[torch.dtype] = None  # precision that last measured phi_tot finitely
        self._fallback_reason: Optional[str] = None  # why the last engine pass handed over to the general one
        self._flat = False  # whether the last connectivity gradient was rounding noise (a normalized output)
        self._warned_flat = self._warned_chunks = self._warned_fallback = False
        self.last_log_connectivity: Optional[float] = None
        #: Which pass computed the last connectivity gradient: ``"scaled-<dtype>"`` (the engine's
        #: log-scaled pass in the model's precision, e.g. ``"scaled-float32"``), ``"general-<dtype>"``
        #: (the traced-free ``functional_call`` pass, in the precision that measured phi finitely,
        #: e.g. ``"general-float64"``), or ``None`` before the first measurement.
        self.engine_path: Optional[str] = None
        #: Whether the last connectivity gradient came from the one mean input (the flow was affine
        #: on the random inputs, so the mean of their flows is the flow of their mean; docs/engine.md).
        self.used_mean_sample = False

    def _connectivity_gradients(self, model: nn.Module, params: Dict[str, torch.Tensor],
                                graph: Any = None) -> Dict[int, torch.Tensor]:
        """``{id(parameter): d log phi_tot / dW}`` of the model now, kept in float32 at least.

        Through the engine's pass when it can run the model, else the general pass; an empty dict
        when the gradient is rounding noise (the output does not depend on the weights' magnitudes).
        """
        inputs = self._inputs_for(model, graph)
        names = [n for n, p in params.items() if p.requires_grad]
        leaves = {n: params[n].detach().requires_grad_(True) for n in names}
        frozen = {n: p.detach() for n, p in params.items() if n not in leaves}
        native = next((p.dtype for p in params.values() if p.is_floating_point()), torch.float32)
        self._fallback_reason = None
        with torch.enable_grad():
            traced = self._traced_gradients(model, inputs, leaves, frozen) if self._dtype is None else None
            if traced is not None:
                self.last_log_connectivity, grads = traced
                self.engine_path = f"scaled-{str(native).replace('torch.', '')}"
            else:  # untraceable, not exactly representable, or a result the general path must judge
                if self.chunk_size is not None and self.chunk_size < self.n_samples and not self._warned_chunks:
                    self._warned_chunks = True
                    warnings.warn(f"ConnectImportance(chunk_size={self.chunk_size}) has no effect on this model: "
                                  "it takes the general (traced-free) connectivity pass, which runs all "
                                  f"n_samples={self.n_samples} inputs at once; lower n_samples to save memory",
                                  RuntimeWarning, stacklevel=2)
                log_phi, self._dtype = log_connectivity_and_dtype(
                    model, inputs, self.n_samples, self.seed, {**leaves, **frozen}, self._dtype, self.bn_flow)
                grads = torch.autograd.grad(log_phi, list(leaves.values()), allow_unused=True)
                self.last_log_connectivity = log_phi.item()
                del log_phi
                self.engine_path = f"general-{str(self._dtype or native).replace('torch.', '')}"
                if self._fallback_reason is not None and not self._warned_fallback:
                    self._warned_fallback = True
                    warnings.warn(f"ConnectImportance: the engine's log-scaled pass cannot run this model "
                                  f"({self._fallback_reason}); the connectivity gradient comes from the general "
                                  f"pass instead (torch.func.functional_call in {self.engine_path[8:]}), which is "
                                  "slower and keeps more activations. imp.engine_path says which pass ran.",
                                  RuntimeWarning, stacklevel=2)
        self.connectivity_evaluations += 1
        self._flat = self._check_depends_on_weights(model, inputs, names, params, grads)
        if self._flat:  # rounding noise, not a gradient: the connectivity term is dropped (warned)
            return {}
        # Kept in float32 at least: a half-precision copy would round the small gradients that lam multiplies.
        return {id(params[n]): g.to(torch.promote_types(params[n].dtype, torch.float32))
                for n, g in zip(names, grads) if g is not None}

    def _traced_gradients(self, model: nn.Module, inputs: Any, leaves: Dict[str, torch.Tensor],
                          frozen: Dict[str, torch.Tensor]) -> Optional[Tuple[float, List[Optional[torch.Tensor]]]]:
        """``log phi_tot`` and its gradient by the leaves, through the engine, ``chunk_size`` samples a pass.

        The random inputs are those of :func:`connect_tp.connectivity.log_connectivity` (one draw of
        ``n_samples``, split along the batch). Chunk ``c`` gives the sum ``S_c`` of its output at
        log scale ``s_c``; ``phi_tot = sum_c S_c e^{s_c} / n_samples`` and
        ``d log phi_tot = sum_c w_c d log S_c`` with ``w_c = S_c e^{s_c} / sum_j S_j e^{s_j}``. Each
        chunk's backward accumulates ``u_c d log S_c`` into the leaves' ``.grad`` (in place, so one
        gradient per parameter is alive), with ``u_c = e^{log S_c + s_c - top}`` relative to the
        largest chunk so far (``top``); when a later chunk is larger, the sum so far is rescaled,
        and at the end it is divided by ``sum_c u_c``. With one chunk this is the plain gradient of
        ``log S``. The pass keeps no layer outputs and frees each value after its last use.

        First, the flow is shown affine on the random inputs, from the graph when it can be
        (:func:`connect_tp.engine.affine_by_signs`: every ReLU sees non-negative flows only, as in a
        ReLU network with ``bn_flow="gamma"`` and no max-pool), else by a pass without gradients
        (:func:`connect_tp.engine.affine_on_samples`: every sample on the same linear piece of
        every ReLU, clamp and max-pool, and no other non-linearity). Then ``phi_tot`` (the mean of
        the samples' flows) and its gradient are those of the one mean input, and only that one is
        differentiated: a quarter of the activations at the default ``n_samples=4``, and a cheaper
        backward.

        Returns ``None`` (and leaves no ``.grad``) when the general path must measure instead: the
        model is not traceable, an operation cannot be represented exactly, an input is not
        batched, or a chunk's sum is not positive and finite (the general path then raises its
        explanation) or the output is centred.
        """
        with _EvalMode(model):  # traced as the pass runs it (a forward may branch on self.training)
            if engine.traced_graph(model) is None:
                return None
        n = self.n_samples
        generator = None if self.seed is None else torch.Generator().manual_seed(self.seed)
        samples = connectivity_inputs(model, inputs, n, generator)
        params = {**leaves, **frozen}
        self.used_mean_sample = False
        if n > 1 and isinstance(samples, torch.Tensor) and samples.is_floating_point():
            # the draws are uniform on [0, 1): a graph whose ReLUs only see non-negative flows needs no test pass
            with _EvalMode(model):  # the graph of the eval-mode trace, the one the pass runs
                affine = engine.affine_by_signs(model, self.bn_flow) and bool(samples.min() >= 0)
            if not affine:
                try:
                    with _EvalMode(model), _explained_input_errors(samples):
                        affine = engine.affine_on_samples(model, samples, params, self.bn_flow)
                except engine.NeedsFallback as exc:
                    self._fallback_reason = str(exc)
                    return None
            if affine:  # the mean of the n flows and its gradient are those of the mean input
                samples, n, self.used_mean_sample = samples.mean(0, keepdim=True), 1, True
        size = n if self.chunk_size is None else min(self.chunk_size, n)
        wanted = list(leaves.values())
        top, total_weight, magnitudes = -math.inf, 0.0, []

        def abandon() -> None:
            for leaf in wanted:
                leaf.grad = None

        for start in range(0, n, size):
            try:
                chunk = _batch_slice(samples, n, start, min(start + size, n))
                with _EvalMode(model), _explained_input_errors(chunk):
                    out, _ = engine.run_traced(model, chunk, params, "signal", self.bn_flow, layer_outputs=False)
            except (engine.NeedsFallback, _NotBatched) as exc:
                if isinstance(exc, engine.NeedsFallback):
                    self._fallback_reason = str(exc)
                return abandon()
            tensor, log_scale = traced_output(out)
            del out
            if log_scale is None or not tensor.requires_grad:
                return abandon()
            total = tensor.double().sum()
            value = float(total.detach())
            if not (math.isfinite(value) and value > 0):
                return abandon()
            magnitudes.append(math.log(float(tensor.detach().abs().sum(dtype=torch.float64))) + log_scale)
            log_sum = math.log(value) + log_scale
            if log_sum > top:
                if total_weight > 0:  # the sum so far, relative to the new largest chunk
                    factor = math.exp(top - log_sum)
                    torch._foreach_mul_([g for g in (leaf.grad for leaf in wanted) if g is not None], factor)
                    total_weight *= factor
                top = log_sum
            weight = math.exp(log_sum - top)
            total_weight += weight
            objective = torch.log(total) if weight == 1.0 else torch.log(total) * weight
            del tensor, total
            torch.autograd.backward(objective, inputs=wanted)
            del objective
        log_total = top + math.log(total_weight)
        magnitude = max(magnitudes)
        log_magnitude = magnitude + math.log(sum(math.exp(m - magnitude) for m in magnitudes))
        if log_total <= math.log(CENTRED_TOLERANCE) + log_magnitude:
            return abandon()
        grads = [leaf.grad for leaf in wanted]
        if total_weight != 1.0:
            torch._foreach_div_([g for g in grads if g is not None], total_weight)
        for leaf in wanted:
            leaf.grad = None
        return log_total - math.log(n), grads

    def _check_depends_on_weights(self, model: nn.Module, inputs: Any, names: List[str],
                                  params: Dict[str, torch.Tensor], grads: Sequence[Optional[torch.Tensor]]) -> bool:
        """Whether log phi_tot does not depend on the weights' magnitudes (a normalized output); warns once.

        ``sum |W * d log phi / dW|`` is about the number of layers on a path for any network whose
        output grows with its weights; it is 0 up to rounding when the last layer normalizes the
        output, e.g. a softmax (phi_tot is then the number of rows, a constant). At or below
        ``FLAT_CONNECTIVITY`` the gradient is rounding noise and the caller drops it: the scores
        are the loss term's alone (Taylor's), whichever strength was given.
        """
        pairs = [(params[n].detach(), g) for n, g in zip(names, grads) if g is not None]
        if pairs and len({(w.device, w.dtype, g.dtype) for w, g in pairs}) == 1:
            # multi-tensor kernels over batches of a few MB: the products of one batch alive at a time
            norms = []
            for part in batches_of_elements(pairs, SEGMENT_BATCH_ELEMENTS, size=lambda pair: pair[0].numel()):
                norms += torch._foreach_norm(torch._foreach_mul([w for w, _ in part], [g for _, g in part]), 1)
        else:
            norms = [torch.linalg.vector_norm(w * g, 1) for w, g in pairs]
        # Summed on the CPU: the parameters of a split model (device_map="auto") sit on several devices.
        mass = float(sum(x.to("cpu", torch.float64) for x in norms)) if norms else 0.0
        if mass > FLAT_CONNECTIVITY:
            return False
        if self._warned_flat or not self._use_loss:
            return True  # without a loss term the step raises, naming this cause
        self._warned_flat = True
        try:
            layer = describe_output_layer(model, connectivity_inputs(model, inputs, 1, torch.Generator().manual_seed(0)))
        except Exception:  # the description is a courtesy: never fail the step over it
            layer = "its last layer"
        warnings.warn(
            f"ConnectImportance: log phi_tot does not depend on the weights (sum |W * dlogphi/dW| = {mass:.2g}): "
            f"the model's output comes from {layer}, which normalizes it (a softmax, or a norm without "
            "affine), so the connectivity gradient is rounding noise: it is dropped and the scores are "
            "Taylor's (a balance resolves to lambda = 0). Prune a model that returns the values before that "
            "layer (e.g. the logits).",
            stacklevel=4,
        )
        return True

