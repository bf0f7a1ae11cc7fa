"""What the operator modules share: the connection they take (one path to
each backend, :func:`connect`), what the backends spell differently
(:class:`Dialect`), the transaction helper, row streaming with checks, the
errors they raise, and whether another process has a database open.

Statements take ``$1, $2, …`` placeholders, which SQLite and PostgreSQL
both read as they are: sqlite3 is given the values by name, asyncpg by position.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
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

    def close(self) -> None: ...

    def __iter__(self) -> Iterator[Any]: ...


@dataclass(frozen=True)
class Dialect:
    """What the operator commands spell differently on each backend."""

    postgres: bool
    #: A write transaction, its lock taken at once.
    begin: str
    #: A read transaction on one snapshot of the database.
    begin_snapshot: str
    #: The schema of a session's temporary tables.
    temp: str
    #: Table event read in ts order (SQLite's planner may take another index, then sort).
    event_by_ts: str
    #: The ports an import names, for its replay: a temporary table.
    create_replay: str


SQLITE = Dialect(
    postgres=False,
    begin="BEGIN IMMEDIATE",
    begin_snapshot="BEGIN",
    temp="temp",
    event_by_ts="event INDEXED BY event_ts",
    create_replay="CREATE TEMP TABLE IF NOT EXISTS replay "
    "(nat INTEGER, port INTEGER, PRIMARY KEY (nat, port)) WITHOUT ROWID",
)

POSTGRES = Dialect(
    postgres=True,
    begin="BEGIN",
    begin_snapshot="BEGIN ISOLATION LEVEL REPEATABLE READ",
    temp="pg_temp",
    event_by_ts="event",
    create_replay="CREATE TEMP TABLE IF NOT EXISTS replay "
    "(nat bigint, port integer, PRIMARY KEY (nat, port))",
)


#: The columns of an event as the operator commands write it (id is drawn).
EVENT_COLUMNS = ("ts", "kind", "nat", "port", "addr", "aport")


def arg(args: list[Any], value: Any) -> str:
    """The placeholder of ``value``, appended to ``args``: for statements
    whose conditions are chosen at run time."""
    args.append(value)
    return f"${len(args)}"


class Conn(Protocol):
    """A session of either backend: :class:`SqliteConn` or pgconn.PgConnection."""

    sql: Dialect

    @property
    def total_changes(self) -> int: ...

    @property
    def in_transaction(self) -> bool: ...

    def execute(self, sql: str, parameters: Sequence[Any] = ..., /) -> Rows: ...

    def insert_many(
        self, table: str, columns: Sequence[str], rows: Iterable[Sequence[Any]], ignore: bool
    ) -> int: ...

    def take_table(self, what: str) -> Callable[[], None]:
        """Own the table (TableOwned names the holder otherwise) until the
        function returned is called, or the process or session ends."""

    def close(self) -> None: ...


def _named(values: Sequence[Any]) -> dict[str, Any]:
    return {str(i): v for i, v in enumerate(values, 1)}


class SqliteConn(sqlite3.Connection):
    """sqlite3 with the operator commands' placeholders and :class:`Conn`'s
    additions (made by :func:`nat64ho.storage.schema.open_db`, as its ``factory``)."""

    sql = SQLITE

    def execute(self, sql: str, parameters: Any = (), /) -> sqlite3.Cursor:
        return super().execute(sql, _named(parameters))

    def insert_many(
        self, table: str, columns: Sequence[str], rows: Iterable[Sequence[Any]], ignore: bool
    ) -> int:
        """Insert ``rows`` (those that conflict skipped if ``ignore``); how many went in."""
        marks = ", ".join("?" * len(columns))
        before = self.total_changes
        super().executemany(
            f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})"
            + (" ON CONFLICT DO NOTHING" if ignore else ""),
            rows,
        )
        return self.total_changes - before

    def take_table(self, what: str) -> Callable[[], None]:
        from nat64ho.storage import owner

        return owner.acquire(db_file(self), what=what).release


def db_file(conn: Conn | sqlite3.Connection) -> Path:
    """The file of an SQLite connection."""
    return Path(conn.execute("PRAGMA database_list").fetchone()[2])


def connect(
    db: Path | str, *, readonly: bool = True, create: bool = False, name: str = "nat64ho"
) -> Conn:
    """A session on ``--db`` whose schema is current (DatabaseError otherwise).
    ``readonly``: it never writes. ``create``: the tables are made first where
    the database has none (an older schema is still refused: ``serve``
    upgrades it). ``name``: what PostgreSQL shows for the session."""
    if schema.is_postgres(db):
        from nat64ho.ops import pgconn

        return pgconn.connect(str(db), readonly=readonly, create=create, name=name)
    path = Path(db)
    create = create and not path.exists()
    conn = schema.open_db(path, readonly=readonly, create=create, factory=SqliteConn)
    assert isinstance(conn, SqliteConn)
    return conn


def check(db: Path | str) -> schema.CheckReport:
    """``check`` of either backend: the live catalog against the declared
    schema (nat64ho.storage.declared), then the rows; nothing is changed."""
    if schema.is_postgres(db):
        from nat64ho.storage import pg_check

        return pg_check.check(str(db))
    return schema.check(db)


class HistoryError(Exception):
    """Base of the operator modules' named errors; the message is meant for an operator."""


@contextlib.contextmanager
def atomic(conn: Conn) -> Iterator[Conn]:
    """``with atomic(conn):`` one write transaction, committed at the end or
    rolled back on any exception (Ctrl-C included). IMMEDIATE takes the write
    lock at once, so a busy database fails here rather than halfway through."""
    conn.execute(conn.sql.begin)
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
    if isinstance(conn, sqlite3.Connection):
        try:
            return str(db_file(conn)) or "database"
        except sqlite3.Error:
            return "database"
    return schema.shown(getattr(conn, "url", "database"))


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
