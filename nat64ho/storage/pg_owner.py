"""Who owns a table on PostgreSQL: the session holding the advisory lock
``pg_schema.OWNER_LOCK``. PostgreSQL drops it when the session ends (its
process killed, its connection terminated, its host silent past the TCP
keepalives), so no stale lock survives; the holder is named from
``pg_stat_activity`` by the application_name it set."""

from __future__ import annotations

import asyncpg

from nat64ho.storage.owner import TableOwned
from nat64ho.storage.pg_schema import OWNER_LOCK
from nat64ho.storage.schema import shown

#: pg_locks shows a bigint advisory key as its two 32-bit halves.
KEY_HALVES = (OWNER_LOCK >> 32, OWNER_LOCK & 0xFFFF_FFFF)

#: The holder of the owner lock, if any, for :func:`described`; arguments KEY_HALVES.
HOLDER_SQL = (
    "SELECT l.pid, a.application_name, host(a.client_addr), a.backend_start::text "
    "FROM pg_locks AS l LEFT JOIN pg_stat_activity AS a ON a.pid = l.pid "
    "WHERE l.locktype = 'advisory' AND l.granted AND l.database = "
    "(SELECT oid FROM pg_database WHERE datname = current_database()) "
    "AND l.classid = $1 AND l.objid = $2 AND l.objsubid = 1 LIMIT 1"
)


def described(row: tuple[object, ...] | None) -> str:
    """A row of HOLDER_SQL in words: the server's own name for itself
    (``nat64ho serve pid N on HOST``), where from, which backend, since when."""
    if row is None:
        return "another session (it has just gone)"
    pid, name, client, since = row
    where = f"from {client}" if client else "on a local socket"
    when = f", connected {str(since)[:19]}" if since else ""
    return f"{name or 'a session without a name'} ({where}, PostgreSQL backend {pid}{when})"


def owned(url: str, who: str, what: str) -> TableOwned:
    """The refusal of a command that needs the table alone."""
    err = TableOwned(f"{shown(url)}: the table is owned by {who}; {what} needs it alone")
    err.holder = who
    return err


async def try_acquire(conn: asyncpg.Connection, url: str, *, what: str = "nat64ho") -> None:
    """Take the table for ``conn``'s session (until it ends), or raise
    :class:`TableOwned` naming the holder."""
    if await conn.fetchval("SELECT pg_try_advisory_lock($1)", OWNER_LOCK):
        return
    raise owned(url, described(await conn.fetchrow(HOLDER_SQL, *KEY_HALVES)), what)
