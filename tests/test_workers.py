"""``serve --workers``: each NAT64 always reaches the same worker, a dead
worker stops the server without losing anything acknowledged, and event
times stay unique across workers."""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import signal
import socket
import sqlite3
import time
from pathlib import Path

import pytest

from nat64ho.core import wire
from nat64ho.core.records import EventClock
from nat64ho.daemon.workers import steering, worker_of
from nat64ho.testing import proc_tree
from tests.helpers import (
    ServerProcess,
    connect,
    hello_from,
    mapping_load,
    mappings,
    nat64ho,
    one_error,
    run,
    table_rows,
    v6,
    wait_for,
)

SOURCES = [f"127.0.0.{k}" for k in range(1, 9)]


def _ip(a: str) -> int:
    return int.from_bytes(socket.inet_aton(a), "big")


def _workers(srv: ServerProcess) -> dict[int, int]:
    """pid -> worker index of a running server's workers (by their names)."""
    out = {}
    for p in proc_tree(srv.proc.pid):
        m = re.fullmatch(r"nat64ho-w(\d+)", Path(f"/proc/{p}/comm").read_text().strip())
        if m:
            out[p] = int(m.group(1))
    return out


def _udp_inode(pid: int, port: int) -> int:
    """The inode of process ``pid``'s UDP socket on ``port``."""
    mine = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        m = re.fullmatch(r"socket:\[(\d+)\]", os.readlink(f"/proc/{pid}/fd/{fd}"))
        if m:
            mine.add(int(m.group(1)))
    [inode] = [i for i, p in _udp_sockets().items() if i in mine and p[0] == port]
    return inode


def _udp_sockets() -> dict[int, tuple[int, int]]:
    """inode -> (local port, datagrams the kernel dropped at its queue)."""
    out = {}
    for line in Path("/proc/net/udp").read_text().splitlines()[1:]:
        f = line.split()
        out[int(f[9])] = (int(f[1].split(":")[1], 16), int(f[12]))
    return out


def _drops(inode: int) -> int:
    return _udp_sockets()[inode][1]


def test_each_source_address_always_reaches_the_same_worker(tmp_path):
    srv = ServerProcess(tmp_path, "--workers", "4").start()
    try:
        # Source k sends k junk datagrams, each counted in by the worker
        # that received it, from a new socket each time (new source ports).
        for k, a in enumerate(SOURCES, 1):
            for _ in range(k):
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                    s.bind((a, 0))
                    s.sendto(b"\xff", (srv.host, srv.port))
        time.sleep(0.5)
        assert srv.stop() == 0
    finally:
        srv.kill()
    got = {
        int(m.group(1)): int(m.group(2))
        for m in re.finditer(
            r"nat64ho\[worker (\d)\]: INFO: stopped: (\d+) datagrams in", srv.stderr
        )
    }
    want = {w: 0 for w in range(4)}
    for k, a in enumerate(SOURCES, 1):
        want[worker_of(_ip(a), 4)] += k
    assert got == want  # 1+5 / 2+6 / 3+7 / 4+8: any other spread fails
    assert len(set(want.values())) == 4


def test_the_steering_program_is_three_instructions_ending_in_return_a():
    prog = steering(4)
    assert len(prog) == 3 * 8
    assert prog[-8:-6] == (0x16).to_bytes(2, "little")


def test_workers_serve_the_protocol_and_keep_event_times_unique(tmp_path):
    srv = ServerProcess(tmp_path, "--workers", "2", "--create-rate", "0").start()
    try:

        async def go():
            clients = [await connect(srv, local=a) for a in SOURCES[:4]]
            counter = itertools.count()
            acked = {}
            for _ in range(20):
                outs = await asyncio.gather(
                    *(
                        c.exchange([wire.Map(v6(next(counter)), 5) for _ in range(5)])
                        for c in clients
                    )
                )
                for a, out in zip(SOURCES, outs, strict=False):
                    for m in out:
                        assert isinstance(m, wire.Mapping)
                        acked[(_ip(a), m.nat_port)] = (m.addr, m.port)
            for c in clients:
                c.close()
            return acked

        acked = run(go())
        assert srv.stop() == 0
    finally:
        srv.kill()
    rows = table_rows(srv.db)
    assert {k: rows[k] for k in acked} == acked and len(acked) == 400
    conn = sqlite3.connect(f"file:{srv.db}?mode=ro", uri=True)
    ts = [t for (t,) in conn.execute("SELECT ts FROM event")]
    conn.close()
    assert len(ts) == 404 and len(set(ts)) == len(ts)  # 4 Initialized, 400 Created
    lines = srv.log.read_text().splitlines()
    assert len(lines) == 404 and len({ln.split()[1] for ln in lines}) == 404  # unique times


def test_event_clocks_of_different_workers_never_meet():
    clocks = [EventClock(0, 3, i) for i in range(3)]
    seen = set()
    for wall in [5, 5, 5, 6, 4, 100, 100]:
        for c in clocks:
            t = c.stamp(wall)
            assert t % 3 == c.offset and t >= wall and t not in seen
            seen.add(t)


