"""IPFIX messages (RFC 7011) carrying Created/Deleted events as NAT64 BIB
create/delete records (RFC 8158 information elements), for NAT logging
collectors.

Pure: events and the time in, datagrams out. :class:`Encoder` owns the one
template, the sequence number and when the template is due again; sockets
and clocks belong to the caller (:mod:`nat64ho.daemon.ipfix_export`).

Strategy: every record has the same fixed-length fields, so one template
(id 256) describes them all and a record is one ``struct`` pack. Over UDP a
collector may start, restart or lose a datagram at any time and nobody tells
us, so (RFC 7011 §8.4) the template goes out alone when the exporter starts
and then again at the head of a data message once TEMPLATE_REFRESH seconds or
TEMPLATE_EVERY messages have passed since the last time. Records are packed
as many to a datagram as fit in MAX_DATAGRAM octets. Destinations are left
out: a collector such as nfdump keeps one address family per record, and the
IPv6 client with the IPv4 NAT64 port is the whole fact a NAT log needs.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable
from typing import NamedTuple

from nat64ho.core.records import Event, EventKind
from nat64ho.core.wire import MAX_DATAGRAM

#: IPFIX version number in the message header.
VERSION = 10
#: Set id of a template set (RFC 7011 §3.3.2).
TEMPLATE_SET_ID = 2
#: The id of our one template; data sets carry it as their set id.
TEMPLATE_ID = 256
#: Seconds between two sends of the template: a collector that (re)starts
#: learns it within this long; 40 octets a minute cost nothing.
TEMPLATE_REFRESH = 60.0
#: Messages between two sends of the template under load, so a restarted
#: collector does not drop a minute of a busy server's records.
TEMPLATE_EVERY = 100


class IE(enum.IntEnum):
    """IANA IPFIX information element ids used in the template."""

    SOURCE_TRANSPORT_PORT = 7
    SOURCE_IPV6_ADDRESS = 27
    FLOW_START_MILLISECONDS = 152
    FLOW_END_MILLISECONDS = 153
    POST_NAT_SOURCE_IPV4_ADDRESS = 225
    POST_NAPT_SOURCE_TRANSPORT_PORT = 227
    NAT_EVENT = 230
    OBSERVATION_TIME_MILLISECONDS = 323


class NatEvent(enum.IntEnum):
    """natEvent values (IANA registry, RFC 8158) of the events exported."""

    NAT64_BIB_CREATE = 10
    NAT64_BIB_DELETE = 11


#: The fields of every data record, in order: (element, octets). The event
#: time goes in all three time fields: nfdump reads 323 as the event time
#: and 152/153 as the flow's, which its time windows select on.
FIELDS: tuple[tuple[IE, int], ...] = (
    (IE.OBSERVATION_TIME_MILLISECONDS, 8),
    (IE.FLOW_START_MILLISECONDS, 8),
    (IE.FLOW_END_MILLISECONDS, 8),
    (IE.NAT_EVENT, 1),
    (IE.SOURCE_IPV6_ADDRESS, 16),
    (IE.SOURCE_TRANSPORT_PORT, 2),
    (IE.POST_NAT_SOURCE_IPV4_ADDRESS, 4),
    (IE.POST_NAPT_SOURCE_TRANSPORT_PORT, 2),
)

_HEADER = struct.Struct("!HHIII")  # version, length, export time, sequence, domain
_SET_HEADER = struct.Struct("!HH")  # set id, length
_RECORD = struct.Struct("!QQQB16sHIH")  # FIELDS, in order

#: The template set, the same octets every time it is sent.
TEMPLATE_SET = (
    _SET_HEADER.pack(TEMPLATE_SET_ID, _SET_HEADER.size + 4 + 4 * len(FIELDS))
    + struct.pack("!HH", TEMPLATE_ID, len(FIELDS))
    + b"".join(struct.pack("!HH", ie, size) for ie, size in FIELDS)
)
#: Octets of one data record.
RECORD_SIZE = _RECORD.size

_NAT_EVENTS = {
    EventKind.CREATED: NatEvent.NAT64_BIB_CREATE,
    EventKind.DELETED: NatEvent.NAT64_BIB_DELETE,
}
_U32 = 0xFFFFFFFF

assert RECORD_SIZE == sum(size for _, size in FIELDS)


class Message(NamedTuple):
    octets: bytes  #: one IPFIX message, one UDP datagram
    records: int  #: data records in it


def record(e: Event) -> bytes:
    """The octets of one data record for a Created or Deleted event.
    Raises KeyError for another kind of event."""
    ms = e.ts // 1000
    return _RECORD.pack(ms, ms, ms, _NAT_EVENTS[e.kind], e.addr, e.aport, e.nat, e.port)


class Encoder:
    """The exporting process of one observation domain, for one stream
    (every collector is sent the same messages)."""

    def __init__(
        self,
        domain: int = 0,
        *,
        limit: int = MAX_DATAGRAM,
        refresh: float = TEMPLATE_REFRESH,
        every: int = TEMPLATE_EVERY,
    ):
        if not 0 <= domain <= _U32:
            raise ValueError(f"observation domain id {domain} is not a 32-bit unsigned number")
        smallest = _HEADER.size + len(TEMPLATE_SET) + _SET_HEADER.size + RECORD_SIZE
        if limit < smallest:
            raise ValueError(
                f"datagram limit {limit} is below one record with its template ({smallest} octets)"
            )
        self.domain = domain
        self.limit = limit
        self.refresh = refresh
        self.every = every
        #: Data records sent so far, modulo 2**32: the next message's
        #: sequence number (RFC 7011 §3.1).
        self.sequence = 0
        self._template_at: float | None = None  # when last sent; None: never
        self._since_template = 0  # messages since then

    def template(self, now: float) -> Message:
        """A message with only the template, for the start of the export."""
        return self._message(now, True, [])

    def encode(self, events: Iterable[Event], now: float) -> list[Message]:
        """The messages for the Created and Deleted ``events`` (others are
        not exported), in order; ``now`` is the time in seconds since the
        epoch. Advances the sequence number by the records encoded."""
        records = [record(e) for e in events if e.kind in _NAT_EVENTS]
        out = []
        i = 0
        while i < len(records):
            with_template = self._template_due(now)
            room = self.limit - _HEADER.size - _SET_HEADER.size
            if with_template:
                room -= len(TEMPLATE_SET)
            chunk = records[i : i + room // RECORD_SIZE]
            i += len(chunk)
            out.append(self._message(now, with_template, chunk))
        return out

    def _template_due(self, now: float) -> bool:
        return (
            self._template_at is None
            or self._since_template >= self.every
            or not 0 <= now - self._template_at < self.refresh
        )

    def _message(self, now: float, with_template: bool, records: list[bytes]) -> Message:
        parts = [b"", TEMPLATE_SET] if with_template else [b""]
        if records:
            parts.append(
                _SET_HEADER.pack(TEMPLATE_ID, _SET_HEADER.size + RECORD_SIZE * len(records))
            )
            parts.extend(records)
        length = sum(map(len, parts)) + _HEADER.size
        parts[0] = _HEADER.pack(VERSION, length, int(now) & _U32, self.sequence, self.domain)
        self.sequence = (self.sequence + len(records)) & _U32
        if with_template:
            self._template_at = now
            self._since_template = 0
        self._since_template += 1
        return Message(b"".join(parts), len(records))
