"""Signal-flow connectivity of a network, the quantity CoNNect preserves when it prunes.

The connectivity phi_tot of a network is the sum, over all input-to-output paths, of the product of
the weights on the path. For a network whose weights are all non-negative it is one forward pass:
feed an input, sum the outputs. This module measures the *signal-flow* form that CoNNect uses as a
pruning importance (paper, section 4.2 and appendix C.3): every module is kept as it is (BatchNorm,
activations, pooling, attention, ...), every parameter is replaced by its absolute value
(``|W|``, ``|b|``, ``|gamma|``, ``|beta|``), and the input is drawn uniformly from [0, 1) (uniform
token ids for language models), averaged over a few samples.

The real parameters are never modified: the absolute values are substituted through
:func:`torch.func.functional_call`, so ``log_connectivity`` is differentiable with respect to the
model's own parameters and never touches their ``.grad``.

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

__all__ = [
    "BN_FLOWS",
    "ConnectivityError",
    "connectivity_inputs",
    "log_connectivity",
    "log_connectivity_and_dtype",
    "summed_output",
]


class ConnectivityError(ValueError):
    """Raised when the connectivity of a network is zero, negative or not finite."""


BN_FLOWS = ("stats", "gamma", "identity")
"""How an eval-mode BatchNorm enters the signal flow (the paper does not say; README, "BatchNorm").

- ``"stats"``: the layer as it runs, ``|gamma| (x - mean) / sqrt(var + eps) + |beta|`` with the
  real running statistics. A nearly constant channel (tiny running variance) gets a huge flow.
- ``"gamma"``: ``|gamma| x``, a pure path sum: the BN scale is an edge weight, no shift.
- ``"identity"``: BatchNorm is skipped, as the paper's appendix B does for the regularizer.
"""


def bn_flow_overrides(model: nn.Module, bn_flow: str,
                      params: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Parameter and buffer replacements that make every BatchNorm behave as ``bn_flow`` says.

    Returns ``{name: tensor}`` entries for :func:`torch.func.functional_call`; empty for
    ``"stats"``. The running mean becomes 0 and the running variance ``1 - eps`` (so the
    normalization divides by exactly 1); ``"gamma"`` also drops ``beta``, ``"identity"`` also
    replaces ``gamma`` by 1 (the connectivity then has no gradient with respect to ``gamma``).
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


def connectivity_inputs(
    model: nn.Module,
    example_inputs: Any,
    n_samples: int,
    generator: Optional[torch.Generator] = None,
) -> Any:
    """Random inputs with the structure of ``example_inputs`` and a batch of ``n_samples``.

    Floating-point tensors become uniform samples from [0, 1); integer tensors become token ids
    uniform over the model's vocabulary; anything else (flags, ``None``) is passed through. The
    first dimension of every tensor is taken as the batch dimension.

    Args:
        model: the model the inputs are for (used for the vocabulary size of integer inputs).
        example_inputs: a tensor, or a tuple/list/dict of tensors, as passed to the model.
        n_samples: the batch size of the returned inputs.
        generator: an optional CPU random generator, for reproducible inputs.

    Returns:
        The same structure as ``example_inputs``, on the same devices.
    """

    def draw(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            shape = (n_samples,) + tuple(x.shape[1:]) if x.dim() > 0 else ()
            if x.is_floating_point():
                return torch.rand(shape, generator=generator).to(device=x.device, dtype=x.dtype)
            if x.dtype == torch.bool:
                return x
            high = _vocab_size(model)
            return torch.randint(0, high, shape, generator=generator).to(device=x.device, dtype=x.dtype)
        if isinstance(x, Mapping):
            return {k: draw(v) for k, v in x.items()}
        if isinstance(x, (tuple, list)):
            return type(x)(draw(v) for v in x)
        return x

    return draw(example_inputs)


def summed_output(output: Any) -> torch.Tensor:
    """Sum of a model's output per sample, as a float64 vector of length batch.

    Accepts a tensor, a Hugging Face ``ModelOutput`` (its ``logits``), a dict, or a tuple/list
    (its first tensor: the usual place of the logits).
    """
    if isinstance(output, torch.Tensor):
        tensor = output
    elif hasattr(output, "logits") and isinstance(output.logits, torch.Tensor):
        tensor = output.logits
    elif isinstance(output, Mapping):
        tensor = next((v for v in output.values() if isinstance(v, torch.Tensor)), None)
    elif isinstance(output, (tuple, list)):
        tensor = next((v for v in output if isinstance(v, torch.Tensor)), None)
    else:
        tensor = None
    if tensor is None or tensor.dim() == 0:
        raise TypeError(
            f"cannot measure connectivity of a model whose output is {type(output).__name__}; "
            "it must return a batched tensor, a tuple/dict holding one, or an object with .logits"
        )
    # Summing in float64 keeps the total finite when a low-precision output is large.
    return tensor.double().flatten(1).sum(1)


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


def _measure(model: nn.Module, params: Mapping[str, torch.Tensor], inputs: Any,
             dtype: Optional[torch.dtype], bn_flow: str = "stats") -> torch.Tensor:
    """phi_tot with absolute parameters, optionally with parameters, buffers and inputs cast."""
    abs_params = {name: p.abs() for name, p in params.items()}
    abs_params.update(bn_flow_overrides(model, bn_flow, abs_params))
    if dtype is not None:
        buffers = {name: b for name, b in model.named_buffers() if b.is_floating_point()}
        abs_params = {name: t.to(dtype) for name, t in {**buffers, **abs_params}.items()}
        inputs = _cast_floats(inputs, dtype)
    with _EvalMode(model):
        return summed_output(_call(model, abs_params, inputs)).mean()


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

    The signal of a deep network with absolute weights grows geometrically with depth (ResNet-56
    at initialization overflows float32). When the model's own precision overflows (or underflows
    to 0), the measurement is repeated in float32 (for half-precision models) and then in float64,
    whose range covers networks hundreds of layers deep. Pass ``dtype`` to skip the attempts.

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
    inputs = connectivity_inputs(model, example_inputs, n_samples, generator)
    for attempt in ([dtype] if dtype is not None else _fallback_dtypes(params)):
        phi = _measure(model, params, inputs, attempt, bn_flow)
        value = phi.item()
        if math.isfinite(value) and value != 0.0:
            break
    if not math.isfinite(value):
        raise ConnectivityError(
            f"connectivity is not finite ({value}) even in float64: the signal of the "
            "absolute-valued network overflows. Check the model for huge weights or unbounded layers."
        )
    if value == 0.0:
        raise ConnectivityError(
            "connectivity is 0: no signal reaches the output, the network is disconnected "
            "(some layer has no remaining channel or all its weights are zero)."
        )
    if value < 0.0:
        raise ConnectivityError(
            f"connectivity is negative ({value:.3g}): a module subtracts from the signal "
            "(e.g. BatchNorm running means or LayerNorm centering dominate), so log phi_tot is undefined."
        )
    return torch.log(phi), attempt
