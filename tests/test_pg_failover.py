"""Two servers on one PostgreSQL database: one owns the table, a standby
waits and takes over when the owner stops, dies, or loses its session.
Real processes, a real cluster (skipped, with the reason, without one)."""

from __future__ import annotations

import itertools
import os
import signal
import socket
import time

import pytest

from nat64ho.core import wire
from nat64ho.storage import postgres
from nat64ho.storage.postgres import app_name
from tests.helpers import (
    ServerProcess,
    connect,
    mapping_load,
    nat64ho,
    one_error,
    run,
    serve_args,
    table_rows,
    v6,
)


def session_name(pid: int) -> str:
    """The application_name a server with ``pid`` gives its session."""
    return app_name(pid=pid)


def at(tmp_path, port: int) -> ServerProcess:
    """A handle on a server already listening on ``port`` (for connect)."""
    srv = ServerProcess(tmp_path)
    srv.port = port
    return srv


def test_a_second_server_is_refused_naming_the_holder(tmp_path, pg_url, procs):
    a = procs(*serve_args(pg_url, tmp_path / "a.log"))
    a.port()
    r = nat64ho(*serve_args(pg_url, tmp_path / "b.log"))
    assert r.returncode == 1
    line = one_error(r)
    assert line.startswith(f"Error: {pg_url}: the table is owned by {session_name(a.proc.pid)} (")
    assert line.endswith("; serve needs it alone")
    assert a.proc.poll() is None  # the owner serves on


def test_sigterm_hands_over_to_the_standby_within_3_s(tmp_path, pg_url, procs):
    a = procs(*serve_args(pg_url, tmp_path / "a.log"))
    port = a.port()

    async def first():
        c = await connect(at(tmp_path, port))
        [m] = await c.map(v6(1), 1000)
        c.close()
        return c.peer, m

    peer, held = run(first())
    b = procs(*serve_args(pg_url, tmp_path / "b.log", "--standby"))
    b.wait_line(rf"standby: owned by {session_name(a.proc.pid)} .*; waiting to take over")
    assert b.proc.poll() is None and "listening" not in b.stderr
    start = time.monotonic()
    a.proc.send_signal(signal.SIGTERM)
    port_b = b.port()
    took = time.monotonic() - start
    assert a.proc.wait(10) == 0
    assert took < 3.0, took

    async def second():
        # The NAT64 keeps its cookie (no new HELLO) and its entry.
        c = await connect(at(tmp_path, port_b), hello=False)
        c.peer = peer
        assert await c.exchange([wire.Lookup(held.nat_port)]) == [held]
        assert await c.map(v6(1), 1000) == [held]
        c.close()

    run(second())
    b.proc.send_signal(signal.SIGTERM)
    assert b.proc.wait(30) == 0


@pytest.mark.slow
def test_kill_9_under_load_standby_serves_every_acknowledged_entry_within_5_s(
    tmp_path, pg_url, procs
):
    a = ServerProcess(tmp_path, "--create-rate", "0", "--hello-rate", "0", db=pg_url)
    a.log = tmp_path / "a.log"
    a.start()
    killed_at: list[float] = []

    def kill_a() -> None:
        killed_at.append(time.monotonic())
        ServerProcess.kill(a)

    a.kill = kill_a  # type: ignore[method-assign]
    locals_ = ["127.0.0.1", "127.0.0.2"]

    async def hello():
        clients = [await connect(a, local=x) for x in locals_]
        for c in clients:
            c.close()
        return [c.peer for c in clients]

    peers = run(hello())
    b = procs(*serve_args(pg_url, tmp_path / "b.log", "--standby", "--create-rate", "0"))
    b.wait_line(r"standby: owned by .*; waiting to take over")
    acked: list[dict] = [{} for _ in locals_]
    run(mapping_load(a, peers, locals_, acked, itertools.count(), kill_after=1.5))
    assert a.proc.returncode == -signal.SIGKILL
    port_b = b.port()
    took = time.monotonic() - killed_at[0]
    assert took < 5.0, took
    total = sum(len(x) for x in acked)
    assert total > 200, "the load was too light to mean anything"
    rows = table_rows(pg_url)
    nats = [int.from_bytes(socket.inet_aton(x), "big") for x in locals_]
    for nat, got in zip(nats, acked, strict=True):
        for endpoint, port in got.items():
            assert rows[(nat, port)] == endpoint

    async def through_b():
        # Each NAT64 reaches B with the cookie A gave it: the secret is in
        # the database. Every acknowledged entry answers with its port.
        for peer, local, got in zip(peers, locals_, acked, strict=True):
            c = await connect(at(tmp_path, port_b), local=local, hello=False)
            c.peer = peer
            items = sorted(got.items())
            for i in range(0, len(items), 50):
                chunk = items[i : i + 50]
                answers = await c.exchange([wire.Lookup(p) for _, p in chunk])
                assert answers == [wire.Mapping(p, a_, ap) for (a_, ap), p in chunk]
            c.close()

    run(through_b())
    b.proc.send_signal(signal.SIGTERM)
    assert b.proc.wait(30) == 0


def _serving_and_standby(tmp_path, pg_cluster, procs):
    """A new database, served by A (listening) with B waiting on its lock."""
    name = pg_cluster.createdb()
    url = pg_cluster.url(name)
    a = procs(*serve_args(url, tmp_path / "a.log"))
    a.port()
    b = procs(*serve_args(url, tmp_path / "b.log", "--standby"))
    b.wait_line(r"standby: owned by .*; waiting to take over")
    return name, url, a, b


def test_a_terminated_session_stops_the_server_with_one_line(tmp_path, pg_cluster, procs):
    name, url, a, b = _serving_and_standby(tmp_path, pg_cluster, procs)
    pids = pg_cluster.psql(
        name,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        f"WHERE application_name = '{session_name(a.proc.pid)}'",
    ).split()
    assert pids == ["t"]  # the writer session (the reader's name differs)
    start = time.monotonic()
    assert a.proc.wait(10) == 1
    assert time.monotonic() - start < 3.0
    a.pump.join(10)
    assert one_error(a.stderr) == (
        f"Error: {url}: lost its PostgreSQL session, and with it the table "
        "(the connection closed); stopping, nothing more is acknowledged"
    )
    # Its lock went with the session: the standby serves.
    b.port()


@pytest.mark.slow
def test_a_session_that_stops_answering_stops_the_server_before_the_standby_starts(
    tmp_path, pg_cluster, procs
):
    # The writer's backend frozen (SIGSTOP): to the server, a database that
    # went silent, as behind a cut cable. It must stop on its own, and the
    # standby may start only once PostgreSQL has let the session go.
    name, url, a, b = _serving_and_standby(tmp_path, pg_cluster, procs)
    [backend] = pg_cluster.psql(
        name,
        f"SELECT pid FROM pg_stat_activity WHERE application_name = '{session_name(a.proc.pid)}'",
    ).split()
    os.kill(int(backend), signal.SIGSTOP)
    try:
        start = time.monotonic()
        assert a.proc.wait(20) == 1
        took = time.monotonic() - start
        assert took < postgres.HEARTBEAT + postgres.HEARTBEAT_TIMEOUT + 3, took
        a.pump.join(10)
        assert one_error(a.stderr) == (
            f"Error: {url}: lost its PostgreSQL session, and with it the table "
            "(no answer in time); stopping, nothing more is acknowledged"
        )
        # The frozen session still holds the lock: no second owner.
        assert "listening" not in b.stderr
    finally:
        os.kill(int(backend), signal.SIGCONT)
    # Thawed, the backend finds its client gone and releases the lock.
    b.port()
