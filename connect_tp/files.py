"""Safe files: atomic writes that respect the umask, readers whose errors name the file.

Every checkpoint and result of :func:`connect_tp.training.fit` and of the ``connect-tp`` pipeline is written
through :func:`atomic_write`: the bytes go to a temporary file in the destination folder, which is
flushed, given the mode a plain ``open()`` would give (``0666`` less the umask, so ``0644`` under
the usual ``022``) and renamed over the destination. A process killed at any moment leaves the old
file or the complete new one, never a partial file. A failed write (disk full, permissions) raises
:class:`OSError` whose ``filename`` is the destination, so the command line can say which file it
could not write. Checkpoints are serialized to memory first and then written with plain file
writes, so a full disk is an ``OSError`` (``ENOSPC``), not a ``RuntimeError`` from inside
``torch.save``. :func:`sha256_file` gives the fingerprints that link a run's files to their parents.

Nothing here imports torch at module level: the command line uses this module before deciding to
load the heavy libraries.
"""
from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import tempfile
from typing import Any, Callable

__all__ = [
    "CheckpointError", "ResultError", "atomic_write", "atomic_save", "atomic_write_json", "read_json",
    "load_checkpoint", "sha256_file", "file_mode", "current_umask", "check_output_folder",
]


class CheckpointError(RuntimeError):
    """A checkpoint or result file is missing or unreadable; the message names the file."""


class ResultError(CheckpointError):
    """A result file is valid JSON but not of the shape the pipeline writes; the message names the file."""


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux ``/proc``)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # the portable way reads it by setting it; restore at once
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a new file gets from ``open(path, "w")``: ``0o666`` less the umask."""
    return 0o666 & ~current_umask()


def atomic_write(path: str, write: Callable[[Any], None], binary: bool = False) -> None:
    """Call ``write(file)`` on a temporary file next to ``path``, then rename it to ``path``.

    A crash at any point leaves either the old ``path`` or the complete new one, never a partial
    file. The new file gets the permissions of a plain ``open()`` (umask respected).

    Raises:
        OSError: the folder or file could not be written; ``filename`` is ``path``.
    """
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        # The temporary file lives in the destination folder: os.replace is atomic only within one file system.
        fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
        os.fchmod(fd, file_mode())  # mkstemp creates 0600; results are meant to be read by others
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        raise OSError(exc.errno or errno.EIO, f"cannot write this file ({exc.strerror or exc})", path) from exc
    finally:
        if tmp is not None and os.path.exists(tmp):
            try:
                os.remove(tmp)
            except OSError:
                pass


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save`` to ``path`` through a temporary file and an atomic rename.

    The object is serialized in memory first, so that a failing disk raises ``OSError`` naming
    ``path`` (``torch.save`` straight into a file turns it into an opaque ``RuntimeError``).
    """
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write(path, lambda f: f.write(buffer.getbuffer()), binary=True)


def atomic_write_json(obj: Any, path: str) -> None:
    """Write ``obj`` as indented JSON to ``path`` through a temporary file and an atomic rename."""
    text = json.dumps(obj, indent=2, sort_keys=False) + "\n"  # serialize first: a bad value writes nothing
    atomic_write(path, lambda f: f.write(text), binary=False)


def read_json(path: str) -> Any:
    """Read a JSON result file.

    Raises:
        CheckpointError: the file is missing, unreadable or not valid JSON (the message names it).
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"result file {path} is missing; run the stage that writes it first")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except OSError as exc:
        raise CheckpointError(f"result file {path} cannot be read ({exc.strerror or exc})") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"result file {path} is corrupt ({exc}); delete it and rerun the stage") from exc


def load_checkpoint(path: str, map_location: Any = "cpu") -> Any:
    """Load a checkpoint written by :func:`atomic_save` (tensors and plain Python only).

    Raises:
        CheckpointError: the file is missing or corrupt.
    """
    import torch

    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} is missing; run the stage that writes it first")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several unrelated types for a damaged zip/pickle
        raise CheckpointError(f"checkpoint {path} is corrupt or unreadable ({exc}); delete it and "
                              f"rerun the stage that writes it (without --resume)") from exc


def sha256_file(path: str) -> str:
    """Hex SHA-256 of a file's bytes (the fingerprint that links a child file to its parent)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_output_folder(path: str) -> None:
    """Create ``path`` if needed and make sure a file can be written in it.

    Raises:
        OSError: with a message that says what is wrong and ``filename`` set to ``path``.
    """
    try:
        os.makedirs(path, exist_ok=True)
    except FileExistsError:
        raise OSError(errno.ENOTDIR, "exists and is not a folder", path) from None
    except OSError as exc:
        raise OSError(exc.errno, f"cannot create the output folder ({exc.strerror or exc})", path) from exc
    if not os.path.isdir(path):
        raise OSError(errno.ENOTDIR, "exists and is not a folder", path)
    try:
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise OSError(exc.errno, f"the output folder is not writable ({exc.strerror or exc})", path) from exc
