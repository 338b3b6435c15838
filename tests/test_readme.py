"""README's examples run and its facts hold: the front page cannot rot.

Every ```python block of README.md runs on its own in a fresh interpreter (``sys.executable``), one
thread (``OMP_NUM_THREADS=1``), in a temporary working directory so that nothing it writes lands in
the repository; the repository root is on ``PYTHONPATH``. A block that raises, exits non-zero or runs
past the timeout fails its test, and the test shows the block's line in README.md and its output.
A python block followed directly by a ```text block must print that text: words exactly, numbers to
within one unit of the last digit shown (so a rounding flip on another CPU does not fail it).

The rest checks what a block cannot run: the two commands at the top name things that exist (the
pinned torch of ``.ci/run``, the ``connect-tp`` entry point, the ``offline`` preset, the ``test``
extra, Debian's Fashion-MNIST folder); the results table equals what ``python -m benchmarks.headline``
computes from the committed result files, and the robustness table what the committed robustness
summary gives; README stays a front page (at most 200 lines); every link
of README.md, CHANGELOG.md and docs/*.md into the repository names a file, and a heading there when
it has an anchor; and no page or code comment speaks in the project's internal bookkeeping (stop,
issue or item numbers) instead of saying what was done.
"""
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, "README.md")
TIMEOUT_S = 300  # a block takes seconds; the margin is for a busy 2-core machine

_FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$(?:\s*^```text[ \t]*\n(.*?)^```[ \t]*$)?",
                    re.MULTILINE | re.DOTALL)
_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")
_LINK = re.compile(r"\]\(([^)\s]+)\)")


def python_blocks(text):
    """``[(line, code)]`` for every ```python fenced block; ``line`` is 1-based, of the fence."""
    return [(text.count("\n", 0, m.start()) + 1, m.group(1)) for m in _FENCE.finditer(text)]


def printed_blocks(text):
    """``{line: expected stdout}`` for every ```python block followed directly by a ```text block."""
    return {text.count("\n", 0, m.start()) + 1: m.group(2) for m in _FENCE.finditer(text) if m.group(2) is not None}


def _unit(shown):
    """One unit of the last digit of a number as printed: ``"1.03e+03"`` -> 10, ``"4.26"`` -> 0.01."""
    mantissa, _, exponent = shown.lower().partition("e")
    decimals = len(mantissa.partition(".")[2])
    return 10.0 ** (int(exponent or 0) - decimals)


def output_differences(expected, got):
    """Lines where ``got`` differs from ``expected`` beyond the digits shown; ``[]`` when they agree."""
    want, have = expected.rstrip("\n").split("\n"), got.rstrip("\n").split("\n")
    if len(want) != len(have):
        return [f"{len(have)} lines printed, {len(want)} shown"]
    out = []
    for a, b in zip(want, have):
        if _NUMBER.split(a) != _NUMBER.split(b):
            out.append(f"shown {a!r}, printed {b!r}")
            continue
        for x, y in zip(_NUMBER.findall(a), _NUMBER.findall(b)):
            if abs(float(x) - float(y)) > _unit(x) * (1 + 1e-9):
                out.append(f"shown {a!r}, printed {b!r} ({x} against {y})")
                break
    return out


def _readme():
    with open(README, encoding="utf-8") as f:
        return f.read()


BLOCKS = python_blocks(_readme())


def test_readme_has_python_blocks():
    assert BLOCKS, "README.md has no ```python block: the usage example is missing"


def test_output_comparison():
    assert output_differences("lambda = 1.03e+03; 4.26x\n", "lambda = 1.04e+03; 4.27x\n") == []
    assert output_differences("lambda = 1.03e+03\n", "lambda = 1.05e+03\n")  # two units off
    assert output_differences("MACs 41.4M\n", "MACs 41.4G\n")              # words must match
    assert output_differences("a\n", "a\nb\n")                              # an extra line
    assert printed_blocks("```python\nprint(1)\n```\n\n```text\n1\n```\n```python\nx = 1\n```\n") == {1: "1\n"}


def test_block_extraction():
    text = "x\n```python\nprint(1)\n```\n```bash\nls\n```\n```python\na = 2\nb = a\n```\n"
    assert python_blocks(text) == [(2, "print(1)\n"), (8, "a = 2\nb = a\n")]


