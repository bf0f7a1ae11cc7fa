"""Smoke test of ``nat64ho bench``: it runs end to end and reports sane
numbers. Speeds are not asserted; this machine is shared with the tests."""

from __future__ import annotations

import importlib.util
import ipaddress
import itertools
import random
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from nat64ho import bench
from nat64ho.bench import load
from nat64ho.cli import app
from nat64ho.core import wire
from nat64ho.peer import Peer
from nat64ho.testing import start_server
from tests.helpers import connect, db_rows, nat64ho, one_error, run, v6


def test_create_run_reports_server_and_ceilings():
    cfg = bench.BenchConfig(mode="create", batch=5, window=4, duration=1.0, warmup=0.3)
    report = bench.run(cfg)
    s = report.server
    assert s.counts["requests"] > 0 and s.counts["messages"] == 5 * s.counts["requests"]
    assert s.counts["errors"] == 0 and s.counts["malformed"] == 0
    assert 0 < s.percentile(0.5) <= s.percentile(0.99) <= s.percentile(0.999) < bench.REPLY_TIMEOUT
    assert s.cpu is not None and 0 < s.cpu <= 2.0
    assert 10 * 2**20 < s.peak_rss < 1 * 2**30
    assert report.echo is not None and report.echo.counts["requests"] > 0
    rate, size = report.sqlite
    assert rate > 0 and size in bench.SQLITE_BATCHES
    assert report.replay is not None and report.replay.rate > 0
    text = report.format()
    for label in (
        "messages/s",
        "latency p99 ms",
        "new entries/s",
        "same rows as the server",
        "server peak RSS MB",
    ):
        assert label in text


