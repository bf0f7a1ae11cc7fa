"""IP/ICMP translation between IPv6 and IPv4 (RFC 7915) for a stateful NAT64
(RFC 6146): packet bytes and a mapping in, packet bytes out, or
:class:`Untranslatable` with a short ``reason`` that the gateway counts.

Each direction has two steps so that the caller can consult its table in
between: ``parse6``/``parse4`` find the key the packet needs (the client
endpoint, or the NAT port), ``to_ipv4``/``to_ipv6`` rewrite it with the
answer. The key of an ICMP error is taken from the packet embedded in it.

Strategy for checksums: TCP and UDP are updated incrementally (RFC 1624)
over the addresses and port that change, so the cost does not grow with the
payload; ICMP, whose IPv6 form covers a pseudo-header and IPv4 form does not,
is recomputed whole. Ones'-complement sums use ``int % 0xFFFF``: 2**16 is 1
modulo 0xFFFF, so a big integer's residue is the sum of its 16-bit words.

Out of scope, each a counted drop: fragments (only atomic IPv6 fragments are
translated), routing headers with segments left, IPv4 packets without DF
that would need IPv6 fragmentation, protocols without ports, and the ICMP
types RFC 7915 does not translate.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

TCP = 6
UDP = 17
ICMP = 1
ICMP6 = 58
_PORTED = (TCP, UDP)
#: Offset of the checksum in the transport header.
_CSUM_AT = {TCP: 16, UDP: 6}
_MIN_L4 = {TCP: 20, UDP: 8, ICMP: 8, ICMP6: 8}

#: IPv6 minimum MTU: an ICMPv6 error, and an IPv6 packet from an IPv4 packet
#: that may be fragmented on the way, must fit it (RFC 4443, RFC 7915 §4).
IPV6_MIN_MTU = 1280
#: Longest ICMPv4 error (RFC 1812 §4.3.2.3).
ICMP4_ERROR_MAX = 576

# Drop reasons, as counted by the gateway.
NOT_IPV6 = "not_ipv6"
NOT_IPV4 = "not_ipv4"
TRUNCATED = "truncated"
NOT_PREFIX = "not_prefix"
NOT_POOL = "not_pool"
FRAGMENT = "fragment"
ROUTING_HEADER = "routing_header"
PROTOCOL = "protocol"
ICMP_TYPE = "icmp_type"
BAD_CHECKSUM = "bad_checksum"
NESTED_ERROR = "nested_error"
BAD_EMBEDDED = "bad_embedded"
NEEDS_FRAGMENTING = "needs_fragmenting"
TOO_BIG = "too_big"
REASONS = (
    NOT_IPV6,
    NOT_IPV4,
    TRUNCATED,
    NOT_PREFIX,
    NOT_POOL,
    FRAGMENT,
    ROUTING_HEADER,
    PROTOCOL,
    ICMP_TYPE,
    BAD_CHECKSUM,
    NESTED_ERROR,
    BAD_EMBEDDED,
    NEEDS_FRAGMENTING,
    TOO_BIG,
)


class Untranslatable(ValueError):
    """The packet cannot be translated; ``reason`` names why, for counting."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class Parsed6(NamedTuple):
    """What an IPv6 packet from the client side needs."""

    client: bytes  #: client IPv6 address, 16 octets (the key)
    port: int  #: client port or ICMP echo identifier (the key)
    dst4: bytes  #: IPv4 destination, 4 octets
    proto: int  #: TCP, UDP or ICMP6 (of the outer packet)
    l4: int  #: offset of the transport header, after extension headers
    error: bool  #: an ICMPv6 error: the key comes from the embedded packet


class Parsed4(NamedTuple):
    """What an IPv4 packet towards the pool needs."""

    src4: bytes  #: IPv4 source, 4 octets (the peer of the flow or a router)
    host: bytes  #: the IPv4 end of the flow (the source, or for an error the embedded destination)
    nat_port: int  #: the pool port (the key)
    proto: int
    l4: int  #: offset of the transport header (after options)
    error: bool


