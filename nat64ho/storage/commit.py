"""The group commit every backend shares: what is decided while one commit is
on disk joins the next, in order, retried while the database allows it.

A backend (:mod:`.sqlite`, :mod:`.postgres`) only opens, commits one group,
reads, and tells what its exceptions mean (:meth:`GroupCommit.classify`).
The server learns that a group is durable by taking it, with its sequence
number, from :meth:`GroupCommit.commits`; nothing here holds a datagram.
"""

from __future__ import annotations

import abc
import asyncio
import logging
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

from nat64ho.core.records import Event, NewEntry
from nat64ho.errors import DatabaseDamaged, Fault
from nat64ho.storage.base import RECENCY_INTERVAL, NatRecord

log = logging.getLogger("nat64ho.store")

#: Longest wait between retries of a failed commit (disk full, locked).
MAX_RETRY_DELAY = 2.0
#: Shortest time from the start of one commit to the start of the next.
#: Each commit costs the server's processes about 0.3 ms of CPU however few
#: rows it holds; waiting this long groups the rows of a few milliseconds
#: for at most this much latency, well inside the 10 ms a new entry may take.
MIN_COMMIT_GAP = 0.004
#: Seconds a stop keeps retrying failing commits before it gives up on them.
CLOSE_GIVE_UP = 5.0

#: A new entry as a group holds it: (nat, port, addr, aport, created, last_use).
EntryRow = tuple[int, int, bytes, int, int, int]
#: Recency saved: (last_use, nat, port).
Recency = list[tuple[int, int, int]]

_WHAT: dict[Fault | None, str] = {
    Fault.DAMAGED: "damaged while serving",
    Fault.REFUSED: "refused a change as inconsistent (a bug; please report)",
    None: "could not commit for a reason not the database's (a bug; please report)",
}


class Group:
    """Changes that commit together; once durable, what the server is told."""

    __slots__ = ("seq", "entries", "events", "nats", "rows_by_nat", "rows", "seconds", "recency")

    def __init__(self, seq: int) -> None:
        self.seq = seq
        self.entries: list[EntryRow] = []
        self.events: list[Event] = []
        self.nats: dict[int, tuple[bytes, int]] = {}  #: confirmed boots: (boot id, wall µs)
        #: Rows (entries and events) each NAT64 added, for its share (§7).
        self.rows_by_nat: dict[int, int] = {}
        self.rows = 0  #: rows written by its commit, recency included
        self.seconds = 0.0  #: time from BEGIN to COMMIT
        self.recency: Recency = []  #: recency its commit saved

    def __bool__(self) -> bool:
        return bool(self.entries or self.events or self.nats)


