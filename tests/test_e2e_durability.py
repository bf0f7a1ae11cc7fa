"""End to end: what the server promises across restarts, SIGKILL, and junk."""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from nat64ho.core import wire
from nat64ho.eventlog import parse_line
from tests.helpers import connect, entries, run, v6


def test_restart_keeps_cookies_entries_and_boot_ids(server_factory, db_target):
    srv = server_factory("--ports", "1028-1035", db=db_target)
    boot = bytes.fromhex("0102030405060708")

    async def first():
        c = await connect(srv, boot_id=boot)
        got = {}
        for i in range(5):
            [m] = await c.map(v6(i), 100 + i)
            got[i] = m
        c.close()
        return c.peer, got

    peer, before = run(first())
    assert srv.stop() == 0
    log_before = srv.log.read_text()
    srv.start()

    async def second():
        # The same cookie, with no new HELLO: the secret is kept in the database.
        c = await connect(srv, hello=False)
        c.peer = peer
        for i, m in before.items():
            assert await c.exchange([wire.Lookup(m.nat_port)]) == [m]
            assert await c.map(v6(i), 100 + i) == [m]
        # The same boot id again: welcomed, not logged.
        await c.hello()
        assert srv.log.read_text() == log_before
        # A new boot id is a NAT64 restart: logged, and the table is kept.
        c.peer.boot_id = bytes(8)
        await c.hello()
        assert await c.map(v6(0), 100) == [before[0]]
        c.close()

    run(second())
    srv.stop()
    new = srv.log.read_text()[len(log_before) :].splitlines()
    assert [line.split()[2] for line in new] == ["Initialized"]


@pytest.mark.slow
def test_sigkill_under_load_loses_no_acknowledged_entry(server_factory, served):
    db, more = served
    srv = server_factory("--create-rate", "0", *more, db=db)  # as fast as it goes
    acked: dict[tuple[bytes, int], int] = {}

    async def load(kill_after: int, base: int):
        c = await connect(srv)
        sent = 0
        killed = False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        while loop.time() < deadline:
            # Keep ~10 datagrams of 8 MAPs in flight.
            while sent - len(acked) < 80 and not killed:
                c.send([wire.Map(v6(base + sent + k), 9) for k in range(8)])
                sent += 8
            try:
                m = await asyncio.wait_for(c.inbox.get(), 0.5)
            except TimeoutError:
                if killed:
                    break
                continue
            if isinstance(m, wire.Mapping):
                acked[(m.addr, m.port)] = m.nat_port
            if len(acked) >= kill_after and not killed:
                srv.proc.kill()  # SIGKILL, mid-stream: MAPs are still in flight
                killed = True
        c.close()

    run(load(3000, 0))
    srv.proc.wait(10)
    assert len(acked) >= 3000
    stored = entries(srv.db)
    missing = {k: p for k, p in acked.items() if stored.get(k) != p}
    assert not missing, f"{len(missing)} acknowledged entries lost or moved"
    # One port, one endpoint: the primary key and unique index say so; check
    # the restarted server agrees, and keeps serving.
    assert len(set(stored.values())) == len(stored)
    srv.start()

    async def after():
        c = await connect(srv)
        sample = random.Random(1).sample(sorted(acked.items()), 200)
        for (addr, aport), port in sample:
            assert await c.map(addr, aport) == [wire.Mapping(port, addr, aport)]
        [m] = await c.map(v6(10**6), 1)
        assert m.nat_port not in stored.values()
        c.close()

    run(after())
    assert srv.stop() == 0


@pytest.mark.slow
def test_junk_datagrams_leave_the_server_running(server_factory, db_target):
    srv = server_factory("--ports", "1028-1100", db=db_target)
    rng = random.Random(42)

    async def go():
        c = await connect(srv)
        valid = [
            c.peer.request([wire.Map(v6(i), 1), wire.Lookup(1030), wire.Touch((1028, 1029))])
            for i in range(20)
        ] + [c.peer.hello()]
        for i in range(5000):
            kind = i % 4
            if kind == 0:
                data = rng.randbytes(rng.randint(0, 600))
            elif kind == 1:
                base = rng.choice(valid)
                data = base[: rng.randint(0, len(base))]
            elif kind == 2:
                data = bytearray(rng.choice(valid))
                for _ in range(rng.randint(1, 5)):
                    data[rng.randrange(len(data))] = rng.randrange(256)
                data = bytes(data)
            else:
                data = bytes([rng.choice([0x30, 0x33, 0x35, 0x37, 0x45, 0x60])]) + rng.randbytes(
                    rng.randint(0, 60)
                )
            c.send_raw(data)
            if i % 200 == 0:
                await asyncio.sleep(0.01)  # let the kernel buffers drain
        await c.quiet(0.5)
        # Still answering, still consistent.
        await c.hello()
        # The junk filled the table, so this may evict: [DELETED,] MAPPING.
        *_, m = await c.map(v6(9999), 5)
        assert m.addr == v6(9999) and m.port == 5
        assert await c.exchange([wire.Lookup(m.nat_port)]) == [m]
        c.close()

    run(go())
    assert srv.proc.poll() is None
    assert srv.stop() == 0
    for line in srv.log.read_text().splitlines():
        parse_line(line)  # raises on a malformed line
    assert "internal_error" not in srv.stderr and "Traceback" not in srv.stderr


@pytest.mark.parametrize("cache,restart", [("100000", True), ("3", True), ("3", False)])
def test_lru_order_survives_restart_and_small_cache(server_factory, cache, restart, db_target):
    srv = server_factory("--ports", "1028-1035", "--cache-size", cache, db=db_target)

    async def fill():
        c = await connect(srv)
        ports = {}
        for i in range(8):
            [m] = await c.map(v6(i), 1)
            ports[i] = m.nat_port
            await asyncio.sleep(0.01)
        # Make 0..3 recent again, in the order 3, 2, 1, 0.
        for i in (3, 2, 1, 0):
            await c.exchange([wire.Lookup(ports[i])])
            await asyncio.sleep(0.01)
        c.close()
        return c.peer, ports

    peer, ports = run(fill())
    if restart:
        srv.restart()
    else:
        time.sleep(1.5)  # recency flushes; the cache trims to 3 entries

    async def evict():
        c = await connect(srv, hello=False)
        c.peer = peer
        order = []
        for k in range(8):
            got = await c.map(v6(100 + k), 1)
            assert isinstance(got[0], wire.Deleted), got
            order.append(got[0].addr)
        c.close()
        return order

    order = run(evict())
    assert order == [v6(i) for i in (4, 5, 6, 7, 3, 2, 1, 0)]


def test_tiny_cache_under_misses_keeps_every_endpoint_on_its_port(server_factory, db_target):
    # Nearly every MAP misses the cache and reads the database; the cache is
    # trimmed meanwhile. A row read for a MAP must not be forgotten before
    # the MAP is decided, or its endpoint would look new and get a 2nd port.
    srv = server_factory("--ports", "1028-1227", "--cache-size", "2", db=db_target)

    async def go():
        c = await connect(srv)
        ports = {}
        for i in range(100):
            [m] = await c.map(v6(i), 1)
            ports[i] = m.nat_port
        rng = random.Random(3)
        for _round in range(6):
            batch = rng.sample(range(100), 10)
            got = await c.exchange([wire.Map(v6(i), 1) for i in batch])
            assert [m.nat_port for m in got] == [ports[i] for i in batch]
            # Let recency reach the database, so what memory holds is clean
            # and may be trimmed.
            await asyncio.sleep(1.2)
        c.close()

    run(go())
    assert srv.stop() == 0
    assert len(entries(srv.db)) == 100
