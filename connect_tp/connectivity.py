"""Signal-flow connectivity of a network, the quantity CoNNect preserves when it prunes.

The connectivity phi_tot of a network is the sum, over all input-to-output paths, of the product of
the weights on the path. For a network whose weights are all non-negative it is one forward pass:
feed an input, sum the outputs. This module measures the *signal-flow* form that CoNNect uses as a
pruning importance (paper, section 4.2 and appendix C.3): every module is kept as it is (BatchNorm,
activations, pooling, attention, ...), every parameter is replaced by its absolute value
(``|W|``, ``|b|``, ``|gamma|``, ``|beta|``), and the input is drawn uniformly from [0, 1) (uniform
token ids for language models), averaged over a few samples.

The real parameters are never modified: the absolute values are substituted in the pass of
:mod:`connect_tp.engine` (a ``torch.fx`` trace with a per-layer log scale, exact in float32) or, for
models that cannot be traced, through :func:`torch.func.functional_call`, so ``log_connectivity``
is differentiable with respect to the model's own parameters and never touches their ``.grad``.

Only the data inputs are random (:func:`connectivity_inputs`); masks, token types and other side
inputs keep valid values. The output summed is the logits, or every output of a tuple such as
``(features, logits)`` (:func:`output_tensor`); an output
that a normalization centres gives a :class:`ConnectivityError` naming that layer
(:func:`describe_output_layer`).

Example:
    >>> import torch
    >>> from connect_tp.connectivity import log_connectivity
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> log_phi = log_connectivity(model, torch.rand(1, 4), n_samples=4)
    >>> grads = torch.autograd.grad(log_phi, list(model.parameters()))
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn as nn
from torch.func import functional_call
from torch.overrides import TorchFunctionMode

from . import engine  # the engine knows nothing of this module (tests/test_import_layers.py)

__all__ = [
    "BN_FLOWS",
    "ConnectivityError",
    "connectivity_inputs",
    "describe_inputs",
    "describe_output_layer",
    "output_tensor",
    "log_connectivity",
    "log_connectivity_and_dtype",
    "summed_output",
]


class ConnectivityError(ValueError):
    """Raised when the connectivity of a network is zero, negative, centred or not finite."""


#: An output whose entries sum to less than this fraction of their absolute sum is centred (e.g. a
#: final LayerNorm without affine): its phi_tot is rounding noise.
CENTRED_TOLERANCE = 1e-4


BN_FLOWS = ("stats", "gamma", "scale", "identity")
"""How an eval-mode BatchNorm enters the signal flow (the paper does not say; docs/assumptions.md).

- ``"stats"``: the layer as it runs, ``|gamma| (x - mean) / sqrt(var + eps) + |beta|`` with the
  real running statistics. A nearly constant channel (tiny running variance) gets a huge flow.
- ``"gamma"``: ``|gamma| x``, a pure path sum: the BN scale is an edge weight, no shift.
- ``"scale"``: ``|gamma| x / sqrt(var + eps)``, the layer's linear part as an edge weight, without
  the shift: a pure path sum that, unlike ``"gamma"``, sees how much the layer amplifies.
- ``"identity"``: BatchNorm is skipped, as the paper's appendix B does for the regularizer.
"""


def bn_flow_overrides(model: nn.Module, bn_flow: str,
                      params: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Parameter and buffer replacements that make every BatchNorm behave as ``bn_flow`` says.

    Returns ``{name: tensor}`` entries for :func:`torch.func.functional_call`; empty for
    ``"stats"``. The running mean becomes 0 and ``beta`` 0 (no shift); the running variance
    becomes ``1 - eps`` (so the normalization divides by exactly 1) except for ``"scale"``, which
    keeps it; ``"identity"`` also replaces ``gamma`` by 1 (the connectivity then has no gradient
    with respect to ``gamma``).
    """
    if bn_flow not in BN_FLOWS:
        raise ValueError(f"unknown bn_flow {bn_flow!r}; choose one of {BN_FLOWS}")
    if bn_flow == "stats":
        return {}
    overrides: Dict[str, torch.Tensor] = {}
    for name, m in model.named_modules():
        if not isinstance(m, nn.modules.batchnorm._BatchNorm) or m.running_mean is None:
            continue
        prefix = f"{name}." if name else ""
        overrides[prefix + "running_mean"] = torch.zeros_like(m.running_mean)
        if bn_flow != "scale":
            overrides[prefix + "running_var"] = torch.full_like(m.running_var, 1.0 - m.eps)
        if m.affine:
            overrides[prefix + "bias"] = torch.zeros_like(m.bias)
            if bn_flow == "identity":
                overrides[prefix + "weight"] = torch.ones_like(m.weight)
            else:
                overrides[prefix + "weight"] = params.get(prefix + "weight", m.weight)
    return overrides


