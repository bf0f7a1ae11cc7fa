"""Operator commands on day two: import onto a fresh machine, bounded import,
one-line errors and clean help, abuse reports with a tolerance and in batches.
Real processes and real files throughout."""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import sys
import textwrap

import pytest

from nat64ho import eventlog
from nat64ho.core import wire
from nat64ho.ops import export, importer, queries
from nat64ho.storage import pg_schema, schema
from tests.helpers import connect, is_postgres, ops_conn, run, v6

EXAMPLE = textwrap.dedent("""\
    2019-03-18 10:06:28.436754 Initialized 192.0.2.7
    2019-03-18 10:06:28.491727 Created 192.0.2.7:3719 [2001:db8::17]:53186
    2019-03-18 15:22:02.062254 Deleted 192.0.2.9:47102 [2001:db8::75]:33131
    2019-03-18 15:22:02.062478 Created 192.0.2.9:47102 [2001:db8::55]:34643
    """)

COMMANDS = [
    "serve",
    "query",
    "who",
    "export",
    "import",
    "stats",
    "prune",
    "forget",
    "check",
    "seal",
    "bench",
    "gateway",
    "probe",
    "archive",
    "testbed",
]


def nat64ho(*args: str, input: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "nat64ho", *args],
        input=input,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def example_db(tmp_path, db_target):
    log = tmp_path / "example.log"
    log.write_text(EXAMPLE)
    db = db_target
    r = nat64ho("import", str(log), "--db", str(db))
    assert r.returncode == 0, r.stderr
    return db


# ---------------------------------------------------------------- import creates the database


def test_import_creates_a_missing_database_that_serve_then_uses(
    tmp_path, server_factory, db_target
):
    log = tmp_path / "old.log"
    log.write_text(EXAMPLE)
    pg = is_postgres(db_target)
    # On PostgreSQL the database exists (createdb) and is empty: import
    # makes its tables.
    db = db_target if pg else tmp_path / "new" / "deeper" / "table.db"
    r = nat64ho("import", str(log), "--rebuild-table", "--db", str(db))
    assert r.returncode == 0, r.stderr
    made = f"created the tables in {db} (schema version {len(pg_schema.migrations())})"
    if not pg:
        made = f"created {db} (schema version {len(schema.migrations())})"
    assert r.stderr == (
        f"{made}; 4 lines read, 4 events added, 0 already present, 0 skipped; "
        "2 entries added to the table\n"
    )
    if not pg:
        assert oct(db.stat().st_mode & 0o777) == "0o640"
        for d in (db.parent, db.parent.parent):
            assert oct(d.stat().st_mode & 0o777) == "0o750"
    # The same schema serve's migrations build, every table and index.
    r = nat64ho("check", "--db", str(db))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(
        f"ok: {db}: schema current, rows decode"
        if pg
        else f"ok: {db}: integrity ok, schema current"
    )
    # And serve takes it as it is: the imported entry is there for its NAT64.
    server = server_factory(db=db)

    async def go():
        c = await connect(server)
        return await c.exchange([wire.Lookup(3719)])

    # The imported NAT64s are 192.0.2.x; the client speaks from 127.0.0.1,
    # whose table is empty: LOOKUP answers UNMAPPED, and the history stays.
    answers = run(go())
    assert [type(m).__name__ for m in answers] == ["Unmapped"]
    server.stop()
    r = nat64ho("export", "--db", str(db))
    assert r.stdout.startswith(EXAMPLE)


def test_wal_and_shm_of_an_imported_database_are_not_world_readable(tmp_path):
    db = tmp_path / "d" / "t.db"
    log = tmp_path / "x.log"
    log.write_text(EXAMPLE)
    # Held open by a reader so that SQLite keeps its -wal and -shm around.
    code = textwrap.dedent(f"""
        import os, subprocess, sys
        os.umask(0)
        r = subprocess.run([sys.executable, "-m", "nat64ho", "import", {str(log)!r},
                            "--db", {str(db)!r}])
        sys.exit(r.returncode)
    """)
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
    conn = sqlite3.connect(db)
    conn.execute("SELECT count(*) FROM event").fetchone()
    try:
        for p in db.parent.iterdir():
            assert p.stat().st_mode & 0o007 == 0, p
        assert db.parent.stat().st_mode & 0o777 == 0o750
    finally:
        conn.close()


def test_read_commands_still_never_create_a_database(tmp_path):
    db = tmp_path / "none" / "t.db"
    for args in (["query"], ["export"], ["stats"], ["check"], ["who", "192.0.2.9:1"]):
        r = nat64ho(*args, "--db", str(db))
        assert r.returncode == 1 and r.stderr.count("\n") == 1 and r.stderr.startswith("Error: ")
    assert not db.parent.exists()


