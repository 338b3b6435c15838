"""How long a test may wait: a time measured on an idle machine, stretched by the machine's load.

The suite runs on shared machines (CI runners, a laptop that compiles meanwhile). A fixed deadline
that holds on an idle machine fails under load although nothing is wrong, so every deadline in
the tests is a safety net scaled by the load, and tests wait on an event (a line printed, a file
written) wherever there is one.
"""
import os


def load_factor() -> float:
    """The 1-minute load average per CPU, at least 1 (1 on systems without a load average)."""
    if not hasattr(os, "getloadavg"):
        return 1.0
    return max(1.0, os.getloadavg()[0] / (os.cpu_count() or 1))


def patience(seconds: float) -> float:
    """``seconds`` on an idle machine, stretched by :func:`load_factor`."""
    return seconds * load_factor()
