"""CoNNect pruning of Hugging Face causal language models with Torch-Pruning.

Supported decoder families (:data:`FAMILIES`): LLaMA-style (LLaMA, Qwen2, Qwen3, Mistral, Gemma:
separate ``q/k/v/o_proj``, gated MLP), Phi-3/Phi-3.5 (fused ``qkv_proj`` and ``gate_up_proj``),
GPT-2 (fused ``c_attn`` in ``Conv1D`` layout, LayerNorm, plain MLP ``c_fc``/``c_proj``) and OPT
(``q/k/v/out_proj``, plain MLP ``fc1``/``fc2``). Any other model is refused when the pruner is
built, with the list of families and what the model lacks.

This module reproduces the LLM-Pruner-style one-shot structural pruning of the paper's section
4.2.2 (Table 2): inside a range of decoder layers (by default all but the first three and the last
one; about half of a model with fewer than 7 layers), a fixed fraction of the attention heads and
of the MLP channels of every layer is removed, the hidden size is kept. Which heads and channels go
is decided per layer by any Torch-Pruning importance (``ConnectImportance``,
``GroupTaylorImportance``, ``GroupMagnitudeImportance``, ``RandomImportance``) applied to
Torch-Pruning ``Group`` objects, and the weights are cut with Torch-Pruning's own pruning functions.

Why the groups are built here rather than traced: a decoder layer has exactly two kinds of coupled
structures, and they are known from the architecture:

* a *head* group: the ``head_dim`` query rows of head ``h`` (and its key and value rows without
  grouped-query attention; in a fused ``qkv_proj``/``c_attn`` they sit at three offsets of one
  weight) with the same columns of the output projection;
* an *MLP channel* group: row ``c`` of ``gate_proj`` and ``up_proj`` (rows ``c`` and ``m + c`` of a
  fused ``gate_up_proj``, row ``c`` of ``fc1``/``c_fc``) with column ``c`` of the down projection.

Torch-Pruning's own tracer finds the same MLP groups, and without grouped-query attention the same
head groups with the same scores (``tests/test_llm.py``, ``tests/test_llm_torch_pruning.py``): its
``MetaPruner`` with ``num_heads`` and head pruning works with ``ConnectImportance`` on LLaMA and
Qwen2 once ``model.config.use_cache = False`` (with the KV cache on, Torch-Pruning 1.6.0's
dependency search did not finish on a 2-layer model; docs/llm.md). With grouped-query attention
its attention group spans only the key/value width of ``q_proj``/``o_proj``, so its head scores are
not per query head; here the key/value heads are kept and the query heads are removed in equal
numbers from every key/value group, scored over all their channels, so every layer stays a valid
GQA layer. Building the groups from the architecture also needs no trace of a 7B model, and covers
GPT-2's ``Conv1D`` (scored and cut as ``nn.Linear`` for the step, then put back).

A pruned model has a different number of heads and MLP channels in different layers, which the
architecture's own config cannot describe (nor, for GPT-2 and OPT, a head count that changes the
head size hidden / heads). :func:`save_pruned` then writes the per-layer shapes into
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
    >>> pruner = llm.LLMBlockPruner(model, ConnectImportance(balance=1), pruning_ratio=0.25)
    >>> report = pruner.step(calibration=batches)                # 25% of heads/channels in layers 3..30
    >>> llm.save_pruned(model, "llama-7b-connect-20", tokenizer)
"""
from __future__ import annotations

import copy
import json
import math
import os
import re
import resource
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

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
    "FAMILIES",
    "model_family",
    "group_ratio_for_param_ratio",
    "layer_shapes",
    "llm_pruner_layers",
    "load_pruned",
    "lora_finetune",
    "peak_memory_mib",
    "perplexity",
    "save_pruned",
    "sync_layer_attributes",
    "tokenize",
]

#: Key in ``config.json`` holding the per-layer shapes of a pruned model.
LAYER_SHAPES_KEY = "connect_tp_layer_shapes"
#: Key in ``config.json`` holding, per layer, the projections' sizes and attributes the modeling file rebuilds.
LAYER_MODULES_KEY = "connect_tp_layer_modules"
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
@dataclass(frozen=True)
class _Family:
    """Where the prunable projections of one decoder family live, relative to a decoder layer.

    ``q``/``k``/``v`` are separate projections; ``qkv`` is one fused projection whose output rows are
    the query heads, then the key heads, then the value heads. ``up`` are the projections whose output
    rows are the MLP channels (gate and up of a gated MLP, ``fc1`` of a plain one); ``gate_up`` is a
    fused gated projection (gate rows, then up rows); ``down`` takes the channels back to the hidden
    size.
    """

    name: str
    examples: str
    layers: str
    attn: str
    o: str
    down: str
    q: Optional[str] = None
    k: Optional[str] = None
    v: Optional[str] = None
    qkv: Optional[str] = None
    up: Tuple[str, ...] = ()
    gate_up: Optional[str] = None
    mlp: Optional[str] = None

    def projections(self) -> List[str]:
        names = [self.q, self.k, self.v, self.qkv, self.o, *self.up, self.gate_up, self.down]
        return [n for n in names if n]

    def describe(self) -> str:
        return f"{self.examples} ({self.layers}[i] with {', '.join(self.projections())})"


