"""The operator queries of nat64ho.ops on a real SQLite file: attribution
rules, export byte-identity, import idempotence, pruning, and index use."""

from __future__ import annotations

import asyncio
import io
import ipaddress
import sqlite3
import subprocess
import sys
import textwrap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nat64ho.eventlog import BadLine, Event, EventKind, format_event, parse_line
from nat64ho.ops import db as opsdb
from nat64ho.ops import export as ops_export
from nat64ho.ops import importer, maintenance, queries
from nat64ho.ops.queries import Holding
from nat64ho.storage import schema
from nat64ho.storage import sqlite as store
from tests.helpers import ops_conn

EXAMPLE = textwrap.dedent("""\
    2019-03-18 10:06:28.436754 Initialized 192.0.2.7
    2019-03-18 10:06:28.491727 Created 192.0.2.7:3719 [2001:db8::17]:53186
    2019-03-18 15:22:02.062254 Deleted 192.0.2.9:47102 [2001:db8::75]:33131
    2019-03-18 15:22:02.062478 Created 192.0.2.9:47102 [2001:db8::55]:34643
    """)
NAT9 = int(ipaddress.IPv4Address("192.0.2.9"))
NAT7 = int(ipaddress.IPv4Address("192.0.2.7"))


def v6(text: str) -> bytes:
    return ipaddress.IPv6Address(text).packed


def us(text: str) -> int:
    return parse_line(f"{text} Initialized 0.0.0.0").ts


@pytest.fixture
def db(db_target):
    """An operator connection to a new database, on each backend."""
    conn = ops_conn(db_target, create=True)
    yield conn
    conn.close()


def load(conn, text: str, **kw) -> tuple[importer.ImportResult, list]:
    bad = []
    result = importer.import_logs(
        conn, [("log", io.BytesIO(text.encode()))], lambda *a: bad.append(a), **kw
    )
    return result, bad


def add_entry(conn, nat, port, addr, aport, created, last_use=None):
    conn.execute(
        "INSERT INTO entry VALUES ($1, $2, $3, $4, $5, $6)",
        (nat, port, v6(addr), aport, created, last_use or created),
    )


def export(conn, **kw) -> str:
    out = io.StringIO()
    ops_export.write_log(ops_export.history_rows(conn, **kw), out)
    return out.getvalue()


# ---------------------------------------------------------------- export / import


def test_example_lines_round_trip_byte_for_byte(db):
    result, bad = load(db, EXAMPLE)
    assert (result.lines, result.added, result.skipped, bad) == (4, 4, 0, [])
    assert export(db) == EXAMPLE


def test_import_twice_adds_nothing(db):
    load(db, EXAMPLE)
    again, _ = load(db, EXAMPLE)
    assert (again.lines, again.added) == (4, 0)
    assert db.execute("SELECT count(*) FROM event").fetchone()[0] == 4


def test_bad_lines_are_reported_with_line_numbers_and_skipped(db):
    text = EXAMPLE.replace("Created 192.0.2.7:3719", "Created 192.0.2.7:99999") + "garbage\n"
    result, bad = load(db, text)
    assert result.skipped == 2 and result.added == 3
    assert [(name, n) for name, n, _ in bad] == [("log", 2), ("log", 5)]
    assert "port out of range" in bad[0][2]


def test_import_accepts_crlf_and_a_last_line_without_newline(db):
    text = EXAMPLE.replace("\n", "\r\n").rstrip("\r\n")
    result, bad = load(db, text)
    assert (result.added, bad) == (4, [])
    assert export(db) == EXAMPLE


def test_import_commits_in_batches(db, monkeypatch):
    monkeypatch.setattr(importer, "IMPORT_BATCH", 2)
    result, _ = load(db, EXAMPLE)
    assert result.added == 4 and export(db) == EXAMPLE


def test_export_window_and_nat_filter(db):
    load(db, EXAMPLE)
    assert export(db, nat=NAT7) == "".join(EXAMPLE.splitlines(True)[:2])
    assert export(db, since=us("2019-03-18 15:22:02.062254")) == "".join(
        EXAMPLE.splitlines(True)[2:]
    )
    assert export(db, until=us("2019-03-18 15:22:02.062254")) == "".join(
        EXAMPLE.splitlines(True)[:2]
    )
    assert (
        export(
            db,
            nat=NAT9,
            since=us("2019-03-18 15:00:00.000000"),
            until=us("2019-03-18 15:22:02.062478"),
        )
        == EXAMPLE.splitlines(True)[2]
    )


