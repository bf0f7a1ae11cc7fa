"""All NAT64 tables of one server: their shares, their datagrams waiting for
reads (served round-robin), the read cursors, and the cache budget.

Pure, like :mod:`nat64ho.core.table`. It keeps the three consistency rules
that table.py relies on: an entry not yet committed or with unsaved recency
stays in memory (:meth:`Tables.trim`); no entry of a NAT64 leaves memory
while a read for it is in flight (:class:`Reading`); rows read for a port
memory already holds are ignored (:meth:`NatTable.feed`).
"""

from __future__ import annotations

import heapq
import random
from collections import deque
from collections.abc import Callable, Iterable

from nat64ho.core import wire
from nat64ho.core.records import Row
from nat64ho.core.session import Bucket, Confirmation, Share
from nat64ho.core.table import NatTable, Needs, Outcome

#: Pages of LRU candidates read for one datagram before giving up.
MAX_VICTIM_PAGES = 64

#: A datagram waiting for reads: (body, address, confirmation).
Waiting = tuple[list[wire.Message], tuple[str, int], Confirmation | None]


class NatState:
    """What the server holds of one confirmed NAT64: its table (a cache of
    the database), its create rate, its share (§7) and its datagrams
    waiting for reads, decided in arrival order."""

    __slots__ = ("nat", "table", "create", "share", "queue", "busy")

    def __init__(self, nat: int, table: NatTable, create: Bucket, share: Share):
        self.nat = nat
        self.table = table
        self.create = create
        self.share = share
        self.queue: deque[Waiting] = deque()
        self.busy = False  #: in the round-robin, or one of its datagrams is being read for


class Reading:
    """The reads for one datagram: ask :meth:`next` what to read, hand the
    rows to :meth:`fill`, until :meth:`next` says None; then :meth:`close`.
    Remembers the endpoints found absent and where the LRU scan stopped."""

    __slots__ = ("table", "body", "absent", "after", "pages", "_needs", "_done")

    def __init__(self, table: NatTable, body: list[wire.Message]):
        self.table = table
        self.body = body
        self.absent: set[tuple[bytes, int]] = set()
        self.after: tuple[int, int] | None = None  #: (last_use, port) of the last candidate read
        self.pages = 0
        self._needs: Needs | None = None
        self._done = False
        table.readers += 1

    def next(self) -> Needs | None:
        """What to read next (``after``: read LRU victims after this
        (last_use, port)); None when the datagram can be decided."""
        if self._done:
            return None
        table = self.table
        needs = table.needs(self.body, self.absent)
        if needs is not None and needs.victims and self.after is None and table.candidates:
            last = table.candidates[next(reversed(table.candidates))]
            self.after = (last.last_use, last.port)
        self._needs = needs
        return needs

    def fill(self, rows: list[Row], candidates: list[Row]) -> None:
        """Take what was read for the last :meth:`next`: the entries found
        for its endpoints and ports, and the LRU candidates."""
        needs = self._needs
        assert needs is not None
        if needs.endpoints:
            self.absent.update(set(needs.endpoints) - {(r.addr, r.aport) for r in rows})
        if needs.victims:
            self.pages += 1
            if candidates:
                self.after = (candidates[-1].last_use, candidates[-1].port)
        self.table.feed(rows, candidates)
        if needs.victims and (not candidates or self.pages >= MAX_VICTIM_PAGES):
            self._done = True  # the database has no more: apply() answers TABLE_FULL

    def close(self) -> None:
        self.table.readers -= 1


