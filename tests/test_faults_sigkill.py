"""SIGKILL storms under load: nothing acknowledged is lost, and an eviction
is never half written."""

from __future__ import annotations

import os
import random
import signal
import socket
import time

import pytest

from tests.helpers import (
    ServerProcess,
    connect,
    db_rows,
    hello_from,
    mapping_load,
    nat64ho,
    run,
    table_rows,
)


@pytest.mark.slow
def test_twenty_sigkills_under_load_lose_nothing_acknowledged(tmp_path, served):
    import itertools

    db, more = served
    srv = ServerProcess(tmp_path, *more, db=db)
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

        peers = hello_from(srv, locals_)
        for cycle in range(20):
            run(mapping_load(srv, peers, locals_, acked, counter, rng.uniform(0.2, 0.8)))
            assert srv.proc.returncode == -signal.SIGKILL
            rows = table_rows(srv.db)
            for nat, got in zip(nats, acked, strict=False):
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
    for nat, got in zip(nats, acked, strict=False):
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
def test_sigkill_during_evictions_leaves_deleted_and_created_together(tmp_path, served):
    import itertools

    db, more = served
    srv = ServerProcess(tmp_path, "--ports", "1028-1035", *more, db=db)
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
        for _cycle in range(8):
            # Every MAP of a new endpoint on an 8-port table evicts one.
            run(
                mapping_load(
                    srv,
                    [peer],
                    ["127.0.0.1"],
                    acked,
                    counter,
                    rng.uniform(0.2, 0.6),
                    per_datagram=3,
                )
            )
            srv.start()
        assert srv.stop() == 0
    finally:
        srv.kill()
    events = db_rows(
        srv.db, "SELECT kind, port, addr, aport FROM event WHERE kind != 0 ORDER BY id"
    )
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
        for (_k1, a1, p1), (k2, a2, p2) in zip(seq, seq[1:], strict=False):
            if k2 == 2:  # the Deleted names the holder the Created before it made
                assert (a1, p1) == (a2, p2)
        assert rows[(int.from_bytes(socket.inet_aton("127.0.0.1"), "big"), port)] == seq[-1][1:]
    for endpoint, port in acked[0].items():
        assert (1, *endpoint) in history[port]


@pytest.mark.parametrize("workers", ["1", "4"])
def test_sigkill_of_the_writer_process_stops_the_server_losing_nothing_acknowledged(
    tmp_path, workers
):
    import itertools
    from pathlib import Path

    from nat64ho.testing import proc_tree

    srv = ServerProcess(tmp_path, "--create-rate", "0", "--request-rate", "0", "--workers", workers)
    locals_ = ["127.0.0.1", "127.0.0.2"]
    nats = [int.from_bytes(socket.inet_aton(a), "big") for a in locals_]
    acked: list[dict] = [{} for _ in locals_]
    try:
        srv.start()

        peers = hello_from(srv, locals_)
        [writer] = [
            p
            for p in proc_tree(srv.proc.pid)
            if b"nat64ho.storage.writer" in Path(f"/proc/{p}/cmdline").read_bytes()
        ]

        def kill_writer():
            os.kill(writer, signal.SIGKILL)

        run(mapping_load(srv, peers, locals_, acked, itertools.count(), 0.7, kill=kill_writer))
        assert srv.proc.wait(10) == 1
        errors = [ln for ln in srv.stderr_lines if ln.startswith("Error:")]
        assert len(errors) == 1 and "writer process was killed by SIGKILL" in errors[0], errors
        rows = table_rows(srv.db)
        assert sum(len(a) for a in acked) > 50, "the load was too light to mean anything"
        for nat, got in zip(nats, acked, strict=True):
            for endpoint, port in got.items():
                assert rows[(nat, port)] == endpoint, "acknowledged entry lost"
        # Nothing is left half done: the next start serves the same table.
        srv.start()
        assert srv.stop() == 0
    finally:
        srv.kill()
    assert nat64ho("check", "--db", str(srv.db)).returncode == 0


@pytest.mark.parametrize("workers", ["1", "2"])
def test_an_idle_server_stops_when_its_writer_process_dies(tmp_path, workers):
    from pathlib import Path

    from nat64ho.testing import proc_tree

    srv = ServerProcess(tmp_path, "--workers", workers).start()
    try:
        [writer] = [
            p
            for p in proc_tree(srv.proc.pid)
            if b"nat64ho.storage.writer" in Path(f"/proc/{p}/cmdline").read_bytes()
        ]
        os.kill(writer, signal.SIGKILL)
        assert srv.proc.wait(10) == 1  # no datagram needed to notice
    finally:
        srv.kill()
    errors = [ln for ln in srv.stderr_lines if ln.startswith("Error:")]
    assert len(errors) == 1 and "writer process was killed by SIGKILL" in errors[0], errors


def test_a_writer_that_stops_answering_is_told_and_killed_without_blocking_the_loop():
    # The writer's end of the connection is gone but its process lives on:
    # the server waits LOST_WAIT for an exit status and kills it, while the
    # event loop goes on serving (a ticker measures its gaps).
    import asyncio
    import subprocess
    import sys

    from nat64ho.storage import writer as w

    async def main() -> tuple[list[float], subprocess.Popen]:
        proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        theirs.close()
        handle = w.Writer(proc, *await asyncio.open_unix_connection(sock=ours))
        gaps: list[float] = []

        async def ticker() -> None:
            last = time.monotonic()
            while True:
                await asyncio.sleep(0.01)
                gaps.append(time.monotonic() - last)
                last = time.monotonic()

        task = asyncio.ensure_future(ticker())
        try:
            with pytest.raises(w.WriterLost, match="stopped answering"):
                await handle.commit(((), (), (), (), None))
            await handle.kill()
        finally:
            task.cancel()
            proc.kill()
        return gaps, proc

    gaps, proc = asyncio.run(main())
    assert proc.returncode == -signal.SIGKILL
    assert sum(gaps) >= w.LOST_WAIT * 0.9  # it did wait for the exit status
    assert max(gaps) < 0.5, max(gaps)  # ...while the loop ran
