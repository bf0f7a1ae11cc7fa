"""The Wireshark dissector (contrib/wireshark/nat64ho.lua) read back through
tshark: a pcap written here from nat64ho.core.wire's own encodings (docs/protocol.md §8
vectors, inner packets, malformed datagrams) and the fields tshark decodes.
Also checks that the dissector and wire.parse call the same datagrams
malformed, for the same reason."""

from __future__ import annotations

import random
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from nat64ho.core import wire

LUA = Path(__file__).resolve().parent.parent / "contrib/wireshark/nat64ho.lua"
TSHARK = shutil.which("tshark")
pytestmark = pytest.mark.skipif(TSHARK is None, reason="tshark is not installed")

NAT64 = bytes([192, 0, 2, 9])
SERVER = bytes([192, 0, 2, 1])
NAT64_PORT = 40000
SERVER_PORT = wire.DEFAULT_PORT
V6_55 = bytes.fromhex("20010db8000000000000000000000055")
V6_75 = bytes.fromhex("20010db8000000000000000000000075")
COOKIE = bytes.fromhex("e2fb334fd4de5567")
BOOT = bytes.fromhex("0102030405060708")


# ---------------------------------------------------------------- pcap writing


def checksum(data: bytes) -> int:
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def ipv4(src: bytes, dst: bytes, payload: bytes, proto: int = 17) -> bytes:
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0, 0, 64, proto, 0, src, dst)
    return header[:10] + struct.pack("!H", checksum(header)) + header[12:] + payload


def ipv6(src: bytes, dst: bytes, payload: bytes, next_header: int = 17) -> bytes:
    return struct.pack("!IHBB16s16s", 6 << 28, len(payload), next_header, 64, src, dst) + payload


def udp(sport: int, dport: int, payload: bytes) -> bytes:
    # Checksum 0: "none" is allowed over IPv4 and keeps the test independent
    # of Wireshark's checksum preferences.
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def to_server(payload: bytes) -> bytes:
    return ipv4(NAT64, SERVER, udp(NAT64_PORT, SERVER_PORT, payload))


def to_nat64(payload: bytes) -> bytes:
    return ipv4(SERVER, NAT64, udp(SERVER_PORT, NAT64_PORT, payload))


def write_pcap(path: Path, packets: list[bytes]) -> None:
    ethernet = b"\x02\x00\x00\x00\x00\x01" + b"\x02\x00\x00\x00\x00\x02" + b"\x08\x00"
    with path.open("wb") as out:
        out.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))  # LINKTYPE_ETHERNET
        for i, packet in enumerate(packets):
            frame = ethernet + packet
            out.write(struct.pack("<IIII", 1_700_000_000 + i, 0, len(frame), len(frame)))
            out.write(frame)


FIELDS = [
    "nat64ho.direction",
    "nat64ho.type",
    "nat64ho.length",
    "nat64ho.group",
    "nat64ho.version",
    "nat64ho.flags",
    "nat64ho.boot_id",
    "nat64ho.cookie",
    "nat64ho.first_port",
    "nat64ho.last_port",
    "nat64ho.nat_port",
    "nat64ho.ipv6_addr",
    "nat64ho.ipv6_port",
    "nat64ho.error_code",
    "nat64ho.error_offending",
    "nat64ho.payload",
    "nat64ho.malformed",
    "ip.dst",
    "ipv6.dst",
    "udp.dstport",
    "_ws.col.Protocol",
    "_ws.col.Info",
    "_ws.expert.message",
]


def dissect(tmp_path: Path, packets: list[bytes]) -> list[dict[str, list[str]]]:
    """tshark's fields for each packet: name -> every occurrence, in order."""
    pcap = tmp_path / "capture.pcap"
    write_pcap(pcap, packets)
    cmd = [
        TSHARK,
        "-n",
        "-X",
        f"lua_script:{LUA}",
        "-r",
        str(pcap),
        "-T",
        "fields",
        "-E",
        "separator=\t",
        "-E",
        "occurrence=a",
        "-E",
        "aggregator=|",
        "-E",
        "quote=n",
    ]
    for name in FIELDS:
        cmd += ["-e", name]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    # tshark keeps going (status 0) when a Lua script fails to load.
    assert proc.returncode == 0 and "Lua" not in proc.stderr, proc.stderr
    rows = []
    for line in proc.stdout.splitlines():
        values = line.split("\t")
        rows.append(
            {name: (v.split("|") if v else []) for name, v in zip(FIELDS, values, strict=False)}
        )
    assert len(rows) == len(packets)
    return rows