#: The decoder families :class:`LLMBlockPruner` knows, tried in this order.
FAMILIES: Tuple[_Family, ...] = (
    _Family("llama", "LLaMA, Qwen2, Qwen3, Mistral, Gemma", "model.layers", attn="self_attn",
            q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", o="self_attn.o_proj",
            up=("mlp.gate_proj", "mlp.up_proj"), down="mlp.down_proj", mlp="mlp"),
    _Family("phi3", "Phi-3, Phi-3.5", "model.layers", attn="self_attn", qkv="self_attn.qkv_proj",
            o="self_attn.o_proj", gate_up="mlp.gate_up_proj", down="mlp.down_proj", mlp="mlp"),
    _Family("gpt2", "GPT-2", "transformer.h", attn="attn", qkv="attn.c_attn", o="attn.c_proj",
            up=("mlp.c_fc",), down="mlp.c_proj", mlp="mlp"),
    _Family("opt", "OPT", "model.decoder.layers", attn="self_attn", q="self_attn.q_proj",
            k="self_attn.k_proj", v="self_attn.v_proj", o="self_attn.out_proj", up=("fc1",), down="fc2"),
)


def _is_conv1d(module: nn.Module) -> bool:
    """Hugging Face's ``Conv1D`` (GPT-2): a linear layer whose weight is stored as (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def _is_projection(module: Any) -> bool:
    return isinstance(module, nn.Linear) or (isinstance(module, nn.Module) and _is_conv1d(module))


def _in_features(module: nn.Module) -> int:
    return module.weight.shape[0] if _is_conv1d(module) else module.in_features


def _out_features(module: nn.Module) -> int:
    return module.weight.shape[1] if _is_conv1d(module) else module.out_features


def _submodule(root: nn.Module, path: str) -> Optional[nn.Module]:
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def _missing(model: nn.Module, family: _Family) -> Optional[str]:
    """What ``model`` lacks to be of ``family`` (``None``: nothing)."""
    layers = _submodule(model, family.layers)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        return f"no {family.layers}"
    for i, layer in enumerate(layers):
        for path in family.projections():
            if not _is_projection(_submodule(layer, path)):
                return f"{family.layers}[{i}] has no {path} (nn.Linear)"
    return None


def model_family(model: nn.Module) -> _Family:
    """The decoder family of a causal LM (one of :data:`FAMILIES`).

    Raises:
        TypeError: the model is of none of them; the message lists the supported families and says
            what the closest one misses.
    """
    misses = []
    for family in FAMILIES:
        missing = _missing(model, family)
        if missing is None:
            return family
        misses.append((not missing.startswith("no "), family, missing))
    close = [(family, missing) for found_layers, family, missing in misses if found_layers]
    detail = "; ".join(f"as {family.name}: {missing}" for family, missing in close) or \
        "; ".join(sorted({missing for _, _, missing in misses}))
    supported = "; ".join(family.describe() for family in FAMILIES)
    raise TypeError(
        f"{type(model).__name__} is not a supported decoder ({detail}). Supported families: {supported}. "
        "Other architectures (GPT-NeoX/Pythia, Falcon, ...) can be pruned with Torch-Pruning's own "
        "MetaPruner and ConnectImportance (docs/llm.md)")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a supported causal LM (``model.layers``, ``transformer.h``, ``model.decoder.layers``)."""
    return model.get_submodule(model_family(model).layers)


#: LLM-Pruner's layer range on LLaMA-7B: the first three layers and the final one are kept.
KEEP_FIRST, KEEP_LAST = 3, 1


