"""``ConnectImportance``: the CoNNect group importance for Torch-Pruning.

CoNNect scores each weight with the first-order Taylor importance of the objective

    J(W) = L(data) - lam * log phi_tot(W),

i.e. ``|W * (dL/dW - lam * d log phi_tot / dW)|``, where ``phi_tot`` is the signal-flow connectivity
of :mod:`connect_tp.connectivity`. The loss gradient is whatever the user's ``loss.backward()`` left
in ``.grad``; the connectivity gradient is computed by the importance itself, once per pruning step,
and never written into ``.grad``. Scores are reduced to one value per channel of a Torch-Pruning
group exactly as ``tp.importance.GroupTaylorImportance`` does it.

Example:
    >>> import torch, torch_pruning as tp
    >>> from connect_tp import ConnectImportance
    >>> from connect_tp.models import resnet20
    >>> model = resnet20(num_classes=10)
    >>> example_inputs = torch.rand(1, 3, 32, 32)
    >>> imp = ConnectImportance()
    >>> pruner = tp.pruner.MetaPruner(model, example_inputs, importance=imp,
    ...                               pruning_ratio=0.5, ignored_layers=[model.fc])
    >>> model(torch.rand(8, 3, 32, 32)).sum().backward()
    >>> pruner.step()
"""
from __future__ import annotations

import math
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch_pruning as tp
from torch_pruning.pruner import function

from .connectivity import log_connectivity_and_dtype

__all__ = ["ConnectImportance", "DEFAULT_LAMBDA"]

#: Default weight of the connectivity term, chosen from the sweep in README.md ("Choosing lambda",
#: ``python -m benchmarks.lambda_sweep`` and the offline preset with ``--connect-lam``): below ~0.1
#: the term does not change a single Taylor decision on a trained CNN; at 100 it gave the best
#: accuracy after fine-tuning at 2.5x and 8x in the sweep and 15-19 points over Taylor at 8x and
#: 16x in the 3-seed offline benchmark. It is large because ``d log phi / dW`` is spread over all
#: weights, while a trained model's loss gradients are concentrated; the paper uses 1e5 for LLaMA.
DEFAULT_LAMBDA = 100.0

_REDUCTIONS = ("sum", "mean", "max", "prod", "first", "gate", None)
_NORMALIZERS = ("sum", "standarization", "mean", "max", "gaussian", "lamp", None)

_OUT_CHANNEL_FNS = (function.prune_conv_out_channels, function.prune_linear_out_channels)
_IN_CHANNEL_FNS = (function.prune_conv_in_channels, function.prune_linear_in_channels)
_NORM_FNS = (
    function.prune_batchnorm_out_channels,
    function.prune_groupnorm_out_channels,
    function.prune_layernorm_out_channels,
)


@dataclass(frozen=True)
class _TensorSpec:
    """Shape (beyond the batch dimension), dtype and device of one recorded input tensor."""

    shape: Tuple[int, ...]
    dtype: torch.dtype
    device: torch.device

    @classmethod
    def of(cls, x: Any) -> Any:
        """Replace every tensor in a nested input by its spec, so no activation stays alive."""
        if isinstance(x, torch.Tensor):
            return cls(tuple(x.shape[1:]), x.dtype, x.device)
        if isinstance(x, dict):
            return {k: cls.of(v) for k, v in x.items()}
        if isinstance(x, (tuple, list)):
            return type(x)(cls.of(v) for v in x)
        return x

    @classmethod
    def materialize(cls, x: Any) -> Any:
        """Inverse of :meth:`of`: one-sample zero tensors (only their structure is used)."""
        if isinstance(x, cls):
            return torch.zeros((1,) + x.shape, dtype=x.dtype, device=x.device)
        if isinstance(x, dict):
            return {k: cls.materialize(v) for k, v in x.items()}
        if isinstance(x, (tuple, list)):
            return type(x)(cls.materialize(v) for v in x)
        return x


_CALL_FAILED = object()


class _InputRecorder:
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
        if kwargs and not args:
            self.inputs[module] = _TensorSpec.of(dict(kwargs))
        elif len(args) == 1 and not kwargs:
            self.inputs[module] = _TensorSpec.of(args[0])
        elif args and not kwargs:
            self.inputs[module] = _TensorSpec.of(tuple(args))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


