"""The operator commands through the command line: output, exit status and
the exact error lines; and once against a database a real server wrote.
Every test that reads or writes a database runs on SQLite and on PostgreSQL
(the ``db_target`` fixture)."""

from __future__ import annotations

import gzip
import json
import os
import re
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from nat64ho import cli
from nat64ho.cli import database as cli_database
from nat64ho.storage import schema
from tests.helpers import (
    absent_db,
    connect,
    db_exec,
    db_exists,
    db_state,
    is_postgres,
    make_tables,
    one_error,
    run,
    table_owned,
    v6,
)

EXAMPLE = textwrap.dedent("""\
    2019-03-18 10:06:28.436754 Initialized 192.0.2.7
    2019-03-18 10:06:28.491727 Created 192.0.2.7:3719 [2001:db8::17]:53186
    2019-03-18 15:22:02.062254 Deleted 192.0.2.9:47102 [2001:db8::75]:33131
    2019-03-18 15:22:02.062478 Created 192.0.2.9:47102 [2001:db8::55]:34643
    """)


def nat64ho(*args: str, input: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "nat64ho", *args],
        input=input,
        capture_output=True,
        text=True,
        timeout=120,
    )


def invoke(*args: str, input: str | None = None):
    return CliRunner().invoke(cli.app, list(args), input=input)


@pytest.fixture
def db(db_target):
    """An empty database with its tables, on each backend."""
    return make_tables(db_target)


@pytest.fixture
def sqlite_db(tmp_path):
    path = tmp_path / "t.db"
    schema.open_db(path, create=True).close()
    return path


@pytest.fixture
def example_db(db, tmp_path):
    log = tmp_path / "example.log"
    log.write_text(EXAMPLE)
    r = invoke("import", str(log), "--db", str(db))
    assert r.exit_code == 0, r.output
    return db


# ---------------------------------------------------------------- the examples


def test_import_then_export_gives_the_same_bytes(example_db, tmp_path):
    r = nat64ho("export", "--db", str(example_db))
    assert (r.returncode, r.stdout, r.stderr) == (0, EXAMPLE, "")


def test_who_before_and_after_the_deleted(example_db):
    r = nat64ho("who", "192.0.2.9:47102", "--at", "2019-03-18 15:00", "--db", str(example_db))
    assert r.returncode == 0
    assert r.stdout.splitlines() == [
        "192.0.2.9:47102 at 2019-03-18 15:00:00.000000 to 15:00:59.999999: [2001:db8::75]:33131",
        "  from   before history",
        "  until  2019-03-18 15:22:02.062254",
        "  events:",
        "    2019-03-18 15:22:02.062254 Deleted 192.0.2.9:47102 [2001:db8::75]:33131",
    ]
    r = invoke("who", "192.0.2.9:47102", "--at", "2019-03-18T15:30:00Z", "--db", str(example_db))
    assert r.exit_code == 0
    assert (
        r.stdout.splitlines()[0]
        == "192.0.2.9:47102 at 2019-03-18 15:30:00.000000 to 15:30:00.999999: [2001:db8::55]:34643"
    )
    assert "    2019-03-18 15:22:02.062478 Created 192.0.2.9:47102 [2001:db8::55]:34643" in r.stdout


def test_who_with_an_offset_is_converted_to_utc(example_db):
    r = invoke(
        "who",
        "192.0.2.9:47102",
        "--at",
        "2019-03-18T16:00:00+01:00",
        "--db",
        str(example_db),
        "--format",
        "json",
    )
    [out] = json.loads(r.stdout)
    assert out["at"] == "2019-03-18T15:00:00.000000Z" and out["ipv6"] == "2001:db8::75"
    assert out["events"] == [EXAMPLE.splitlines()[2]] and out["from"] is None


def test_who_no_entry_is_a_plain_answer(example_db):
    r = invoke(
        "who", "192.0.2.9:47102", "--at", "2019-03-18 15:22:02.0623", "--db", str(example_db)
    )
    assert r.exit_code == 0
    assert r.stdout == (
        "No entry: 192.0.2.9:47102 was not held at 2019-03-18 15:22:02.062300 "
        "to 15:22:02.062399 as far as this database knows.\n"
    )
    r = invoke("who", "[2001:db8::99]:1", "--db", str(example_db))
    assert r.exit_code == 0 and r.stdout.startswith("No entry: [2001:db8::99]:1 held no NAT port")


