"""CoNNect pruning of Hugging Face causal language models (LLaMA, Qwen2, Mistral) with Torch-Pruning.

This module reproduces the LLM-Pruner-style one-shot structural pruning of the paper's section
4.2.2 (Table 2): inside a range of decoder layers (by default all but the first three and the last
one), a fixed fraction of the attention heads and of the MLP channels of every layer is removed, the
hidden size is kept. Which heads and channels go is decided per layer by any Torch-Pruning importance
(``ConnectImportance``, ``GroupTaylorImportance``, ``GroupMagnitudeImportance``, ``RandomImportance``)
applied to Torch-Pruning ``Group`` objects, and the weights are cut with Torch-Pruning's own pruning
functions.

Why the groups are built here rather than traced: a decoder layer has exactly two kinds of coupled
structures, and they are known from the architecture:

* a *head* group: rows ``[h*d, (h+1)*d)`` of ``q_proj`` (and of ``k_proj``/``v_proj`` without
  grouped-query attention) with the same columns of ``o_proj``;
* an *MLP channel* group: row ``c`` of ``gate_proj`` and ``up_proj`` with column ``c`` of
  ``down_proj``.

Torch-Pruning's automatic tracer finds the MLP group (``tests/test_llm.py`` checks that it is the
same), but its traversal of the rotary-embedding/GQA attention of current ``transformers`` does not
terminate (Torch-Pruning issue #527), and tracing a 7B model just to recover these two structures
costs a full forward graph. With grouped-query attention the key/value heads are kept and the query
heads are removed in equal numbers from every key/value group, so every layer stays a valid GQA
layer (the same policy as Torch-Pruning's GQA head pruning).

A pruned model has a different number of heads and MLP channels in different layers, which a plain
``LlamaConfig`` cannot describe. :func:`save_pruned` therefore writes the per-layer shapes into
``config.json`` together with a small self-contained modeling file, so that
``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`` (or
``load_pruned(path, trust_remote_code=True)``) rebuilds it. ``trust_remote_code=True`` runs that
Python file, so :func:`load_pruned` never turns it on by itself: the caller opts in, and only for
folders it wrote or trusts. An ``auto_map`` that points to code outside the folder (a Hub repo) is
refused even then.

``transformers`` is only needed by the functions that load or save models; importing this module
does not import it.

Example:
    >>> import torch
    >>> from transformers import AutoModelForCausalLM, AutoTokenizer
    >>> from connect_tp.importance import ConnectImportance
    >>> from connect_tp import llm
    >>> model = AutoModelForCausalLM.from_pretrained("huggyllama/llama-7b", torch_dtype=torch.float16).cuda()
    >>> tokenizer = AutoTokenizer.from_pretrained("huggyllama/llama-7b")
    >>> ids = llm.tokenize(tokenizer, open("calibration.txt").read())
    >>> batches = llm.calibration_batches(ids, n_samples=10, seq_len=128)
    >>> llm.accumulate_loss_gradients(model, batches)            # dL/dW in .grad, as in LLM-Pruner
    >>> pruner = llm.LLMBlockPruner(model, ConnectImportance(lam=1e5), pruning_ratio=0.25)
    >>> report = pruner.step()                                   # 25% of heads/channels in layers 3..30
    >>> llm.save_pruned(model, "llama-7b-connect-20", tokenizer)
"""
from __future__ import annotations

import json
import math
import os
import re
import resource
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_pruning as tp
from torch_pruning.dependency import Dependency, Group, Node
from torch_pruning._helpers import GroupItem

__all__ = [
    "LayerShape",
    "LLMBlockPruner",
    "UntrustedCodeError",
    "accumulate_loss_gradients",
    "calibration_batches",
    "count_linear_macs",
    "decoder_layers",
    "group_ratio_for_param_ratio",
    "layer_shapes",
    "llm_pruner_layers",
    "load_pruned",
    "lora_finetune",
    "peak_memory_mib",
    "perplexity",
    "save_pruned",
    "tokenize",
]

#: Key in ``config.json`` holding the per-layer shapes of a pruned model.
LAYER_SHAPES_KEY = "connect_tp_layer_shapes"
_MODELING_FILE = "modeling_connect_pruned.py"


