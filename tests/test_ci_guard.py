"""Under ``CI=true`` a missing or broken ``transformers`` stops the test session instead of skipping tests."""
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = "tests/test_ci_guard.py::test_probe"


def test_probe():
    """What the sessions below run: a test that needs nothing."""


def _pytest(tmp_path, ci, transformers_init=None):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("CI", None)
    if ci:
        env["CI"] = ci
    if transformers_init is not None:  # a package named transformers that shadows the installed one
        (tmp_path / "transformers").mkdir()
        (tmp_path / "transformers" / "__init__.py").write_text(transformers_init)
        env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), REPO])
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", PROBE], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("init, message", [
    ("raise ImportError('libfoo.so: cannot open shared object file')", "transformers (ImportError: libfoo.so"),
    ("", "transformers (AttributeError: "),  # imports, but the models the tests use are not there
])
def test_broken_transformers_fails_the_session_under_ci(tmp_path, init, message):
    done = _pytest(tmp_path, "true", init)
    assert done.returncode != 0, done.stdout
    text = done.stdout + done.stderr
    assert "CI=true" in text and message in text and "1 passed" not in text


def test_outside_ci_the_same_install_only_skips(tmp_path):
    done = _pytest(tmp_path, None, "raise ImportError('broken')")
    assert done.returncode == 0 and "1 passed" in done.stdout, done.stdout + done.stderr


def test_the_guard_reads_the_ci_variable():
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    try:
        import conftest
    finally:
        sys.path.pop(0)
    assert conftest.broken_under_ci({}) == [] and conftest.broken_under_ci({"CI": "false"}) == []
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    assert conftest.broken_under_ci({"CI": "true"}) == [], "the installed transformers and peft must pass the guard"
