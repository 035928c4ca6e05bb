"""An exclusive, non-blocking OS advisory lock on a file (POSIX `flock`).

The kernel drops the lock when the holding process ends in any way (exit, crash, kill -9), so it
never goes stale the way a pid file does. The file itself stays (deleting it would let two
processes lock two different files of one name); while held it records the holder's pid and host
for error messages. Re-entrant within the thread that holds it (a CLI command and the library
function it calls take the same lock); another thread or process gets `LockHeld` at once.
A forked child does not inherit a held lock (its copies of the descriptors are closed).
"""

from __future__ import annotations

import os
import socket
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no locking (adapterkit targets Linux and macOS)
    fcntl = None  # type: ignore[assignment]


class LockHeld(Exception):
    """The lock file is held by another process (or another thread of this one)."""

    def __init__(self, path: Path, holder: str) -> None:
        self.path, self.holder = path, holder      # holder: "pid N on HOST", or "" if unknown
        super().__init__(f"{path} is locked" + (f" by {holder}" if holder else ""))


_guard = threading.Lock()
_held: dict[tuple[int, int], list] = {}           # (st_dev, st_ino) -> [fd, owner thread id, depth]


@contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if missing) for the block; raise LockHeld at once
    if another process or thread holds it."""
    path = Path(path)
    if fcntl is None:  # pragma: no cover
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _open(path)
    st = os.fstat(fd)
    key = (st.st_dev, st.st_ino)
    with _guard:
        entry = _held.get(key)
        if entry is not None:                      # this process holds it already
            os.close(fd)                           # (closing a second descriptor keeps the lock)
            if entry[1] != threading.get_ident():
                raise LockHeld(path, f"another thread of this process (pid {os.getpid()})")
            entry[2] += 1
        else:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise LockHeld(path, holder) from None
            _write_holder(fd)
            entry = _held[key] = [fd, threading.get_ident(), 1]
    try:
        yield
    finally:
        with _guard:
            entry[2] -= 1
            if entry[2] == 0 and _held.get(key) is entry:
                del _held[key]
                try:
                    os.ftruncate(fd, 0)
                except OSError:
                    pass
                os.close(fd)                       # the last descriptor closed: the kernel unlocks


def _open(path: Path) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except PermissionError:                        # another user's lock file: flock works read-only
        return os.open(path, os.O_RDONLY)


def _write_holder(fd: int) -> None:
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    except OSError:                                # read-only descriptor: the lock alone is enough
        pass


def _read_holder(fd: int) -> str:
    try:
        return os.pread(fd, 300, 0).decode("utf-8", "replace").strip()
    except OSError:
        return ""


def _after_fork_in_child() -> None:
    global _guard
    _guard = threading.Lock()                      # another thread may have held it at the fork
    for fd, *_ in _held.values():
        try:
            os.close(fd)
        except OSError:
            pass
    _held.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
