"""The NAT64 handoff wire format (docs/protocol.md §2-3), in both directions.

Pure: bytes in, messages out, and back. :func:`head` checks a datagram's
first message alone; :func:`parse` parses it whole before any of it is
used. A malformed one raises :class:`Malformed` with a short ``reason``
that the server counts. Nothing else is ever raised for any input.
Messages are NamedTuples: cheap to build on the hot path, immutable, hashable.
"""

from __future__ import annotations

import enum
import itertools
import struct
from collections.abc import Callable
from typing import NamedTuple

#: Largest reply datagram: Ethernet MTU 1500 minus IPv4 (20) and UDP (8) headers.
MAX_DATAGRAM = 1472
#: UDP port assigned by this profile.
DEFAULT_PORT = 6464
VERSION = 1


class Kind(enum.IntEnum):
    """Octet 0 of a control message: 0x30 + subtype."""

    COOKIE = 0x30
    HELLO = 0x31
    WELCOME = 0x32
    MAP = 0x33
    MAPPING = 0x34
    LOOKUP = 0x35
    UNMAPPED = 0x36
    TOUCH = 0x37
    DELETED = 0x38
    ERROR = 0x39


class ErrorCode(enum.IntEnum):
    """Codes carried by ERROR (docs/protocol.md §3)."""

    BAD_COOKIE = 1
    BAD_VERSION = 2
    NOT_ALLOWED = 3
    RATE_LIMITED = 4
    TABLE_FULL = 5


class Direction(enum.Enum):
    TO_SERVER = "to_server"  # sent by a NAT64
    TO_NAT64 = "to_nat64"  # sent by the server


class Cookie(NamedTuple):
    cookie: bytes  #: 8 octets from WELCOME


class Hello(NamedTuple):
    boot_id: bytes  #: 8 random octets, new at every NAT64 start
    version: int = VERSION
    flags: int = 0


class Welcome(NamedTuple):
    first_port: int  #: lowest NAT port of the table
    last_port: int  #: highest NAT port of the table
    cookie: bytes  #: 8 octets, to open every later datagram
    boot_id: bytes  #: echo of the HELLO's boot id
    version: int = VERSION
    flags: int = 0


class Map(NamedTuple):
    addr: bytes  #: client IPv6 address, 16 octets
    port: int  #: client IPv6 port


class Mapping(NamedTuple):
    nat_port: int  #: NAT port of the entry
    addr: bytes  #: client IPv6 address, 16 octets
    port: int  #: client IPv6 port


class Lookup(NamedTuple):
    nat_port: int


class Unmapped(NamedTuple):
    nat_port: int


class Touch(NamedTuple):
    ports: tuple[int, ...]  #: 1 to 255 NAT ports


class Deleted(NamedTuple):
    nat_port: int  #: NAT port whose entry went
    addr: bytes  #: the endpoint that held it
    port: int


class Error(NamedTuple):
    code: int  #: an ErrorCode (unknown codes are kept as ints)
    offending: int  #: octet 0 of the message that caused it


class Unassigned(NamedTuple):
    """A control message with subtype 0x3A-0x3F: well-formed, skipped in v1."""

    kind: int
    payload: bytes


class Packet(NamedTuple):
    """An IPv4 (group 4) or IPv6 (group 6) packet: well-formed, skipped in v1."""

    version: int
    data: bytes


Message = (
    Cookie
    | Hello
    | Welcome
    | Map
    | Mapping
    | Lookup
    | Unmapped
    | Touch
    | Deleted
    | Error
    | Unassigned
    | Packet
)


class Malformed(ValueError):
    """The datagram breaks docs/protocol.md §2; ``reason`` names how, for counting."""

    def __init__(self, reason: str, offset: int):
        super().__init__(f"{reason} at octet {offset}")
        self.reason = reason
        self.offset = offset