def test_export_jsonl_and_csv_have_fixed_columns(db):
    import json

    load(db, EXAMPLE)
    out = io.StringIO()
    ops_export.write_jsonl(ops_export.history_rows(db, with_id=True), out)
    objs = [json.loads(line) for line in out.getvalue().splitlines()]
    assert objs[0] == {
        "seq": 1,
        "ts": "2019-03-18T10:06:28.436754Z",
        "event": "Initialized",
        "nat": "192.0.2.7",
        "port": None,
        "ipv6": None,
        "ipv6_port": None,
    }
    assert objs[3] == {
        "seq": 4,
        "ts": "2019-03-18T15:22:02.062478Z",
        "event": "Created",
        "nat": "192.0.2.9",
        "port": 47102,
        "ipv6": "2001:db8::55",
        "ipv6_port": 34643,
    }
    out = io.StringIO()
    ops_export.write_csv(ops_export.history_rows(db, with_id=True), out)
    lines = out.getvalue().splitlines()
    assert lines[0] == ops_export.CSV_HEADER == "seq,ts,event,nat,port,ipv6,ipv6_port"
    assert lines[1] == "1,2019-03-18T10:06:28.436754Z,Initialized,192.0.2.7,,,"
    assert lines[4] == "4,2019-03-18T15:22:02.062478Z,Created,192.0.2.9,47102,2001:db8::55,34643"


# The fast formatter and parser must agree with the reference ones exactly.

addresses = st.one_of(
    st.binary(min_size=16, max_size=16),
    st.builds(lambda tail: bytes(10) + tail, st.binary(min_size=6, max_size=6)),
    st.builds(lambda tail: bytes(10) + b"\xff\xff" + tail, st.binary(min_size=4, max_size=4)),
    st.builds(
        lambda words: b"".join(w.to_bytes(2, "big") for w in words),
        st.lists(st.sampled_from([0, 0, 0, 1, 0xFFFF, 0x2001, 0xDB8]), min_size=8, max_size=8),
    ),
)
events = st.builds(
    lambda ts, kind, nat, port, addr, aport: Event(
        ts,
        kind,
        nat,
        0 if kind == 0 else port,
        None if kind == 0 else addr,
        None if kind == 0 else aport,
    ),
    st.integers(0, 253402300799999999),
    st.sampled_from(list(EventKind)),
    st.integers(0, 2**32 - 1),
    st.integers(0, 65535),
    addresses,
    st.integers(0, 65535),
)


@settings(max_examples=500, deadline=None)
@given(events)
def test_fast_formatter_equals_format_event(e):
    assert ops_export.LineFormatter().line(tuple(e)) == format_event(e)


@settings(max_examples=200, deadline=None)
@given(st.lists(events, min_size=1, max_size=60), st.integers(0, 5))
def test_block_formatter_equals_format_event(evs, skip):
    """The Arrow formatter that export uses for sealed blocks: the same text,
    for a block that starts inside its arrays (a slice) too."""
    from nat64ho.archive import segment

    rows = [(i, e[0], int(e[1]), *e[2:]) for i, e in enumerate(evs)]  # kind as stored
    table = segment.table_from_rows(rows[:1] * skip + rows).select(segment.ROW_COLUMNS)
    text = ops_export.LineFormatter().lines(table.slice(skip))
    assert text == "".join(format_event(e) + "\n" for e in evs)


def _reference(line):
    try:
        e = parse_line(line)
    except BadLine:
        return "bad"
    return (e.ts, int(e.kind), e.nat, e.port, e.addr, e.aport)


def _fast(line):
    try:
        return importer._FastParser()(line)
    except BadLine:
        return "bad"


@settings(max_examples=500, deadline=None)
@given(events)
def test_fast_parser_equals_parse_line_on_good_lines(e):
    line = format_event(e) + "\n"
    assert _fast(line) == _reference(line)


