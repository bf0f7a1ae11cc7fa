"""The connection table of one NAT64: decisions only (docs/protocol.md §5).

Pure: no sockets, no clock, no database. The database is the truth and this
is its cache, so a call goes in two steps:

1. :meth:`NatTable.needs` says what must be read from the database before the
   messages of a datagram can be decided (endpoints and ports not in memory,
   LRU victims when no port is free). The server reads them and hands the rows
   to :meth:`NatTable.feed`.
2. :meth:`NatTable.apply` decides every message, synchronously, and returns
   the replies, the events, and the commit the replies must wait for.

Consistency rests on three rules, kept by the server: an entry not yet
committed (``seq`` above the committed batch) or with unsaved recency stays in
memory; while a read for a NAT64 is in flight, none of its entries leaves
memory (:attr:`NatTable.readers`); and a row read from the database is
ignored when memory already holds that port. Within one NAT64 every entry in
memory was used more recently than every entry only in the database, so the
oldest entry is the head of :attr:`NatTable.by_port` when all entries are in
memory, and otherwise the oldest database row not in memory.
"""

from __future__ import annotations

import random
import re
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

from nat64ho.core import wire
from nat64ho.core.records import Event, EventKind, Row
from nat64ho.core.session import Bucket

#: Random probes for a free port before counting through the free ones.
#: Probing is uniform and cheap while the table has room; with this many
#: probes, the slower count (still uniform) is needed only above ~95 % full.
FREE_PROBES = 64
_ZEROS = bytes(8 - bin(b).count("1") for b in range(256))  # free ports in a bitmap byte
_NOT_FULL = re.compile(rb"[^\xff]", re.DOTALL)

#: Victim candidates fetched from the database at a time: enough for a burst
#: of evictions per read, few enough that a read stays cheap.
VICTIM_BATCH = 64


class Entry:
    """One occupied NAT port."""

    __slots__ = ("port", "addr", "aport", "created", "last_use", "seq", "dirty")

    def __init__(
        self, port: int, addr: bytes, aport: int, created: int, last_use: int, seq: int = 0
    ):
        self.port = port
        self.addr = addr
        self.aport = aport
        self.created = created  #: UTC µs, the time of its Created event
        self.last_use = last_use  #: table-clock µs
        self.seq = seq  #: the write batch that holds it; committed once <= committed seq
        self.dirty = False  #: last_use changed since it was last committed

    def __repr__(self) -> str:
        return f"Entry({self.port}, {self.addr.hex()}, {self.aport}, last_use={self.last_use})"


class Needs(NamedTuple):
    """Reads required before :meth:`NatTable.apply` can decide a datagram."""

    endpoints: list[tuple[bytes, int]]
    ports: list[int]
    victims: int  #: how many more LRU candidates to fetch (from the oldest)


class Outcome(NamedTuple):
    units: list[list[bytes]]  #: encoded replies; a DELETED shares a unit with its MAPPING
    events: list[Event]
    created: list[Entry] | list[Row]  #: new entries (each replaces whatever held its port)
    wait_seq: int  #: the replies may leave once this batch is committed
    counts: dict[str, int]  #: what happened, for metrics


_RATE_LIMITED_MAP = wire.encode(wire.Error(wire.ErrorCode.RATE_LIMITED, wire.Kind.MAP))