def _vocab_size(model: nn.Module) -> int:
    """Number of token ids a language model accepts: its config's vocab size or first embedding."""
    config = getattr(model, "config", None)
    if config is not None and isinstance(getattr(config, "vocab_size", None), int):
        return config.vocab_size
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            return module.num_embeddings
    raise ValueError(
        "the example input holds integer tensors (token ids) but the model has no nn.Embedding "
        "to tell the vocabulary size; pass a floating-point example input instead"
    )


#: Keys of dict inputs that hold the token ids (randomized over the vocabulary).
TOKEN_ID_KEYS = ("input_ids", "decoder_input_ids")


def _side_input_rule(key: Optional[str]) -> Optional[str]:
    """How a named model input that is not the token ids keeps a valid value.

    ``"ones"`` for masks (``attention_mask``, ``decoder_attention_mask``, ...: nothing is padding),
    ``"zeros"`` for ``token_type_ids`` (every token in the first segment), ``None`` for anything
    else (the value is decided by its dtype, see :func:`connectivity_inputs`).
    """
    if key is None:
        return None
    name = key.lower()
    if "mask" in name:
        return "ones"
    if name == "token_type_ids" or name.endswith("token_type_ids"):
        return "zeros"
    return None


def _is_token_ids(x: Any) -> bool:
    """An integer tensor that can hold token ids: not bool, and not uint8 (that is an image)."""
    return (isinstance(x, torch.Tensor) and not x.is_floating_point() and not x.is_complex()
            and x.dtype not in (torch.bool, torch.uint8))


def _token_id_path(example_inputs: Any) -> Optional[tuple]:
    """Where the token ids sit in ``example_inputs``: a key path, or ``None`` if there are none.

    A dict's ``input_ids`` (or ``decoder_input_ids``) if present, else its first integer tensor
    whose key is not a side input (mask, token types); in a tuple or list, the first integer
    tensor; a lone integer tensor is the token ids itself.
    """
    if _is_token_ids(example_inputs):
        return ()
    if isinstance(example_inputs, Mapping):
        for key in TOKEN_ID_KEYS:
            if _is_token_ids(example_inputs.get(key)):
                return (key,)
        for key, value in example_inputs.items():
            if _is_token_ids(value) and _side_input_rule(key) is None and "position" not in str(key).lower():
                return (key,)
        return None
    if isinstance(example_inputs, (tuple, list)):
        for i, value in enumerate(example_inputs):
            if _is_token_ids(value):
                return (i,)
    return None


