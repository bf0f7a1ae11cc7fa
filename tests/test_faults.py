"""Faults caused for real against a real server process (issue 6): a full
disk, a locked database, wrong and damaged files, clock steps, SIGKILL storms,
power loss, and floods of sources. Each test states the promise it checks.

Needs root for the small filesystem (tmpfs), like the CI container has.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from nat64ho.storage import schema
from nat64ho.core import wire
from tests.conftest import ServerProcess, connect, run, v6, wait_for


def entries(db: Path) -> dict[tuple[bytes, int], int]:
    """(IPv6 address, port) -> NAT port of every entry, read without writing."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return {(bytes(a), ap): p for p, a, ap in conn.execute("SELECT port, addr, aport FROM entry")}
    finally:
        conn.close()


def mappings(messages: list) -> list[wire.Mapping]:
    return [m for m in messages if isinstance(m, wire.Mapping)]


# ---------------------------------------------------------------- disk full

@pytest.fixture
def small_fs(tmp_path):
    """A 2 MiB tmpfs: big enough for a fresh database, small enough to fill."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "nat64ho-test", str(mnt)],
                   check=True)
    yield mnt
    if subprocess.run(["umount", str(mnt)]).returncode:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


def fill(directory: Path) -> Path:
    """Write a file until the filesystem refuses more; returns it."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    chunk = b"\0" * 65536
    try:
        while True:
            try:
                os.write(fd, chunk)
            except OSError:
                if len(chunk) == 1:
                    break
                chunk = chunk[: len(chunk) // 2]
    finally:
        os.close(fd)
    return filler


@pytest.mark.slow
def test_disk_full_serves_existing_acknowledges_nothing_new_and_resumes(small_fs, tmp_path):
    srv = ServerProcess(tmp_path, "--ports", "1028-1100", db=small_fs / "table.db")
    srv.start()
    try:
        async def go():
            c = await connect(srv)
            before = {}
            for i in range(5):
                [m] = await c.map(v6(i), 1000 + i)
                before[(v6(i), 1000 + i)] = m.nat_port

            filler = fill(small_fs)
            # New endpoints: the first fails to commit, the rest are refused
            # while commits fail. None may be answered with a MAPPING.
            for i in range(100, 110):
                c.send([wire.Map(v6(i), 2000)])
            assert await c.quiet(0.5) == []
            wait_for(lambda: "cannot commit" in srv.stderr, timeout=5)
            # What is already durable is still served, from memory.
            for (addr, aport), port in before.items():
                assert await c.map(addr, aport) == [wire.Mapping(port, addr, aport)]
            some = next(iter(before.values()))
            assert await c.exchange([wire.Lookup(some)]) == [wire.Mapping(some, v6(0), 1000)]
            # 1027 is outside the table's range: never mapped.
            assert await c.exchange([wire.Touch([some, 1027])], answers=1) == [wire.Unmapped(1027)]
            await asyncio.sleep(3)  # several retries at growing delays
            for i in range(110, 115):
                c.send([wire.Map(v6(i), 2000)])
            assert await c.quiet(0.5) == []

            filler.unlink()
            # No restart: the held batch commits and its answers go out late;
            # new endpoints are taken again.
            wait_for(lambda: "work again" in srv.stderr, timeout=5)
            late = mappings(await c.quiet(1.0))
            [new] = await c.map(v6(200), 3000)
            assert isinstance(new, wire.Mapping)
            acked = dict(before)
            for m in late + [new]:
                acked[(m.addr, m.port)] = m.nat_port
            c.close()
            return acked, late

        acked, late = run(go())
        complaints = [l for l in srv.stderr_lines if "cannot commit" in l]
        assert len(complaints) == 1, complaints
        assert "database or disk is full" in complaints[0] and str(srv.db) in complaints[0]
        # Those taken before the first failure was known: answered only now.
        assert late and {m.addr for m in late} <= {v6(i) for i in range(100, 110)}
        assert srv.stop() == 0
        got = entries(srv.db)
        for key, port in acked.items():
            assert got[key] == port
        # Those sent while commits failed were refused, not kept in memory.
        assert not set(got) & {(v6(i), 2000) for i in range(110, 115)}
    finally:
        srv.kill()



def test_start_on_a_full_disk_is_refused_clearly_then_works(small_fs, tmp_path):
    db = small_fs / "table.db"
    srv = ServerProcess(tmp_path, "--ports", "1028-1100", db=db)
    srv.start()
    try:
        async def go():
            c = await connect(srv)
            [m] = await c.map(v6(1), 1)
            c.close()
            return m

        m = run(go())
        assert srv.stop() == 0
        filler = fill(small_fs)
        before = digest(db)
        r = nat64ho("serve", "--db", str(db), "--listen", "127.0.0.1:0",
                    "--log-file", str(tmp_path / "events.log"))
        assert r.returncode == 1
        assert r.stderr.endswith(f": its filesystem is full\n") and f"Error: {db}: " in r.stderr
        assert "not a nat64ho database" not in r.stderr and "Traceback" not in r.stderr
        assert digest(db) == before
        filler.unlink()
        srv.start()

        async def again():
            c = await connect(srv)
            assert await c.exchange([wire.Lookup(m.nat_port)]) == [m]
            c.close()

        run(again())
        assert srv.stop() == 0
    finally:
        srv.kill()


# ---------------------------------------------------------------- database busy

_HOLD = textwrap.dedent("""
    import sqlite3, sys, time
    conn = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=10)
    conn.execute(sys.argv[2])
    conn.execute(sys.argv[3]).fetchall()
    print("held", flush=True)
    time.sleep(float(sys.argv[4]))
    conn.execute("ROLLBACK")
    print("released", flush=True)
""")


def hold(db: Path, begin: str, statement: str, seconds: float) -> subprocess.Popen:
    """Another process (Python's sqlite3, as a backup tool or a shell would
    be) that opens a transaction on ``db`` and keeps it for ``seconds``."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(db), begin, statement, str(seconds)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "held\n"
    return proc


@pytest.mark.slow
def test_write_lock_held_for_seconds_is_waited_out(server_factory):
    from nat64ho.storage.sqlite import MAX_RETRY_DELAY
    srv = server_factory("--ports", "1028-1100")

    async def go():
        c = await connect(srv)
        [a] = await c.map(v6(1), 1)
        # Longer than the busy timeout (5 s), so the commit fails and is retried.
        holder = hold(srv.db, "BEGIN IMMEDIATE", "INSERT INTO meta VALUES ('held', 1)", 7)
        try:
            c.send([wire.Map(v6(2), 2)])  # new: its commit waits for the lock
            deadline = time.monotonic() + 5.5
            while time.monotonic() < deadline:
                # Served from memory all along, each well inside a second.
                assert await c.exchange([wire.Lookup(a.nat_port)], timeout=1) == [a]
                assert await c.exchange([wire.Map(v6(1), 1)], timeout=1) == [a]
                await asyncio.sleep(0.3)
            wait_for(lambda: "cannot commit" in srv.stderr, timeout=3)
            c.send([wire.Map(v6(3), 3)])  # refused while commits fail
            assert await c.quiet(0.3) == []
            assert holder.stdout.readline() == "released\n"
            released = time.monotonic()
            [late] = mappings(await c.collect(1, timeout=MAX_RETRY_DELAY + 3))
            caught_up = time.monotonic() - released
        finally:
            holder.kill()
            holder.wait()
        assert late.addr == v6(2)
        assert caught_up < MAX_RETRY_DELAY + 1
        [m3] = await c.map(v6(3), 3)  # taken again now
        c.close()
        return late, m3

    late, m3 = run(go())
    assert [l for l in srv.stderr_lines if "cannot commit" in l][0].count("locked") == 1
    assert sum("cannot commit" in l for l in srv.stderr_lines) == 1
    assert srv.stop() == 0
    got = entries(srv.db)
    assert got[(v6(2), 2)] == late.nat_port and got[(v6(3), 3)] == m3.nat_port


@pytest.mark.slow
def test_retransmissions_during_a_stuck_commit_are_bounded(server_factory):
    """Each answer waiting on a commit holds memory; a NAT64 retransmitting
    through a held lock must not grow the server without bound."""
    from nat64ho.daemon.protocol import MAX_INFLIGHT
    srv = server_factory()

    async def go():
        c = await connect(srv)
        await c.map(v6(0), 1)
        base = rss_kib(srv.proc.pid)
        holder = hold(srv.db, "BEGIN IMMEDIATE", "INSERT INTO meta VALUES ('held', 1)", 6)
        try:
            again = c.peer.request([wire.Map(v6(1), 1)])  # new, then pending
            blaster = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            blaster.bind(("127.0.0.1", 0))
            sent, start = 0, time.monotonic()
            while time.monotonic() - start < 4:
                for _ in range(200):
                    blaster.sendto(again, ("127.0.0.1", srv.port))
                sent += 200
                await asyncio.sleep(0.002)
            blaster.close()
            grown = rss_kib(srv.proc.pid) - base
            assert holder.stdout.readline() == "released\n"
        finally:
            holder.kill()
            holder.wait()
        for _ in range(20):  # retransmitted, as a NAT64 does, until the commit is done
            if out := mappings(await c.exchange([wire.Map(v6(1), 1)], timeout=1)):
                break
            await asyncio.sleep(0.5)  # RATE_LIMITED (its share is full): retry later
        c.close()
        return grown, sent, out[0]

    grown, sent, m = run(go())
    assert sent > 4 * MAX_INFLIGHT, "too few retransmissions to reach the bound"
    # Below what MAX_INFLIGHT small answers can hold, with room for the allocator.
    assert grown < 48 * 1024, f"RSS grew by {grown} KiB"
    assert srv.stop() == 0
    # Past the NAT64's own share (PROTOCOL.md §7) its retransmissions are
    # refused before they hold anything.
    assert "nat_waiting=" in srv.stderr.splitlines()[-1]
    assert entries(srv.db)[(v6(1), 1)] == m.nat_port


def test_long_read_transaction_does_not_stall_commits(server_factory):
    srv = server_factory("--ports", "1028-2000")

    async def go():
        c = await connect(srv)
        [first] = await c.map(v6(0), 1)
        reader = hold(srv.db, "BEGIN", "SELECT count(*) FROM entry", 8)
        try:
            start = time.monotonic()
            got = []
            for i in range(1, 60):
                t = time.monotonic()
                [m] = await c.map(v6(i), 1)
                assert time.monotonic() - t < 1.0
                got.append(m)
            assert time.monotonic() - start < 8, "all answered while the reader held its snapshot"
            assert reader.poll() is None
        finally:
            reader.kill()
            reader.wait()
        c.close()
        return [first] + got

    acked = run(go())
    assert "cannot commit" not in srv.stderr
    assert srv.stop() == 0
    got = entries(srv.db)
    assert all(got[(m.addr, m.port)] == m.nat_port for m in acked)


# ---------------------------------------------------------------- wrong or damaged database

def healthy_db(path: Path, entries_n: int = 3000) -> Path:
    """A nat64ho database with enough rows to span many pages, checkpointed
    into the main file (as after a clean stop)."""
    conn = schema.open_db(path, create=True)
    conn.execute("BEGIN")
    conn.execute("INSERT INTO nat VALUES (3221226249, x'0102030405060708', 1, 1)")
    conn.executemany("INSERT INTO entry VALUES (3221226249, ?, ?, ?, ?, ?)",
                     [(1028 + i, v6(i), 1000 + i % 50000, i, i) for i in range(entries_n)])
    conn.executemany("INSERT INTO event (ts, kind, nat, port, addr, aport) VALUES (?, 1, 3221226249, ?, ?, ?)",
                     [(i, 1028 + i, v6(i), 1000 + i % 50000) for i in range(entries_n)])
    conn.execute("COMMIT")
    conn.close()
    assert not Path(f"{path}-wal").exists()
    return path


def _page_of(path: Path, name: str) -> tuple[int, int]:
    """(page size, a page of ``name``'s b-tree that is not its root)."""
    conn = sqlite3.connect(path)
    try:
        size = conn.execute("PRAGMA page_size").fetchone()[0]
        pages = [p for (p,) in conn.execute(
            "SELECT pageno FROM dbstat WHERE name = ? AND pagetype = 'leaf' ORDER BY pageno", (name,))]
    except sqlite3.OperationalError:  # SQLite built without dbstat
        pages = []
    finally:
        conn.close()
    return size, pages[len(pages) // 2] if pages else 3


def make_not_sqlite(p: Path) -> str:
    p.write_bytes(random.Random(1).randbytes(8192))
    return "not an SQLite database"


def make_text_file(p: Path) -> str:
    p.write_text("2019-03-18 10:06:28.436754 Initialized 192.0.2.7\n" * 100)
    return "not an SQLite database"


def make_foreign(p: Path) -> str:
    conn = sqlite3.connect(p)
    conn.execute("CREATE TABLE moz_places (id INTEGER PRIMARY KEY, url TEXT)")
    conn.execute("INSERT INTO moz_places (url) VALUES ('https://example.org/')")
    conn.commit()
    conn.close()
    return "another program"


def make_foreign_empty(p: Path) -> str:
    conn = sqlite3.connect(p)
    conn.execute("PRAGMA user_version = 7")
    conn.close()
    return "another program"


def make_newer(p: Path) -> str:
    healthy_db(p, 10)
    conn = sqlite3.connect(p, isolation_level=None)
    conn.execute("INSERT INTO schema_migrations VALUES (99, 'from_the_future', 0)")
    conn.close()
    return "written by a newer nat64ho (schema version 99"


def make_truncated(p: Path) -> str:
    healthy_db(p)
    size, _ = _page_of(p, "entry")
    with open(p, "r+b") as f:
        f.truncate(p.stat().st_size // size // 2 * size)
    return "truncated"


def make_torn(p: Path) -> str:
    healthy_db(p)
    with open(p, "r+b") as f:
        f.truncate(p.stat().st_size - 1000)
    return "not a whole number of"


def make_bad_header(p: Path) -> str:
    healthy_db(p)
    with open(p, "r+b") as f:
        f.seek(100)  # page 1's b-tree header: the schema itself
        f.write(b"\xff" * 8)
    return "not a nat64ho database"


def make_bad_page(p: Path) -> str:
    if not p.exists():
        healthy_db(p)
    size, page = _page_of(p, "entry")
    with open(p, "r+b") as f:
        f.seek((page - 1) * size)
        f.write(random.Random(2).randbytes(size))
    return "malformed"


BAD_FILES = [make_not_sqlite, make_text_file, make_foreign, make_foreign_empty, make_newer,
             make_truncated, make_torn, make_bad_header]


def nat64ho(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nat64ho", *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def digest(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.mark.parametrize("make", BAD_FILES, ids=lambda f: f.__name__[5:])
def test_serve_refuses_a_bad_database_and_leaves_it_alone(tmp_path, make):
    db = tmp_path / "table.db"
    expected = make(db)
    before = digest(db)
    r = nat64ho("serve", "--db", str(db), "--listen", "127.0.0.1:0",
                "--log-file", str(tmp_path / "events.log"))
    assert r.returncode == 1
    [error] = [line for line in r.stderr.splitlines() if line.startswith("Error:")]
    assert error.startswith(f"Error: {db}: ") and expected in error, r.stderr
    assert "Traceback" not in r.stderr
    assert digest(db) == before
    assert not (tmp_path / "events.log").exists()
    # 'check' says the same, and changes nothing either.
    c = nat64ho("check", "--db", str(db))
    assert c.returncode == 1 and f"Error: {db}: " in c.stderr and "Traceback" not in c.stderr
    assert digest(db) == before


def test_check_finds_a_damaged_page_that_start_up_does_not_read(tmp_path):
    db = tmp_path / "table.db"
    healthy_db(db)
    r = nat64ho("check", "--db", str(db))
    assert (r.returncode, r.stderr) == (0, "")
    assert r.stdout == f"ok: {db}: integrity ok, schema current; schema version 1, NAT64s 1, " \
                       "entries 3000, events 3000\n"
    expected = make_bad_page(db)
    before = digest(db)
    r = nat64ho("check", "--db", str(db))
    assert r.returncode == 1
    assert r.stderr.startswith(f"Error: {db}: ") and expected in r.stderr, r.stderr
    assert digest(db) == before


def test_check_runs_beside_a_serving_server(server_factory):
    srv = server_factory("--ports", "1028-2000")

    async def go():
        c = await connect(srv)
        for i in range(20):
            await c.map(v6(i), 1)
        r = await asyncio.to_thread(nat64ho, "check", "--db", str(srv.db))
        [m] = await c.map(v6(100), 1)  # still committing
        c.close()
        return r, m

    r, m = run(go())
    assert r.returncode == 0 and r.stdout.startswith(f"ok: {srv.db}: integrity ok"), r.stderr
    assert "entries 20," in r.stdout  # every acknowledged entry, seen by a reader
    assert isinstance(m, wire.Mapping)


def test_check_finds_a_schema_that_was_changed(tmp_path):
    db = healthy_db(tmp_path / "table.db", 10)
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("DROP INDEX entry_lru")
    conn.close()
    r = nat64ho("check", "--db", str(db))
    assert (r.returncode, r.stderr) == (1, f"Error: {db}: index entry_lru is missing\n")


def test_check_of_a_missing_file_creates_nothing(tmp_path):
    db = tmp_path / "absent.db"
    r = nat64ho("check", "--db", str(db))
    assert (r.returncode, r.stderr) == (1, f"Error: {db}: no such database\n")
    assert not db.exists()


def test_damage_found_while_serving_stops_the_server_unanswered(tmp_path):
    db = healthy_db(tmp_path / "table.db")
    here = int.from_bytes(socket.inet_aton("127.0.0.1"), "big")
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("UPDATE nat SET nat = ?", (here,))
    conn.execute("UPDATE entry SET nat = ?", (here,))
    size = conn.execute("PRAGMA page_size").fetchone()[0]
    leaves = [p for (p,) in conn.execute(
        "SELECT pageno FROM dbstat WHERE name = 'entry' AND pagetype = 'leaf'")]
    conn.close()
    assert len(leaves) > 3
    # Every leaf of the table (not its indexes): start-up cannot see it, the
    # first read or write of an entry must.
    with open(db, "r+b") as f:
        for page in leaves:
            f.seek((page - 1) * size)
            f.write(b"\x0d" + random.Random(page).randbytes(size - 1))
    srv = ServerProcess(tmp_path, "--ports", "1028-65535").start()
    try:
        async def go():
            c = await connect(srv)
            assert await c.exchange([wire.Lookup(1028)], timeout=1) == []
            c.send([wire.Map(v6(99999), 1)])
            return await c.quiet(0.5)

        assert mappings(run(go())) == []
        assert srv.proc.wait(15) == 1
    finally:
        srv.kill()
    assert f"Error: {db}: damaged while serving (" in srv.stderr
    assert f"run 'nat64ho check --db {db}'" in srv.stderr
    assert "Traceback" not in srv.stderr and "bug:" not in srv.stderr
    r = nat64ho("check", "--db", str(db))
    assert r.returncode == 1 and "malformed" in r.stderr


# ---------------------------------------------------------------- clock steps

HOUR, DAY = 3600, 86400


def log_times(log: Path) -> list[tuple[float, str]]:
    """(seconds since the epoch, rest of the line) of each event log line."""
    from nat64ho.eventlog import parse_line
    out = []
    for line in log.read_text().splitlines():
        e = parse_line(line)
        out.append((e.ts / 1e6, line[27:]))
    return out


def test_wall_clock_steps_while_serving(tmp_path):
    offset = tmp_path / "offset"
    offset.write_text("0")
    here = Path(__file__).parent / "clock_step"
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(here), os.environ.get("PYTHONPATH")])),
           "NAT64HO_TEST_WALL_OFFSET": str(offset)}
    srv = ServerProcess(tmp_path, "--ports", "1028-1029", "--hello-rate", "1", env=env)

    def step(seconds: float) -> None:
        offset.write_text(str(seconds))

    async def session(boot: bytes):
        return await connect(srv, boot_id=boot)

    async def go():
        c = await session(b"boot0001")
        [a] = await c.map(v6(1), 1)
        [b] = await c.map(v6(2), 2)
        step(-HOUR)
        assert await c.exchange([wire.Lookup(a.nat_port)]) == [a]
        # B is the least recently used, although A's use is "earlier" by the wall.
        out = await c.map(v6(3), 3)
        assert out == [wire.Deleted(b.nat_port, v6(2), 2), wire.Mapping(b.nat_port, v6(3), 3)]
        # HELLO rate (1/s): the wall went back an hour, the bucket still refills.
        await asyncio.sleep(1.1)
        c2 = await session(b"boot0002")
        step(DAY)
        # ...and a day forward does not refill it.
        with pytest.raises(ConnectionRefusedError, match=f"ERROR {wire.ErrorCode.RATE_LIMITED:d}$"):
            await session(b"boot0003")
        assert await c2.exchange([wire.Lookup(b.nat_port)]) == [wire.Mapping(b.nat_port, v6(3), 3)]
        out = await c2.map(v6(4), 4)
        assert out == [wire.Deleted(a.nat_port, v6(1), 1), wire.Mapping(a.nat_port, v6(4), 4)]
        # C used last, so that only a refresh of D after the restart puts D ahead.
        assert await c2.exchange([wire.Lookup(b.nat_port)]) == [wire.Mapping(b.nat_port, v6(3), 3)]
        c.close()
        c2.close()

    async def after_restart():
        # Restarted with the clock two days behind what was saved: D is used
        # now, so C (used "a day ahead") must still be the one to go.
        c = await session(b"boot0004")
        d_port = next(p for p in (1028, 1029) if p != c_port)
        assert await c.exchange([wire.Lookup(d_port)]) == [wire.Mapping(d_port, v6(4), 4)]
        c.close()

    async def after_second_restart():
        c = await session(b"boot0004")
        out = await c.map(v6(5), 5)
        assert out == [wire.Deleted(c_port, v6(3), 3), wire.Mapping(c_port, v6(5), 5)]
        c.close()

    srv.start()
    try:
        real = time.time()
        run(go())
        assert srv.stop() == 0
        c_port = entries(srv.db)[(v6(3), 3)]
        step(-DAY)
        srv.start()
        run(after_restart())
        assert srv.stop() == 0  # a clean stop saves D's recency
        srv.start()
        run(after_second_restart())
        assert srv.stop() == 0
    finally:
        srv.kill()
    lines = log_times(srv.log)
    kinds = [rest.split()[0] for _, rest in lines]
    assert kinds == ["Initialized", "Created", "Created", "Deleted", "Created", "Initialized",
                     "Deleted", "Created", "Initialized", "Deleted", "Created"]
    # Event times never go back (PROTOCOL.md §6): a step forward moves them
    # on, a step back holds them just after the newest one until the clock
    # catches up, so the history stays unambiguous.
    expected = [0, 0, 0, 0, 0, 0, DAY, DAY, DAY, DAY, DAY]
    for (ts, rest), shift in zip(lines, expected):
        assert abs(ts - (real + shift)) < 30, (rest, ts - real)
    assert all(a[0] < b[0] for a, b in zip(lines, lines[1:]))


class _Recorder:
    """A transport that keeps what the server sends."""

    def __init__(self):
        self.sent: list[bytes] = []

    def sendto(self, data, addr):
        self.sent.append(data)

    def is_closing(self):
        return False

    def get_extra_info(self, name, default=None):
        return default


def test_wall_clock_stepped_back_between_runs_freezegun(tmp_path):
    """Time travelled by freezegun, in-process: each run of the server starts
    at a wall time earlier than the recency it saved before."""
    from freezegun import freeze_time

    from nat64ho.peer import Peer
    from nat64ho.daemon.config import Config
    from nat64ho.daemon.logfile import LogFile
    from nat64ho.daemon.protocol import Server
    from nat64ho.storage.sqlite import Store

    nat = ("192.0.2.7", 40000)
    peer = Peer(b"bootbeef")
    config = Config(db=tmp_path / "t.db", log_file=str(tmp_path / "events.log"),
                    first_port=1028, last_port=1029)

    async def serve_once(*requests) -> list:
        store = await Store.open(config.db, sync="normal")
        srv = Server(config, store, LogFile(config.log_file))
        rec = _Recorder()
        srv.connection_made(rec)
        out = []
        for request in requests:
            srv.datagram_received(request() if callable(request) else request, nat)
            while srv.tasks or srv.waiting:
                if srv.tasks:
                    await asyncio.gather(*list(srv.tasks))
                await store.flushed()
            for data in rec.sent:
                out += peer.receive(data)
            rec.sent.clear()
        await store.close()
        srv.logfile.close()
        return out

    def req(*messages):
        return lambda: peer.request(list(messages))

    with freeze_time("2030-06-01 12:00:00", tick=True, real_asyncio=True):
        out = asyncio.run(serve_once(peer.hello(), req(wire.Map(v6(1), 1)), req(wire.Map(v6(2), 2))))
        a, b = mappings(out)
        asyncio.run(serve_once(req(wire.Lookup(a.nat_port))))  # A used after B
    with freeze_time("2030-06-01 11:00:00", tick=True, real_asyncio=True):
        # An hour back: B used now must count as used after A.
        assert asyncio.run(serve_once(req(wire.Lookup(b.nat_port)))) == [b]
    with freeze_time("2030-06-01 10:30:00", tick=True, real_asyncio=True):
        out = asyncio.run(serve_once(req(wire.Map(v6(3), 3))))
    assert out == [wire.Deleted(a.nat_port, v6(1), 1), wire.Mapping(a.nat_port, v6(3), 3)]
    lines = (tmp_path / "events.log").read_text().splitlines()
    # Event times never go back (PROTOCOL.md §6): stepped back, they stay
    # just after the newest one.
    assert [l[:16] for l in lines] == ["2030-06-01 12:00"] * 5
    assert lines == sorted(lines)
    assert lines[-2].endswith(f"Deleted 192.0.2.7:{a.nat_port} [2001:db8::1]:1")


# ---------------------------------------------------------------- SIGKILL storms

def table_rows(db: Path) -> dict[tuple[int, int], tuple[bytes, int]]:
    """(NAT64, port) -> endpoint of every entry."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return {(n, p): (bytes(a), ap) for n, p, a, ap in
                conn.execute("SELECT nat, port, addr, aport FROM entry")}
    finally:
        conn.close()


async def mapping_load(srv: ServerProcess, peers: list, locals_: list[str], acked: list[dict],
                       counter, kill_after: float, per_datagram: int = 8) -> None:
    """NAT64s asking for new endpoints as fast as they are answered, until
    the server is SIGKILLed ``kill_after`` seconds in; ``acked[i]`` gathers
    endpoint -> NAT port of every MAPPING NAT64 ``i`` received."""
    from nat64ho.peer import Client
    clients = [await Client.connect(srv.host, srv.port, local=local, peer=peer)
               for peer, local in zip(peers, locals_)]
    asyncio.get_running_loop().call_later(kill_after, srv.kill)

    async def one(i: int, c) -> None:
        while srv.proc.poll() is None:
            c.send([wire.Map(v6(next(counter)), 7) for _ in range(per_datagram)])
            for m in await c.collect(per_datagram, timeout=0.5):
                if isinstance(m, wire.Mapping):
                    acked[i][(m.addr, m.port)] = m.nat_port
                elif isinstance(m, wire.Deleted):
                    acked[i].pop((m.addr, m.port), None)

    await asyncio.gather(*(one(i, c) for i, c in enumerate(clients)))
    for c in clients:
        c.close()


@pytest.mark.slow
def test_twenty_sigkills_under_load_lose_nothing_acknowledged(tmp_path):
    import itertools
    srv = ServerProcess(tmp_path)
    locals_ = [f"127.0.0.{i}" for i in range(1, 5)]
    nats = [int.from_bytes(socket.inet_aton(a), "big") for a in locals_]
    acked: list[dict] = [{} for _ in locals_]
    counter = itertools.count()
    rng = random.Random(6)
    startups = []
    try:
        t = time.monotonic()
        srv.start()
        startups.append(time.monotonic() - t)

        async def hello():
            clients = [(await connect(srv, local=a)) for a in locals_]
            for c in clients:
                c.close()
            return [c.peer for c in clients]

        peers = run(hello())
        for cycle in range(20):
            run(mapping_load(srv, peers, locals_, acked, counter, rng.uniform(0.2, 0.8)))
            assert srv.proc.returncode == -signal.SIGKILL
            rows = table_rows(srv.db)
            for nat, got in zip(nats, acked):
                for endpoint, port in got.items():
                    assert rows[(nat, port)] == endpoint, f"cycle {cycle}: acknowledged entry lost"
            t = time.monotonic()
            srv.start()
            startups.append(time.monotonic() - t)
        assert srv.stop() == 0
    finally:
        srv.kill()
    rows = table_rows(srv.db)
    total = sum(len(a) for a in acked)
    assert total > 20 * 50, "the load was too light to mean anything"
    for nat, got in zip(nats, acked):
        assert len(set(got.values())) == len(got)  # no port announced for two endpoints
        held = {p: e for (n, p), e in rows.items() if n == nat}
        assert len(set(held.values())) == len(held)
        for endpoint, port in got.items():
            assert held[port] == endpoint
    assert nat64ho("check", "--db", str(srv.db)).returncode == 0
    # Start-up does not grow with the table or with the number of crashes.
    first, last = sorted(startups[:5])[2], sorted(startups[-5:])[2]
    assert last < first * 1.5 + 0.5, startups


@pytest.mark.slow
def test_sigkill_during_evictions_leaves_deleted_and_created_together(tmp_path):
    import itertools
    srv = ServerProcess(tmp_path, "--ports", "1028-1035")
    acked: list[dict] = [{}]
    counter = itertools.count()
    rng = random.Random(7)
    try:
        srv.start()

        async def hello():
            c = await connect(srv)
            c.close()
            return c.peer

        peer = run(hello())
        for cycle in range(8):
            # Every MAP of a new endpoint on an 8-port table evicts one.
            run(mapping_load(srv, [peer], ["127.0.0.1"], acked, counter, rng.uniform(0.2, 0.6),
                             per_datagram=3))
            srv.start()
        assert srv.stop() == 0
    finally:
        srv.kill()
    conn = sqlite3.connect(f"file:{srv.db}?mode=ro", uri=True)
    events = conn.execute("SELECT kind, port, addr, aport FROM event WHERE kind != 0 ORDER BY id").fetchall()
    conn.close()
    assert sum(k == 2 for k, *_ in events) > 8 * 20, "too few evictions to have crashed amid one"
    # Per port, history reads Created (Deleted Created)*: never a Deleted whose
    # Created was lost, nor a Created over a holder that was not deleted.
    history: dict[int, list] = {}
    for kind, port, addr, aport in events:
        history.setdefault(port, []).append((kind, bytes(addr), aport))
    rows = table_rows(srv.db)
    assert len(rows) == 8
    for port, seq in history.items():
        kinds = [k for k, _, _ in seq]
        assert kinds == [1] + [2, 1] * ((len(kinds) - 1) // 2), (port, kinds)
        for (k1, a1, p1), (k2, a2, p2) in zip(seq, seq[1:]):
            if k2 == 2:  # the Deleted names the holder the Created before it made
                assert (a1, p1) == (a2, p2)
        assert rows[(int.from_bytes(socket.inet_aton("127.0.0.1"), "big"), port)] == seq[-1][1:]
    for endpoint, port in acked[0].items():
        assert (1, *endpoint) in history[port]


# ---------------------------------------------------------------- power loss

def test_power_cut_right_after_an_acknowledgment_keeps_it(server_factory, tmp_path):
    srv = server_factory("--sync", "full", "--ports", "1028-2000")
    # The mode the writer connection really runs in, read back from SQLite.
    assert f"database {srv.db}: journal_mode=wal, synchronous=FULL" in srv.stderr

    async def go():
        c = await connect(srv)
        acked = {}
        for i in range(30):
            [m] = await c.map(v6(i), 9)
            acked[(m.addr, m.port)] = m.nat_port
            # What a power cut leaves: the files as they are now, without the
            # process, its memory or its -shm index.
            cut = tmp_path / f"cut{i}"
            cut.mkdir()
            for suffix in ("", "-wal"):
                src = Path(f"{srv.db}{suffix}")
                if src.exists():
                    shutil.copyfile(src, cut / f"table.db{suffix}")
            got = entries_recovered(cut / "table.db")
            assert all(got.get(k) == p for k, p in acked.items()), f"lost after ack {i}"
        c.close()

    run(go())
    assert srv.stop() == 0


def entries_recovered(db: Path) -> dict[tuple[bytes, int], int]:
    # Read-write, as a restarted server opens it: SQLite rebuilds the WAL
    # index from the WAL's checksummed frames, keeping whole transactions only.
    conn = sqlite3.connect(db)
    try:
        return {(bytes(a), ap): p for p, a, ap in conn.execute("SELECT port, addr, aport FROM entry")}
    finally:
        conn.close()


# ---------------------------------------------------------------- resource bounds

def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def hello_from(sources: list[str], port: int, timeout: float = 10.0) -> dict[str, object]:
    """One HELLO from each source address (127/8 on loopback), confirmed by a
    datagram with the cookie and a LOOKUP; the last answer each got: the
    LOOKUP's (UNMAPPED: confirmed) or an ERROR, or None if none came."""
    import selectors
    answers: dict[str, object] = {}
    sel = selectors.DefaultSelector()
    socks = []
    try:
        for src in sources:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind((src, 0))
            s.setblocking(False)
            s.sendto(wire.encode(wire.Hello(os.urandom(8))), ("127.0.0.1", port))
            sel.register(s, selectors.EVENT_READ, src)
            socks.append(s)
        deadline = time.monotonic() + timeout
        while len(answers) < len(sources) and time.monotonic() < deadline:
            for key, _ in sel.select(0.2):
                [m] = wire.parse(key.fileobj.recv(2048), wire.Direction.TO_NAT64)
                if isinstance(m, wire.Welcome):
                    key.fileobj.sendto(wire.build([wire.Cookie(m.cookie), wire.Lookup(1028)]),
                                       ("127.0.0.1", port))
                    continue
                answers[key.data] = m
                sel.unregister(key.fileobj)
    finally:
        for s in socks:
            s.close()
        sel.close()
    return {src: answers.get(src) for src in sources}


@pytest.mark.slow
def test_ten_thousand_nat64s_say_hello_and_max_nats_holds(server_factory):
    srv = server_factory("--max-nats", "2000")
    sources = [f"127.{1 + i // 65536}.{i // 256 % 256}.{i % 256}" for i in range(1, 10_001)]
    base = rss_kib(srv.proc.pid)
    welcomed, refused = [], []
    for i in range(0, len(sources), 500):  # 500 sockets at a time
        for src, m in hello_from(sources[i:i + 500], srv.port).items():
            if isinstance(m, wire.Unmapped):
                welcomed.append(src)
            else:
                assert m == wire.Error(wire.ErrorCode.NOT_ALLOWED, wire.Kind.HELLO), (src, m)
                refused.append(src)
    assert welcomed == sources[:2000] and len(refused) == 8000
    grown = rss_kib(srv.proc.pid) - base
    assert grown < 40 * 1024, f"RSS grew by {grown} KiB for 10,000 sources"
    # The limit counts what is on disk, so a restart does not reset it; known
    # NAT64s come back, new ones are still refused.
    srv.restart()
    again = hello_from([sources[0], sources[1999], sources[2000], sources[-1]], srv.port)
    assert [type(m) for m in again.values()] == [wire.Unmapped, wire.Unmapped, wire.Error, wire.Error]
    conn = sqlite3.connect(f"file:{srv.db}?mode=ro", uri=True)
    assert conn.execute("SELECT count(*) FROM nat").fetchone()[0] == 2000
    conn.close()


@pytest.mark.slow
def test_biggest_datagrams_and_a_reader_that_never_reads(server_factory):
    srv = server_factory("--request-rate", "0")  # sizes here, not rates
    lookups = (65507 - 10) // 4  # the largest UDP payload over IPv4, all LOOKUPs

    async def go():
        c = await connect(srv)
        # Every answer comes, each datagram within 1472 octets.
        sizes = []
        receive = c.datagram_received
        c.datagram_received = lambda data, addr: (sizes.append(len(data)), receive(data, addr))
        out = await c.exchange([wire.Lookup(1028 + i % 60000) for i in range(lookups)],
                               answers=lookups, timeout=30)
        c.datagram_received = receive
        assert len(out) == lookups and all(isinstance(m, wire.Unmapped) for m in out)
        assert max(sizes) <= 1472 and len(sizes) >= lookups * 4 // 1472

        # A malformed datagram that big is dropped whole, unanswered.
        c.send_raw(wire.encode(wire.Cookie(c.peer.cookie)) + b"\x50" * 65497)
        assert await c.quiet(0.3) == []

        # A NAT64 (same session, another socket) that asks and never reads,
        # then goes away: the kernel drops what does not fit; the server's
        # memory does not keep it.
        base = rss_kib(srv.proc.pid)
        deaf = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        deaf.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        deaf.bind(("127.0.0.1", 0))
        big = c.peer.request([wire.Lookup(1028 + i) for i in range(lookups)])
        for _ in range(10):
            deaf.sendto(big, ("127.0.0.1", srv.port))
        deaf.close()  # most of its answers meet a closed port: ICMP errors
        # The server works through the backlog, then answers as before.
        for _ in range(10):
            if await c.exchange([wire.Lookup(1028)], timeout=2):
                break
        await c.quiet(0.3)
        t = time.monotonic()
        assert await c.exchange([wire.Lookup(1028)], timeout=5) == [wire.Unmapped(1028)]
        assert time.monotonic() - t < 1
        c.close()
        return rss_kib(srv.proc.pid) - base

    grown = run(go())
    assert grown < 32 * 1024, f"RSS grew by {grown} KiB"
    assert srv.proc.poll() is None
