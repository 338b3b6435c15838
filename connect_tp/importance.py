"""``ConnectImportance``: the CoNNect group importance for Torch-Pruning.

CoNNect scores each weight with the first-order Taylor importance of the objective

    J(W) = L(data) - lam * log phi_tot(W),

i.e. ``|W * (dL/dW - lam * d log phi_tot / dW)|``, where ``phi_tot`` is the signal-flow connectivity
of :mod:`connect_tp.connectivity`. ``lam`` is one constant for the whole run. By default it is set
from a scale-free *balance* ``kappa``: at the first pruning step,

    lam = kappa * sum|W * dL/dW| / sum|W * d log phi_tot / dW|

(both sums over the weights of every convolution and linear layer), so ``kappa = 1`` gives the two
terms the same Taylor mass whatever the loss reduction, the number of accumulated ``backward()``
calls or the training state; ``kappa = 0`` is Taylor and ``kappa = inf`` connectivity alone. The
loss gradient is whatever the user's ``loss.backward()`` left in ``.grad``; the connectivity
gradient is computed by the importance itself, once per pruning step, and never written into
``.grad``. Scores are reduced to one value per channel of a Torch-Pruning group exactly as
``tp.importance.GroupTaylorImportance`` does it.

This module holds the score, the balance and the Torch-Pruning interface; the machinery lives in
:mod:`connect_tp.scoring`: the model's input (:mod:`~connect_tp.scoring.recorder`), when the
connectivity gradient is recomputed (:mod:`~connect_tp.scoring.cache`), how it is computed
(:mod:`~connect_tp.scoring.gradient`), per-channel scores (:mod:`~connect_tp.scoring.channels`)
and the argument checks (:mod:`~connect_tp.scoring.arguments`).
"""
from __future__ import annotations

import math
import warnings
import weakref
from typing import Any, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch_pruning as tp

from .connectivity import BN_FLOWS
from .scoring.arguments import check_arguments
from .scoring.cache import CachedGradient
from .scoring.channels import ChannelScores
from .scoring.gradient import FLAT_CONNECTIVITY, ConnectivityGradient
from .scoring.recorder import RecordedInputs

__all__ = ["BALANCE_SCHEDULES", "ConnectImportance", "DEFAULT_BALANCE", "DEFAULT_BN_FLOW", "MAX_LAMBDA"]

#: Default balance kappa of the connectivity term against the loss term (see the module docstring),
#: picked by the ranking benchmark's rule, fixed before the runs (best mean accuracy after one fine-tuning
#: epoch at 8x and 16x, over seeds 0-2; docs/benchmarks.md, "Choosing kappa"): kappa = 100 scores
#: 81.8 against 300 80.2, inf 78.7, 1000 78.6, 10 77.1 and Taylor 59.3, strictly inside the grid
#: 0.3 ... 1000, inf. Its neighbours and connectivity alone are within the spread over seeds of it,
#: and L2 (82.4) is tied with it. A finite kappa needs loss gradients (``loss.backward()``) before
#: every step. For language models the tiny-LLaMA grid prefers kappa <= 10 (docs/llm.md).
DEFAULT_BALANCE = 100.0

#: Default treatment of BatchNorm in phi_tot (:data:`connect_tp.connectivity.BN_FLOWS`): its linear
#: scale ``|gamma| / sqrt(running_var + eps)`` without the shift. Version 0.2.0 used ``"gamma"``
#: (``|gamma| x``), which ignores the division by sigma: on base models the benchmark had not seen it
#: emptied the last stage at 16x (one convolution left with 1 channel, on 1 of 3 bases; connectivity
#: alone with ``"gamma"`` on 2 of 5). ``"scale"`` ranks channels almost exactly as ``"stats"`` does on
#: ReLU networks while staying a pure path sum (no shift to cancel the flow, no sample pass), and at
#: kappa = 100 it left no collapsed trajectory on any base and calibration draw it ran on
#: (docs/benchmarks.md, "The default, by the rule").
DEFAULT_BN_FLOW = "scale"

