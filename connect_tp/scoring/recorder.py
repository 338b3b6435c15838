"""Where :class:`~connect_tp.importance.ConnectImportance` gets the model's input structure.

Torch-Pruning traces the model with its ``example_inputs`` but does not hand them to the
importance. :class:`InputRecorder` (global forward hooks, installed when the importance is built)
keeps the input structure of every top-level call, and reads Torch-Pruning's own example tensor
when its trace first tries the unbatched call ``model(*example_inputs)``;
:func:`inputs_from_graph` reads the input back from a dependency graph's autograd nodes for an
importance built after the trace. :class:`RecordedInputs` (a base of the importance) chooses among
the given input, the recorded one and the graph's, per model, and :func:`follow_model` moves
an input to the model's device and dtype. Only structure is kept (:class:`TensorSpec`), never an
activation.
"""
from __future__ import annotations

import sys
import weakref
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn

from ..engine import map_nested

__all__ = ["InputRecorder", "RecordedInputs", "TensorSpec", "follow_model", "inputs_from_graph",
           "model_dtype_device", "pruner_trace_input"]


@dataclass(frozen=True, eq=False)
class TensorSpec:
    """Shape (beyond the batch dimension), dtype and device of one recorded input tensor.

    Integer and bool tensors (token ids, masks, position ids) also keep their first sample, so
    side inputs are replayed with valid values; floating-point activations are never kept.
    """

    shape: Tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    first: Optional[torch.Tensor] = None

    @classmethod
    def of(cls, x: Any) -> Any:
        """Replace every tensor in a nested input by its spec, so no activation stays alive."""
        def spec(t: Any) -> Any:
            if not isinstance(t, torch.Tensor):
                return t
            first = None
            if not t.is_floating_point() and not t.is_complex() and t.dim() > 0:
                first = t[:1].detach().clone()
            return cls(tuple(t.shape[1:]), t.dtype, t.device, first)
        return map_nested(x, spec)

    @classmethod
    def of_batch(cls, x: Any) -> Any:
        """The first sample of every tensor in ``x`` (the structure the connectivity pass needs)."""
        return map_nested(x, lambda t: t[:1].detach() if isinstance(t, torch.Tensor) and t.dim() > 0 else t)

    @classmethod
    def materialize(cls, x: Any) -> Any:
        """Inverse of :meth:`of`: one-sample tensors (zeros for floats, the kept sample otherwise)."""
        def tensor(s: Any) -> Any:
            if not isinstance(s, cls):
                return s
            if s.first is not None:
                return s.first.clone()
            return torch.zeros((1,) + s.shape, dtype=s.dtype, device=s.device)
        return map_nested(x, tensor)


_CALL_FAILED = object()


class InputRecorder:
    """Remembers the structure of the input each top-level model was last called with.

    Torch-Pruning's pruner traces the model with its ``example_inputs`` but does not hand them to
    the importance. Global forward hooks installed when the importance is built see that trace
    (and the user's own forward passes) and keep the input structure of every successful top-level
    call, so ``ConnectImportance()`` works without arguments in Torch-Pruning's usual loop. The
    hooks are removed as soon as the importance has what it needs, so they cost nothing afterwards.
    """

    def __init__(self) -> None:
        self.inputs: "weakref.WeakKeyDictionary[nn.Module, Any]" = weakref.WeakKeyDictionary()
        self._depth = 0
        self._handles = [
            nn.modules.module.register_module_forward_pre_hook(self._enter),
            nn.modules.module.register_module_forward_hook(self._exit, with_kwargs=True, always_call=True),
        ]

    def _enter(self, module: nn.Module, args: Tuple[Any, ...]) -> None:
        self._depth += 1

    def _exit(self, module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any],
              output: Any = _CALL_FAILED) -> None:
        # A failed call (Torch-Pruning first tries model(*example_inputs)) has no output.
        self._depth = max(0, self._depth - 1)
        if self._depth > 0 or output is _CALL_FAILED:
            return
        traced = pruner_trace_input()
        if isinstance(traced, torch.Tensor):
            # Torch-Pruning's first try, model(*example_inputs), unbinds a tensor along its batch
            # dimension and succeeds on models that accept one unbatched sample (an MLP, an
            # attention block): the input is the example tensor, not the sample the model saw.
            self.inputs[module] = TensorSpec.of(traced)
        elif kwargs and not args:
            self.inputs[module] = TensorSpec.of(dict(kwargs))
        elif len(args) == 1 and not kwargs:
            self.inputs[module] = TensorSpec.of(args[0])
        elif args and not kwargs:
            self.inputs[module] = TensorSpec.of(tuple(args))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


_NOT_TRACING = object()


def pruner_trace_input() -> Any:
    """The tensor ``example_inputs`` of a Torch-Pruning dependency-graph trace running now, if any.

    Read from the calling frames: ``DependencyGraph._trace`` calls ``model(*example_inputs)`` before
    ``model(example_inputs)``. Returns ``_NOT_TRACING`` outside such a trace, and for a trace that
    runs the user's own ``forward_fn`` or a tuple or dict of inputs (those calls are what they say).
    """
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "_trace" and frame.f_globals.get("__name__", "").startswith("torch_pruning."):
            local = frame.f_locals
            inputs = local.get("example_inputs", _NOT_TRACING)
            return inputs if local.get("forward_fn") is None else _NOT_TRACING
        frame = frame.f_back
    return _NOT_TRACING