def test_who_endpoint_table_json_csv(example_db):
    r = invoke("who", "[2001:db8::55]:34643", "--db", str(example_db))
    assert r.exit_code == 0
    assert r.stdout.splitlines() == [
        "NAT64            PORT   FROM                        UNTIL                       IPV6 ENDPOINT",
        "192.0.2.9        47102  2019-03-18 15:22:02.062478  not recorded                [2001:db8::55]:34643",
    ]
    r = invoke("who", "2001:db8::/64", "--db", str(example_db), "--format", "json")
    rows = json.loads(r.stdout)
    assert [(x["ipv6"], x["from"], x["until"]) for x in rows] == [
        ("2001:db8::17", "2019-03-18T10:06:28.491727Z", None),
        ("2001:db8::55", "2019-03-18T15:22:02.062478Z", None),
        ("2001:db8::75", None, "2019-03-18T15:22:02.062254Z"),
    ]
    r = invoke("who", "2001:db8::75", "--db", str(example_db), "--format", "csv")
    assert r.stdout.splitlines() == [
        "nat,port,ipv6,ipv6_port,from,until,current",
        "192.0.2.9,47102,2001:db8::75,33131,,2019-03-18T15:22:02.062254Z,false",
    ]


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "args, line",
    [
        (
            ["who", "192.0.2.9:70000"],
            "Error: target '192.0.2.9:70000': expected NAT:PORT with an IPv4 "
            "address and a port 1-65535, e.g. 192.0.2.9:47102",
        ),
        (
            ["who", "192.0.2.300:1"],
            "Error: target '192.0.2.300:1': expected NAT:PORT with an IPv4 "
            "address and a port 1-65535, e.g. 192.0.2.9:47102",
        ),
        (
            ["who", "[2001:db8::zz]:1"],
            "Error: target '[2001:db8::zz]:1': not an IPv6 address, [IPV6]:PORT or IPV6/LEN prefix",
        ),
        (
            ["who", "2001:db8::/129"],
            "Error: target '2001:db8::/129': not an IPv6 address, [IPV6]:PORT or IPV6/LEN prefix",
        ),
        (
            ["who", "192.0.2.9:1", "--at", "noon"],
            "Error: --at 'noon': not a time (use 'YYYY-MM-DD HH:MM:SS' in UTC, ISO 8601, "
            "'now', 'yesterday', or -1h, -2d)",
        ),
        (["query", "--nat", "192.0.2"], "Error: --nat '192.0.2': not an IPv4 address"),
        (["query", "--port", "0"], "Error: --port '0': not a port number (1-65535)"),
        (
            ["query", "--ipv6", "2001:db8::1/200"],
            "Error: --ipv6 '2001:db8::1/200': not an IPv6 address, [IPV6]:PORT or IPV6/LEN prefix",
        ),
        (["query", "--format", "yaml"], "Error: --format 'yaml': expected one of table, json, csv"),
        (["export", "--format", "json"], "Error: --format 'json': expected one of log, jsonl, csv"),
        (
            ["export", "--since", "2019-13-01"],
            "Error: --since '2019-13-01': not a time (use 'YYYY-MM-DD HH:MM:SS' "
            "in UTC, ISO 8601, 'now', 'yesterday', or -1h, -2d)",
        ),
        (["stats", "--ports", "9-1"], "Error: --ports '9-1': first port is above last port"),
        # One past what a signed 64-bit integer of either backend holds.
        (
            ["export", "--after", "9223372036854775808"],
            "Error: --after '9223372036854775808': out of range "
            "(a sequence number is at most 9223372036854775807)",
        ),
        (
            ["export", "--after", "1" + "0" * 40],
            f"Error: --after '1{'0' * 40}': out of range "
            "(a sequence number is at most 9223372036854775807)",
        ),
        (
            ["export", "--after", "\u00b2"],
            "Error: --after '\u00b2': not a sequence number (the 'seq' of --format jsonl)",
        ),
        (
            ["query", "--port", "6\u00b2"],
            "Error: --port '6\u00b2': not a port number (1-65535)",
        ),
        (
            ["who", "192.0.2.9:1", "--at", "9999-12-31T23:59:59-01:00"],
            "Error: --at '9999-12-31T23:59:59-01:00': out of range (years 1 to 9999 in UTC)",
        ),
        (
            ["export", "--until", "0001-01-01T00:00:00+01:00"],
            "Error: --until '0001-01-01T00:00:00+01:00': out of range (years 1 to 9999 in UTC)",
        ),
        (
            ["prune", "--before", "last week"],
            "Error: --before 'last week': not a time (use 'YYYY-MM-DD HH:MM:SS' "
            "in UTC, ISO 8601, 'now', 'yesterday', or -1h, -2d)",
        ),
    ],
)
def test_bad_values_give_one_error_line_and_status_2(example_db, args, line):
    r = invoke(*args, "--db", str(example_db))
    assert (r.exit_code, r.stdout, r.stderr) == (2, "", line + "\n")


