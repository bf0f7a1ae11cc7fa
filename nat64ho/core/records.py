"""Plain records shared by the core, storage and the daemon: events and
table rows. Values only; nothing here holds state of a running server."""

from __future__ import annotations

import enum
from typing import NamedTuple, Protocol


class EventKind(enum.IntEnum):
    INITIALIZED = 0
    CREATED = 1
    DELETED = 2


class Event(NamedTuple):
    ts: int  #: microseconds since the epoch, UTC
    kind: EventKind
    nat: int  #: NAT64 IPv4 address as an integer
    port: int = 0  #: NAT port (0 for Initialized)
    addr: bytes | None = None  #: client IPv6 address, 16 octets (None for Initialized)
    aport: int | None = None  #: client IPv6 port


class EventClock:
    """Event times that strictly increase over the whole server (docs/protocol.md
    §6): an event in the same microsecond as the one before, or behind it
    after a wall-clock step, takes the next microsecond, so no two events
    share a time and the history holds exactly the lines of the log."""

    __slots__ = ("last", "step", "offset")

    def __init__(self, last: int = 0, step: int = 1, offset: int = 0):
        self.last = last  #: the newest event time handed out (or recorded)
        #: Times this clock hands out are ``offset`` modulo ``step``: each of
        #: ``step`` workers has its own residue, so their times never meet.
        self.step = step
        self.offset = offset

    def stamp(self, wall: int) -> int:
        ts = wall if wall > self.last else self.last + 1
        if self.step > 1:
            ts += (self.offset - ts) % self.step
        self.last = ts
        return ts


class NewEntry(Protocol):
    """What storage reads of an entry to write it: a :class:`Row`, or the
    table's own entry (never changed by storage)."""

    @property
    def port(self) -> int: ...
    @property
    def addr(self) -> bytes: ...
    @property
    def aport(self) -> int: ...
    @property
    def created(self) -> int: ...
    @property
    def last_use(self) -> int: ...


class Row(NamedTuple):
    """An entry as read from the database."""

    port: int
    addr: bytes
    aport: int
    created: int
    last_use: int