@pytest.mark.slow
def test_a_worker_killed_under_load_stops_the_server_losing_nothing_acknowledged(tmp_path):

    srv = ServerProcess(tmp_path, "--workers", "4", "--create-rate", "0").start()
    locals_ = SOURCES[:4]
    acked: list[dict] = [{} for _ in locals_]
    try:
        peers = hello_from(srv, locals_)
        pid, index = next(iter(_workers(srv).items()))

        def kill_worker():
            os.kill(pid, signal.SIGKILL)

        run(mapping_load(srv, peers, locals_, acked, itertools.count(), 0.7, kill=kill_worker))
        assert srv.proc.wait(15) == 1
        errors = [ln for ln in srv.stderr_lines if ln.startswith("Error:")]
        assert len(errors) == 1 and re.search(
            r"worker \d \(process \d+\) was killed by SIGKILL", errors[0]
        ), errors
        assert not [p for p in proc_tree(srv.proc.pid) if p != srv.proc.pid]
        rows = table_rows(srv.db)
        assert sum(len(a) for a in acked) > 50
        for a, got in zip(locals_, acked, strict=True):
            for endpoint, port in got.items():
                assert rows[(_ip(a), port)] == endpoint, "acknowledged entry lost"
        srv.start()
        assert srv.stop() == 0
    finally:
        srv.kill()
    assert nat64ho("check", "--db", str(srv.db)).returncode == 0


@pytest.mark.parametrize(
    "args,message",
    [
        (["--workers", "0"], "--workers '0': expected a number from 1 to 64, or 'auto'"),
        (["--workers", "two"], "--workers 'two': expected a number from 1 to 64, or 'auto'"),
        (["--workers", "2", "--metrics", "127.0.0.1:9999"], "--workers above 1 with --metrics"),
    ],
)
def test_bad_workers_options_get_one_error_line(tmp_path, args, message):
    r = nat64ho("serve", "--db", str(tmp_path / "t.db"), "--check-config", *args)
    assert r.returncode == 2
    assert r.stderr.startswith("Error: ") and message in r.stderr
    assert not (tmp_path / "t.db").exists()


def test_workers_above_one_are_refused_on_postgresql():
    # Only the SQLite writer process commits for several workers; nothing is
    # connected to find that out (a URL that names no server is enough).
    url = "postgresql://nat64ho@192.0.2.1/none"
    r = nat64ho("serve", "--db", url, "--workers", "2", "--check-config")
    assert r.returncode == 2 and r.stdout == ""
    assert one_error(r) == (
        "Error: --workers above 1 needs an SQLite table (its writer process commits for "
        "every worker); on PostgreSQL run one worker"
    )


def test_a_flood_fills_only_its_own_workers_queue_which_nat64s_steered_there_share(tmp_path):
    # docs/running.md, "Workers and the kernel queue". 127.0.0.2 and .4 are
    # steered to worker 0, 127.0.0.3 to worker 1. Worker 0 is stopped so
    # that the flood fills its queue on any machine; running, it drains at
    # its own rate and the flood must outrun it (benchmarks measure that).
    flooder, neighbour, elsewhere = "127.0.0.2", "127.0.0.4", "127.0.0.3"
    assert [worker_of(_ip(a), 2) for a in (flooder, neighbour, elsewhere)] == [0, 0, 1]
    srv = ServerProcess(tmp_path, "--workers", "2").start()
    try:
        pids = {i: pid for pid, i in _workers(srv).items()}
        queues = {i: _udp_inode(pid, srv.port) for i, pid in pids.items()}

        async def go() -> None:
            near = await connect(srv, local=neighbour)
            far = await connect(srv, local=elsewhere)
            assert mappings(await near.map(v6(0), 1)) and mappings(await far.map(v6(0), 1))
            far_drops = _drops(queues[1])
            os.kill(pids[0], signal.SIGSTOP)
            try:
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                    s.bind((flooder, 0))
                    full = _drops(queues[0])
                    for _ in range(100):  # at most 50,000 datagrams of 1,200 octets
                        for _ in range(500):
                            s.sendto(b"\x31" * 1200, ("127.0.0.1", srv.port))
                        if _drops(queues[0]) > full:
                            break
                    else:
                        raise AssertionError("the flood never filled worker 0's queue")
                    # Then the smallest datagrams, till not even those fit.
                    full = _drops(queues[0])
                    for _ in range(1000):
                        s.sendto(b"\x31", ("127.0.0.1", srv.port))
                    wait_for(lambda: _drops(queues[0]) > full, timeout=5)
                full = _drops(queues[0])
                near.send([wire.Map(v6(1), 1)])  # behind the flood: the kernel drops it
                wait_for(lambda: _drops(queues[0]) == full + 1, timeout=5)
                # The other worker's NAT64 is served at once, and lost nothing.
                start = time.monotonic()
                assert mappings(await far.map(v6(1), 1))
                assert time.monotonic() - start < 1.0
                assert _drops(queues[1]) == far_drops
            finally:
                os.kill(pids[0], signal.SIGCONT)
            # Worker 0 goes on: the neighbour's MAP was lost, not delayed; its
            # next one is answered once the queue has drained.
            assert not mappings(await near.collect(1, timeout=1.0))
            assert mappings(await near.exchange([wire.Map(v6(1), 1)], timeout=10))
            near.close()
            far.close()

        run(go())
        assert srv.stop() == 0
    finally:
        srv.kill()
