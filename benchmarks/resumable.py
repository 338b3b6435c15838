"""The ``results.json`` of a resumable benchmark script: refuse to overwrite, refuse to mix runs."""
from __future__ import annotations

import os
from typing import Any, Dict, Tuple

from connect_tp.pipeline.files import read_json


def open_results(out: str, resume: bool, **identity: Any) -> Tuple[str, Dict[str, Any]]:
    """The path of ``out/results.json`` and what it holds (``{}`` for a new run; ``out`` is created).

    An existing file is continued only with ``resume``, and only when it was written with the same
    ``identity`` values (the options every stored run depends on, e.g. the base model).

    Raises:
        SystemExit: the file exists without ``resume``, or holds runs of other ``identity`` values.
    """
    path = os.path.join(out, "results.json")
    if not os.path.exists(path):
        os.makedirs(out, exist_ok=True)
        return path, {}
    if not resume:
        raise SystemExit(f"error: {path} exists; add --resume to continue it, or give another --out")
    stored = read_json(path)
    other = {key: stored.get(key) for key, value in identity.items() if stored.get(key) != value}
    if other:
        raise SystemExit(f"error: {path} holds runs of " + ", ".join(f"{k} {v!r}" for k, v in other.items())
                         + "; resume with those, or give another --out")
    return path, stored