# Reasons a datagram is malformed. Kept as constants so metrics and tests
# agree on the spelling.
EMPTY = "empty"
RESERVED_GROUP = "reserved_group"
TRUNCATED = "truncated"
BAD_LENGTH = "bad_length"
WRONG_DIRECTION = "wrong_direction"
BAD_PACKET = "bad_packet"
REASONS = (EMPTY, RESERVED_GROUP, TRUNCATED, BAD_LENGTH, WRONG_DIRECTION, BAD_PACKET)

_H = struct.Struct("!H")
_MAP = struct.Struct("!16sH")
_MAPPING = struct.Struct("!H16sH")
_MAPPING_MSG = struct.Struct("!2sH16sH")
_UNMAPPED_MSG = struct.Struct("!2sH")
_HELLO = struct.Struct("!BB8s14x")
_WELCOME = struct.Struct("!BBHH8s8s2x")


# Decoders: (datagram, offset of the payload, L) -> message, found through
# the catalogue below. A chain of ``kind == Kind.X`` tests cost two enum
# attribute reads (0.4 us each) per LOOKUP before any decoding.
def _cookie(data: bytes, at: int, n: int) -> Cookie:
    return Cookie(data[at : at + 8])


def _hello(data: bytes, at: int, n: int) -> Hello:
    version, flags, boot_id = _HELLO.unpack_from(data, at)
    return Hello(boot_id, version, flags)


def _welcome(data: bytes, at: int, n: int) -> Welcome:
    version, flags, first, last, cookie, boot_id = _WELCOME.unpack_from(data, at)
    return Welcome(first, last, cookie, boot_id, version, flags)


def _map(data: bytes, at: int, n: int) -> Map:
    return Map(*_MAP.unpack_from(data, at))


def _mapping(data: bytes, at: int, n: int) -> Mapping:
    return Mapping(*_MAPPING.unpack_from(data, at))


def _lookup(data: bytes, at: int, n: int) -> Lookup:
    return Lookup(_H.unpack_from(data, at)[0])


def _unmapped(data: bytes, at: int, n: int) -> Unmapped:
    return Unmapped(_H.unpack_from(data, at)[0])


def _touch(data: bytes, at: int, n: int) -> Touch:
    return Touch(struct.unpack_from(f"!{n}H", data, at))


def _deleted(data: bytes, at: int, n: int) -> Deleted:
    return Deleted(*_MAPPING.unpack_from(data, at))


def _error(data: bytes, at: int, n: int) -> Error:
    return Error(data[at], data[at + 1])


_S = Direction.TO_SERVER
_N = Direction.TO_NAT64
# kind -> (direction, allowed L values, decoder). The whole catalogue at a glance.
_CATALOGUE: dict[int, tuple[Direction, range, Callable[[bytes, int, int], Message]]] = {
    Kind.COOKIE: (_S, range(4, 5), _cookie),
    Kind.HELLO: (_S, range(12, 13), _hello),
    Kind.WELCOME: (_N, range(12, 13), _welcome),
    Kind.MAP: (_S, range(9, 10), _map),
    Kind.MAPPING: (_N, range(10, 11), _mapping),
    Kind.LOOKUP: (_S, range(1, 2), _lookup),
    Kind.UNMAPPED: (_N, range(1, 2), _unmapped),
    Kind.TOUCH: (_S, range(1, 256), _touch),
    Kind.DELETED: (_N, range(10, 11), _deleted),
    Kind.ERROR: (_N, range(1, 2), _error),
}


