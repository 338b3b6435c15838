"""The library never imports the command line: no module of ``connect_tp`` outside ``pipeline/`` and ``cli.py``
imports either of them, at module level or inside a function.

The pipeline (``connect_tp.pipeline``) and the command (``connect_tp.cli``) sit on top of the library;
an import the other way would make ``import connect_tp.pruning`` depend on the benchmark's run
folders and presets. The check reads the source with :mod:`ast`, so it also sees imports that only
run when a function is called.
"""
import ast
import os

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "connect_tp")
UPPER = ("connect_tp.pipeline", "connect_tp.cli")


def _module_name(path):
    rel = os.path.relpath(path, os.path.dirname(PACKAGE))[:-len(".py")].split(os.sep)
    return ".".join(rel[:-1] if rel[-1] == "__init__" else rel)


def _imported(tree, module, is_package):
    """Absolute names of every module ``tree`` imports (``from X import y`` gives ``X`` and ``X.y``)."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module
            yield name, node.lineno
            for alias in node.names:
                yield f"{name}.{alias.name}", node.lineno


def _library_modules():
    for folder, _, files in os.walk(PACKAGE):
        for file in files:
            if file.endswith(".py"):
                path = os.path.join(folder, file)
                name = _module_name(path)
                if not any(name == upper or name.startswith(upper + ".") for upper in UPPER):
                    yield name, path


def _upward_imports(name, path):
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    return [f"{os.path.relpath(path, os.path.dirname(PACKAGE))}:{line} imports {imported}"
            for imported, line in _imported(tree, name, path.endswith("__init__.py"))
            if any(imported == upper or imported.startswith(upper + ".") for upper in UPPER)]


def test_the_library_never_imports_the_pipeline_or_the_cli():
    modules = dict(_library_modules())
    assert {"connect_tp.pruning", "connect_tp.training", "connect_tp.methods", "connect_tp.files"} <= set(modules)
    found = [hit for name, path in sorted(modules.items()) for hit in _upward_imports(name, path)]
    assert not found, "library modules import the command line:\n" + "\n".join(found)


@pytest.mark.parametrize("source, module, expected", [
    ("from .pipeline.methods import parse_method", "connect_tp.pruning", "connect_tp.pipeline.methods"),
    ("from . import pipeline", "connect_tp.training", "connect_tp.pipeline"),
    ("from ..cli import main", "connect_tp.engine.core", "connect_tp.cli"),
    ("def f():\n    import connect_tp.pipeline.files", "connect_tp.sparsity", "connect_tp.pipeline.files"),
])
def test_the_check_sees_every_form_of_import(tmp_path, source, module, expected):
    # The check must catch relative, absolute and function-level imports, or the test above proves nothing.
    path = tmp_path / "m.py"
    path.write_text(source + "\n")
    hits = [n for n, _ in _imported(ast.parse(source), module, False)]
    assert expected in hits
    assert _upward_imports(module, str(path))


def test_the_moved_names_are_still_importable_from_the_pipeline():
    from connect_tp import files, methods
    from connect_tp.pipeline import files as pipeline_files
    from connect_tp.pipeline import methods as pipeline_methods

    for name in files.__all__:
        assert getattr(pipeline_files, name) is getattr(files, name)
    for name in methods.__all__:
        assert getattr(pipeline_methods, name) is getattr(methods, name)