# ------------------------------------------------------------------ checksums


def _residue(data: bytes) -> int:
    """Ones'-complement sum of ``data`` as 16-bit words, modulo 0xFFFF."""
    if len(data) & 1:
        data = bytes(data) + b"\0"
    return int.from_bytes(data, "big") % 0xFFFF


def _finish(residue: int) -> int:
    # A residue of 0 is the sum 0xFFFF (words are never all zero here: the
    # pseudo-header holds addresses), whose complement is 0.
    return 0xFFFF - residue if residue else 0


def checksum(data: bytes) -> int:
    """The Internet checksum of ``data`` (RFC 1071)."""
    return _finish(_residue(data))


def _update(old: int, removed: bytes, added: bytes) -> int:
    """``old`` checksum after ``removed`` words were replaced by ``added``."""
    s = ((0xFFFF - old) - _residue(removed) + _residue(added)) % 0xFFFF
    return _finish(s)


def _pseudo6(src: bytes, dst: bytes, nh: int, length: int) -> bytes:
    return src + dst + struct.pack("!IxxxB", length, nh)


_IP4 = struct.Struct("!BBHHHBBH4s4s")


def ipv4_header(
    tos: int, total: int, ident: int, frag: int, ttl: int, proto: int, src: bytes, dst: bytes
) -> bytes:
    head = _IP4.pack(0x45, tos, total, ident, frag, ttl, proto, 0, src, dst)
    return head[:10] + checksum(head).to_bytes(2, "big") + head[12:]


def ipv6_header(tc: int, plen: int, nh: int, hlim: int, src: bytes, dst: bytes) -> bytes:
    return struct.pack("!IHBB", (6 << 28) | (tc << 20), plen, nh, hlim) + src + dst


# ------------------------------------------------------------------ IPv6 side

_EXT_SKIPPED = (0, 60)  # hop-by-hop and destination options: not translated
_DF = 0x4000
_MF = 0x2000


def _skip_ext(pkt: bytes, end: int) -> tuple[int, int]:
    """(next header, offset) of the transport header; raises for fragments
    and routing headers RFC 7915 §5.1 would have us refuse."""
    nh, off = pkt[6], 40
    while nh in _EXT_SKIPPED or nh == 43 or nh == 44:
        if off + 8 > end:
            raise Untranslatable(TRUNCATED)
        if nh == 44:
            if (pkt[off + 2] << 8 | pkt[off + 3]) & 0xFFF9:  # offset or M set
                raise Untranslatable(FRAGMENT)
            nh, off = pkt[off], off + 8
            continue
        if nh == 43 and pkt[off + 3]:
            raise Untranslatable(ROUTING_HEADER)
        nh, off = pkt[off], off + (pkt[off + 1] + 1) * 8
    return nh, off


def parse6(pkt: bytes, prefix: bytes) -> Parsed6:
    """The key of an IPv6 packet towards ``prefix`` (12 octets, a /96)."""
    if len(pkt) < 40 or pkt[0] >> 4 != 6:
        raise Untranslatable(NOT_IPV6)
    end = 40 + (pkt[4] << 8 | pkt[5])
    if end > len(pkt):
        raise Untranslatable(TRUNCATED)
    dst = pkt[24:40]
    if dst[:12] != prefix:
        raise Untranslatable(NOT_PREFIX)
    nh, l4 = _skip_ext(pkt, end)
    if nh not in _MIN_L4 or nh == ICMP:
        raise Untranslatable(PROTOCOL)
    if l4 + _MIN_L4[nh] > end:
        raise Untranslatable(TRUNCATED)
    if nh != ICMP6:
        return Parsed6(pkt[8:24], pkt[l4] << 8 | pkt[l4 + 1], dst[12:], nh, l4, False)
    kind = pkt[l4]
    if kind == 128:  # echo request: the identifier is the port
        return Parsed6(pkt[8:24], pkt[l4 + 4] << 8 | pkt[l4 + 5], dst[12:], nh, l4, False)
    if kind not in _ICMP6_ERRORS:
        raise Untranslatable(ICMP_TYPE)
    # An error about a packet we delivered to the client: inside, the client
    # is the destination.
    inner = pkt[l4 + 8 : end]
    if len(inner) < 40 or inner[0] >> 4 != 6:
        raise Untranslatable(BAD_EMBEDDED)
    if inner[8:20] != prefix:
        raise Untranslatable(BAD_EMBEDDED)
    inh, il4 = _skip_ext(inner, len(inner))
    if inh in _PORTED and il4 + 4 <= len(inner):
        port = inner[il4 + 2] << 8 | inner[il4 + 3]
    elif inh == ICMP6 and il4 + 8 <= len(inner) and inner[il4] == 129:
        port = inner[il4 + 4] << 8 | inner[il4 + 5]
    else:
        raise Untranslatable(BAD_EMBEDDED)
    return Parsed6(inner[24:40], port, dst[12:], nh, l4, True)