def parse(datagram: bytes, direction: Direction = Direction.TO_SERVER) -> list[Message]:
    """Parse a whole datagram travelling in ``direction``.

    Raises :class:`Malformed` if any part of it is malformed, so that a caller
    acts on all of it or none of it.
    """
    data = bytes(datagram)
    end = len(data)
    if end == 0:
        raise Malformed(EMPTY, 0)
    messages: list[Message] = []
    pos = 0
    while pos < end:
        first = data[pos]
        group = first >> 4
        if group == 3:
            if pos + 2 > end:
                raise Malformed(TRUNCATED, pos)
            length = data[pos + 1]
            stop = pos + 2 + 2 * length
            if stop > end:
                raise Malformed(TRUNCATED, pos)
            spec = _CATALOGUE.get(first)
            if spec is None:
                messages.append(Unassigned(first, data[pos + 2 : stop]))
            else:
                way, lengths, decode = spec
                if length not in lengths:
                    raise Malformed(BAD_LENGTH, pos)
                if way is not direction:
                    raise Malformed(WRONG_DIRECTION, pos)
                messages.append(decode(data, pos + 2, length))
        elif group == 4:
            if pos + 4 > end:
                raise Malformed(TRUNCATED, pos)
            total = _H.unpack_from(data, pos + 2)[0]
            if total < 20:
                raise Malformed(BAD_PACKET, pos)
            stop = pos + total
            if stop > end:
                raise Malformed(TRUNCATED, pos)
            messages.append(Packet(4, data[pos:stop]))
        elif group == 6:
            if pos + 6 > end:
                raise Malformed(TRUNCATED, pos)
            stop = pos + 40 + _H.unpack_from(data, pos + 4)[0]
            if stop > end:
                raise Malformed(TRUNCATED, pos)
            messages.append(Packet(6, data[pos:stop]))
        else:
            raise Malformed(RESERVED_GROUP, pos)
        pos = stop
    return messages


def head(datagram: bytes, direction: Direction = Direction.TO_SERVER) -> int:
    """Octet 0 of the datagram's first message, checking that message alone.

    docs/protocol.md §2 (v1.2): a server looks at the first message before it
    parses the rest, so that a datagram from an unproven source costs the
    same whatever its size. Raises :class:`Malformed` as :func:`parse` would
    for a fault in the first message; the rest is not looked at.
    """
    end = len(datagram)
    if end == 0:
        raise Malformed(EMPTY, 0)
    first = datagram[0]
    group = first >> 4
    if group == 3:
        if end < 2 or 2 + 2 * datagram[1] > end:
            raise Malformed(TRUNCATED, 0)
        spec = _CATALOGUE.get(first)
        if spec is not None:
            if datagram[1] not in spec[1]:
                raise Malformed(BAD_LENGTH, 0)
            if spec[0] is not direction:
                raise Malformed(WRONG_DIRECTION, 0)
    elif group == 4:
        if end < 4:
            raise Malformed(TRUNCATED, 0)
        total = _H.unpack_from(datagram, 2)[0]
        if total < 20:
            raise Malformed(BAD_PACKET, 0)
        if total > end:
            raise Malformed(TRUNCATED, 0)
    elif group == 6:
        if end < 6 or 40 + _H.unpack_from(datagram, 4)[0] > end:
            raise Malformed(TRUNCATED, 0)
    else:
        raise Malformed(RESERVED_GROUP, 0)
    return first


