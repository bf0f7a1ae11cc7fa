"""The server's tables on PostgreSQL, through asyncpg: a backend of the group
commit (:mod:`nat64ho.storage.commit`), over one writer session that also
holds the table's ownership lock, and a small pool of read-only sessions.

The writer session is the owner: if it ends (terminated, its server gone,
the network cut), the lock is gone with it and a standby may already be
writing, so this store stops at once and commits nothing more.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from typing import cast

import asyncpg

from nat64ho.core.records import Row
from nat64ho.errors import Fault
from nat64ho.sql import PRUNE_BATCH, PRUNE_EVENTS, numbered
from nat64ho.sql import UPSERT_ENTRY as _UPSERT_ENTRY
from nat64ho.storage import pg_schema, schema
from nat64ho.storage.base import EventRow, checked_rows
from nat64ho.storage.commit import CLOSE_GIVE_UP, Group, GroupCommit, Recency
from nat64ho.storage.schema import shown

log = logging.getLogger("nat64ho.store")

#: Read-only sessions for reads: the server reads for up to this many NAT64s
#: at once (daemon.protocol.READERS), each read one round trip.
READ_SESSIONS = 4
#: The writer session is checked this often while no commit ran: a session
#: that ended is found within about this long even when nothing is written.
HEARTBEAT = 1.0
#: A heartbeat that gets no answer in this long means the database or the
#: way to it is gone. Shorter than the 11 s after which PostgreSQL's
#: keepalives end a silent server's session: a cut-off server stops serving
#: (and unbinds its address) before a standby can take the table.
HEARTBEAT_TIMEOUT = 5.0
#: The same for one statement of a commit (a commit may wait for a slow
#: fsync a little longer than a heartbeat), still under those 11 s.
STATEMENT_TIMEOUT = 8.0

#: TCP keepalives of every session, both ends (ignored on a Unix socket): a
#: dead peer is noticed within idle + interval × count = 11 s, and unacknowledged
#: data within TCP_USER_TIMEOUT. The server's side is what frees the lock of a
#: dead host's session, letting a standby take over.
KEEPALIVE_IDLE = 5
KEEPALIVE_INTERVAL = 2
KEEPALIVE_COUNT = 3
TCP_USER_TIMEOUT_MS = 11_000
_SERVER_KEEPALIVES = {
    "tcp_keepalives_idle": str(KEEPALIVE_IDLE),
    "tcp_keepalives_interval": str(KEEPALIVE_INTERVAL),
    "tcp_keepalives_count": str(KEEPALIVE_COUNT),
    "tcp_user_timeout": str(TCP_USER_TIMEOUT_MS),
}

_UPSERT_ENTRIES = (
    "INSERT INTO entry (nat, port, addr, aport, created, last_use) "
    "SELECT * FROM unnest($1::bigint[], $2::int[], $3::bytea[], $4::int[], $5::bigint[], "
    "$6::bigint[]) "
    "ON CONFLICT (nat, port) DO UPDATE SET addr = excluded.addr, aport = excluded.aport, "
    "created = excluded.created, last_use = excluded.last_use"
)
_UPSERT_ENTRY_EACH = numbered(_UPSERT_ENTRY)
_UPDATE_RECENCY = (
    "UPDATE entry SET last_use = u.last_use "
    "FROM unnest($1::bigint[], $2::bigint[], $3::int[]) AS u(last_use, nat, port) "
    "WHERE entry.nat = u.nat AND entry.port = u.port"
)
# Ordered by the list's order, so that ids follow the order events were logged.
_INSERT_EVENTS = (
    "INSERT INTO event (ts, kind, nat, port, addr, aport) "
    "SELECT ts, kind, nat, port, addr, aport FROM unnest($1::bigint[], $2::smallint[], "
    "$3::bigint[], $4::int[], $5::bytea[], $6::int[]) WITH ORDINALITY "
    "AS e(ts, kind, nat, port, addr, aport, n) ORDER BY n "
    "ON CONFLICT DO NOTHING"
)
_UPSERT_NATS = (
    "INSERT INTO nat (nat, boot_id, first_hello, last_hello) "
    "SELECT n, b, w, w FROM unnest($1::bigint[], $2::bytea[], $3::bigint[]) AS u(n, b, w) "
    "ON CONFLICT (nat) DO UPDATE SET boot_id = excluded.boot_id, last_hello = excluded.last_hello"
)
_SET_META = (
    "INSERT INTO meta (key, value) VALUES ($1, $2) "
    "ON CONFLICT (key) DO UPDATE SET value = excluded.value"
)
_ROW = "SELECT port, addr, aport, created, last_use FROM entry"
_PRUNE_EVENTS = numbered(PRUNE_EVENTS)


class SessionLost(Exception):
    """The writer session ended: ownership is gone with it."""


def _lost(exc: BaseException) -> bool:
    """Whether ``exc`` means the session is gone (not a refused statement)."""
    return isinstance(
        exc,
        (
            SessionLost,
            OSError,
            TimeoutError,
            asyncpg.InterfaceError,
            asyncpg.InternalClientError,  # the protocol broken off mid-message
            asyncpg.ConnectionDoesNotExistError,
            asyncpg.AdminShutdownError,
            asyncpg.CrashShutdownError,
            asyncpg.CannotConnectNowError,
        ),
    )


#: SQLSTATE classes worth retrying in the same session: serialization
#: (40), insufficient resources such as a full disk (53), lock waits (55P03)
#: and a statement_timeout (57014).
_TRANSIENT = ("40", "53", "55P03", "57014")


def _transient(exc: BaseException) -> bool:
    state = getattr(exc, "sqlstate", None) or ""
    return isinstance(exc, asyncpg.PostgresError) and state.startswith(_TRANSIENT)


def app_name(what: str = "serve", pid: int | None = None) -> str:
    """The session's application_name, which names it to a refused peer
    (PostgreSQL keeps 63 octets of it)."""
    return f"nat64ho {what} pid {pid or os.getpid()} on {socket.gethostname()}"[:63]


def set_keepalives(conn: asyncpg.Connection) -> None:
    """TCP keepalives on this end of ``conn`` (asyncpg has no option for it)."""
    transport = getattr(conn, "_transport", None)
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (
        ("TCP_KEEPIDLE", KEEPALIVE_IDLE),
        ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL),
        ("TCP_KEEPCNT", KEEPALIVE_COUNT),
        ("TCP_USER_TIMEOUT", TCP_USER_TIMEOUT_MS),
    ):
        if hasattr(socket, name):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


def _settings(what: str, readonly: bool = False) -> dict[str, str]:
    """A server session's settings: its name, keepalives, and for reads a
    session that refuses every write."""
    settings = {"application_name": app_name(what), **_SERVER_KEEPALIVES}
    if readonly:
        settings["default_transaction_read_only"] = "on"
    return settings


async def connect(url: str, *, what: str = "serve") -> asyncpg.Connection:
    """A server's writer session: named, with keepalives both ways."""
    conn = await pg_schema.connect(url, server_settings=_settings(what))
    set_keepalives(conn)
    return conn


