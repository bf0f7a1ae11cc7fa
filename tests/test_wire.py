"""The codec against docs/protocol.md §8's vectors, round trips, and the
invariant that any bytes parse or raise wire.Malformed."""

from __future__ import annotations

import hashlib
import hmac

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nat64ho.core import wire
from nat64ho.core.wire import Direction

SECRET = bytes(range(32))
NAT = bytes([192, 0, 2, 9])
BOOT = bytes.fromhex("0102030405060708")
V55 = bytes.fromhex("20010db8000000000000000000000055")
V75 = bytes.fromhex("20010db8000000000000000000000075")

VECTORS = [
    ("310c010001020304050607080000000000000000000000000000", Direction.TO_SERVER, wire.Hello(BOOT)),
    (
        "320c01000404ffffe2fb334fd4de556701020304050607080000",
        Direction.TO_NAT64,
        wire.Welcome(1028, 65535, bytes.fromhex("e2fb334fd4de5567"), BOOT),
    ),
    ("3004e2fb334fd4de5567", Direction.TO_SERVER, wire.Cookie(bytes.fromhex("e2fb334fd4de5567"))),
    ("330920010db80000000000000000000000558753", Direction.TO_SERVER, wire.Map(V55, 34643)),
    (
        "380ab7fe20010db8000000000000000000000075816b",
        Direction.TO_NAT64,
        wire.Deleted(47102, V75, 33131),
    ),
    (
        "340ab7fe20010db80000000000000000000000558753",
        Direction.TO_NAT64,
        wire.Mapping(47102, V55, 34643),
    ),
    ("3501b7fe", Direction.TO_SERVER, wire.Lookup(47102)),
    ("3702b7fe0e87", Direction.TO_SERVER, wire.Touch((47102, 3719))),
]


def test_cookie_vector():
    cookie = hmac.new(SECRET, NAT + BOOT, hashlib.sha256).digest()[:8]
    assert cookie.hex() == "e2fb334fd4de5567"


@pytest.mark.parametrize("hexdata,direction,message", VECTORS)
def test_vectors_parse_and_build(hexdata, direction, message):
    data = bytes.fromhex(hexdata)
    assert wire.parse(data, direction) == [message]
    assert wire.encode(message) == data


def test_whole_datagram_in_order():
    data = bytes.fromhex(
        "".join(h for h, d, _ in VECTORS if d is Direction.TO_SERVER and h[:2] != "31")
    )
    assert wire.parse(data) == [
        m for h, d, m in VECTORS if d is Direction.TO_SERVER and h[:2] != "31"
    ]


def test_welcome_is_no_longer_than_hello():
    # docs/protocol.md §7: a HELLO earns at most as many octets as it carried.
    assert len(wire.encode(wire.Welcome(1, 2, b"c" * 8, BOOT))) <= len(
        wire.encode(wire.Hello(BOOT))
    )


@pytest.mark.parametrize(
    "data,reason",
    [
        (b"", wire.EMPTY),
        (b"\x10\x00", wire.RESERVED_GROUP),
        (b"\x50", wire.RESERVED_GROUP),
        (b"\x33", wire.TRUNCATED),
        (b"\x33\x09" + b"\x00" * 17, wire.TRUNCATED),
        (b"\x33\x08" + b"\x00" * 16, wire.BAD_LENGTH),
        (b"\x37\x00", wire.BAD_LENGTH),
        (b"\x30\x05" + b"\x00" * 10, wire.BAD_LENGTH),
        (bytes.fromhex("340ab7fe20010db80000000000000000000000558753"), wire.WRONG_DIRECTION),
        (b"\x45\x00\x00\x10" + b"\x00" * 12, wire.BAD_PACKET),
        (b"\x45\x00\x00\x20" + b"\x00" * 20, wire.TRUNCATED),
        (b"\x60\x00\x00\x00\x00\x08" + b"\x00" * 40, wire.TRUNCATED),
        # One bad message spoils the whole datagram, wherever it is.
        (bytes.fromhex("3004e2fb334fd4de55673501b7fe10"), wire.RESERVED_GROUP),
    ],
)
def test_malformed_has_a_reason(data, reason):
    with pytest.raises(wire.Malformed) as info:
        wire.parse(data)
    assert info.value.reason == reason


