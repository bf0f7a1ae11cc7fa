"""A full disk under a real server process: what was acknowledged is still
served, nothing new is acknowledged, and work resumes when space returns
without a restart. Needs root for the small filesystem (tmpfs)."""

from __future__ import annotations

import asyncio

import pytest

from nat64ho.core import wire
from tests.helpers import (
    ServerProcess,
    connect,
    digest,
    entries,
    fill,
    mappings,
    nat64ho,
    run,
    serve_args,
    v6,
    wait_for,
)


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
        complaints = [ln for ln in srv.stderr_lines if "cannot commit" in ln]
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
        r = nat64ho(*serve_args(db, tmp_path / "events.log"))
        assert r.returncode == 1
        assert r.stderr.endswith(": its filesystem is full\n") and f"Error: {db}: " in r.stderr
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