mutations = st.lists(
    st.tuples(
        st.integers(0, 90),
        st.sampled_from(list("0123456789:.[] abcdefx/%+-\r\n") + ["::", "0", "00", "٣", "\t"]),
        st.booleans(),
    ),
    max_size=3,
)


@settings(max_examples=2000, deadline=None)
@given(events, mutations)
def test_fast_parser_equals_parse_line_on_mutated_lines(e, edits):
    line = format_event(e)
    for pos, text, replace in edits:
        pos = min(pos, len(line))
        line = line[:pos] + text + line[pos + (1 if replace else 0) :]
    assert _fast(line) == _reference(line)


@pytest.mark.parametrize(
    "addr",
    [
        "::ffff:1.2.3.4",
        "::1.2.3.4",
        "1:2:3:4:5:6:1.2.3.4",
        "::01.2.3.4",
        "1::2::3",
        "1:2:3:4:5:6:7::",
        "::1:2:3:4:5:6:7:8",
        "1:2:3:4:5:6:7:8:9",
        "00001::",
        "::",
        "fe80::1%eth0",
        "1:2:3:4:5:6:7:8::",
        ":1::",
        "1.2.3.4",
        "::ffff:256.1.1.1",
        "::1.2.3",
        "2001:DB8::A",
    ],
)
def test_fast_parser_agrees_on_awkward_addresses(addr):
    line = f"2019-03-18 15:22:02.062478 Created 192.0.2.9:47102 [{addr}]:34643\n"
    assert _fast(line) == _reference(line)


@pytest.mark.parametrize(
    "line",
    [
        "2019-02-29 15:22:02.062478 Created 192.0.2.9:47102 [::1]:1",
        "2019-03-18 24:00:00.000000 Created 192.0.2.9:47102 [::1]:1",
        "2019-03-18 15:60:00.000000 Created 192.0.2.9:47102 [::1]:1",
        "2019-03-18 15:22:60.000000 Created 192.0.2.9:47102 [::1]:1",
        "2019-03-18 15:22:02.06247 Created 192.0.2.9:47102 [::1]:1",
        "2019-03-18 15:22:02.062478 Created 192.0.2.09:47102 [::1]:1",
        "2019-03-18 15:22:02.062478 Created 192.0.2.9:047102 [::1]:1",
        "2019-03-18 15:22:02.062478 Created 192.0.2.9:47102 [::1]:1 ",
        "2019-03-18 15:22:02.062478  Created 192.0.2.9:47102 [::1]:1",
        "2019-03-18 15:22:02.062478 Created 192.0.2.9 :47102 [::1]:1",
        "2019-03-18 15:22:02.062478 Initialized 192.0.2.9",
        "",
    ],
)
def test_fast_parser_agrees_on_edge_lines(line):
    assert _fast(line) == _reference(line)


def test_rebuild_table_adds_last_created_and_keeps_existing_entries(db):
    text = EXAMPLE + textwrap.dedent("""\
        2019-03-18 16:00:00.000000 Created 192.0.2.9:2000 [2001:db8::1]:1000
        2019-03-18 16:00:01.000000 Created 192.0.2.9:2001 [2001:db8::2]:1000
        2019-03-18 16:00:02.000000 Deleted 192.0.2.9:2001 [2001:db8::2]:1000
        2019-03-18 16:00:03.000000 Created 192.0.2.9:2002 [2001:db8::3]:1000
        """)
    # Already in the table: port 2000 (another endpoint) and endpoint ::3.
    add_entry(db, NAT9, 2000, "2001:db8::99", 9, 5)
    add_entry(db, NAT9, 3000, "2001:db8::3", 1000, 6)
    result, _ = load(db, text, rebuild_table=True)
    assert result.entries == 2
    rows = db.execute(
        "SELECT nat, port, addr, aport, created FROM entry ORDER BY nat, port"
    ).fetchall()
    assert rows == [
        (NAT7, 3719, v6("2001:db8::17"), 53186, us("2019-03-18 10:06:28.491727")),
        (NAT9, 2000, v6("2001:db8::99"), 9, 5),
        (NAT9, 3000, v6("2001:db8::3"), 1000, 6),
        (NAT9, 47102, v6("2001:db8::55"), 34643, us("2019-03-18 15:22:02.062478")),
    ]
    assert load(db, text, rebuild_table=True)[0].entries == 0


