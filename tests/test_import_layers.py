"""The package has no import cycle between its parts.

A *part* is a top-level module (``connect_tp/importance.py``) or subpackage (``connect_tp/engine/``)
of ``connect_tp``. Every ``import`` statement of every file counts, including those inside functions
(an import deferred to run time still ties the two parts together). The test reads the source with
:mod:`ast`, so it sees imports that a plain ``import connect_tp`` would not run.
"""
import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "connect_tp"


def _module_name(root, path):
    rel = os.path.relpath(path, root)[:-3].split(os.sep)
    return ".".join(rel[:-1] if rel[-1] == "__init__" else rel)


def _is_module(root, dotted):
    base = os.path.join(root, *dotted.split("."))
    return os.path.isfile(base + ".py") or os.path.isfile(os.path.join(base, "__init__.py"))


def imported_modules(root, path):
    """``[(line, dotted name)]`` of every module of the tree at ``root`` that the file imports."""
    module = _module_name(root, path)
    is_package = path.endswith("__init__.py")
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=path)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: strip one package level per dot beyond the first
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            found.append((node.lineno, source))
            # ``from pkg import name`` imports the module pkg.name when there is one
            found += [(node.lineno, f"{source}.{alias.name}") for alias in node.names
                      if _is_module(root, f"{source}.{alias.name}")]
    return found


def part_graph(root, package=PACKAGE):
    """``{(part, part): [where]}``: which part of ``package`` imports which other part, and where."""
    edges = {}
    for folder, _, files in os.walk(os.path.join(root, package)):
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            here = _module_name(root, path).split(".")
            for line, target in imported_modules(root, path):
                there = target.split(".")
                if len(here) < 2 or len(there) < 2 or there[0] != package or here[1] == there[1]:
                    continue
                if not _is_module(root, f"{package}.{there[1]}"):
                    continue  # a name of the package's __init__ (``from .. import __version__``)
                where = f"{os.path.relpath(path, root)}:{line}"
                edges.setdefault((here[1], there[1]), []).append(where)
    return edges


def cycles(edges):
    """The strongly connected groups of more than one part (Tarjan's algorithm), each sorted."""
    graph = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
        graph.setdefault(b, set())
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return groups


def _write(root, files):
    for rel, text in files.items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)


def test_finds_a_cycle_through_a_deferred_import(tmp_path):
    # the shape the engine and the regularizer once had: a top-level import one way, a deferred
    # (in-function) import back
    _write(tmp_path, {
        "connect_tp/__init__.py": "",
        "connect_tp/engine/__init__.py": "from .views import f\n",
        "connect_tp/engine/views.py": "def f():\n    from ..regularizer.flow import g\n    return g\n",
        "connect_tp/regularizer/__init__.py": "",
        "connect_tp/regularizer/flow.py": "from ..engine import f\ndef g():\n    return f\n",
        "connect_tp/edges.py": "import torch\n",
    })
    edges = part_graph(str(tmp_path))
    assert edges[("engine", "regularizer")] == ["connect_tp/engine/views.py:2"]
    assert edges[("regularizer", "engine")] == ["connect_tp/regularizer/flow.py:1"]
    assert cycles(edges) == [["engine", "regularizer"]]


def test_resolves_relative_and_absolute_imports_and_ignores_package_names(tmp_path):
    _write(tmp_path, {
        "connect_tp/__init__.py": "__version__ = '0'\n",
        "connect_tp/edges.py": "",
        "connect_tp/engine/__init__.py": "from .. import edges\n",
        "connect_tp/pipeline/__init__.py": "from .. import __version__\nimport connect_tp.engine\n",
        "connect_tp/pruning.py": "from connect_tp.pipeline import x\n",
    })
    edges = part_graph(str(tmp_path))
    assert set(edges) == {("engine", "edges"), ("pipeline", "engine"), ("pruning", "pipeline")}
    assert cycles(edges) == []


def test_connect_tp_has_no_import_cycle():
    edges = part_graph(REPO)
    assert edges, "found no imports at all: the package moved or the parser broke"
    found = cycles(edges)
    detail = [f"{' <-> '.join(group)}: " + "; ".join(
        f"{a} -> {b} at {', '.join(edges[a, b][:3])}" for a in group for b in group if (a, b) in edges)
        for group in found]
    assert not found, ("import cycle between parts of connect_tp (move the shared piece into a module "
                       "below both, as connect_tp/edges.py is for the engine and the regularizer):\n"
                       + "\n".join(detail))


def test_the_engine_and_the_regularizer_share_their_edge_maps_through_a_lower_module():
    edges = part_graph(REPO)
    assert ("engine", "regularizer") not in edges
    assert ("engine", "edges") in edges and ("regularizer", "edges") in edges
    # the old import paths still name the same objects
    from connect_tp import edges as lower, regularizer
    from connect_tp.regularizer import channel_scaler, flow
    assert regularizer.ChannelScaler is channel_scaler.ChannelScaler is lower.ChannelScaler
    assert flow.normalized_abs is regularizer.normalized_abs is lower.normalized_abs
    assert channel_scaler.channel_scalers is lower.channel_scalers


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(pytest.main([__file__, "-q"]))
