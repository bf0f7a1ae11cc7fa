"""A synchronous connection to PostgreSQL with the part of sqlite3's API the
operator modules use, so that nat64ho.ops keeps one implementation per
command for both backends. asyncpg underneath, on an event loop of its own.

SQLite's dialect is translated where the two differ (``?`` placeholders,
``INSERT OR IGNORE``, ``IS ?``, ``temp.``, ``INDEXED BY``); rows come back
as tuples, bytea as bytes, so the row checks of nat64ho.storage.schema
apply unchanged. Big reads stream through a server-side cursor; many-row
inserts go through COPY.
"""

from __future__ import annotations

import asyncio
import functools
import re
from collections.abc import Coroutine, Iterable, Iterator
from typing import Any, TypeVar

import asyncpg

from nat64ho.sql import numbered
from nat64ho.storage import pg_owner, pg_schema
from nat64ho.storage.schema import DatabaseError, shown

_T = TypeVar("_T")

#: Rows a streaming cursor asks the server for at a time.
CURSOR_ROWS = 4096


class PgError(DatabaseError):
    """A PostgreSQL error while a command runs (a lost connection, a refused
    write, a constraint); the message names the database."""


@functools.lru_cache(maxsize=256)
def translate(sql: str) -> str:
    """SQLite's spelling of a statement as PostgreSQL takes it."""
    out = sql.replace(" INDEXED BY event_ts", "").replace(" WITHOUT ROWID", "")
    out = re.sub(r"\btemp\.", "pg_temp.", out)
    out = re.sub(r" IS \?", " IS NOT DISTINCT FROM ?", out)
    if re.match(r"\s*INSERT OR IGNORE INTO", out):
        out = out.replace("INSERT OR IGNORE INTO", "INSERT INTO", 1).rstrip()
        out += " ON CONFLICT DO NOTHING"
    return numbered(out)


#: A plain many-row insert, which executemany sends through COPY.
_PLAIN_INSERT = re.compile(
    r"\s*INSERT (OR IGNORE )?INTO ([\w.]+)\s*(?:\(([^)]*)\))?\s*VALUES\s*\(([?,\s]*)\)\s*$"
)


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
                self._cursor = self._owner._open_cursor(self._sql, self._params)
            chunk = self._owner._cursor_fetch(self._cursor, max(size, CURSOR_ROWS))
            if len(chunk) < max(size, CURSOR_ROWS):
                self._done = True
                self._owner._cursor_closed()
            self._buffer += chunk
        rows, self._buffer = self._buffer[:size], self._buffer[size:]
        return rows

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        while rows := self.fetchmany(CURSOR_ROWS):
            yield from rows