def test_rebuild_table_respects_a_deleted_already_in_history(db):
    load(db, "2019-03-18 16:00:02.000000 Deleted 192.0.2.9:2001 [2001:db8::2]:1000\n")
    result, _ = load(
        db,
        "2019-03-18 16:00:01.000000 Created 192.0.2.9:2001 [2001:db8::2]:1000\n",
        rebuild_table=True,
    )
    assert result.entries == 0
    assert db.execute("SELECT count(*) FROM entry").fetchone()[0] == 0


def test_open_log_reads_gzip_and_reports_missing_files(tmp_path):
    import gzip

    path = tmp_path / "x.log.gz"
    with gzip.open(path, "wt") as f:
        f.write(EXAMPLE)
    assert importer.open_log(str(path)).read() == EXAMPLE.encode()
    with pytest.raises(importer.LogUnreadable, match="nope.log"):
        importer.open_log(str(tmp_path / "nope.log"))


def test_truncated_gzip_keeps_what_was_read_and_raises(db, tmp_path):
    import gzip

    path = tmp_path / "x.log.gz"
    path.write_bytes(gzip.compress(EXAMPLE.encode() * 50)[:-30])
    with pytest.raises(importer.LogUnreadable, match="x.log.gz"):
        importer.import_logs(db, [(str(path), importer.open_log(str(path)))], lambda *a: None)
    assert db.execute("SELECT count(*) FROM event").fetchone()[0] == 4


# ---------------------------------------------------------------- who


def test_who_before_the_deleted_names_the_deleted_holder(db):
    load(db, EXAMPLE)
    h = queries.who_port(db, NAT9, 47102, us("2019-03-18 15:00:00.000000"))
    assert (h.addr, h.aport) == (v6("2001:db8::75"), 33131)
    assert h.start is None and h.end == us("2019-03-18 15:22:02.062254")
    assert h.created is None and h.deleted.kind == EventKind.DELETED and not h.current


def test_who_after_the_created_names_the_new_holder(db):
    load(db, EXAMPLE)
    h = queries.who_port(db, NAT9, 47102, us("2019-03-18 15:30:00.000000"))
    assert (h.addr, h.aport) == (v6("2001:db8::55"), 34643)
    assert h.start == us("2019-03-18 15:22:02.062478") and h.end is None
    assert format_event(h.created) == EXAMPLE.splitlines()[3]
    assert not h.current  # not in the (empty) table: its end is not recorded


def test_who_between_deleted_and_created_is_nobody(db):
    load(db, EXAMPLE)
    assert queries.who_port(db, NAT9, 47102, us("2019-03-18 15:22:02.062254")) is None
    assert queries.who_port(db, NAT9, 47102, us("2019-03-18 15:22:02.062300")) is None
    assert queries.who_port(db, NAT9, 47103, us("2019-03-18 15:30:00.000000")) is None
    assert queries.who_port(db, NAT7, 3719, us("2019-03-18 10:00:00.000000")) is None


def test_who_on_created_instant_and_still_held(db):
    load(db, EXAMPLE)
    add_entry(db, NAT9, 47102, "2001:db8::55", 34643, us("2019-03-18 15:22:02.062470"))
    at = us("2019-03-18 15:22:02.062478")
    h = queries.who_port(db, NAT9, 47102, at)
    assert (h.addr, h.current, h.start, h.end) == (v6("2001:db8::55"), True, at, None)
    far = queries.who_port(db, NAT9, 47102, us("2030-01-01 00:00:00.000000"))
    assert far.current and far.created is not None


def test_who_closed_holding_has_both_events(db):
    load(db, EXAMPLE + "2019-03-19 00:00:00.000000 Deleted 192.0.2.9:47102 [2001:db8::55]:34643\n")
    h = queries.who_port(db, NAT9, 47102, us("2019-03-18 18:00:00.000000"))
    assert h.start == us("2019-03-18 15:22:02.062478") and h.end == us("2019-03-19 00:00:00.000000")
    assert h.created.kind == EventKind.CREATED and h.deleted.kind == EventKind.DELETED
    assert queries.who_port(db, NAT9, 47102, us("2019-03-19 00:00:00.000000")) is None