# Autograd nodes that save the tensor they were applied to, and where that tensor's edge sits in
# next_functions: when the edge is empty the tensor needed no gradient, i.e. it came from outside the
# model (its input, or a transformation of it that keeps its shape).
_SAVED_INPUTS = {
    "ConvolutionBackward0": ("_saved_input", 0),
    "AddmmBackward0": ("_saved_mat1", 1),
    "MmBackward0": ("_saved_self", 0),
    "EmbeddingBackward0": ("_saved_indices", None),
}


def inputs_from_graph(graph: Any) -> Optional[Any]:
    """The model input a Torch-Pruning ``DependencyGraph`` was traced with, if it can be told for sure.

    The graph keeps the autograd nodes of its trace, and a convolution, linear layer or embedding
    applied directly to the input saves that input. The input is recovered only when the trace
    shows exactly one such tensor (by storage) that is not a parameter or buffer of the model;
    models with several inputs, or whose first layers see only tensors computed inside
    ``forward``, give ``None``.
    """
    model = getattr(graph, "model", None)
    nodes = getattr(graph, "module2node", None)
    if model is None or not nodes:
        return None
    owned = {t.data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    found: Dict[Tuple[int, Tuple[int, ...]], torch.Tensor] = {}
    for node in nodes.values():
        grad_fn = getattr(node, "grad_fn", None)
        rule = _SAVED_INPUTS.get(type(grad_fn).__name__)
        if rule is None:
            continue
        attr, edge = rule
        try:
            if edge is not None and grad_fn.next_functions[edge][0] is not None:
                continue  # the layer's input is an activation of the model, not its input
            saved = getattr(grad_fn, attr)
        except (RuntimeError, AttributeError, IndexError):  # freed by a backward through the trace
            continue
        if not isinstance(saved, torch.Tensor) or saved.dim() == 0 or saved.data_ptr() in owned:
            continue
        found[(saved.data_ptr(), tuple(saved.shape))] = saved
    if len(found) != 1:
        return None
    return TensorSpec.of_batch(next(iter(found.values())))


def model_dtype_device(model: nn.Module) -> Tuple[Optional[torch.dtype], Optional[torch.device]]:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype, p.device
    return None, None


def follow_model(inputs: Any, model: nn.Module) -> Any:
    """Move every tensor of ``inputs`` to the model's device, floats also to its dtype."""
    dtype, device = model_dtype_device(model)
    if device is None:
        return inputs
    if device.type == "meta":
        raise ValueError("ConnectImportance cannot measure connectivity of a model on the meta device: "
                         "materialize its weights first (e.g. model.to_empty(device=...) and load a state dict)")

    def move(x: Any) -> Any:
        if not isinstance(x, torch.Tensor):
            return x
        return x.to(device=device, dtype=dtype) if x.is_floating_point() else x.to(device)

    return map_nested(inputs, move)


class RecordedInputs:
    """The model-input part of :class:`~connect_tp.importance.ConnectImportance` (a base class).

    Keeps ``example_inputs`` (given by the user, or recorded and then kept for the model it was
    recorded on) and the recorder that watches for the pruner's trace until the input is known.
    """

    def _init_inputs(self, example_inputs: Any, watch: bool) -> None:
        self.example_inputs = example_inputs
        self._given_inputs = example_inputs  # what reset() goes back to (recorded inputs are forgotten)
        # Only a connectivity term needs the input shape; pure Taylor never watches forwards.
        self._recorder = InputRecorder() if example_inputs is None and watch else None
        self._recorded_inputs: Any = None  # the input the recorder or the graph gave (not the user's)
        self._input_model: Optional["weakref.ref[nn.Module]"] = None  # the model recorded inputs belong to

    def _reset_inputs(self, watch: bool) -> None:
        self.example_inputs, self._recorded_inputs, self._input_model = self._given_inputs, None, None
        if self.example_inputs is None and watch and self._recorder is None:
            self._recorder = InputRecorder()

    def __del__(self) -> None:
        recorder = getattr(self, "_recorder", None)
        if recorder is not None:
            recorder.remove()

    def _inputs_for(self, model: nn.Module, graph: Any = None) -> Any:
        """The model's input structure: given, recorded from the pruner's trace, or read from the graph.

        An input recorded for one model is never used for another: a second model's input is looked
        up again (the recorder, then its dependency graph).
        """
        inputs = self.example_inputs
        if inputs is not None and inputs is self._recorded_inputs:
            owner = self._input_model() if self._input_model is not None else None
            if owner is not model:
                inputs = None
        if inputs is None:
            recorded = self._recorder.inputs.get(model) if self._recorder is not None else None
            if recorded is not None:
                inputs = TensorSpec.materialize(recorded)
            else:
                inputs = inputs_from_graph(graph)
                if inputs is None:
                    raise ValueError(
                        "ConnectImportance cannot tell the model's input shape: it was not built (or reset()) "
                        "before the pruner traced the model, and the group's dependency graph does not show a "
                        "single model input. Pass it explicitly: ConnectImportance(example_inputs=...)."
                    )
            inputs = follow_model(inputs, model)
            self.example_inputs = self._recorded_inputs = TensorSpec.of_batch(inputs)  # kept for this model
            self._input_model = weakref.ref(model)
        if self._recorder is not None:  # the input is known (found, or given later as llm.LLMBlockPruner does):
            self._recorder.remove()    # stop watching every forward pass
            self._recorder = None
        return follow_model(inputs, model)

