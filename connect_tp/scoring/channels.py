"""Per-channel scores of a Torch-Pruning group, reduced as ``GroupTaylorImportance`` reduces them.

:class:`ChannelScores` (a base of :class:`~connect_tp.importance.ConnectImportance`) turns one
gradient per parameter into one score per channel of a group, ``|W * g|`` summed over the
channel's weights (out-channels, in-channels, grouped convolutions, norm layers, biases) and
reduced over the group's layers with Torch-Pruning's own ``_reduce``. A group whose scores are
all zero (no gradient reaches it) would be normalized to 0/0 = NaN; it is scored by the loss term
alone or by ``|W|`` instead, with a warning naming its layers.
"""
from __future__ import annotations

import warnings
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn as nn
from torch_pruning.pruner import function

__all__ = ["ChannelScores"]

_OUT_CHANNEL_FNS = (function.prune_conv_out_channels, function.prune_linear_out_channels)
_IN_CHANNEL_FNS = (function.prune_conv_in_channels, function.prune_linear_in_channels)
_NORM_FNS = (
    function.prune_batchnorm_out_channels,
    function.prune_groupnorm_out_channels,
    function.prune_layernorm_out_channels,
)




class ChannelScores:
    """The channel part of :class:`~connect_tp.importance.ConnectImportance` (a base class).

    Reads the importance's ``target_types``, ``bias``, ``batchnorm``, ``normalizer``, ``lam`` and
    ``_use_loss``, and Torch-Pruning's ``_reduce``.
    """

    @staticmethod
    def _model_of(group) -> nn.Module:
        graph = getattr(group, "_DG", None)
        if graph is None or getattr(graph, "model", None) is None:
            raise ValueError(
                "ConnectImportance needs groups from a Torch-Pruning DependencyGraph "
                "(DG.get_pruning_group / pruner.step); this group has no graph attached."
            )
        return graph.model

    def _channel_scores(self, layer: nn.Module, prune_fn: Callable, idxs: List[int],
                        gradient: Callable[[torch.Tensor], Optional[torch.Tensor]]) -> List[torch.Tensor]:
        """Per-channel scores ``|W * gradient(W)|`` of one member of a group (weight, and bias if asked)."""
        scores = []
        transposed = getattr(layer, "transposed", False)
        if prune_fn in _OUT_CHANNEL_FNS:
            grad = gradient(layer.weight)
            if grad is not None:
                w, g = layer.weight.data, grad
                if transposed:
                    w, g = w.transpose(1, 0), g.transpose(1, 0)
                scores.append((w[idxs] * g[idxs]).flatten(1).abs().sum(1))
            scores += self._bias_scores(layer, idxs, gradient)
        elif prune_fn in _IN_CHANNEL_FNS:
            grad = gradient(layer.weight)
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
                grad = gradient(layer.weight)
                if grad is not None:
                    scores.append((layer.weight.data[idxs] * grad[idxs]).abs())
                scores += self._bias_scores(layer, idxs, gradient)
        return scores

    def _bias_scores(self, layer: nn.Module, idxs: List[int],
                     gradient: Callable[[torch.Tensor], Optional[torch.Tensor]]) -> List[torch.Tensor]:
        if not self.bias or getattr(layer, "bias", None) is None:
            return []
        grad = gradient(layer.bias)
        return [] if grad is None else [(layer.bias.data[idxs] * grad[idxs]).abs()]

    def _group_scores(self, group, gradient: Callable[[torch.Tensor], Optional[torch.Tensor]]) -> Optional[torch.Tensor]:
        """One score per channel of ``group``, reduced over its layers; ``None`` when no layer is scored."""
        group_imp, group_idxs = [], []
        for i, (dep, idxs) in enumerate(group):
            layer = dep.target.module
            if not isinstance(layer, tuple(self.target_types)):
                continue
            for local in self._channel_scores(layer, dep.handler, idxs, gradient):
                group_imp.append(local)
                group_idxs.append(group[i].root_idxs)
        if not group_imp:  # groups without scored layers are left to the pruner's defaults
            return None
        return self._reduce(group_imp, group_idxs)

    def _scores_without_signal(self, group) -> Tuple[torch.Tensor, str]:
        """Scores for a group whose objective scores are all zero (every normalizer would give 0/0 = NaN).

        The loss term alone when it exists and is not zero there, else the weights' magnitudes
        ``|W|`` (per channel, reduced like the other scores). Warns once per group, naming its layers.
        """
        loss = None
        if self._use_loss and self.lam != 0:
            loss = self._group_scores(group, lambda p: p.grad)
        if loss is not None and bool(loss.any()):
            scores, what = loss, "the loss term alone (Taylor's scores)"
        else:
            scores, what = self._group_scores(group, torch.ones_like), "the weights' magnitudes |W|"
        names = {m: n for n, m in self._model_of(group).named_modules()}
        layers = tuple(sorted({names.get(dep.target.module) or type(dep.target.module).__name__ for dep, _ in group
                               if isinstance(dep.target.module, tuple(self.target_types))}))
        if layers not in self._warned_groups:
            self._warned_groups.add(layers)
            term = "|W * dL/dW|" if self.lam == 0 else ("|W * d log phi/dW|" if not self._use_loss
                                                         else "|W * (dL/dW - lam * d log phi/dW)|")
            warnings.warn(
                f"ConnectImportance: every score {term} of the group of {', '.join(layers[:6])}"
                f"{' ...' if len(layers) > 6 else ''} is zero (no gradient reaches these layers), which the "
                f"{self.normalizer!r} normalizer would turn into NaN; this group is scored by {what} instead.",
                UserWarning, stacklevel=4)
        return scores, what

