"""Who owns a table: the one process allowed to change its entries.

An ``flock`` on ``PATH.lock`` beside the database, held for the owner's whole
life. Not SQLite's own locks: those are POSIX locks, which a process drops
when it closes any descriptor of the file, and an exclusive one would also
shut out the read commands that must work beside a server. The kernel drops
an flock when its holder dies, even by SIGKILL, so no stale lock survives a
crash; the pid written in the file is only there to name the holder.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from nat64ho.storage.schema import DatabaseError


class TableOwned(DatabaseError):
    """Another process owns the table (a running server, a prune, an import)."""

    holder: str | None = None  #: who holds it, as the lock file names it


def lock_path(db: Path | str) -> Path:
    db = Path(db)
    return db.with_name(db.name + ".lock")


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 64, 0).decode("ascii", "replace").split()
    except OSError:
        text = []
    return f"process {text[0]}" if text and text[0].isdigit() else "another process"


class Ownership:
    """A held lock; :meth:`release` (or process exit) frees the table."""

    def __init__(self, path: Path, fd: int):
        self.path = path
        self._fd = fd

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing drops the flock
            self._fd = -1


def acquire(db: Path | str, *, what: str = "nat64ho") -> Ownership:
    """Take the table of ``db`` for this process, or raise :class:`TableOwned`
    naming the process that holds it (``holder`` on the exception)."""
    path = lock_path(db)
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        fd = os.open(path, flags, 0o640)
    except OSError as exc:
        raise TableOwned(f"{path}: cannot open the lock file ({exc.strerror or exc})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        err = TableOwned(
            f"{db}: the table is owned by {holder} (a running 'nat64ho serve'?); "
            f"{what} needs it alone"
        )
        err.holder = holder
        raise err from None
    except OSError as exc:
        os.close(fd)
        raise TableOwned(f"{path}: cannot lock ({exc.strerror or exc})") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError:
        pass  # a full disk: the lock holds without the pid that names it
    return Ownership(path, fd)