def connectivity_inputs(
    model: nn.Module,
    example_inputs: Any,
    n_samples: int,
    generator: Optional[torch.Generator] = None,
) -> Any:
    """Random inputs with the structure of ``example_inputs`` and a batch of ``n_samples``.

    Only the model's data inputs are random: floating-point tensors become uniform samples from
    [0, 1), ``uint8`` tensors (images) uniform integers in 0..255, and the one token-id input
    (a dict's ``input_ids``, else the first integer tensor) token ids uniform over the model's
    vocabulary. Every other input keeps a valid value: dict entries named like a mask
    (``attention_mask``, ...) are all ones, ``token_type_ids`` all zeros, and other integer or
    bool side inputs (``position_ids``, flags) keep the example's first sample. Anything that is
    not a tensor (``None``, numbers) is passed through. The first dimension of every tensor is the
    batch dimension; the random draws are made in this order, from ``generator``.

    Args:
        model: the model the inputs are for (used for the vocabulary size of token ids).
        example_inputs: a tensor, or a tuple/list/dict of tensors, as passed to the model.
        n_samples: the batch size of the returned inputs.
        generator: an optional CPU random generator, for reproducible inputs.

    Returns:
        The same structure as ``example_inputs``, on the same devices.
    """
    token_path = _token_id_path(example_inputs)

    def batch_shape(x: torch.Tensor) -> tuple:
        return (n_samples,) + tuple(x.shape[1:]) if x.dim() > 0 else ()

    def keep(x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 0:
            return x
        return x[:1].expand(batch_shape(x)).clone()

    def draw(x: Any, path: tuple, key: Optional[str]) -> Any:
        if isinstance(x, torch.Tensor):
            rule = _side_input_rule(key)
            if rule == "ones":
                return torch.ones(batch_shape(x), dtype=x.dtype, device=x.device)
            if rule == "zeros":
                return torch.zeros(batch_shape(x), dtype=x.dtype, device=x.device)
            shape = batch_shape(x)
            if x.is_floating_point():
                return torch.rand(shape, generator=generator).to(device=x.device, dtype=x.dtype)
            if x.dtype == torch.uint8:
                return torch.randint(0, 256, shape, generator=generator).to(device=x.device, dtype=x.dtype)
            if path == token_path:
                high = _vocab_size(model)
                return torch.randint(0, high, shape, generator=generator).to(device=x.device, dtype=x.dtype)
            return keep(x)
        if isinstance(x, Mapping):
            return {k: draw(v, path + (k,), str(k)) for k, v in x.items()}
        if isinstance(x, (tuple, list)):
            return type(x)(draw(v, path + (i,), None) for i, v in enumerate(x))
        return x

    return draw(example_inputs, (), None)


def _output_tensors(output: Any) -> List[torch.Tensor]:
    """The tensors of a model's output that connectivity sums (see :func:`output_tensor`)."""
    tensors: List[torch.Tensor] = []
    if isinstance(output, torch.Tensor):
        tensors = [output]
    elif isinstance(getattr(output, "logits", None), torch.Tensor):
        tensors = [output.logits]
    elif isinstance(output, Mapping):
        logits = output.get("logits")
        first = logits if isinstance(logits, torch.Tensor) else \
            next((v for v in output.values() if isinstance(v, torch.Tensor) and v.dim() > 0), None)
        tensors = [] if first is None else [first]
    elif isinstance(output, (tuple, list)):
        batched = [v for v in output if isinstance(v, torch.Tensor) and v.dim() > 0]
        tensors = [v for v in batched if v.is_floating_point()] or batched[:1]
        tensors = [v for v in tensors if v.shape[0] == tensors[0].shape[0]]
    if not tensors or tensors[0].dim() == 0:
        raise TypeError(
            f"cannot measure connectivity of a model whose output is {type(output).__name__}; "
            "it must return a batched tensor, a tuple/dict holding one, or an object with .logits"
        )
    return tensors


def output_tensor(output: Any) -> torch.Tensor:
    """The tensor of a model's output that connectivity sums: the logits, or every output of a tuple.

    Accepts a tensor; a Hugging Face ``ModelOutput`` or dict (its ``logits``, else its first
    batched tensor: a 0-dim ``loss`` is skipped); or a tuple/list, whose every floating-point
    tensor with the batch dimension of the first one is an output the flow reaches
    (``(features, logits)``: both, so the classifier is measured too; ``(loss, logits)``: the
    logits). Nested structures inside a tuple (cached keys and values) are not outputs. Several
    tensors are returned as one ``(batch, total size)`` tensor of their flattened values.
    """
    tensors = _output_tensors(output)
    if len(tensors) == 1:
        return tensors[0]
    return torch.cat([t.reshape(t.shape[0], -1) for t in tensors], 1)


def summed_output(output: Any) -> torch.Tensor:
    """Sum of a model's output per sample (:func:`output_tensor`), as a float64 vector of length batch."""
    # Summing in float64 keeps the total finite when a low-precision output is large.
    return output_tensor(output).double().flatten(1).sum(1)


def _call(model: nn.Module, params: Dict[str, torch.Tensor], inputs: Any) -> Any:
    if isinstance(inputs, Mapping):
        return functional_call(model, params, args=(), kwargs=dict(inputs))
    if isinstance(inputs, (tuple, list)):
        return functional_call(model, params, tuple(inputs))
    return functional_call(model, params, (inputs,))


class _EvalMode:
    """Context manager: eval mode for the whole model, each module's own mode restored after."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.modes = [(m, m.training) for m in model.modules()]

    def __enter__(self) -> nn.Module:
        self.model.eval()
        return self.model

    def __exit__(self, *exc) -> None:
        for module, training in self.modes:
            module.training = training


class _RecomputedAbs:
    """Autograd saved-tensor hooks: an ``|W|`` that a layer saves for its backward is rebuilt there.

    A linear layer ``y = x |W|^T`` whose input needs a gradient keeps ``|W|`` until the backward
    reaches it, so the traced-free pass would hold an absolute copy of nearly every weight at once
    (13.5 GB for LLaMA-7B in bfloat16). Instead the hook stores the signed tensor (the parameter
    itself, no copy) and recomputes ``|W|`` (cast like the forward's) when the backward asks for it:
    the same values, one layer's copy alive at a time.
    """

    def __init__(self) -> None:
        # (storage address, dtype) of an |W| -> (signed tensor, dtype of the cast or None)
        self._rebuild: Dict[tuple, tuple] = {}
        self._alive: Dict[int, torch.Tensor] = {}  # the registered |W| (kept so no address is reused)

    @staticmethod
    def _key(t: torch.Tensor) -> Optional[tuple]:
        if t.layout != torch.strided or t.is_meta or t.numel() == 0:
            return None
        return t.untyped_storage().data_ptr(), t.dtype, t.device

    def register(self, built: torch.Tensor, signed: torch.Tensor, dtype: Optional[torch.dtype]) -> None:
        """``built`` is ``|signed|`` (cast to ``dtype``) and stays alive until :meth:`unregister`.

        (It must: a freed tensor's storage address could be reused by an activation.)
        """
        key = self._key(built)
        if key is not None:
            self._rebuild[key] = (signed.detach(), dtype)
            self._alive[id(built)] = built

    def unregister(self, built: torch.Tensor) -> None:
        """``built`` is about to be freed: its storage address may belong to another tensor next."""
        key = self._key(built)
        if key is not None:
            self._rebuild.pop(key, None)
            self._alive.pop(id(built), None)

    def pack(self, t: torch.Tensor) -> Any:
        key = self._key(t)
        entry = self._rebuild.get(key) if key is not None else None
        if entry is None:
            return t
        return (entry, tuple(t.shape), t.stride(), t.storage_offset())

    @staticmethod
    def unpack(packed: Any) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        (signed, dtype), shape, stride, offset = packed
        with torch.no_grad():
            rebuilt = signed.abs() if dtype is None else signed.abs().to(dtype)
            return rebuilt.as_strided(shape, stride, offset)


class _AbsWhileRunning(TorchFunctionMode):
    """Hands each module ``|W|`` of its own parameters only while its forward runs.

    Built all at once, the absolute copies of every weight would be alive together (13.5 GB for
    LLaMA-7B in bfloat16); this way one module's copy exists at a time, and :class:`_RecomputedAbs`
    keeps autograd from holding on to it. A model may also read a parameter outside its module's
    forward (a parent multiplying by a child's weight, ``nn.MultiheadAttention``'s ``out_proj``):
    that read would see the signed tensor, so every torch function call is watched, and
    ``signed_read`` says whether one received a signed parameter; the caller then measures again
    with every ``|W|`` built up front.
    """

    def __init__(self, model: nn.Module, params: Mapping[str, torch.Tensor], recompute: _RecomputedAbs):
        super().__init__()
        canonical = {id(p): name for name, p in model.named_parameters()}  # tied weights: one name
        self.slots: Dict[nn.Module, List[Tuple[str, str]]] = {}
        for module in model.modules():
            for attr, p in module._parameters.items():
                name = canonical.get(id(p)) if p is not None else None
                if name is not None and name in params:
                    self.slots.setdefault(module, []).append((attr, name))
        self.params, self.recompute = params, recompute
        self.signed = {id(t) for t in params.values()}
        self.signed_read = False
        self.saved: Dict[nn.Module, List[List[tuple]]] = {}  # a stack per module (nested calls)
        self.handles: List[Any] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.signed_read:
            for t in engine.nested_leaves((args, kwargs)):
                if isinstance(t, torch.Tensor) and id(t) in self.signed:
                    self.signed_read = True
                    break
        return func(*args, **kwargs)

    def __enter__(self) -> "_AbsWhileRunning":
        for module in self.slots:
            self.handles.append(module.register_forward_pre_hook(self._enter))
            self.handles.append(module.register_forward_hook(self._exit, always_call=True))
        return super().__enter__()

    def _enter(self, module: nn.Module, args: Any) -> None:
        frame = []
        for attr, name in self.slots[module]:
            signed = self.params[name]
            with torch._C.DisableTorchFunction():  # our own reads of the signed tensor
                built = signed.abs()
                self.recompute.register(built, signed, None)
            frame.append((attr, module._parameters[attr], built))
            module._parameters[attr] = built
        self.saved.setdefault(module, []).append(frame)

    def _exit(self, module: nn.Module, args: Any, output: Any) -> None:
        stack = self.saved.get(module)
        if not stack:
            return
        for attr, original, built in reversed(stack.pop()):
            if module._parameters.get(attr) is built:  # not already put back (by functional_call)
                module._parameters[attr] = original
            self.recompute.unregister(built)
        if not stack:
            del self.saved[module]

    def __exit__(self, *exc) -> None:
        try:
            for module in list(self.saved):  # an exception skipped some forward hooks
                while self.saved.get(module):
                    self._exit(module, (), None)
                self.saved.pop(module, None)  # an empty stack left by an exception inside _enter
            for handle in self.handles:
                handle.remove()
        finally:
            super().__exit__(*exc)


def _abs_call(model: nn.Module, params: Mapping[str, torch.Tensor], inputs: Any,
              dtype: Optional[torch.dtype], bn_flow: str = "stats") -> Any:
    """The model's raw output with absolute parameters (and ``bn_flow``), optionally cast to ``dtype``.

    In the model's own precision each module gets ``|W|`` only while it runs
    (:class:`_AbsWhileRunning`); the ``|W|`` that autograd keeps for the backward are recomputed
    there (:class:`_RecomputedAbs`). Same values as building every ``|W|`` first, which is what
    happens with a ``dtype`` cast (a fallback) or when a module's weight is read outside its forward.
    """
    recompute = _RecomputedAbs()
    # only the BatchNorm gammas are read by the overrides ("stats" has none)
    gammas = {} if bn_flow == "stats" else {n: params[n].abs() for n in _batchnorm_params(model) if n in params}
    overrides = bn_flow_overrides(model, bn_flow, gammas)
    if dtype is None:
        signed = {name: p for name, p in params.items() if name not in overrides}
        hooks = _AbsWhileRunning(model, signed, recompute)
        with _EvalMode(model), _explained_input_errors(inputs), hooks, \
                torch.autograd.graph.saved_tensors_hooks(recompute.pack, recompute.unpack):
            # functional_call swaps the signed leaves in, then each module swaps in its |W| while it runs
            out = _call(model, {**signed, **overrides}, inputs)
        if not hooks.signed_read:
            return out
        del out  # a weight was read outside its module's forward, so signed: measure again
        recompute = _RecomputedAbs()
    abs_params = {name: p.abs() for name, p in params.items()}
    abs_params.update(overrides)
    if dtype is not None:
        buffers = {name: b for name, b in model.named_buffers() if b.is_floating_point()}
        abs_params = {name: t.to(dtype) for name, t in {**buffers, **abs_params}.items()}
        inputs = _cast_floats(inputs, dtype)
    for name, signed in params.items():
        if name not in overrides:  # bn_flow's replacements are other values: autograd keeps those
            recompute.register(abs_params[name], signed, dtype)
    with _EvalMode(model), _explained_input_errors(inputs), \
            torch.autograd.graph.saved_tensors_hooks(recompute.pack, recompute.unpack):
        return _call(model, abs_params, inputs)


def _batchnorm_params(model: nn.Module) -> set:
    return {f"{name}.{attr}" if name else attr for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) for attr in m._parameters}


def describe_inputs(inputs: Any, where: str = "") -> List[str]:
    """``["input_ids: shape (4, 16), torch.int64", ...]`` for every tensor in a nested input."""
    if isinstance(inputs, torch.Tensor):
        return [f"{where or 'input'}: shape {tuple(inputs.shape)}, {inputs.dtype}"]
    if isinstance(inputs, Mapping):
        return [d for k, v in inputs.items() for d in describe_inputs(v, f"{where}{k}")]
    if isinstance(inputs, (tuple, list)):
        return [d for i, v in enumerate(inputs) for d in describe_inputs(v, f"{where}[{i}]")]
    return []


class _explained_input_errors:
    """Re-raise a failure of the model's forward on the connectivity inputs with those inputs named."""

    def __init__(self, inputs: Any):
        self.inputs = inputs

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, exc, tb) -> bool:
        if exc is None or isinstance(exc, (engine.NeedsFallback, ConnectivityError)) or \
                not isinstance(exc, (RuntimeError, IndexError, ValueError)):
            return False
        described = "; ".join(describe_inputs(self.inputs)) or repr(self.inputs)
        raise ValueError(
            f"the model failed on the connectivity inputs ({described}), built from example_inputs with "
            f"the batch dimension replaced by n_samples: {type(exc).__name__}: {exc}. Pass example_inputs "
            "shaped like one input of the model (batch dimension first), e.g. the pruner's example input."
        ) from exc


def _measure(model: nn.Module, params: Mapping[str, torch.Tensor], inputs: Any,
             dtype: Optional[torch.dtype], bn_flow: str = "stats") -> Tuple[torch.Tensor, float]:
    """phi_tot with absolute parameters, and the mean over samples of the summed |output| (detached)."""
    out = output_tensor(_abs_call(model, params, inputs, dtype, bn_flow)).double().flatten(1)
    return out.sum(1).mean(), float(out.detach().abs().sum(1).mean())


def _measure_traced(model: nn.Module, params: Mapping[str, torch.Tensor], inputs: Any,
                    bn_flow: str) -> Optional[Tuple[torch.Tensor, float, float]]:
    """:func:`_measure` through the engine's traced pass: ``(phi / e^s, magnitude / e^s, s)``, or
    ``None`` when the model needs the traced-free path (untraceable, or not exactly representable)."""

    try:
        with _EvalMode(model), _explained_input_errors(inputs):
            if engine.traced_graph(model) is None:  # traced in eval mode, as the pass runs
                return None
            out, _ = engine.run_traced(model, inputs, params, "signal", bn_flow)
    except engine.NeedsFallback:
        return None
    tensor, log_scale = traced_output(out)
    flat = tensor.double().flatten(1)
    log_scale = 0.0 if log_scale is None else log_scale
    return flat.sum(1).mean(), float(flat.detach().abs().sum(1).mean()), log_scale


def traced_output(out: Any) -> Tuple[torch.Tensor, Optional[float]]:
    """The output tensor of an engine pass (:func:`output_tensor` of its plain values) and its log
    scale (``None`` when that tensor is not a scaled flow, e.g. a constant output)."""

    plain = engine.map_nested(out, lambda o: o.value if isinstance(o, engine.Scaled) else o)
    tensors = _output_tensors(plain)
    flows = [o for o in engine.nested_leaves(out) if isinstance(o, engine.Scaled)]
    scales = [next((o.log_scale for o in flows if o.value is t), None) for t in tensors]
    if len(tensors) == 1:
        return tensors[0], scales[0]
    if any(s is None for s in scales):
        return output_tensor(plain), None
    # several outputs, each at its own scale: one tensor at the largest scale (a far smaller flow
    # underflows to 0 there, as its share of phi_tot does)
    top = max(scales)
    return torch.cat([t.reshape(t.shape[0], -1) * math.exp(s - top) for t, s in zip(tensors, scales)], 1), top


#: Operations that only move or relabel values; the layer that produced an output is the last
#: operation not in this list.
_BOOKKEEPING_OPS = frozenset({
    "__get__", "__getitem__", "__len__", "__iter__", "size", "dim", "numel", "shape", "dtype", "device",
    "view", "reshape", "flatten", "contiguous", "permute", "transpose", "squeeze", "unsqueeze", "t",
    "float", "double", "half", "bfloat16", "to", "type_as", "clone", "detach", "expand", "unbind",
    "split", "chunk", "is_floating_point", "requires_grad_", "__setstate__", "__format__",
})


def describe_output_layer(model: nn.Module, example_inputs: Any) -> str:
    """Which layer produces ``model``'s output: the last module or function that changed values.

    Runs the model once on ``example_inputs`` (no gradients) and names the last leaf module that
    computed something (``"'ln_f' (LayerNorm without affine)"``) or, when the last computation ran
    outside any submodule, the function (``"the function softmax in Net.forward"``). Used in
    error messages for models whose output is normalized, which makes connectivity meaningless.
    """

    names = {m: n for n, m in model.named_modules()}
    stack: List[nn.Module] = []
    last: Dict[str, Any] = {"op": None, "module": None}

    class Recorder(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = getattr(func, "__name__", str(func))
            if isinstance(out, torch.Tensor) and name not in _BOOKKEEPING_OPS:
                last["op"], last["module"] = name, (stack[-1] if stack else None)
            return out

    def enter(module, args):
        stack.append(module)

    def leave(module, args, output):
        if stack:
            stack.pop()

    handles = [nn.modules.module.register_module_forward_pre_hook(enter),
               nn.modules.module.register_module_forward_hook(leave)]
    try:
        with torch.no_grad(), _EvalMode(model), Recorder():
            _call(model, dict(model.named_parameters()), example_inputs)
    finally:
        for h in handles:
            h.remove()
    module = last["module"]
    if module is not None and module is not model:
        detail = type(module).__name__
        if isinstance(module, nn.LayerNorm) and not module.elementwise_affine:
            detail += " without affine"
        elif isinstance(module, (nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)) and not module.affine:
            detail += " without affine"
        return f"{names.get(module, '?')!r} ({detail})"
    return f"the function {last['op']} in {type(model).__name__}.forward"


def _check_not_meta(params: Mapping[str, torch.Tensor]) -> None:
    for name, p in params.items():
        if p.device.type == "meta":
            raise ValueError(
                f"cannot measure connectivity of a model on the meta device (parameter {name!r} has no "
                "data): materialize its weights first (e.g. model.to_empty(device=...) and load a state dict)")


def _cast_floats(x: Any, dtype: torch.dtype) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(dtype) if x.is_floating_point() else x
    if isinstance(x, Mapping):
        return {k: _cast_floats(v, dtype) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_cast_floats(v, dtype) for v in x)
    return x


def _fallback_dtypes(params: Mapping[str, torch.Tensor]) -> List[Optional[torch.dtype]]:
    """Precisions to try in turn: the model's own, then float32 (for half models), then float64."""
    native = next((p.dtype for p in params.values() if p.is_floating_point()), torch.float32)
    chain: List[Optional[torch.dtype]] = [None]
    if native in (torch.float16, torch.bfloat16):
        chain.append(torch.float32)
    if native != torch.float64:
        chain.append(torch.float64)
    return chain


def log_connectivity(
    model: nn.Module,
    example_inputs: Any,
    n_samples: int = 4,
    seed: Optional[int] = 0,
    params: Optional[Mapping[str, torch.Tensor]] = None,
    dtype: Optional[torch.dtype] = None,
    bn_flow: str = "stats",
) -> torch.Tensor:
    """``log phi_tot`` of ``model`` measured as signal flow with absolute-valued parameters.

    phi_tot is the mean over ``n_samples`` random inputs of the summed model output, with every
    parameter replaced by its absolute value and the model in eval mode (restored afterwards).

    The signal of a deep network with absolute weights grows or shrinks geometrically with depth
    (ResNet-56 at initialization overflows float32, a deep MLP with small weights underflows it).
    Models that ``torch.fx`` can trace are measured by :mod:`connect_tp.engine`, which carries a
    per-layer log scale and is exact in the model's own precision at any depth. Other models
    (Hugging Face language models) take the traced-free ``functional_call`` path: when the model's
    own precision overflows (or underflows to 0) the measurement is repeated in float32 (for
    half-precision models) and then in float64. Pass ``dtype`` to use the traced-free path in that
    precision directly.

    Args:
        model: any ``nn.Module``.
        example_inputs: an input of the shape the model takes (only its structure, shapes beyond the
            batch dimension and dtypes are used).
        n_samples: how many random inputs to average over (>= 1).
        seed: seed of the random inputs; ``None`` draws from torch's global generator.
        params: the tensors to take absolute values of, by name; defaults to the model's own
            parameters. Gradients of the result flow to these tensors.
        dtype: compute in this precision (parameters, buffers and inputs cast) instead of trying
            the model's own precision first.
        bn_flow: how BatchNorm layers enter the flow, one of :data:`BN_FLOWS`.

    Returns:
        A 0-dim float64 tensor ``log phi_tot``, differentiable with respect to ``params`` when grad
        mode is enabled.

    Raises:
        ConnectivityError: if phi_tot is 0 (no signal reaches the output: a disconnected network),
            negative, or not finite even in float64.
        ValueError: if ``n_samples < 1``.
    """
    log_phi, _ = log_connectivity_and_dtype(model, example_inputs, n_samples, seed, params, dtype, bn_flow)
    return log_phi


def _where_the_flow_is_lost(model: nn.Module, inputs: Any, params: Mapping[str, torch.Tensor],
                            bn_flow: str) -> Dict[str, str]:
    """:func:`connect_tp.engine.locate_flow_loss` for an error message (empty when untraceable)."""
    with _EvalMode(model):
        if engine.traced_graph(model) is None:
            return {}
        return engine.locate_flow_loss(model, inputs, params, bn_flow)


def log_connectivity_and_dtype(
    model: nn.Module,
    example_inputs: Any,
    n_samples: int = 4,
    seed: Optional[int] = 0,
    params: Optional[Mapping[str, torch.Tensor]] = None,
    dtype: Optional[torch.dtype] = None,
    bn_flow: str = "stats",
) -> Tuple[torch.Tensor, Optional[torch.dtype]]:
    """:func:`log_connectivity`, and the precision that measured it (``None``: the model's own).

    Callers that measure the same model repeatedly pass the returned precision back as ``dtype``
    so that an overflowing first attempt is not repeated every time.
    """
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    if params is None:
        params = dict(model.named_parameters())
    generator = None
    if seed is not None:
        generator = torch.Generator().manual_seed(seed)
    _check_not_meta(params)
    inputs = connectivity_inputs(model, example_inputs, n_samples, generator)
    traced = _measure_traced(model, params, inputs, bn_flow) if dtype is None else None
    if traced is not None:
        phi, magnitude, log_scale = traced
        value, attempt = phi.item(), None
    else:
        log_scale = 0.0
        for attempt in ([dtype] if dtype is not None else _fallback_dtypes(params)):
            phi, magnitude = _measure(model, params, inputs, attempt, bn_flow)
            value = phi.item()
            if math.isfinite(value) and value != 0.0:
                break
    if math.isfinite(value) and magnitude > 0 and abs(value) <= CENTRED_TOLERANCE * magnitude:
        raise ConnectivityError(
            f"the model's output is centred: its entries sum to {value:.3g} per sample against a magnitude "
            f"of {magnitude:.3g}, whatever the weights. Its last layer is "
            f"{describe_output_layer(model, inputs)}, which normalizes the signal away, so phi_tot and its "
            "gradients carry no information. Measure connectivity on an output that is not normalized "
            "(e.g. wrap the model to return the values before that layer)."
        )
    if not math.isfinite(value):
        raise ConnectivityError(
            f"connectivity is not finite ({value}) even in float64: the signal of the "
            "absolute-valued network overflows. Check the model for huge weights or unbounded layers."
        )
    if value == 0.0:
        where = _where_the_flow_is_lost(model, inputs, params, bn_flow).get("vanishes")
        raise ConnectivityError(
            "connectivity is 0: no signal reaches the output, the network is disconnected "
            + (f"(the flow is zero in every entry from {where} on)." if where else
               "(some layer has no remaining channel or all its weights are zero).")
        )
    if value < 0.0:
        where = _where_the_flow_is_lost(model, inputs, params, bn_flow).get("negative")
        raise ConnectivityError(
            f"connectivity is negative ({value:.3g}): a module subtracts from the signal, so log phi_tot is "
            "undefined; " + (f"negative values first appear at {where}" if where else
                             "e.g. BatchNorm running means (bn_flow='stats') dominate")
            + ". Try bn_flow='gamma', or measure a model that returns the values before that layer."
        )
    return torch.log(phi) + log_scale, attempt