def test_who_same_instant_deleted_precedes_created(db):
    load(
        db,
        textwrap.dedent("""\
        2019-03-18 10:00:00.000000 Created 192.0.2.9:5000 [2001:db8::1]:1
        2019-03-18 11:00:00.000000 Deleted 192.0.2.9:5000 [2001:db8::1]:1
        2019-03-18 11:00:00.000000 Created 192.0.2.9:5000 [2001:db8::2]:2
        """),
    )
    before = queries.who_port(db, NAT9, 5000, us("2019-03-18 10:59:59.999999"))
    assert (before.addr, before.end) == (v6("2001:db8::1"), us("2019-03-18 11:00:00.000000"))
    same = queries.who_port(db, NAT9, 5000, us("2019-03-18 11:00:00.000000"))
    assert same.addr == v6("2001:db8::2") and same.created is not None


def test_who_entry_without_history(db):
    add_entry(db, NAT9, 6000, "2001:db8::6", 66, us("2019-03-18 12:00:00.000000"))
    h = queries.who_port(db, NAT9, 6000, us("2019-03-18 13:00:00.000000"))
    assert h == Holding(
        NAT9, 6000, v6("2001:db8::6"), 66, us("2019-03-18 12:00:00.000000"), None, True, None, None
    )
    assert queries.who_port(db, NAT9, 6000, us("2019-03-18 11:00:00.000000")) is None


def test_who_table_overrides_a_history_with_a_gap(db):
    load(db, "2019-03-18 10:00:00.000000 Created 192.0.2.9:5000 [2001:db8::1]:1\n")
    add_entry(db, NAT9, 5000, "2001:db8::2", 2, us("2019-03-18 12:00:00.000000"))
    assert queries.who_port(db, NAT9, 5000, us("2019-03-18 11:00:00.000000")).addr == v6(
        "2001:db8::1"
    )
    now = queries.who_port(db, NAT9, 5000, us("2019-03-18 13:00:00.000000"))
    assert now.addr == v6("2001:db8::2") and now.current


def test_who_endpoint_lists_every_holding(db):
    load(
        db,
        EXAMPLE
        + textwrap.dedent("""\
        2019-03-19 00:00:00.000000 Deleted 192.0.2.9:47102 [2001:db8::55]:34643
        2019-03-19 01:00:00.000000 Created 192.0.2.7:4000 [2001:db8::55]:34643
        2019-03-19 02:00:00.000000 Created 192.0.2.7:4001 [2001:db8::55]:999
        """),
    )
    add_entry(db, NAT7, 4000, "2001:db8::55", 34643, us("2019-03-19 01:00:00.000000"))
    add_entry(db, NAT7, 4002, "2001:db8:0:1::1", 1, us("2019-03-19 03:00:00.000000"))
    one = list(queries.who_endpoint(db, ipaddress.IPv6Network("2001:db8::55/128"), 34643))
    assert [(h.nat, h.port, h.start, h.end, h.current) for h in one] == [
        (NAT9, 47102, us("2019-03-18 15:22:02.062478"), us("2019-03-19 00:00:00.000000"), False),
        (NAT7, 4000, us("2019-03-19 01:00:00.000000"), None, True),
    ]
    addr = list(queries.who_endpoint(db, ipaddress.IPv6Network("2001:db8::55/128")))
    assert len(addr) == 3 and {h.aport for h in addr} == {34643, 999}
    at = list(
        queries.who_endpoint(
            db,
            ipaddress.IPv6Network("2001:db8::55/128"),
            34643,
            at=us("2019-03-18 20:00:00.000000"),
        )
    )
    assert [h.port for h in at] == [47102]
    wide = list(queries.who_endpoint(db, ipaddress.IPv6Network("2001:db8::/32")))
    # ::17 (open, not in the table), ::55 x3, ::75 (Deleted only), and the
    # table-only entry of 2001:db8:0:1::1 last.
    assert len(wide) == 6 and wide[-1].port == 4002 and wide[-1].created is None
    deleted_only = [h for h in wide if h.addr == v6("2001:db8::75")]
    assert deleted_only[0].start is None and deleted_only[0].deleted is not None
    assert list(queries.who_endpoint(db, ipaddress.IPv6Network("2001:db9::/32"))) == []