def test_server_bound_messages_rejected_by_a_nat64():
    with pytest.raises(wire.Malformed) as info:
        wire.parse(bytes.fromhex("3501b7fe"), Direction.TO_NAT64)
    assert info.value.reason == wire.WRONG_DIRECTION


def test_unassigned_and_packets_are_well_formed_and_kept_apart():
    ipv4 = b"\x45\x00\x00\x14" + b"\x00" * 16
    ipv6 = b"\x60\x00\x00\x00\x00\x02" + b"\x00" * 34 + b"\xaa\xbb"
    data = b"\x3a\x01\xab\xcd" + ipv4 + ipv6 + bytes.fromhex("3501b7fe")
    assert wire.parse(data) == [
        wire.Unassigned(0x3A, b"\xab\xcd"),
        wire.Packet(4, ipv4),
        wire.Packet(6, ipv6),
        wire.Lookup(47102),
    ]


def test_encode_rejects_bad_fields():
    with pytest.raises(ValueError):
        wire.encode(wire.Map(b"short", 1))
    with pytest.raises(ValueError):
        wire.encode(wire.Lookup(70000))
    with pytest.raises(ValueError):
        wire.encode(wire.Touch(()))


def test_pack_keeps_units_whole_and_under_the_limit():
    mapping = wire.encode(wire.Mapping(1, V55, 2))
    deleted = wire.encode(wire.Deleted(1, V75, 3))
    units = [[deleted, mapping]] * 40 + [[mapping]] * 7
    datagrams = wire.pack(units)
    assert all(len(d) <= wire.MAX_DATAGRAM for d in datagrams)
    assert b"".join(datagrams) == b"".join(b"".join(u) for u in units)
    for d in datagrams:
        messages = wire.parse(d, Direction.TO_NAT64)
        for i, m in enumerate(messages):
            if isinstance(m, wire.Deleted):
                assert isinstance(messages[i + 1], wire.Mapping)


# ---------------------------------------------------------------- properties

addrs = st.binary(min_size=16, max_size=16)
ports = st.integers(0, 65535)
to_server = st.one_of(
    st.builds(wire.Cookie, st.binary(min_size=8, max_size=8)),
    st.builds(
        wire.Hello, st.binary(min_size=8, max_size=8), st.integers(0, 255), st.integers(0, 255)
    ),
    st.builds(wire.Map, addrs, ports),
    st.builds(wire.Lookup, ports),
    st.builds(wire.Touch, st.lists(ports, min_size=1, max_size=255).map(tuple)),
    st.builds(
        wire.Unassigned,
        st.integers(0x3A, 0x3F),
        st.binary(max_size=510).filter(lambda b: len(b) % 2 == 0),
    ),
)
to_nat64 = st.one_of(
    st.builds(
        wire.Welcome,
        ports,
        ports,
        st.binary(min_size=8, max_size=8),
        st.binary(min_size=8, max_size=8),
        st.integers(0, 255),
        st.integers(0, 255),
    ),
    st.builds(wire.Mapping, ports, addrs, ports),
    st.builds(wire.Unmapped, ports),
    st.builds(wire.Deleted, ports, addrs, ports),
    st.builds(wire.Error, st.integers(0, 255), st.integers(0, 255)),
)


@given(st.lists(to_server, min_size=1, max_size=12))
def test_round_trip_to_server(messages):
    assert wire.parse(wire.build(messages), Direction.TO_SERVER) == messages


@given(st.lists(to_nat64, min_size=1, max_size=12))
def test_round_trip_to_nat64(messages):
    assert wire.parse(wire.build(messages), Direction.TO_NAT64) == messages


@settings(max_examples=2000)
@given(st.binary(max_size=600), st.sampled_from(list(Direction)))
def test_any_bytes_parse_or_raise_malformed(data, direction):
    try:
        messages = wire.parse(data, direction)
    except wire.Malformed as exc:
        assert exc.reason in wire.REASONS
    else:
        # What parses is exactly the input again.
        assert wire.build(messages) == data