class PgConnection:
    """A PostgreSQL session, synchronous. Outside ``BEGIN``…``COMMIT`` each
    statement commits on its own, as in sqlite3's autocommit mode; streaming
    cursors open a transaction of their own that ends with the last of them."""

    def __init__(self, url: str, conn: asyncpg.Connection, loop: asyncio.AbstractEventLoop):
        self.url = url
        self._conn = conn
        self._loop = loop
        self._tx: Any = None  # the open transaction, explicit or the cursors'
        self._explicit = False
        self._cursors = 0
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

    def _open_cursor(self, sql: str, params: tuple[Any, ...]) -> Any:
        if self._tx is None:
            self._begin(explicit=False)
        self._cursors += 1

        async def declare() -> Any:
            return await self._conn.cursor(sql, *params)  # awaitable, not a coroutine

        return self._run(declare())

    def _cursor_fetch(self, cursor: Any, n: int) -> list[tuple[Any, ...]]:
        return [tuple(r) for r in self._run(cursor.fetch(n))]

    def _cursor_closed(self) -> None:
        self._cursors -= 1
        if self._cursors <= 0 and self._tx is not None and not self._explicit:
            self._end(commit=True)

    def _begin(self, *, explicit: bool) -> None:
        if self._tx is not None and not self._explicit:
            self._end(commit=True)  # cursors left unread: their rows are not needed
        tx = self._conn.transaction()
        self._run(tx.start())
        self._tx, self._explicit = tx, explicit

    def _end(self, *, commit: bool) -> None:
        tx, self._tx, self._explicit, self._cursors = self._tx, None, False, 0
        if tx is None:
            if commit:
                raise PgError(f"{shown(self.url)}: COMMIT without a transaction")
            return
        if self._broken:
            if commit:
                raise PgError(f"{shown(self.url)}: the connection was interrupted")
            return  # the server rolled back when the session ended
        self._run(tx.commit() if commit else tx.rollback())

    # ------------------------------------------------------------ sqlite3's API

    @property
    def in_transaction(self) -> bool:
        return self._tx is not None

    def execute(self, sql: str, parameters: Iterable[Any] = (), /) -> PgCursor:
        word = sql.lstrip()[:8].upper()
        if word.startswith("BEGIN"):
            self._begin(explicit=True)
            return PgCursor(self, "", ())
        if word.startswith(("COMMIT", "ROLLBACK")):
            self._end(commit=word.startswith("COMMIT"))
            return PgCursor(self, "", ())
        params = tuple(parameters)
        text = translate(sql)
        if word.startswith(_ROWS):
            return PgCursor(self, text, params)
        status = self._run(self._conn.execute(text, *params))
        n = _count(status)
        if status.startswith(("INSERT", "UPDATE", "DELETE")) and n > 0:
            self.total_changes += n
        return PgCursor(self, "", (), n)

    def executemany(self, sql: str, rows: Iterable[Any], /) -> PgCursor:
        rows = list(rows)
        m = _PLAIN_INSERT.match(sql)
        if m is None:
            self._run(self._conn.executemany(translate(sql), rows))
            self.total_changes += len(rows)
            return PgCursor(self, "", (), len(rows))
        if not rows:
            return PgCursor(self, "", (), 0)
        n = self._run(self._copy_insert(m.group(2), m.group(3), bool(m.group(1)), rows))
        self.total_changes += n
        return PgCursor(self, "", (), n)

    async def _copy_insert(
        self, table: str, columns: str | None, ignore: bool, rows: list[Any]
    ) -> int:
        """COPY into a session's staging table, then one INSERT … SELECT in
        the rows' order (ids follow it), skipping conflicts when asked: the
        count of rows added comes back, as sqlite3's total_changes gives it."""
        table = table.replace("temp.", "pg_temp.", 1)
        if columns is None:
            cols = [
                r[0]
                for r in await self._conn.fetch(
                    "SELECT attname FROM pg_attribute WHERE attrelid = $1::regclass "
                    "AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
                    table,
                )
            ]
        else:
            cols = [c.strip() for c in columns.split(",")]
        names = ", ".join(cols)
        stage = "nat64ho_stage_" + re.sub(r"\W", "_", table)
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
        if self._tx is not None and not self._explicit and not self._broken:
            # A cursor left unread holds its transaction open, and statements
            # run meanwhile are in it; outside BEGIN each one commits on its
            # own, so they must not be rolled back with the unread rows.
            try:
                self._end(commit=True)
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

    def take_owner(self, what: str) -> None:
        """Own the table for this session (the advisory lock a server holds
        for its whole life), or raise :class:`TableOwned` naming the holder."""
        got = self.execute("SELECT pg_try_advisory_lock(?)", (pg_schema.OWNER_LOCK,)).fetchone()
        if got is not None and got[0]:
            return
        row = self.execute(pg_owner.HOLDER_SQL, pg_owner.KEY_HALVES).fetchone()
        raise pg_owner.owned(self.url, pg_owner.described(row), what)


async def _open(url: str, readonly: bool, name: str) -> tuple[asyncpg.Connection, int]:
    conn = await pg_schema.open_db(url, readonly=readonly)
    try:
        await conn.execute("SELECT set_config('application_name', $1, false)", name)
    except asyncpg.PostgresError:
        pass  # only a label for pg_stat_activity
    return conn, 0


async def _open_creating(url: str, name: str) -> tuple[asyncpg.Connection, int]:
    """A writing session; the tables are made first if the database holds
    none (``import`` onto a new database). The schema version made, or 0."""
    conn = await pg_schema.connect(url)
    made = 0
    async with pg_schema.closed_on_failure(conn, url):
        if not await pg_schema.applied(conn, url):
            made = max(await pg_schema.migrate(conn, url))
        await pg_schema.require_current(conn, url)
        await conn.execute("SELECT set_config('application_name', $1, false)", name)
    return conn, made


def connect(
    url: str, *, readonly: bool = False, create: bool = False, name: str = "nat64ho"
) -> PgConnection:
    """A session on ``url`` whose schema is current (pg_schema's errors
    otherwise). ``readonly``: it refuses every write. ``create``: make the
    tables in a database that has none (``created`` says which version)."""
    loop = asyncio.new_event_loop()
    try:
        if create:
            conn, made = loop.run_until_complete(_open_creating(url, name))
        else:
            conn, made = loop.run_until_complete(_open(url, readonly, name))
    except BaseException:
        loop.close()
        raise
    pg = PgConnection(url, conn, loop)
    pg.created = made
    return pg
