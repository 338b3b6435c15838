"""One writer per output folder: a lock file that names its holder and is taken over when stale.

Every command that writes into a folder (``train``, ``prune``, ``finetune``, ``run`` into the run
folder; ``table`` into its output folder) first takes ``FOLDER/.connect-tp.lock``. The file is
created atomically with its content already in it (hard link of a finished temporary file, so a
reader never sees it half written) and records the holder's pid, host, boot id, process start
time and command line. A second writer is refused at once with an error that names the holder. A
lock whose process is gone (same host, and the pid no longer runs, or runs a different process
since the pid was reused, or the machine rebooted) is stale: it is taken over with a message. A
lock from another host cannot be checked and is never taken over; the message says how to remove
it by hand.
"""
from __future__ import annotations

import datetime
import errno
import json
import os
import socket
import tempfile
from typing import Any, Callable, Dict, Optional

__all__ = ["LOCK_NAME", "LockError", "RunLock"]

LOCK_NAME = ".connect-tp.lock"


class LockError(RuntimeError):
    """The folder is being written by another process (the message names it)."""


def _read(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _process_start(pid: int) -> Optional[str]:
    """Start time of ``pid`` in clock ticks since boot (Linux), to tell a reused pid apart."""
    stat = _read(f"/proc/{pid}/stat")
    if not stat:
        return None
    try:
        return stat.rsplit(")", 1)[1].split()[19]  # field 22 of proc(5), counted after "comm)"
    except IndexError:
        return None


def _identity() -> Dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "boot_id": _read("/proc/sys/kernel/random/boot_id"),
            "start": _process_start(os.getpid())}


def _holder_alive(holder: Dict[str, Any]) -> Optional[bool]:
    """True/False whether the holder still runs; None when it cannot be told (another host)."""
    me = _identity()
    if holder.get("host") != me["host"]:
        return None
    if holder.get("boot_id") and me["boot_id"] and holder["boot_id"] != me["boot_id"]:
        return False  # written before the machine rebooted
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it runs, as another user
    if holder.get("start") and _process_start(pid) not in (None, holder["start"]):
        return False  # the pid now belongs to another process
    return True


def _describe(holder: Dict[str, Any]) -> str:
    return (f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('since', '?')}: "
            f"{holder.get('command', '?')}")


class RunLock:
    """Exclusive lock on an output folder for the lifetime of one command.

    Args:
        folder: the folder to lock (created if missing).
        command: the command line to record (shown to a second writer).
        note: called with a message when a stale lock is taken over.

    Example:
        >>> with RunLock("runs/x", "connect-tp train ..."):  # doctest: +SKIP
        ...     pass
    """

    def __init__(self, folder: str, command: str, note: Callable[[str], None] = print):
        self.folder, self.command, self.note = folder, command, note
        self.path = os.path.join(folder, LOCK_NAME)
        self.held = False

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _create(self) -> bool:
        """Create the lock file with its content in one step; False if it exists."""
        info = dict(_identity(), command=self.command,
                    since=datetime.datetime.now().astimezone().isoformat(timespec="seconds"))
        fd, tmp = tempfile.mkstemp(prefix=LOCK_NAME + ".", suffix=".tmp", dir=self.folder)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(info, f)
            try:
                os.link(tmp, self.path)  # fails with EEXIST if the lock exists: atomic test-and-set
            except FileExistsError:
                return False
            except OSError as exc:  # file systems without hard links
                if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                    raise
                try:
                    fd2 = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
                except FileExistsError:
                    return False
                with os.fdopen(fd2, "w") as f:
                    json.dump(info, f)
            return True
        finally:
            os.remove(tmp)

    def acquire(self) -> None:
        """Take the lock, or raise :class:`LockError` naming the process that holds it.

        Raises:
            OSError: the lock file cannot be written (full disk, permissions); ``filename`` is its path.
        """
        try:
            self._acquire()
        except OSError as exc:
            if exc.filename == self.path:
                raise
            raise OSError(exc.errno, f"cannot write the lock file ({exc.strerror or exc})", self.path) from exc

    def _acquire(self) -> None:
        os.makedirs(self.folder, exist_ok=True)
        for _ in range(5):
            if self._create():
                self.held = True
                return
            text = _read(self.path)
            if text is None:
                continue  # removed in between: try again
            try:
                holder = json.loads(text)
                if not isinstance(holder, dict):
                    raise ValueError
            except ValueError:
                raise LockError(f"{self.path} exists but is not a connect-tp lock; if no connect-tp command "
                                f"writes to {self.folder}, delete it and rerun") from None
            alive = _holder_alive(holder)
            if alive is None:
                raise LockError(f"{self.folder} is in use by {_describe(holder)} (another host, so it cannot be "
                                f"checked here); wait for it to finish, use another --out, or delete {self.path} "
                                f"if that command no longer runs")
            if alive:
                raise LockError(f"{self.folder} is in use by {_describe(holder)}; wait for it to finish or use "
                                f"another --out (one writer per folder)")
            # Stale: move it aside under a unique name, then make sure it was the stale one that moved.
            aside = f"{self.path}.stale.{os.getpid()}"
            try:
                os.rename(self.path, aside)
            except FileNotFoundError:
                continue
            moved = _read(aside)
            if moved != text:  # another process took it over first and we moved its fresh lock: put it back
                try:
                    os.link(aside, self.path)
                finally:
                    os.remove(aside)
                continue
            os.remove(aside)
            self.note(f"note: took over the lock of {self.folder} from {_describe(holder)}, "
                      f"which no longer runs")
        raise LockError(f"could not take the lock {self.path} (other processes keep taking it); retry")

    def release(self) -> None:
        """Remove the lock if this process holds it."""
        if not self.held:
            return
        self.held = False
        text = _read(self.path)
        try:
            holder = json.loads(text) if text else {}
        except ValueError:
            holder = {}
        if isinstance(holder, dict) and holder.get("pid") == os.getpid():
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass
