"""Fingerprints that say what produced each file of a run, and the checks that use them.

A fingerprint is ``{"stage", "config", "parent", "output"}``: the config the file depends on
(:mod:`connect_tp.pipeline.config`), the path and SHA-256 of the file it was made from (``base.pt``
for a pruned model, the pruned model for a fine-tuned one; none for the base) and, once written,
the SHA-256 of the output. Checkpoints carry it under ``"provenance"``; ``base.json`` carries the
base's; a result JSON carries one per part it holds (``prune``, ``short_finetune``,
``finetune``). Before a file is resumed or reused, its fingerprint must match what the command
asks for, and its parent hash the parent on disk now; otherwise :class:`ProvenanceError` names the
file, both values and the fixes (``--force``, or a new ``--out``).

Files written before fingerprints existed (*legacy* files) are accepted only after the fields they
do carry are checked against the command (preset, seed, method, target, epochs, ...), only if
their parent is legacy too (a legacy child of a fingerprinted parent was necessarily made from an
older parent) and not older than it, and always with a printed note that says so.
"""
from __future__ import annotations

import json
from typing import Any, Dict, List, Optional, Sequence, Tuple

__all__ = ["ProvenanceError", "fingerprint", "normalize", "config_differences", "describe_differences",
           "check_fingerprint", "check_legacy_fields", "short_hash"]


class ProvenanceError(RuntimeError):
    """A file was made by another config or from another parent than this command expects."""


def normalize(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists, ...), for comparisons."""
    return json.loads(json.dumps(value))


def short_hash(sha: Optional[str]) -> str:
    return "none" if not sha else sha[:12]


def fingerprint(stage: str, config: Dict[str, Any], parent: Optional[Tuple[str, str]] = None) -> Dict[str, Any]:
    """A fingerprint for a file of ``stage`` made with ``config`` from ``parent = (path, sha256)``."""
    from .. import __version__

    return {"stage": stage, "config": normalize(config),
            "parent": None if parent is None else {"path": parent[0], "sha256": parent[1]},
            "connect_tp": __version__}


def config_differences(recorded: Dict[str, Any], wanted: Dict[str, Any],
                       ignore: Sequence[str] = ()) -> List[Tuple[str, Any, Any]]:
    """``[(field, recorded value, wanted value)]`` for the fields that differ (missing counts as None)."""
    recorded, wanted = normalize(recorded), normalize(wanted)
    keys = [k for k in list(wanted) + [k for k in recorded if k not in wanted] if k not in ignore]
    return [(k, recorded.get(k), wanted.get(k)) for k in keys if recorded.get(k) != wanted.get(k)]


def describe_differences(diffs: List[Tuple[str, Any, Any]], limit: int = 4) -> str:
    """``"epochs=6 there, 3 here; lr=..."`` for the first ``limit`` differences."""
    parts = [f"{k}={json.dumps(a)} there, {json.dumps(b)} here" for k, a, b in diffs[:limit]]
    if len(diffs) > limit:
        parts.append(f"and {len(diffs) - limit} more")
    return "; ".join(parts)


def check_fingerprint(path: str, recorded: Any, wanted_config: Dict[str, Any], *, what: str,
                      parent_sha: Optional[str] = None, parent_name: str = "", fix: str) -> None:
    """Raise :class:`ProvenanceError` unless ``recorded`` was made by ``wanted_config`` from ``parent_sha``.

    Args:
        path: the file the fingerprint belongs to (named in the message).
        recorded: its fingerprint (a dict as written by :func:`fingerprint`).
        wanted_config: the config this command would make the file with.
        what: what the file holds, for the message ("the base model", "a pruned model", ...).
        parent_sha: SHA-256 of the parent file on disk now (None: not checked).
        parent_name: the parent's path, for the message.
        fix: what the user can do about it (ends the message).
    """
    if not isinstance(recorded, dict) or not isinstance(recorded.get("config"), dict):
        raise ProvenanceError(f"{path} has a malformed fingerprint; {fix}")
    diffs = config_differences(recorded["config"], wanted_config)
    if diffs:
        raise ProvenanceError(f"{path} holds {what} made with another config than this command asks for "
                              f"({describe_differences(diffs)}); {fix}")
    if parent_sha is not None:
        parent = recorded.get("parent") or {}
        if parent.get("sha256") != parent_sha:
            raise ProvenanceError(
                f"{path} holds {what} made from another {parent_name} (sha256 {short_hash(parent.get('sha256'))}) "
                f"than the one in the folder now (sha256 {short_hash(parent_sha)}): the {parent_name} was "
                f"replaced after it was made; {fix}")


def check_legacy_fields(path: str, recorded: Dict[str, Any], wanted: Dict[str, Any], *, what: str,
                        fix: str) -> str:
    """Check the fields a file without fingerprint carries; return the note to print.

    Raises:
        ProvenanceError: a field it carries differs from what the command asks for.
    """
    diffs = [(k, recorded.get(k), v) for k, v in normalize(wanted).items() if normalize(recorded.get(k)) != v]
    if diffs:
        raise ProvenanceError(f"{path} holds {what} written without a fingerprint (by an older connect-tp) and "
                              f"made with another config ({describe_differences(diffs)}); {fix}")
    return (f"note: {path} has no fingerprint (written by an older connect-tp); accepted because "
            f"{', '.join(f'{k}={json.dumps(v)}' for k, v in normalize(wanted).items())} match this command "
            f"(use --force to redo it)")