# Messages are wire.Message values dispatched on their exact type (cheaper than
# isinstance on the hot path), which type checkers cannot narrow: hence Any.
class NatTable:
    """The table of one NAT64 address: ports ``first..last``."""

    def __init__(
        self,
        nat: int,
        first: int,
        last: int,
        *,
        min_idle: int = 0,
        rng: random.Random | None = None,
    ):
        self.nat = nat
        self.first = first
        self.last = last
        self.min_idle = min_idle  #: µs; an entry younger than this is never deleted
        self.rng = rng or random.Random()
        self.by_port: OrderedDict[int, Entry] = OrderedDict()  # least recently used first
        self.by_endpoint: dict[tuple[bytes, int], int] = {}
        # One bit per port of the range, set when taken: 8 KiB per NAT64,
        # however empty its table (a list of free ports would be 126 KiB).
        self.taken = bytearray()
        self.nfree = 0  #: ports of the range with no entry
        self.total = 0  #: entries in the table, in memory or only in the database
        self.candidates: OrderedDict[int, Row] = OrderedDict()  # oldest database rows
        self.readers = 0  #: database reads in flight for this NAT64
        self.dirty: list[Entry] = []  #: entries used since their recency was handed over
        self.loaded = False

    @property
    def capacity(self) -> int:
        return self.last - self.first + 1

    # ------------------------------------------------------------ loading
    def load(self, occupied: Iterable[int], total: int) -> None:
        """Start from the database: the occupied ports and the entry count."""
        cap = self.capacity
        bits = bytearray((cap + 7) // 8)
        used = 0
        for p in occupied:
            i = p - self.first
            # Entries outside the range (it was wider once) stay, but hold no bit.
            if 0 <= i < cap and not bits[i >> 3] & (1 << (i & 7)):
                bits[i >> 3] |= 1 << (i & 7)
                used += 1
        for i in range(cap, len(bits) * 8):  # padding is never free
            bits[i >> 3] |= 1 << (i & 7)
        self.taken = bits
        self.nfree = cap - used
        self.total = total
        self.loaded = True

    @property
    def only_in_db(self) -> int:
        return self.total - len(self.by_port)

    # ------------------------------------------------------------ step 1
    def needs(
        self,
        messages: list[Any],
        absent: set[tuple[bytes, int]] | frozenset[tuple[bytes, int]] = frozenset(),
    ) -> Needs | None:
        """What to read before :meth:`apply`; None when memory suffices.
        ``absent``: endpoints the database was already found not to hold."""
        endpoints: list[tuple[bytes, int]] = []
        ports: list[int] = []
        in_db = self.only_in_db > 0
        new = 0
        for m in messages:
            cls = type(m)
            if cls is wire.Map:
                key = (m.addr, m.port)
                if key not in self.by_endpoint:
                    new += 1
                    if in_db and key not in absent and key not in endpoints:
                        endpoints.append(key)
            elif in_db and cls is wire.Lookup:
                if m.nat_port not in self.by_port and m.nat_port not in ports:
                    ports.append(m.nat_port)
            elif in_db and cls is wire.Touch:
                for p in m.ports:
                    if p not in self.by_port and p not in ports:
                        ports.append(p)
        victims = 0
        if new > self.nfree and in_db:
            # Worst case: every unknown endpoint is new and needs a victim.
            have = sum(1 for p in self.candidates if p not in self.by_port)
            victims = max(0, new - self.nfree - have)
            if victims:
                victims = max(victims, VICTIM_BATCH)
        if not endpoints and not ports and not victims:
            return None
        return Needs(endpoints, ports, victims)

    def feed(self, rows: Iterable[Row], candidates: Iterable[Row] = ()) -> None:
        """Take rows read for :meth:`needs`. Rows for ports memory already
        holds are stale reads and are ignored."""
        for r in rows:
            if r.port in self.by_port:
                continue
            e = Entry(r.port, r.addr, r.aport, r.created, r.last_use)
            self._remember(e)
            self.candidates.pop(r.port, None)
        for r in candidates:
            if r.port not in self.by_port and r.port not in self.candidates:
                self.candidates[r.port] = r

    def _remember(self, e: Entry) -> None:
        self.by_port[e.port] = e
        self.by_endpoint[(e.addr, e.aport)] = e.port

    def forget(self, e: Entry) -> None:
        """Drop a committed, clean entry from memory (it stays in the database)."""
        del self.by_port[e.port]
        del self.by_endpoint[(e.addr, e.aport)]

    # ------------------------------------------------------------ step 2
    def apply(
        self,
        messages: list[Any],
        now: int,
        stamp: Callable[[], int],
        seq: int,
        create: Bucket | None = None,
        create_ok: bool = True,
        share_ok: bool = True,
    ) -> Outcome:
        """Decide ``messages`` (the datagram after its COOKIE).

        ``now`` is the monotonic table clock in µs, and ``stamp()`` gives each
        event its UTC time in µs (strictly increasing, docs/protocol.md §6); ``seq`` is the write batch new entries join.
        With ``create_ok`` false (storage cannot keep up) a MAP that needs a
        new entry gets no answer, so the NAT64 retries later; with
        ``share_ok`` false (this NAT64 has too much waiting to be committed,
        docs/protocol.md §7) it is answered ERROR RATE_LIMITED.
        """
        units: list[list[bytes]] = []
        events: list[Event] = []
        created: list[Entry] = []
        counts: dict[str, int] = {}
        wait = 0
        by_port = self.by_port
        for m in messages:
            cls = type(m)
            if cls is wire.Lookup:
                e = by_port.get(m.nat_port)
                counts["lookup"] = counts.get("lookup", 0) + 1
                if e is None:
                    units.append([wire.unmapped(m.nat_port)])
                else:
                    self._touch(e, now)
                    if e.seq > wait:
                        wait = e.seq
                    units.append([wire.mapping(e.port, e.addr, e.aport)])
            elif cls is wire.Touch:
                counts["touch"] = counts.get("touch", 0) + 1
                for p in m.ports:
                    e = by_port.get(p)
                    if e is None:
                        units.append([wire.unmapped(p)])
                    else:
                        self._touch(e, now)
            elif cls is wire.Map:
                counts["map"] = counts.get("map", 0) + 1
                port = self.by_endpoint.get((m.addr, m.port))
                if port is not None:
                    e = by_port[port]
                    self._touch(e, now)
                    if e.seq > wait:
                        wait = e.seq
                    units.append([wire.mapping(e.port, e.addr, e.aport)])
                    continue
                if not create_ok:
                    counts["deferred"] = counts.get("deferred", 0) + 1
                    continue
                if not share_ok:
                    counts["limited_backlog"] = counts.get("limited_backlog", 0) + 1
                    units.append([_RATE_LIMITED_MAP])
                    continue
                unit = self._create(m, now, stamp, seq, create, events, created, counts)
                if created and created[-1].seq == seq:
                    wait = seq
                units.append(unit)
            else:
                counts["skipped"] = counts.get("skipped", 0) + 1
        return Outcome(units, events, created, wait, counts)

    def _touch(self, e: Entry, now: int) -> None:
        if now > e.last_use:
            e.last_use = now
        self.by_port.move_to_end(e.port)
        if not e.dirty:
            # Listed once until its recency is handed over: a LOOKUP of a
            # dirty entry costs nothing more here.
            e.dirty = True
            self.dirty.append(e)

    def take_recency(self) -> list[tuple[int, int]]:
        """(port, last_use) of the entries used since they were last handed
        over, to be saved; they stay dirty until :meth:`saved` says so."""
        by_port = self.by_port
        out = [(e.port, e.last_use) for e in self.dirty if e.dirty and by_port.get(e.port) is e]
        self.dirty = []
        return out

    def saved(self, port: int, last_use: int) -> None:
        """The last use ``last_use`` of ``port`` is committed."""
        e = self.by_port.get(port)
        if e is not None and e.dirty:
            if e.last_use <= last_use:
                e.dirty = False
            else:
                self.dirty.append(e)  # used since it was handed over: again

    def _create(
        self,
        m: wire.Map,
        now: int,
        stamp: Callable[[], int],
        seq: int,
        bucket: Bucket | None,
        events: list[Event],
        created: list[Entry],
        counts: dict[str, int],
    ) -> list[bytes]:
        if bucket is not None and not bucket.take(now):
            counts["rate_limited"] = counts.get("rate_limited", 0) + 1
            return [_RATE_LIMITED_MAP]
        unit: list[bytes] = []
        if self.nfree:
            port = self._take_free()
        else:
            victim = self._victim(now)
            if victim is None:
                counts["table_full"] = counts.get("table_full", 0) + 1
                return [wire.encode(wire.Error(wire.ErrorCode.TABLE_FULL, wire.Kind.MAP))]
            port = victim.port
            events.append(
                Event(stamp(), EventKind.DELETED, self.nat, port, victim.addr, victim.aport)
            )
            unit.append(wire.deleted(port, victim.addr, victim.aport))
            counts["deleted"] = counts.get("deleted", 0) + 1
        # The entry's created time is its Created event's, so a report never
        # disagrees with its own log line; last use stays on the table clock.
        ts = stamp()
        e = Entry(port, m.addr, m.port, ts, now, seq)
        self.total += 1
        self._remember(e)
        created.append(e)
        events.append(Event(ts, EventKind.CREATED, self.nat, port, m.addr, m.port))
        unit.append(wire.mapping(port, m.addr, m.port))
        counts["created"] = counts.get("created", 0) + 1
        return unit

    def _take_free(self) -> int:
        """A free port chosen uniformly at random (unpredictable, RFC 6056)."""
        bits, randrange = self.taken, self.rng.randrange
        cap = self.capacity
        for _ in range(FREE_PROBES):
            i = randrange(cap)
            if not bits[i >> 3] & (1 << (i & 7)):
                break
        else:
            # Nearly full: take the k-th free port, walking only the bytes
            # that have one.
            k = randrange(self.nfree)
            for m in _NOT_FULL.finditer(bits):
                j = m.start()
                byte = bits[j]
                if k < _ZEROS[byte]:
                    for bit in range(8):
                        if not byte & (1 << bit):
                            if k == 0:
                                break
                            k -= 1
                    i = j * 8 + bit
                    break
                k -= _ZEROS[byte]
        bits[i >> 3] |= 1 << (i & 7)
        self.nfree -= 1
        return self.first + i

    def _victim(self, now: int) -> Entry | Row | None:
        """Take the least recently used entry out of the table, if it has been
        idle for at least ``min_idle``; None when none may go."""
        limit = now - self.min_idle
        if self.only_in_db > 0:
            while self.candidates:
                port, row = next(iter(self.candidates.items()))
                if port in self.by_port:
                    del self.candidates[port]
                    continue
                if self.min_idle and row.last_use > limit:
                    return None
                del self.candidates[port]
                self.total -= 1
                return row
            # needs() asks for candidates before apply(); running dry here
            # means the database had fewer old rows than it counted.
            return None
        if not self.by_port:
            return None
        port, e = next(iter(self.by_port.items()))
        if self.min_idle and e.last_use > limit:
            return None
        del self.by_port[port]
        del self.by_endpoint[(e.addr, e.aport)]
        e.dirty = False  # its recency must not overwrite the new entry's
        self.total -= 1
        return e
