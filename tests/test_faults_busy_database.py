"""Another process holding the database (a backup tool, a shell): a write
lock is waited out, retransmissions meanwhile are bounded in memory, and a
long reader does not stall commits."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from nat64ho.core import wire
from tests.helpers import connect, entries, mappings, rss_kib, run, v6, wait_for

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
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(db), begin, statement, str(seconds)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline() == "held\n"
    return proc


@pytest.mark.slow
def test_write_lock_held_for_seconds_is_waited_out(server_factory):
    from nat64ho.storage.commit import MAX_RETRY_DELAY

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
    assert [ln for ln in srv.stderr_lines if "cannot commit" in ln][0].count("locked") == 1
    assert sum("cannot commit" in ln for ln in srv.stderr_lines) == 1
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
    # Past the NAT64's own share (docs/protocol.md §7) its retransmissions are
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
