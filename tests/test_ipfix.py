"""IPFIX export: the encoder's octets against vectors laid out by hand from
RFC 7011's field layouts, a reader of RFC 7011 messages as a round trip, the
UDP exporter on loopback, ``serve --ipfix`` options, and a real server
exporting to Debian's nfcapd, read back with nfdump."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import time
import urllib.request

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from nat64ho import cli, ipfix
from nat64ho.cli import serve as cli_serve
from nat64ho.core import wire
from nat64ho.daemon.ipfix_export import Exporter
from nat64ho.eventlog import Event, EventKind, parse_line
from tests.helpers import connect, run, v6, wait_for

NAT = int(ipaddress.IPv4Address("192.0.2.7"))
V17 = ipaddress.IPv6Address("2001:db8::17").packed
TS = 1552903588491727  # 2019-03-18 10:06:28.491727 UTC, in µs
CREATED = Event(TS, EventKind.CREATED, NAT, 3719, V17, 53186)
DELETED = Event(TS + 1000, EventKind.DELETED, NAT, 3719, V17, 53186)

# The template set, field by field (RFC 7011 §3.3.2, §3.4.1, §3.2).
TEMPLATE_SET_HEX = (
    "0002"
    "0028"  # set id 2 (template set), length 40
    "0100"
    "0008"  # template id 256, 8 fields
    "0143"
    "0008"  # observationTimeMilliseconds (323), 8 octets
    "0098"
    "0008"  # flowStartMilliseconds (152)
    "0099"
    "0008"  # flowEndMilliseconds (153)
    "00e6"
    "0001"  # natEvent (230), 1 octet
    "001b"
    "0010"  # sourceIPv6Address (27), 16 octets
    "0007"
    "0002"  # sourceTransportPort (7)
    "00e1"
    "0004"  # postNATSourceIPv4Address (225)
    "00e3"
    "0002"  # postNAPTSourceTransportPort (227)
)
# CREATED as a data record: 1552903588491 ms is 0x16990444a8b.
CREATED_RECORD_HEX = (
    "0000016990444a8b" * 3  # observation time, flow start, flow end
    + "0a"  # natEvent 10: NAT64 BIB create
    + "20010db8000000000000000000000017"  # [2001:db8::17]
    + "cfc2"  # :53186
    + "c0000207"  # 192.0.2.7
    + "0e87"  # :3719
)
NOW = 1552903588.9  # export time 0x5c8f6da4


def test_template_set_octets():
    assert ipfix.TEMPLATE_SET.hex() == TEMPLATE_SET_HEX
    assert ipfix.RECORD_SIZE == 49


def test_template_message_octets():
    enc = ipfix.Encoder(domain=0x01020304)
    m = enc.template(NOW)
    assert m.records == 0
    assert m.octets.hex() == (
        "000a"
        "0038"  # version 10, length 56 (16 + 40)
        "5c8f6da4"  # export time, seconds
        "00000000"  # sequence: no data records sent yet
        "01020304" + TEMPLATE_SET_HEX  # observation domain id
    )


def test_data_message_octets_and_sequence_numbers():
    enc = ipfix.Encoder()
    enc.template(NOW)
    [m] = enc.encode([CREATED], NOW)
    assert m.records == 1
    assert m.octets.hex() == (
        "000a"
        "0045"  # length 69: header 16, set header 4, record 49
        "5c8f6da4"
        "00000000"
        "00000000"
        "0100"
        "0035" + CREATED_RECORD_HEX  # data set of template 256, length 53
    )
    # The next message counts the record sent before it (RFC 7011 §3.1).
    [m] = enc.encode([DELETED, CREATED], NOW)
    header = struct.unpack("!HHIII", m.octets[:16])
    assert header == (10, 16 + 4 + 2 * 49, 0x5C8F6DA4, 1, 0)
    assert m.octets[20 + 24] == 11  # natEvent of the first: NAT64 BIB delete
    assert m.octets[20:28] == (TS // 1000 + 1).to_bytes(8, "big")
    assert enc.sequence == 3


def test_initialized_events_are_not_exported():
    enc = ipfix.Encoder()
    assert enc.encode([Event(TS, EventKind.INITIALIZED, NAT)], NOW) == []
    assert enc.sequence == 0


def test_sequence_number_wraps_at_2_32():
    enc = ipfix.Encoder()
    enc.sequence = 2**32 - 1
    [m] = enc.encode([CREATED, CREATED], NOW)
    assert m.octets[8:12] == b"\xff\xff\xff\xff"
    assert enc.sequence == 1


def test_records_are_packed_into_datagrams_of_at_most_max_datagram():
    enc = ipfix.Encoder()
    out = enc.encode([CREATED] * 100, NOW)
    # The first message carries the template: 28 records fit beside it, 29 without.
    assert [m.records for m in out] == [28, 29, 29, 14]
    assert out[0].octets[16:56] == ipfix.TEMPLATE_SET
    assert out[1].octets[16:18] == b"\x01\x00"
    assert max(len(m.octets) for m in out) <= wire.MAX_DATAGRAM == 1472
    assert len(out[1].octets) == 16 + 4 + 29 * 49
    assert [struct.unpack("!I", m.octets[8:12])[0] for m in out] == [0, 28, 57, 86]


def test_template_resent_after_refresh_interval_and_message_count():
    enc = ipfix.Encoder(refresh=60.0, every=3)

    def with_template(now):
        [m] = enc.encode([CREATED], now)
        return m.octets[16:18] == b"\x00\x02"

    assert [with_template(t) for t in (1000.0, 1030.0, 1059.9, 1060.0)] == [
        True,
        False,
        False,
        True,
    ]
    # A wall clock stepped back must not postpone it for as long as it stepped.
    assert with_template(500.0)
    # Every third message at the latest.
    assert [with_template(500.0 + i) for i in range(1, 7)] == [
        False,
        False,
        True,
        False,
        False,
        True,
    ]


def test_bad_encoder_settings_are_refused():
    with pytest.raises(ValueError, match="observation domain"):
        ipfix.Encoder(domain=2**32)
    with pytest.raises(ValueError, match="below one record"):
        ipfix.Encoder(limit=100)


def read_messages(datagrams: list[bytes]) -> tuple[list[dict], list[tuple[int, int, int]]]:
    """A reader of RFC 7011 messages, written from the RFC and not from the
    encoder: data records as {element id: value} through the templates
    seen, and (sequence, domain, export time) per message."""
    templates: dict[int, list[tuple[int, int]]] = {}
    records: list[dict] = []
    headers = []
    for d in datagrams:
        version, length, export, seq, domain = struct.unpack_from("!HHIII", d)
        assert version == 10 and length == len(d)
        headers.append((seq, domain, export))
        at = 16
        while at < length:
            set_id, set_len = struct.unpack_from("!HH", d, at)
            assert set_len >= 4 and at + set_len <= length
            body, at = d[at + 4 : at + set_len], at + set_len
            if set_id == 2:
                tid, count = struct.unpack_from("!HH", body)
                templates[tid] = [struct.unpack_from("!HH", body, 4 + 4 * i) for i in range(count)]
                continue
            fields = templates[set_id]  # a data set before its template: KeyError
            size = sum(n for _, n in fields)
            for off in range(0, len(body) - size + 1, size):
                rec, pos = {}, off
                for ie, n in fields:
                    rec[ie] = body[pos : pos + n]
                    pos += n
                records.append(rec)
    return records, headers


events = st.builds(
    Event,
    ts=st.integers(0, 2**52),
    kind=st.sampled_from(list(EventKind)),
    nat=st.integers(0, 2**32 - 1),
    port=st.integers(0, 65535),
    addr=st.binary(min_size=16, max_size=16),
    aport=st.integers(0, 65535),
)


@settings(max_examples=60, deadline=None)
@given(
    batches=st.lists(st.lists(events, max_size=80), max_size=5), domain=st.integers(0, 2**32 - 1)
)
def test_any_events_round_trip_through_an_rfc_7011_reader(batches, domain):
    enc = ipfix.Encoder(domain)
    datagrams = [enc.template(NOW).octets]
    sent = []
    for batch in batches:
        out = enc.encode(batch, NOW)
        assert all(len(m.octets) <= wire.MAX_DATAGRAM for m in out)
        datagrams += [m.octets for m in out]
        sent += [e for e in batch if e.kind != EventKind.INITIALIZED]
    records, headers = read_messages(datagrams)
    assert [
        (
            r[230][0],
            r[27],
            int.from_bytes(r[7], "big"),
            int.from_bytes(r[225], "big"),
            int.from_bytes(r[227], "big"),
            int.from_bytes(r[323], "big"),
        )
        for r in records
    ] == [
        (10 if e.kind == EventKind.CREATED else 11, e.addr, e.aport, e.nat, e.port, e.ts // 1000)
        for e in sent
    ]
    assert all(r[152] == r[153] == r[323] for r in records)
    # Each sequence number is the count of records in the messages before it.
    counts = [0] + [len(read_messages([datagrams[0], d])[0]) for d in datagrams[1:]]
    assert [h[0] for h in headers] == [sum(counts[:i]) for i in range(len(datagrams))]
    assert {h[1] for h in headers} == {domain}


# ---------------------------------------------------------------- the UDP side


def udp_listener() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    s.settimeout(10)
    return s


def test_exporter_sends_template_then_records_to_every_collector():
    a, b = udp_listener(), udp_listener()
    ex = Exporter([a.getsockname(), b.getsockname()], domain=7, clock=lambda: NOW)
    try:
        ex.start()
        ex.export([CREATED, Event(TS, EventKind.INITIALIZED, NAT), DELETED])
        for s in (a, b):
            first, second = s.recv(2000), s.recv(2000)
            records, headers = read_messages([first, second])
            assert [r[230] for r in records] == [b"\x0a", b"\x0b"]
            assert [h[:2] for h in headers] == [(0, 7), (0, 7)]
        assert [(c.messages, c.records, c.failures) for c in ex.collectors] == [(2, 2, {})] * 2
    finally:
        ex.close()
        a.close()
        b.close()


def test_an_ipv6_collector_gets_the_same_messages():
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.bind(("::1", 0))
    s.settimeout(10)
    ex = Exporter([("::1", s.getsockname()[1])], clock=lambda: NOW)
    try:
        ex.start()
        ex.export([CREATED])
        records, _ = read_messages([s.recv(2000), s.recv(2000)])
        assert records[0][27] == V17 and records[0][225] == NAT.to_bytes(4, "big")
        assert ex.collectors[0].name == f"[::1]:{s.getsockname()[1]}"
    finally:
        ex.close()
        s.close()


def test_a_collector_not_listening_is_counted_and_never_raises():
    # A port nobody listens on: the kernel answers ICMP port unreachable,
    # which the connected socket reports at a later send.
    s = udp_listener()
    dead = s.getsockname()
    s.close()
    ex = Exporter([dead], clock=lambda: NOW)
    try:
        ex.start()
        wait_for(lambda: ex.export([CREATED]) or ex.collectors[0].failures.get("refused"))
        c = ex.collectors[0]
        assert c.failures["refused"] >= 1
        assert c.messages + sum(c.failures.values()) == ex.encoder.sequence + 1
    finally:
        ex.close()


def test_an_unexpected_error_in_export_is_counted_not_raised(caplog):
    ex = Exporter([("127.0.0.1", 9)], clock=lambda: NOW)
    try:
        ex.start()
        ex.export([Event(TS, EventKind.CREATED, NAT, 1, None, 1)])  # no address: cannot encode
        ex.export([Event(TS, EventKind.CREATED, NAT, 1, None, 1)])
    finally:
        ex.close()
    assert ex.errors == 2
    assert caplog.text.count("IPFIX export failed") == 1


# ---------------------------------------------------------------- the CLI


@pytest.mark.parametrize(
    "args,line",
    [
        (
            ["--ipfix", "collector:4739"],
            "Error: --ipfix 'collector:4739': 'collector' is not an IP address",
        ),
        (
            ["--ipfix", "127.0.0.1"],
            "Error: --ipfix '127.0.0.1': expected ADDR:PORT, e.g. 127.0.0.1:6464",
        ),
        (["--ipfix", "127.0.0.1:0"], "Error: --ipfix '127.0.0.1:0': not a port number (1-65535)"),
        (
            ["--ipfix", "127.0.0.1:4739", "--ipfix", "127.0.0.1:4739"],
            "Error: --ipfix '127.0.0.1:4739': given twice",
        ),
        (
            ["--ipfix", "127.0.0.1:4739", "--ipfix-domain", "4294967296"],
            "Error: --ipfix-domain 4294967296: not a 32-bit unsigned number (0-4294967295)",
        ),
    ],
)
def test_bad_ipfix_options_give_one_error_line_and_status_2(tmp_path, args, line):
    db = tmp_path / "t.db"
    r = CliRunner().invoke(cli.app, ["serve", "--db", str(db), "--listen", "127.0.0.1:0", *args])
    assert (r.exit_code, r.stdout, r.stderr) == (2, "", line + "\n")
    assert not db.exists()


def test_ipfix_options_accept_ipv4_and_ipv6_collectors():
    assert cli_serve.parse_collectors(["[::1]:4739", "127.0.0.1:4739"], 2**32 - 1) == [
        ("::1", 4739),
        ("127.0.0.1", 4739),
    ]


# ---------------------------------------------------------------- end to end


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as r:
        text = r.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }


class Nfcapd:
    """Debian's nfcapd on 127.0.0.1, printing each record it stores (-E)."""

    def __init__(self, tmp):
        self.dir = tmp / "flows"
        self.dir.mkdir()
        self.out = tmp / "nfcapd.out"
        self.port = free_udp_port()
        # stdbuf: -E prints through stdio, which would hold it until exit.
        self.proc = subprocess.Popen(
            [
                "stdbuf",
                "-oL",
                "nfcapd",
                "-E",
                "-b",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-w",
                str(self.dir),
                "-t",
                "3600",
            ],
            stdout=open(self.out, "w"),
            stderr=subprocess.STDOUT,
        )
        wait_for(lambda: "Startup nfcapd" in self.output() or self.proc.poll() is not None)
        assert self.proc.poll() is None, self.output()

    def output(self) -> str:
        return self.out.read_text(errors="replace")

    def records_seen(self) -> int:
        return self.output().count("Flow Record:")

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # writes and closes the capture file
            self.proc.wait(30)
        return self.output()

    def read(self, *filter: str) -> list[dict]:
        r = subprocess.run(
            ["nfdump", "-R", str(self.dir), "-o", "json", *filter],
            capture_output=True,
            text=True,
            timeout=60,
            env=dict(os.environ, TZ="UTC"),
        )
        assert r.returncode == 0, r.stderr
        # With nothing to show, 1.7.1 writes a message inside the JSON array.
        return json.loads(r.stdout.replace("No matching flows\n", ""))