def _control(kind: int, payload: bytes) -> bytes:
    return bytes((kind, len(payload) // 2)) + payload


def encode(message: Message) -> bytes:
    """The octets of one message. Raises ValueError if a field is out of range."""
    try:
        return _encode(message)
    except struct.error as exc:
        raise ValueError(f"cannot encode {message!r}: {exc}") from None


def _encode(m: Message) -> bytes:
    # isinstance, not type() identity: encode is not on the server's path
    # (it uses the builders below), and mypy narrows each branch.
    if isinstance(m, Mapping):
        _check_addr(m.addr)
        return b"\x34\x0a" + _MAPPING.pack(*m)
    if isinstance(m, Unmapped):
        return b"\x36\x01" + _H.pack(m.nat_port)
    if isinstance(m, Deleted):
        _check_addr(m.addr)
        return b"\x38\x0a" + _MAPPING.pack(*m)
    if isinstance(m, Error):
        if not (0 <= m.code <= 255 and 0 <= m.offending <= 255):
            raise ValueError("ERROR code and offending octet are one octet each")
        return bytes((Kind.ERROR, 1, m.code, m.offending))
    if isinstance(m, Map):
        _check_addr(m.addr)
        return b"\x33\x09" + _MAP.pack(*m)
    if isinstance(m, Lookup):
        return b"\x35\x01" + _H.pack(m.nat_port)
    if isinstance(m, Touch):
        if not 1 <= len(m.ports) <= 255:
            raise ValueError("TOUCH carries 1 to 255 ports")
        return _control(Kind.TOUCH, struct.pack(f"!{len(m.ports)}H", *m.ports))
    if isinstance(m, Cookie):
        _check_len(m.cookie, 8, "cookie")
        return b"\x30\x04" + m.cookie
    if isinstance(m, Hello):
        _check_len(m.boot_id, 8, "boot id")
        return _control(Kind.HELLO, _HELLO.pack(m.version, m.flags, m.boot_id))
    if isinstance(m, Welcome):
        _check_len(m.cookie, 8, "cookie")
        _check_len(m.boot_id, 8, "boot id")
        return _control(
            Kind.WELCOME,
            _WELCOME.pack(m.version, m.flags, m.first_port, m.last_port, m.cookie, m.boot_id),
        )
    if isinstance(m, Unassigned):
        if not 0x3A <= m.kind <= 0x3F or len(m.payload) % 2 or len(m.payload) > 510:
            raise ValueError("unassigned subtype 0x3A-0x3F with an even payload up to 510")
        return _control(m.kind, m.payload)
    if isinstance(m, Packet):
        return bytes(m.data)
    raise ValueError(f"not a message: {m!r}")


def _check_len(value: bytes, n: int, what: str) -> None:
    if len(value) != n:
        raise ValueError(f"{what} must be {n} octets")


def _check_addr(addr: bytes) -> None:
    _check_len(addr, 16, "IPv6 address")


def mapping(nat_port: int, addr: bytes, port: int) -> bytes:
    """The octets of MAPPING(nat_port, addr, port), for fields known to be
    valid (they come from the table). The answer to every LOOKUP and MAP:
    packing it directly is 5x faster than :func:`encode` of a Mapping."""
    return _MAPPING_MSG.pack(b"\x34\x0a", nat_port, addr, port)


def deleted(nat_port: int, addr: bytes, port: int) -> bytes:
    """The octets of DELETED, like :func:`mapping`."""
    return _MAPPING_MSG.pack(b"\x38\x0a", nat_port, addr, port)


def unmapped(nat_port: int) -> bytes:
    """The octets of UNMAPPED(nat_port), like :func:`mapping`."""
    return _UNMAPPED_MSG.pack(b"\x36\x01", nat_port)


def error(code: int, offending: int) -> bytes:
    """The octets of ERROR(code, offending), like :func:`mapping`."""
    return bytes((0x39, 1, code, offending))


def build(messages: list[Message] | tuple[Message, ...]) -> bytes:
    """One datagram holding ``messages`` back to back."""
    return b"".join(map(encode, messages))


def pack(units: list[list[bytes]], limit: int = MAX_DATAGRAM) -> list[bytes]:
    """Pack encoded messages into as few datagrams of at most ``limit`` octets.

    Each unit (e.g. a DELETED with the MAPPING that reuses its port) stays in
    one datagram; order is kept.
    """
    # Nearly every answer fits one datagram: say so with two passes in C
    # before walking the units one by one in Python.
    whole = b"".join(itertools.chain.from_iterable(units))
    if len(whole) <= limit:
        return [whole] if whole else []
    out: list[bytes] = []
    current: list[bytes] = []
    size = 0
    for unit in units:
        n = sum(map(len, unit))
        if current and size + n > limit:
            out.append(b"".join(current))
            current, size = [], 0
        current.extend(unit)
        size += n
    if current:
        out.append(b"".join(current))
    return out