class GroupCommit(abc.ABC):
    """Batches, ordering, retries, recency and the clock's high-water mark,
    failure and damage, over a backend's :meth:`_commit_group`."""

    #: What a lost connection to the database (Fault.LOST) is called.
    LOST_WHAT = "lost its database"
    #: Shortest time from the start of one commit to the start of the next.
    COMMIT_GAP = MIN_COMMIT_GAP

    def __init__(self, path: Path | str) -> None:
        self.path = path  #: where it lives, for messages
        self.secret = b""
        self.meta: dict[str, object] = {}
        self.clock_hwm = 0  #: newest last use ever saved (table clock, µs)
        self.last_event_ts = 0  #: the newest event time in the history
        self.nats: dict[int, NatRecord] = {}
        self._loop = asyncio.get_running_loop()
        self.committed_seq = 0
        self._group = Group(1)
        self._inflight: Group | None = None
        #: Unsaved recency: nat -> port -> last use, written at least every RECENCY_INTERVAL.
        self._recency: dict[int, dict[int, int]] = {}
        #: Committed groups not yet taken by :meth:`commits` (None: no more).
        self._committed: asyncio.Queue[Group | None] = asyncio.Queue()
        self._reading = False  #: commits() has a reader
        self._read_all = asyncio.Event()  #: ... who has taken the last one
        self._wake = asyncio.Event()
        self._recency_due = False
        self._closing = False
        self._last_commit = 0.0  #: loop time the last commit started
        self._commit_began: float | None = None  #: loop time the commit in flight began
        self._flusher: asyncio.Task[None] | None = None
        self._ticker: asyncio.Task[None] | None = None
        self.failing: str | None = None  #: why the last commit failed, while it does
        self.damaged: str | None = None  #: why it was given up on; never cleared
        self.lost: str | None = None  #: why the connection to the database ended, if it did
        self.damage_found = asyncio.Event()  #: set once given up on: the server stops
        self.stats = {"commits": 0, "commit_failures": 0}  # for metrics

    # ------------------------------------------------------------ the backend's part
    @abc.abstractmethod
    async def _commit_group(self, group: Group, recency: Recency, hwm: int | None) -> float:
        """Write ``group``, ``recency`` and the new clock high-water mark
        (None: unchanged) in one transaction; the seconds it took."""

    @abc.abstractmethod
    def classify(self, exc: BaseException) -> Fault | None:
        """What ``exc`` means for serving; None: not the database's error."""

    @abc.abstractmethod
    async def _probe(self) -> None:
        """Raise if the database is gone, found out while nothing commits."""

    @abc.abstractmethod
    async def _interrupt(self) -> None:
        """Abort the commit in flight (a stop that gives up on it)."""

    @abc.abstractmethod
    async def _close_connections(self) -> None: ...

    @abc.abstractmethod
    async def _prune_some(self, before: int) -> int:
        """Delete a chunk of the history events older than ``before``; how many."""

    @abc.abstractmethod
    def _drop_session(self) -> None:
        """The connection is lost: fail whatever waits on it now."""

    # ------------------------------------------------------------ life
    def _loaded(
        self,
        meta: dict[str, object],
        nats: Iterable[Sequence[Any]],
        last_event_ts: int | None,
    ) -> None:
        """Take the state read at start: ``meta`` (with the secret),
        (nat, boot_id, first_hello, last_hello) rows, the newest event time."""
        self.meta = meta
        self.secret = bytes(cast(bytes, meta["secret"]))
        self.clock_hwm = int(cast(int, meta.get("clock_hwm", 0)))
        self.nats = {nat: NatRecord(bytes(boot), first, last) for nat, boot, first, last in nats}
        self.last_event_ts = last_event_ts or 0

    def _start(self) -> None:
        """Start committing, once opened and loaded."""
        self._flusher = asyncio.create_task(self._flush_loop(), name="nat64ho-flush")
        self._ticker = asyncio.create_task(self._tick(), name="nat64ho-recency")

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

    @property
    def unsaved(self) -> int:
        """Changes decided but not committed: entries, events, HELLOs."""
        n = self.backlog + len(self._group.nats)
        if self._inflight is not None:
            n += len(self._inflight.nats)
        return n

    # ------------------------------------------------------------ writes
    @property
    def pending_seq(self) -> int:
        """The group that changes made now will join."""
        return self._group.seq

    @property
    def backlog(self) -> int:
        """Rows waiting to be committed (bounds memory while commits fail)."""
        g = self._group
        n = len(g.entries) + len(g.events)
        if self._inflight is not None:
            n += len(self._inflight.entries) + len(self._inflight.events)
        return n

    def add(self, nat: int, created: Sequence[NewEntry], events: list[Event]) -> int:
        """Queue changes of ``nat`` for the next commit: new entries and
        events. Returns how many rows they add to the commit."""
        g = self._group
        recency = self._recency.get(nat)
        if recency is None:
            recency = self._recency[nat] = {}
        for r in created:
            g.entries.append((nat, r.port, r.addr, r.aport, r.created, r.last_use))
            # A port taken over: the last use of whoever held it is moot.
            recency.pop(r.port, None)
        g.events.extend(events)
        rows = len(created) + len(events)
        if rows:
            g.rows_by_nat[nat] = g.rows_by_nat.get(nat, 0) + rows
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
        self._group.nats[nat] = (boot_id, wall)
        if event is not None:
            self._group.events.append(event)
        self._wake.set()

    def flush_recency_soon(self) -> None:
        self._recency_due = True
        self._wake.set()

    async def commits(self) -> AsyncIterator[Group]:
        """Each committed group, in order, until the store closes; raises
        DatabaseDamaged once it is given up on."""
        self._reading = True
        try:
            while (group := await self._committed.get()) is not None:
                yield group
            if self.damaged is not None:
                raise DatabaseDamaged(self.damaged)
        finally:
            self._read_all.set()

    async def prune(self, before: int) -> int:
        """Delete history events older than ``before`` (µs), in small chunks."""
        total = 0
        while n := await self._prune_some(before):
            total += n
            await asyncio.sleep(0)
        return total

    def commit_running_for(self) -> float:
        """Seconds the commit in flight has run without an answer (0 when
        none runs): a writer stopped or a hung disk shows here."""
        began = self._commit_began
        return 0.0 if began is None else self._loop.time() - began

    # ------------------------------------------------------------ the loop
    async def _tick(self) -> None:
        while self.damaged is None:
            await asyncio.sleep(RECENCY_INTERVAL)
            if self._recency:
                self.flush_recency_soon()
            try:
                # Gone while nothing was committing: stop now, not at the
                # next new entry.
                await self._probe()
            except Exception as exc:
                self._fatal(exc)

    async def _flush_loop(self) -> None:
        try:
            await self._flush_groups()
        except Exception as exc:
            # Stop as for damage: a server whose commits ended silently
            # would go on answering nothing.
            self.damage(exc, None)
            raise
        finally:
            self._committed.put_nowait(None)  # commits() ends

    async def _flush_groups(self) -> None:
        while True:
            await self._wake.wait()
            gap = self._last_commit + self.COMMIT_GAP - self._loop.time()
            if gap > 0 and not self._closing:
                await asyncio.sleep(gap)
            self._wake.clear()
            group = self._group
            recency = self._take_recency() if self._recency_due else []
            if not group and not recency:
                if self._closing:
                    return
                continue
            self._group = Group(group.seq + 1)
            self._inflight = group
            if not await self._commit_until_done(group, recency):
                return  # nothing held commits now: no answer announces it
            self._inflight = None
            self.committed_seq = group.seq
            # Taken by the reader of commits(), who sends its answers.
            self._committed.put_nowait(group)
            if self._group or self._closing or self._recency_due:
                self._wake.set()

    def _take_recency(self) -> Recency:
        self._recency_due = False
        rows = [
            (last_use, nat, port)
            for nat, ports in self._recency.items()
            for port, last_use in ports.items()
        ]
        self._recency = {}
        return rows

    async def _commit_until_done(self, group: Group, recency: Recency) -> bool:
        """Commit ``group``, retrying while that may help; False once the
        store is given up on."""
        delay = 0.01
        hwm = max([self.clock_hwm, *(e[5] for e in group.entries), *(r[0] for r in recency)])
        while True:
            self._commit_began = self._last_commit = self._loop.time()
            try:
                seconds = await self._commit_group(
                    group, recency, hwm if hwm > self.clock_hwm else None
                )
            except Exception as exc:
                self._commit_began = None
                self.stats["commit_failures"] += 1
                if self._fatal(exc):
                    return False
                if self.failing != str(exc):
                    log.error(
                        "cannot commit to %s: %s; holding %d changes and retrying",
                        self.path,
                        exc,
                        len(group.entries) + len(group.events),
                    )
                self.failing = str(exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_RETRY_DELAY)
                continue
            break
        self._commit_began = None
        if self.failing is not None:
            log.warning("commits to %s work again", self.path)
            self.failing = None
        self.clock_hwm = hwm
        for nat, (boot, wall) in group.nats.items():
            old = self.nats.get(nat)
            self.nats[nat] = NatRecord(boot, old.first_hello if old else wall, wall)
        self.stats["commits"] += 1
        group.recency = recency
        group.rows = len(group.entries) + len(recency) + len(group.events)
        group.seconds = seconds
        return True

    def _fatal(self, exc: Exception) -> bool:
        """Whether ``exc`` ends the store (given up on here, :meth:`damage`)
        rather than being worth a retry. What is not the database's error
        is a bug, raised as it is."""
        fault = self.classify(exc)
        if fault is None:
            raise exc
        if fault is Fault.RETRY:
            return False
        self.damage(exc, fault)
        return True

    def damage(self, exc: BaseException, fault: Fault | None = Fault.DAMAGED) -> None:
        """Give up on the database for ``exc``: commit nothing more, tell
        the server once (:attr:`damage_found`). ``fault`` None: a bug."""
        if self.damaged is not None:
            return
        if fault is Fault.LOST:
            # Not damage: a table with an owner lock may have a new owner now.
            lost = "no answer in time" if isinstance(exc, TimeoutError) else str(exc)
            self.lost = lost or type(exc).__name__
            self.damaged = f"{self.path}: {self.LOST_WHAT} ({self.lost}); stopping, nothing more is acknowledged"
            self._drop_session()
        else:
            self.damaged = f"{self.path}: {_WHAT.get(fault, _WHAT[Fault.DAMAGED])} ({exc})"
            log.critical(
                "%s; stopping without acknowledging anything more; run 'nat64ho check --db %s'",
                self.damaged,
                self.path,
            )
        self.failing = self.damaged
        self.damage_found.set()