# ---------------------------------------------------------------- import bounds


def test_a_huge_line_is_skipped_in_bounded_memory(tmp_path):
    log = tmp_path / "long.log"
    lines = EXAMPLE.splitlines(True)
    with open(log, "w") as f:
        f.write(lines[0])
        f.write("2019-03-18 10:06:28.491727 Created " + "7" * (64 << 20) + "\n")
        f.writelines(lines[1:])
    db = tmp_path / "t.db"
    # A fresh parent process, so that RUSAGE_CHILDREN is the import's alone.
    code = textwrap.dedent(f"""
        import resource, subprocess, sys
        r = subprocess.run([sys.executable, "-m", "nat64ho", "import", {str(log)!r},
                            "--db", {str(db)!r}], capture_output=True, text=True)
        sys.stdout.write(r.stderr)
        print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    """)
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    ).stdout.splitlines()
    assert out[0] == f"{log}:2: skipped: line longer than {importer.MAX_LINE} octets"
    assert out[1].endswith("5 lines read, 4 events added, 0 already present, 1 skipped")
    status, rss_kib = map(int, out[2].split())
    assert status == 1
    # The line alone is 64 MiB (as text, more); the whole import stays below it.
    assert rss_kib < 64 * 1024, rss_kib


def test_line_numbers_count_lf_only_as_editors_do(db_target):
    lines = EXAMPLE.splitlines(True)
    # Line 2 holds a bare CR (one line to an editor), line 4 is garbage.
    text = lines[0] + lines[1].rstrip("\n") + "\r" + lines[2] + lines[3] + "garbage\n"
    bad = []
    conn = ops_conn(db_target, create=True)
    try:
        import io

        result = importer.import_logs(
            conn, [("log", io.BytesIO(text.encode()))], lambda *a: bad.append(a)
        )
    finally:
        conn.close()
    assert [(n, reason) for _, n, reason in bad] == [(2, "not a log line"), (4, "not a log line")]
    assert (result.lines, result.added, result.skipped) == (4, 2, 2)


def test_a_crlf_file_still_numbers_lines_one_by_one(tmp_path):
    log = tmp_path / "crlf.log"
    log.write_bytes(EXAMPLE.replace("\n", "\r\n").encode() + b"nope\r\n")
    r = nat64ho("import", str(log), "--db", str(tmp_path / "t.db"))
    assert r.returncode == 1
    assert r.stderr.splitlines()[0] == f"{log}:5: skipped: not a log line"


def test_import_caches_are_bounded():
    parse = importer._FastParser()
    for day in range(6000):
        date = eventlog.ts_str(day * 86_400_000_000)[:10]
        parse(f"{date} 00:00:01.000000 Created 192.0.2.{day % 256}:1 [2001:db8::1]:2\n")
    assert len(parse._days) <= 4096 and len(parse._nats) <= 65537
    fmt = export.LineFormatter()
    for nat in range(70_000):
        fmt.nat(nat)
    assert len(fmt._nats) <= 65536
    assert eventlog._second_str.cache_info().maxsize == 4096


# ---------------------------------------------------------------- errors and help


def test_help_shows_no_framework_internals_and_whole_summaries():
    top = nat64ho("--help")
    assert top.returncode == 0
    listed = top.stdout.split("Commands:", 1)[1].splitlines()
    names = [line.split()[0] for line in listed if line.strip()]
    assert names == COMMANDS
    for line in listed:
        assert not line.rstrip().endswith(("...", "\u2026")), line
    for command in [[c] for c in COMMANDS] + [["testbed", "up"], ["testbed", "down"]]:
        r = nat64ho(*command, "--help")
        assert r.returncode == 0 and r.stderr == ""
        text = r.stdout
        # Ranges are said in words and in the error line, not as "x>=0";
        # options show their metavar, not a type. (Arguments keep typer's
        # own notation, {NAME} and <str>: that is typer as documented.)
        for internal in (r"\bx\s*[<>]=", r"\[\w+<=x", r"(?m)^  --\S+ <[a-z]+"):
            assert not re.search(internal, text), (command, internal, text)


