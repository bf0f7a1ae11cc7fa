"""Wall-clock steps, back and forward, while serving and between runs:
recency, eviction order and rate buckets follow the monotonic clock; the log
shows the wall clock as the host has it."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from nat64ho.core import wire
from nat64ho.peer import Client
from tests.helpers import (
    Recorder,
    ServerProcess,
    committed,
    connect,
    db_rows,
    entries,
    mappings,
    run,
    v6,
)

HOUR, DAY = 3600, 86400


def log_times(log: Path) -> list[tuple[float, str]]:
    """(seconds since the epoch, rest of the line) of each event log line."""
    from nat64ho.eventlog import parse_line

    out = []
    for line in log.read_text().splitlines():
        e = parse_line(line)
        out.append((e.ts / 1e6, line[27:]))
    return out


def test_wall_clock_steps_while_serving(tmp_path, db_target):
    # Pinned to 00:30 UTC, whatever the hour: the step back of an hour
    # crosses 00:00 into the previous cookie epoch, which must not cut the
    # NAT64s' cookies (docs/protocol.md §4.6).
    now = time.time()
    base = (now // DAY) * DAY + HOUR / 2 - now
    offset = tmp_path / "offset"
    offset.write_text(str(base))
    here = Path(__file__).parent / "clock_step"
    env = {
        "PYTHONPATH": os.pathsep.join(filter(None, [str(here), os.environ.get("PYTHONPATH")])),
        "NAT64HO_TEST_WALL_OFFSET": str(offset),
    }
    srv = ServerProcess(
        tmp_path, "--ports", "1028-1029", "--hello-rate", "1", db=db_target, env=env
    )

    def step(seconds: float) -> None:
        offset.write_text(str(base + seconds))

    async def session(boot: bytes):
        return await connect(srv, boot_id=boot)

    async def go():
        c = await session(b"boot0001")
        [a] = await c.map(v6(1), 1)
        [b] = await c.map(v6(2), 2)
        step(-HOUR)
        # The cookie of 00:30 still opens datagrams at 23:30 the day before.
        assert await c.exchange([wire.Lookup(a.nat_port)]) == [a]
        assert c.rehellos == 0
        # B is the least recently used, although A's use is "earlier" by the wall.
        out = await c.map(v6(3), 3)
        assert out == [wire.Deleted(b.nat_port, v6(2), 2), wire.Mapping(b.nat_port, v6(3), 3)]
        # HELLO rate (1/s): the wall went back an hour, the bucket still refills.
        await asyncio.sleep(1.1)
        c2 = await session(b"boot0002")
        await asyncio.sleep(0.2)  # its confirmation (and Initialized) lands before the step
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
        peers.append(c2.peer)

    async def after_restart():
        # The cookie of the day ahead is still good after a restart with the
        # clock a day behind: the epoch issued is kept with the table.
        [peer2] = peers
        old = await Client.connect(srv.host, srv.port, peer=peer2)
        assert await old.exchange([wire.Lookup(c_port)]) == [wire.Mapping(c_port, v6(3), 3)]
        assert old.rehellos == 0
        old.close()
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

    peers: list = []
    srv.start()
    try:
        real = time.time() + base
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
    # The highest epoch issued (the day ahead) is kept with the table, as
    # the second it began.
    [(kept,)] = db_rows(srv.db, "SELECT value FROM meta WHERE key = 'cookie_epoch_start'")
    assert int(kept) == int(real + DAY) // DAY * DAY
    lines = log_times(srv.log)
    kinds = [rest.split()[0] for _, rest in lines]
    assert kinds == [
        "Initialized",
        "Created",
        "Created",
        "Deleted",
        "Created",
        "Initialized",
        "Deleted",
        "Created",
        "Initialized",
        "Deleted",
        "Created",
    ]
    # Event times never go back (docs/protocol.md §6): a step forward moves them
    # on, a step back holds them just after the newest one until the clock
    # catches up, so the history stays unambiguous.
    expected = [0, 0, 0, 0, 0, 0, DAY, DAY, DAY, DAY, DAY]
    for (ts, rest), shift in zip(lines, expected, strict=False):
        assert abs(ts - (real + shift)) < 30, (rest, ts - real)
    assert all(a[0] < b[0] for a, b in zip(lines, lines[1:], strict=False))


def test_wall_clock_stepped_back_between_runs_freezegun(tmp_path):
    """Time travelled by freezegun, in-process: each run of the server starts
    at a wall time earlier than the recency it saved before."""
    from freezegun import freeze_time

    from nat64ho.daemon.config import Config
    from nat64ho.daemon.logfile import LogFile
    from nat64ho.daemon.protocol import Server
    from nat64ho.peer import Peer
    from nat64ho.storage.sqlite import Store

    nat = ("192.0.2.7", 40000)
    peer = Peer(b"bootbeef")
    config = Config(
        db=tmp_path / "t.db", log_file=str(tmp_path / "events.log"), first_port=1028, last_port=1029
    )

    async def serve_once(*requests) -> list:
        store = await Store.open(config.db, sync="normal")
        srv = Server(config, store, LogFile(config.log_file))
        rec = Recorder()
        srv.connection_made(rec)
        out = []
        for request in requests:
            srv.datagram_received(request() if callable(request) else request, nat)
            while srv.tasks or srv.waiting:
                if srv.tasks:
                    await asyncio.gather(*list(srv.tasks))
                await committed(store)
            for data, _ in rec.sent:
                out += peer.receive(data)
            rec.sent.clear()
        await store.close()
        srv.logfile.close()
        return out

    def req(*messages):
        return lambda: peer.request(list(messages))

    with freeze_time("2030-06-01 12:00:00", tick=True, real_asyncio=True):
        out = asyncio.run(
            serve_once(peer.hello(), req(wire.Map(v6(1), 1)), req(wire.Map(v6(2), 2)))
        )
        a, b = mappings(out)
        asyncio.run(serve_once(req(wire.Lookup(a.nat_port))))  # A used after B
    with freeze_time("2030-06-01 11:00:00", tick=True, real_asyncio=True):
        # An hour back: B used now must count as used after A.
        assert asyncio.run(serve_once(req(wire.Lookup(b.nat_port)))) == [b]
    with freeze_time("2030-06-01 10:30:00", tick=True, real_asyncio=True):
        out = asyncio.run(serve_once(req(wire.Map(v6(3), 3))))
    assert out == [wire.Deleted(a.nat_port, v6(1), 1), wire.Mapping(a.nat_port, v6(3), 3)]
    lines = (tmp_path / "events.log").read_text().splitlines()
    # Event times never go back (docs/protocol.md §6): stepped back, they stay
    # just after the newest one.
    assert [ln[:16] for ln in lines] == ["2030-06-01 12:00"] * 5
    assert lines == sorted(lines)
    assert lines[-2].endswith(f"Deleted 192.0.2.7:{a.nat_port} [2001:db8::1]:1")
