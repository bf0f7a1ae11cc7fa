"""Operator input that used to slip through: URLs of another scheme, host
bits, retention that deletes everything, times as people write them,
destructive commands that do not ask, and errors that do not name the
option. Each cause: its exact ``Error:`` line and exit status."""

from __future__ import annotations

import os
import pty
import re
import select
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from freezegun import freeze_time
from typer.testing import CliRunner

from nat64ho import cli
from nat64ho.cli.options import UsageError, parse_time
from nat64ho.eventlog import ts_from_datetime
from tests.helpers import (
    ServerProcess,
    db_rows,
    db_state,
    make_tables,
    nat64ho,
    one_error,
    v6,
)
from tests.test_cli_ops import EXAMPLE

PY = [sys.executable, "-m", "nat64ho"]


def invoke(*args: str):
    return CliRunner().invoke(cli.app, list(args))


NAT7 = 0xC0000207  # 192.0.2.7


@pytest.fixture
def example_db(tmp_path):
    """The example's history, and 192.0.2.7 with one entry and its boot record."""
    t = us("2019-03-18 10:06:28.491727")
    db = make_tables(
        tmp_path / "t.db",
        entries=[(NAT7, 3719, v6(0x17), 53186, t, t)],
        nats=[(NAT7, bytes(8), t, t)],
    )
    log = tmp_path / "example.log"
    log.write_text(EXAMPLE)
    assert invoke("import", str(log), "--db", str(db)).exit_code == 0
    return db


def us(text: str) -> int:
    return parse_time(text, "t")


# ---------------------------------------------------------------- --db


TYPO = "postgressql://nat64ho:secret@127.0.0.1/nat64ho"
TYPO_LINE = (
    "Error: --db 'postgressql://nat64ho:***@127.0.0.1/nat64ho': unknown URL scheme "
    "'postgressql'; a PostgreSQL database is postgresql://…, an SQLite database a file path"
)