BAD = [
    (["serve", "--min-idle", "-5"], "--min-idle"),
    (["serve", "--cache-size", "0"], "--cache-size"),
    (["serve", "--no-such-option"], "--no-such-option"),
    (["prune"], "--before"),
    (["bench", "--batch", "0"], "--batch"),
    (["frobnicate"], "frobnicate"),
    (["who"], "NAT:PORT"),
    (["who", "192.0.2.9:1", "--tolerance", "-1"], "--tolerance"),
    (["who", "192.0.2.9:1", "--tolerance", "soon"], "--tolerance"),
    (["who", "2001:db8::1", "--tolerance", "5"], "--tolerance"),
    (["who", "192.0.2.9:1", "--reports", "-"], "--reports"),
    (["who", "--reports", "/nonexistent/reports.csv"], "--reports"),
    (["export", "--after", "x"], "--after"),
    (["export", "--follow", "--since", "2020-01-01"], "--follow"),
    (["export", "--follow", "-o", "x.log"], "--follow"),
    (["probe", "192.0.2.300"], "SERVER"),
    (["probe", "[::1]:6464"], "SERVER"),
    (["probe", "127.0.0.1", "--timeout", "0"], "--timeout"),
    (["probe", "127.0.0.1", "--map", "2001:db8::1"], "--map"),
    (["probe", "127.0.0.1", "--touch", "1028,70000"], "--touch"),
    (["probe", "127.0.0.1", "--source", "::1"], "--source"),
    (["probe"], "SERVER"),
    (["import"], "FILE"),
]