@pytest.fixture
def nfcapd(tmp_path):
    if shutil.which("nfcapd") is None or shutil.which("nfdump") is None:
        pytest.skip("nfcapd/nfdump not installed (Debian package nfdump; .ci/run installs it)")
    n = Nfcapd(tmp_path)
    yield n
    if n.proc.poll() is None:
        n.proc.kill()
        n.proc.wait(10)


def t_event(f: dict) -> str:
    """A record's t_event, mended: nfdump 1.7.1 prints its milliseconds
    without leading zeros (.76 for .076), unlike first and last."""
    second, ms = f["t_event"].split(".")
    return f"{second}.{int(ms):03d}"


def utc_ms(ts_us: int) -> str:
    """nfdump's time text (TZ=UTC) for an event time in µs."""
    t = dt.datetime(1970, 1, 1) + dt.timedelta(milliseconds=ts_us // 1000)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}"


@pytest.mark.slow
def test_nfcapd_receives_every_created_and_deleted(server_factory, nfcapd, tmp_path):
    srv = server_factory(
        "--ports", "1028-1031", "--ipfix", f"127.0.0.1:{nfcapd.port}", "--metrics", "127.0.0.1:0"
    )
    url = wait_for(lambda: re.search(r"metrics on (http://\S+)", srv.stderr)).group(1)

    async def go():
        c = await connect(srv)
        for i in range(7):  # 4 ports: three evictions
            await c.map(v6(i), 40000 + i)
        c.close()

    run(go())
    logged = [parse_line(line) for line in srv.log.read_text().splitlines()]
    changes = [e for e in logged if e.kind != EventKind.INITIALIZED]
    assert [e.kind for e in changes].count(EventKind.DELETED) == 3 and len(changes) == 10
    wait_for(lambda: nfcapd.records_seen() >= len(changes), timeout=20)
    metrics = scrape(url)
    collector = (("collector", f"127.0.0.1:{nfcapd.port}"),)
    assert metrics[("nat64ho_ipfix_records_sent_total", collector)] == 10
    assert metrics[("nat64ho_ipfix_messages_sent_total", collector)] >= 2  # template first
    assert not any(k[0] == "nat64ho_ipfix_send_failures_total" for k in metrics)
    assert srv.stop() == 0

    summary = nfcapd.stop()
    assert re.search(r"Flows: 10, .*Sequence Errors: 0, Bad Packets: 0", summary), summary
    flows = nfcapd.read()
    assert len(flows) == 10
    names = {EventKind.CREATED: "NAT64 BIB create", EventKind.DELETED: "NAT64 BIB delete"}
    got = sorted(
        (
            t_event(f),
            f["nat_event"],
            f["src6_addr"],
            f["src_port"],
            f["src4_xlt_ip"],
            int(f["src_xlt_port"]),
            f["first"],
            f["last"],
        )
        for f in flows
    )
    want = sorted(
        (
            utc_ms(e.ts),
            names[e.kind],
            str(ipaddress.IPv6Address(e.addr)),
            e.aport,
            str(ipaddress.IPv4Address(e.nat)),
            e.port,
            utc_ms(e.ts),
            utc_ms(e.ts),
        )
        for e in changes
    )
    assert got == want
    # The README's abuse-report query: who held this NAT port, when.
    port = next(e.port for e in changes if e.kind == EventKind.DELETED)
    held = nfcapd.read(f"src xip 127.0.0.1 and src xport {port}")
    assert sorted((t_event(f), f["nat_event"], f["src6_addr"]) for f in held) == sorted(
        (utc_ms(e.ts), names[e.kind], str(ipaddress.IPv6Address(e.addr)))
        for e in changes
        if e.port == port
    )
    assert len(held) >= 3  # created, deleted, created for another client
    # -t time windows select on the event time (in flowStart/End).

    def window(a_us: int, b_us: int) -> str:
        return "-".join(
            (dt.datetime(1970, 1, 1) + dt.timedelta(seconds=t // 1_000_000)).strftime(
                "%Y/%m/%d.%H:%M:%S"
            )
            for t in (a_us, b_us)
        )

    first, last = min(e.ts for e in changes), max(e.ts for e in changes)
    assert len(nfcapd.read("-t", window(first, last + 1_000_000))) == 10
    assert nfcapd.read("-t", window(last + 1_000_000, last + 2_000_000)) == []


@pytest.mark.slow
def test_a_collector_that_is_down_costs_the_server_nothing(server_factory):
    port = free_udp_port()  # nobody listens there
    srv = server_factory(
        "--ports", "1028-1029", "--ipfix", f"127.0.0.1:{port}", "--metrics", "127.0.0.1:0"
    )
    url = wait_for(lambda: re.search(r"metrics on (http://\S+)", srv.stderr)).group(1)

    async def go():
        c = await connect(srv)
        answers = []
        for i in range(4):
            answers += await c.map(v6(i), 1)
        c.close()
        return answers

    answers = run(go())
    assert sum(isinstance(m, wire.Mapping) for m in answers) == 4
    metrics = wait_for(
        lambda: (
            (m := scrape(url))
            and m.get(
                (
                    "nat64ho_ipfix_send_failures_total",
                    (("collector", f"127.0.0.1:{port}"), ("reason", "refused")),
                )
            )
            and m
        )
    )
    assert metrics[("nat64ho_entries_created_total", ())] == 4
    assert srv.stop() == 0
    assert f"IPFIX collector 127.0.0.1:{port}: send failed: Connection refused" in srv.stderr


def test_nfcapd_sees_a_lost_datagram_as_a_sequence_error(nfcapd):
    ex = Exporter([("127.0.0.1", nfcapd.port)])
    try:
        ex.start()
        collector = ex.collectors[0]
        first, lost, last = (ex.encoder.encode([CREATED, DELETED], time.time()) for _ in range(3))
        for m in first + last:  # the middle message never arrives
            collector.send(m)
        wait_for(lambda: nfcapd.records_seen() >= 4)
    finally:
        ex.close()
    assert re.search(r"Flows: 4, .*Sequence Errors: 1, Bad Packets: 0", nfcapd.stop()), (
        nfcapd.output()
    )