# ---------------------------------------------------------------- query, stats, prune


def test_query_entries_filters_and_order(db):
    add_entry(db, NAT9, 3000, "2001:db8::1", 1, 10, 20)
    add_entry(db, NAT9, 2000, "2001:db8:1::1", 1, 11, 21)
    add_entry(db, NAT7, 4000, "2001:db8::2", 2, 12, 22)
    ports = lambda **kw: [(e.nat, e.port) for e in queries.query_entries(db, **kw)]  # noqa: E731
    assert ports() == [(NAT7, 4000), (NAT9, 2000), (NAT9, 3000)]
    assert ports(nat=NAT9) == [(NAT9, 2000), (NAT9, 3000)]
    assert ports(port=4000) == [(NAT7, 4000)]
    assert ports(ipv6=ipaddress.IPv6Network("2001:db8::/48")) == [(NAT7, 4000), (NAT9, 3000)]
    assert ports(ipv6=ipaddress.IPv6Network("2001:db8::1/128"), nat=NAT9) == [(NAT9, 3000)]
    assert ports(nat=NAT9, port=2001) == []
    e = next(queries.query_entries(db, nat=NAT7))
    assert e == queries.Entry(NAT7, 4000, v6("2001:db8::2"), 2, 12, 22)


def test_stats_counts_recent_events(db):
    now = us("2019-03-19 12:00:00.000000")
    load(
        db,
        textwrap.dedent("""\
        2019-03-17 12:00:00.000000 Created 192.0.2.9:1 [2001:db8::1]:1
        2019-03-19 02:00:00.000000 Created 192.0.2.9:2 [2001:db8::2]:1
        2019-03-19 11:30:00.000000 Deleted 192.0.2.9:2 [2001:db8::2]:1
        2019-03-19 11:30:00.000000 Created 192.0.2.9:2 [2001:db8::3]:1
        """),
    )
    add_entry(db, NAT9, 2, "2001:db8::3", 1, now - 5, now - 3)
    db.execute("INSERT INTO nat VALUES ($1, $2, $3, $4)", (NAT9, bytes(8), 100, 200))
    [s] = queries.stats(db, now, 64508)
    assert s == queries.NatStats(NAT9, 1, 64508, now - 3, 100, 200, 1, 1, 2, 1)


def test_prune_deletes_old_events_only(db, monkeypatch):
    monkeypatch.setattr(maintenance, "PRUNE_BATCH", 2)
    load(db, EXAMPLE)
    add_entry(db, NAT7, 3719, "2001:db8::17", 53186, 1)
    assert maintenance.prune(db, us("2019-03-18 15:22:02.062478")) == 3
    assert export(db) == EXAMPLE.splitlines(True)[3]
    assert db.execute("SELECT count(*) FROM entry").fetchone()[0] == 1
    assert maintenance.prune(db, us("2019-03-18 15:22:02.062478")) == 0
    # The pruned entry is still attributed, from the table.
    assert queries.who_port(db, NAT7, 3719, 2).current


def test_server_prune_deletes_what_the_operator_prune_deletes(tmp_path, monkeypatch):
    # serve --keep-history (Store.prune, on aiosqlite) and `nat64ho prune`
    # run one statement with one batch size; both must leave the same history.
    cut = us("2019-03-18 15:22:02.062478")
    for name in ("ops.db", "server.db"):
        conn = ops_conn(tmp_path / name, create=True)
        load(conn, EXAMPLE)
        conn.close()
    monkeypatch.setattr(maintenance, "PRUNE_BATCH", 2)
    monkeypatch.setattr(store, "PRUNE_BATCH", 2)
    conn = ops_conn(tmp_path / "ops.db")
    by_ops, left_ops = maintenance.prune(conn, cut), export(conn)
    conn.close()

    async def server_prune() -> int:
        s = await store.Store.open(tmp_path / "server.db")
        try:
            return await s.prune(cut)
        finally:
            await s.close()

    by_server = asyncio.run(server_prune())
    conn = ops_conn(tmp_path / "server.db", readonly=True)
    left_server = export(conn)
    conn.close()
    assert by_server == by_ops == 3
    assert left_server == left_ops == EXAMPLE.splitlines(True)[3]