def _meta_value(key: str, value: bytes) -> object:
    """A meta value as the SQLite store holds it: the secret as octets,
    clock_hwm as an integer, the rest as text."""
    if key == "secret":
        return bytes(value)
    text = bytes(value).decode("utf-8", "replace")
    if key == "clock_hwm":
        return int(text)
    return text


def _meta_octets(value: str | bytes | int) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


class PgStore(GroupCommit):
    """The database of one server on PostgreSQL. Open it with a session
    that holds the owner lock (:mod:`nat64ho.storage.pg_owner`)."""

    LOST_WHAT = "lost its PostgreSQL session, and with it the table"
    #: No wait between commits: a commit costs this process one round trip,
    #: not a writer's CPU, and waiting only lengthens a batch-1 answer.
    COMMIT_GAP = 0.0

    def __init__(self, url: str, writer: asyncpg.Connection, reader: asyncpg.Pool):
        super().__init__(shown(url))
        self.url = url
        self._w = writer
        self._pool = reader
        self._wlock = asyncio.Lock()  # one statement at a time on the writer
        self._last_ok = self._loop.time()

    @classmethod
    async def open(cls, url: str, *, writer: asyncpg.Connection) -> PgStore:
        """The store over ``writer`` (migrated, holding the owner lock)."""
        try:
            # Checked here too: whoever migrated may have let a refusal pass
            # (a standby retrying over the same session), and a newer or
            # foreign schema must never be served.
            await pg_schema.require_current(writer, url)
        except asyncpg.PostgresError as exc:
            raise schema.DatabaseError(f"{shown(url)}: {exc}") from None
        try:
            pool = await asyncpg.create_pool(
                dsn=url,
                min_size=1,
                max_size=READ_SESSIONS,
                timeout=pg_schema.CONNECT_TIMEOUT,
                server_settings=_settings("serve reader", readonly=True),
                init=_init_reader,
            )
        except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
            raise schema.DatabaseError(f"{shown(url)}: cannot open read sessions ({exc})") from None
        self = cls(url, writer, pool)
        try:
            await self._load_meta()
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
            await pool.close()
            raise schema.DatabaseUnwritable(
                f"{self.path}: cannot be written ({exc}); serve needs to write its table"
            ) from None
        log.info("database %s: PostgreSQL %s", self.path, _version(writer))
        writer.add_termination_listener(self._terminated)
        self._start()
        return self

    async def _load_meta(self) -> None:
        w = self._w
        async with w.transaction():
            rows = {
                r["key"]: bytes(r["value"]) for r in await w.fetch("SELECT key, value FROM meta")
            }
            if "secret" not in rows:
                # Created once and kept with the table: cookies survive a
                # restart, and a standby that takes over accepts them.
                rows["secret"] = os.urandom(32)
            # Written at start, so that a session that cannot write is
            # refused now, not found out at the first HELLO.
            await w.execute(_SET_META, "secret", rows["secret"])
            nats = await w.fetch("SELECT nat, boot_id, first_hello, last_hello FROM nat")
            last_ts = await w.fetchval("SELECT max(ts) FROM event")
        self._loaded({k: _meta_value(k, v) for k, v in rows.items()}, nats, last_ts)

    async def set_meta(self, key: str, value: str | bytes | int) -> None:
        if self.meta.get(key) != value:
            async with self._wlock:
                await self._w.execute(_SET_META, key, _meta_octets(value))
            self.meta[key] = value

    # ------------------------------------------------------------ the session
    def _terminated(self, _conn: object) -> None:
        self.damage(SessionLost("the connection closed"), Fault.LOST)

    async def _probe(self) -> None:
        if self._loop.time() - self._last_ok < HEARTBEAT:
            return  # a commit just answered
        try:
            async with self._wlock:
                await self._w.fetchval("SELECT 1", timeout=HEARTBEAT_TIMEOUT)
        except asyncpg.PostgresError as exc:
            raise SessionLost(str(exc)) from exc
        self._last_ok = self._loop.time()

    def _drop_session(self) -> None:
        # Whatever waits on the session fails now rather than at its timeout.
        self._w.remove_termination_listener(self._terminated)
        self._w.terminate()

    def classify(self, exc: BaseException) -> Fault | None:
        if _lost(exc):
            return Fault.LOST
        if isinstance(exc, asyncpg.IntegrityConstraintViolationError):
            # A decision broke a constraint: a bug, which retrying would
            # only repeat while nothing else commits.
            return Fault.REFUSED
        if _transient(exc):
            return Fault.RETRY
        return Fault.DAMAGED if isinstance(exc, asyncpg.PostgresError) else None

    async def _interrupt(self) -> None:
        self._drop_session()  # our own doing: no lost session to report

    async def _close_connections(self) -> None:
        self._w.remove_termination_listener(self._terminated)
        for close in (self._pool.close, self._w.close):
            try:
                await asyncio.wait_for(close(), CLOSE_GIVE_UP)
            except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                pass
        self._pool.terminate()
        self._w.terminate()

    # ------------------------------------------------------------ reads
    async def load_table(self, nat: int) -> tuple[list[int], int]:
        ports = [r[0] for r in await self._pool.fetch("SELECT port FROM entry WHERE nat = $1", nat)]
        return ports, len(ports)

    async def read_endpoints(self, nat: int, endpoints: list[tuple[bytes, int]]) -> list[Row]:
        rows = await self._pool.fetch(
            f"{_ROW} WHERE nat = $1 AND (addr, aport) IN "
            "(SELECT * FROM unnest($2::bytea[], $3::int[]))",
            nat,
            [a for a, _ in endpoints],
            [p for _, p in endpoints],
        )
        return checked_rows(self.path, nat, rows)

    async def read_ports(self, nat: int, ports: list[int]) -> list[Row]:
        rows = await self._pool.fetch(
            f"{_ROW} WHERE nat = $1 AND port = ANY($2::int[])", nat, ports
        )
        return checked_rows(self.path, nat, rows)

    async def read_oldest(
        self, nat: int, n: int, after: tuple[int, int] | None = None
    ) -> list[Row]:
        if after is None:
            rows = await self._pool.fetch(
                f"{_ROW} WHERE nat = $1 ORDER BY last_use, port LIMIT $2", nat, n
            )
        else:
            rows = await self._pool.fetch(
                f"{_ROW} WHERE nat = $1 AND (last_use, port) > ($2, $3) "
                "ORDER BY last_use, port LIMIT $4",
                nat,
                *after,
                n,
            )
        return checked_rows(self.path, nat, rows)

    async def event_id(self, key: tuple[object, ...]) -> int | None:
        found = await self._pool.fetchval(
            "SELECT id FROM event WHERE nat = $1 AND port = $2 AND ts = $3 AND kind = $4",
            key[2],
            key[3],
            key[0],
            key[1],
        )
        return cast(int | None, found)

    async def read_events(self, after: int, n: int) -> list[EventRow]:
        rows = await self._pool.fetch(
            "SELECT id, ts, kind, nat, port, addr, aport FROM event WHERE id > $1 "
            "ORDER BY id LIMIT $2",
            after,
            n,
        )
        return [tuple(r) for r in rows]

    # ------------------------------------------------------------ writes
    async def _commit_group(self, group: Group, recency: Recency, hwm: int | None) -> float:
        async with self._wlock:
            return await self._commit_locked(group, recency, hwm)

    async def _commit_locked(self, group: Group, recency: Recency, hwm: int | None) -> float:
        w = self._w
        start = self._loop.time()
        entries = group.entries
        t = STATEMENT_TIMEOUT
        # BEGIN and COMMIT as statements, each with its timeout: a transaction
        # block would roll back on a dead session without one.
        await w.execute("BEGIN", timeout=t)
        try:
            if entries:
                if len({(e[0], e[1]) for e in entries}) == len(entries):
                    await w.execute(
                        _UPSERT_ENTRIES, *map(list, zip(*entries, strict=True)), timeout=t
                    )
                else:
                    # A port given twice in one group: one statement may not
                    # change a row twice, so row by row, in order.
                    await w.executemany(_UPSERT_ENTRY_EACH, entries, timeout=t)
            if recency:
                await w.execute(_UPDATE_RECENCY, *map(list, zip(*recency, strict=True)), timeout=t)
            if group.events:
                cols = list(map(list, zip(*group.events, strict=True)))
                cols[1] = [int(k) for k in cols[1]]
                await w.execute(_INSERT_EVENTS, *cols, timeout=t)
            if group.nats:
                await w.execute(
                    _UPSERT_NATS,
                    list(group.nats),
                    [b for b, _ in group.nats.values()],
                    [wall for _, wall in group.nats.values()],
                    timeout=t,
                )
            if hwm is not None:
                await w.execute(_SET_META, "clock_hwm", _meta_octets(hwm), timeout=t)
            await w.execute("COMMIT", timeout=t)
        except Exception as exc:
            if not _lost(exc) and not w.is_closed():
                # A refused statement: end the transaction, so that a retry
                # starts clean. A session that cannot even do that is lost.
                try:
                    await w.execute("ROLLBACK", timeout=HEARTBEAT_TIMEOUT)
                except Exception as again:
                    raise again from exc
            raise
        self._last_ok = self._loop.time()
        return self._last_ok - start

    async def _prune_some(self, before: int) -> int:
        async with self._wlock:
            status = await self._w.execute(_PRUNE_EVENTS, before, PRUNE_BATCH)
        return int(status.split()[-1])


async def _init_reader(conn: asyncpg.Connection) -> None:
    set_keepalives(conn)


def _version(conn: asyncpg.Connection) -> str:
    return str(conn.get_settings().server_version)