PRINTED = printed_blocks(_readme())


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
    if line in PRINTED:
        wrong = output_differences(PRINTED[line], done.stdout)
        assert not wrong, (f"the python block at README.md:{line} printed something else than the text block "
                           f"under it shows: {wrong}\n--- stdout ---\n{done.stdout}")


def _read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def github_anchor(heading):
    """The anchor GitHub gives a Markdown heading: lower case, punctuation dropped, spaces to dashes."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(text):
    """Every heading anchor of a Markdown page (outside code fences), with GitHub's -1, -2 suffixes."""
    found, seen = set(), {}
    in_fence = False
    for line in text.split("\n"):
        if line.startswith("```"):
            in_fence = not in_fence
        m = None if in_fence else re.match(r"^#{1,6} (.*)$", line)
        if m:
            slug = github_anchor(m.group(1))
            found.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
            seen[slug] = seen.get(slug, 0) + 1
    return found


def test_github_anchor():
    assert github_anchor("What does `ConnectImportance` cost?") == "what-does-connectimportance-cost"
    assert github_anchor("BatchNorm in phi_tot") == "batchnorm-in-phi_tot"
    assert github_anchor("Fingerprints, `--resume` and `--force`") == "fingerprints---resume-and---force"
    assert anchors("# A\n```\n# not a heading\n```\n## A\n") == {"a", "a-1"}


PAGES = ["README.md", "CHANGELOG.md"] + sorted(
    os.path.join("docs", name) for name in os.listdir(os.path.join(REPO, "docs")) if name.endswith(".md"))


@pytest.mark.parametrize("page", PAGES)
def test_links_into_the_repository_exist(page):
    text = _read(os.path.join(REPO, page))
    broken = []
    for target in _LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):
            continue  # a URL
        path, _, anchor = target.partition("#")
        full = os.path.normpath(os.path.join(REPO, os.path.dirname(page), path)) if path else os.path.join(REPO, page)
        if not os.path.exists(full):
            broken.append(f"{target} (no such file)")
        elif anchor and full.endswith(".md") and anchor not in anchors(_read(full)):
            broken.append(f"{target} (no heading with that anchor)")
    assert not broken, f"{page} has broken links: {broken}"


def test_readme_is_a_front_page():
    lines = _readme().count("\n")
    assert lines <= 200, f"README.md has {lines} lines; keep it a front page (<= 200) and move the rest to docs/"
    titles = [t for t in re.findall(r"^## (.*)$", _readme(), re.MULTILINE)]
    order = ["Two commands", "What CoNNect is", "Drop-in example", "Results", "What it costs", "Install", "Links"]
    assert titles == order, f"README.md's sections are {titles}; expected {order}"


def _bash_blocks(text):
    return re.findall(r"^```bash[ \t]*\n(.*?)^```[ \t]*$", text, re.MULTILINE | re.DOTALL)


def test_the_two_commands_name_what_exists():
    import configparser

    from connect_tp.data import DEBIAN_FASHION_MNIST_DIR
    from connect_tp.pipeline.config import PRESETS

    main_job, tests = [b.strip() for b in _bash_blocks(_readme())[:2]]
    ci = _read(os.path.join(REPO, ".ci", "run"))
    pinned = re.search(r"pip install --quiet (torch==\S+ torchvision==\S+)", ci).group(1)
    assert f"pip install {pinned} -e ." in main_job and f"pip install {pinned} -e \".[test]\"" in tests, (
        f"README's commands must install the torch that CI pins ({pinned})")
    assert tests.endswith("python -m pytest -q") and "python -m pytest -q\n" in ci + "\n"
    assert "apt-get install -y dataset-fashion-mnist" in main_job
    assert DEBIAN_FASHION_MNIST_DIR == "/usr/share/datasets/fashion-mnist"  # where that package puts it
    preset = re.search(r"connect-tp run --preset (\S+)$", main_job).group(1)
    assert preset in PRESETS, f"README runs --preset {preset}, which is not a preset"
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(REPO, "setup.cfg"), encoding="utf-8")
    assert "connect-tp = connect_tp.cli:main" in cfg["options.entry_points"]["console_scripts"]
    assert "test" in cfg["options.extras_require"]


