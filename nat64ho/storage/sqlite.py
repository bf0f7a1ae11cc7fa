"""Durable storage of the tables and the history, through aiosqlite.

One writer commits in groups: every change decided while the previous
commit was on disk goes into the next transaction, so durability costs one
fsync per batch, not per entry. The writer is a process of its own
(:mod:`nat64ho.storage.writer`), fed rows already encoded, so SQLite's work
does not share the event loop's core. A connection reads (WAL lets it run
while the writer commits). Callers learn when a batch is durable by
awaiting :meth:`Store.wait`, and take each committed batch (its answers and
events) from :meth:`Store.commits`; nothing here decides what to write. It
implements :class:`nat64ho.storage.base.Storage` over plain records.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path

import aiosqlite

from nat64ho.core.records import Event, NewEntry, Row
from nat64ho.errors import DatabaseDamaged as DatabaseDamaged
from nat64ho.errors import Fault
from nat64ho.sql import PRUNE_BATCH, PRUNE_EVENTS
from nat64ho.storage import schema
from nat64ho.storage.base import RECENCY_INTERVAL as RECENCY_INTERVAL
from nat64ho.storage.base import NatRecord
from nat64ho.storage.writer import CommitFailed, Writer, WriterLost

log = logging.getLogger("nat64ho.store")

#: Longest wait between retries of a failed commit (disk full, locked).
MAX_RETRY_DELAY = 2.0
#: SQLite page cache per connection, in KiB: the hot part of the indexes fits,
#: and the two connections stay well inside the server's memory budget.
PAGE_CACHE_KIB = 32 * 1024
#: Shortest time from the start of one commit to the start of the next.
#: Each commit costs the server's processes about 0.3 ms of CPU however few
#: rows it holds; waiting this long groups the rows of a few milliseconds
#: (at 3,000 creates/s: 12 per commit instead of 3) for at most this much
#: latency, well inside the 10 ms a new entry may take.
MIN_COMMIT_GAP = 0.004
#: Seconds a stop keeps retrying failing commits before it gives up on them.
CLOSE_GIVE_UP = 5.0
#: Endpoints or ports read by one SELECT: SQLite joins at most 500 SELECTs
#: in a compound one, and a datagram of 65507 octets names up to 16376 ports.
READ_CHUNK = 250

_ROW = "SELECT port, addr, aport, created, last_use FROM entry"

#: SQLite result codes that mean the file itself is damaged (SQLITE_CORRUPT,
#: SQLITE_NOTADB): retrying cannot help, and writing on may spread the damage.
_DAMAGE_CODES = frozenset({11, 26})


def is_damage(exc: BaseException) -> bool:
    """Whether ``exc`` says the database file is damaged."""
    return (
        isinstance(exc, sqlite3.DatabaseError)
        and (getattr(exc, "sqlite_errorcode", 0) or 0) & 0xFF in _DAMAGE_CODES
    )


class Batch:
    """Changes that will commit together, and what waits for them."""

    __slots__ = (
        "seq",
        "entries",
        "events",
        "nats",
        "done",
        "answers",
        "rows_by_nat",
        "rows",
        "seconds",
        "recency",
    )

    def __init__(self, seq: int, loop: asyncio.AbstractEventLoop):
        self.seq = seq
        #: New entries: (nat, port, addr, aport, created, last_use).
        self.entries: list[tuple[int, int, bytes, int, int, int]] = []
        self.events: list[Event] = []
        self.nats: dict[int, tuple[bytes, int]] = {}
        self.done: asyncio.Future = loop.create_future()
        #: Answers that may leave once this batch is durable: (NAT64, units,
        #: address). They live here rather than in a task each.
        self.answers: list[tuple[int, list, tuple]] = []
        #: Rows (entries and events) each NAT64 added, for its share (§7).
        self.rows_by_nat: dict[int, int] = {}
        self.rows = 0  #: rows written by its commit, recency included
        self.seconds = 0.0  #: time from BEGIN to COMMIT
        #: Recency its commit saved: (last_use, nat, port).
        self.recency: list[tuple[int, int, int]] = []

    def __bool__(self) -> bool:
        return bool(self.entries or self.events or self.nats)


class Store:
    """The database of one server. Use :meth:`open`, then :meth:`close`."""

    lost: str | None = None  #: a file has no session to lose (PostgreSQL's has)

    def __init__(self, path: Path, writer: aiosqlite.Connection, reader: aiosqlite.Connection):
        self.path = path
        #: Start-up's writes, set_meta and prune (rare, and SQLite's lock
        #: orders them with the writer process's commits).
        self._w = writer
        self._writer: Writer | None = None  #: the process that commits the groups
        self._last_commit = 0.0  #: loop time the last commit started
        self._r = reader
        self.secret = b""
        self.meta: dict[str, object] = {}
        self.clock_hwm = 0
        self.last_event_ts = 0  #: the newest event time in the history
        self.nats: dict[int, NatRecord] = {}
        self._loop = asyncio.get_running_loop()
        self.committed_seq = 0
        self._batch = Batch(1, self._loop)
        self._inflight: Batch | None = None
        #: Unsaved recency: nat -> port -> last use, written at least every RECENCY_INTERVAL.
        self._recency: dict[int, dict[int, int]] = {}
        #: Committed batches not yet taken by :meth:`commits` (None: no more).
        self._committed: asyncio.Queue[Batch | None] = asyncio.Queue()
        self._reading = False  #: commits() has a reader
        self._read_all = asyncio.Event()  #: ... who has taken the last one
        self._wake = asyncio.Event()
        self._recency_due = False
        self._closing = False
        self._flusher: asyncio.Task | None = None
        self._ticker: asyncio.Task | None = None
        self.failing: str | None = None  #: why the last commit failed, while it does
        self._commit_began: float | None = None  # loop time the commit in flight began
        self.damaged: str | None = None  #: set once the file is found damaged; never cleared
        #: Set once the file is found damaged: the server stops.
        self.damage_found = asyncio.Event()
        self.stats = {"commits": 0, "commit_failures": 0}  # for metrics

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
        self._flusher = asyncio.create_task(self._flush_loop(), name="nat64ho-flush")
        self._ticker = asyncio.create_task(self._tick(), name="nat64ho-recency")
        return self

    async def _load_meta(self) -> None:
        rows = self.meta = {
            str(k): v for k, v in await self._w.execute_fetchall("SELECT key, value FROM meta")
        }
        secret = rows.get("secret")
        if secret is None:
            # Created once and kept with the table, so cookies survive restarts.
            secret = os.urandom(32)
            await self._w.execute("INSERT INTO meta VALUES ('secret', ?)", (secret,))
        self.secret = bytes(secret)  # type: ignore[call-overload]  # a BLOB
        self.clock_hwm = int(rows.get("clock_hwm", 0))  # type: ignore[call-overload]
        for nat, boot_id, first, last in await self._w.execute_fetchall(
            "SELECT nat, boot_id, first_hello, last_hello FROM nat"
        ):
            self.nats[nat] = NatRecord(bytes(boot_id), first, last)
        # An index seek (event_ts): event times go on strictly after it.
        [(last_ts,)] = await self._w.execute_fetchall("SELECT max(ts) FROM event")
        self.last_event_ts = last_ts or 0

    async def set_meta(self, key: str, value: str | bytes | int) -> None:
        """Record a server-wide value (e.g. the port range, for ``stats``)."""
        if self.meta.get(key) != value:
            await self._w.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))
            self.meta[key] = value

    async def close(self, give_up: asyncio.Event | None = None) -> int:
        """Commit everything pending (recency included) and close. While
        commits fail, stop trying after CLOSE_GIVE_UP seconds, or when
        ``give_up`` is set; returns the changes left uncommitted (none of
        them was acknowledged: answers wait for their commit)."""
        self._closing = True
        self._recency_due = True
        self._wake.set()
        unsaved = 0
        if self._flusher is not None:
            start = self._loop.time()
            while not self._flusher.done():
                await asyncio.wait([self._flusher], timeout=0.1)
                failing_long = (
                    self.failing is not None and self._loop.time() - start >= CLOSE_GIVE_UP
                )
                if not self._flusher.done() and (failing_long or (give_up and give_up.is_set())):
                    unsaved = self.unsaved
                    self._flusher.cancel()
                    await self._interrupt()
                    break
        if self._ticker is not None:
            self._ticker.cancel()
        if self._reading:
            # The last commits' log lines and answers leave before close returns.
            try:
                await asyncio.wait_for(self._read_all.wait(), CLOSE_GIVE_UP)
            except TimeoutError:
                pass
        await self._close_connections()
        return unsaved

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

    @property
    def unsaved(self) -> int:
        """Changes decided but not committed: entries, events, HELLOs."""
        n = self.backlog + len(self._batch.nats)
        if self._inflight is not None:
            n += len(self._inflight.nats)
        return n

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

    def _rows(self, nat: int, rows) -> list[Row]:
        """Checked entry rows: a planted or damaged one is refused by name."""
        out = []
        for r in rows:
            if not schema.entry_ok((nat, *r)):
                raise schema.bad_entry(self.path, (nat, *r))
            out.append(Row(*r))
        return out

    async def read_endpoints(self, nat: int, endpoints: list[tuple[bytes, int]]) -> list[Row]:
        # One point lookup per endpoint, joined: an OR of them makes SQLite
        # scan the NAT64's whole index range.
        out: list[Row] = []
        for i in range(0, len(endpoints), READ_CHUNK):
            chunk = endpoints[i : i + READ_CHUNK]
            sql = " UNION ALL ".join(
                [f"{_ROW} WHERE nat = ? AND addr = ? AND aport = ?"] * len(chunk)
            )
            args: list = []
            for addr, aport in chunk:
                args += (nat, addr, aport)
            out += self._rows(nat, await self._r.execute_fetchall(sql, args))
        return out

    async def read_ports(self, nat: int, ports: list[int]) -> list[Row]:
        out: list[Row] = []
        for i in range(0, len(ports), READ_CHUNK):
            chunk = ports[i : i + READ_CHUNK]
            marks = ",".join("?" * len(chunk))
            out += self._rows(
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
        return self._rows(nat, rows)

    async def event_id(self, key: tuple) -> int | None:
        """The id of the history event (ts, kind, nat, port), if stored."""
        rows = list(
            await self._r.execute_fetchall(
                "SELECT id FROM event WHERE nat = ? AND port = ? AND ts = ? AND kind = ?",
                (key[2], key[3], key[0], key[1]),
            )
        )
        return rows[0][0] if rows else None

    async def read_events(self, after: int, n: int) -> list[tuple]:
        """Up to ``n`` history rows (id, ts, kind, nat, port, addr, aport)
        with ids above ``after``, in id order."""
        rows = await self._r.execute_fetchall(
            "SELECT id, ts, kind, nat, port, addr, aport FROM event WHERE id > ? ORDER BY id LIMIT ?",
            (after, n),
        )
        return [tuple(r) for r in rows]

    # ------------------------------------------------------------ writes
    @property
    def pending_seq(self) -> int:
        """The batch that changes made now will join."""
        return self._batch.seq

    @property
    def backlog(self) -> int:
        """Rows waiting to be committed (bounds memory while commits fail)."""
        b = self._batch
        n = len(b.entries) + len(b.events)
        if self._inflight is not None:
            n += len(self._inflight.entries) + len(self._inflight.events)
        return n

    def add(
        self,
        nat: int,
        created: Sequence[NewEntry],
        events: list[Event],
    ) -> int:
        """Queue changes of ``nat`` for the next commit: new entries and
        events. Returns how many rows they add to the commit."""
        b = self._batch
        recency = self._recency.get(nat)
        if recency is None:
            recency = self._recency[nat] = {}
        for r in created:
            b.entries.append((nat, r.port, r.addr, r.aport, r.created, r.last_use))
            # A port taken over: the last use of whoever held it is moot.
            recency.pop(r.port, None)
        b.events.extend(events)
        rows = len(created) + len(events)
        if rows:
            b.rows_by_nat[nat] = b.rows_by_nat.get(nat, 0) + rows
            self._wake.set()
        return rows

    def add_recency(self, recency: Mapping[int, list[tuple[int, int]]]) -> None:
        """Queue, per NAT64, (port, last use) of entries used: coalesced, and
        written with the next commit after :meth:`flush_recency_soon`."""
        for nat, pairs in recency.items():
            ports = self._recency.get(nat)
            if ports is None:
                ports = self._recency[nat] = {}
            ports.update(pairs)

    def add_boot(self, nat: int, boot_id: bytes, wall: int, event: Event | None) -> None:
        """Record a confirmed boot of ``nat`` (and its ``Initialized``)."""
        self._batch.nats[nat] = (boot_id, wall)
        if event is not None:
            self._batch.events.append(event)
        self._wake.set()

    def answer_after(self, seq: int, nat: int, units: list, addr: tuple) -> None:
        """Hand ``units`` to the commit callback once batch ``seq`` is durable."""
        b: Batch | None = self._batch
        if b is None or b.seq != seq:
            b = self._inflight
            if b is None or b.seq != seq:
                raise AssertionError(f"no batch {seq}")
        b.answers.append((nat, units, addr))

    def flush_recency_soon(self) -> None:
        self._recency_due = True
        self._wake.set()

    async def wait(self, seq: int) -> None:
        """Return once batch ``seq`` is committed."""
        if seq <= self.committed_seq:
            return
        if self.damaged is not None:
            raise DatabaseDamaged(self.damaged)
        for b in (self._inflight, self._batch):
            if b is not None and b.seq == seq:
                await asyncio.shield(b.done)
                return
        raise AssertionError(f"no batch {seq}")

    async def flushed(self) -> None:
        """Return once every change added so far is committed."""
        if self._batch:
            await self.wait(self._batch.seq)
        elif self._inflight is not None:
            await self.wait(self._inflight.seq)

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(RECENCY_INTERVAL)
            if self._recency:
                self.flush_recency_soon()
            w = self._writer
            if w is not None and w.proc is not None and w.proc.poll() is not None:
                # Dead while nothing was committing: stop now, not at the
                # next new entry.
                self.damage(WriterLost(await w.why_lost()), "lost its writer")

    async def _flush_loop(self) -> None:
        try:
            await self._flush_batches()
        finally:
            self._committed.put_nowait(None)  # commits() ends

    async def _flush_batches(self) -> None:
        while True:
            await self._wake.wait()
            gap = self._last_commit + MIN_COMMIT_GAP - self._loop.time()
            if gap > 0 and not self._closing:
                await asyncio.sleep(gap)
            self._wake.clear()
            batch = self._batch
            recency = self._take_recency() if self._recency_due else []
            if not batch and not recency:
                if self._closing:
                    return
                continue
            self._batch = Batch(batch.seq + 1, self._loop)
            self._inflight = batch
            try:
                await self._commit_until_done(batch, recency)
            except DatabaseDamaged as exc:
                # Nothing held commits now: its waiters fail, so no answer
                # announces what is not on disk.
                for b in (batch, self._batch):
                    b.done.set_exception(exc)
                    b.done.exception()  # retrieved: waiters may be gone
                return
            self._inflight = None
            batch.recency = recency
            self.committed_seq = batch.seq
            # Waiters wake only once the reader of commits() has taken it:
            # log lines and answers go out before anyone sees it durable.
            self._committed.put_nowait(batch)
            if self._batch or self._closing or self._recency_due:
                self._wake.set()

    def commit_running_for(self) -> float:
        """Seconds the commit in flight has run without an answer (0 when
        none runs): a writer process stopped or a hung disk shows here."""
        began = self._commit_began
        return 0.0 if began is None else self._loop.time() - began

    def _take_recency(self) -> list[tuple[int, int, int]]:
        self._recency_due = False
        rows = [
            (last_use, nat, port)
            for nat, ports in self._recency.items()
            for port, last_use in ports.items()
        ]
        self._recency = {}
        return rows

    async def commits(self) -> AsyncIterator[Batch]:
        """Each committed batch, in order, until the store closes; raises
        DatabaseDamaged once the file is found damaged. The batch's waiters
        wake when the next one is asked for."""
        self._reading = True
        try:
            while True:
                batch = await self._committed.get()
                if batch is None:
                    if self.damaged is not None:
                        raise DatabaseDamaged(self.damaged)
                    return
                try:
                    yield batch
                finally:
                    if not batch.done.done():
                        batch.done.set_result(None)
        finally:
            self._read_all.set()

    async def _commit_until_done(self, batch: Batch, recency: list) -> None:
        delay = 0.01
        while True:
            self._commit_began = self._loop.time()
            try:
                await self._commit(batch, recency)
            except Exception as exc:
                self._commit_began = None
                self.stats["commit_failures"] += 1
                if not self._retryable(exc):
                    raise DatabaseDamaged(self.damaged) from exc
                if self.failing != str(exc):
                    log.error(
                        "cannot commit to %s: %s; holding %d changes and retrying",
                        self.path,
                        exc,
                        len(batch.entries) + len(batch.events),
                    )
                self.failing = str(exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_RETRY_DELAY)
                continue
            self._commit_began = None
            if self.failing is not None:
                log.warning("commits to %s work again", self.path)
                self.failing = None
            return

    def _retryable(self, exc: Exception) -> bool:
        """Whether a failed commit is worth trying again (a busy or full
        disk); otherwise the store is given up on here (:meth:`damage`).
        What is not the database's error is a bug, raised as it is."""
        if isinstance(exc, WriterLost):
            self.damage(exc, "lost its writer")
            return False
        if not isinstance(exc, sqlite3.Error):
            raise exc
        if is_damage(exc):
            self.damage(exc)
            return False
        if isinstance(exc, sqlite3.IntegrityError) or (
            isinstance(exc, CommitFailed) and exc.integrity
        ):
            # A decision broke a constraint: a bug, which retrying would only
            # repeat while nothing else commits. Stop; a restart starts over
            # from what is on disk.
            self.damage(exc, "refused a change as inconsistent (a bug; please report)")
            return False
        return True

    def classify(self, exc: BaseException) -> Fault | None:
        """What ``exc`` from a read means for serving (nat64ho.errors)."""
        return Fault.DAMAGED if isinstance(exc, DatabaseDamaged) or is_damage(exc) else None

    def damage(self, exc: BaseException, what: str = "damaged while serving") -> None:
        """Record that ``exc`` found the file damaged (or a change it cannot
        take): stop committing, tell the server once."""
        if self.damaged is not None:
            return
        self.damaged = f"{self.path}: {what} ({exc})"
        self.failing = self.damaged
        log.critical(
            "%s; stopping without acknowledging anything more; run 'nat64ho check --db %s'",
            self.damaged,
            self.path,
        )
        self.damage_found.set()

    def _clock_after(self, batch: Batch, recency: list) -> int:
        """The newest last use once ``batch`` and ``recency`` are saved."""
        hwm = self.clock_hwm
        for e in batch.entries:
            if e[5] > hwm:
                hwm = e[5]
        for r in recency:
            if r[0] > hwm:
                hwm = r[0]
        return hwm

    async def _commit(self, batch: Batch, recency: list) -> None:
        self._last_commit = self._loop.time()
        hwm = self._clock_after(batch, recency)
        entries = batch.entries
        # Plain tuples of ints and bytes: what marshal carries to the writer.
        events = [(e[0], int(e[1]), e[2], e[3], e[4], e[5]) for e in batch.events]
        nats = [(nat, boot, wall, wall) for nat, (boot, wall) in batch.nats.items()]
        assert self._writer is not None  # started by open()
        seconds = await self._writer.commit(
            (entries, recency, events, nats, hwm if hwm > self.clock_hwm else None)
        )
        self.clock_hwm = hwm
        for nat, (boot, wall) in batch.nats.items():
            old = self.nats.get(nat)
            self.nats[nat] = NatRecord(boot, old.first_hello if old else wall, wall)
        rows = len(entries) + len(recency) + len(batch.events)
        self.stats["commits"] += 1
        batch.rows = rows
        batch.seconds = seconds  # BEGIN to COMMIT, as the writer timed it

    async def prune(self, before: int) -> int:
        """Delete history events older than ``before`` (µs), in small chunks."""
        total = 0
        while True:
            cur = await self._w.execute(PRUNE_EVENTS, (before, PRUNE_BATCH))
            total += cur.rowcount
            if cur.rowcount < PRUNE_BATCH:
                return total
            await asyncio.sleep(0)
