"""Opening the database for an operator command: read-only unless asked,
never created by a read, retried while busy, and every failure one line."""

from __future__ import annotations

import os
import sqlite3
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Literal

import typer

from nat64ho.cli.options import EXIT_DB, db_target, fail
from nat64ho.ops import db as opsdb
from nat64ho.storage import schema

#: How long a command keeps retrying a database that stays locked, on top of
#: the busy timeout of each attempt: a commit or checkpoint of the server
#: finishes well within it.
BUSY_RETRY_S = 2.0


class Database:
    """``with Database(db) as conn``: the database of --db, or a clean exit.

    Read-only unless ``write``, and never created. On SQLite a lock that
    outlasts the busy timeout is retried for BUSY_RETRY_S more before giving
    up; on PostgreSQL a read-only session. Database errors while the command
    runs become one ``Error:`` line; the connection is closed on the way out.
    ``own``: the command must own the table (refused while a server runs).
    ``create``: make the tables where the database has none.
    """

    def __init__(
        self, db: str | None, *, write: bool = False, own: str | None = None, create: bool = False
    ):
        self.target = db_target(db)
        self.path = schema.describe(self.target)  # for messages
        self.write = write
        self.own = own  # the command, if it must own the table (Conn.take_table)
        self.create = create
        self.release: Callable[[], None] | None = None  # of the table, if owned
        self.conn: opsdb.Conn | None = None

    def __enter__(self) -> opsdb.Conn:
        deadline = time.monotonic() + BUSY_RETRY_S
        name = f"nat64ho {self.own or ('write' if self.write else 'read')}"
        while True:
            try:
                conn = opsdb.connect(
                    self.target, readonly=not self.write, create=self.create, name=name
                )
                break
            except schema.DatabaseBusy as exc:
                if time.monotonic() >= deadline:
                    fail(str(exc), EXIT_DB)
                time.sleep(0.1)
            except schema.DatabaseError as exc:
                fail(str(exc), EXIT_DB)
        if self.own is not None:
            try:
                self.release = conn.take_table(self.own)
            except schema.DatabaseError as exc:
                conn.close()
                fail(str(exc), EXIT_DB)
        self.conn = conn
        return conn

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> Literal[False]:
        try:
            if self.release is not None:
                self.release()
        finally:
            if self.conn is not None:
                self.conn.close()
        if isinstance(exc, BrokenPipeError):
            # `nat64ho export | head`: the reader has all it wanted.
            try:
                sys.stdout = open(os.devnull, "w")
            except OSError:
                pass
            raise typer.Exit(0)
        if exc is not None and schema.is_busy(exc):
            fail(f"{self.path}: database is busy (locked by another process); try again", EXIT_DB)
        if isinstance(exc, sqlite3.DatabaseError):
            fail(f"{self.path}: {exc}", EXIT_DB)
        if isinstance(exc, (opsdb.HistoryError, schema.DatabaseError)):
            fail(str(exc), EXIT_DB)
        return False


def create_database(path: Path) -> int:
    """Make a new database as ``serve`` would (the same migrations), readable
    by its owner and group only: files 0640, directories 0750. Returns the
    schema version."""
    old = os.umask(0o027)
    try:
        missing = []
        parent = path.parent
        while not parent.exists():
            missing.append(parent)
            parent = parent.parent
        for d in reversed(missing):
            os.mkdir(d, 0o750)
        conn = schema.open_db(path, create=True)
    except schema.DatabaseError as exc:
        fail(str(exc), EXIT_DB)
    except OSError as exc:
        fail(f"{path}: cannot be created ({exc.strerror or exc})", EXIT_DB)
    finally:
        # The -wal and -shm files SQLite makes later take the database's mode.
        os.umask(old)
    try:
        return max(v for v, _, _ in schema.migrations())
    finally:
        conn.close()