def test_the_main_job_parses(capsys):
    from connect_tp import cli

    main_job = _bash_blocks(_readme())[0].strip()
    argv = main_job.rsplit("connect-tp ", 1)[1].split()
    assert argv[:3] == ["run", "--preset", "offline"], f"README's main job is `connect-tp {' '.join(argv)}`"
    assert cli.main(argv + ["--help"]) == 0  # the command line parses (--help exits before any work)
    assert "--preset" in capsys.readouterr().out


def test_results_table_is_computed_from_the_result_files():
    from benchmarks import headline

    text = _readme()
    m = re.search(r"<!-- headline table: .*? -->\n(.*?)<!-- /headline table -->", text, re.DOTALL)
    assert m, "README.md lost the markers around its results table"
    assert m.group(1) == headline.table(), (
        "README's results table differs from `python -m benchmarks.headline`: paste that output between the markers")


def test_robustness_table_is_computed_from_the_summary():
    import json

    from benchmarks import robustness

    folder = os.path.join(REPO, "benchmarks", "results", "robustness", "all-summary")
    with open(os.path.join(folder, "summary.json"), encoding="utf-8") as f:
        expected = robustness.front_page_table(json.load(f))
    with open(os.path.join(folder, "front_page.md"), encoding="utf-8") as f:
        assert f.read() == expected, "all-summary/front_page.md is older than its summary.json: summarize again"
    m = re.search(r"<!-- robustness table: .*? -->\n(.*?)<!-- /robustness table -->", _readme(), re.DOTALL)
    assert m, "README.md lost the markers around its robustness table"
    assert m.group(1) == expected, (
        "README's robustness table differs from all-summary/front_page.md: paste that file between the markers")
    assert robustness.FRONT_PAGE_ROWS[0][0] == robustness.library_default_name()


def test_headline_rows_start_with_the_library_default():
    from benchmarks import headline
    from connect_tp.importance import DEFAULT_BALANCE, DEFAULT_BN_FLOW

    assert headline.ROWS[0][0] == f"connect-k{DEFAULT_BALANCE:g}-bn{DEFAULT_BN_FLOW}"


# Internal bookkeeping that means nothing to a user; built from pieces so this file does not match itself.
_JARGON = re.compile("|".join([
    r"\b(?:stop|issue|item)s? \d+\b", r"\bstops? \d+-\d+\b", "pre-" + "registered", "phase-" + "1 rows",
    r"\bthis " + "stop\b", r"\bnext " + "sessions?\b"]), re.IGNORECASE)
_SCANNED = ("README.md", "CHANGELOG.md", "docs", "connect_tp", "benchmarks", "tests", "setup.cfg", ".ci")


def _comment_text(path):
    """A Python file's comments and string literals (docstrings, messages), one line each."""
    import io
    import tokenize

    out = []
    with open(path, encoding="utf-8") as f:
        for tok in tokenize.generate_tokens(io.StringIO(f.read()).readline):
            if tok.type in (tokenize.COMMENT, tokenize.STRING):
                out += [(tok.start[0] + i, line) for i, line in enumerate(tok.string.split("\n"))]
    return out


def test_no_internal_bookkeeping_in_pages_and_comments():
    found = []
    for top in _SCANNED:
        root = os.path.join(REPO, top)
        paths = [root] if os.path.isfile(root) else [
            os.path.join(d, n) for d, _, names in os.walk(root) for n in names
            if "results" not in os.path.relpath(d, REPO).split(os.sep)]  # recorded results stay as written
        for path in sorted(paths):
            if path.endswith(".py"):
                lines = _comment_text(path)
            elif path.endswith((".md", ".cfg", ".sh")) or os.path.basename(path) == "run":
                lines = list(enumerate(_read(path).split("\n"), 1))
            else:
                continue
            found += [f"{os.path.relpath(path, REPO)}:{n}: {line.strip()[:100]}"
                      for n, line in lines if _JARGON.search(line)]
    assert not found, ("say what was done instead of naming internal stops, issues or items "
                       "(e.g. 'the rule was fixed before the runs'):\n" + "\n".join(found))