class ConnectImportance(tp.importance.TaylorImportance):
    """CoNNect importance: Taylor importance of ``J = L - lam * log phi_tot``.

    A drop-in replacement for ``tp.importance.GroupTaylorImportance``: build the pruner with it, run
    ``loss.backward()`` on calibration data before each ``pruner.step()``, and nothing else changes.
    Per parameter the score is ``|W * (dL/dW - lam * d log phi_tot / dW)|``; per channel the scores
    are summed over the channel's weights and reduced over the group with ``group_reduction`` and
    ``normalizer``, the same way Torch-Pruning reduces Taylor scores (out-channels, in-channels,
    grouped convolutions, ``root_idxs``).

    ``log phi_tot`` is the signal-flow connectivity (:func:`connect_tp.connectivity.log_connectivity`):
    the model in eval mode with ``|W|``, ``|b|`` and absolute norm affine parameters, fed ``n_samples``
    inputs uniform in [0, 1) (token ids uniform over the vocabulary for integer inputs). Its
    gradient is computed once per pruning step (whenever the model's parameters changed) and kept
    out of ``.grad``.

    Without any ``.grad`` (no ``loss.backward()`` was run), CoNNect scores with the connectivity
    term alone (data-free pruning) and warns once.

    Example:
        >>> imp = ConnectImportance(lam=1e-3)
        >>> pruner = tp.pruner.MetaPruner(model, example_inputs, importance=imp,
        ...                               global_pruning=True, pruning_ratio=1.0,
        ...                               iterative_steps=400, ignored_layers=[model.fc])
        >>> for _ in range(400):
        ...     model.zero_grad()
        ...     torch.nn.functional.cross_entropy(model(x), y).backward()
        ...     pruner.step()

    Args:
        lam: weight of the connectivity term (>= 0). ``lam=0`` gives Taylor importance.
        n_samples: number of random inputs phi_tot is averaged over (>= 1).
        example_inputs: an input of the model's shape. Optional: when omitted, the input the
            pruner traced the model with is used.
        group_reduction: how scores of the layers in one group are combined ("mean", "sum", "max",
            "prod", "first", "gate" or None), as in Torch-Pruning.
        normalizer: how a group's scores are normalized ("mean", "sum", "max", "standarization",
            "gaussian", "lamp" or None), as in Torch-Pruning.
        bias: also score biases.
        batchnorm: also score the affine parameters of BatchNorm/GroupNorm layers. Off by default,
            which matches ``GroupTaylorImportance`` (its normalization branch never fires for
            BatchNorm); on, a channel whose BN scale carries its signal gets that credit too.
        target_types: layer types that are scored.
        seed: seed of the random connectivity inputs (``None``: torch's global generator).
    """

    def __init__(
        self,
        lam: float = DEFAULT_LAMBDA,
        n_samples: int = 4,
        example_inputs: Any = None,
        group_reduction: Optional[str] = "mean",
        normalizer: Any = "mean",
        bias: bool = False,
        batchnorm: bool = False,
        target_types: Sequence[type] = (nn.modules.conv._ConvNd, nn.Linear,
                                        nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm),
        seed: Optional[int] = 0,
    ):
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam < 0:
            raise ValueError(f"lam must be a finite number >= 0, got {lam!r}")
        if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
            raise ValueError(f"n_samples must be an integer >= 1, got {n_samples!r}")
        if group_reduction not in _REDUCTIONS:
            raise ValueError(f"unknown group_reduction {group_reduction!r}; choose one of {_REDUCTIONS}")
        if not (callable(normalizer) or normalizer in _NORMALIZERS
                or (isinstance(normalizer, str) and normalizer.startswith("sentinel_"))):
            raise ValueError(
                f"unknown normalizer {normalizer!r}; choose one of {_NORMALIZERS}, 'sentinel_<q>' or a callable"
            )
        super().__init__(group_reduction=group_reduction, normalizer=normalizer, bias=bias,
                         target_types=list(target_types))
        self.lam = float(lam)
        self.n_samples = n_samples
        self.example_inputs = example_inputs
        self.batchnorm = batchnorm
        self.seed = seed
        # Only a connectivity term needs the input shape; lam=0 (pure Taylor) never watches forwards.
        self._recorder = _InputRecorder() if example_inputs is None and self.lam > 0 else None
        self._cache_key: Optional[tuple] = None
        self._connectivity_grads: Dict[int, torch.Tensor] = {}
        self._data_free = False
        self._warned_data_free = False
        self.last_log_connectivity: Optional[float] = None
        self._dtype: Optional[torch.dtype] = None  # precision that last measured phi_tot finitely

    def __del__(self) -> None:
        recorder = getattr(self, "_recorder", None)
        if recorder is not None:
            recorder.remove()

    # ------------------------------------------------------------------ connectivity gradients
    def _inputs_for(self, model: nn.Module) -> Any:
        if self.example_inputs is not None:
            return self.example_inputs
        recorded = self._recorder.inputs.get(model) if self._recorder is not None else None
        if recorded is None:
            raise ValueError(
                "ConnectImportance cannot tell the model's input shape: it was not built before the "
                "pruner traced the model. Pass it explicitly: ConnectImportance(example_inputs=...)."
            )
        return _TensorSpec.materialize(recorded)

    @staticmethod
    def _state_key(model: nn.Module) -> tuple:
        # Pruning replaces parameters (new objects, new shapes); optimizer steps bump _version.
        return tuple((id(p), p._version, tuple(p.shape)) for p in model.parameters())

    def _refresh(self, model: nn.Module) -> None:
        """Recompute d log phi_tot / dW when the model changed since the last call."""
        key = self._state_key(model)
        if key == self._cache_key:
            return
        params = dict(model.named_parameters())
        self._data_free = all(p.grad is None for p in params.values())
        if self._data_free:
            if self.lam == 0:
                raise RuntimeError(
                    "ConnectImportance(lam=0) is Taylor importance and needs loss gradients: run "
                    "loss.backward() before pruner.step(), or set lam > 0 for data-free CoNNect pruning."
                )
            if not self._warned_data_free:
                warnings.warn(
                    "ConnectImportance found no .grad on the model: scoring with the connectivity term "
                    "alone (data-free CoNNect). Run loss.backward() before pruner.step() to include the loss.",
                    stacklevel=3,
                )
                self._warned_data_free = True
        self._connectivity_grads = {}
        if self.lam > 0:
            inputs = self._inputs_for(model)
            if self._recorder is not None:
                # The input structure is known now; stop watching every forward pass.
                self.example_inputs = inputs
                self._recorder.remove()
                self._recorder = None
            names = [n for n, p in params.items() if p.requires_grad]
            leaves = {n: params[n].detach().requires_grad_(True) for n in names}
            frozen = {n: p.detach() for n, p in params.items() if n not in leaves}
            with torch.enable_grad():
                log_phi, self._dtype = log_connectivity_and_dtype(
                    model, inputs, self.n_samples, self.seed, {**leaves, **frozen}, self._dtype)
                grads = torch.autograd.grad(log_phi, list(leaves.values()), allow_unused=True)
            self.last_log_connectivity = log_phi.item()
            self._connectivity_grads = {
                id(params[n]): g for n, g in zip(names, grads) if g is not None
            }
        self._cache_key = key

    def objective_gradient(self, param: torch.Tensor) -> Optional[torch.Tensor]:
        """``dJ/dW = dL/dW - lam * d log phi_tot / dW`` for one parameter of the current model.

        Returns ``None`` when neither term exists (no ``.grad`` and not on any signal path).
        """
        loss_grad = None if self._data_free else param.grad
        conn_grad = self._connectivity_grads.get(id(param))
        if conn_grad is None:
            return None if loss_grad is None else loss_grad
        scaled = conn_grad.to(param.dtype) * self.lam
        return -scaled if loss_grad is None else loss_grad - scaled

    # ------------------------------------------------------------------ scoring
    @staticmethod
    def _model_of(group) -> nn.Module:
        graph = getattr(group, "_DG", None)
        if graph is None or getattr(graph, "model", None) is None:
            raise ValueError(
                "ConnectImportance needs groups from a Torch-Pruning DependencyGraph "
                "(DG.get_pruning_group / pruner.step); this group has no graph attached."
            )
        return graph.model

    def _channel_scores(self, layer: nn.Module, prune_fn: Callable, idxs: List[int]) -> List[torch.Tensor]:
        """Per-channel Taylor scores of one member of a group (weight, and bias if asked)."""
        scores = []
        transposed = getattr(layer, "transposed", False)
        if prune_fn in _OUT_CHANNEL_FNS:
            grad = self.objective_gradient(layer.weight)
            if grad is not None:
                w, g = layer.weight.data, grad
                if transposed:
                    w, g = w.transpose(1, 0), g.transpose(1, 0)
                scores.append((w[idxs] * g[idxs]).flatten(1).abs().sum(1))
            scores += self._bias_scores(layer, idxs)
        elif prune_fn in _IN_CHANNEL_FNS:
            grad = self.objective_gradient(layer.weight)
            if grad is not None:
                w, g = layer.weight.data, grad
                if not transposed:
                    w, g = w.transpose(0, 1), g.transpose(0, 1)
                local = (w * g).flatten(1).abs().sum(1)
                # A grouped conv sees only in_channels / groups inputs per filter: repeat per group.
                if prune_fn == function.prune_conv_in_channels and layer.groups not in (1, layer.in_channels):
                    local = local.repeat(layer.groups)
                scores.append(local[idxs])
        elif prune_fn in _NORM_FNS:
            is_layernorm = prune_fn == function.prune_layernorm_out_channels
            affine = layer.elementwise_affine if is_layernorm else layer.affine
            if affine and (is_layernorm or self.batchnorm):
                grad = self.objective_gradient(layer.weight)
                if grad is not None:
                    scores.append((layer.weight.data[idxs] * grad[idxs]).abs())
                scores += self._bias_scores(layer, idxs)
        return scores

    def _bias_scores(self, layer: nn.Module, idxs: List[int]) -> List[torch.Tensor]:
        if not self.bias or getattr(layer, "bias", None) is None:
            return []
        grad = self.objective_gradient(layer.bias)
        return [] if grad is None else [(layer.bias.data[idxs] * grad[idxs]).abs()]

    @torch.no_grad()
    def __call__(self, group) -> Optional[torch.Tensor]:
        self._refresh(self._model_of(group))
        group_imp, group_idxs = [], []
        for i, (dep, idxs) in enumerate(group):
            layer = dep.target.module
            if not isinstance(layer, tuple(self.target_types)):
                continue
            for local in self._channel_scores(layer, dep.handler, idxs):
                group_imp.append(local)
                group_idxs.append(group[i].root_idxs)
        if not group_imp:  # groups without scored layers are left to the pruner's defaults
            return None
        return self._normalize(self._reduce(group_imp, group_idxs), self.normalizer)
