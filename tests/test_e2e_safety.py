"""Server and storage safety, end to end: one owner per table, databases that
cannot be written, stops while commits fail, a log file on a full disk,
private files, odd or hostile database files, IPv6 listen addresses.

Real ``nat64ho`` processes, real files, real tmpfs mounts (root)."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import stat
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from nat64ho.core import wire
from tests.helpers import (
    ServerProcess,
    connect,
    fill,
    nat64ho,
    one_error,
    run,
    serve_args,
    tmpfs,
    umount,
    v6,
    wait_for,
)

# ---------------------------------------------------------------- 1. one owner per table


@pytest.mark.slow
def test_one_server_per_table_and_standby_takes_over(tmp_path, procs):
    db, log = tmp_path / "table.db", tmp_path / "events.log"
    first = procs(*serve_args(db, log, "--ports", "1028-1030"))
    port = first.port()

    async def hello_map(port_no: int, addr: bytes) -> wire.Mapping:
        srv = ServerProcess(tmp_path)
        srv.port = port_no
        c = await connect(srv)
        [m] = await c.map(addr, 1000)
        c.close()
        return m

    held = run(hello_map(port, v6(1)))
    assert isinstance(held, wire.Mapping)

    # A second server on the same table: refused at once, naming the holder.
    r = nat64ho(*serve_args(db, log, "--ports", "1028-1030"))
    assert r.returncode == 1
    assert one_error(r) == (
        f"Error: {db}: the table is owned by process {first.proc.pid} "
        "(a running 'nat64ho serve'?); serve needs it alone"
    )
    # So are the commands that change the table.
    r = nat64ho("prune", "--yes", "--before", "2020-01-01", "--db", str(db))
    assert r.returncode == 1 and f"process {first.proc.pid}" in one_error(r)
    logfile = tmp_path / "import.log"
    logfile.write_text("2019-03-18 10:06:28.491727 Created 192.0.2.7:3719 [2001:db8::17]:53186\n")
    r = nat64ho("import", "--rebuild-table", str(logfile), "--db", str(db))
    assert r.returncode == 1 and one_error(r).startswith(f"Error: {db}: ")
    # Reads stay possible beside the owner.
    assert nat64ho("query", "--db", str(db)).returncode == 0

    # A standby waits, says so, and takes over when the owner stops.
    standby = procs(*serve_args(db, log, "--ports", "1028-1030", "--standby"))
    standby.wait_line(rf"standby: .* owned by process {first.proc.pid}; waiting")
    time.sleep(1.0)
    assert standby.proc.poll() is None and "listening" not in standby.stderr
    first.proc.send_signal(signal.SIGTERM)
    assert first.proc.wait(30) == 0
    port2 = standby.port()

    async def after() -> None:
        srv = ServerProcess(tmp_path)
        srv.port = port2
        c = await connect(srv)
        # The entry the first server acknowledged is still held by its client.
        assert await c.exchange([wire.Lookup(held.nat_port)]) == [held]
        assert await c.map(v6(1), 1000) == [held]
        c.close()

    run(after())
    # Now the standby owns it: a prune is refused naming it.
    r = nat64ho("prune", "--yes", "--before", "2020-01-01", "--db", str(db))
    assert r.returncode == 1 and f"process {standby.proc.pid}" in one_error(r)
    standby.proc.send_signal(signal.SIGTERM)
    assert standby.proc.wait(30) == 0
    r = nat64ho("prune", "--yes", "--before", "2020-01-01", "--db", str(db))
    assert r.returncode == 0, r.stderr


def test_standby_stopped_while_waiting_exits_cleanly(tmp_path, procs):
    db, log = tmp_path / "table.db", tmp_path / "events.log"
    first = procs(*serve_args(db, log))
    first.port()
    standby = procs(*serve_args(db, log, "--standby"))
    standby.wait_line("waiting to take over")
    standby.proc.send_signal(signal.SIGTERM)
    assert standby.proc.wait(15) == 0
    assert "Traceback" not in standby.stderr


# ---------------------------------------------------------------- 2. unwritable, stops


def test_database_that_cannot_be_written_is_refused_at_start(tmp_path):
    db, log = tmp_path / "table.db", tmp_path / "events.log"
    srv = ServerProcess(tmp_path, db=db, log=log).start()
    assert srv.stop() == 0
    # Immutable: even root cannot write it (what a read-only file is to a user).
    r = subprocess.run(["chattr", "+i", str(db)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"the filesystem of {tmp_path} has no immutable flag: {r.stderr.strip()}")
    try:
        r = nat64ho(*serve_args(db, log), timeout=60)
        assert r.returncode == 1
        error = one_error(r)
        assert error.startswith(f"Error: {db}: cannot be written (") and "readonly" in error
        assert "listening" not in r.stderr
    finally:
        subprocess.run(["chattr", "-i", str(db)], check=True)


@pytest.mark.slow
@pytest.mark.parametrize(
    "signals", [[signal.SIGTERM], [signal.SIGINT, signal.SIGINT]], ids=["sigterm", "ctrl_c_twice"]
)
def test_stop_while_commits_fail_ends_and_counts_what_is_lost(small_fs, tmp_path, procs, signals):
    db = small_fs / "table.db"
    p = procs(*serve_args(db, tmp_path / "events.log"))
    port = p.port()

    async def go() -> list:
        srv = ServerProcess(tmp_path)
        srv.port = port
        c = await connect(srv)
        [m] = await c.map(v6(1), 1)
        assert isinstance(m, wire.Mapping)
        fill(small_fs)
        c.send([wire.Map(v6(2), 2)])  # its commit fails: never answered
        got = await c.quiet(1.0)
        c.close()
        return got

    assert run(go()) == []
    p.wait_line("cannot commit")
    start = time.monotonic()
    for sig in signals:
        p.proc.send_signal(sig)
        time.sleep(0.3)
    status = p.proc.wait(20)
    took = time.monotonic() - start
    assert took < 15, took
    assert status == 1
    m = re.search(
        r"^Error: (\S+): stopped with (\d+) changes not committed \(.*\); none of "
        r"them was acknowledged to a NAT64$",
        one_error(p.stderr),
        re.M,
    )
    assert m and m.group(1) == str(db) and int(m.group(2)) >= 2, p.stderr  # entry + Created
    assert "Traceback" not in p.stderr and "KeyboardInterrupt" not in p.stderr


# ---------------------------------------------------------------- 3. log catch-up


def metric(url: str, name: str) -> float:
    body = urllib.request.urlopen(url, timeout=10).read().decode()
    [value] = [ln.split()[-1] for ln in body.splitlines() if ln.startswith(name + " ")]
    return float(value)


@pytest.mark.slow
@pytest.mark.parametrize("seal_every", ["0", "1"], ids=["hot", "sealing"])
def test_log_file_catches_up_from_the_history_when_space_returns(tmp_path, procs, seal_every):
    logs = tmpfs(tmp_path / "logs", "64k")
    p = None
    try:
        db, log = tmp_path / "table.db", logs / "events.log"
        args = ("--create-rate", "0", "--metrics", "127.0.0.1:0", "--seal-every", seal_every)
        p = procs(*serve_args(db, log, *args))
        port = p.port()
        url = "http://{}:{}/metrics".format(
            *p.wait_line(r"metrics on http://([\d.]+):(\d+)/").groups()
        )
        state: dict = {}

        async def maps(lo: int, hi: int) -> None:
            srv = ServerProcess(tmp_path)
            srv.port = port
            c = await connect(srv)
            for i in range(lo, hi):
                [m] = await c.map(v6(i), 1000)
                assert isinstance(m, wire.Mapping)  # answered: the database has it
            c.close()

        run(maps(0, 50))
        filler = fill(logs)
        run(maps(50, 400))  # lines that cannot be written: ~30 KiB
        p.wait_line("cannot write log file")
        state["waiting"] = metric(url, "nat64ho_log_lines_waiting")
        assert state["waiting"] > 0
        if seal_every != "0":
            time.sleep(2.5)  # sealing rounds pass: the lines missing stay hot
        filler.unlink()
        run(maps(400, 500))  # while the catch-up runs: they must join it in order
        m = p.wait_line(r"log file .* written again: (\d+) lines caught up from the database")
        assert int(m.group(1)) >= state["waiting"]
        assert metric(url, "nat64ho_log_lines_waiting") == 0
        run(maps(500, 520))  # and it goes on directly
        export = nat64ho("export", "--db", str(db))
        assert export.returncode == 0
        wait_for(lambda: log.read_text() == export.stdout, timeout=10)
        assert export.stdout.count(" Created ") == 520
        errors = [ln for ln in p.lines if "cannot write log file" in ln]
        assert len(errors) == 1
        p.proc.send_signal(signal.SIGTERM)
        assert p.proc.wait(30) == 0
    finally:
        if p is not None:
            p.kill()  # before the unmount: it holds the log open
        umount(logs)


# ---------------------------------------------------------------- 4. private files


def test_nothing_serve_creates_is_readable_by_others_even_under_umask_0(tmp_path, procs):
    db = tmp_path / "data" / "sub" / "table.db"
    log = tmp_path / "logs" / "x" / "events.log"
    p = procs(*serve_args(db, log), shell_umask=0)
    port = p.port()

    async def go() -> None:
        srv = ServerProcess(tmp_path)
        srv.port = port
        c = await connect(srv)
        assert isinstance((await c.map(v6(1), 1))[0], wire.Mapping)
        c.close()

    run(go())
    for d in (tmp_path / "data", db.parent, tmp_path / "logs", log.parent):
        assert stat.S_IMODE(d.stat().st_mode) == 0o750, d
    for f in (db, Path(f"{db}-wal"), Path(f"{db}-shm"), Path(f"{db}.lock"), log):
        mode = stat.S_IMODE(f.stat().st_mode)
        assert mode & ~0o640 == 0, (f, oct(mode))
    p.proc.send_signal(signal.SIGTERM)
    assert p.proc.wait(30) == 0


# ---------------------------------------------------------------- 6. odd and hostile files

COMMANDS = [
    ["query"],
    ["who", "192.0.2.9:47102"],
    ["export"],
    ["stats"],
    ["check"],
    ["prune", "--yes", "--before", "2020-01-01"],
]


@pytest.mark.parametrize("kind", ["fifo", "directory", "device"])
def test_only_regular_files_are_opened_as_databases(tmp_path, kind):
    if kind == "fifo":
        db = tmp_path / "table.db"
        os.mkfifo(db)
        what = "a FIFO"
    elif kind == "directory":
        db = tmp_path / "table.db"
        db.mkdir()
        what = "a directory"
    else:
        db = Path("/dev/null")
        what = "a character device"
    for args in [*COMMANDS, serve_args(db, tmp_path / "events.log")[:-2]]:
        if args[0] != "serve":
            args = [*args, "--db", str(db)]
        r = nat64ho(*args, timeout=30)  # a hang fails here
        assert r.returncode == 1, (args, r.stderr)
        assert one_error(r) == f"Error: {db}: is {what}, not a database file", args
    assert not (tmp_path / "events.log").exists()


def _db_with(tmp_path: Path, *sql: str) -> Path:
    db = tmp_path / "table.db"
    srv = ServerProcess(tmp_path, db=db).start()
    assert srv.stop() == 0
    conn = sqlite3.connect(db, isolation_level=None)
    for statement in sql:
        conn.execute(statement)
    conn.close()
    return db


ENDLESS = (
    "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) "
    "SELECT n, n, x'00', n, n, n FROM r"
)


@pytest.mark.slow
def test_planted_views_and_triggers_are_refused_by_name(tmp_path):
    db = _db_with(
        tmp_path,
        "ALTER TABLE entry RENAME TO entry_old",
        f"CREATE VIEW entry (nat, port, addr, aport, created, last_use) AS {ENDLESS}",
        f"CREATE TRIGGER spin AFTER INSERT ON event BEGIN SELECT count(*) FROM ({ENDLESS}); END",
    )
    for args in [c for c in COMMANDS if c[0] != "check"]:
        r = nat64ho(*args, "--db", str(db), timeout=30)
        assert r.returncode == 1, (args, r.stderr)
        error = one_error(r)
        assert error.startswith(f"Error: {db}: ") and "unknown trigger spin on event" in error
        assert "unknown view entry" in error
    r = nat64ho(*serve_args(db, tmp_path / "events.log"), timeout=30)
    assert r.returncode == 1 and "unknown trigger spin on event" in one_error(r)
    r = nat64ho("check", "--db", str(db), timeout=30)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    found = r.stderr.splitlines()
    for what in (
        "unknown table entry_old",
        "unknown trigger spin on event",
        "unknown view entry",
        "index entry_endpoint",
    ):
        assert any(what in line for line in found), (what, r.stderr)
    assert all(line.startswith(f"Error: {db}: ") for line in found)


@pytest.mark.slow
def test_rows_that_do_not_decode_are_named_not_raised(tmp_path, procs):
    db = _db_with(
        tmp_path,
        # 127.0.0.1: a text port; 127.0.0.3: an address of 15 octets.
        "INSERT INTO entry VALUES (2130706433, 'abc', zeroblob(16), 1, 1, 1)",
        "INSERT INTO entry VALUES (2130706435, 2000, zeroblob(15), 7, 1, 1)",
        "INSERT INTO event (ts, kind, nat, port, addr, aport) "
        "VALUES (1, 1, 2130706435, 2000, zeroblob(15), 7)",
        # 127.0.0.4: a last use that is no time.
        "INSERT INTO entry VALUES (2130706436, 3000, zeroblob(16), 1, 1, 'soon')",
    )
    r = nat64ho("query", "--db", str(db))
    assert r.returncode == 1
    assert re.match(
        rf"Error: {re.escape(str(db))}: table entry, row \(nat=2130706433, "
        r"port='abc'\) does not decode: port holds str 'abc'",
        one_error(r),
    )
    r = nat64ho("query", "--nat", "127.0.0.3", "--db", str(db))
    assert r.returncode == 1 and "addr holds a blob of 15 octets" in one_error(r)
    r = nat64ho("export", "--db", str(db))
    assert r.returncode == 1
    assert re.search(
        r"table event, row id \d+ does not decode: addr holds a blob of 15 octets", one_error(r)
    )
    r = nat64ho("who", "127.0.0.3:2000", "--at", "1970-01-01 00:00:00.000002", "--db", str(db))
    assert r.returncode == 1 and "table event" in one_error(r)
    r = nat64ho("stats", "--db", str(db))
    assert r.returncode == 1
    assert one_error(r) == (
        f"Error: {db}: entry.last_use of NAT64 127.0.0.4 holds str 'soon', "
        "not a time; run 'nat64ho check'"
    )
    r = nat64ho("check", "--db", str(db))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "table entry, row (nat=2130706433, port='abc') does not decode" in r.stderr
    assert "table entry, row (nat=2130706435, port=2000) does not decode" in r.stderr
    assert re.search(r"table event, row id \d+ does not decode", r.stderr)

    # serve: the read that meets the bad row is refused; the rest is served.
    p = procs(*serve_args(db, tmp_path / "events.log", "--metrics", "127.0.0.1:0"))
    port = p.port()
    url = "http://{}:{}/metrics".format(*p.wait_line(r"metrics on http://([\d.]+):(\d+)/").groups())

    async def go() -> None:
        srv = ServerProcess(tmp_path)
        srv.port = port
        bad = await connect(srv, local="127.0.0.3")
        # Port 2000 of 127.0.0.3 is the bad row: no answer, and no crash.
        assert await bad.exchange([wire.Lookup(2000)], timeout=1.0) == []
        good = await connect(srv, local="127.0.0.2")
        assert isinstance((await good.map(v6(1), 1))[0], wire.Mapping)
        bad.close()
        good.close()

    run(go())
    p.wait_line(
        r"table entry, row \(nat=2130706435, port=2000\) does not decode: addr holds "
        r"a blob of 15 octets; .*\(datagram dropped\)"
    )
    assert "Traceback" not in p.stderr
    assert metric(url, 'nat64ho_datagrams_dropped_total{reason="bad_row"}') == 1
    p.proc.send_signal(signal.SIGTERM)
    assert p.proc.wait(30) == 0


# ---------------------------------------------------------------- 9. IPv6 listen


def test_ipv6_listen_address_is_refused_unless_unspecified(tmp_path, procs):
    r = nat64ho(
        "serve",
        "--db",
        str(tmp_path / "t.db"),
        "--listen",
        "[::1]:16467",
        "--log-file",
        str(tmp_path / "events.log"),
    )
    assert r.returncode == 2
    assert "runs over IPv4" in one_error(r)
    assert not (tmp_path / "t.db").exists()

    p = procs(
        "serve",
        "--db",
        str(tmp_path / "t.db"),
        "--listen",
        "[::]:0",
        "--log-file",
        str(tmp_path / "events.log"),
    )
    port = int(p.wait_line(r"listening on :::(\d+),").group(1))

    async def go() -> None:
        srv = ServerProcess(tmp_path)
        srv.port = port
        c = await connect(srv)  # from 127.0.0.1: a v4-mapped source on [::]
        [m] = await c.map(v6(1), 1)
        assert isinstance(m, wire.Mapping)
        c.close()

    run(go())
    p.proc.send_signal(signal.SIGTERM)
    assert p.proc.wait(30) == 0
