"""What the pipeline prints: messages that never run onto a progress bar.

Progress bars (tqdm, on stderr) redraw their line in place; a plain ``print`` in between lands on
the bar's line. Every message of the pipeline therefore goes through ``tqdm.write``, which clears
the bars, prints the line and redraws them. Progress and results go to stdout, notes and errors
to stderr.
"""
from __future__ import annotations

import sys

__all__ = ["say", "note", "error"]


def _write(message: str, stream) -> None:
    from tqdm.auto import tqdm

    tqdm.write(message, file=stream)
    stream.flush()


def say(message: str) -> None:
    """A progress or result line (stdout)."""
    _write(message, sys.stdout)


def note(message: str) -> None:
    """A note the user should see (stderr); starts with ``note:`` by convention."""
    _write(message, sys.stderr)


def error(message: str) -> None:
    """The final ``error: ...`` line of a failed command (stderr)."""
    _write(message if message.startswith("error:") else f"error: {message}", sys.stderr)