def test_the_highest_sequence_number_is_a_plain_empty_export(example_db):
    # The bound of parse_seq is what both backends take: nothing after it.
    r = nat64ho("export", "--after", "9223372036854775807", "--db", str(example_db))
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")
    r = nat64ho("export", "--after", "9223372036854775808", "--db", str(example_db))
    assert (r.returncode, r.stdout) == (2, "") and r.stderr.count("\n") == 1
    assert r.stderr.startswith("Error: --after '9223372036854775808': out of range")


def test_bad_value_through_the_real_command_has_no_traceback(example_db):
    r = nat64ho("who", "192.0.2.9:0", "--db", str(example_db))
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.splitlines() == [
        "Error: target '192.0.2.9:0': expected NAT:PORT with an IPv4 "
        "address and a port 1-65535, e.g. 192.0.2.9:47102"
    ]


@pytest.mark.parametrize(
    "args",
    [
        ["query"],
        ["who", "192.0.2.9:47102"],
        ["who", "2001:db8::1"],
        ["export"],
        ["stats"],
        ["prune", "--before", "2020-01-01", "--yes"],
        ["check"],
    ],
)
def test_missing_database_is_an_error_and_is_not_created(db_target, args):
    missing = absent_db(db_target)
    r = nat64ho(*args, "--db", str(missing), input="")
    assert r.returncode == 1
    assert r.stderr.startswith(f"Error: {missing}: no such database")
    assert len(r.stderr.splitlines()) == 1
    assert not db_exists(missing)


@pytest.mark.parametrize(
    "args", [["query"], ["export"], ["stats"], ["check"], ["forget", "1.2.3.4", "--yes"]]
)
def test_empty_postgresql_database_is_an_error_and_stays_empty(pg_url, args):
    r = nat64ho(*args, "--db", pg_url)
    assert r.returncode == 1
    assert one_error(r) == (
        f"Error: {pg_url}: holds no nat64ho tables yet (start 'nat64ho serve --db URL' "
        "to make them)"
    )
    assert db_state(pg_url) == ([], {}, [])


def test_unreachable_postgresql_server_is_one_error_line(tmp_path):
    url = f"postgresql:///nat64ho?host={tmp_path}"
    r = nat64ho("query", "--db", url)
    assert r.returncode == 1
    assert one_error(r).startswith(f"Error: {url}: cannot connect (")


def test_newer_database_is_refused(db):
    db_exec(db, "INSERT INTO schema_migrations VALUES (999, 'future', 0)")
    r = invoke("query", "--db", str(db))
    assert r.exit_code == 1 and "written by a newer nat64ho" in r.stderr


def test_locked_database_is_retried_then_reported(sqlite_db, monkeypatch):
    db = sqlite_db
    monkeypatch.setattr(schema, "BUSY_TIMEOUT_MS", 50)
    monkeypatch.setattr(cli_database, "BUSY_RETRY_S", 0.3)
    locker = sqlite3.connect(db, isolation_level=None)
    locker.execute("PRAGMA locking_mode = EXCLUSIVE")
    locker.execute("BEGIN EXCLUSIVE")
    locker.execute("INSERT INTO meta VALUES ('x', 1)")
    try:
        r = invoke("query", "--db", str(db))
    finally:
        locker.close()
    assert r.exit_code == 1
    assert r.stderr == f"Error: {db}: database is busy (locked by another process); try again\n"
    assert invoke("query", "--db", str(db)).exit_code == 0