# ---------------------------------------------------------------- the §8 vectors

VECTORS = [
    to_server(bytes.fromhex("310c010001020304050607080000000000000000000000000000")),
    to_nat64(bytes.fromhex("320c01000404ffffe2fb334fd4de556701020304050607080000")),
    to_server(bytes.fromhex("3004e2fb334fd4de5567330920010db80000000000000000000000558753")),
    to_nat64(
        bytes.fromhex(
            "380ab7fe20010db8000000000000000000000075816b"
            "340ab7fe20010db80000000000000000000000558753"
        )
    ),
    to_server(bytes.fromhex("3004e2fb334fd4de55673501b7fe3702b7fe0e87")),
    to_nat64(
        wire.build([wire.Unmapped(3719), wire.Error(wire.ErrorCode.TABLE_FULL, wire.Kind.MAP)])
    ),
]


@pytest.fixture(scope="module")
def vectors(tmp_path_factory):
    return dissect(tmp_path_factory.mktemp("vectors"), VECTORS)


def test_hello(vectors):
    hello = vectors[0]
    assert hello["nat64ho.direction"] == ["NAT64 to server"]
    assert hello["nat64ho.type"] == ["0x31"] and hello["nat64ho.length"] == ["12"]
    assert hello["nat64ho.version"] == ["1"] and hello["nat64ho.flags"] == ["0x00"]
    assert hello["nat64ho.boot_id"] == ["0102030405060708"]
    assert hello["_ws.col.Protocol"] == ["NAT64HO"]
    assert hello["_ws.col.Info"] == ["-> server: HELLO boot 0102030405060708"]
    assert hello["nat64ho.malformed"] == [] and hello["_ws.expert.message"] == []


def test_welcome(vectors):
    welcome = vectors[1]
    assert welcome["nat64ho.direction"] == ["server to NAT64"]
    assert welcome["nat64ho.type"] == ["0x32"]
    assert (welcome["nat64ho.first_port"], welcome["nat64ho.last_port"]) == (["1028"], ["65535"])
    assert welcome["nat64ho.cookie"] == ["e2fb334fd4de5567"]
    assert welcome["nat64ho.boot_id"] == ["0102030405060708"]


def test_cookie_and_map(vectors):
    row = vectors[2]
    assert row["nat64ho.type"] == ["0x30", "0x33"]
    assert row["nat64ho.cookie"] == ["e2fb334fd4de5567"]
    assert row["nat64ho.ipv6_addr"] == ["2001:db8::55"] and row["nat64ho.ipv6_port"] == ["34643"]
    assert row["_ws.col.Info"] == ["-> server: COOKIE, MAP [2001:db8::55]:34643"]


def test_deleted_then_mapping(vectors):
    row = vectors[3]
    assert row["nat64ho.type"] == ["0x38", "0x34"]
    assert row["nat64ho.nat_port"] == ["47102", "47102"]
    assert row["nat64ho.ipv6_addr"] == ["2001:db8::75", "2001:db8::55"]
    assert row["nat64ho.ipv6_port"] == ["33131", "34643"]


def test_lookup_and_touch(vectors):
    row = vectors[4]
    assert row["nat64ho.type"] == ["0x30", "0x35", "0x37"]
    assert row["nat64ho.length"] == ["4", "1", "2"]
    assert row["nat64ho.nat_port"] == ["47102", "47102", "3719"]


def test_unmapped_and_error(vectors):
    row = vectors[5]
    assert row["nat64ho.type"] == ["0x36", "0x39"]
    assert row["nat64ho.nat_port"] == ["3719"]
    assert row["nat64ho.error_code"] == ["5"] and row["nat64ho.error_offending"] == ["0x33"]
    assert row["_ws.col.Info"] == ["-> NAT64: UNMAPPED 3719, ERROR TABLE_FULL"]


# ---------------------------------------------------------------- skipped messages