class Tables:
    """The confirmed NAT64s and what they hold in memory."""

    def __init__(
        self,
        first_port: int,
        last_port: int,
        *,
        min_idle_us: int = 0,
        create_rate: float,
        request_rate: float,
        cache_size: int,
        rng: random.Random,
    ):
        self.first_port = first_port
        self.last_port = last_port
        self.min_idle_us = min_idle_us
        self.create_rate = create_rate
        self.request_rate = request_rate
        self.cache_size = cache_size
        self.rng = rng
        self.nats: dict[int, NatState] = {}
        #: NAT64s with datagrams waiting for reads, served in turn: one
        #: datagram of one NAT64, then the next NAT64 (§7: no NAT64's
        #: misses delay another's more than a turn).
        self.ready: deque[NatState] = deque()
        self.queued = 0  #: datagrams waiting for reads, all NAT64s
        self.cached = 0  #: entries held in memory, all NAT64s together

    def state(self, nat: int, now: int) -> NatState:
        """The state of a confirmed NAT64, made when first heard from."""
        state = self.nats.get(nat)
        if state is None:
            table = NatTable(
                nat,
                self.first_port,
                self.last_port,
                min_idle=self.min_idle_us,
                rng=random.Random(self.rng.getrandbits(128)),
            )
            state = NatState(
                nat, table, Bucket(self.create_rate, now), Share(self.request_rate, now)
            )
            self.nats[nat] = state
        return state

    def hit(self, state: NatState, body: list[wire.Message]) -> bool:
        """Whether ``body`` can be decided now, from memory, in its turn."""
        table = state.table
        return not state.queue and table.loaded and table.needs(body) is None

    # ------------------------------------------------------------ reads
    def enqueue(self, state: NatState, item: Waiting) -> None:
        state.queue.append(item)
        state.share.queued += 1
        self.queued += 1
        if not state.busy:
            state.busy = True
            self.ready.append(state)

    def next_ready(self) -> tuple[NatState, Waiting] | None:
        """The NAT64 next in turn and its oldest waiting datagram."""
        if not self.ready:
            return None
        state = self.ready.popleft()
        item = state.queue.popleft()
        state.share.queued -= 1
        self.queued -= 1
        return state, item

    def turn_done(self, state: NatState) -> None:
        """A datagram of ``state`` was decided (or failed): its next one
        waits for its next turn."""
        if state.queue:
            self.ready.append(state)
        else:
            state.busy = False

    def reading(self, state: NatState, body: list[wire.Message]) -> Reading:
        return Reading(state.table, body)

    # ------------------------------------------------------------ decisions
    def decide(
        self,
        state: NatState,
        body: list[wire.Message],
        now: int,
        stamp: Callable[[], int],
        seq: int,
        create_ok: bool,
        share_ok: bool,
    ) -> Outcome:
        out = state.table.apply(
            body, now, stamp, seq, state.create, create_ok=create_ok, share_ok=share_ok
        )
        created = out.created
        if created:
            # Storage gets values, never the live entries. Built whole: a
            # namedtuple's _replace takes 2.5 times as long.
            out = Outcome(
                out.units,
                out.events,
                [Row(e.port, e.addr, e.aport, e.created, e.last_use) for e in created],
                out.wait_seq,
                out.counts,
            )
        return out

    # ------------------------------------------------------------ commits
    def committed(self, rows_by_nat: dict[int, int], answered: Iterable[int]) -> None:
        """Rows and waiting answers of a commit leave the NAT64s' shares."""
        nats = self.nats
        for nat, rows in rows_by_nat.items():
            state = nats.get(nat)
            if state is not None:
                state.share.backlog -= rows
        for nat in answered:
            state = nats.get(nat)
            if state is not None:
                state.share.waiting -= 1
        self.cached = sum(len(s.table.by_port) for s in nats.values())

    def take_recency(self) -> dict[int, list[tuple[int, int]]]:
        """Per NAT64, (port, last_use) of the entries used since the last call."""
        out = {}
        for nat, state in self.nats.items():
            if state.table.dirty:
                out[nat] = state.table.take_recency()
        return out

    def saved(self, recency: Iterable[tuple[int, int, int]]) -> None:
        """Recency a commit saved, as (last_use, nat, port): those entries
        may leave memory again unless used since."""
        nats = self.nats
        for last_use, nat, port in recency:
            state = nats.get(nat)
            if state is not None:
                state.table.saved(port, last_use)

    @property
    def excess(self) -> int:
        return self.cached - self.cache_size

    def trim(self, committed_seq: int) -> bool:
        """Forget the least recently used entries of all NAT64s until the
        cache fits; entries not yet durable (or whose recency is unsaved)
        stay. True when some had to stay: saving recency soon lets a
        later trim go further."""
        excess = self.excess
        heap = []
        for s in self.nats.values():
            t = s.table
            if t.by_port and t.readers == 0:
                heap.append((t.by_port[next(iter(t.by_port))].last_use, s.nat))
        heapq.heapify(heap)
        unsaved = False
        while excess > 0 and heap:
            _, nat = heapq.heappop(heap)
            t = self.nats[nat].table
            e = t.by_port[next(iter(t.by_port))]
            if e.seq > committed_seq or e.dirty:
                unsaved = True
                continue
            t.forget(e)
            excess -= 1
            self.cached -= 1
            if t.by_port:
                heapq.heappush(heap, (t.by_port[next(iter(t.by_port))].last_use, nat))
        return unsaved
