"""Checks that run before any test: under ``CI=true`` the optional test dependencies must work.

Tests that need ``transformers`` or ``peft`` skip themselves where those are not installed
(``pytest.importorskip``), which suits a developer's machine. In CI, a missing or broken install
would turn dozens of tests into silent skips and CI would pass without running them. So with
``CI=true`` the session stops before collecting, with an error naming the package and what went
wrong, as ``.ci/run`` does for a missing Fashion-MNIST.
"""
import importlib
import os
from typing import Dict, List, Mapping, Tuple

import pytest

#: Package -> the names the tests take from it (a lazy package can import and still fail on these).
REQUIRED_UNDER_CI: Dict[str, Tuple[str, ...]] = {
    "transformers": ("AutoModelForCausalLM", "BertConfig", "BertForMaskedLM", "LlamaConfig", "LlamaForCausalLM",
                     "OPTConfig", "OPTForCausalLM", "GPTNeoXConfig", "GPTNeoXForCausalLM"),
    "peft": ("LoraConfig", "get_peft_model"),
}


def broken_under_ci(env: Mapping[str, str] = os.environ) -> List[str]:
    """``["transformers (ImportError: ...)", ...]`` for each required package that does not work; [] outside CI."""
    if env.get("CI", "").strip().lower() != "true":
        return []
    problems = []
    for package, names in REQUIRED_UNDER_CI.items():
        try:
            module = importlib.import_module(package)
            for name in names:
                getattr(module, name)
        except Exception as exc:  # noqa: BLE001 - any failure of the install is the message
            problems.append(f"{package} ({type(exc).__name__}: {exc})")
    return problems


def pytest_configure(config):
    problems = broken_under_ci()
    if problems:
        raise pytest.UsageError(
            "CI=true: the test dependencies " + "; ".join(problems) + " are missing or broken, so the tests that "
            "need them would be skipped; install them (pip install -e '.[test]') or unset CI to allow the skips")
