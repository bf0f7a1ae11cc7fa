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

# pg_locks shows a bigint advisory key as its two 32-bit halves.
_HOLDER = (
    "SELECT a.application_name, a.client_addr::text, a.pid, a.backend_start::text "
    "FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
    "WHERE l.locktype = 'advisory' AND l.granted AND l.database = "
    "(SELECT oid FROM pg_database WHERE datname = current_database()) "
    "AND l.classid = $1 AND l.objid = $2 AND l.objsubid = 1"
)


async def holder(conn: asyncpg.Connection) -> str | None:
    """Who holds the owner lock, in words; None when nobody does."""
    high, low = OWNER_LOCK >> 32, OWNER_LOCK & 0xFFFFFFFF
    row = await conn.fetchrow(_HOLDER, high, low)
    if row is None:
        return None
    name, addr, pid, since = row
    who = name or "a session without a name"
    where = f"from {addr}, " if addr else ""
    return f"{who} ({where}PostgreSQL backend {pid}, connected {since[:19]})"


async def try_acquire(conn: asyncpg.Connection, url: str, *, what: str = "nat64ho") -> None:
    """Take the table for ``conn``'s session (until it ends or
    :func:`release`), or raise :class:`TableOwned` naming the holder."""
    if await conn.fetchval("SELECT pg_try_advisory_lock($1)", OWNER_LOCK):
        return
    who = await holder(conn) or "another session (it has just gone)"
    err = TableOwned(f"{shown(url)}: the table is owned by {who}; {what} needs it alone")
    err.holder = who
    raise err


async def release(conn: asyncpg.Connection) -> None:
    await conn.execute("SELECT pg_advisory_unlock($1)", OWNER_LOCK)