def test_inner_packets_go_to_wireshark_ip_dissectors(tmp_path):
    inner4 = ipv4(bytes([198, 51, 100, 7]), bytes([203, 0, 113, 5]), udp(1234, 53, b"query"))
    inner6 = ipv6(V6_55, V6_75, udp(34643, 443, b"hello"))
    unassigned = wire.encode(wire.Unassigned(0x3A, b"\x00\x01"))
    (row,) = dissect(
        tmp_path, [to_server(wire.build([wire.Cookie(COOKIE)]) + inner4 + inner6 + unassigned)]
    )
    assert row["nat64ho.group"] == ["0x03", "0x04", "0x06", "0x03"]
    assert row["nat64ho.type"] == ["0x30", "0x3a"]
    assert row["nat64ho.payload"] == ["0001"]
    # The outer header, then the inner ones as Wireshark's own dissectors read them.
    assert row["ip.dst"] == ["192.0.2.1", "203.0.113.5"]
    assert row["ipv6.dst"] == ["2001:db8::75"]
    assert row["udp.dstport"] == ["6464", "53", "443"]
    assert row["nat64ho.malformed"] == []
    assert row["_ws.col.Protocol"] == ["NAT64HO"]
    assert row["_ws.col.Info"] == ["-> server: COOKIE, IPv4 packet, IPv6 packet, UNASSIGNED(0x3a)"]
    assert row["_ws.expert.message"].count("Well-formed, skipped by a v1 server") == 3


# ---------------------------------------------------------------- malformed

MALFORMED = [
    (to_server(bytes.fromhex("3004e2fb334fd4de55")), wire.TRUNCATED),
    (to_server(bytes.fromhex("3004e2fb334fd4de556733")), wire.TRUNCATED),
    (to_server(bytes.fromhex("3004e2fb334fd4de55673502b7fe0000")), wire.BAD_LENGTH),
    (
        to_server(bytes.fromhex("340ab7fe20010db80000000000000000000000558753")),
        wire.WRONG_DIRECTION,
    ),
    (to_nat64(bytes.fromhex("3501b7fe")), wire.WRONG_DIRECTION),
    (to_server(bytes.fromhex("3004e2fb334fd4de55677f00")), wire.RESERVED_GROUP),
    (to_server(bytes.fromhex("3004e2fb334fd4de556745000010")), wire.BAD_PACKET),
    (to_server(bytes.fromhex("3004e2fb334fd4de55674500")), wire.TRUNCATED),
    (to_server(bytes.fromhex("3004e2fb334fd4de5567600000000008")), wire.TRUNCATED),
]


def test_malformed_datagrams_are_flagged_with_wire_reasons(tmp_path):
    rows = dissect(tmp_path, [packet for packet, _ in MALFORMED])
    for (packet, reason), row in zip(MALFORMED, rows, strict=False):
        assert row["nat64ho.malformed"] == [reason], packet.hex()
        assert "Malformed: the whole datagram is dropped" in row["_ws.expert.message"]
        assert row["_ws.col.Info"][0].endswith(f"[Malformed: {reason}]")


def payload_of(packet: bytes) -> bytes:
    return packet[28:]


def wire_reason(payload: bytes, direction: wire.Direction) -> str:
    try:
        wire.parse(payload, direction)
    except wire.Malformed as exc:
        return exc.reason
    return ""


def test_dissector_and_wire_agree_on_what_is_malformed(tmp_path):
    # Mutations of valid datagrams in both directions: cut, extended, with an
    # octet changed. wire.parse is the reference; the dissector must say the
    # same reason, or nothing when wire accepts it. Seeded, so a failure
    # reproduces.
    rng = random.Random(6464)
    seeds = [payload_of(p) for p in VECTORS] + [payload_of(p) for p, _ in MALFORMED]
    cases: list[tuple[bytes, wire.Direction]] = []
    while len(cases) < 300:
        data = bytearray(rng.choice(seeds))
        op = rng.randrange(3)
        if op == 0 and len(data) > 1:
            del data[rng.randrange(1, len(data)) :]
        elif op == 1:
            data += bytes(rng.randrange(256) for _ in range(rng.randrange(1, 6)))
        else:
            data[rng.randrange(len(data))] = rng.randrange(256)
        direction = rng.choice(list(wire.Direction))
        cases.append((bytes(data), direction))
    packets = [
        to_server(d) if direction is wire.Direction.TO_SERVER else to_nat64(d)
        for d, direction in cases
    ]
    rows = dissect(tmp_path, packets)
    mismatches = []
    for (data, direction), row in zip(cases, rows, strict=False):
        expected = wire_reason(data, direction)
        got = row["nat64ho.malformed"][0] if row["nat64ho.malformed"] else ""
        if got != expected:
            mismatches.append((data.hex(), direction.value, expected, got))
    assert not mismatches, mismatches[:10]
    # The mix exercised both outcomes and several reasons.
    reasons = {wire_reason(d, direction) for d, direction in cases}
    assert "" in reasons and len(reasons) >= 4, reasons
