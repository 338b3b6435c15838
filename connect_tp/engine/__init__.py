"""The connectivity engine: one pass of a flow through a model's ``torch.fx`` graph, exact in float32.

CoNNect measures connectivity by pushing a non-negative flow through the network with every
weight replaced by its magnitude. The flow of a deep network grows or shrinks geometrically with
depth (an untrained ResNet-56 reaches e^160, a 200-layer MLP with small weights e^-416), far
outside float32. This module carries every intermediate value as ``value * exp(log_scale)``
(:class:`Scaled`): ``value`` is renormalized to a maximum of 1 after every layer and the
logarithm of the scale, a Python float, is carried alongside. Convolutions, linear layers,
eval-mode BatchNorm, ReLU, pooling, reshapes and residual sums are positively homogeneous in
(signal, additive constants), so dividing the constants (``|b|``, ``|beta|``, running means) by
the accumulated scale together with the signal keeps every value exact, and the detached scale
only adds a constant to ``log phi``: values and gradients are those of the plain forward pass, up
to float32 rounding, at any depth.

Five views of a network share the pass (:data:`VIEWS`); they differ in the edge map (what a
weight contributes) and in the node policy (what the other operations do):

* ``"signal"`` (CoNNect's importance, section 4.2 of the paper): edges ``|W|``, modules as they
  are, with ``|b|``, absolute norm affine parameters, BatchNorm as ``bn_flow`` says
  (:data:`connect_tp.connectivity.BN_FLOWS`), random non-negative inputs.
* ``"structure"`` (the collapse report, :func:`connect_tp.pruning.layer_report`): edges ``|W|``,
  no biases or other additive constants, BatchNorm as its scale ``|gamma| / sqrt(var + eps)``,
  an all-ones input: the weighted sum over input-output paths.
* ``"reach"`` (dead channels and collapse in the layer report): edges ``W != 0`` and every node
  clipped to {0, 1}: whether a path of non-zero weights exists.
* ``"normalized"`` (the regularizer, appendix B of the paper): edges ``theta = |W| / sum |W|``
  per layer (a channel scaler's ``|delta| / sum |delta|``), no biases, BatchNorm / norms /
  activations / dropout as the identity, max-pools as average pools, parameter-free skips left out
  (or kept), an all-ones input.
* ``"effective"`` (effective sparsity, :func:`connect_tp.sparsity.sparsity_report`): the
  ``"normalized"`` node policy on 0/1 edges ``W != 0``, every layer clipped to {0, 1}, a BatchNorm
  channel of scale exactly 0 cut, skips kept.

The last two run on :class:`AppendixBGraph` (a trace that keeps channel scalers and handler
modules as leaves, and the node policy :class:`_AppendixBPass`); they raise
:class:`UnsupportedModuleError` for an operation without a rule instead of falling back.

The modules that break a positive path sum (saturating and smooth activations, gates, norms,
zero-initialised layers, an output softmax, ``cat`` with constants) have rules of their own
(:mod:`.rules`). Other operations that are not homogeneous (a softmax inside attention, custom
modules) are evaluated on the materialized value ``value * exp(log_scale)``; if that does not fit
the dtype the pass raises :class:`NeedsFallback`, naming the module, and callers use the
traced-free path. Models that ``torch.fx`` cannot trace
(Hugging Face language models) take that path directly:
:func:`connect_tp.connectivity.log_connectivity_and_dtype`, a ``torch.func.functional_call``
forward with the same absolute-valued parameters, in the model's precision with float32 and
float64 retries.

The package, by idea:

* :mod:`.scaled`: :class:`Scaled`, :class:`NeedsFallback`, :class:`Binarize` and the arithmetic of
  scaled flows (``map_nested``, ``nested_leaves``, ``_wrap``, ``_materialize``, ``_affine``, ``_add``, ...).
* :mod:`.trace`: :func:`traced_graph` (the cached ``torch.fx`` trace) and the folding of an eval
  BatchNorm into the convolution it reads (``_AbsFoldedConv``).
* :mod:`.views`: :data:`VIEWS`, the pass (``_Pass``, the node policy of the ``"signal"``,
  ``"structure"`` and ``"reach"`` views), :func:`run_traced`, :func:`output_flow`,
  :func:`layer_flows`, and the two tests that let the importance differentiate one mean input:
  :func:`affine_by_signs` (from the graph alone) and :func:`affine_on_samples` (one pass).
* :mod:`.rules`: the signal view's rules for the modules that break a positive path sum
  (saturating and ReLU-like activations, gates, norms, zero-initialised layers, output softmax,
  ``cat`` with constants) and :class:`ConnectivityRuleWarning`; docs/engine.md says why each.
* :mod:`.appendix_b`: the ``"normalized"`` and ``"effective"`` views: :class:`AppendixBGraph`,
  ``_AppendixBPass``, :class:`LeafTracer`, the module and function rules
  (``appendix_b_module_kind``, :class:`UnsupportedModuleError`, ``Handler``).

Every name callers use is re-exported here, and callers outside the package look them up here
(``engine.run_traced``, ``from connect_tp.engine import X``): the tests replace
``connect_tp.engine.run_traced`` to count the passes of the importance and connectivity routes.
This package uses torch and ``torch.fx``; the appendix-B views take ``ChannelScaler`` and
``normalized_abs`` from :mod:`connect_tp.edges`, a module below both this package and
:mod:`connect_tp.regularizer` (which imports this package). :mod:`connect_tp.connectivity` builds
the signal view's inputs and checks its result.
"""
from . import appendix_b as _appendix_b, rules, scaled as _scaled, trace as _tracing, views as _views
from .appendix_b import AppendixBGraph, LeafTracer, UnsupportedModuleError
from .rules import ConnectivityRuleWarning
from .scaled import Binarize, NeedsFallback, Scaled, map_nested, nested_leaves
from .trace import traced_graph
from .views import (APPENDIX_B_VIEWS, VIEWS, affine_by_signs, affine_on_samples, layer_flows, locate_flow_loss,
                    output_flow, run_traced)

__all__ = ["APPENDIX_B_VIEWS", "AppendixBGraph", "Binarize", "ConnectivityRuleWarning", "LeafTracer", "VIEWS",
           "NeedsFallback", "Scaled", "UnsupportedModuleError", "affine_by_signs", "affine_on_samples", "layer_flows",
           "locate_flow_loss", "output_flow", "run_traced", "traced_graph"]

# Names outside __all__ that callers read as ``engine.X`` (as when the engine was one module).
Handler = _appendix_b.Handler
appendix_b_module_kind = _appendix_b.appendix_b_module_kind
_materialize = _scaled._materialize
_wrap = _scaled._wrap
_trace = _tracing._trace
_Pass = _views._Pass
_AppendixBPass = _appendix_b._AppendixBPass