def to_ipv4(pkt: bytes, p: Parsed6, pool: bytes, nat_port: int) -> bytes:
    """The IPv4 packet for ``pkt``, from ``pool``:``nat_port``."""
    end = 40 + (pkt[4] << 8 | pkt[5])
    tos = (pkt[0] & 0x0F) << 4 | pkt[1] >> 4
    body = pkt[p.l4 : end]
    if p.proto in _PORTED:
        at = _CSUM_AT[p.proto]
        old = body[at] << 8 | body[at + 1]
        new_port = nat_port.to_bytes(2, "big")
        csum = _update(old, pkt[8:40] + body[:2], pool + p.dst4 + new_port)
        if p.proto == UDP and csum == 0:
            csum = 0xFFFF
        body = new_port + body[2:at] + csum.to_bytes(2, "big") + body[at + 2 :]
        proto = p.proto
    else:
        if checksum(_pseudo6(pkt[8:24], pkt[24:40], ICMP6, len(body)) + body):
            raise Untranslatable(BAD_CHECKSUM)
        body = _icmp6_to_4(body, p, pool, nat_port)
        proto = ICMP
    if 20 + len(body) > 0xFFFF:  # an IPv6 jumbo-sized payload: no IPv4 packet holds it
        raise Untranslatable(TOO_BIG)
    return ipv4_header(tos, 20 + len(body), 0, _DF, pkt[7], proto, pool, p.dst4) + body


# ICMPv6 (type, code) -> ICMPv4 (type, code), RFC 7915 §5.2; None: per pointer.
_ICMP6_ERRORS = (1, 2, 3, 4)
_ICMP6_TO_4 = {
    (1, 0): (3, 1),
    (1, 1): (3, 10),
    (1, 2): (3, 1),
    (1, 3): (3, 1),
    (1, 4): (3, 3),
    (3, 0): (11, 0),
    (3, 1): (11, 1),
    (4, 0): (12, 0),
    (4, 1): (3, 2),
}
#: ICMPv6 parameter problem pointer (into the IPv6 header) -> IPv4 pointer.
_POINTER_6_TO_4 = {
    0: 0,
    1: 1,
    4: 2,
    5: 2,
    6: 9,
    7: 8,
    **{i: 12 for i in range(8, 24)},
    **{i: 16 for i in range(24, 40)},
}