#: When a finite balance sets lambda: once, at the first step (``"frozen"``, the default), or at
#: every pruning step from the model as it is then (``"every_step"``).
BALANCE_SCHEDULES = ("frozen", "every_step")

#: Largest absolute ``lam`` accepted. Far below float32's range for ``lam * d log phi / dW``, and far
#: above the point where the loss term no longer changes any decision (use ``balance=math.inf``).
MAX_LAMBDA = 1e12


#: The lambda a balance fixes before any step: 0 for Taylor, inf for connectivity alone (any other
#: balance resolves at the first step).
_ENDPOINT_LAMBDAS = {0.0: 0.0, math.inf: math.inf}


class ConnectImportance(RecordedInputs, CachedGradient, ConnectivityGradient, ChannelScores,
                        tp.importance.TaylorImportance):
    """CoNNect importance: Taylor importance of ``J = L - lam * log phi_tot``.

    A drop-in replacement for ``tp.importance.GroupTaylorImportance``: build the pruner with it, run
    ``loss.backward()`` on calibration data before each ``pruner.step()``, and nothing else changes.
    Per parameter the score is ``|W * (dL/dW - lam * d log phi_tot / dW)|``; per channel the scores
    are summed over the channel's weights and reduced over the group with ``group_reduction`` and
    ``normalizer``, the same way Torch-Pruning reduces Taylor scores (out-channels, in-channels,
    grouped convolutions, ``root_idxs``).

    The strength of the connectivity term is given either as ``balance`` (kappa, scale-free, the
    default) or as the paper's absolute ``lam``, never both. With ``balance``, ``lam`` is set at the
    first pruning step to ``kappa * (loss Taylor mass) / (connectivity Taylor mass)`` and kept for
    the rest of the run (:attr:`lam` shows it; :meth:`reset` forgets it). ``balance=0`` is exactly
    ``GroupTaylorImportance``; ``balance=math.inf`` scores with the connectivity term alone and
    needs no gradients (data-free pruning).

    ``log phi_tot`` is the signal-flow connectivity (:func:`connect_tp.connectivity.log_connectivity`):
    the model in eval mode with ``|W|``, ``|b|`` and absolute norm affine parameters, BatchNorm as
    ``bn_flow`` says, fed ``n_samples`` inputs uniform in [0, 1) (token ids uniform over the
    vocabulary; masks and other side inputs keep valid values), measured by
    :mod:`connect_tp.engine` in the model's own precision (:attr:`engine_path` says which pass ran).
    Its gradient is computed once per pruning step (whenever the model's parameters or buffers
    changed; :mod:`connect_tp.scoring.cache` says when that is checked) and kept out of ``.grad``.
    An importance built after the pruner traced the model reads the input from the group's
    dependency graph when it shows a single model input.

    Example:
        >>> imp = ConnectImportance(balance=1.0)          # the blend: both terms weigh the same
        >>> pruner = tp.pruner.MetaPruner(model, example_inputs, importance=imp,
        ...                               global_pruning=True, pruning_ratio=1.0,
        ...                               iterative_steps=400, ignored_layers=[model.fc])
        >>> for _ in range(400):
        ...     model.zero_grad()
        ...     torch.nn.functional.cross_entropy(model(x), y).backward()
        ...     pruner.step()
        >>> imp.lam                                       # the lambda the balance resolved to

    Args:
        lam: absolute weight of the connectivity term (0 <= lam <= :data:`MAX_LAMBDA`), the paper's
            form. Without ``.grad`` on the model a step scores with the connectivity term alone
            (data-free) and warns once.
        balance: scale-free weight kappa >= 0 (``math.inf`` allowed); the default when ``lam`` is
            not given is :data:`DEFAULT_BALANCE`. A finite kappa needs loss gradients at every step.
        n_samples: number of random inputs phi_tot is averaged over (>= 1).
        example_inputs: an input of the model's shape. Optional: when omitted, the input the
            pruner traced the model with is used. Floating-point inputs follow the model's dtype
            and device at every step.
        group_reduction: how scores of the layers in one group are combined ("mean", "sum", "max",
            "prod", "first", "gate" or None), as in Torch-Pruning.
        normalizer: how a group's scores are normalized ("mean", "sum", "max", "standarization",
            "gaussian", "lamp", "sentinel_<q>" with 0 <= q < 1, a callable or None).
        bias: also score biases.
        batchnorm: also score the affine parameters of BatchNorm/GroupNorm layers. Off by default,
            which matches ``GroupTaylorImportance`` (its normalization branch never fires for
            BatchNorm); on, a channel whose BN scale carries its signal gets that credit too.
        bn_flow: how BatchNorm enters phi_tot: "stats", "gamma", "scale" or "identity"
            (:data:`connect_tp.connectivity.BN_FLOWS`).
        target_types: layer types that are scored.
        seed: seed of the random connectivity inputs (an int >= 0, or ``None``: torch's global
            generator).
        chunk_size: how many of the ``n_samples`` random inputs one connectivity pass runs (an
            int >= 1, or ``None``: all at once, the default). Smaller chunks keep about
            ``chunk_size / n_samples`` of the activations and cost one pass each, with the same
            scores up to float32 rounding. Only the engine's pass chunks: a model it cannot trace
            (Hugging Face language models) runs all samples at once and a ``RuntimeWarning`` says so.
        balance_schedule: when a finite ``balance`` sets lambda: ``"frozen"`` (the default) at the
            first step, kept for the run; ``"every_step"`` again at every pruning step, from the
            masses of the model as it is then (the two terms keep the ratio kappa as the model
            shrinks and its gradients change). Only a finite, positive balance has a lambda to
            re-derive; with ``lam=``, ``balance=0`` or ``balance=math.inf`` only ``"frozen"`` is valid.
    """

    def __init__(
        self,
        lam: Optional[float] = None,
        balance: Optional[float] = None,
        n_samples: int = 4,
        example_inputs: Any = None,
        group_reduction: Optional[str] = "mean",
        normalizer: Any = "mean",
        bias: bool = False,
        batchnorm: bool = False,
        bn_flow: str = DEFAULT_BN_FLOW,
        target_types: Sequence[type] = (nn.modules.conv._ConvNd, nn.Linear,
                                        nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm),
        seed: Optional[int] = 0,
        chunk_size: Optional[int] = None,
        balance_schedule: str = "frozen",
    ):
        if lam is not None and balance is not None:
            raise ValueError("give either lam (absolute) or balance (scale-free), not both")
        #: Whether the strength is the library default (neither ``lam`` nor ``balance`` given): a
        #: caller that knows the model family can say that the default was chosen on CNNs.
        self.default_strength = balance is None and lam is None
        if self.default_strength:
            balance = DEFAULT_BALANCE
        check_arguments(lam, balance, n_samples, group_reduction, normalizer, bn_flow, seed, chunk_size,
                        balance_schedule, max_lambda=MAX_LAMBDA, bn_flows=BN_FLOWS, schedules=BALANCE_SCHEDULES)
        super().__init__(group_reduction=group_reduction, normalizer=normalizer, bias=bias,
                         target_types=list(target_types))
        self.balance = None if balance is None else float(balance)
        self.lam: Optional[float] = _ENDPOINT_LAMBDAS.get(self.balance) if lam is None else float(lam)
        self.n_samples, self.seed, self.chunk_size = n_samples, seed, chunk_size
        self.batchnorm, self.bn_flow, self.balance_schedule = batchnorm, bn_flow, balance_schedule
        self._init_inputs(example_inputs, watch=self.lam != 0)
        self._init_cache()
        self._init_gradient()
        self._lam_model: Optional["weakref.ref[nn.Module]"] = None  # the model a balance resolved lambda on
        self._use_loss = True
        # warnings given once: no .grad (data-free), a clamped lambda, all-zero groups (by layer names)
        self._warned_data_free, self._warned_clamp, self._warned_groups = False, False, set()
        #: How many times the connectivity gradient was computed (once per pruning step).
        self.connectivity_evaluations = 0

    def reset(self) -> None:
        """Forget everything learnt from the last model, for a new run.

        Forgets the lambda a balance resolved to, the cached gradients, the input recorded from
        the pruner's trace (inputs given as ``example_inputs=`` stay), the precision that last
        measured phi_tot, and which warnings were given. Call it before building the next pruner,
        so that its trace is recorded again.
        """
        if self.balance is not None:
            self.lam = _ENDPOINT_LAMBDAS.get(self.balance)
        self._lam_model = None
        self._reset_cache()
        self._reset_inputs(watch=self.lam != 0)
        self._init_gradient()
        self._warned_data_free, self._warned_clamp, self._warned_groups = False, False, set()

    data_free = property(lambda self: not self._use_loss,
                         doc="Whether the last step scored with the connectivity term alone.")

    # ------------------------------------------------------------------ the two terms of the score
    def _decide_loss(self, params: Sequence[torch.Tensor]) -> None:
        has_grad = any(p.grad is not None for p in params)
        self._use_loss = self.balance != math.inf and has_grad
        if not has_grad and self.lam == 0:
            raise RuntimeError(
                "ConnectImportance with lam=0 / balance=0 is Taylor importance and needs loss gradients: "
                "run loss.backward() before pruner.step(), or use balance=math.inf for data-free pruning."
            )
        if not has_grad and self.balance is not None and self.balance != math.inf:
            raise RuntimeError(
                f"ConnectImportance(balance={self.balance:g}) weighs the connectivity term against the loss "
                "and found no .grad on the model: run loss.backward() on calibration data before each "
                "pruner.step(), or use balance=math.inf for data-free pruning."
            )
        if not has_grad and self.balance is None and not self._warned_data_free:
            warnings.warn(
                "ConnectImportance found no .grad on the model: scoring with the connectivity term "
                "alone (data-free CoNNect). Run loss.backward() before pruner.step() to include the loss.",
                stacklevel=5,
            )
            self._warned_data_free = True

    def objective_gradient(self, param: torch.Tensor) -> Optional[torch.Tensor]:
        """``dJ/dW = dL/dW - lam * d log phi_tot / dW`` for one parameter of the current model.

        With the connectivity term alone (``balance=math.inf`` or no ``.grad``) it is
        ``-d log phi_tot / dW``. Returns ``None`` when neither term exists.
        """
        loss_grad = param.grad if self._use_loss else None
        conn_grad = self._connectivity_grads.get(id(param)) if self.lam != 0 else None
        if conn_grad is None:
            return loss_grad
        if loss_grad is None:
            return -conn_grad
        # lam * conn_grad is formed in float32 (or the parameter's wider dtype), then cast back.
        return (loss_grad.to(conn_grad.dtype) - self.lam * conn_grad).to(loss_grad.dtype)

    def _score_gradient(self, param: torch.Tensor) -> Optional[torch.Tensor]:
        """:meth:`objective_gradient` up to its sign, which no score sees (scores are ``|W * g|``).

        With the connectivity term alone this is the cached gradient itself, so scoring a group
        allocates no negated copy of it.
        """
        if self.lam != 0 and (not self._use_loss or param.grad is None):
            conn_grad = self._connectivity_grads.get(id(param))
            if conn_grad is not None:
                return conn_grad
        return self.objective_gradient(param)

    # ------------------------------------------------------------------ the balance
    def _prepare_lambda(self, model: nn.Module, resolve: bool) -> None:
        """Forget a lambda that does not belong to this step: another model's, or any under ``"every_step"``."""
        owner = self._lam_model() if self._lam_model is not None else None
        if self._lam_model is not None and owner is not model:
            # lambda and the measuring precision belong to the model they were found on; a balance is
            # scale-free, so a new model resolves its own lambda (kappa means the same on both)
            self.lam, self._lam_model, self._dtype, self._flat = None, None, None, False
        elif resolve and self.balance_schedule == "every_step" and self._lam_model is not None and not self._flat:
            self.lam = None  # re-derived by _after_refresh from the masses of the model as it is now

    def _after_refresh(self, model: nn.Module, resolve: bool) -> None:
        """With the connectivity gradient of the model now: refuse an empty score, resolve a balance."""
        if self._flat and not self._use_loss:
            raise RuntimeError(
                "ConnectImportance cannot score without loss gradients here: log phi_tot does not depend on the "
                "weights (see the warning above), so the connectivity term is zero for every layer. Prune a "
                "model that returns the values before its normalizing layer, or run loss.backward() and use a "
                "finite balance.")
        if self.lam is None and resolve:  # a finite balance resolves to lambda at the first step, then stays
            # a connectivity that does not depend on the weights has no lambda: the run is Taylor (warned)
            self.lam = 0.0 if self._flat else self.lambda_from_masses(*self._masses(model))
            self._lam_model = weakref.ref(model)

    def taylor_masses(self, model: nn.Module) -> Tuple[float, float]:
        """``(sum |W dL/dW|, sum |W d log phi / dW|)`` over the conv and linear weights that have both now.

        The loss term is read from ``.grad``; the connectivity gradient is computed first if the
        model changed (for the parameters that require a gradient). A caller that sees the model a
        part at a time (:class:`connect_tp.llm.LLMBlockPruner` with ``layers_per_pass``) sums the
        masses of every part and calls :meth:`lambda_from_masses`.
        """
        self._full_refresh(model, resolve=False)
        return self._masses(model)

    def _masses(self, model: nn.Module) -> Tuple[float, float]:
        loss_mass, conn_mass = 0.0, 0.0
        for m in model.modules():
            w = getattr(m, "weight", None)
            if not isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)) or not isinstance(w, torch.Tensor):
                continue
            if w.grad is not None:
                loss_mass += float((w.detach() * w.grad).abs().sum(dtype=torch.float64))
            g = self._connectivity_grads.get(id(w))
            if g is not None:
                conn_mass += float((w.detach() * g).abs().sum(dtype=torch.float64))
        return loss_mass, conn_mass

    def lambda_from_masses(self, loss_mass: float, conn_mass: float, fix: bool = False) -> float:
        """``balance * loss_mass / conn_mass``, with the errors a finite balance can meet; ``fix`` keeps it."""
        if self.balance is None or self.balance in (0.0, math.inf):
            raise ValueError(f"only a finite, positive balance resolves to a lambda (balance={self.balance})")
        if not (loss_mass > 0 and math.isfinite(loss_mass)):
            raise RuntimeError(
                f"ConnectImportance(balance={self.balance:g}) found a loss Taylor mass of {loss_mass:g} "
                "(the .grad of the convolution and linear weights is zero or not finite): compute the "
                "gradient of a real loss on calibration data before pruner.step(), or pass lam= or "
                "balance=math.inf."
            )
        if not conn_mass > FLAT_CONNECTIVITY:
            raise RuntimeError(f"the connectivity Taylor mass is {conn_mass:.2g}, rounding noise: the model's output "
                               "does not depend on its weights' magnitudes (see the warning above)")
        lam = self.balance * loss_mass / conn_mass
        if not lam <= MAX_LAMBDA:  # also catches an overflow to inf
            if not self._warned_clamp:
                self._warned_clamp = True
                warnings.warn(
                    f"ConnectImportance(balance={self.balance:g}) resolves to lambda = {lam:.3g}, above MAX_LAMBDA = "
                    f"{MAX_LAMBDA:g}; lambda is clamped to {MAX_LAMBDA:g}, where the loss term no longer changes "
                    "the ranking. Use balance=math.inf for the connectivity term alone.", UserWarning, stacklevel=4)
            lam = MAX_LAMBDA
        if fix:
            self.lam = lam
        return lam

    # ------------------------------------------------------------------ the Torch-Pruning interface
    @torch.no_grad()
    def __call__(self, group) -> Optional[torch.Tensor]:
        self._refresh(self._model_of(group), getattr(group, "_DG", None), group)
        scores = self._group_scores(group, self._score_gradient)
        if scores is None:
            return None
        if not bool(scores.any()):
            scores, _ = self._scores_without_signal(group)
            if not bool(scores.any()):  # every weight of the group is zero: no ranking exists, and no NaN
                return scores
        return self._normalize(scores, self.normalizer)
