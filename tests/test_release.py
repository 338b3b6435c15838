"""Release metadata agrees with itself and with the installed Torch-Pruning.

The results in README.md and docs/ were measured with torch-pruning 1.6; setup.cfg pins the range
those numbers hold for, and this test fails when the environment has a Torch-Pruning outside it
(then the published numbers do not describe what runs). pytest depends on ``packaging``, so it is
always there when the tests run.
"""
import configparser
import os
import re
from importlib import metadata

from packaging.requirements import Requirement
from packaging.version import Version

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _setup_cfg():
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(REPO, "setup.cfg"), encoding="utf-8")
    return cfg


def _requirement(name):
    lines = _setup_cfg()["options"]["install_requires"].split("\n")
    found = [Requirement(line.strip()) for line in lines if line.strip()]
    matches = [r for r in found if r.name.lower().replace("_", "-") == name]
    assert len(matches) == 1, f"setup.cfg's install_requires names {name} {len(matches)} times: {found}"
    return matches[0]


def test_version_has_one_source():
    import connect_tp
    assert _setup_cfg()["metadata"]["version"].strip() == "attr: connect_tp.__version__"
    assert Version(connect_tp.__version__) == Version("0.3.0")


def test_changelog_opens_with_this_version():
    import connect_tp
    with open(os.path.join(REPO, "CHANGELOG.md"), encoding="utf-8") as f:
        headings = re.findall(r"^## \[?(\d+\.\d+\.\d+)\]?", f.read(), re.MULTILINE)
    assert headings, "CHANGELOG.md has no '## <version>' heading"
    assert headings[0] == connect_tp.__version__, (
        f"CHANGELOG.md's newest entry is {headings[0]}, the package is {connect_tp.__version__}: "
        "add an entry for this version at the top")
    assert "0.1.0" in headings, "CHANGELOG.md should keep the 0.1.0 entry the changes are measured from"


def test_torch_pruning_is_pinned_to_a_minor_series():
    spec = _requirement("torch-pruning").specifier
    assert "1.6.0" in spec and "1.6.1" in spec, f"the measured versions fall outside {spec}"
    assert "1.7.0" not in spec and "1.5.9" not in spec, f"{spec} is wider than the measured 1.6 series"


def test_installed_torch_pruning_lies_in_the_pinned_range():
    # the distribution's version, not torch_pruning.__version__: the 1.6.1 wheel still says "1.6.0"
    installed = metadata.version("torch-pruning")
    spec = _requirement("torch-pruning").specifier
    assert installed in spec, (
        f"torch-pruning {installed} is installed, but setup.cfg pins torch-pruning{spec}, the range the "
        f"published results were measured with: pip install 'torch-pruning{spec}'")