def _icmp6_to_4(body: bytes, p: Parsed6, pool: bytes, nat_port: int) -> bytes:
    kind, code = body[0], body[1]
    if kind == 128:
        out = bytes((8, 0, 0, 0)) + nat_port.to_bytes(2, "big") + body[6:]
        return out[:2] + checksum(out).to_bytes(2, "big") + out[4:]
    rest = b"\0\0\0\0"
    if kind == 2:
        mtu = int.from_bytes(body[4:8], "big")
        t4, c4 = 3, 4
        rest = b"\0\0" + min(max(mtu - 20, 68), 0xFFFF).to_bytes(2, "big")
    else:
        mapped = _ICMP6_TO_4.get((kind, code))
        if mapped is None:
            raise Untranslatable(ICMP_TYPE)
        t4, c4 = mapped
        if t4 == 12:
            ptr = _POINTER_6_TO_4.get(int.from_bytes(body[4:8], "big"))
            if ptr is None:
                raise Untranslatable(ICMP_TYPE)
            rest = bytes((ptr, 0, 0, 0))
    inner = _inner6_to_4(body[8:], pool, nat_port)
    out = bytes((t4, c4, 0, 0)) + rest + inner
    out = out[: ICMP4_ERROR_MAX - 20]
    return out[:2] + checksum(out).to_bytes(2, "big") + out[4:]


def _inner6_to_4(inner: bytes, pool: bytes, nat_port: int) -> bytes:
    """The embedded packet (prefix::X -> client) as (X -> pool:nat_port);
    it may be truncated, so lengths come from its header, not its size."""
    nh, l4 = _skip_ext(inner, len(inner))
    plen = inner[4] << 8 | inner[5]
    src4 = inner[20:24]
    body = inner[l4:]
    if nh in _PORTED:
        new_port = nat_port.to_bytes(2, "big")
        at = _CSUM_AT[nh]
        if len(body) >= at + 2:
            old = body[at] << 8 | body[at + 1]
            csum = _update(old, inner[8:40] + body[2:4], src4 + pool + new_port)
            if nh == UDP and old == 0:
                csum = 0
            body = body[:2] + new_port + body[4:at] + csum.to_bytes(2, "big") + body[at + 2 :]
        else:
            body = body[:2] + new_port + body[4:]
        proto = nh
    elif nh == ICMP6:
        if body[0] not in (128, 129):
            raise Untranslatable(NESTED_ERROR)
        body = bytes((0 if body[0] == 129 else 8, 0, 0, 0)) + nat_port.to_bytes(2, "big") + body[6:]
        body = body[:2] + checksum(body).to_bytes(2, "big") + body[4:]
        proto = ICMP
    else:
        raise Untranslatable(BAD_EMBEDDED)
    tos = (inner[0] & 0x0F) << 4 | inner[1] >> 4
    total = 20 + plen - (l4 - 40)
    if not 20 <= total <= 0xFFFF:
        # Its header claims less than its own extension headers, or more
        # than an IPv4 header can say.
        raise Untranslatable(BAD_EMBEDDED)
    return ipv4_header(tos, total, 0, _DF, inner[7], proto, src4, pool) + body


# ------------------------------------------------------------------ IPv4 side


def parse4(pkt: bytes, pool: bytes) -> Parsed4:
    """The key (pool port) of an IPv4 packet towards ``pool``."""
    if len(pkt) < 20 or pkt[0] >> 4 != 4:
        raise Untranslatable(NOT_IPV4)
    ihl = (pkt[0] & 0x0F) * 4
    end = pkt[2] << 8 | pkt[3]
    if ihl < 20 or end > len(pkt) or end < ihl:
        raise Untranslatable(TRUNCATED)
    if pkt[16:20] != pool:
        raise Untranslatable(NOT_POOL)
    if (pkt[6] << 8 | pkt[7]) & 0x3FFF:  # MF or an offset
        raise Untranslatable(FRAGMENT)
    proto = pkt[9]
    if proto not in _MIN_L4 or proto == ICMP6:
        raise Untranslatable(PROTOCOL)
    if ihl + _MIN_L4[proto] > end:
        raise Untranslatable(TRUNCATED)
    if proto != ICMP:
        return Parsed4(pkt[12:16], pkt[12:16], pkt[ihl + 2] << 8 | pkt[ihl + 3], proto, ihl, False)
    kind = pkt[ihl]
    if kind == 0:  # echo reply: the identifier is the port
        return Parsed4(pkt[12:16], pkt[12:16], pkt[ihl + 4] << 8 | pkt[ihl + 5], proto, ihl, False)
    if kind not in (3, 11, 12):
        raise Untranslatable(ICMP_TYPE)
    inner = pkt[ihl + 8 : end]
    if len(inner) < 20 or inner[0] >> 4 != 4 or inner[12:16] != pool:
        raise Untranslatable(BAD_EMBEDDED)
    iihl = (inner[0] & 0x0F) * 4
    if iihl < 20:
        raise Untranslatable(BAD_EMBEDDED)
    iproto = inner[9]
    if iproto in _PORTED and iihl + 2 <= len(inner):
        port = inner[iihl] << 8 | inner[iihl + 1]
    elif iproto == ICMP and iihl + 8 <= len(inner) and inner[iihl] == 8:
        port = inner[iihl + 4] << 8 | inner[iihl + 5]
    else:
        raise Untranslatable(BAD_EMBEDDED)
    return Parsed4(pkt[12:16], inner[16:20], port, proto, ihl, True)


