"""The event log's text form (docs/protocol.md §6): one line per event, both ways.

Pure. The server's log file, ``export`` and ``import`` all go through
:func:`format_event` and :func:`parse_line`, so that an export of the history
reproduces the server's log byte for byte.
"""

from __future__ import annotations

import datetime as dt
import functools
import ipaddress
import re
import socket

from nat64ho.core.records import Event, EventKind

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_NAIVE_EPOCH = dt.datetime(1970, 1, 1)
_TEN_ZEROS = bytes(10)
_NAMES = {
    EventKind.INITIALIZED: "Initialized",
    EventKind.CREATED: "Created",
    EventKind.DELETED: "Deleted",
}


@functools.lru_cache(maxsize=1024)
def ipv4_str(nat: int) -> str:
    # Cached: the log names the same few NAT64s on every line.
    return f"{nat >> 24}.{(nat >> 16) & 255}.{(nat >> 8) & 255}.{nat & 255}"


def ipv6_str(addr: bytes) -> str:
    """RFC 5952 text of a 16-octet address (IPv4-mapped in mixed notation)."""
    if addr[:10] != _TEN_ZEROS:
        # The C library writes RFC 5952 text (longest zero run of two or
        # more hextets, first on ties, lower case) 20 times faster than
        # ipaddress; it differs only below ::ffff:0:0/96, handled below.
        return socket.inet_ntop(socket.AF_INET6, addr)
    ip = ipaddress.IPv6Address(addr)
    if ip.ipv4_mapped is not None:
        return f"::ffff:{ip.ipv4_mapped}"
    return ip.compressed


def ts_str(ts: int) -> str:
    """``2019-03-18 10:06:28.436754`` for microseconds since the epoch."""
    second, us = divmod(ts, 1_000_000)
    return f"{_second_str(second)}.{us:06d}"


def ts_rfc3339(ts: int) -> str:
    """``2019-03-18T10:06:28.436754Z``: the time of the machine formats."""
    second, us = divmod(ts, 1_000_000)
    text = _second_str(second)
    return f"{text[:10]}T{text[11:]}.{us:06d}Z"


@functools.lru_cache(maxsize=4096)
def _second_str(second: int) -> str:
    # A commit logs hundreds of events within the same second: the calendar
    # arithmetic is done once per second, not once per line; isoformat() is
    # C code, for tables whose every entry has a second of its own.
    return (_NAIVE_EPOCH + dt.timedelta(seconds=second)).isoformat(" ")


def ts_from_datetime(t: dt.datetime) -> int:
    """Microseconds since the epoch; a naive datetime is taken as UTC."""
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.UTC)
    delta = t - _EPOCH
    return (delta.days * 86400 + delta.seconds) * 1_000_000 + delta.microseconds


def format_event(e: Event) -> str:
    """The log line of an event, without its newline."""
    head = f"{ts_str(e.ts)} {_NAMES[e.kind]} {ipv4_str(e.nat)}"
    if e.kind == EventKind.INITIALIZED:
        return head
    assert e.addr is not None  # Created and Deleted always name an endpoint
    return f"{head}:{e.port} [{ipv6_str(e.addr)}]:{e.aport}"


class BadLine(ValueError):
    """A log line that is not in the docs/protocol.md §6 format."""


_LINE = re.compile(
    r"(\d{4})-(\d\d)-(\d\d) (\d\d):(\d\d):(\d\d)\.(\d{6}) "
    r"(?:(Initialized) (\d{1,3}(?:\.\d{1,3}){3})"
    r"|(Created|Deleted) (\d{1,3}(?:\.\d{1,3}){3}):(\d{1,5}) \[([0-9A-Fa-f:.]+)\]:(\d{1,5}))"
    r"\r?\n?\Z"
)


def parse_line(line: str) -> Event:
    """Parse one log line (trailing newline allowed). Raises :class:`BadLine`."""
    m = _LINE.match(line)
    if m is None:
        raise BadLine("not a log line")
    y, mo, d, h, mi, s, us = (int(x) for x in m.group(1, 2, 3, 4, 5, 6, 7))
    try:
        ts = ts_from_datetime(dt.datetime(y, mo, d, h, mi, s, us))
    except ValueError as exc:
        raise BadLine(f"bad time: {exc}") from None
    if m.group(8):
        return Event(ts, EventKind.INITIALIZED, _ipv4(m.group(9)))
    port, aport = int(m.group(12)), int(m.group(14))
    if port > 65535 or aport > 65535:
        raise BadLine("port out of range")
    try:
        addr = ipaddress.IPv6Address(m.group(13)).packed
    except ValueError:
        raise BadLine(f"bad IPv6 address {m.group(13)!r}") from None
    kind = EventKind.CREATED if m.group(10) == "Created" else EventKind.DELETED
    return Event(ts, kind, _ipv4(m.group(11)), port, addr, aport)


def _ipv4(text: str) -> int:
    try:
        return int(ipaddress.IPv4Address(text))
    except ValueError:
        raise BadLine(f"bad IPv4 address {text!r}") from None
