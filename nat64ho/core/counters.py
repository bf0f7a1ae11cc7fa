"""Every counter the server keeps and the metric that exports it, in one
place; and every reason a datagram is dropped for.

Both are str enums hashed as their value, so a plain string key (the
table's per-datagram counts) lands on the same counter as the member.
"""

from __future__ import annotations

import enum
from typing import NamedTuple

from nat64ho.core import wire


class Drop(enum.StrEnum):
    """Why a datagram was dropped (metric ``nat64ho_datagrams_dropped``)."""

    __hash__ = str.__hash__  # Enum hashes the name; counters mix members and strings

    # Malformed datagrams (docs/protocol.md §2), named by the codec.
    EMPTY = wire.EMPTY
    RESERVED_GROUP = wire.RESERVED_GROUP
    TRUNCATED = wire.TRUNCATED
    BAD_LENGTH = wire.BAD_LENGTH
    WRONG_DIRECTION = wire.WRONG_DIRECTION
    BAD_PACKET = wire.BAD_PACKET
    # Sessions (docs/protocol.md §4), named by the session rules.
    NOT_ALLOWED = "not_allowed"
    HELLO_RATE = "hello_rate"
    BAD_VERSION = "bad_version"
    TOO_MANY_NATS = "too_many_nats"
    BAD_COOKIE = "bad_cookie"
    NO_COOKIE = "no_cookie"
    # The server.
    NOT_IPV4 = "not_ipv4"
    HELLO_NOT_ALONE = "hello_not_alone"
    MISPLACED_SESSION = "misplaced_session"
    REQUEST_RATE = "request_rate"  #: over the NAT64's share (§7) ...
    NAT_WAITING = "nat_waiting"
    NAT_READS = "nat_reads"
    OVERLOADED = "overloaded"  #: the server-wide bound on work in flight
    BAD_ROW = "bad_row"  #: a row of the NAT64's table does not decode
    INTERNAL_ERROR = "internal_error"  #: a bug, logged


class Count(enum.StrEnum):
    """The server's counters (besides drops, which count by :class:`Drop`)."""

    __hash__ = str.__hash__

    DATAGRAMS_IN = "datagrams_in"
    DATAGRAMS_OUT = "datagrams_out"
    ICMP_ERRORS = "icmp_errors"
    HELLOS = "hellos"
    MAP = "map"
    LOOKUP = "lookup"
    TOUCH = "touch"
    SKIPPED = "skipped"
    CREATED = "created"
    DELETED = "deleted"
    INITIALIZED = "initialized"
    RATE_LIMITED = "rate_limited"  #: MAPs over the create rate
    LIMITED_REQUEST_RATE = "limited_request_rate"
    LIMITED_NAT_READS = "limited_nat_reads"
    LIMITED_NAT_WAITING = "limited_nat_waiting"
    LIMITED_BACKLOG = "limited_backlog"
    DEFERRED = "deferred"
    TABLE_FULL = "table_full"
    CACHE_HIT = "cache_hit"
    CACHE_MISS = "cache_miss"


#: The share counter of each reason a NAT64's datagram is refused over its share.
LIMITED = {
    Drop.REQUEST_RATE: Count.LIMITED_REQUEST_RATE,
    Drop.NAT_READS: Count.LIMITED_NAT_READS,
    Drop.NAT_WAITING: Count.LIMITED_NAT_WAITING,
}


class Metric(NamedTuple):
    """A Prometheus counter family, and this counter's label in it."""

    name: str  #: without the ``nat64ho_`` prefix
    help: str
    label: tuple[str, str] | None = None  #: (label name, value)


_MESSAGES = "Messages received from NAT64s, by type."
_LIMITED = "Requests refused by a rate limit."
_CACHE = "Datagrams decided from memory (hit) or after reading the database (miss)."

METRICS: dict[Count, Metric] = {
    Count.DATAGRAMS_IN: Metric("datagrams_received", "UDP datagrams received."),
    Count.DATAGRAMS_OUT: Metric("datagrams_sent", "UDP datagrams sent."),
    Count.ICMP_ERRORS: Metric(
        "icmp_errors", "ICMP errors the kernel reported for datagrams sent (a NAT64 went away)."
    ),
    Count.HELLOS: Metric("messages", _MESSAGES, ("type", "hello")),
    Count.MAP: Metric("messages", _MESSAGES, ("type", "map")),
    Count.LOOKUP: Metric("messages", _MESSAGES, ("type", "lookup")),
    Count.TOUCH: Metric("messages", _MESSAGES, ("type", "touch")),
    Count.SKIPPED: Metric("messages", _MESSAGES, ("type", "skipped")),
    Count.CREATED: Metric("entries_created", "Table entries created."),
    Count.DELETED: Metric("entries_deleted", "Table entries deleted to make room."),
    Count.INITIALIZED: Metric("initialized", "NAT64 (re)starts seen (Initialized events)."),
    Count.RATE_LIMITED: Metric("rate_limited", _LIMITED, ("limit", "create")),
    Count.LIMITED_REQUEST_RATE: Metric("rate_limited", _LIMITED, ("limit", "request")),
    Count.LIMITED_NAT_READS: Metric("rate_limited", _LIMITED, ("limit", "reads")),
    Count.LIMITED_NAT_WAITING: Metric("rate_limited", _LIMITED, ("limit", "waiting")),
    Count.LIMITED_BACKLOG: Metric("rate_limited", _LIMITED, ("limit", "backlog")),
    Count.DEFERRED: Metric(
        "entries_deferred",
        "MAPs for new entries left unanswered while storage cannot keep up (the NAT64 retries).",
    ),
    Count.TABLE_FULL: Metric("table_full", "MAPs refused because no entry was idle long enough."),
    Count.CACHE_HIT: Metric("cache_datagrams", _CACHE, ("result", "hit")),
    Count.CACHE_MISS: Metric("cache_datagrams", _CACHE, ("result", "miss")),
}

#: Drops that are also a rate limit's refusals.
DROP_METRICS: dict[Drop, Metric] = {
    Drop.HELLO_RATE: Metric("rate_limited", _LIMITED, ("limit", "hello")),
}
