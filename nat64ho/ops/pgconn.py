"""The operator commands' path to PostgreSQL: a synchronous session with
the part of sqlite3's API they use (:class:`nat64ho.ops.db.Conn`), asyncpg
underneath on an event loop of its own. Statements run as written (the
backends' differences are in :data:`nat64ho.ops.db.POSTGRES`); rows come
back as tuples, bytea as bytes. Big reads stream through a server-side
cursor; many-row inserts go through COPY.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import asyncpg

from nat64ho.ops.db import POSTGRES
from nat64ho.storage import pg_owner, pg_schema
from nat64ho.storage.pg_schema import OWNER_LOCK
from nat64ho.storage.schema import DatabaseError, shown

_T = TypeVar("_T")

#: Rows a streaming cursor asks the server for at a time.
CURSOR_ROWS = 4096


class PgError(DatabaseError):
    """A PostgreSQL error while a command runs (a lost connection, a refused
    write, a constraint); the message names the database."""


#: Statements that return rows (read when the cursor is read).
_ROWS = ("SELECT", "WITH", "EXPLAIN", "SHOW", "VALUES")


def _count(status: str) -> int:
    """Rows a command touched, from its status ("DELETE 3", "INSERT 0 5")."""
    last = status.rsplit(" ", 1)[-1]
    return int(last) if last.isdigit() else -1


class PgCursor:
    """The result of :meth:`PgConnection.execute`. A SELECT runs when first
    read: whole for ``fetchone``/``fetchall``, through a server-side cursor
    (in a transaction) for ``fetchmany`` and iteration."""

    def __init__(self, owner: PgConnection, sql: str, params: tuple[Any, ...], rowcount: int = -1):
        self._owner = owner
        self._sql = sql
        self._params = params
        self.rowcount = rowcount
        self._cursor: Any = None
        self._txn = 0  # the transaction its cursor lives in
        self._done = sql == ""
        self._buffer: list[tuple[Any, ...]] = []

    def fetchall(self) -> list[tuple[Any, ...]]:
        if self._done:
            return []
        if self._cursor is None:
            self._done = True
            return self._owner._fetch(self._sql, self._params)
        rows = []
        while chunk := self.fetchmany(CURSOR_ROWS):
            rows += chunk
        return rows

    def fetchone(self) -> tuple[Any, ...] | None:
        if self._cursor is None and not self._done:
            self._done = True
            rows = self._owner._fetch(self._sql, self._params)
            return rows[0] if rows else None
        rows = self.fetchmany(1)
        return rows[0] if rows else None

    def fetchmany(self, size: int | None = 1) -> list[tuple[Any, ...]]:
        size = size or 1
        while len(self._buffer) < size and not self._done:
            if self._cursor is None:
                self._cursor, self._txn = self._owner._open_cursor(self._sql, self._params)
            chunk = self._owner._cursor_fetch(self._cursor, max(size, CURSOR_ROWS))
            if len(chunk) < max(size, CURSOR_ROWS):
                self._done = True
                self._owner._cursor_closed(self._txn)
            self._buffer += chunk
        rows, self._buffer = self._buffer[:size], self._buffer[size:]
        return rows

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        while rows := self.fetchmany(CURSOR_ROWS):
            yield from rows

    def close(self) -> None:
        """Rows left unread are not wanted: a streaming cursor's transaction
        (and its snapshot) ends now if no other cursor is in it."""
        if self._cursor is not None and not self._done:
            self._done = True
            self._buffer = []
            self._owner._cursor_closed(self._txn)


class PgConnection:
    """A PostgreSQL session, synchronous. Outside ``BEGIN``…``COMMIT`` each
    statement commits on its own, as in sqlite3's autocommit mode; streaming
    cursors open a transaction of their own that ends with the last of them."""

    sql = POSTGRES

    def __init__(self, url: str, conn: asyncpg.Connection, loop: asyncio.AbstractEventLoop):
        self.url = url
        self._conn = conn
        self._loop = loop
        self._tx = False  # a transaction is open, explicit or the cursors'
        self._explicit = False
        self._cursors = 0  # open cursors in the transaction numbered self._txn
        self._txn = 0
        self._broken = False
        self.total_changes = 0
        self.created = 0  #: schema version made by connect(create=True), else 0

    # ------------------------------------------------------------ running

    def _run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        if self._broken:
            coro.close()
            raise PgError(f"{shown(self.url)}: the connection was interrupted")
        task = self._loop.create_task(coro)
        try:
            return self._loop.run_until_complete(task)
        except (
            asyncpg.PostgresConnectionError,
            asyncpg.InterfaceError,
            # A session the server ends in the middle of a cursor's round trip
            # can leave asyncpg's protocol in a state it calls internal.
            asyncpg.InternalClientError,
            OSError,
        ) as exc:
            self._broken = True
            self._conn.terminate()
            raise PgError(f"{shown(self.url)}: connection lost ({exc})") from None
        except asyncpg.PostgresError as exc:
            raise PgError(f"{shown(self.url)}: {exc}") from None
        except BaseException:
            # Ctrl-C in the middle of a round trip leaves the protocol in
            # between two messages: drop the session (PostgreSQL rolls back
            # whatever it had open) rather than reuse it.
            task.cancel()
            self._broken = True
            self._conn.terminate()
            raise

    def _fetch(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        return [tuple(r) for r in self._run(self._conn.fetch(sql, *params))]

    def _open_cursor(self, sql: str, params: tuple[Any, ...]) -> tuple[Any, int]:
        """A server-side cursor, and the transaction it lives in."""
        if not self._tx:
            self._begin("BEGIN", explicit=False)
        self._cursors += 1

        async def declare() -> Any:
            return await self._conn.cursor(sql, *params)  # awaitable, not a coroutine

        return self._run(declare()), self._txn

    def _cursor_fetch(self, cursor: Any, n: int) -> list[tuple[Any, ...]]:
        return [tuple(r) for r in self._run(cursor.fetch(n))]

    def _cursor_closed(self, txn: int) -> None:
        if txn != self._txn:
            return  # its transaction ended already (a COMMIT, a BEGIN): not counted now
        self._cursors -= 1
        if self._cursors <= 0 and self._tx and not self._explicit:
            self._end("COMMIT")

    def _begin(self, sql: str, *, explicit: bool) -> None:
        if self._tx and not self._explicit:
            self._end("COMMIT")  # cursors left unread: their rows are not needed
        self._run(self._conn.execute(sql))
        self._tx, self._explicit = True, explicit

    def _end(self, sql: str) -> None:
        tx, self._tx, self._explicit, self._cursors = self._tx, False, False, 0
        self._txn += 1
        if tx and not self._broken:
            self._run(self._conn.execute(sql))
        elif sql.startswith("COMMIT"):  # a broken session's server rolled back
            why = "the connection was interrupted" if tx else "COMMIT without a transaction"
            raise PgError(f"{shown(self.url)}: {why}")

    # ------------------------------------------------------------ sqlite3's API

    @property
    def in_transaction(self) -> bool:
        return self._tx

    def execute(self, sql: str, parameters: Sequence[Any] = (), /) -> PgCursor:
        word = sql.lstrip()[:8].upper()
        if word.startswith("BEGIN"):
            self._begin(sql, explicit=True)
            return PgCursor(self, "", ())
        if word.startswith(("COMMIT", "ROLLBACK")):
            self._end(sql)
            return PgCursor(self, "", ())
        params = tuple(parameters)
        if word.startswith(_ROWS):
            return PgCursor(self, sql, params)
        status = self._run(self._conn.execute(sql, *params))
        n = _count(status)
        if status.startswith(("INSERT", "UPDATE", "DELETE")) and n > 0:
            self.total_changes += n
        return PgCursor(self, "", (), n)

    def insert_many(
        self, table: str, columns: Sequence[str], rows: Iterable[Sequence[Any]], ignore: bool
    ) -> int:
        """COPY into a session's staging table, then one INSERT … SELECT in
        the rows' order (ids follow it), skipping conflicts if ``ignore``:
        the count of rows added comes back."""
        rows = list(rows)
        if not rows:
            return 0
        n = self._run(self._copy_insert(table, list(columns), ignore, rows))
        self.total_changes += n
        return n

    async def _copy_insert(self, table: str, cols: list[str], ignore: bool, rows: list[Any]) -> int:
        names = ", ".join(cols)
        # One per table and column set: its columns are fixed when made.
        stage = "nat64ho_stage_" + "_".join([table.rpartition(".")[2], *cols])
        await self._conn.execute(
            f"CREATE TEMP TABLE IF NOT EXISTS {stage} AS SELECT {names} FROM {table} "
            f"WITH NO DATA; ALTER TABLE {stage} ADD COLUMN IF NOT EXISTS stage_n bigserial; "
            f"TRUNCATE {stage}"
        )
        await self._conn.copy_records_to_table(
            stage, records=rows, columns=cols, schema_name="pg_temp"
        )
        status = await self._conn.execute(
            f"INSERT INTO {table} ({names}) SELECT {names} FROM {stage} ORDER BY stage_n"
            + (" ON CONFLICT DO NOTHING" if ignore else "")
        )
        return _count(status)

    def close(self) -> None:
        if self._tx and not self._explicit and not self._broken:
            # A cursor left unread holds its transaction open, and statements
            # run meanwhile are in it; outside BEGIN each one commits on its
            # own, so they must not be rolled back with the unread rows.
            try:
                self._end("COMMIT")
            except PgError:
                pass  # the session broke: the server rolled back
        if not self._conn.is_closed():
            if self._broken:
                self._conn.terminate()
            else:
                try:
                    self._loop.run_until_complete(self._conn.close(timeout=5))
                except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError):
                    self._conn.terminate()
        self._loop.close()

    # ------------------------------------------------------------ beyond sqlite3

    def take_table(self, what: str) -> Callable[[], None]:
        """Own the table for this session (the advisory lock a server holds
        for its whole life), or raise :class:`TableOwned` naming the holder."""
        got = self.execute("SELECT pg_try_advisory_lock($1)", (OWNER_LOCK,)).fetchone()
        if got is not None and got[0]:
            return self._release_table
        row = self.execute(pg_owner.HOLDER_SQL, pg_owner.KEY_HALVES).fetchone()
        raise pg_owner.owned(self.url, pg_owner.described(row), what)

    def _release_table(self) -> None:
        if not self._broken and not self._conn.is_closed():
            self.execute("SELECT pg_advisory_unlock($1)", (OWNER_LOCK,)).fetchone()


async def _open(url: str, readonly: bool, create: bool, name: str) -> tuple[Any, int]:
    """A session whose schema is current; with ``create`` the tables are made
    first where the database has none. The schema version made, or 0."""
    conn = await pg_schema.connect(url, server_settings={"application_name": name})
    made = 0
    async with pg_schema.closed_on_failure(conn, url):
        if readonly:
            await conn.execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
        elif create and not await pg_schema.applied(conn, url):
            made = max(await pg_schema.migrate(conn, url))
        await pg_schema.require_current(conn, url)
    return conn, made


def connect(
    url: str, *, readonly: bool = False, create: bool = False, name: str = "nat64ho"
) -> PgConnection:
    """A session on ``url`` whose schema is current (pg_schema's errors
    otherwise). ``readonly``: it refuses every write. ``create``: make the
    tables in a database that has none (``created`` says which version)."""
    loop = asyncio.new_event_loop()
    try:
        conn, made = loop.run_until_complete(_open(url, readonly, create, name))
    except BaseException:
        loop.close()
        raise
    pg = PgConnection(url, conn, loop)
    pg.created = made
    return pg