def test_cli_lookup_run_prints_the_table():
    result = CliRunner().invoke(
        app,
        [
            "bench",
            "--mode",
            "lookup",
            "--batch",
            "10",
            "--window",
            "4",
            "--entries",
            "200",
            "--duration",
            "1",
            "--no-ceilings",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "mode lookup, batch 10" in result.output
    row = next(line for line in result.output.splitlines() if line.startswith("messages/s"))
    assert float(row.split()[1].replace(",", "")) > 0


def test_cli_refuses_a_remote_server():
    result = CliRunner().invoke(app, ["bench", "--server", "192.0.2.1:6464"])
    assert result.exit_code == 2
    assert "loopback" in result.output


def test_the_server_never_imports_the_benchmark_or_the_test_launcher():
    code = (
        "import sys, nat64ho.daemon.serve, nat64ho.storage.sqlite; "
        "print(sorted(m for m in sys.modules if m.startswith(('nat64ho.bench', "
        "'nat64ho.testing', 'nat64ho.cli', 'nat64ho.ops'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "[]\n"


def test_create_run_on_postgresql_writes_its_table_there(pg_url):
    cfg = bench.BenchConfig(
        mode="create", batch=5, window=4, duration=1.0, warmup=0.3, db=pg_url, ceilings=False
    )
    report = bench.run(cfg)
    s = report.server
    assert s.counts["requests"] > 0 and s.counts["errors"] == 0
    assert report.sqlite is None  # the SQLite ceiling is no yardstick here
    [(n,)] = db_rows(pg_url, "SELECT count(*) FROM entry")
    assert n >= s.counts["messages"]
    assert "PostgreSQL" in report.format().splitlines()[0]


def test_cli_refuses_a_db_that_is_not_a_url():
    result = CliRunner().invoke(app, ["bench", "--db", "/tmp/x.db"])
    assert result.exit_code == 2
    assert "postgresql://" in result.output


def test_the_benchmarks_server_gets_the_url_outside_its_command_line(pg_url, tmp_path):
    # The test cluster trusts the socket, so the password is only carried.
    url = pg_url + "&password=s3cret"
    child = start_server(url, tmp_path / "events.log", "full", [])
    try:
        cmdline = Path(f"/proc/{child.pid}/cmdline").read_bytes()
        assert b"s3cret" not in cmdline and b"--db" not in cmdline
        environ = Path(f"/proc/{child.pid}/environ").read_bytes().split(b"\0")
        assert f"NAT64HO_DB={url}".encode() in environ
        assert "database postgresql:" in "".join(child.lines)
    finally:
        child.stop()


def test_tree_cpu_counts_children_and_their_threads():
    import os
    import signal
    import time

    from nat64ho.testing import proc_cpu, proc_tree, proc_tree_cpu, proc_tree_cpu_by_role

    # A parent that sleeps over a child that spins in a second thread.
    code = (
        "import subprocess, sys, time; "
        "c = subprocess.Popen([sys.executable, '-c', "
        "'import threading, time\\n"
        "def spin():\\n t = time.monotonic()\\n while time.monotonic() - t < 30: pass\\n"
        "threading.Thread(target=spin).start()']); time.sleep(30)"
    )
    parent = subprocess.Popen([sys.executable, "-c", code])
    try:
        time.sleep(1.0)
        t0, p0 = proc_tree_cpu(parent.pid), proc_cpu(parent.pid)
        time.sleep(1.0)
        t1, p1 = proc_tree_cpu(parent.pid), proc_cpu(parent.pid)
        roles = proc_tree_cpu_by_role(parent.pid)
    finally:
        for p in proc_tree(parent.pid)[1:]:
            os.kill(p, signal.SIGKILL)
        parent.kill()
        parent.wait()
    assert t1 - t0 > 0.3  # the spinning thread of the child, on a shared machine
    assert p1 - p0 < 0.1  # the parent alone sleeps
    assert roles["writer"] == 0 and roles["front"] >= t1 * 0.9


def test_replay_writes_the_servers_rows_and_times_only_the_last(tmp_path):
    from nat64ho.eventlog import EventKind
    from nat64ho.sql import INSERT_EVENT, UPSERT_ENTRY
    from nat64ho.storage import schema

    src = schema.open_db(tmp_path / "server.db", create=True)
    nat, a, b = 0xC0000207, bytes(15) + b"\x01", bytes(15) + b"\x02"
    events = [
        (10, EventKind.CREATED, nat, 3000, a, 40000),
        (11, EventKind.CREATED, nat, 3001, b, 40001),
        (12, EventKind.DELETED, nat, 3000, a, 40000),  # an eviction reuses 3000
        (13, EventKind.CREATED, nat, 3000, b, 40002),
    ]
    src.execute("BEGIN")
    for ts, kind, n, port, addr, aport in events:
        src.execute(INSERT_EVENT, (ts, kind, n, port, addr, aport))
        if kind == EventKind.CREATED:
            src.execute(UPSERT_ENTRY, (n, port, addr, aport, ts, ts))
    src.execute("COMMIT")
    src.close()
    out = tmp_path / "out"
    out.mkdir()
    replay = bench.sqlite_replay(tmp_path / "server.db", out, "full", per_commit=1, timed=2)
    assert replay.rate > 0 and replay.cpu_us > 0
    copy = schema.open_db(out / "replay.db", readonly=True)
    query = "SELECT ts, kind, nat, port, addr, aport FROM event ORDER BY id"
    assert copy.execute(query).fetchall() == [tuple(map(int, e[:4])) + e[4:] for e in events]
    assert copy.execute("SELECT nat, port, addr, aport FROM entry ORDER BY port").fetchall() == [
        (nat, 3000, b, 40002),
        (nat, 3001, b, 40001),
    ]


# ---------------------------------------------------------------- --server: a table in use


def test_tally_counts_by_the_wire_kinds_and_names_error_codes():
    datagram = (
        wire.deleted(1028, v6(1), 1)
        + wire.mapping(1028, v6(2), 2)
        + wire.encode(wire.Error(wire.ErrorCode.RATE_LIMITED, wire.Kind.MAP))
        + wire.encode(wire.Error(wire.ErrorCode.TABLE_FULL, wire.Kind.MAP))
    )
    assert load.tally(datagram) == (3, 1, (4, 5))
    assert [load.error_name(c) for c in (4, 5, 9)] == ["RATE_LIMITED", "TABLE_FULL", "code 9"]


def _bench_server(srv, *extra: str):
    return nat64ho(
        "bench",
        "--server",
        f"127.0.0.1:{srv.port}",
        "--duration",
        "1",
        "--window",
        "4",
        "--no-ceilings",
        *extra,
        timeout=120,
    )


def test_bench_refuses_a_server_whose_table_holds_other_nat64s(server_factory):
    srv = server_factory("--ports", "1028-1100")

    async def live() -> None:
        c = await connect(srv)
        await c.map(v6(1), 4000)
        c.close()

    run(live())
    before = db_rows(srv.db, "SELECT nat, port, addr FROM entry")
    r = _bench_server(srv, "--db", str(srv.db))
    assert r.returncode == 2 and r.stdout == ""
    line = one_error(r)
    assert "127.0.0.1" in line and "--yes" in line
    # Nothing was sent: the table is as it was.
    assert db_rows(srv.db, "SELECT nat, port, addr FROM entry") == before
    r = _bench_server(srv)
    assert r.returncode == 2 and "--db" in one_error(r)


def test_bench_on_a_server_says_what_it_writes_and_why_requests_failed(server_factory):
    # The server's own limit on new entries refuses most of the run's MAPs.
    srv = server_factory("--create-rate", "20")
    r = _bench_server(srv, "--db", str(srv.db))
    assert r.returncode == 0, r.stderr
    assert r.stderr.splitlines() == [
        "bench: writes new entries as fast as answered for 1 s under NAT64s 127.1.0.1 into "
        f"the table of the server at 127.0.0.1:{srv.port}; they stay there"
    ]
    row = next(x for x in r.stdout.splitlines() if x.startswith("ERROR answers"))
    refused = int(row.split()[-1])
    assert refused > 0
    assert f"  ERROR RATE_LIMITED: {refused}, over a NAT64's share" in r.stdout

    # Refused MAPs created nothing: new entries/s counts only those answered.
    def first_number(label: str) -> float:
        m = re.search(rf"^{re.escape(label)}\s+([\d,.]+)", r.stdout, re.M)
        assert m is not None, r.stdout
        return float(m.group(1).replace(",", ""))

    assert first_number("new entries/s") < first_number("messages/s")
    # Everything it wrote is under the benchmark's NAT64.
    nats = {n for (n,) in db_rows(srv.db, "SELECT DISTINCT nat FROM entry")}
    assert nats == {int(ipaddress.IPv4Address("127.1.0.1"))}


def bench_module(name: str) -> Any:
    """A script of benchmarks/ (not a package), loaded as the benchmark runs it."""
    path = Path(__file__).resolve().parent.parent / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_population_load_asks_for_make_historys_clients_scattered():
    make_history = bench_module("make_history")
    known = set(make_history.client_addrs())
    assert load.POPULATION == make_history.CLIENTS

    peer = Peer(bytes(8))
    peer.cookie = bytes(8)
    nat = load.NatLoad(0, peer, b"\x20\x01\x0d\xb8" + bytes(8), random.Random(1), population=True)
    nat.prepare("create", 3)
    asked = []
    for _ in range(400):
        data, answers = nat.request()
        maps = [m for m in wire.parse(data) if type(m) is wire.Map]
        assert answers == 3 and len(maps) == 3
        asked += [m.addr for m in maps]
    # Every address is one of the history's clients, none twice, and
    # consecutive ones land far apart in the address order.
    assert all(a in known for a in asked) and len(set(asked)) == len(asked) == 1200
    order = sorted(range(len(asked)), key=lambda i: asked[i])
    assert sum(abs(a - b) > 1 for a, b in itertools.pairwise(order)) > 1000

    # Without it, a run's own tag (random octets after 2001:db8) and serials.
    plain = load.NatLoad(0, peer, b"\x20\x01\x0d\xb8" + b"\xa5" * 8, random.Random(1))
    plain.prepare("create", 3)
    addrs = [m.addr for m in wire.parse(plain.request()[0]) if type(m) is wire.Map]
    assert all(a not in known for a in addrs) and addrs == sorted(addrs)


def test_population_runs_on_one_history_ask_for_clients_none_asked_before():
    # A benchmark repeats its load on one history; a client asked for twice
    # would find its entry, not create one.
    def stretch(start: int, index: int) -> set[bytes]:
        cfg = load.BenchConfig(population=True, population_start=start)
        first = load.first_serial(cfg, index)
        return {load.population_client(s) for s in range(first, first + load.SERIALS_PER_PROCESS)}

    runs = [stretch(r * load.SERIALS_PER_PROCESS, 0) for r in range(3)]
    assert len(set().union(*runs)) == 3 * load.SERIALS_PER_PROCESS
    # Two client processes of one run take different stretches too.
    assert not stretch(0, 0) & stretch(0, 1)
    # Without the population, a run numbers its own addresses from 0.
    assert load.first_serial(load.BenchConfig(population_start=5), 3) == 0


def test_the_writer_anatomy_shows_what_each_hot_index_writes(tmp_path):
    bench_dir = Path(__file__).resolve().parent.parent / "benchmarks"
    db = tmp_path / "h.db"
    made = [sys.executable, str(bench_dir / "make_history.py"), str(db), "--nats", "1"]
    made += ["--events", "80000", "--span-days", "0.01", "--nat-base", "127.1.0.0"]
    subprocess.run(made, check=True, capture_output=True)
    r = subprocess.run(
        [sys.executable, str(bench_dir / "archive_write.py"), "anatomy", str(db)]
        + ["--warm", "20", "--commits", "60"],
        check=True,
        capture_output=True,
        text=True,
    )
    wal = {
        m.group(1): int(m.group(2).replace(",", ""))
        for m in re.finditer(r"^(.+?): ([\d,]+) WAL octets", r.stdout, re.M)
    }
    hot = ("entry_endpoint", "entry_lru", "event_nat_port_ts", "event_ts")
    assert list(wal) == ["every index"] + [f"without {i}" for i in hot]
    # Each index left out writes less; the random-order ones, a page an entry or more.
    assert all(wal[k] < wal["every index"] for k in wal if k != "every index")
    assert wal["every index"] - wal["without entry_endpoint"] > 4096
    # The history it ran on is untouched: it worked on copies.
    assert db_rows(str(db), "SELECT count(*) FROM event") == [(80001,)]


def test_a_benchmark_server_of_another_tree_runs_that_trees_code(tmp_path):
    # archive_write.py writer --before REV compares two trees; run from this
    # checkout, `python -m nat64ho` would find this tree's package first.
    archive_write = bench_module("archive_write")
    (tmp_path / "nat64ho").mkdir()
    (tmp_path / "nat64ho" / "__main__.py").write_text("import nat64ho; print(nat64ho.__file__)\n")
    (tmp_path / "nat64ho" / "__init__.py").write_text("")
    # --help: this tree's package, if it were the one run, would exit at once.
    cmd, env = archive_write.tree_command(tmp_path, [sys.executable, "-m", "nat64ho", "--help"])
    root = Path(__file__).resolve().parent.parent
    r = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == str(tmp_path / "nat64ho" / "__init__.py")