@settings(max_examples=1000)
@given(st.lists(to_server, min_size=1, max_size=6), st.data())
def test_mutated_datagrams_parse_or_raise_malformed(messages, data):
    raw = bytearray(wire.build(messages))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    try:
        parsed = wire.parse(bytes(raw[:cut]))
    except wire.Malformed as exc:
        assert exc.reason in wire.REASONS
    else:
        # What survives the damage is whole messages filling the datagram.
        # (Not octet for octet: HELLO's zero octets are not checked.)
        rebuilt = wire.build(parsed)
        assert len(rebuilt) == cut and wire.parse(rebuilt) == parsed


@given(st.integers(0, 65535), st.binary(min_size=16, max_size=16), st.integers(0, 65535))
def test_each_builder_equals_the_general_encoder(port, addr, aport):
    assert wire.mapping(port, addr, aport) == wire.encode(wire.Mapping(port, addr, aport))
    assert wire.deleted(port, addr, aport) == wire.encode(wire.Deleted(port, addr, aport))
    assert wire.unmapped(port) == wire.encode(wire.Unmapped(port))
    code, offending = port & 0xFF, aport & 0xFF
    assert wire.error(code, offending) == wire.encode(wire.Error(code, offending))


@pytest.mark.parametrize(
    "message",
    [
        wire.Mapping(1, b"short", 2),  # struct would pad it silently
        wire.Deleted(1, b"\x00" * 17, 2),
        wire.Map(b"\x00" * 15, 1),
        wire.Mapping(70000, b"\x00" * 16, 2),
        wire.Lookup(-1),
        wire.Error(256, 0x33),
        wire.Cookie(b"1234567"),
        wire.Hello(b"123456789"),
        wire.Touch(()),
    ],
)
def test_every_field_is_size_checked(message):
    with pytest.raises(ValueError):
        wire.encode(message)


def test_section_8_confirm_vector():
    # v1.2: a COOKIE, then the HELLO of the boot it confirms, in one datagram.
    data = bytes.fromhex("30048dcb0506d837aa41310c010001020304050607080000000000000000000000000000")
    cookie = hmac.new(SECRET, NAT + BOOT + (20000).to_bytes(4, "big"), hashlib.sha256)
    assert wire.parse(data) == [wire.Cookie(cookie.digest()[:8]), wire.Hello(BOOT)]
    assert wire.build([wire.Cookie(cookie.digest()[:8]), wire.Hello(BOOT)]) == data
    assert wire.head(data) == wire.Kind.COOKIE


@pytest.mark.parametrize(
    "data,reason",
    [
        (b"", wire.EMPTY),
        (b"\x10\x00", wire.RESERVED_GROUP),
        (b"\x33", wire.TRUNCATED),
        (b"\x33\x08" + b"\x00" * 16, wire.BAD_LENGTH),
        (bytes.fromhex("340ab7fe20010db80000000000000000000000558753"), wire.WRONG_DIRECTION),
        (b"\x45\x00\x00\x10" + b"\x00" * 12, wire.BAD_PACKET),
        (b"\x45\x00", wire.TRUNCATED),
        (b"\x60\x00\x00\x00\x00\x08" + b"\x00" * 40, wire.TRUNCATED),
    ],
)
def test_head_names_a_fault_of_the_first_message(data, reason):
    with pytest.raises(wire.Malformed) as info:
        wire.head(data)
    assert info.value.reason == reason


def test_head_looks_at_the_first_message_only():
    # 65,507 octets of junk after a well-formed LOOKUP: head does not look.
    data = bytes.fromhex("3501b7fe") + b"\x10" * 65503
    assert wire.head(data) == wire.Kind.LOOKUP
    with pytest.raises(wire.Malformed):
        wire.parse(data)


@settings(max_examples=2000)
@given(st.binary(max_size=80), st.sampled_from(list(Direction)))
def test_head_agrees_with_parse(data, direction):
    try:
        first = wire.head(data, direction)
    except wire.Malformed as exc:
        # parse checks the first message first: the same fault.
        with pytest.raises(wire.Malformed) as info:
            wire.parse(data, direction)
        assert info.value.reason == exc.reason
    else:
        try:
            wire.parse(data, direction)
        except wire.Malformed as exc:
            assert exc.offset > 0  # a fault after the first message
        assert first == data[0]
