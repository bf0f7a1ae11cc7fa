"""The storage interface the server needs, over plain records: what a
backend (SQLite in :mod:`.sqlite`, PostgreSQL in :mod:`.postgres`) implements.

The core decides; storage keeps. Storage never sees a live table entry nor
a datagram: it gets new entries as :class:`Row` values and recency as (port,
last use) pairs, and commits them in groups (:mod:`.commit`). The server
learns that a group is durable by taking it from :meth:`Storage.commits`;
the answers waiting for that group's sequence number leave then.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from typing import Any, NamedTuple, Protocol

from nat64ho.core.records import Event, NewEntry, Row
from nat64ho.errors import Fault
from nat64ho.storage import schema

#: Unsaved recency is written at least this often (µs are not lost on a clean
#: stop; on a crash at most this much LRU ordering is).
RECENCY_INTERVAL = 1.0


class NatRecord(NamedTuple):
    """What is kept of a NAT64 that completed a HELLO."""

    boot_id: bytes
    first_hello: int  #: wall-clock µs
    last_hello: int


#: A history row: (id, ts, kind, nat, port, addr, aport).
EventRow = tuple[Any, ...]


def checked_rows(where: object, nat: int, rows: Iterable[Sequence[Any]]) -> list[Row]:
    """Entry rows as read, checked: a planted or damaged one is refused by name."""
    out = []
    for r in rows:
        if not schema.entry_ok((nat, *r)):
            raise schema.bad_entry(where, (nat, *r))
        out.append(Row(*r))
    return out


class Committed(Protocol):
    """One durable group of changes, as :meth:`Storage.commits` yields it."""

    seq: int
    events: list[Event]  #: in the order they were added
    rows_by_nat: dict[int, int]  #: rows (entries and events) each NAT64 added
    recency: list[tuple[int, int, int]]  #: (last_use, nat, port) saved
    rows: int  #: rows written, recency included
    seconds: float  #: from the start of the transaction to its end


class Storage(Protocol):
    """A server's database: opened by the backend's ``open`` classmethod,
    closed by :meth:`close`. Reads raise ``schema.BadRow`` for a row that
    does not decode; a damaged file sets :attr:`damage_found`."""

    # ---------------------------------------------------------------- state read at start
    secret: bytes  #: the cookie secret, created once and kept

    @property
    def meta(self) -> Mapping[str, object]: ...

    clock_hwm: int  #: newest last use ever saved (table clock, µs)
    last_event_ts: int  #: newest event time in the history

    @property
    def nats(self) -> Mapping[int, NatRecord]:
        """The NAT64s seen, with their boot ids."""
        ...

    # ---------------------------------------------------------------- state while serving
    committed_seq: int  #: the newest group on disk
    failing: str | None  #: why commits fail, while they do
    damaged: str | None  #: why the file was given up on; never cleared
    lost: str | None  #: why the session (or writer) ended, if it did
    damage_found: asyncio.Event

    def commit_running_for(self) -> float:
        """Seconds the commit in flight has gone unanswered; 0 when none runs."""
        ...

    @property
    def stats(self) -> Mapping[str, int]:
        """ "commits", "commit_failures"."""
        ...

    async def set_meta(self, key: str, value: str | bytes | int) -> None: ...

    async def close(self, give_up: asyncio.Event | None = None) -> int:
        """Commit what is pending and close; the number of changes left
        uncommitted when commits kept failing."""

    # ---------------------------------------------------------------- reads of one NAT64's table
    async def load_table(self, nat: int) -> tuple[list[int], int]:
        """Occupied ports and the entry count."""

    async def read_endpoints(self, nat: int, endpoints: list[tuple[bytes, int]]) -> list[Row]: ...

    async def read_ports(self, nat: int, ports: list[int]) -> list[Row]: ...

    async def read_oldest(
        self, nat: int, n: int, after: tuple[int, int] | None = None
    ) -> list[Row]:
        """``n`` rows in (last_use, port) order, after ``after``."""

    # ---------------------------------------------------------------- the log's catch-up
    async def event_id(self, key: tuple[object, ...]) -> int | None: ...

    async def read_events(self, after: int, n: int) -> list[EventRow]: ...

    # ---------------------------------------------------------------- writes
    @property
    def pending_seq(self) -> int:
        """The group that changes added now join."""

    @property
    def backlog(self) -> int:
        """Rows waiting to be committed."""

    def add(
        self,
        nat: int,
        created: Sequence[NewEntry],
        events: list[Event],
    ) -> int:
        """Queue new entries and events; the rows added."""

    def add_recency(self, recency: Mapping[int, list[tuple[int, int]]]) -> None:
        """Queue, per NAT64, (port, last use) of entries used; written
        coalesced, soon after :meth:`flush_recency_soon`."""

    def add_boot(self, nat: int, boot_id: bytes, wall: int, event: Event | None) -> None: ...

    def flush_recency_soon(self) -> None: ...

    def commits(self) -> AsyncIterator[Committed]:
        """Each durable group in order, until closed; raises
        DatabaseDamaged at the end once given up on."""

    def classify(self, exc: BaseException) -> Fault | None:
        """What ``exc`` means for serving; None: not the database's fault."""

    def damage(self, exc: BaseException, fault: Fault = ...) -> None:
        """Give up on the database: commit nothing more, set damage_found."""

    # ---------------------------------------------------------------- upkeep
    async def prune(self, before: int) -> int:
        """Delete history events older than ``before`` (µs); how many."""
