"""The run folder: where each stage's files live, what a valid result looks like, and safe updates.

Layout of a run folder (``--out``, default ``runs/<preset>/seed<seed>``)::

    base.pt, base.json            the base model (per-epoch checkpoint) and its result
    pruned/<method>_<x>x.pt       pruned models, one per method and speed-up target
    results/<method>_<x>x.json    one result per pruned model; fine-tuning adds its numbers to it
    finetuned/<method>_<x>x.pt    fine-tuning checkpoints
    table/                        table.md, table.json, plot.png (``connect-tp run``)
    .connect-tp.lock              present while a command writes here

:class:`RunFolder` knows these paths, records every file a command finished writing (for the
last line of a stage and the message after Ctrl-C), and updates result files by merging with what
is on disk at write time, never by writing back a copy read minutes earlier.
:func:`validate_result` and :func:`validate_base` turn a result of the wrong shape into a
:class:`~connect_tp.files.ResultError` that names the file.
"""
from __future__ import annotations

import math
import numbers
import os
from typing import Any, Callable, Dict, List, Optional, Tuple

from ..files import ResultError, atomic_write_json, read_json, sha256_file
from .provenance import ProvenanceError, short_hash

__all__ = ["RunFolder", "tag", "validate_result", "validate_base", "FINETUNE_KEYS", "SHORT_FINETUNE_KEYS"]

FINETUNE_KEYS = ("finetuned_acc", "finetune_epochs", "finetune_seconds", "finetune_history", "finetune_world_size")
"""Keys of a result that the fine-tuning stage writes."""

SHORT_FINETUNE_KEYS = ("short_finetuned_acc", "short_finetune_steps")
"""Keys of a result that the short fixed-budget fine-tuning writes."""

_SECTIONS = (("finetune", FINETUNE_KEYS), ("short_finetune", SHORT_FINETUNE_KEYS))


def tag(method: str, speed_up: float) -> str:
    """File stem of a (method, target) pair, e.g. ``l2_2.5x``."""
    return f"{method}_{speed_up:g}x"


def _number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


_RESULT_SCHEMA: Dict[str, Callable[[Any], bool]] = {
    "preset": lambda v: isinstance(v, str), "seed": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "dataset": lambda v: isinstance(v, str), "model": lambda v: isinstance(v, str),
    "method": lambda v: isinstance(v, str), "target_speed_up": _number, "speed_up": _number,
    "macs": _number, "params": _number, "base_macs": _number, "base_params": _number,
    "pruned_acc": _number, "collapsed_layers": lambda v: isinstance(v, list),
}
_RESULT_OPTIONAL: Dict[str, Callable[[Any], bool]] = {
    "finetuned_acc": lambda v: v is None or _number(v), "pruned_acc_bn_recalibrated": lambda v: v is None or _number(v),
    "short_finetuned_acc": lambda v: v is None or _number(v), "iterative_steps": lambda v: isinstance(v, int),
    "provenance": lambda v: isinstance(v, dict), "channels": lambda v: isinstance(v, dict),
    "finetune_history": lambda v: isinstance(v, list),
}
_BASE_SCHEMA: Dict[str, Callable[[Any], bool]] = {
    "preset": lambda v: isinstance(v, str), "seed": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "dataset": lambda v: isinstance(v, str), "model": lambda v: isinstance(v, str),
    "epochs": lambda v: isinstance(v, int), "acc": _number, "macs": _number, "params": _number,
}


def _validate(obj: Any, path: str, required: Dict[str, Callable[[Any], bool]],
              optional: Dict[str, Callable[[Any], bool]], writer: str) -> Dict[str, Any]:
    fix = f"it was not written by `connect-tp {writer}`; delete it and rerun {writer}"
    if not isinstance(obj, dict):
        raise ResultError(f"result file {path} is malformed: a JSON {type(obj).__name__} instead of an object; {fix}")
    for key, ok in required.items():
        if key not in obj:
            raise ResultError(f"result file {path} is malformed: key {key!r} is missing; {fix}")
        if not ok(obj[key]):
            raise ResultError(f"result file {path} is malformed: {key!r} is {obj[key]!r}; {fix}")
    for key, ok in optional.items():
        if key in obj and not ok(obj[key]):
            raise ResultError(f"result file {path} is malformed: {key!r} is {obj[key]!r}; {fix}")
    return obj


def validate_result(obj: Any, path: str, method: Optional[str] = None,
                    target: Optional[float] = None) -> Dict[str, Any]:
    """``obj`` if it has the shape of a pruning result (and the method/target of its file name)."""
    _validate(obj, path, _RESULT_SCHEMA, _RESULT_OPTIONAL, "prune")
    if method is not None and (obj["method"] != method or not math.isclose(obj["target_speed_up"], target)):
        raise ResultError(f"result file {path} is malformed: it holds {obj['method']} at {obj['target_speed_up']}x, "
                          f"not {method} at {target:g}x as its name says; delete it and rerun prune")
    return obj


def validate_base(obj: Any, path: str) -> Dict[str, Any]:
    """``obj`` if it has the shape of ``base.json``."""
    return _validate(obj, path, _BASE_SCHEMA, {"provenance": lambda v: isinstance(v, dict)}, "train")


