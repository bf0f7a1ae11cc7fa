"""Whatever a client or an IPv4 host sends through the gateway is either a
translation or a drop counted under a named reason: packets built field by
field (ICMP errors quoting packets with any header values included), in
both directions, through translate.py and through Gateway.packet."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from nat64ho.core import wire
from nat64ho.gateway import core
from nat64ho.gateway import translate as t
from tests.test_gateway_core import reply, welcomed
from tests.test_gateway_translate import (
    CLIENT,
    CPORT,
    HOST,
    HOST6,
    NAT_PORT,
    POOL,
    in4,
    out6,
    pseudo6,
    ref_csum,
    with_csum,
)

#: Examples per property: enough to reach every branch of the ICMP error
#: paths (the embedded headers), few enough to run in seconds.
EXAMPLES = 300

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
#: Lengths: the edges, where totals overflow or go negative, and any.
_edges = st.one_of(st.sampled_from([0, 1, 7, 8, 19, 20, 39, 40]), st.integers(65500, 0xFFFF))
length16 = st.one_of(_edges, _edges, u16)
transport = st.sampled_from([t.ICMP6, t.ICMP6, t.ICMP6, t.TCP, t.UDP, t.ICMP, 0, 43, 44, 60, 50])
payload = st.binary(max_size=64)
#: Mostly true: a consistent length or checksum, so that most examples get
#: past the outer checks to the quote inside.
mostly = st.sampled_from([True, True, True, False])


def _l4(proto: int, sport: int, dport: int, kind: int, data: bytes) -> bytes:
    if proto == t.TCP:
        return struct.pack("!HH", sport, dport) + bytes(16) + data
    if proto == t.UDP:
        return struct.pack("!HHHH", sport, dport, 8 + len(data), 0) + data
    if proto in (t.ICMP, t.ICMP6):
        return bytes((kind, 0, 0, 0)) + struct.pack("!HH", sport, 1) + data
    return data


@st.composite
def ipv6_packets(draw, depth: int = 0) -> bytes:
    """An IPv6 packet from the client towards the prefix; at depth 0 maybe
    an ICMPv6 error quoting a packet towards the client."""
    nh = draw(transport)
    ext = b""
    if nh in (0, 43, 44, 60):
        after = draw(st.sampled_from([t.TCP, t.UDP, t.ICMP6]))
        ext = bytes((after, 0 if draw(mostly) else draw(u8), 0, draw(st.integers(0, 1)))) + bytes(4)
    proto = ext[0] if ext else nh
    if depth == 0 and proto == t.ICMP6 and draw(mostly):
        kind = draw(st.sampled_from([1, 2, 3, 4]))
        quoted = draw(ipv6_packets(depth=1))
        # The quote goes the other way: prefix::X -> client.
        quoted = quoted[:8] + HOST6 + CLIENT + quoted[40:]
        body = (
            bytes((kind, draw(st.integers(0, 4)), 0, 0))
            + draw(st.binary(min_size=4, max_size=4))
            + quoted
        )
    else:
        kind = draw(st.sampled_from([128, 129, 1, 135]))
        body = _l4(proto, CPORT, draw(u16), kind, draw(payload))
    if proto == t.ICMP6 and draw(mostly):
        plen = len(ext) + len(body)
        body = with_csum(body, 2, pseudo6(CLIENT, HOST6, t.ICMP6, plen - len(ext)))
    plen = len(ext) + len(body) if depth == 0 and draw(mostly) else draw(length16)
    head = struct.pack("!IHBB", (6 << 28) | draw(u8) << 20, plen, nh, draw(u8))
    src, dst = (HOST6, CLIENT) if depth else (CLIENT, HOST6)
    return head + src + dst + ext + body


@st.composite
def ipv4_packets(draw, depth: int = 0) -> bytes:
    """An IPv4 packet from the host towards the pool; at depth 0 maybe an
    ICMP error quoting a packet from the pool."""
    proto = draw(st.sampled_from([t.ICMP, t.ICMP, t.ICMP, t.TCP, t.UDP, 47]))
    ihl = 5 if depth == 0 and draw(mostly) else draw(st.sampled_from([5, 0, 4, 6, 15]))
    options = bytes(max(ihl - 5, 0) * 4)
    if depth == 0 and proto == t.ICMP and draw(mostly):
        kind = draw(st.sampled_from([3, 11, 12]))
        rest = bytes((draw(u8), 0)) + struct.pack("!H", draw(u16))
        quoted = draw(ipv4_packets(depth=1))
        quoted = quoted[:12] + POOL + HOST + quoted[20:]
        body = bytes((kind, draw(st.integers(0, 15)), 0, 0)) + rest + quoted
    else:
        kind = draw(st.sampled_from([0, 8, 3]))
        sport, dport = (NAT_PORT, draw(u16)) if depth else (draw(u16), NAT_PORT)
        body = _l4(proto, sport, dport, kind, draw(payload))
    if proto == t.ICMP and draw(mostly):
        body = with_csum(body, 2)
    total = 20 + len(options) + len(body) if depth == 0 and draw(mostly) else draw(length16)
    frag = draw(st.sampled_from([0x4000, 0, 0x2000, 0x0010]))
    head = struct.pack(
        "!BBHHHBBH", 0x40 | ihl, draw(u8), total, draw(u16), frag, draw(u8), proto, 0
    )
    src, dst = (POOL, HOST) if depth else (HOST, POOL)
    return head + src + dst + options + body


def _well_formed_ipv4(out: bytes) -> None:
    assert out[0] == 0x45 and int.from_bytes(out[2:4], "big") == len(out)
    assert ref_csum(out[:20]) == 0 and out[12:16] == POOL


def _well_formed_ipv6(out: bytes) -> None:
    assert out[0] >> 4 == 6 and int.from_bytes(out[4:6], "big") == len(out) - 40
    assert out[24:40] == CLIENT


@settings(max_examples=EXAMPLES, deadline=None)
@given(ipv6_packets())
def test_any_client_packet_translates_or_is_a_named_drop(pkt):
    try:
        out = out6(pkt)
    except t.Untranslatable as exc:
        assert exc.reason in t.REASONS
    else:
        _well_formed_ipv4(out)


@settings(max_examples=EXAMPLES, deadline=None)
@given(ipv4_packets())
def test_any_ipv4_packet_translates_or_is_a_named_drop(pkt):
    try:
        out = in4(pkt)
    except t.Untranslatable as exc:
        assert exc.reason in t.REASONS
    else:
        _well_formed_ipv6(out)


def test_a_quote_claiming_more_than_an_ipv4_packet_holds_is_a_named_drop():
    # An ICMPv6 error whose quoted header says 65535 octets after 8 of
    # extension headers: 20 + 65535 - 8 is past what IPv4 can say.
    quoted = (
        struct.pack("!IHBB", 6 << 28, 65535, 0, 64)
        + HOST6
        + CLIENT
        + bytes((t.UDP, 0, 0, 0, 0, 0, 0, 0))
        + struct.pack("!HHHH", 80, CPORT, 8, 0)
    )
    body = bytes((1, 4, 0, 0, 0, 0, 0, 0)) + quoted
    body = with_csum(body, 2, pseudo6(CLIENT, HOST6, t.ICMP6, len(body)))
    pkt = struct.pack("!IHBB", 6 << 28, len(body), t.ICMP6, 64) + CLIENT + HOST6 + body
    try:
        _well_formed_ipv4(out6(pkt))
    except t.Untranslatable as exc:
        assert exc.reason == t.BAD_EMBEDDED


def _mapped_gateway() -> core.Gateway:
    gw = welcomed()
    gw.packet(reply([wire.Mapping(NAT_PORT, CLIENT, CPORT)]), 0.0)
    gw.flush(0.0)
    return gw


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.one_of(ipv6_packets(), ipv4_packets()))
def test_the_gateway_counts_every_packet_as_translated_dropped_or_waiting(pkt):
    gw = _mapped_gateway()
    before = gw.counts.copy()
    waiting = sum(
        len(p.packets) for s in gw.servers.values() for p in (*s.maps.values(), *s.lookups.values())
    )
    gw.packet(pkt, 0.1)  # never raises
    after = sum(
        len(p.packets) for s in gw.servers.values() for p in (*s.maps.values(), *s.lookups.values())
    )
    new = gw.counts - before
    assert not new[core.DROP_BUG], pkt.hex()
    translated = new["to_ipv4"] + new["to_ipv6"]
    dropped = sum(n for k, n in new.items() if k.startswith("drop_"))
    assert translated + dropped + (after - waiting) == 1, (new, pkt.hex())
    if new["to_ipv4"]:
        _well_formed_ipv4(gw.out[-1])
    if new["to_ipv6"]:
        _well_formed_ipv6(gw.out[-1])


def test_a_payload_no_ipv4_packet_holds_is_a_named_drop():
    seg = struct.pack("!HHHH", CPORT, 53, 0, 0) + bytes(65535 - 8)
    pkt = struct.pack("!IHBB", 6 << 28, len(seg), t.UDP, 64) + CLIENT + HOST6 + seg
    try:
        out6(pkt)
    except t.Untranslatable as exc:
        assert exc.reason == t.TOO_BIG
    else:
        raise AssertionError("translated into an IPv4 packet of more than 65535 octets")


def test_a_packet_that_raises_costs_only_itself(monkeypatch):
    # The net under translate.py: a bug costs a counted packet and one log
    # line, and the next packet is translated as usual.
    lines: list[str] = []
    gw = _mapped_gateway()
    gw.log = lines.append
    good = ipv4_example()
    monkeypatch.setattr(t, "parse4", lambda pkt, pool: [][0])
    gw.packet(good, 0.1)
    gw.packet(good, 0.1)
    monkeypatch.undo()
    gw.packet(good, 0.1)
    assert gw.counts[core.DROP_BUG] == 2 and gw.counts["to_ipv6"] == 1
    assert len(lines) == 1 and "IndexError" in lines[0]


def ipv4_example() -> bytes:
    seg = struct.pack("!HHHH", 80, NAT_PORT, 8, 0)
    return (
        with_csum(struct.pack("!BBHHHBBH", 0x45, 0, 28, 0, 0x4000, 64, t.UDP, 0) + HOST + POOL, 10)
        + seg
    )