def to_ipv6(pkt: bytes, p: Parsed4, prefix: bytes, client: bytes, port: int) -> bytes:
    """The IPv6 packet for ``pkt``, to ``client``:``port``, from
    ``prefix`` + the IPv4 source."""
    end = pkt[2] << 8 | pkt[3]
    body = pkt[p.l4 : end]
    src6 = prefix + p.src4
    if p.proto in _PORTED:
        at = _CSUM_AT[p.proto]
        old = body[at] << 8 | body[at + 1]
        new_port = port.to_bytes(2, "big")
        if p.proto == UDP and old == 0:
            # IPv6 has no "no checksum": compute it (RFC 7915 §4.5).
            body = body[:2] + new_port + body[4:6] + b"\0\0" + body[8:]
            csum = checksum(_pseudo6(src6, client, UDP, len(body)) + body) or 0xFFFF
            body = body[:6] + csum.to_bytes(2, "big") + body[8:]
        else:
            csum = _update(old, pkt[12:20] + body[2:4], src6 + client + new_port)
            if p.proto == UDP and csum == 0:
                csum = 0xFFFF
            body = body[:2] + new_port + body[4:at] + csum.to_bytes(2, "big") + body[at + 2 :]
        nh = p.proto
    else:
        if checksum(body):
            raise Untranslatable(BAD_CHECKSUM)
        body = _icmp4_to_6(body, p, prefix, client, port)
        nh = ICMP6
        body = (
            body[:2]
            + checksum(_pseudo6(src6, client, ICMP6, len(body)) + body).to_bytes(2, "big")
            + body[4:]
        )
    if not (pkt[6] & 0x40) and 40 + len(body) > IPV6_MIN_MTU:
        raise Untranslatable(NEEDS_FRAGMENTING)
    return ipv6_header(pkt[1], len(body), nh, pkt[8], src6, client) + body


# ICMPv4 destination unreachable code -> ICMPv6 (type, code), RFC 7915 §4.2.
_UNREACH_4_TO_6 = {
    0: (1, 0),
    1: (1, 0),
    2: (4, 1),
    3: (1, 4),
    4: (2, 0),
    5: (1, 0),
    6: (1, 0),
    7: (1, 0),
    8: (1, 0),
    9: (1, 1),
    10: (1, 1),
    11: (1, 0),
    12: (1, 0),
    13: (1, 1),
    15: (1, 1),
}
#: ICMPv4 parameter problem pointer (into the IPv4 header) -> IPv6 pointer.
_POINTER_4_TO_6 = {
    0: 0,
    1: 1,
    2: 4,
    3: 4,
    8: 7,
    9: 6,
    **{i: 8 for i in range(12, 16)},
    **{i: 24 for i in range(16, 20)},
}