@pytest.mark.parametrize(
    "args",
    [
        ["serve", "--check-config"],
        ["serve", "--listen", "127.0.0.1:0"],
        ["query"],
        ["export"],
        ["check"],
        ["prune", "--before", "2020-01-01", "--yes"],
        ["forget", "192.0.2.9", "--yes"],
        ["import", __file__],
    ],
)
def test_a_url_of_another_scheme_is_refused_not_made_a_file(tmp_path, args):
    # As a path, the typo would start a second, empty table beside the shared one.
    r = subprocess.run(
        [*PY, *args, "--db", TYPO], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert (r.returncode, one_error(r)) == (2, TYPO_LINE)
    assert list(tmp_path.iterdir()) == []


def test_the_typo_in_nat64ho_db_is_named_as_the_variable(tmp_path):
    r = subprocess.run(
        [*PY, "serve", "--check-config"],
        cwd=tmp_path,
        env={**os.environ, "NAT64HO_DB": "mysql://h/x"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (r.returncode, one_error(r)) == (
        2,
        "Error: $NAT64HO_DB 'mysql://h/x': unknown URL scheme 'mysql'; a PostgreSQL "
        "database is postgresql://…, an SQLite database a file path",
    )


@pytest.mark.parametrize("value", ["", "/", "."])
@pytest.mark.parametrize("command", [["serve", "--check-config"], ["serve"], ["query"]])
def test_a_db_without_a_file_name_is_one_error_line(command, value):
    r = nat64ho(*command, "--db", value)
    assert (r.returncode, one_error(r)) == (
        2,
        f"Error: --db {value!r}: not a file name; give the database file, "
        "e.g. /var/lib/nat64ho/table.db",
    )


def test_check_config_refuses_a_directory_as_database(tmp_path):
    r = nat64ho("serve", "--check-config", "--db", str(tmp_path))
    assert (r.returncode, one_error(r)) == (
        2,
        f"Error: {tmp_path}: is a directory, not a database file",
    )


@pytest.mark.parametrize("content", [b"hello\n", None])
def test_a_refused_database_leaves_no_lock_file(tmp_path, content):
    db = tmp_path / "foreign.db"
    if content is None:
        import sqlite3

        sqlite3.connect(db).execute("CREATE TABLE t (x)").connection.close()
    else:
        db.write_bytes(content)
    r = nat64ho("serve", "--db", str(db), "--listen", "127.0.0.1:0", "--log-file", "-")
    assert r.returncode == 1 and one_error(r).startswith(f"Error: {db}: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign.db"]


# ---------------------------------------------------------------- serve options


@pytest.mark.parametrize(
    "args, line",
    [
        (
            ["--allow", "192.0.2.7/24"],
            "Error: --allow '192.0.2.7/24': host bits set; write 192.0.2.0/24 for that "
            "network, or 192.0.2.7 for the one address",
        ),
        (
            ["--cache-size", "abc"],
            "Error: --cache-size 'abc': expected a whole number, 1 or more",
        ),
        (["--min-idle", "-5"], "Error: --min-idle '-5': expected a number, 0 or more"),
        (["--create-rate", "inf"], "Error: --create-rate 'inf': expected a number, 0 or more"),
        (
            ["--hello-rate", "fast"],
            "Error: --hello-rate 'fast': expected a number, 0 or more",
        ),
        (
            ["--keep-history", "0.01"],
            "Error: --keep-history 0.01: under an hour would delete nearly all history; "
            "give at least 0.042 days, or 0 to keep all",
        ),
        (["--ports", "9-1"], "Error: --ports '9-1': first port is above last port"),
        (
            ["--workers", "many"],
            "Error: --workers 'many': expected a number from 1 to 64, or 'auto'",
        ),
    ],
)
def test_check_config_names_the_option_and_the_cause(tmp_path, args, line):
    r = nat64ho("serve", "--check-config", "--db", str(tmp_path / "t.db"), *args)
    assert (r.returncode, one_error(r), r.stdout) == (2, line, "")
    assert "Input should" not in r.stderr  # no validation library's wording


def test_a_prefix_without_host_bits_is_fine(tmp_path):
    r = nat64ho("serve", "--check-config", "--allow", "192.0.2.0/24", "--allow", "192.0.2.7")
    assert (r.returncode, r.stdout) == (0, "ok: the options are valid\n")


def test_a_bad_nat64ho_listen_is_named_as_the_variable(tmp_path):
    r = subprocess.run(
        [*PY, "serve", "--check-config"],
        env={**os.environ, "NAT64HO_LISTEN": "6464"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (r.returncode, one_error(r)) == (
        2,
        "Error: $NAT64HO_LISTEN '6464': expected ADDR:PORT, e.g. 127.0.0.1:6464",
    )


def test_metrics_on_a_busy_port_is_reported_before_listening(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = nat64ho(
            "serve",
            "--db",
            str(tmp_path / "t.db"),
            "--listen",
            "127.0.0.1:0",
            "--metrics",
            f"127.0.0.1:{port}",
        )
    assert (r.returncode, one_error(r)) == (
        1,
        f"Error: --metrics 127.0.0.1:{port}: Address already in use",
    )
    assert "listening" not in r.stderr and not (tmp_path / "t.db").exists()


def test_keep_history_0_keeps_the_whole_history(example_db, tmp_path):
    before = db_rows(example_db, "SELECT count(*) FROM event")
    assert before == [(4,)]
    srv = ServerProcess(tmp_path, "--keep-history", "0", db=example_db).start()
    try:
        # The first prune runs at start; its log line would come right after.
        time.sleep(1.0)
    finally:
        assert srv.stop() == 0
    assert "pruned" not in srv.stderr
    assert db_rows(example_db, "SELECT count(*) FROM event") == before


# ---------------------------------------------------------------- times


@freeze_time("2019-03-18 16:22:02.062478")
@pytest.mark.parametrize(
    "text, expected",
    [
        ("now", "2019-03-18 16:22:02.062478"),
        ("-1h", "2019-03-18 15:22:02.062478"),
        ("-2d", "2019-03-16 16:22:02.062478"),
        ("+30min", "2019-03-18 16:52:02.062478"),
        ("-1h30min", "2019-03-18 14:52:02.062478"),
        ("2 days ago", "2019-03-16 16:22:02.062478"),
        ("yesterday", "2019-03-17 00:00:00"),
        ("today", "2019-03-18 00:00:00"),
        ("tomorrow", "2019-03-19 00:00:00"),
        ("2019-03-18 10:00", "2019-03-18 10:00:00"),
    ],
)
def test_times_as_people_write_them(text, expected):
    import datetime as dt

    assert parse_time(text, "--at") == ts_from_datetime(dt.datetime.fromisoformat(expected))


@pytest.mark.parametrize("text", ["-1 fortnight", "1h", "-h", "+1h ago", "last week"])
def test_what_is_not_a_time_is_refused(text):
    with pytest.raises(UsageError, match=r"not a time"):
        parse_time(text, "--at")


@freeze_time("2019-03-18 16:22:01")
def test_since_an_hour_ago_through_the_command(example_db):
    r = invoke("export", "--since", "-1h", "--db", str(example_db))
    assert (r.exit_code, r.stdout) == (0, "".join(EXAMPLE.splitlines(True)[2:]))
    r = invoke("export", "--since", "-1h", "--until", "now", "--db", str(example_db))
    assert (r.exit_code, r.stdout) == (0, "".join(EXAMPLE.splitlines(True)[2:]))
    r = invoke("export", "--since", "yesterday", "--until", "-6h", "--db", str(example_db))
    assert (r.exit_code, r.stdout) == (0, "".join(EXAMPLE.splitlines(True)[:2]))
    r = invoke("who", "192.0.2.9:47102", "--at", "-1h", "--db", str(example_db))
    assert r.stdout.splitlines()[0] == (
        "192.0.2.9:47102 at 2019-03-18 15:22:01.000000: [2001:db8::75]:33131"
    )


@freeze_time("2019-03-18 16:22:02")
def test_prune_before_a_relative_time_and_not_in_the_future(example_db):
    r = invoke("prune", "--before", "+1d", "--yes", "--db", str(example_db))
    assert (r.exit_code, r.stderr) == (
        2,
        "Error: --before 2019-03-19 16:22:02.000000: in the future; prune deletes events "
        "older than a past time\n",
    )
    assert db_rows(example_db, "SELECT count(*) FROM event") == [(4,)]
    r = invoke("prune", "--before", "-2h", "--yes", "--db", str(example_db))
    assert (r.exit_code, r.stdout) == (
        0,
        "2 history events before 2019-03-18 14:22:02.000000 deleted\n",
    )


# ---------------------------------------------------------------- destructive commands


@pytest.mark.parametrize(
    "args, line",
    [
        (
            ["prune", "--before", "2019-03-18 15:00", "--dry-run"],
            "would delete 2 history events before 2019-03-18 15:00:00.000000\n",
        ),
        (
            ["forget", "192.0.2.7", "--dry-run"],
            "would forget NAT64 192.0.2.7: 1 entries and its boot record; its history stays\n",
        ),
    ],
)
def test_dry_run_says_what_and_changes_nothing(example_db, args, line):
    before = db_state(example_db)
    r = nat64ho(*args, "--db", str(example_db))
    assert (r.returncode, r.stdout, r.stderr) == (0, line, "")
    assert db_state(example_db) == before


@pytest.mark.parametrize(
    "args", [["prune", "--before", "2019-03-18 15:00"], ["forget", "192.0.2.7"]]
)
def test_on_a_pipe_without_yes_nothing_changes(example_db, args):
    before = db_state(example_db)
    r = nat64ho(*args, "--db", str(example_db))
    assert (r.returncode, one_error(r)) == (
        2,
        "Error: this changes the database: give --yes to go ahead, "
        "or --dry-run to see what it would do",
    )
    assert db_state(example_db) == before


def answer_on_a_terminal(args: list[str], answer: bytes) -> tuple[int, str]:
    """Run ``nat64ho args`` with stdin and stderr on a pseudo-terminal; type
    ``answer`` once it asks."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(PY + args, stdin=slave, stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    seen = b""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and b"[y/N]" not in seen:
        if select.select([master], [], [], 0.2)[0]:
            try:
                seen += os.read(master, 4096)
            except OSError:  # EIO: it closed the terminal without asking
                break
    os.write(master, answer)
    out, _ = proc.communicate(timeout=60)
    while select.select([master], [], [], 0.1)[0]:
        try:
            chunk = os.read(master, 4096)
        except OSError:
            break
        if not chunk:
            break
        seen += chunk
    os.close(master)
    return proc.returncode, seen.decode() + out.decode()


def test_on_a_terminal_prune_asks_and_no_means_nothing_changes(example_db):
    before = db_state(example_db)
    args = ["prune", "--before", "2019-03-18 15:00", "--db", str(example_db)]
    status, screen = answer_on_a_terminal(args, b"n\n")
    assert "Delete 2 history events before 2019-03-18 15:00:00.000000? [y/N]" in screen
    assert status == 1 and "Error: nothing changed" in screen, screen
    assert db_state(example_db) == before
    status, screen = answer_on_a_terminal(args, b"y\n")
    assert status == 0 and "2 history events before" in screen, screen
    assert db_rows(example_db, "SELECT count(*) FROM event") == [(2,)]


def test_on_a_terminal_forget_asks(example_db):
    args = ["forget", "192.0.2.7", "--db", str(example_db)]
    status, screen = answer_on_a_terminal(args, b"y\n")
    assert re.search(r"Forget NAT64 192\.0\.2\.7: 1 entries and its boot record\? \[y/N\]", screen)
    assert status == 0 and "forgot NAT64 192.0.2.7" in screen, screen
    assert db_rows(example_db, "SELECT count(*) FROM nat") == [(0,)]


# ---------------------------------------------------------------- typer as documented


def test_the_cli_uses_only_typers_public_api():
    source = "\n".join(p.read_text() for p in Path(cli.__file__).parent.glob("*.py"))
    for private in ("typer._click", "_get_number_range_help_str", "_usage_display_name", "click."):
        assert private not in source, private


# ---------------------------------------------------------------- output


@pytest.mark.parametrize("fmt", ["table", "csv"])
def test_no_headers_leaves_only_the_rows(example_db, fmt):
    full = invoke("query", "--db", str(example_db), "--format", fmt)
    bare = invoke("query", "--db", str(example_db), "--format", fmt, "--no-headers")
    assert full.exit_code == bare.exit_code == 0
    assert len(full.stdout.splitlines()) == 2
    assert bare.stdout.splitlines() == full.stdout.splitlines()[1:]
    assert "192.0.2.7" in bare.stdout
    # Each run starts with headers again (the option is per command line).
    again = invoke("stats", "--db", str(example_db), "--format", fmt)
    assert again.stdout.splitlines()[0].lower().startswith("nat")
    bare = invoke("stats", "--db", str(example_db), "--format", fmt, "--no-headers")
    assert bare.stdout.splitlines() == again.stdout.splitlines()[1:]
