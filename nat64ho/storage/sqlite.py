"""Durable storage of the tables and the history in an SQLite file: the
backend of the group commit (:mod:`nat64ho.storage.commit`).

The writer is a process of its own (:mod:`nat64ho.storage.writer`), fed
rows already encoded, so SQLite's work does not share the event loop's core:
durability costs one fsync per group, not per entry. A connection reads (WAL
lets it run while the writer commits). It implements
:class:`nat64ho.storage.base.Storage` over plain records.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
from pathlib import Path

import aiosqlite

from nat64ho.core.records import Row
from nat64ho.errors import Fault
from nat64ho.sql import PRUNE_BATCH, PRUNE_EVENTS
from nat64ho.storage import schema
from nat64ho.storage.base import EventRow, checked_rows
from nat64ho.storage.commit import CLOSE_GIVE_UP, Group, GroupCommit, Recency
from nat64ho.storage.writer import CommitFailed, Writer, WriterLost

log = logging.getLogger("nat64ho.store")

#: SQLite page cache per connection, in KiB: the hot part of the indexes fits,
#: and the two connections stay well inside the server's memory budget.
PAGE_CACHE_KIB = 32 * 1024
#: Endpoints or ports read by one SELECT: SQLite joins at most 500 SELECTs
#: in a compound one, and a datagram of 65507 octets names up to 16376 ports.
READ_CHUNK = 250

_ROW = "SELECT port, addr, aport, created, last_use FROM entry"

#: SQLite result codes that mean the file itself is damaged (SQLITE_CORRUPT,
#: SQLITE_NOTADB): retrying cannot help, and writing on may spread the damage.
_DAMAGE_CODES = frozenset({11, 26})


class Store(GroupCommit):
    """The database of one server. Use :meth:`open`, then :meth:`close`."""

    LOST_WHAT = "lost its writer"

    def __init__(self, path: Path, writer: aiosqlite.Connection, reader: aiosqlite.Connection):
        super().__init__(path)
        #: Start-up's writes, set_meta and prune (rare, and SQLite's lock
        #: orders them with the writer process's commits).
        self._w = writer
        self._writer: Writer | None = None  #: the process that commits the groups
        self._r = reader

    # ------------------------------------------------------------ life
    @classmethod
    async def open(
        cls, path: Path | str, *, sync: str = "full", writer_fd: int | None = None
    ) -> Store:
        """Open (creating if missing) and migrate; raises schema.DatabaseError.
        ``writer_fd``: commit through a writer process started by a parent
        (``serve --workers``) rather than starting one."""
        path = Path(path)
        await asyncio.to_thread(lambda: schema.open_db(path, create=True).close())
        writer = await aiosqlite.connect(path, isolation_level=None)
        reader = await aiosqlite.connect(
            f"file:{path.as_posix()}?mode=ro", uri=True, isolation_level=None
        )
        for conn in (writer, reader):
            await conn.execute("PRAGMA trusted_schema = OFF")
            await conn.execute(f"PRAGMA busy_timeout = {schema.BUSY_TIMEOUT_MS}")
            await conn.execute(f"PRAGMA cache_size = -{PAGE_CACHE_KIB}")
        await writer.execute(f"PRAGMA synchronous = {'FULL' if sync == 'full' else 'NORMAL'}")
        # Read back rather than echo the option: what the connection really
        # does is what an operator (and the power-loss test) must see.
        [(journal,)] = await writer.execute_fetchall("PRAGMA journal_mode")
        [(level,)] = await writer.execute_fetchall("PRAGMA synchronous")
        log.info(
            "database %s: journal_mode=%s, synchronous=%s",
            path,
            journal,
            {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}.get(level, level),
        )
        self = cls(path, writer, reader)
        try:
            await self._load_meta()
            # Written once at start, so that a file this process cannot
            # write is refused now, not found out at the first HELLO.
            await writer.execute("BEGIN IMMEDIATE")
            await writer.execute("INSERT OR REPLACE INTO meta VALUES ('secret', ?)", (self.secret,))
            await writer.execute("COMMIT")
            self._writer = (
                await Writer.start(str(path), sync, PAGE_CACHE_KIB)
                if writer_fd is None
                else await Writer.attach(writer_fd)
            )
        except sqlite3.Error as exc:
            for conn in (writer, reader):
                try:
                    await conn.close()
                except sqlite3.Error:
                    pass
            full = " (its filesystem is full)" if schema._no_space(path) else ""
            raise schema.DatabaseUnwritable(
                f"{path}: cannot be written ({exc}){full}; serve needs to write its table"
            ) from None
        self._start()
        return self

    async def _load_meta(self) -> None:
        w = self._w
        meta = {str(k): v for k, v in await w.execute_fetchall("SELECT key, value FROM meta")}
        if meta.get("secret") is None:
            # Created once and kept with the table, so cookies survive restarts.
            meta["secret"] = os.urandom(32)
            await w.execute("INSERT INTO meta VALUES ('secret', ?)", (meta["secret"],))
        nats = await w.execute_fetchall("SELECT nat, boot_id, first_hello, last_hello FROM nat")
        # An index seek (event_ts): event times go on strictly after it.
        [(last_ts,)] = await w.execute_fetchall("SELECT max(ts) FROM event")
        self._loaded(meta, nats, last_ts)

    async def set_meta(self, key: str, value: str | bytes | int) -> None:
        """Record a server-wide value (e.g. the port range, for ``stats``)."""
        if self.meta.get(key) != value:
            await self._w.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))
            self.meta[key] = value

    async def _interrupt(self) -> None:
        """Abort the commit in flight (a stop that gives up on it)."""
        if self._writer is not None:
            await self._writer.kill()  # rolls back the group in flight

    async def _close_connections(self) -> None:
        if self._writer is not None:
            await self._writer.stop(CLOSE_GIVE_UP)
        for conn in (self._r, self._w):
            try:
                await asyncio.wait_for(conn.close(), CLOSE_GIVE_UP)
            except (TimeoutError, sqlite3.Error):
                pass

    # ------------------------------------------------------------ reads
    async def load_table(self, nat: int) -> tuple[list[int], int]:
        rows = await self._r.execute_fetchall("SELECT port FROM entry WHERE nat = ?", (nat,))
        ports = [r[0] for r in rows]
        for p in ports:
            if type(p) is not int or not 0 <= p <= 65535:
                raise schema.BadRow(
                    f"{self.path}: table entry, row (nat={nat}, port={p!r:.40}) "
                    f"does not decode: port holds {type(p).__name__}; run "
                    f"'nat64ho check --db {self.path}'"
                )
        return ports, len(ports)

    async def read_endpoints(self, nat: int, endpoints: list[tuple[bytes, int]]) -> list[Row]:
        # One point lookup per endpoint, joined: an OR of them makes SQLite
        # scan the NAT64's whole index range.
        out: list[Row] = []
        for i in range(0, len(endpoints), READ_CHUNK):
            chunk = endpoints[i : i + READ_CHUNK]
            sql = " UNION ALL ".join(
                [f"{_ROW} WHERE nat = ? AND addr = ? AND aport = ?"] * len(chunk)
            )
            args: list[object] = []
            for addr, aport in chunk:
                args += (nat, addr, aport)
            out += checked_rows(self.path, nat, await self._r.execute_fetchall(sql, args))
        return out

    async def read_ports(self, nat: int, ports: list[int]) -> list[Row]:
        out: list[Row] = []
        for i in range(0, len(ports), READ_CHUNK):
            chunk = ports[i : i + READ_CHUNK]
            marks = ",".join("?" * len(chunk))
            out += checked_rows(
                self.path,
                nat,
                await self._r.execute_fetchall(
                    f"{_ROW} WHERE nat = ? AND port IN ({marks})", (nat, *chunk)
                ),
            )
        return out

    async def read_oldest(
        self, nat: int, n: int, after: tuple[int, int] | None = None
    ) -> list[Row]:
        """The ``n`` entries of ``nat`` with the oldest saved last use, after ``after``."""
        if after is None:
            rows = await self._r.execute_fetchall(
                f"{_ROW} WHERE nat = ? ORDER BY last_use, port LIMIT ?", (nat, n)
            )
        else:
            rows = await self._r.execute_fetchall(
                f"{_ROW} WHERE nat = ? AND (last_use, port) > (?, ?) ORDER BY last_use, port LIMIT ?",
                (nat, *after, n),
            )
        return checked_rows(self.path, nat, rows)

    async def event_id(self, key: tuple[object, ...]) -> int | None:
        """The id of the history event (ts, kind, nat, port), if stored."""
        rows = list(
            await self._r.execute_fetchall(
                "SELECT id FROM event WHERE nat = ? AND port = ? AND ts = ? AND kind = ?",
                (key[2], key[3], key[0], key[1]),
            )
        )
        return rows[0][0] if rows else None

    async def read_events(self, after: int, n: int) -> list[EventRow]:
        """Up to ``n`` history rows (id, ts, kind, nat, port, addr, aport)
        with ids above ``after``, in id order."""
        rows = await self._r.execute_fetchall(
            "SELECT id, ts, kind, nat, port, addr, aport FROM event WHERE id > ? ORDER BY id LIMIT ?",
            (after, n),
        )
        return [tuple(r) for r in rows]

    # ------------------------------------------------------------ writes
    async def _probe(self) -> None:
        w = self._writer
        if w is not None and w.proc is not None and w.proc.poll() is not None:
            raise WriterLost(await w.why_lost())

    def _drop_session(self) -> None:
        pass  # the writer process is gone; close() reaps it

    def classify(self, exc: BaseException) -> Fault | None:
        if isinstance(exc, WriterLost):
            return Fault.LOST
        if not isinstance(exc, sqlite3.Error):
            return None
        if (getattr(exc, "sqlite_errorcode", 0) or 0) & 0xFF in _DAMAGE_CODES:
            return Fault.DAMAGED
        if isinstance(exc, sqlite3.IntegrityError) or (
            isinstance(exc, CommitFailed) and exc.integrity
        ):
            # A decision broke a constraint: a bug, which retrying would only
            # repeat while nothing else commits.
            return Fault.REFUSED
        return Fault.RETRY  # a busy or full disk

    async def _commit_group(self, group: Group, recency: Recency, hwm: int | None) -> float:
        # Plain tuples of ints and bytes: what marshal carries to the writer.
        events = [(e[0], int(e[1]), e[2], e[3], e[4], e[5]) for e in group.events]
        nats = [(nat, boot, wall, wall) for nat, (boot, wall) in group.nats.items()]
        assert self._writer is not None  # started by open()
        # BEGIN to COMMIT, as the writer timed it.
        return await self._writer.commit((group.entries, recency, events, nats, hwm))

    async def _prune_some(self, before: int) -> int:
        cur = await self._w.execute(PRUNE_EVENTS, (before, PRUNE_BATCH))
        return cur.rowcount
