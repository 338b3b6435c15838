"""README's examples run: every ```python block of README.md is executed, so the front page cannot rot.

Each block runs on its own in a fresh interpreter (``sys.executable``), one thread
(``OMP_NUM_THREADS=1``), in a temporary working directory so that nothing it writes lands in the
repository; the repository root is on ``PYTHONPATH``. A block that raises, exits non-zero or runs past
the timeout fails its test, and the test shows the block's line in README.md and its output. The
links of README.md that point into the repository (``docs/...``) must name files that exist.
"""
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, "README.md")
TIMEOUT_S = 300  # a block takes seconds; the margin is for a busy 2-core machine

_FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
_LINK = re.compile(r"\]\(([^)\s]+)\)")


def python_blocks(text):
    """``[(line, code)]`` for every ```python fenced block; ``line`` is 1-based, of the fence."""
    return [(text.count("\n", 0, m.start()) + 1, m.group(1)) for m in _FENCE.finditer(text)]


def _readme():
    with open(README, encoding="utf-8") as f:
        return f.read()


BLOCKS = python_blocks(_readme())


def test_readme_has_python_blocks():
    assert BLOCKS, "README.md has no ```python block: the usage example is missing"


def test_block_extraction():
    text = "x\n```python\nprint(1)\n```\n```bash\nls\n```\n```python\na = 2\nb = a\n```\n"
    assert python_blocks(text) == [(2, "print(1)\n"), (8, "a = 2\nb = a\n")]


@pytest.mark.parametrize("line,code", BLOCKS, ids=[f"README.md:{line}" for line, _ in BLOCKS])
def test_readme_python_block_runs(line, code, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MPLBACKEND="Agg",
               PYTHONPATH=os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p))
    script = tmp_path / f"readme_block_{line}.py"
    script.write_text(code, encoding="utf-8")
    try:
        done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the python block at README.md:{line} ran longer than {TIMEOUT_S} s")
    assert done.returncode == 0, (
        f"the python block at README.md:{line} failed (exit {done.returncode}):\n"
        f"--- code ---\n{code}--- stdout ---\n{done.stdout}--- stderr ---\n{done.stderr}")


def test_readme_links_into_the_repository_exist():
    missing = []
    for target in _LINK.findall(_readme()):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # a URL or an anchor on this page
        path = target.split("#", 1)[0]
        if not os.path.exists(os.path.join(REPO, path)):
            missing.append(target)
    assert not missing, f"README.md links to files that do not exist: {missing}"