@pytest.mark.parametrize("args, names", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_every_bad_value_is_one_error_line_and_status_2(tmp_path, args, names):
    r = (
        nat64ho(*args, "--db", str(tmp_path / "t.db"))
        if args[0] not in ("probe", "frobnicate", "bench")
        else nat64ho(*args)
    )
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("Error: "), r.stderr
    assert names in r.stderr and "Usage:" not in r.stderr and "Traceback" not in r.stderr
    assert r.stdout == ""
    assert not (tmp_path / "t.db").exists()


@pytest.mark.parametrize(
    "args",
    [["query"], ["stats"], ["export"], ["check"], ["prune", "--yes", "--before", "2020-01-01"]],
)
def test_a_directory_as_database_is_one_error_line_status_1(tmp_path, args):
    r = nat64ho(*args, "--db", str(tmp_path))
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and r.stderr.startswith("Error: ")
    assert str(tmp_path) in r.stderr


# ---------------------------------------------------------------- abuse reports


def test_who_with_tolerance_lists_every_holder_closest_first(example_db):
    r = nat64ho(
        "who",
        "192.0.2.9:47102",
        "--at",
        "2019-03-18T16:22:02+01:00",
        "--tolerance",
        "1",
        "--db",
        str(example_db),
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "192.0.2.9:47102 at 2019-03-18 15:22:02.000000 to 15:22:02.999999Z ± 1 s: "
        "2 holders: AMBIGUOUS (closest to the reported time first)",
        "IPV6 ENDPOINT                                   FROM                         "
        "UNTIL                        AWAY (S)",
        "[2001:db8::75]:33131                            before history               "
        "2019-03-18 15:22:02.062254Z  0",
        "[2001:db8::55]:34643                            2019-03-18 15:22:02.062478Z  "
        "not recorded                 0",
    ]
    # Past the Created, the later holder is the closer one.
    r = nat64ho(
        "who",
        "192.0.2.9:47102",
        "--at",
        "2019-03-18 15:22:03Z",
        "--tolerance",
        "5",
        "--db",
        str(example_db),
        "--format",
        "json",
    )
    rows = json.loads(r.stdout)
    assert [(x["ipv6"], x["distance_s"], x["ambiguous"]) for x in rows] == [
        ("2001:db8::55", 0, True),
        ("2001:db8::75", 0.937746, True),
    ]
    assert rows[0]["at"] == "2019-03-18T15:22:03.000000Z" and rows[0]["holders"] == 2
    assert rows[0]["tolerance_s"] == 5 and rows[0]["window_until"] == "2019-03-18T15:22:08.999999Z"


def test_who_with_a_tolerance_that_reaches_no_event_is_unambiguous(example_db):
    r = nat64ho(
        "who",
        "192.0.2.9:47102",
        "--at",
        "2019-03-18 15:00",
        "--tolerance",
        "60",
        "--db",
        str(example_db),
        "--format",
        "csv",
    )
    assert r.stdout.splitlines() == [
        "nat,port,at,window_from,window_until,tolerance_s,holders,ambiguous,ipv6,ipv6_port,"
        "from,until,current,distance_s",
        "192.0.2.9,47102,2019-03-18T15:00:00.000000Z,2019-03-18T14:59:00.000000Z,2019-03-18T15:01:59.999999Z,"
        "60,1,false,2001:db8::75,33131,,2019-03-18T15:22:02.062254Z,false,0",
    ]
    r = nat64ho(
        "who",
        "192.0.2.7:3719",
        "--at",
        "2019-03-18 10:00",
        "--tolerance",
        "60",
        "--db",
        str(example_db),
    )
    assert r.stdout == (
        "No entry: 192.0.2.7:3719 at 2019-03-18 10:00:00.000000 to 10:00:59.999999Z ± 60 s: "
        "not held as far as this database knows.\n"
    )


REPORTS = textwrap.dedent("""\
    nat,port,time,tolerance
    192.0.2.9,47102,2019-03-18T15:22:02Z,1
    192.0.2.9,47102,2019-03-18T10:00:00-05:00
    192.0.2.7,99999,2019-03-18T10:00:00Z
    192.0.2.7,3719,2019-03-18T11:00:00+01:00,0
    """)


def test_who_reports_answers_each_report_and_names_bad_rows(example_db, tmp_path):
    reports = tmp_path / "reports.csv"
    reports.write_text(REPORTS)
    r = nat64ho(
        "who",
        "--reports",
        str(reports),
        "--tolerance",
        "30",
        "--db",
        str(example_db),
        "--format",
        "csv",
    )
    assert r.returncode == 1
    assert r.stderr == f"Error: {reports}:4: port '99999': not a port number (1-65535)\n"
    rows = [line.split(",") for line in r.stdout.splitlines()]
    assert rows[0][:9] == [
        "report",
        "nat",
        "port",
        "at",
        "window_from",
        "window_until",
        "tolerance_s",
        "holders",
        "ambiguous",
    ]
    got = [(row[0], row[3], row[6], row[7], row[8], row[9]) for row in rows[1:]]
    assert got == [
        ("2", "2019-03-18T15:22:02.000000Z", "1", "2", "true", "2001:db8::75"),
        ("2", "2019-03-18T15:22:02.000000Z", "1", "2", "true", "2001:db8::55"),
        # -05:00 is 15:00 UTC; the default tolerance of --tolerance applies.
        ("3", "2019-03-18T15:00:00.000000Z", "30", "1", "false", "2001:db8::75"),
        ("5", "2019-03-18T10:00:00.000000Z", "0", "0", "false", ""),
    ]


def test_who_reports_from_stdin_without_header_as_json_and_table(example_db):
    body = "".join(REPORTS.splitlines(True)[1:3])
    r = nat64ho("who", "--reports", "-", "--db", str(example_db), "--format", "json", input=body)
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert [(x["report"], x["ipv6"], x["holders"]) for x in rows] == [
        (1, "2001:db8::75", 2),
        (1, "2001:db8::55", 2),
        (2, "2001:db8::75", 1),
    ]
    r = nat64ho("who", "--reports", "-", "--db", str(example_db), input=body)
    lines = r.stdout.splitlines()
    assert lines[0].split() == [
        "ROW",
        "NAT:PORT",
        "AT",
        "(UTC)",
        "±S",
        "ANSWER",
        "IPV6",
        "ENDPOINT",
        "FROM",
        "UNTIL",
    ]
    assert "AMBIGUOUS" in lines[1] and "AMBIGUOUS" in lines[2] and "1 holder" in lines[3]


def test_who_port_window_sees_a_holder_known_only_from_the_table(db_target):
    conn = ops_conn(db_target, create=True)
    try:
        nat = 0xC0000209
        conn.execute(
            "INSERT INTO entry VALUES ($1, $2, $3, $4, $5, $6)",
            (nat, 5000, v6(1), 7, 2_000_000, 2_000_000),
        )
        found = queries.who_port_window(conn, nat, 5000, 1_000_000, 1_500_000)
        assert [(h.aport, h.current, queries.distance(h, 1_000_000)) for h in found] == [
            (7, True, 1_000_000)
        ]
        assert queries.who_port_window(conn, nat, 5000, 1_000_000, 500_000) == []
    finally:
        conn.close()


def test_who_reports_with_an_oversized_field_stops_with_one_error_line(example_db, tmp_path):
    reports = tmp_path / "huge.csv"
    reports.write_text("192.0.2.9,47102,2019-03-18 15:00Z\n192.0.2.9,47102," + "x" * 200_000 + "\n")
    r = nat64ho("who", "--reports", str(reports), "--db", str(example_db), "--format", "csv")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith(f"Error: {reports}:2: field larger than field limit")
    assert r.stderr.count("\n") == 1
    assert len(r.stdout.splitlines()) == 2  # the header and the first report's answer