def _icmp4_to_6(body: bytes, p: Parsed4, prefix: bytes, client: bytes, port: int) -> bytes:
    """ICMPv4 -> ICMPv6 with a zero checksum, filled in by the caller."""
    kind, code = body[0], body[1]
    if kind == 0:
        return bytes((129, 0, 0, 0)) + port.to_bytes(2, "big") + body[6:]
    rest = b"\0\0\0\0"
    if kind == 11:
        if code > 1:
            raise Untranslatable(ICMP_TYPE)
        t6, c6 = 3, code
    elif kind == 12:
        ptr = _POINTER_4_TO_6.get(body[4]) if code in (0, 2) else None
        if ptr is None:
            raise Untranslatable(ICMP_TYPE)
        t6, c6, rest = 4, 0, ptr.to_bytes(4, "big")
    else:
        mapped = _UNREACH_4_TO_6.get(code)
        if mapped is None:
            raise Untranslatable(ICMP_TYPE)
        t6, c6 = mapped
        if t6 == 2:
            mtu = body[6] << 8 | body[7]
            rest = max(mtu + 20, IPV6_MIN_MTU).to_bytes(4, "big")
        elif t6 == 4:
            rest = (6).to_bytes(4, "big")  # the Next Header field
    inner = _inner4_to_6(body[8:], prefix, client, port)
    out = bytes((t6, c6, 0, 0)) + rest + inner
    return out[: IPV6_MIN_MTU - 40]


def _inner4_to_6(inner: bytes, prefix: bytes, client: bytes, port: int) -> bytes:
    """The embedded packet (pool:nat_port -> X) as (client:port -> prefix::X)."""
    ihl = (inner[0] & 0x0F) * 4
    total = inner[2] << 8 | inner[3]
    proto = inner[9]
    dst6 = prefix + inner[16:20]
    body = inner[ihl:]
    new_port = port.to_bytes(2, "big")
    if proto in _PORTED:
        at = _CSUM_AT[proto]
        if len(body) >= at + 2:
            old = body[at] << 8 | body[at + 1]
            if proto == UDP and old == 0:
                csum = 0  # cannot be computed over a truncated payload
            else:
                csum = _update(old, inner[12:20] + body[:2], client + dst6 + new_port)
            body = new_port + body[2:at] + csum.to_bytes(2, "big") + body[at + 2 :]
        else:
            body = new_port + body[2:]
        nh = proto
    elif proto == ICMP:
        if body[0] not in (0, 8):
            raise Untranslatable(NESTED_ERROR)
        body = bytes((128 if body[0] == 8 else 129, 0, 0, 0)) + new_port + body[6:]
        if total - ihl == len(body):  # complete: the checksum can be recomputed
            csum = checksum(_pseudo6(client, dst6, ICMP6, len(body)) + body)
            body = body[:2] + csum.to_bytes(2, "big") + body[4:]
        nh = ICMP6
    else:
        raise Untranslatable(BAD_EMBEDDED)
    tos = inner[1]
    return ipv6_header(tos, max(total - ihl, 0), nh, inner[8], client, dst6) + body


# ------------------------------------------------------------------ errors we send


def icmp6_error(pkt: bytes, src: bytes, kind: int, code: int, value: int = 0) -> bytes:
    """An ICMPv6 error from ``src`` about ``pkt`` back to its source."""
    dst = pkt[8:24]
    body = bytes((kind, code, 0, 0)) + value.to_bytes(4, "big") + pkt[: IPV6_MIN_MTU - 48]
    csum = checksum(_pseudo6(src, dst, ICMP6, len(body)) + body)
    body = body[:2] + csum.to_bytes(2, "big") + body[4:]
    return ipv6_header(0, len(body), ICMP6, 64, src, dst) + body


def udp4(src: bytes, sport: int, dst: bytes, dport: int, payload: bytes) -> bytes:
    """An IPv4 UDP datagram with its checksum (the gateway's handoff datagrams)."""
    length = 8 + len(payload)
    head = struct.pack("!HHHH", sport, dport, length, 0)
    csum = checksum(src + dst + struct.pack("!xBH", UDP, length) + head + payload) or 0xFFFF
    return (
        ipv4_header(0, 20 + length, 0, _DF, 64, UDP, src, dst)
        + head[:6]
        + csum.to_bytes(2, "big")
        + payload
    )
