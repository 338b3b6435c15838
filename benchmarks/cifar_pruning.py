"""The CIFAR / Fashion-MNIST pruning benchmark, run from the repository: ``python -m benchmarks.cifar_pruning``.

A thin script over the installed library: the pipeline lives in :mod:`connect_tp.pipeline` and the
command line in :mod:`connect_tp.cli`; this is the same command as ``connect-tp`` (see
``connect-tp --help``). The names below are re-exported for scripts that drive the benchmark from
Python (``benchmarks/ranking.py``).
"""
from __future__ import annotations

import sys

from connect_tp.cli import build_parser, main
from connect_tp.pipeline.config import PRESETS
from connect_tp.pipeline.files import atomic_write, atomic_write_json, read_json

__all__ = ["PRESETS", "build_parser", "main", "read_json", "atomic_write", "atomic_write_json"]

if __name__ == "__main__":
    sys.exit(main())