# ---------------------------------------------------------------------------------------- text
def tokenize(tokenizer: Any, text: str) -> torch.Tensor:
    """Token ids of a whole text as one 1-D LongTensor (no special tokens, as for perplexity)."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("tokenize needs a non-empty text")
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.as_tensor(ids, dtype=torch.long).flatten()


def calibration_batches(token_ids: torch.Tensor, n_samples: int = 10, seq_len: int = 128,
                        seed: int = 0) -> torch.Tensor:
    """``n_samples`` random windows of ``seq_len`` tokens from a token stream (LLM-Pruner: 10 x 128).

    Args:
        token_ids: 1-D LongTensor, e.g. from :func:`tokenize`.
        n_samples: number of calibration sequences.
        seq_len: tokens per sequence.
        seed: seed of the window positions.

    Returns:
        LongTensor of shape ``(n_samples, seq_len)``.
    """
    token_ids = torch.as_tensor(token_ids).flatten()
    if n_samples < 1 or seq_len < 2:
        raise ValueError(f"need n_samples >= 1 and seq_len >= 2, got {n_samples}, {seq_len}")
    if token_ids.numel() < seq_len:
        raise ValueError(f"the text has {token_ids.numel()} tokens, fewer than seq_len={seq_len}")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, token_ids.numel() - seq_len + 1, (n_samples,), generator=generator)
    return torch.stack([token_ids[s:s + seq_len] for s in starts.tolist()])


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _next_token_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=batch).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten())


def accumulate_loss_gradients(model: nn.Module, batches: torch.Tensor, batch_size: int = 1) -> float:
    """Zero ``.grad`` and accumulate dL/dW of the next-token loss over the calibration batches.

    The loss is the mean over all sequences (each mini-batch's loss is scaled by its share), so the
    gradient does not depend on ``batch_size``; that only bounds memory. Returns the mean loss.
    """
    device = _model_device(model)
    model.zero_grad(set_to_none=True)
    was_training = model.training
    model.eval()  # no dropout: importance should reflect the deployed model
    total, n = 0.0, batches.shape[0]
    with torch.enable_grad():
        for start in range(0, n, batch_size):
            chunk = batches[start:start + batch_size].to(device)
            loss = _next_token_loss(model, chunk) * (chunk.shape[0] / n)
            loss.backward()
            total += loss.item()
    model.train(was_training)
    return total


@torch.no_grad()
def perplexity(model: nn.Module, token_ids: torch.Tensor, seq_len: int = 128, batch_size: int = 4,
               max_windows: Optional[int] = None) -> float:
    """Perplexity over non-overlapping windows of ``seq_len`` tokens (LLM-Pruner's evaluation).

    Args:
        model: a causal LM returning ``.logits``.
        token_ids: 1-D LongTensor of the evaluation text.
        seq_len: window length (the paper and LLM-Pruner use 128).
        batch_size: windows per forward pass.
        max_windows: evaluate only the first windows (``None``: all of them).
    """
    token_ids = torch.as_tensor(token_ids).flatten()
    n_windows = token_ids.numel() // seq_len
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows < 1:
        raise ValueError(f"the text has {token_ids.numel()} tokens, fewer than seq_len={seq_len}")
    windows = token_ids[: n_windows * seq_len].view(n_windows, seq_len)
    device = _model_device(model)
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    for start in range(0, n_windows, batch_size):
        batch = windows[start:start + batch_size].to(device)
        logits = model(input_ids=batch).logits[:, :-1].float()
        nll += F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum").item()
        count += batch[:, 1:].numel()
    model.train(was_training)
    return math.exp(nll / count)


# ---------------------------------------------------------------------------------------- structure
def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a LLaMA-family causal LM (``model.model.layers``)."""
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise TypeError(
            f"{type(model).__name__} has no model.layers: only LLaMA-family decoders "
            "(LLaMA, Qwen2, Mistral, ...) with self_attn.{q,k,v,o}_proj and mlp.{gate,up,down}_proj are supported"
        )
    for i, layer in enumerate(layers):
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        names = ("q_proj", "k_proj", "v_proj", "o_proj")
        if attn is None or mlp is None or not all(isinstance(getattr(attn, n, None), nn.Linear) for n in names) \
                or not all(isinstance(getattr(mlp, n, None), nn.Linear) for n in ("gate_proj", "up_proj", "down_proj")):
            raise TypeError(
                f"layer {i} of {type(model).__name__} is not a LLaMA-style decoder layer "
                "(separate q/k/v/o projections and a gated MLP); fused qkv or gate_up projections are not supported"
            )
    return layers


def llm_pruner_layers(num_layers: int, keep_first: int = 3, keep_last: int = 1) -> range:
    """Indices of the layers LLM-Pruner prunes: all but the first ``keep_first`` and last ``keep_last``.

    The paper (appendix C.4) keeps the first three layers and the final layer of LLaMA-7B unchanged.

    Example:
        >>> list(llm_pruner_layers(8))
        [3, 4, 5, 6]
    """
    if keep_first < 0 or keep_last < 0:
        raise ValueError("keep_first and keep_last must be >= 0")
    if keep_first + keep_last >= num_layers:
        raise ValueError(
            f"keeping the first {keep_first} and last {keep_last} of {num_layers} layers leaves none to prune"
        )
    return range(keep_first, num_layers - keep_last)


def _head_dim(model: nn.Module, attn: nn.Module) -> int:
    head_dim = getattr(attn, "head_dim", None)
    if head_dim is None:
        config = model.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return int(head_dim)


@dataclass
class LayerShape:
    """Width of one decoder layer: query heads, key/value heads and MLP channels."""

    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int


def layer_shapes(model: nn.Module) -> List[LayerShape]:
    """The actual shape of every decoder layer, read from its weights (not from the config)."""
    shapes = []
    for layer in decoder_layers(model):
        attn, mlp = layer.self_attn, layer.mlp
        hd = _head_dim(model, attn)
        shapes.append(LayerShape(attn.q_proj.out_features // hd, attn.k_proj.out_features // hd,
                                 mlp.gate_proj.out_features))
    return shapes


def _sync_layer_attributes(model: nn.Module) -> None:
    """Make modules and config describe the weights after pruning (heads per KV group, MLP width).

    The attention forward infers the number of heads from the projection size; only the repeat
    factor of grouped-query attention is an attribute. Config entries that used to describe every
    layer stay as they were (the unpruned layers); the per-layer truth goes to
    ``config.connect_tp_layer_shapes``.
    """
    shapes = layer_shapes(model)
    for layer, shape in zip(decoder_layers(model), shapes):
        attn, mlp = layer.self_attn, layer.mlp
        attn.num_key_value_groups = shape.num_attention_heads // shape.num_key_value_heads
        for name, value in (("num_heads", shape.num_attention_heads),
                            ("num_key_value_heads", shape.num_key_value_heads)):
            if hasattr(attn, name):
                setattr(attn, name, value)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = shape.intermediate_size
    config = model.config
    config.head_dim = _head_dim(model, decoder_layers(model)[0].self_attn)
    uniform = all(s == shapes[0] for s in shapes)
    if uniform:
        config.num_attention_heads = shapes[0].num_attention_heads
        config.num_key_value_heads = shapes[0].num_key_value_heads
        config.intermediate_size = shapes[0].intermediate_size
        if hasattr(config, LAYER_SHAPES_KEY):
            delattr(config, LAYER_SHAPES_KEY)
    else:
        setattr(config, LAYER_SHAPES_KEY, [asdict(s) for s in shapes])


# ---------------------------------------------------------------------------------------- groups
class _ModelGraph:
    """The part of a Torch-Pruning DependencyGraph an importance may ask a group for: its model."""

    def __init__(self, model: nn.Module):
        self.model = model


def _group(model: nn.Module, members: Sequence[tuple], idxs: List[int], names: Dict[nn.Module, str]) -> Group:
    """A Torch-Pruning Group whose members are (module, pruning function) pairs on the same indices."""
    group = Group()
    for module, fn in members:
        node = Node(module, grad_fn=None, name=names.get(module))
        item = GroupItem(dep=Dependency(fn, fn, source=node, target=node), idxs=list(idxs))
        item.root_idxs = list(idxs)
        group._group.append(item)
    group._DG = _ModelGraph(model)
    return group


@dataclass
class _LayerGroups:
    index: int
    heads: Group             # channels of the query heads (head_dim per head)
    mlp: Group               # MLP channels
    num_heads: int           # query heads
    num_kv_heads: int
    head_dim: int
    gqa: bool                # key/value heads are shared: only query heads are pruned


def _layer_groups(model: nn.Module, index: int, names: Dict[nn.Module, str]) -> _LayerGroups:
    layer = decoder_layers(model)[index]
    attn, mlp = layer.self_attn, layer.mlp
    hd = _head_dim(model, attn)
    n_q, n_kv = attn.q_proj.out_features // hd, attn.k_proj.out_features // hd
    if n_q * hd != attn.q_proj.out_features or n_kv < 1 or n_q % n_kv:
        raise ValueError(f"layer {index}: q_proj/k_proj sizes are not whole heads of head_dim={hd}")
    gqa = n_kv != n_q
    out_fn, in_fn = tp.prune_linear_out_channels, tp.prune_linear_in_channels
    members = [(attn.q_proj, out_fn)]
    if not gqa:
        members += [(attn.k_proj, out_fn), (attn.v_proj, out_fn)]
    members.append((attn.o_proj, in_fn))
    heads = _group(model, members, list(range(n_q * hd)), names)
    channels = list(range(mlp.gate_proj.out_features))
    mlp_group = _group(model, [(mlp.gate_proj, out_fn), (mlp.up_proj, out_fn), (mlp.down_proj, in_fn)],
                       channels, names)
    return _LayerGroups(index, heads, mlp_group, n_q, n_kv, hd, gqa)


def _prune_group(group: Group, idxs: List[int]) -> None:
    for item in group:
        item.dep.handler(item.dep.target.module, idxs)


def _unit_params(model: nn.Module, index: int) -> tuple:
    """Parameters removed with one query head and with one MLP channel of layer ``index``."""
    layer = decoder_layers(model)[index]
    attn, mlp = layer.self_attn, layer.mlp
    hd = _head_dim(model, attn)
    gqa = attn.k_proj.out_features != attn.q_proj.out_features
    projections = [attn.q_proj] if gqa else [attn.q_proj, attn.k_proj, attn.v_proj]
    head = sum(hd * (p.in_features + (p.bias is not None)) for p in projections) + hd * attn.o_proj.out_features
    channel = sum(p.in_features + (p.bias is not None) for p in (mlp.gate_proj, mlp.up_proj)) + mlp.down_proj.out_features
    return head, channel


def group_ratio_for_param_ratio(model: nn.Module, param_ratio: float, layers: Iterable[int]) -> float:
    """Fraction of heads/channels to remove in ``layers`` so that ``param_ratio`` of all parameters go.

    The paper removes 25% of the groups of layers 4-30 of LLaMA-7B to remove 20% of its parameters,
    and 50% of them for 40%.
    """
    if not 0 <= param_ratio < 1:
        raise ValueError(f"param_ratio must be in [0, 1), got {param_ratio}")
    total = sum(p.numel() for p in model.parameters())
    prunable = 0
    for i in layers:
        head, channel = _unit_params(model, i)
        shape = layer_shapes(model)[i]
        prunable += head * shape.num_attention_heads + channel * shape.intermediate_size
    ratio = param_ratio * total / max(prunable, 1)
    if ratio >= 1:
        raise ValueError(
            f"removing {param_ratio:.0%} of the parameters needs {ratio:.0%} of the heads and channels of the "
            "selected layers; prune more layers (smaller keep_first/keep_last) or a smaller ratio"
        )
    return ratio


class LLMBlockPruner:
    """LLM-Pruner-style block pruner for LLaMA-family models, driven by a Torch-Pruning importance.

    In each selected layer, ``pruning_ratio`` of the attention heads and of the MLP channels are
    removed, ranked within the layer by ``importance`` (one score per channel, summed over the
    channels of a head). With grouped-query attention, the query heads are removed in equal numbers
    from each key/value group and the key/value heads are kept. The hidden size, the embeddings, the
    LM head and the layers outside ``layers`` are untouched.

    Gradient-based importances (``ConnectImportance``, ``GroupTaylorImportance``) need dL/dW in
    ``.grad`` before :meth:`step` (:func:`accumulate_loss_gradients`); ``ConnectImportance`` adds its
    connectivity gradient itself.

    Example:
        >>> pruner = LLMBlockPruner(model, ConnectImportance(lam=1e5), pruning_ratio=0.25)
        >>> accumulate_loss_gradients(model, calibration)
        >>> report = pruner.step()

    Args:
        model: a LLaMA/Qwen2/Mistral-style causal LM.
        importance: a Torch-Pruning importance, called on Torch-Pruning ``Group`` objects.
        pruning_ratio: fraction of the heads and MLP channels to remove in every selected layer.
        layers: indices of the layers to prune (default: :func:`llm_pruner_layers`).
        head_pruning: prune attention heads (otherwise only MLP channels).
        round_to: keep a multiple of this many MLP channels (e.g. 8 for tensor cores).
        example_inputs: token ids of the model's input shape, given to importances that measure the
            model (``ConnectImportance``) when they were built without one.
    """

    def __init__(self, model: nn.Module, importance: Any, pruning_ratio: float = 0.25,
                 layers: Optional[Iterable[int]] = None, head_pruning: bool = True,
                 round_to: Optional[int] = None, example_inputs: Optional[torch.Tensor] = None):
        if not 0 <= pruning_ratio < 1:
            raise ValueError(f"pruning_ratio must be in [0, 1), got {pruning_ratio}")
        if round_to is not None and round_to < 1:
            raise ValueError(f"round_to must be >= 1, got {round_to}")
        n_layers = len(decoder_layers(model))
        self.layers = list(llm_pruner_layers(n_layers) if layers is None else layers)
        bad = [i for i in self.layers if not 0 <= i < n_layers]
        if bad:
            raise ValueError(f"layer indices {bad} out of range for a model with {n_layers} layers")
        if getattr(importance, "default_strength", False):
            # The default balance was picked on CNNs; the tiny-LLaMA grid puts kappa >= 30 about 3
            # perplexity worse than kappa <= 10 at 40 % pruning (docs/llm.md, "The kappa grid").
            warnings.warn(
                f"ConnectImportance() uses the default balance={importance.balance:g}, chosen on CNNs; on "
                "language models kappa <= 10 measured better (docs/llm.md). Pass ConnectImportance(balance=1) "
                "(or lam= for the paper's absolute form) to choose it yourself.", UserWarning, stacklevel=2)
        self.model = model
        self.importance = importance
        self.pruning_ratio = pruning_ratio
        self.head_pruning = head_pruning
        self.round_to = round_to
        if getattr(importance, "example_inputs", False) is None:
            # ConnectImportance otherwise guesses the input from the last forward call it saw, which
            # for a causal LM may carry labels; token ids alone are what connectivity needs.
            if example_inputs is None:
                example_inputs = torch.zeros(1, 16, dtype=torch.long, device=_model_device(model))
            importance.example_inputs = {"input_ids": example_inputs}

    def _scores(self, group: Group) -> torch.Tensor:
        imp = self.importance(group)
        if imp is None:
            raise RuntimeError(f"{type(self.importance).__name__} returned no score for an LLM group")
        return imp.detach().float().cpu()

    def _head_indices(self, g: _LayerGroups) -> List[int]:
        """Query heads to remove: lowest summed score, equally many per key/value group."""
        if not self.head_pruning or self.pruning_ratio == 0:
            return []
        head_scores = self._scores(g.heads).view(g.num_heads, g.head_dim).sum(1)
        per_group = g.num_heads // g.num_kv_heads if g.gqa else g.num_heads
        n_remove = min(round(self.pruning_ratio * per_group), per_group - 1)
        removed = []
        for kv in range(g.num_heads // per_group):
            block = head_scores[kv * per_group:(kv + 1) * per_group]
            removed += (torch.argsort(block)[:n_remove] + kv * per_group).tolist()
        return sorted(removed)

    def _channel_indices(self, g: _LayerGroups) -> List[int]:
        if self.pruning_ratio == 0:
            return []
        scores = self._scores(g.mlp)
        n = scores.numel()
        keep = n - round(self.pruning_ratio * n)
        if self.round_to:
            keep = max(self.round_to, int(math.ceil(keep / self.round_to)) * self.round_to)
        keep = min(max(keep, 1), n)
        return sorted(torch.argsort(scores)[: n - keep].tolist())

    def step(self, calibration: Optional[torch.Tensor] = None, layers_per_pass: int = 1,
             batch_size: int = 1) -> Dict[str, Any]:
        """Score every group, then prune; returns what was removed per layer.

        All groups are scored before any weight is cut, so an importance that measures the whole
        model (the connectivity of ``ConnectImportance``) sees the unpruned model once.

        Args:
            calibration: token ids ``(n, seq_len)``. Given, the step computes the loss gradients
                itself, ``layers_per_pass`` decoder layers at a time: only those layers' parameters
                require a gradient during the pass, so only their loss and connectivity gradients
                are ever alive (LLaMA-7B in bfloat16: about 16 GB at the peak instead of 83 GB,
                docs/engine.md). The scores equal those of :func:`accumulate_loss_gradients` plus
                ``step()`` up to rounding; a finite ``balance`` costs one more pass over every
                layer (its lambda weighs the whole model's masses). Not given, ``.grad`` must
                already hold the loss gradients (gradient-based importances).
            layers_per_pass: decoder layers scored per pass (more: fewer passes, more memory).
            batch_size: calibration sequences per forward (memory only; the gradient is the mean).
        """
        names = {m: n for n, m in self.model.named_modules()}
        groups = [_layer_groups(self.model, i, names) for i in self.layers]
        if calibration is None:
            plans = [(g, self._head_indices(g), self._channel_indices(g)) for g in groups]
        else:
            plans = self._streamed_plans(groups, calibration, layers_per_pass, batch_size)
        report = {}
        for g, heads, channels in plans:
            if heads:
                idxs = [h * g.head_dim + j for h in heads for j in range(g.head_dim)]
                _prune_group(g.heads, idxs)
            if channels:
                _prune_group(g.mlp, channels)
            report[g.index] = {"heads_removed": heads, "channels_removed": len(channels)}
        _sync_layer_attributes(self.model)
        return report


    def _streamed_plans(self, groups: List[_LayerGroups], calibration: torch.Tensor, layers_per_pass: int,
                        batch_size: int) -> List[tuple]:
        """:meth:`step`'s plans, with gradients for ``layers_per_pass`` decoder layers at a time."""
        if isinstance(layers_per_pass, bool) or not isinstance(layers_per_pass, int) or layers_per_pass < 1:
            raise ValueError(f"layers_per_pass must be an integer >= 1, got {layers_per_pass!r}")
        if not isinstance(calibration, torch.Tensor) or calibration.dim() != 2 or calibration.is_floating_point():
            raise ValueError("calibration must be token ids of shape (n_sequences, seq_len), e.g. from "
                             f"llm.calibration_batches; got {getattr(calibration, 'shape', type(calibration))}")
        model, imp = self.model, self.importance
        layers = decoder_layers(model)
        weights_only = (isinstance(imp, (tp.importance.GroupMagnitudeImportance, tp.importance.RandomImportance))
                        and not isinstance(imp, tp.importance.GroupTaylorImportance))  # L1/L2/LAMP/random
        wants_loss = not weights_only and getattr(imp, "balance", None) != math.inf
        wants_grad = wants_loss or getattr(imp, "lam", 0) != 0  # a connectivity term needs requires_grad
        flags = [(p, p.requires_grad) for p in model.parameters()]

        def only(params: Iterable[nn.Parameter]) -> bool:
            """Gradients for ``params`` alone; ``False`` (and none) when the user froze all of them."""
            model.zero_grad(set_to_none=True)
            chosen = {id(p) for p in params}
            for p, flag in flags:  # a parameter the user froze stays frozen, as in the whole-model step
                p.requires_grad_(flag and id(p) in chosen)
            if not any(flag and id(p) in chosen for p, flag in flags):
                return False
            if wants_loss:
                accumulate_loss_gradients(model, calibration, batch_size)
            return True

        def passes(items: Sequence[Any]) -> List[List[Any]]:  # layers_per_pass consecutive items a pass
            return [list(items[i:i + layers_per_pass]) for i in range(0, len(items), layers_per_pass)]

        try:
            if getattr(imp, "balance", None) is not None and getattr(imp, "lam", 0) is None:
                # lambda = balance * (loss mass) / (connectivity mass) of the whole model, part by part
                in_layers = {id(p) for layer in layers for p in layer.parameters()}
                rest = [p for p, _ in flags if id(p) not in in_layers]
                parts = [[p for i in part for p in layers[i].parameters()] for part in passes(range(len(layers)))]
                loss_mass = conn_mass = 0.0
                for params in parts + [rest]:
                    if not only(params):
                        continue  # frozen: no gradient, no mass (as in the whole-model step)
                    loss, conn = imp.taylor_masses(model)
                    loss_mass, conn_mass = loss_mass + loss, conn_mass + conn
                imp.lambda_from_masses(loss_mass, conn_mass, fix=True)
            plans = []
            for part in passes(groups):
                if wants_grad and not only([p for g in part for p in layers[g.index].parameters()]):
                    raise ValueError(f"decoder layers {[g.index for g in part]} have no parameter that requires a "
                                     "gradient: unfreeze them, leave them out of layers=, or score with "
                                     "accumulate_loss_gradients() and step() without calibration")
                plans += [(g, self._head_indices(g), self._channel_indices(g)) for g in part]
        finally:
            model.zero_grad(set_to_none=True)
            for p, flag in flags:
                p.requires_grad_(flag)
        return plans


# ---------------------------------------------------------------------------------------- measurement
def count_linear_macs(model: nn.Module, seq_len: int = 128) -> int:
    """Multiply-accumulates of one forward pass over one sequence of ``seq_len`` tokens.

    Counts every ``nn.Linear`` (projections, MLP, LM head) by running the model with forward hooks,
    plus the two attention matmuls (``QK^T`` and ``AV``: ``2 * heads * head_dim * seq_len**2`` per
    layer, the full square as most counters report it). Norms, rotary embedding and softmax are
    elementwise and left out.
    """
    macs = [0]

    def hook(module, inputs, output):
        macs[0] += inputs[0].numel() // module.in_features * module.in_features * module.out_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Linear)]
    try:
        with torch.no_grad():
            model(input_ids=torch.zeros(1, seq_len, dtype=torch.long, device=_model_device(model)))
    finally:
        for h in handles:
            h.remove()
    for layer in decoder_layers(model):
        macs[0] += 2 * layer.self_attn.q_proj.out_features * seq_len * seq_len
    return macs[0]


def peak_memory_mib(device: Optional[torch.device] = None) -> Dict[str, float]:
    """Peak memory so far: CUDA allocator peak on a GPU, peak resident set size of the process otherwise."""
    if device is not None and torch.device(device).type == "cuda":
        return {"kind": "cuda_max_allocated", "mib": torch.cuda.max_memory_allocated(device) / 2**20}
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"kind": "process_max_rss", "mib": rss_kib / 1024}


# ---------------------------------------------------------------------------------------- save / load
_MODELING_TEMPLATE = '''"""Loader of a model pruned by connect_tp: a {base} whose layers differ in width.

Written by connect_tp.llm.save_pruned. config.json lists every decoder layer's query heads,
key/value heads and MLP channels under "{key}"; this class builds those shapes before
the weights are loaded. Load with connect_tp.llm.load_pruned(path, trust_remote_code=True) or
AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True); either runs this file, so do
that only for a folder you wrote or trust.
"""
import torch.nn as nn
from transformers import {base} as _Base


def _resize(model, config):
    shapes = getattr(config, "{key}", None)
    if not shapes:
        return
    hidden = config.hidden_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    for layer, shape in zip(model.model.layers, shapes):
        attn, mlp = layer.self_attn, layer.mlp
        q, kv, inter = shape["num_attention_heads"], shape["num_key_value_heads"], shape["intermediate_size"]
        ref = attn.q_proj.weight
        attn.q_proj = nn.Linear(hidden, q * head_dim, bias=attn.q_proj.bias is not None, device=ref.device, dtype=ref.dtype)
        attn.k_proj = nn.Linear(hidden, kv * head_dim, bias=attn.k_proj.bias is not None, device=ref.device, dtype=ref.dtype)
        attn.v_proj = nn.Linear(hidden, kv * head_dim, bias=attn.v_proj.bias is not None, device=ref.device, dtype=ref.dtype)
        attn.o_proj = nn.Linear(q * head_dim, hidden, bias=attn.o_proj.bias is not None, device=ref.device, dtype=ref.dtype)
        attn.num_key_value_groups = q // kv
        ref = mlp.gate_proj.weight
        mlp.gate_proj = nn.Linear(hidden, inter, bias=mlp.gate_proj.bias is not None, device=ref.device, dtype=ref.dtype)
        mlp.up_proj = nn.Linear(hidden, inter, bias=mlp.up_proj.bias is not None, device=ref.device, dtype=ref.dtype)
        mlp.down_proj = nn.Linear(inter, hidden, bias=mlp.down_proj.bias is not None, device=ref.device, dtype=ref.dtype)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = inter


class ConnectPrunedForCausalLM(_Base):
    def __init__(self, config):
        super().__init__(config)
        _resize(self, config)
'''


def save_pruned(model: nn.Module, path: str, tokenizer: Any = None) -> str:
    """Save a (pruned) model so that ``from_pretrained`` reloads it; returns ``path``.

    A model whose layers all have the same shape is saved as the plain architecture. Otherwise
    ``config.json`` gets the per-layer shapes and an ``auto_map`` to a small modeling file written
    beside the weights (``modeling_connect_pruned.py``), which has to run to rebuild the layers:
    load it with ``load_pruned(path, trust_remote_code=True)`` or
    ``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)``.

    Args:
        model: the model to save.
        path: the output folder (created if needed).
        tokenizer: saved beside the model when given.

    Returns:
        ``path``.
    """
    _sync_layer_attributes(model)
    config = model.config
    non_uniform = getattr(config, LAYER_SHAPES_KEY, None) is not None
    base = type(model).__name__
    if base == "ConnectPrunedForCausalLM":  # re-saving a reloaded pruned model
        base = type(model).__mro__[1].__name__
    if non_uniform:
        config.auto_map = {"AutoModelForCausalLM": f"{_MODELING_FILE[:-3]}.ConnectPrunedForCausalLM"}
    elif hasattr(config, "auto_map"):
        delattr(config, "auto_map")
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    if non_uniform:
        with open(os.path.join(path, _MODELING_FILE), "w") as f:
            f.write(_MODELING_TEMPLATE.format(base=base, key=LAYER_SHAPES_KEY))
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


class UntrustedCodeError(ValueError):
    """Loading a model folder would run Python code that the caller did not allow (or that is remote)."""


# ``module.Class`` where ``module`` is a Python file in the model folder; what save_pruned writes.
_LOCAL_CLASS_REFERENCE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\.[A-Za-z_][A-Za-z0-9_]*")


def _auto_map_references(auto_map: Any) -> List[str]:
    """Every class reference in an ``auto_map`` (values are strings or lists of strings/None)."""
    if not isinstance(auto_map, dict):
        return [repr(auto_map)]
    refs = []
    for value in auto_map.values():
        for ref in value if isinstance(value, (list, tuple)) else [value]:
            if ref is not None:
                refs.append(ref if isinstance(ref, str) else repr(ref))
    return refs


def _check_auto_map(path: str, auto_map: Any) -> List[str]:
    """The local modeling files an ``auto_map`` needs; refuses references to code outside ``path``.

    Raises:
        UntrustedCodeError: a reference points to a Hub repo (``user/repo--module.Class``), is not
            of the form ``module.Class``, or names a module file that is not in ``path``.
    """
    config_file = os.path.join(path, "config.json")
    modules = []
    for ref in _auto_map_references(auto_map):
        if "--" in ref:
            raise UntrustedCodeError(
                f"{config_file} has an auto_map entry {ref!r} that points to code in another repository "
                f"(the 'user/repo--module.Class' form makes transformers download and run it). load_pruned "
                f"refuses it even with trust_remote_code=True: a folder written by save_pruned only refers "
                f"to its own modeling file. Restore the entry to "
                f"'{_MODELING_FILE[:-3]}.ConnectPrunedForCausalLM', or save the model again with save_pruned")
        if not _LOCAL_CLASS_REFERENCE.fullmatch(ref):
            raise UntrustedCodeError(
                f"{config_file} has an auto_map entry {ref!r} that is not of the form 'module.Class' with "
                f"module a Python file in the folder; load_pruned refuses it. Save the model again with save_pruned")
        module_file = os.path.join(path, ref.split(".")[0] + ".py")
        if not os.path.isfile(module_file):
            raise UntrustedCodeError(
                f"{config_file} has an auto_map entry {ref!r} but {module_file} does not exist; load_pruned "
                f"only loads modeling code saved in the folder. Save the model again with save_pruned")
        if module_file not in modules:
            modules.append(module_file)
    return modules


def load_pruned(path: str, trust_remote_code: bool = False, **kwargs: Any) -> nn.Module:
    """Load a model written by :func:`save_pruned` (``from_pretrained`` with its own modeling file).

    A model whose layers were pruned to different widths is saved with a Python modeling file next
    to the weights (``modeling_connect_pruned.py``, referenced by ``auto_map`` in ``config.json``);
    rebuilding it means running that file. That happens only when the caller passes
    ``trust_remote_code=True``: this function never turns it on by itself, so a folder whose
    modeling file was edited by someone else cannot run code on a plain ``load_pruned(path)``. Pass
    it only for folders you wrote with :func:`save_pruned` or otherwise trust (read the file first).
    An ``auto_map`` that points outside the folder (``user/repo--module.Class``, code from the
    Hugging Face Hub) is refused even with the opt-in. A model saved with equal layers has no
    modeling file and loads without the flag.

    Args:
        path: the folder written by :func:`save_pruned`.
        trust_remote_code: allow running the modeling file saved in ``path``.
        **kwargs: passed to ``AutoModelForCausalLM.from_pretrained`` (e.g. ``dtype``, ``device_map``).

    Returns:
        The model, with its per-layer attributes in sync with its weights.

    Raises:
        FileNotFoundError: ``path`` has no ``config.json``.
        UntrustedCodeError: the folder needs its modeling file and ``trust_remote_code`` is False,
            or its ``auto_map`` points to code outside the folder.

    Example:
        >>> model = load_pruned("llama-7b-connect-20", trust_remote_code=True)  # doctest: +SKIP
    """
    from transformers import AutoModelForCausalLM

    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"{config_file} does not exist: {path} is not a model folder written by save_pruned")
    with open(config_file) as f:
        auto_map = json.load(f).get("auto_map")
    needs_code = bool(auto_map)  # an empty auto_map names no code
    if needs_code:
        modules = _check_auto_map(path, auto_map)
        if not trust_remote_code:
            raise UntrustedCodeError(
                f"{path} needs the Python file {', '.join(modules) or _MODELING_FILE} to rebuild its pruned "
                f"layers (config.json has an auto_map), and loading it would run that file. load_pruned does not "
                f"run code from a model folder unless asked: if you wrote this folder with save_pruned or "
                f"otherwise trust it (read the file first), call load_pruned(path, trust_remote_code=True)")
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=needs_code and trust_remote_code, **kwargs)
    _sync_layer_attributes(model)
    return model


# ---------------------------------------------------------------------------------------- recovery
def lora_finetune(model: nn.Module, batches: torch.Tensor, steps: int = 100, lr: float = 1e-4,
                  rank: int = 8, alpha: int = 16, batch_size: int = 4, seed: int = 0) -> nn.Module:
    """LoRA recovery after pruning (the paper: Alpaca, 2 epochs), merged back into the weights.

    Trains rank-``rank`` adapters on all seven projections of every decoder layer with the
    next-token loss on ``batches`` (``(n, seq_len)`` token ids), then merges them, so the returned
    model has the pruned architecture and no adapter. Needs ``peft``.
    """
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as err:  # optional extra
        raise ImportError("LoRA recovery needs peft: pip install 'connect_tp[llm]'") from err
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets,
                                                  lora_dropout=0.0, task_type="CAUSAL_LM"))
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=lr)
    generator = torch.Generator().manual_seed(seed)
    device = _model_device(model)
    peft_model.train()
    for _ in range(steps):
        rows = torch.randint(0, batches.shape[0], (batch_size,), generator=generator)
        loss = _next_token_loss(peft_model, batches[rows].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    merged = peft_model.merge_and_unload()
    merged.eval()
    return merged
