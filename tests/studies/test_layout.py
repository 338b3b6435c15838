"""The one-off studies run from their new home, and the paths the docs give for them exist.

Each study is a module of ``benchmarks.studies`` with a ``main(argv)`` whose ``--help`` answers (so
``python -m benchmarks.studies.<name> --help`` works); the study names are no longer importable from
``benchmarks`` itself, so an old command fails loudly instead of running a stale copy; and every
``python -m benchmarks...`` command quoted in README.md or docs/ names a module that exists.
"""
import importlib
import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STUDIES = ("blend_knobs", "finetune_noise", "finetune_orders", "lambda_sweep", "normalizer_allocation",
           "ranking_refinetune")


def test_the_studies_folder_holds_exactly_the_studies():
    here = sorted(f[:-3] for f in os.listdir(os.path.join(REPO, "benchmarks", "studies"))
                  if f.endswith(".py") and f != "__init__.py")
    assert here == sorted(STUDIES)
    top = os.listdir(os.path.join(REPO, "benchmarks"))
    assert not [s for s in STUDIES if f"{s}.py" in top], "a study is back at the top of benchmarks/"


@pytest.mark.parametrize("name", STUDIES)
def test_study_answers_help(name, capsys):
    module = importlib.import_module(f"benchmarks.studies.{name}")
    with pytest.raises(SystemExit) as done:
        module.main(["--help"])
    assert done.value.code == 0
    assert "usage:" in capsys.readouterr().out


def _documented_modules():
    pages = [os.path.join(REPO, "README.md")] + [
        os.path.join(REPO, "docs", f) for f in sorted(os.listdir(os.path.join(REPO, "docs"))) if f.endswith(".md")]
    found = set()
    for page in pages:
        with open(page, encoding="utf-8") as f:
            found |= set(re.findall(r"python -m (benchmarks(?:\.[a-z_0-9]+)+)(?![.\w])", f.read()))  # not `X.<name>`
    return sorted(found)


def test_every_documented_benchmark_command_names_a_module():
    modules = _documented_modules()
    assert "benchmarks.ranking" in modules and "benchmarks.studies.finetune_noise" in modules
    missing = [m for m in modules if not os.path.isfile(os.path.join(REPO, *m.split(".")) + ".py")]
    assert not missing, f"README.md or docs/ quote `python -m` commands for modules that do not exist: {missing}"
