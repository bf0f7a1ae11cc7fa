"""RFC 7915 translation on hand-built packets. Checksums are checked with the
plain word-by-word algorithm here, not the module's."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nat64ho.gateway import translate as t

PREFIX = ipaddress.IPv6Address("64:ff9b::").packed[:12]
POOL = ipaddress.IPv4Address("192.0.2.9").packed
HOST = ipaddress.IPv4Address("192.0.2.1").packed
ROUTER4 = ipaddress.IPv4Address("192.0.2.2").packed
CLIENT = ipaddress.IPv6Address("2001:db8:1::10").packed
ROUTER6 = ipaddress.IPv6Address("2001:db8:1::1").packed
HOST6 = PREFIX + HOST
NAT_PORT = 47102
CPORT = 53186


def ref_sum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = 0
    for i in range(0, len(data), 2):
        s += data[i] << 8 | data[i + 1]
        s = (s & 0xFFFF) + (s >> 16)
    return s


def ref_csum(data: bytes) -> int:
    return ~ref_sum(data) & 0xFFFF


def pseudo4(src, dst, proto, length):
    return src + dst + struct.pack("!xBH", proto, length)


def pseudo6(src, dst, nh, length):
    return src + dst + struct.pack("!IxxxB", length, nh)


def with_csum(body: bytes, at: int, pseudo: bytes = b"", udp: bool = False) -> bytes:
    body = body[:at] + b"\0\0" + body[at + 2 :]
    c = ref_csum(pseudo + body)
    if udp and c == 0:
        c = 0xFFFF
    return body[:at] + c.to_bytes(2, "big") + body[at + 2 :]


def ip6(src, dst, nh, payload, hlim=64, tc=0, ext=b""):
    return (
        struct.pack("!IHBB", (6 << 28) | (tc << 20), len(ext) + len(payload), nh, hlim)
        + src
        + dst
        + ext
        + payload
    )


def ip4(src, dst, proto, payload, ttl=64, frag=0x4000, tos=0, ident=0):
    h = struct.pack(
        "!BBHHHBBH4s4s", 0x45, tos, 20 + len(payload), ident, frag, ttl, proto, 0, src, dst
    )
    return with_csum(h, 10) + payload


def tcp(sport, dport, src, dst, data=b"hello", flags=0x02):
    h = struct.pack("!HHIIBBHHH", sport, dport, 1000, 0, 5 << 4, flags, 65535, 0, 0) + data
    ps = pseudo6(src, dst, 6, len(h)) if len(src) == 16 else pseudo4(src, dst, 6, len(h))
    return with_csum(h, 16, ps)


def udp(sport, dport, src, dst, data=b"ping", zero=False):
    h = struct.pack("!HHHH", sport, dport, 8 + len(data), 0) + data
    if zero:
        return h
    ps = pseudo6(src, dst, 17, len(h)) if len(src) == 16 else pseudo4(src, dst, 17, len(h))
    return with_csum(h, 6, ps, udp=True)


def icmp6(kind, code, rest, data, src, dst):
    body = bytes((kind, code, 0, 0)) + rest + data
    return with_csum(body, 2, pseudo6(src, dst, 58, len(body)))


def icmp4(kind, code, rest, data):
    return with_csum(bytes((kind, code, 0, 0)) + rest + data, 2)


def check_ipv4(pkt: bytes, proto: int, src: bytes, dst: bytes) -> bytes:
    """Asserts a well-formed IPv4 packet; returns its payload."""
    assert pkt[0] == 0x45
    assert int.from_bytes(pkt[2:4], "big") == len(pkt)
    assert ref_csum(pkt[:20]) == 0
    assert pkt[9] == proto and pkt[12:16] == src and pkt[16:20] == dst
    return pkt[20:]


def check_ipv6(pkt: bytes, nh: int, src: bytes, dst: bytes) -> bytes:
    assert pkt[0] >> 4 == 6
    assert int.from_bytes(pkt[4:6], "big") == len(pkt) - 40
    assert pkt[6] == nh and pkt[8:24] == src and pkt[24:40] == dst
    return pkt[40:]


def out6(pkt, port=NAT_PORT):
    return t.to_ipv4(pkt, t.parse6(pkt, PREFIX), POOL, port)


def in4(pkt, client=CLIENT, port=CPORT):
    return t.to_ipv6(pkt, t.parse4(pkt, POOL), PREFIX, client, port)


# ------------------------------------------------------------------ TCP, UDP


@pytest.mark.parametrize("data", [b"", b"x", b"hello world" * 100])
def test_tcp_6_to_4_rewrites_source_and_updates_checksum(data):
    pkt = ip6(CLIENT, HOST6, 6, tcp(CPORT, 80, CLIENT, HOST6, data), hlim=63, tc=0xB8)
    p = t.parse6(pkt, PREFIX)
    assert (p.client, p.port, p.dst4, p.proto, p.error) == (CLIENT, CPORT, HOST, 6, False)
    out = t.to_ipv4(pkt, p, POOL, NAT_PORT)
    body = check_ipv4(out, 6, POOL, HOST)
    assert out[1] == 0xB8 and out[8] == 63  # traffic class -> TOS, hop limit -> TTL
    assert int.from_bytes(out[6:8], "big") == 0x4000  # DF, no fragment
    assert int.from_bytes(body[0:2], "big") == NAT_PORT and int.from_bytes(body[2:4], "big") == 80
    assert body[20:] == data
    assert ref_csum(pseudo4(POOL, HOST, 6, len(body)) + body) == 0


def test_tcp_4_to_6_rewrites_destination_and_updates_checksum():
    pkt = ip4(HOST, POOL, 6, tcp(80, NAT_PORT, HOST, POOL, b"reply" * 50), ttl=61, tos=0x10)
    p = t.parse4(pkt, POOL)
    assert (p.src4, p.host, p.nat_port, p.error) == (HOST, HOST, NAT_PORT, False)
    out = in4(pkt)
    body = check_ipv6(out, 6, HOST6, CLIENT)
    assert out[7] == 61 and ((out[0] & 0xF) << 4 | out[1] >> 4) == 0x10
    assert int.from_bytes(body[2:4], "big") == CPORT
    assert ref_csum(pseudo6(HOST6, CLIENT, 6, len(body)) + body) == 0


@pytest.mark.parametrize("zero", [False, True])
def test_udp_4_to_6_checksum_valid_even_from_zero(zero):
    pkt = ip4(HOST, POOL, 17, udp(7007, NAT_PORT, HOST, POOL, b"answer", zero=zero))
    body = check_ipv6(in4(pkt), 17, HOST6, CLIENT)
    assert body[6:8] != b"\0\0"
    assert ref_csum(pseudo6(HOST6, CLIENT, 17, len(body)) + body) == 0
    assert body[8:] == b"answer"


def test_udp_6_to_4_round_trip_restores_the_packet():
    pkt = ip6(CLIENT, HOST6, 17, udp(CPORT, 7007, CLIENT, HOST6, b"q" * 33))
    v4 = out6(pkt)
    body = check_ipv4(v4, 17, POOL, HOST)
    assert ref_csum(pseudo4(POOL, HOST, 17, len(body)) + body) == 0
    # The reply, built by swapping what the host saw, comes back to the client.
    reply = ip4(HOST, POOL, 17, udp(7007, NAT_PORT, HOST, POOL, b"q" * 33))
    back = check_ipv6(in4(reply), 17, HOST6, CLIENT)
    assert back == udp(7007, CPORT, HOST6, CLIENT, b"q" * 33)


def test_extension_headers_are_skipped_and_atomic_fragments_translated():
    seg = udp(CPORT, 7007, CLIENT, HOST6)
    hbh = bytes((60, 0, 1, 4, 0, 0, 0, 0))  # hop-by-hop (PadN) -> destination options
    dst = bytes((44, 0, 1, 4, 0, 0, 0, 0))  # destination options -> fragment
    frag = bytes((17, 0, 0, 0, 0, 0, 0, 7))  # atomic fragment: offset 0, M clear
    pkt = ip6(CLIENT, HOST6, 0, seg, ext=hbh + dst + frag)
    body = check_ipv4(out6(pkt), 17, POOL, HOST)
    assert len(body) == len(seg) and body[8:] == b"ping"
    assert ref_csum(pseudo4(POOL, HOST, 17, len(body)) + body) == 0


# ------------------------------------------------------------------ ICMP echo


def test_echo_request_6_to_4_uses_nat_port_as_identifier():
    pkt = ip6(
        CLIENT, HOST6, 58, icmp6(128, 0, struct.pack("!HH", CPORT, 3), b"abc" * 10, CLIENT, HOST6)
    )
    p = t.parse6(pkt, PREFIX)
    assert (p.port, p.error) == (CPORT, False)
    body = check_ipv4(t.to_ipv4(pkt, p, POOL, NAT_PORT), 1, POOL, HOST)
    assert body[0:2] == b"\x08\x00" and body[4:8] == struct.pack("!HH", NAT_PORT, 3)
    assert ref_csum(body) == 0  # ICMPv4: no pseudo-header


def test_echo_reply_4_to_6_restores_identifier():
    pkt = ip4(HOST, POOL, 1, icmp4(0, 0, struct.pack("!HH", NAT_PORT, 3), b"abc" * 10))
    assert t.parse4(pkt, POOL).nat_port == NAT_PORT
    body = check_ipv6(in4(pkt), 58, HOST6, CLIENT)
    assert body[0:2] == bytes((129, 0)) and body[4:8] == struct.pack("!HH", CPORT, 3)
    assert ref_csum(pseudo6(HOST6, CLIENT, 58, len(body)) + body) == 0


# ------------------------------------------------------------------ ICMP errors


def test_port_unreachable_4_to_6_translates_the_embedded_packet():
    sent = ip4(POOL, HOST, 17, udp(NAT_PORT, 9999, POOL, HOST, b"lost"))
    err = ip4(HOST, POOL, 1, icmp4(3, 3, b"\0" * 4, sent))
    p = t.parse4(err, POOL)
    assert (p.nat_port, p.host, p.error) == (NAT_PORT, HOST, True)
    body = check_ipv6(in4(err), 58, HOST6, CLIENT)
    assert body[:2] == bytes((1, 4))  # destination unreachable, port unreachable
    assert ref_csum(pseudo6(HOST6, CLIENT, 58, len(body)) + body) == 0
    inner = body[8:]
    inner_body = check_ipv6(inner, 17, CLIENT, HOST6)
    assert inner_body == udp(CPORT, 9999, CLIENT, HOST6, b"lost")


@pytest.mark.parametrize("mtu,expected", [(1400, 1420), (576, 1280)])
def test_fragmentation_needed_becomes_packet_too_big(mtu, expected):
    sent = ip4(POOL, HOST, 6, tcp(NAT_PORT, 80, POOL, HOST, b"x" * 100))[:48]
    err = ip4(ROUTER4, POOL, 1, icmp4(3, 4, struct.pack("!HH", 0, mtu), sent))
    p = t.parse4(err, POOL)
    assert (p.src4, p.host) == (ROUTER4, HOST)
    body = check_ipv6(in4(err), 58, PREFIX + ROUTER4, CLIENT)
    assert body[:2] == bytes((2, 0)) and int.from_bytes(body[4:8], "big") == expected
    assert ref_csum(pseudo6(PREFIX + ROUTER4, CLIENT, 58, len(body)) + body) == 0
    inner = body[8:]
    assert inner[8:24] == CLIENT and inner[24:40] == HOST6
    assert int.from_bytes(inner[4:6], "big") == 20 + 100  # the original length, not the quote's
    assert int.from_bytes(inner[40:42], "big") == CPORT


def test_packet_too_big_6_to_4_from_a_router():
    delivered = ip6(HOST6, CLIENT, 6, tcp(80, CPORT, HOST6, CLIENT, b"y" * 1200))
    err = ip6(
        ROUTER6, HOST6, 58, icmp6(2, 0, (1300).to_bytes(4, "big"), delivered[:1232], ROUTER6, HOST6)
    )
    p = t.parse6(err, PREFIX)
    assert (p.client, p.port, p.error) == (CLIENT, CPORT, True)
    out = t.to_ipv4(err, p, POOL, NAT_PORT)
    body = check_ipv4(out, 1, POOL, HOST)
    assert len(out) <= t.ICMP4_ERROR_MAX
    assert body[:2] == bytes((3, 4)) and int.from_bytes(body[6:8], "big") == 1280
    assert ref_csum(body) == 0
    inner = body[8:]
    assert ref_csum(inner[:20]) == 0
    assert inner[12:16] == HOST and inner[16:20] == POOL
    assert int.from_bytes(inner[22:24], "big") == NAT_PORT
    assert int.from_bytes(inner[2:4], "big") == 20 + 20 + 1200


@pytest.mark.parametrize(
    "v6,v4",
    [((1, 4), (3, 3)), ((1, 0), (3, 1)), ((1, 1), (3, 10)), ((3, 0), (11, 0)), ((4, 1), (3, 2))],
)
def test_icmp6_error_type_mapping(v6, v4):
    delivered = ip6(HOST6, CLIENT, 17, udp(7007, CPORT, HOST6, CLIENT))
    err = ip6(CLIENT, HOST6, 58, icmp6(*v6, b"\0" * 4, delivered, CLIENT, HOST6))
    body = check_ipv4(out6(err), 1, POOL, HOST)
    assert tuple(body[:2]) == v4
    assert ref_csum(body) == 0


def test_parameter_problem_pointer_is_mapped():
    delivered = ip6(HOST6, CLIENT, 17, udp(7007, CPORT, HOST6, CLIENT))
    err = ip6(CLIENT, HOST6, 58, icmp6(4, 0, (7).to_bytes(4, "big"), delivered, CLIENT, HOST6))
    body = check_ipv4(out6(err), 1, POOL, HOST)
    assert tuple(body[:2]) == (12, 0) and body[4] == 8  # hop limit -> TTL


@pytest.mark.parametrize(
    "v4,v6", [((3, 1), (1, 0)), ((3, 13), (1, 1)), ((11, 0), (3, 0)), ((3, 2), (4, 1))]
)
def test_icmp4_error_type_mapping(v4, v6):
    sent = ip4(POOL, HOST, 17, udp(NAT_PORT, 7007, POOL, HOST))
    err = ip4(ROUTER4, POOL, 1, icmp4(*v4, b"\0" * 4, sent))
    body = check_ipv6(in4(err), 58, PREFIX + ROUTER4, CLIENT)
    assert tuple(body[:2]) == v6


# ------------------------------------------------------------------ drops


def drop6(pkt) -> str:
    with pytest.raises(t.Untranslatable) as info:
        out6(pkt)
    return info.value.reason


def drop4(pkt) -> str:
    with pytest.raises(t.Untranslatable) as info:
        in4(pkt)
    return info.value.reason


def test_named_drops_ipv6():
    seg = udp(CPORT, 7007, CLIENT, HOST6)
    assert drop6(ip6(CLIENT, CLIENT, 17, seg)) == t.NOT_PREFIX
    frag = bytes((17, 0, 0, 1, 0, 0, 0, 7))  # M set: a real fragment
    assert drop6(ip6(CLIENT, HOST6, 44, seg, ext=frag)) == t.FRAGMENT
    routing = bytes((17, 0, 0, 1, 0, 0, 0, 0))  # segments left 1
    assert drop6(ip6(CLIENT, HOST6, 43, seg, ext=routing)) == t.ROUTING_HEADER
    assert drop6(ip6(CLIENT, HOST6, 50, b"\0" * 16)) == t.PROTOCOL  # ESP: no ports
    assert drop6(ip6(CLIENT, HOST6, 17, seg)[:45]) == t.TRUNCATED
    bad = bytearray(ip6(CLIENT, HOST6, 58, icmp6(128, 0, b"\0\1\0\1", b"x", CLIENT, HOST6)))
    bad[-1] ^= 0xFF
    assert drop6(bytes(bad)) == t.BAD_CHECKSUM
    assert (
        drop6(ip6(CLIENT, HOST6, 58, icmp6(135, 0, b"\0" * 4, b"", CLIENT, HOST6))) == t.ICMP_TYPE
    )
    assert drop6(b"\x45" + b"\0" * 50) == t.NOT_IPV6


def test_named_drops_ipv4():
    seg = udp(7007, NAT_PORT, HOST, POOL)
    assert drop4(ip4(HOST, POOL, 17, seg, frag=0x2000)) == t.FRAGMENT
    assert drop4(ip4(HOST, POOL, 17, seg, frag=0x0010)) == t.FRAGMENT
    assert drop4(ip4(HOST, HOST, 17, seg)) == t.NOT_POOL
    assert drop4(ip4(HOST, POOL, 47, b"\0" * 8)) == t.PROTOCOL  # GRE
    assert drop4(ip4(HOST, POOL, 1, icmp4(8, 0, b"\0\1\0\1", b""))) == t.ICMP_TYPE  # unsolicited
    assert drop4(ip4(HOST, POOL, 1, icmp4(5, 0, b"\0" * 4, b""))) == t.ICMP_TYPE  # redirect
    big = udp(7007, NAT_PORT, HOST, POOL, b"z" * 1300)
    assert drop4(ip4(HOST, POOL, 17, big, frag=0)) == t.NEEDS_FRAGMENTING
    assert in4(ip4(HOST, POOL, 17, big, frag=0x4000))  # with DF the kernel does PMTUD
    nested = ip4(POOL, HOST, 1, icmp4(3, 3, b"\0" * 4, b"\0" * 28))
    assert drop4(ip4(HOST, POOL, 1, icmp4(3, 1, b"\0" * 4, nested))) == t.BAD_EMBEDDED


def test_icmp6_error_we_send_quotes_the_packet():
    pkt = ip6(CLIENT, HOST6, 17, udp(CPORT, 53, CLIENT, HOST6, b"q" * 2000))
    err = t.icmp6_error(pkt, HOST6, 1, 1)
    body = check_ipv6(err, 58, HOST6, CLIENT)
    assert len(err) == t.IPV6_MIN_MTU and body[:2] == bytes((1, 1))
    assert ref_csum(pseudo6(HOST6, CLIENT, 58, len(body)) + body) == 0
    assert body[8:48] == pkt[:40]


def test_handoff_udp_packet():
    pkt = t.udp4(POOL, 1027, HOST, 6464, b"\x31\x0c" + b"\0" * 24)
    body = check_ipv4(pkt, 17, POOL, HOST)
    assert ref_csum(pseudo4(POOL, HOST, 17, len(body)) + body) == 0


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=120), st.integers(0, 1))
def test_any_bytes_translate_or_raise_untranslatable(data, version):
    # Force the version nibble and a destination in the prefix / the pool
    # half the time, so the fuzz reaches past the first checks.
    if version and len(data) >= 40:
        data = bytes((0x60 | data[0] & 0xF,)) + data[1:24] + HOST6 + data[40:]
    elif len(data) >= 20:
        data = bytes((0x45,)) + data[1:16] + POOL + data[20:]
    try:
        out = out6(data)
    except t.Untranslatable as exc:
        assert exc.reason in t.REASONS
    else:  # a well-formed IPv4 packet from the pool
        assert out[0] == 0x45 and int.from_bytes(out[2:4], "big") == len(out)
        assert ref_csum(out[:20]) == 0 and out[12:16] == POOL
    try:
        out = in4(data)
    except t.Untranslatable as exc:
        assert exc.reason in t.REASONS
    else:  # a well-formed IPv6 packet to the client
        assert out[0] >> 4 == 6 and int.from_bytes(out[4:6], "big") == len(out) - 40
        assert out[24:40] == CLIENT