def llm_pruner_layers(num_layers: int, keep_first: Optional[int] = None, keep_last: Optional[int] = None) -> range:
    """Indices of the layers LLM-Pruner prunes: all but the first ``keep_first`` and last ``keep_last``.

    The paper (appendix C.4) keeps the first three layers and the final layer of LLaMA-7B unchanged.
    Left out, ``keep_first`` and ``keep_last`` are 3 and 1 when the model has at least 7 layers; a
    shallower model keeps its first ``max(1, (n - 1) // 2)`` layers and its last one (the last
    only from 3 layers on), so that about half of a small model is pruned: 4 layers prune layers 1
    and 2, 2 layers prune layer 1, and a single layer is pruned itself.

    Example:
        >>> list(llm_pruner_layers(8))
        [3, 4, 5, 6]
        >>> list(llm_pruner_layers(4))
        [1, 2]

    Raises:
        ValueError: the given ``keep_first``/``keep_last`` leave no layer to prune; the message
            names the arguments to change.
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    if keep_last is None:
        keep_last = KEEP_LAST if num_layers >= 3 else 0
    if keep_first is None:
        keep_first = 0 if num_layers == 1 else min(KEEP_FIRST, max(1, (num_layers - 1) // 2))
    if keep_first < 0 or keep_last < 0:
        raise ValueError("keep_first and keep_last must be >= 0")
    if keep_first + keep_last >= num_layers:
        raise ValueError(
            f"keeping the first {keep_first} and last {keep_last} of {num_layers} layers leaves none to prune: "
            f"pass smaller keep_first/keep_last (benchmarks.llm_prune: --keep-first/--keep-last), leave them "
            f"out to adapt the range to the depth, or give LLMBlockPruner(layers=[...]) explicitly")
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


def _shape(model: nn.Module, family: _Family, layer: nn.Module) -> Tuple[LayerShape, int]:
    """A layer's shape read from its weights, and its head dimension."""
    attn = layer.get_submodule(family.attn)
    hd = _head_dim(model, attn)
    n_q = _in_features(layer.get_submodule(family.o)) // hd  # the output projection reads every query head
    if family.qkv is None:
        n_kv = _out_features(layer.get_submodule(family.k)) // hd
    else:  # query rows, then key rows and value rows of n_kv heads each
        n_kv = (_out_features(layer.get_submodule(family.qkv)) // hd - n_q) // 2
    if family.gate_up is not None:
        inter = _out_features(layer.get_submodule(family.gate_up)) // 2
    else:
        inter = _out_features(layer.get_submodule(family.up[0]))
    return LayerShape(n_q, n_kv, inter), hd


def layer_shapes(model: nn.Module) -> List[LayerShape]:
    """The actual shape of every decoder layer, read from its weights (not from the config)."""
    family = model_family(model)
    return [_shape(model, family, layer)[0] for layer in model.get_submodule(family.layers)]


class _LayerConfig:
    """A decoder layer's view of the model config with its own head count (Phi-3 reads it at run time).

    Everything else is read through to the model's config, so later changes to it (attention
    implementation, ``use_cache``) still reach the layer.
    """

    def __init__(self, base: Any, **overrides: Any):
        self.__dict__["_base"] = base
        self.__dict__["_overrides"] = dict(overrides)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("_base", "_overrides"):
            raise AttributeError(name)
        overrides = self.__dict__.get("_overrides", {})
        if name in overrides:
            return overrides[name]
        return getattr(self.__dict__["_base"], name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self._overrides:
            self._overrides[name] = value
        else:
            setattr(self._base, name, value)


def _base_config(config: Any) -> Any:
    return config.__dict__["_base"] if isinstance(config, _LayerConfig) else config


#: Per family: the attributes of a layer that must follow its shape (``path``: value from the shape).
def _layer_attributes(family: _Family, shape: LayerShape, hd: int) -> Dict[str, int]:
    a = family.attn
    if family.name == "llama":
        return {f"{a}.num_key_value_groups": shape.num_attention_heads // shape.num_key_value_heads,
                f"{a}.num_heads": shape.num_attention_heads, f"{a}.num_key_value_heads": shape.num_key_value_heads,
                "mlp.intermediate_size": shape.intermediate_size}
    if family.name == "phi3":
        return {f"{a}.num_key_value_groups": shape.num_attention_heads // shape.num_key_value_heads,
                f"{a}.num_key_value_heads": shape.num_key_value_heads}
    if family.name == "gpt2":  # c_attn's output is split into q, k, v of split_size each
        return {f"{a}.num_heads": shape.num_attention_heads, f"{a}.split_size": shape.num_attention_heads * hd}
    return {f"{a}.num_heads": shape.num_attention_heads}  # opt


def _config_updates(family: _Family, shape: LayerShape, hd: int) -> Dict[str, int]:
    """Config entries that describe layers of ``shape`` (checked against a fresh model before use)."""
    if family.name in ("llama", "phi3"):
        return {"num_attention_heads": shape.num_attention_heads, "num_key_value_heads": shape.num_key_value_heads,
                "intermediate_size": shape.intermediate_size, "head_dim": hd}
    if family.name == "gpt2":
        return {"n_head": shape.num_attention_heads, "n_inner": shape.intermediate_size}
    return {"num_attention_heads": shape.num_attention_heads, "ffn_dim": shape.intermediate_size}  # opt


def _set_path(layer: nn.Module, path: str, value: Any, only_existing: bool = True) -> None:
    owner_path, _, name = path.rpartition(".")
    owner = _submodule(layer, owner_path) if owner_path else layer
    if owner is not None and (hasattr(owner, name) or not only_existing):
        setattr(owner, name, value)


def _base_class(model: nn.Module) -> type:
    """The architecture's own class (a model reloaded from :func:`save_pruned`'s file subclasses it)."""
    return next(c for c in type(model).__mro__ if c.__name__ != "ConnectPrunedForCausalLM")


def _plain_config_fits(model: nn.Module, updates: Dict[str, Any]) -> bool:
    """Whether the architecture's own class, built from the config with ``updates``, has the model's shapes.

    Built on the meta device (no memory, no initialization cost), so what a plain
    ``from_pretrained`` would build is compared with the weights, not assumed.
    """
    config = copy.deepcopy(_base_config(model.config))
    for key in (LAYER_SHAPES_KEY, LAYER_MODULES_KEY, "auto_map"):
        if hasattr(config, key):
            delattr(config, key)
    for key, value in updates.items():
        setattr(config, key, value)
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fresh = _base_class(model)(config)
    except Exception:  # the config cannot describe it (e.g. GPT-2: head size = hidden size / heads)
        return False
    want = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    have = {name: tuple(t.shape) for name, t in fresh.state_dict().items()}
    return want == have


def sync_layer_attributes(model: nn.Module) -> None:
    """Make modules and config describe the weights after pruning (heads, key/value groups, MLP width).

    The attention forwards infer most sizes from the projections; what they read from attributes
    (the repeat factor of grouped-query attention, GPT-2's ``split_size``, OPT's ``num_heads``,
    Phi-3's head count in the config) is set per layer. When every layer has the same shape and the
    architecture's own config can describe it (checked by building the class on the meta device),
    the config is updated and the model saves as the plain architecture; otherwise the config keeps
    describing the unpruned layers and the per-layer truth goes to ``config.connect_tp_layer_shapes``
    (and, for :func:`save_pruned`'s modeling file, ``config.connect_tp_layer_modules``).

    :meth:`LLMBlockPruner.step`, :func:`save_pruned` and :func:`load_pruned` call it; call it
    yourself after pruning a supported model another way (Torch-Pruning's ``MetaPruner``, docs/llm.md).
    """
    family = model_family(model)
    layers = model.get_submodule(family.layers)
    config = _base_config(model.config)
    measured = [_shape(model, family, layer) for layer in layers]
    shapes = [s for s, _ in measured]
    hd = measured[0][1]
    uniform = all(s == shapes[0] for s in shapes)
    updates = _config_updates(family, shapes[0], hd)
    plain = uniform and _plain_config_fits(model, updates)
    if plain:
        for key, value in updates.items():
            setattr(config, key, value)
    elif family.name in ("llama", "phi3"):
        config.head_dim = hd  # the attention modules and the rotary embedding read it
    for key in (LAYER_SHAPES_KEY, LAYER_MODULES_KEY):
        if hasattr(config, key):
            delattr(config, key)
    specs = []
    for layer, (shape, layer_hd) in zip(layers, measured):
        attributes = _layer_attributes(family, shape, layer_hd)
        for path, value in attributes.items():
            _set_path(layer, path, value)
        if family.name == "phi3":  # Phi-3 splits q|k|v with config.num_attention_heads at run time
            attn = layer.get_submodule(family.attn)
            heads = shape.num_attention_heads
            attn.config = config if heads == config.num_attention_heads else _LayerConfig(config, num_attention_heads=heads)
        modules = {}
        for path in family.projections():
            m = layer.get_submodule(path)
            modules[path] = {"type": "Conv1D" if _is_conv1d(m) else "Linear", "in": _in_features(m),
                             "out": _out_features(m), "bias": getattr(m, "bias", None) is not None}
        specs.append({"modules": modules,
                      "attributes": {p: v for p, v in attributes.items() if _submodule_has(layer, p)},
                      "config": {"num_attention_heads": shape.num_attention_heads} if family.name == "phi3" else {}})
    if not plain:
        setattr(config, LAYER_SHAPES_KEY, [asdict(s) for s in shapes])
        setattr(config, LAYER_MODULES_KEY, {"layers": family.layers, "attention": family.attn, "specs": specs})


_sync_layer_attributes = sync_layer_attributes  # what step() and save/load call (a benchmark replaces it)


def _submodule_has(layer: nn.Module, path: str) -> bool:
    owner_path, _, name = path.rpartition(".")
    owner = _submodule(layer, owner_path) if owner_path else layer
    return owner is not None and hasattr(owner, name)


# ---------------------------------------------------------------------------------------- groups
class _ModelGraph:
    """The part of a Torch-Pruning DependencyGraph an importance may ask a group for: its model."""

    def __init__(self, model: nn.Module):
        self.model = model


def _group(model: nn.Module, members: Sequence[tuple], n: int, names: Dict[nn.Module, str]) -> Group:
    """A Torch-Pruning Group over ``n`` coupled units.

    ``members`` are ``(module, pruning function, offset)``: the unit ``i`` is row/column
    ``offset + i`` of that module (a fused projection appears once per part it holds, e.g. the gate
    and the up rows of Phi-3's ``gate_up_proj``). ``root_idxs`` are the unit indices, which is how
    Torch-Pruning importances add the parts of a group up.
    """
    group = Group()
    root = list(range(n))
    for module, fn, offset in members:
        node = Node(module, grad_fn=None, name=names.get(module))
        item = GroupItem(dep=Dependency(fn, fn, source=node, target=node), idxs=[offset + i for i in root])
        item.root_idxs = list(root)
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
    family = model_family(model)
    layer = model.get_submodule(family.layers)[index]
    shape, hd = _shape(model, family, layer)
    n_q, n_kv = shape.num_attention_heads, shape.num_key_value_heads
    attn_rows = _out_features(layer.get_submodule(family.qkv or family.q))
    expected = (n_q + 2 * n_kv) * hd if family.qkv else n_q * hd
    if n_q < 1 or n_kv < 1 or n_q % n_kv or attn_rows != expected:
        raise ValueError(f"layer {index}: the attention projections are not whole heads of head_dim={hd} "
                         f"({n_q} query and {n_kv} key/value heads read from the weights)")
    for path in family.projections():
        if _is_conv1d(layer.get_submodule(path)):
            raise TypeError(f"layer {index}: {path} is a Conv1D; LLMBlockPruner scores it as nn.Linear "
                            "(use LLMBlockPruner.step, which converts it)")
    gqa = n_kv != n_q
    out_fn, in_fn = tp.prune_linear_out_channels, tp.prune_linear_in_channels
    q_width = n_q * hd
    if family.qkv is None:
        members = [(layer.get_submodule(family.q), out_fn, 0)]
        if not gqa:
            members += [(layer.get_submodule(family.k), out_fn, 0), (layer.get_submodule(family.v), out_fn, 0)]
    else:
        qkv = layer.get_submodule(family.qkv)
        members = [(qkv, out_fn, 0)]
        if not gqa:  # head h's key and value rows sit q_width and 2 * q_width further down
            members += [(qkv, out_fn, q_width), (qkv, out_fn, 2 * q_width)]
    members.append((layer.get_submodule(family.o), in_fn, 0))
    heads = _group(model, members, q_width, names)
    inter = shape.intermediate_size
    if family.gate_up is not None:
        gate_up = layer.get_submodule(family.gate_up)
        mlp_members = [(gate_up, out_fn, 0), (gate_up, out_fn, inter)]
    else:
        mlp_members = [(layer.get_submodule(p), out_fn, 0) for p in family.up]
    mlp_members.append((layer.get_submodule(family.down), in_fn, 0))
    mlp_group = _group(model, mlp_members, inter, names)
    return _LayerGroups(index, heads, mlp_group, n_q, n_kv, hd, gqa)


def _prune_group(group: Group, idxs: List[int]) -> None:
    """Remove the units ``idxs`` (root indices) from every member, once per module and pruning function."""
    todo: Dict[tuple, tuple] = {}
    for item in group:
        module, handler = item.dep.target.module, item.dep.handler
        local = dict(zip(item.root_idxs, item.idxs))
        key = (id(module), handler)
        todo.setdefault(key, (module, handler, set()))[2].update(local[i] for i in idxs)
    for module, handler, rows in todo.values():
        handler(module, sorted(rows))


def _as_linear(conv: nn.Module) -> nn.Linear:
    """An ``nn.Linear`` computing what a Hugging Face ``Conv1D`` computes, sharing its weight memory and gradient."""
    with torch.device("meta"):
        linear = nn.Linear(conv.weight.shape[0], conv.weight.shape[1], bias=conv.bias is not None)
    linear.weight = nn.Parameter(conv.weight.detach().t(), requires_grad=conv.weight.requires_grad)
    if conv.weight.grad is not None:
        linear.weight.grad = conv.weight.grad.t()
    if conv.bias is not None:
        linear.bias = conv.bias
    return linear


def _as_conv1d(linear: nn.Linear, conv_type: type) -> nn.Module:
    """The ``Conv1D`` holding a (pruned) ``nn.Linear``'s weight, in ``Conv1D``'s (in, out) layout."""
    with torch.device("meta"):
        conv = conv_type(linear.out_features, linear.in_features)
    conv.weight = nn.Parameter(linear.weight.detach().t().contiguous(), requires_grad=linear.weight.requires_grad)
    if linear.weight.grad is not None:
        conv.weight.grad = linear.weight.grad.t().contiguous()
    conv.bias = linear.bias
    conv.nf = linear.out_features
    if hasattr(conv, "nx"):
        conv.nx = linear.in_features
    return conv


@contextmanager
def _linear_projections(model: nn.Module, indices: Iterable[int]):
    """While inside, the ``Conv1D`` projections of the given layers (GPT-2) are ``nn.Linear`` modules.

    Torch-Pruning's pruning functions and importances read a linear weight as (out, in); GPT-2's
    ``Conv1D`` stores it transposed. The swap computes the same function (and carries ``.grad``),
    and is undone on the way out, pruned or not, so the model saves and loads as GPT-2.
    """
    family = model_family(model)
    layers = model.get_submodule(family.layers)
    swapped = []
    try:
        for i in indices:
            for path in family.projections():
                module = layers[i].get_submodule(path)
                if _is_conv1d(module):
                    _set_path(layers[i], path, _as_linear(module))
                    swapped.append((i, path, type(module)))
        yield
    finally:
        for i, path, conv_type in swapped:
            _set_path(layers[i], path, _as_conv1d(layers[i].get_submodule(path), conv_type))


def _unit_params(model: nn.Module, index: int) -> tuple:
    """Parameters removed with one query head and with one MLP channel of layer ``index``."""
    family = model_family(model)
    layer = model.get_submodule(family.layers)[index]
    shape, hd = _shape(model, family, layer)
    gqa = shape.num_key_value_heads != shape.num_attention_heads

    def cost(path: str, parts: int = 1) -> int:  # weights (and bias) of one output row, per part
        m = layer.get_submodule(path)
        return parts * (_in_features(m) + (getattr(m, "bias", None) is not None))

    if family.qkv is None:
        head = hd * sum(cost(p) for p in ([family.q] if gqa else [family.q, family.k, family.v]))
    else:
        head = hd * cost(family.qkv, 1 if gqa else 3)
    head += hd * _out_features(layer.get_submodule(family.o))
    if family.gate_up is not None:
        channel = cost(family.gate_up, 2)
    else:
        channel = sum(cost(p) for p in family.up)
    channel += _out_features(layer.get_submodule(family.down))
    return head, channel


def group_ratio_for_param_ratio(model: nn.Module, param_ratio: float, layers: Iterable[int]) -> float:
    """Fraction of heads/channels to remove in ``layers`` so that ``param_ratio`` of all parameters go.

    The paper removes 25% of the groups of layers 4-30 of LLaMA-7B to remove 20% of its parameters,
    and 50% of them for 40%.
    """
    if not 0 <= param_ratio < 1:
        raise ValueError(f"param_ratio must be in [0, 1), got {param_ratio}")
    total = sum(p.numel() for p in model.parameters())
    shapes = layer_shapes(model)
    prunable = 0
    for i in layers:
        head, channel = _unit_params(model, i)
        prunable += head * shapes[i].num_attention_heads + channel * shapes[i].intermediate_size
    ratio = param_ratio * total / max(prunable, 1)
    if ratio >= 1:
        raise ValueError(
            f"removing {param_ratio:.0%} of the parameters needs {ratio:.0%} of the heads and channels of the "
            "selected layers; prune more layers (smaller keep_first/keep_last) or a smaller ratio"
        )
    return ratio


class LLMBlockPruner:
    """LLM-Pruner-style block pruner for decoder-only LMs, driven by a Torch-Pruning importance.

    In each selected layer, ``pruning_ratio`` of the attention heads and of the MLP channels are
    removed, ranked within the layer by ``importance`` (one score per channel, summed over the
    channels of a head). With grouped-query attention, the query heads are removed in equal numbers
    from each key/value group and the key/value heads are kept; the number removed per group is
    ``round(pruning_ratio * heads per group)``, so the achieved fraction can differ from the ratio
    (4 heads per group: 0.1 removes none, 0.3 removes 25 %): :meth:`step` reports what each layer
    lost and warns when the ratio rounds to no head at all. The hidden size, the embeddings, the LM
    head and the layers outside ``layers`` are untouched.

    Supported families (:data:`FAMILIES`; anything else is refused here, with what it lacks):
    LLaMA-style decoders with separate ``q/k/v/o_proj`` and a gated MLP (LLaMA, Qwen2, Qwen3,
    Mistral, Gemma), Phi-3 (fused ``qkv_proj`` and ``gate_up_proj``), GPT-2 (fused ``c_attn``,
    ``Conv1D`` weights, plain MLP) and OPT (``q/k/v/out_proj``, ``fc1``/``fc2``).

    Gradient-based importances (``ConnectImportance``, ``GroupTaylorImportance``) need dL/dW: either
    pass ``calibration`` to :meth:`step`, or fill ``.grad`` first (:func:`accumulate_loss_gradients`);
    ``ConnectImportance`` adds its connectivity gradient itself.

    Example:
        >>> pruner = LLMBlockPruner(model, ConnectImportance(lam=1e5), pruning_ratio=0.25)
        >>> report = pruner.step(calibration=batches)

    Args:
        model: a causal LM of one of the supported families.
        importance: a Torch-Pruning importance, called on Torch-Pruning ``Group`` objects.
        pruning_ratio: fraction of the heads and MLP channels to remove in every selected layer.
        layers: indices of the layers to prune (default: :func:`llm_pruner_layers` for the model's
            depth: all but the first 3 and the last one from 8 layers on, about half of a
            shallower model).
        head_pruning: prune attention heads (otherwise only MLP channels).
        round_to: keep a multiple of this many MLP channels (e.g. 8 for tensor cores).
        example_inputs: token ids of the model's input shape, given to importances that measure the
            model (``ConnectImportance``) when they were built without one.

    Raises:
        TypeError: the model is of no supported family (the message lists them and says what is missing).
    """

    def __init__(self, model: nn.Module, importance: Any, pruning_ratio: float = 0.25,
                 layers: Optional[Iterable[int]] = None, head_pruning: bool = True,
                 round_to: Optional[int] = None, example_inputs: Optional[torch.Tensor] = None):
        if not 0 <= pruning_ratio < 1:
            raise ValueError(f"pruning_ratio must be in [0, 1), got {pruning_ratio}")
        if round_to is not None and round_to < 1:
            raise ValueError(f"round_to must be >= 1, got {round_to}")
        self.family = model_family(model)
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
        #: What the last :meth:`step` removed, per layer (the dict it returned).
        self.last_report: Dict[int, Dict[str, Any]] = {}
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

    def _heads_per_group(self, g: _LayerGroups) -> tuple:
        """Query heads per key/value group, and how many of them go (the same in every group)."""
        per_group = g.num_heads // g.num_kv_heads if g.gqa else g.num_heads
        if not self.head_pruning or self.pruning_ratio == 0:
            return per_group, 0
        return per_group, min(round(self.pruning_ratio * per_group), per_group - 1)

    def _head_indices(self, g: _LayerGroups) -> List[int]:
        """Query heads to remove: lowest summed score, equally many per key/value group."""
        per_group, n_remove = self._heads_per_group(g)
        if n_remove == 0:
            return []
        head_scores = self._scores(g.heads).view(g.num_heads, g.head_dim).sum(1)
        removed = []
        for kv in range(g.num_heads // per_group):
            block = head_scores[kv * per_group:(kv + 1) * per_group]
            removed += (torch.argsort(block)[:n_remove] + kv * per_group).tolist()
        return sorted(removed)

    def _check_gradients(self, groups: List[_LayerGroups]) -> None:
        """Taylor-type importances read ``.grad``; without it they fail deep inside Torch-Pruning."""
        imp = self.importance
        if not isinstance(imp, tp.importance.GroupTaylorImportance) or hasattr(imp, "objective_gradient"):
            return  # not Taylor, or ConnectImportance (it scores with connectivity alone and says so)
        for g in groups:
            for group in (g.heads, g.mlp):
                for item in group:
                    module = item.dep.target.module
                    if module.weight.grad is None:
                        name = item.dep.target.name or type(module).__name__
                        raise ValueError(
                            f"{type(imp).__name__} needs loss gradients, but {name}.weight has no .grad: pass the "
                            f"calibration token ids to step(calibration=batches), or call "
                            f"llm.accumulate_loss_gradients(model, batches) before step()")

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

        The report maps each pruned layer's index to ``heads_removed`` (query-head indices),
        ``num_heads`` (before), ``head_ratio`` (the fraction actually removed, after rounding to
        whole heads per key/value group), ``channels_removed`` (a count), ``channel_indices``,
        ``intermediate_size`` (before) and ``channel_ratio``. A ratio that rounds to no head in a
        layer raises a ``UserWarning`` naming the layers.

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
        with _linear_projections(self.model, self.layers):  # GPT-2's Conv1D, scored and cut as nn.Linear
            names = {m: n for n, m in self.model.named_modules()}
            groups = [_layer_groups(self.model, i, names) for i in self.layers]
            if calibration is None:
                self._check_gradients(groups)
                plans = [(g, self._head_indices(g), self._channel_indices(g)) for g in groups]
            else:
                plans = self._streamed_plans(groups, calibration, layers_per_pass, batch_size)
            report = {}
            no_heads = []
            for g, heads, channels in plans:
                per_group, n_remove = self._heads_per_group(g)
                if self.head_pruning and self.pruning_ratio > 0 and n_remove == 0:
                    no_heads.append((g.index, per_group))
                if heads:
                    idxs = [h * g.head_dim + j for h in heads for j in range(g.head_dim)]
                    _prune_group(g.heads, idxs)
                n_channels = len(g.mlp[0].root_idxs)
                if channels:
                    _prune_group(g.mlp, channels)
                report[g.index] = {"heads_removed": heads, "num_heads": g.num_heads,
                                   "head_ratio": len(heads) / g.num_heads,
                                   "channels_removed": len(channels), "channel_indices": channels,
                                   "intermediate_size": n_channels,
                                   "channel_ratio": len(channels) / n_channels}
        _sync_layer_attributes(self.model)
        if no_heads:
            layers = [i for i, _ in no_heads]
            per_group = min(p for _, p in no_heads)
            hint = (f"A ratio above {0.5 / per_group:.3g} removes one head per group" if per_group > 1 else
                    "A group of one head keeps it (the last head of a group is never removed)")
            warnings.warn(
                f"pruning_ratio={self.pruning_ratio:g} removes no attention head in layers {layers}: heads are "
                f"removed in whole numbers, equally from every key/value group, and round({self.pruning_ratio:g} x "
                f"{per_group} heads per group) is 0 (only MLP channels were pruned there). {hint}; "
                f"head_pruning=False says that only channels should go", UserWarning, stacklevel=2)
        self.last_report = report
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

    Counts every ``nn.Linear`` and GPT-2 ``Conv1D`` (projections, MLP, LM head) by running the model with forward hooks,
    plus the two attention matmuls (``QK^T`` and ``AV``: ``2 * heads * head_dim * seq_len**2`` per
    layer, the full square as most counters report it). Norms, rotary embedding and softmax are
    elementwise and left out.
    """
    macs = [0]

    def hook(module, inputs, output):
        n_in, n_out = _in_features(module), _out_features(module)
        macs[0] += inputs[0].numel() // n_in * n_in * n_out

    handles = [m.register_forward_hook(hook) for m in model.modules() if _is_projection(m)]
    try:
        with torch.no_grad():
            model(input_ids=torch.zeros(1, seq_len, dtype=torch.long, device=_model_device(model)))
    finally:
        for h in handles:
            h.remove()
    family = model_family(model)
    for shape, head_dim in (_shape(model, family, layer) for layer in decoder_layers(model)):
        macs[0] += 2 * shape.num_attention_heads * head_dim * seq_len * seq_len
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
key/value heads and MLP channels under "{key}", and the sizes of its projections and the
attributes that follow them under "{modules_key}"; this class builds those shapes before the
weights are loaded. Load with connect_tp.llm.load_pruned(path, trust_remote_code=True) or
AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True); either runs this file, so do
that only for a folder you wrote or trust.
"""
import torch.nn as nn
from transformers import {base} as _Base
from transformers.pytorch_utils import Conv1D


class _LayerConfig:
    """The model config as one layer sees it: its own head count, everything else read through."""

    def __init__(self, base, **overrides):
        self.__dict__["_base"] = base
        self.__dict__["_overrides"] = dict(overrides)

    def __getattr__(self, name):
        if name.startswith("__") or name in ("_base", "_overrides"):
            raise AttributeError(name)
        overrides = self.__dict__.get("_overrides", {{}})
        if name in overrides:
            return overrides[name]
        return getattr(self.__dict__["_base"], name)

    def __setattr__(self, name, value):
        if name in self._overrides:
            self._overrides[name] = value
        else:
            setattr(self._base, name, value)


def _owner(root, path):
    parent, _, name = path.rpartition(".")
    return (root.get_submodule(parent) if parent else root), name


def _resize(model, config):
    plan = getattr(config, "{modules_key}", None)
    if not plan:
        return
    for layer, spec in zip(model.get_submodule(plan["layers"]), plan["specs"]):
        for path, m in spec["modules"].items():
            owner, name = _owner(layer, path)
            ref = getattr(owner, name).weight
            if m["type"] == "Conv1D":
                new = Conv1D(m["out"], m["in"]).to(device=ref.device, dtype=ref.dtype)
            else:
                new = nn.Linear(m["in"], m["out"], bias=m["bias"], device=ref.device, dtype=ref.dtype)
            setattr(owner, name, new)
        for path, value in spec["attributes"].items():
            owner, name = _owner(layer, path)
            setattr(owner, name, value)
        if spec["config"]:
            attn = layer.get_submodule(plan["attention"])
            attn.config = _LayerConfig(config, **spec["config"])


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
    base = _base_class(model).__name__  # also when re-saving a reloaded pruned model
    if non_uniform:
        config.auto_map = {"AutoModelForCausalLM": f"{_MODELING_FILE[:-3]}.ConnectPrunedForCausalLM"}
    elif hasattr(config, "auto_map"):
        delattr(config, "auto_map")
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    if non_uniform:
        with open(os.path.join(path, _MODELING_FILE), "w") as f:
            f.write(_MODELING_TEMPLATE.format(base=base, key=LAYER_SHAPES_KEY, modules_key=LAYER_MODULES_KEY))
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

    Trains rank-``rank`` adapters on every projection of the decoder family (seven for LLaMA) with the
    next-token loss on ``batches`` (``(n, seq_len)`` token ids), then merges them, so the returned
    model has the pruned architecture and no adapter. Needs ``peft``.
    """
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as err:  # optional extra
        raise ImportError("LoRA recovery needs peft: pip install 'connect_tp[llm]'") from err
    targets = sorted({path.rsplit(".", 1)[-1] for path in model_family(model).projections()})
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