def test_read_commands_do_not_change_the_file(example_db):
    before = db_state(example_db)
    for args in (
        ["query"],
        ["who", "192.0.2.9:47102"],
        ["who", "2001:db8::/32"],
        ["export"],
        ["stats"],
        ["check"],
        ["export", "--follow"],
    ):
        if args == ["export", "--follow"]:
            p = subprocess.Popen(
                [sys.executable, "-m", "nat64ho", *args, "--db", str(example_db)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            assert p.stdout is not None and p.stdout.readline() == EXAMPLE.splitlines(True)[0]
            p.terminate()
            assert p.wait(30) == 0
            continue
        assert nat64ho(*args, "--db", str(example_db)).returncode == 0
    if is_postgres(str(example_db)):
        assert db_state(example_db) == before
        return
    assert Path(example_db).read_bytes() == before
    wal = Path(f"{example_db}-wal")
    assert not wal.exists() or wal.stat().st_size == 0


@pytest.mark.parametrize(
    "args",
    [
        ["prune", "--before", "2020-01-01", "--yes"],
        ["forget", "192.0.2.9", "--yes"],
        ["import", "--rebuild-table"],
    ],
)
def test_table_changing_commands_refuse_while_the_table_is_owned(example_db, tmp_path, args):
    log = tmp_path / "again.log"
    log.write_text(EXAMPLE)
    if args[0] == "import":
        args = [*args, str(log)]
    before = db_state(example_db)
    with table_owned(example_db):
        r = nat64ho(*args, "--db", str(example_db))
    assert r.returncode == 1 and r.stdout == ""
    line = one_error(r)
    what = "import --rebuild-table" if args[0] == "import" else args[0]
    if is_postgres(str(example_db)):
        # The holder is named: its application name, where from, its backend.
        assert re.fullmatch(
            rf"Error: {re.escape(str(example_db))}: the table is owned by nat64ho serve "
            rf"\(test\) \(on a local socket, PostgreSQL backend \d+, connected [^)]+\); "
            rf"{what} needs it alone",
            line,
        ), line
    else:
        assert line.startswith(f"Error: {example_db}: the table is owned by process {os.getpid()}")
        assert line.endswith(f"; {what} needs it alone")
    assert db_state(example_db) == before
    # Free again: the same command runs (the example has no table for forget).
    r = nat64ho(*args, "--db", str(example_db))
    if args[0] == "forget":
        assert one_error(r) == f"Error: NAT64 192.0.2.9 is not known in {example_db}"
    else:
        assert r.returncode == 0, r.stderr


# ---------------------------------------------------------------- import and export


def test_import_reports_bad_lines_and_exits_1(db, tmp_path):
    a = tmp_path / "a.log"
    a.write_text(EXAMPLE.replace("Created 192.0.2.7:3719", "Created 192.0.2.7:3719x"))
    b = tmp_path / "b.log.gz"
    b.write_bytes(gzip.compress(b"not a log line\n" + EXAMPLE.encode()))
    r = invoke("import", str(a), str(b), "--db", str(db))
    assert r.exit_code == 1
    assert r.stderr.splitlines() == [
        f"{a}:2: skipped: not a log line",
        f"{b}:1: skipped: not a log line",
        "9 lines read, 4 events added, 3 already present, 2 skipped",
    ]
    # Nothing that parsed is lost; export keeps the order of arrival.
    lines = EXAMPLE.splitlines(True)
    assert invoke("export", "--db", str(db)).stdout == "".join(
        [lines[0], lines[2], lines[3], lines[1]]
    )


def test_import_from_stdin_twice_adds_nothing(db):
    r = nat64ho("import", "-", "--db", str(db), input=EXAMPLE)
    assert (r.returncode, r.stderr) == (
        0,
        "4 lines read, 4 events added, 0 already present, 0 skipped\n",
    )
    r = nat64ho("import", "-", "--db", str(db), input=EXAMPLE)
    assert (r.returncode, r.stderr) == (
        0,
        "4 lines read, 0 events added, 4 already present, 0 skipped\n",
    )


def test_import_missing_file_is_a_usage_error(db, tmp_path):
    r = invoke("import", str(tmp_path / "nope.log"), "--db", str(db))
    assert (r.exit_code, r.stderr) == (2, f"Error: '{tmp_path / 'nope.log'}': no such file\n")


def test_import_rebuild_table_fills_the_table(db, tmp_path):
    log = tmp_path / "x.log"
    log.write_text(EXAMPLE)
    r = invoke("import", "--rebuild-table", str(log), "--db", str(db))
    assert r.exit_code == 0 and r.stderr.endswith("; 2 entries added to the table\n")
    r = invoke("query", "--db", str(db), "--format", "csv")
    assert r.stdout.splitlines() == [
        "nat,port,ipv6,ipv6_port,created,last_use",
        "192.0.2.7,3719,2001:db8::17,53186,2019-03-18T10:06:28.491727Z,2019-03-18T10:06:28.491727Z",
        "192.0.2.9,47102,2001:db8::55,34643,2019-03-18T15:22:02.062478Z,2019-03-18T15:22:02.062478Z",
    ]


def test_export_to_gzip_file_and_formats(example_db, tmp_path):
    out = tmp_path / "h.log.gz"
    r = invoke("export", "--db", str(example_db), "--output", str(out))
    assert r.exit_code == 0 and r.stderr == f"4 events written to {out}\n"
    assert gzip.decompress(out.read_bytes()).decode() == EXAMPLE
    plain = tmp_path / "h.log"
    assert invoke("export", "--db", str(example_db), "-o", str(plain)).exit_code == 0
    assert plain.read_text() == EXAMPLE
    r = invoke(
        "export",
        "--db",
        str(example_db),
        "--format",
        "jsonl",
        "--nat",
        "192.0.2.9",
        "--since",
        "2019-03-18 15:22:02.062478",
    )
    assert [json.loads(x)["ipv6"] for x in r.stdout.splitlines()] == ["2001:db8::55"]
    r = invoke("export", "--db", str(example_db), "--format", "csv", "--until", "2019-03-18")
    assert r.stdout == "seq,ts,event,nat,port,ipv6,ipv6_port\n"


def test_query_formats(db, tmp_path):
    log = tmp_path / "x.log"
    log.write_text(EXAMPLE)
    invoke("import", "--rebuild-table", str(log), "--db", str(db))
    r = invoke("query", "--nat", "192.0.2.9", "--db", str(db))
    assert r.stdout.splitlines() == [
        "NAT64            PORT   CREATED                     LAST USE                    IPV6 ENDPOINT",
        "192.0.2.9        47102  2019-03-18 15:22:02.062478  2019-03-18 15:22:02.062478  [2001:db8::55]:34643",
    ]
    rows = json.loads(
        invoke("query", "--ipv6", "2001:db8::17", "--db", str(db), "--format", "json").stdout
    )
    assert rows == [
        {
            "nat": "192.0.2.7",
            "port": 3719,
            "ipv6": "2001:db8::17",
            "ipv6_port": 53186,
            "created": "2019-03-18T10:06:28.491727Z",
            "last_use": "2019-03-18T10:06:28.491727Z",
        }
    ]
    assert (
        json.loads(invoke("query", "--port", "1", "--db", str(db), "--format", "json").stdout) == []
    )


def test_stats_and_prune(example_db):
    r = invoke("stats", "--db", str(example_db), "--format", "json")
    assert [(s["nat"], s["entries"], s["capacity"]) for s in json.loads(r.stdout)] == [
        ("192.0.2.7", 0, 64508),
        ("192.0.2.9", 0, 64508),
    ]
    r = invoke("prune", "--before", "2019-03-18 15:00", "--db", str(example_db), "--yes")
    assert (r.exit_code, r.stdout) == (
        0,
        "2 history events before 2019-03-18 15:00:00.000000 deleted\n",
    )
    assert invoke("export", "--db", str(example_db)).stdout == "".join(EXAMPLE.splitlines(True)[2:])


@pytest.mark.parametrize("command", ["query", "who", "export", "import", "stats", "prune"])
def test_every_command_and_option_has_help(command):
    r = invoke(command, "--help")
    assert r.exit_code == 0
    assert r.stdout.count("\n") > 3
    import typer.main

    group = typer.main.get_command(cli.app)
    cmd = group.commands[command]
    assert cmd.help
    for param in cmd.params:
        assert getattr(param, "help", None), f"{command} {param.name} has no help"


# ---------------------------------------------------------------- against a real server


@pytest.mark.slow
def test_commands_on_a_database_written_by_serve(server_factory, db_target):
    srv = server_factory("--ports", "1028-1029", db=db_target)
    addr = {i: v6(i) for i in (1, 2, 3)}

    async def go():
        c = await connect(srv)
        first = await c.map(addr[1], 1001)
        await c.map(addr[2], 1002)
        third = await c.map(addr[3], 1003)  # full: the entry of ::1 is deleted
        c.close()
        return first[-1].nat_port, third

    port1, third = run(go())
    assert [type(m).__name__ for m in third] == ["Deleted", "Mapping"]
    assert srv.stop() == 0
    db = str(srv.db)

    exported = nat64ho("export", "--db", db)
    assert exported.returncode == 0, exported.stderr
    assert exported.stdout == srv.log.read_text()
    lines = exported.stdout.splitlines()
    assert [x.split()[2] for x in lines] == [
        "Initialized",
        "Created",
        "Created",
        "Deleted",
        "Created",
    ]

    # Between the first Created and the Deleted, the port was ::1's.
    t_deleted = " ".join(lines[3].split()[:2])
    r = nat64ho("who", f"127.0.0.1:{port1}", "--at", lines[1][:26], "--db", db)
    assert r.returncode == 0
    assert r.stdout.splitlines()[0].endswith(": [2001:db8::1]:1001")
    assert r.stdout.splitlines()[2] == f"  until  {t_deleted}"
    assert lines[1] in r.stdout and lines[3] in r.stdout
    # Now it is ::3's, still held.
    r = nat64ho("who", f"127.0.0.1:{port1}", "--db", db, "--format", "json")
    [now] = json.loads(r.stdout)
    assert (now["ipv6"], now["ipv6_port"], now["current"]) == ("2001:db8::3", 1003, True)

    r = nat64ho("who", "[2001:db8::1]:1001", "--db", db, "--format", "json")
    [held] = json.loads(r.stdout)
    until = t_deleted.replace(" ", "T") + "Z"
    assert (held["port"], held["until"], held["current"]) == (port1, until, False)

    r = nat64ho("query", "--nat", "127.0.0.1", "--db", db, "--format", "json")
    assert sorted((e["ipv6"], e["ipv6_port"]) for e in json.loads(r.stdout)) == [
        ("2001:db8::2", 1002),
        ("2001:db8::3", 1003),
    ]
    # The capacity comes from the --ports the server recorded.
    r = nat64ho("stats", "--db", db, "--format", "json")
    [s] = json.loads(r.stdout)
    assert (s["nat"], s["entries"], s["capacity"], s["created_hour"], s["deleted_hour"]) == (
        "127.0.0.1",
        2,
        2,
        3,
        1,
    )
    assert s["first_hello"] is not None


@pytest.mark.slow
def test_rebuild_table_refuses_while_a_server_runs(server_factory, tmp_path, db_target):
    srv = server_factory(db=db_target)
    log = tmp_path / "x.log"
    log.write_text(EXAMPLE)
    r = nat64ho("import", "--rebuild-table", str(log), "--db", str(srv.db))
    assert r.returncode == 1
    if is_postgres(db_target):
        assert "the table is owned by nat64ho serve pid" in one_error(r)
    else:
        assert "another process has this database open" in r.stderr
    assert srv.stop() == 0
    r = nat64ho("import", "--rebuild-table", str(log), "--db", str(srv.db))
    assert r.returncode == 0, r.stderr


# ---------------------------------------------------------------- either backend


def test_nat64ho_db_names_the_database_in_the_environment(example_db):
    env = {**os.environ, "NAT64HO_DB": str(example_db)}
    r = subprocess.run(
        [sys.executable, "-m", "nat64ho", "export"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert (r.returncode, r.stdout, r.stderr) == (0, EXAMPLE, "")


def test_rows_that_do_not_decode_are_named_by_reads_and_check(example_db):
    nat = 0xC0000209
    db_exec(
        example_db,
        "INSERT INTO entry VALUES (?, ?, ?, ?, ?, ?)",
        nat,
        70000,
        v6(1),
        1,
        2,
        3,
    )
    r = nat64ho("query", "--db", str(example_db))
    assert r.returncode == 1
    assert one_error(r) == (
        f"Error: {example_db}: table entry, row (nat={nat}, port=70000) does not decode: "
        f"port holds int 70000; run 'nat64ho check --db {example_db}'"
    )
    db_exec(example_db, "DELETE FROM entry")
    db_exec(example_db, "UPDATE event SET addr = ? WHERE kind = 2", b"\x01\x02\x03\x04")
    r = nat64ho("export", "--db", str(example_db))
    assert r.returncode == 1
    assert one_error(r) == (
        f"Error: {example_db}: table event, row id 3 does not decode: addr holds a blob of "
        f"4 octets; run 'nat64ho check --db {example_db}'"
    )
    r = nat64ho("check", "--db", str(example_db))
    assert r.returncode == 1 and r.stdout == ""
    assert "table event, row id 3 does not decode" in one_error(r)