class RunFolder:
    """Paths of a run folder and the files one command wrote into it."""

    def __init__(self, out: str):
        self.out = out
        self.written: List[str] = []
        self.partial: Dict[str, Tuple[int, int]] = {}  # checkpoint -> (epochs done, epochs planned)

    # -- paths
    @property
    def base_ckpt(self) -> str:
        return os.path.join(self.out, "base.pt")

    @property
    def base_json(self) -> str:
        return os.path.join(self.out, "base.json")

    def pruned(self, method: str, speed_up: float) -> str:
        return os.path.join(self.out, "pruned", tag(method, speed_up) + ".pt")

    def result(self, method: str, speed_up: float) -> str:
        return os.path.join(self.out, "results", tag(method, speed_up) + ".json")

    def finetuned(self, method: str, speed_up: float) -> str:
        return os.path.join(self.out, "finetuned", tag(method, speed_up) + ".pt")

    def rel(self, path: str) -> str:
        """``path`` relative to the run folder (how fingerprints name parents)."""
        return os.path.relpath(path, self.out)

    # -- bookkeeping
    def record(self, path: str) -> None:
        """Note that ``path`` is complete on disk."""
        self.written.append(path)
        self.partial.pop(path, None)

    def record_partial(self, path: str, done: int, planned: int) -> None:
        """Note a resumable checkpoint after ``done`` of ``planned`` epochs."""
        self.partial[path] = (done, planned)

    def mark(self) -> int:
        """A position in :attr:`written`, to list the files written since."""
        return len(self.written)

    def summary(self, since: int = 0) -> str:
        """``"wrote 2 files in OUT: base.pt, base.json"``, or that nothing was written."""
        files = list(dict.fromkeys(self.written[since:]))  # each once, in the order first written
        if not files:
            return f"wrote no files (everything in {self.out} was up to date)"
        names = [os.path.relpath(f, self.out) if not os.path.relpath(f, self.out).startswith("..") else f
                 for f in files]
        return f"wrote {len(files)} file(s) in {self.out}: {', '.join(names)}"

    def saved_report(self) -> List[str]:
        """Lines saying what is on disk after an interruption."""
        lines = []
        if self.written:
            lines.append(self.summary())
        for path, (done, planned) in self.partial.items():
            if done:
                lines.append(f"{path}: {done} of {planned} epochs saved (resumable)")
        return lines

    def write_json(self, obj: Any, path: str) -> None:
        atomic_write_json(obj, path)
        self.record(path)

    # -- reading
    def read_base(self) -> Dict[str, Any]:
        return validate_base(read_json(self.base_json), self.base_json)

    def read_result(self, method: str, speed_up: float) -> Dict[str, Any]:
        path = self.result(method, speed_up)
        return validate_result(read_json(path), path, method, speed_up)

    # -- merged writes
    def write_prune_result(self, method: str, speed_up: float, result: Dict[str, Any], pruned_sha: str,
                           note: Callable[[str], None]) -> None:
        """Write a new pruning result, keeping the fine-tuning parts on disk only if made from this pruned model."""
        path = self.result(method, speed_up)
        new = dict(result)
        if os.path.isfile(path):
            try:
                old = read_json(path)
            except Exception:  # a damaged old result is replaced whole
                old = None
            if isinstance(old, dict):
                sections = old.get("provenance") if isinstance(old.get("provenance"), dict) else {}
                for name, keys in _SECTIONS:
                    section = sections.get(name)
                    parent = section.get("parent") if isinstance(section, dict) else None
                    if isinstance(parent, dict) and parent.get("sha256") == pruned_sha:
                        new.update({k: old[k] for k in keys if k in old})
                        new.setdefault("provenance", {})[name] = section
                    elif any(old.get(k) is not None for k in keys):
                        note(f"note: {path}: dropped the old {name.replace('_', '-')} numbers, which belong to "
                             f"the pruned model this run replaced")
        self.write_json(new, path)

    def clear_result_section(self, method: str, speed_up: float, section: str) -> bool:
        """Remove the numbers of ``section`` (``finetune``/``short_finetune``) from the result on disk.

        Called when that part is redone from the start, so that an interrupted redo does not leave
        the old numbers next to the new checkpoint. Returns whether there was anything to remove.
        """
        keys = dict(_SECTIONS)[section]
        current = self.read_result(method, speed_up)
        provenance = current.get("provenance") or {}
        if section not in provenance and all(current.get(k) is None for k in keys):
            return False
        for key in keys:
            current.pop(key, None)
        if "finetuned_acc" in keys:
            current["finetuned_acc"] = None  # the field every result has
        provenance.pop(section, None)
        self.write_json(current, self.result(method, speed_up))
        return True

    def write_finetune_result(self, method: str, speed_up: float, section: str, updates: Dict[str, Any],
                              fingerprint: Dict[str, Any], pruned_sha: str) -> Dict[str, Any]:
        """Add fine-tuning numbers to the result on disk now (re-read at write time).

        Raises:
            ProvenanceError: the pruned model or its result changed while this stage ran.
        """
        path = self.result(method, speed_up)
        current = self.read_result(method, speed_up)
        prune = (current.get("provenance") or {}).get("prune")
        recorded = ((prune or {}).get("output") or {}).get("sha256")
        pruned_path = self.pruned(method, speed_up)
        now = sha256_file(pruned_path) if os.path.isfile(pruned_path) else None
        if now != pruned_sha or (prune is not None and recorded != pruned_sha):
            raise ProvenanceError(f"{pruned_path} or {path} changed while {section.replace('_', '-')} ran "
                                  f"(pruned model sha256 {short_hash(pruned_sha)} at the start, "
                                  f"{short_hash(now)} now); rerun finetune")
        current.update(updates)
        current.setdefault("provenance", {})[section] = fingerprint
        self.write_json(current, path)
        return current