def test_statements_run_as_each_backend_takes_them(db):
    # $n placeholders bind on both backends, a repeated one to its one value;
    # the other backend's spellings are refused, never rewritten.
    load(db, EXAMPLE)
    sql = "SELECT count(*) FROM event WHERE nat = $1 AND port >= $2 AND ts > $2"
    assert db.execute(sql, (NAT7, 1)).fetchone() == (1,)  # the Created, not port 0
    if db.sql.postgres:
        wrong = f"SELECT 1 FROM {opsdb.SQLITE.event_by_ts}"
    else:
        wrong = opsdb.POSTGRES.begin_snapshot
    with pytest.raises((sqlite3.Error, schema.DatabaseError), match="syntax error"):
        db.execute(wrong).fetchall()


# ---------------------------------------------------------------- plans and locks


@pytest.mark.parametrize(
    "sql, args, index",
    [
        (
            "SELECT ts, kind, addr, aport FROM event WHERE nat = $1 AND port = $2 AND kind > 0 "
            "AND ts <= $3 ORDER BY ts DESC, kind DESC LIMIT 2",
            (1, 2, 3),
            "event_nat_port_ts",
        ),
        (
            "SELECT port, addr, aport, created FROM entry WHERE nat = $1 AND addr BETWEEN $2 AND $3 "
            "ORDER BY addr, aport",
            (1, b"a", b"b"),
            "entry_endpoint",
        ),
        (
            "SELECT nat, port, addr, aport, created, last_use FROM entry WHERE nat = $1 ORDER BY port",
            (1,),
            "PRIMARY KEY",  # entry_pkey on PostgreSQL
        ),
        (
            "SELECT ts, kind, nat, port, addr, aport FROM {event_by_ts} WHERE ts >= $1 "
            "ORDER BY ts, id",
            (1,),
            "event_ts",
        ),
        ("SELECT min(nat) FROM event WHERE nat > $1", (1,), "event_nat_port_ts"),
    ],
)
def test_queries_use_an_index_and_no_sort(db, sql, args, index):
    # The statements the operator modules run; a plan change here is what would make
    # them scan 100 M rows.
    sql = sql.format(event_by_ts=db.sql.event_by_ts)
    if db.sql.postgres:
        # An empty table is cheapest to read whole: ask for the plan the
        # planner takes on a big one, where neither a scan nor a sort pays.
        db.execute("SET enable_seqscan = off")
        db.execute("SET enable_sort = off")
        index = "entry_pkey" if index == "PRIMARY KEY" else index
        lines = [r[0] for r in db.execute("EXPLAIN " + sql, args)]
        plan = " | ".join(lines)
        assert f"using {index} on" in plan, plan
        nodes = [line.strip().removeprefix("->").strip() for line in lines]
        assert not any(n.startswith(("Sort  (", "Seq Scan")) for n in nodes), plan
        # A secondary index of SQLite ends with the rowid; PostgreSQL's
        # event_ts does not, so ties of one ts are put in id order as they
        # stream (an incremental sort, never a sort of the whole result).
        if any(n.startswith("Incremental Sort") for n in nodes):
            assert "Presorted Key: ts" in plan, plan
        return
    plan = " | ".join(r[3] for r in db.execute("EXPLAIN QUERY PLAN " + sql, args))
    assert f"INDEX {index}" in plan or index in plan, plan
    assert "TEMP B-TREE" not in plan and "SCAN" not in plan, plan


def test_database_in_use_sees_another_process(tmp_path):
    path = tmp_path / "t.db"
    schema.open_db(path, create=True).close()
    assert not opsdb.database_in_use(path)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); "
            "c.execute('SELECT count(*) FROM event').fetchone(); print('open', flush=True); "
            "sys.stdin.read()",
            str(path),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline() == "open\n"
        assert opsdb.database_in_use(path)
    finally:
        holder.stdin.close()
        holder.wait(10)
    assert not opsdb.database_in_use(path)
