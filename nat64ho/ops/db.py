"""What the operator modules share: the connection they take, the
transaction helper, row streaming with checks, the errors they raise, and
whether another process has a database open.

Synchronous: sqlite3 on a connection from :func:`nat64ho.storage.schema.open_db`,
or PostgreSQL through :mod:`nat64ho.ops.pgconn`, which speaks the same API.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import struct
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from nat64ho.storage import schema

#: Rows fetched from SQLite at a time while streaming.
FETCH = 4096


class Rows(Protocol):
    """What a statement returns: sqlite3.Cursor, or pgconn.PgCursor."""

    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchmany(self, size: int | None = 1, /) -> list[Any]: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


class Conn(Protocol):
    """A connection of either backend: sqlite3.Connection, or pgconn.PgConnection."""

    @property
    def total_changes(self) -> int: ...

    def execute(self, sql: str, parameters: Any = ..., /) -> Any: ...

    def executemany(self, sql: str, rows: Any, /) -> Any: ...

    def close(self) -> None: ...


def on_postgres(conn: Conn | None) -> bool:
    """Whether ``conn`` is a PostgreSQL session (pgconn is not imported for
    SQLite, so that asyncpg stays off its path)."""
    return conn is not None and not isinstance(conn, sqlite3.Connection)


class HistoryError(Exception):
    """Base of the operator modules' named errors; the message is meant for an operator."""


@contextlib.contextmanager
def atomic(conn: Conn) -> Iterator[Conn]:
    """``with atomic(conn):`` one write transaction, committed at the end or
    rolled back on any exception (Ctrl-C included). IMMEDIATE takes the write
    lock at once, so a busy database fails here rather than halfway through."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def stream(
    cur: Rows,
    make: Any = None,
    ok: Callable[[Any], bool] | None = None,
    conn: Conn | None = None,
) -> Iterator[Any]:
    """Rows of ``cur`` in chunks; each must pass ``ok`` (see schema.entry_ok)."""
    while rows := cur.fetchmany(FETCH):
        if ok is not None:
            for row in rows:
                if not ok(row):
                    raise bad_row(conn, row, ok)
        if make is None:
            yield from rows
        else:
            yield from map(make._make, rows)


def db_path(conn: Conn | None) -> str:
    """The file (or PostgreSQL URL) of ``conn``, for messages."""
    if conn is None:
        return "database"
    if on_postgres(conn):
        return schema.shown(getattr(conn, "url", "database"))
    try:
        return str(conn.execute("PRAGMA database_list").fetchone()[2] or "database")
    except sqlite3.Error:
        return "database"


def bad_row(conn: Conn | None, row: Any, ok: Callable[[Any], bool]) -> Exception:
    """The error naming a row that failed ``ok``."""
    if ok is schema.entry_ok:
        return schema.bad_entry(db_path(conn), row)
    if ok is id_event_ok:
        row = row[1:]
    return schema.bad_event(db_path(conn), row, conn)


def id_event_ok(row: Any) -> bool:
    """schema.event_ok for a row that starts with its id."""
    return schema.event_ok(row[1:])


#: Where SQLite's unix VFS keeps the "dead man switch" lock in a WAL
#: database's -shm file: every open connection holds a read lock on it.
_SHM_DMS = 128


def database_in_use(path: str | os.PathLike[str]) -> bool:
    """Whether another process has the database open (a running server, or
    any other connection), from the locks SQLite holds on its -shm file.
    Call it before opening the database in this process: POSIX locks do not
    see the caller's own, and closing a descriptor drops them."""
    try:
        fd = os.open(f"{path}-shm", os.O_RDONLY)
    except OSError:
        return False  # no -shm file: nobody has the database open
    try:
        query = struct.pack("hhqqixxxx", fcntl.F_WRLCK, os.SEEK_SET, _SHM_DMS, 1, 0)
        answer = fcntl.fcntl(fd, fcntl.F_GETLK, query)
        return bool(struct.unpack("hhqqixxxx", answer)[0] != fcntl.F_UNLCK)
    finally:
        os.close(fd)
