"""Protocol v1.1 end to end, as an attacker would try it: forged HELLOs
change nothing, cookies expire, each NAT64 keeps its share, any datagram is
answered whole, and event times never collide. Forgers send from other
127/8 addresses or from other ports of the NAT64's own address, and never
read what comes back."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from nat64ho.core import wire
from nat64ho.peer import Client
from tests.helpers import connect, db_rows, run, v6

ROOT = Path(__file__).resolve().parent.parent


def nat64ho(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "nat64ho", *args], capture_output=True, text=True, timeout=60
    )


@pytest.mark.slow
def test_forged_hellos_from_a_nat64s_address_change_nothing(server_factory, db_target):
    srv = server_factory(db=db_target)
    nat = "127.0.0.5"

    async def go():
        real = await connect(srv, local=nat)
        first = await real.map(v6(0), 1)
        await asyncio.sleep(0.3)  # its commit: the database as the forger finds it
        before = db_rows(srv.db, "SELECT nat, boot_id, first_hello, last_hello FROM nat")
        forger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        forger.bind((nat, 0))  # another port of the NAT64's own address
        loop = asyncio.get_running_loop()
        end = loop.time() + 10
        forged = answered = 0
        i = 1
        while loop.time() < end:
            # Faster than the HELLO rate (5/s): as many get through as it allows.
            forger.sendto(wire.encode(wire.Hello(os.urandom(8))), (srv.host, srv.port))
            forged += 1
            [m] = await real.map(v6(i), 1)
            assert isinstance(m, wire.Mapping), m
            assert await real.exchange([wire.Lookup(first[0].nat_port)]) == first
            answered += 1
            i += 1
            await asyncio.sleep(0.05)
        forger.close()
        real.close()
        return before, forged, answered

    before, forged, answered = run(go())
    assert forged > 100 and answered == forged
    assert srv.stop() == 0
    log = srv.log.read_text().splitlines()
    assert [line.split()[2] for line in log].count("Initialized") == 1
    # Nothing of the forger's reached the database: the boot, its times.
    assert db_rows(srv.db, "SELECT nat, boot_id, first_hello, last_hello FROM nat") == before
    assert db_rows(srv.db, "SELECT count(*) FROM event WHERE kind = 0") == [(1,)]


def send_hellos(sources: list[str], port: int) -> None:
    """One HELLO from each source, replies never read."""
    for src in sources:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((src, 0))
            s.sendto(wire.encode(wire.Hello(os.urandom(8))), ("127.0.0.1", port))


@pytest.mark.slow
def test_ten_thousand_forged_hellos_store_nothing_and_take_no_place(server_factory, db_target):
    srv = server_factory("--max-nats", "100", "--hello-rate", "0", db=db_target)
    sources = [f"127.{10 + i // 65536}.{i // 256 % 256}.{i % 256}" for i in range(1, 10_001)]
    send_hellos(sources, srv.port)

    async def real_nat64(local: str) -> None:
        c = await connect(srv, local=local)
        [m] = await c.map(v6(1), 1)
        assert isinstance(m, wire.Mapping)
        c.close()

    run(real_nat64("127.20.0.1"))
    assert srv.stop() == 0
    # Only the real NAT64 is stored and logged.
    assert db_rows(srv.db, "SELECT count(*) FROM nat") == [(1,)]
    assert [line.split()[2] for line in srv.log.read_text().splitlines()] == [
        "Initialized",
        "Created",
    ]
    srv.start()
    send_hellos(sources[:2000], srv.port)
    run(real_nat64("127.20.0.2"))
    assert srv.stop() == 0
    assert db_rows(srv.db, "SELECT count(*) FROM nat") == [(2,)]


def test_a_real_reboot_logs_initialized_once_and_keeps_the_table(server_factory, db_target):
    srv = server_factory(db=db_target)

    async def go():
        old = await connect(srv, local="127.0.0.6")
        [m] = await old.map(v6(7), 7)
        old_cookie = old.peer.cookie
        old.close()
        # The NAT64 restarts: a new boot id, HELLO, then only the new cookie.
        new = await Client.connect(srv.host, srv.port, local="127.0.0.6", auto=False)
        await new.hello()
        new.send_raw(new.peer.confirm())
        new.send_raw(new.peer.confirm())  # a second one is no second boot
        assert await new.exchange([wire.Lookup(m.nat_port)]) == [m]  # the table stayed
        # The old boot's cookie is retired.
        stale = await Client.connect(srv.host, srv.port, local="127.0.0.6", auto=False)
        stale.send_raw(wire.encode(wire.Cookie(old_cookie)) + wire.encode(wire.Lookup(m.nat_port)))
        assert await stale.collect(1) == [wire.Error(wire.ErrorCode.BAD_COOKIE, wire.Kind.COOKIE)]
        stale.close()
        new.close()

    run(go())
    assert srv.stop() == 0
    kinds = [line.split()[2] for line in srv.log.read_text().splitlines()]
    assert kinds == ["Initialized", "Created", "Initialized"]


@pytest.mark.slow
def test_cookies_expire_after_two_lifetimes_and_hello_again_logs_nothing(server_factory, db_target):
    srv = server_factory("--cookie-lifetime", "1", db=db_target)

    async def go():
        c = await Client.connect(srv.host, srv.port, local="127.0.0.7", auto=False)
        await c.hello()
        c.send_raw(c.peer.confirm())
        [m] = await c.map(v6(1), 1)
        await asyncio.sleep(2.1)  # more than two lifetimes: the epoch moved twice
        assert await c.exchange([wire.Lookup(m.nat_port)]) == [
            wire.Error(wire.ErrorCode.BAD_COOKIE, wire.Kind.COOKIE)
        ]
        await c.hello()  # the same boot id
        assert await c.exchange([wire.Lookup(m.nat_port)]) == [m]
        c.close()
        # nat64ho.peer says HELLO again by itself: a long-lived client goes on.
        auto = await connect(srv, local="127.0.0.8")
        [n] = await auto.map(v6(2), 2)
        await asyncio.sleep(2.1)
        out = await auto.exchange([wire.Lookup(n.nat_port)])
        assert out == [wire.Error(wire.ErrorCode.BAD_COOKIE, wire.Kind.COOKIE)]
        # It keeps its cookie (BAD_COOKIE is a hint) until the WELCOME of
        # its HELLO replaces it.
        assert [type(m) for m in await auto.collect(1)] == [wire.Welcome]
        await auto.quiet(0.1)
        assert await auto.exchange([wire.Lookup(n.nat_port)]) == [n]
        assert auto.rehellos == 1
        auto.close()

    run(go())
    assert srv.stop() == 0
    kinds = [line.split()[2] for line in srv.log.read_text().splitlines()]
    assert kinds.count("Initialized") == 2  # one per NAT64; re-HELLOs log nothing


@pytest.mark.slow
def test_a_flooding_nat64_slows_only_itself():
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "fairness.py"), "--seconds", "5", "--json"],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    victim, flood = result["victim"], result["flood"]
    assert flood["datagrams_sent"] > 1000  # it did flood
    assert victim["sent"] >= 400 and victim["lost"] == 0 and victim["errors"] == 0, result


def test_two_thousand_uncached_maps_in_one_datagram_are_all_answered(server_factory, db_target):
    srv = server_factory("--create-rate", "0", db=db_target)  # sizes here, not rates
    maps = [wire.Map(v6(i), 9) for i in range(2000)]  # 40,002 octets with the cookie

    async def go() -> list:
        c = await connect(srv, local="127.0.0.9")
        out = await c.exchange(maps, timeout=30)
        c.close()
        return out

    first = [m for m in run(go()) if isinstance(m, wire.Mapping)]
    assert len(first) == 2000
    srv.restart()  # the cache is empty: every MAP needs its row read
    again = [m for m in run(go()) if isinstance(m, wire.Mapping)]
    assert sorted(again) == sorted(first)


def test_events_of_one_microsecond_stay_distinct(server_factory, db_target):
    srv = server_factory("--ports", "2000-2001", db=db_target)

    async def go():
        c = await connect(srv, local="127.0.0.10")
        out = await c.exchange([wire.Map(v6(i), 1) for i in range(6)], timeout=5)
        c.close()
        return out

    out = run(go())
    assert srv.stop() == 0
    holders = {}
    for m in out:
        if isinstance(m, wire.Mapping):
            holders[m.nat_port] = m.addr
    export = nat64ho("export", "--db", str(srv.db))
    assert export.returncode == 0, export.stderr
    log = srv.log.read_text()
    assert export.stdout == log
    assert len(log.splitlines()) == 11  # Initialized, 6 Created, 4 Deleted
    times = [line[:26] for line in log.splitlines()]
    assert times == sorted(set(times))
    for port, addr in holders.items():
        who = nat64ho("who", "--db", str(srv.db), f"127.0.0.10:{port}")
        assert who.returncode == 0, who.stderr
        assert f"[{socket.inet_ntop(socket.AF_INET6, addr)}]:1" in who.stdout, who.stdout


def test_forget_removes_a_nat64_and_keeps_its_history(server_factory, db_target):
    srv = server_factory(db=db_target)

    async def go():
        c = await connect(srv, local="127.0.0.11")
        await c.map(v6(1), 1)
        await c.map(v6(2), 2)
        c.close()

    run(go())
    refused = nat64ho("forget", "--yes", "--db", str(srv.db), "127.0.0.11")
    assert (
        refused.returncode == 1
        and refused.stderr.startswith("Error: ")
        and len(refused.stderr.splitlines()) == 1
    ), refused.stderr
    assert srv.stop() == 0
    history = db_rows(srv.db, "SELECT count(*) FROM event")
    out = nat64ho("forget", "--yes", "--db", str(srv.db), "127.0.0.11")
    assert out.returncode == 0, out.stderr
    assert "127.0.0.11" in out.stdout and "2 entries" in out.stdout
    assert db_rows(srv.db, "SELECT count(*) FROM entry") == [(0,)]
    assert db_rows(srv.db, "SELECT count(*) FROM nat") == [(0,)]
    assert db_rows(srv.db, "SELECT count(*) FROM event") == history
    again = nat64ho("forget", "--yes", "--db", str(srv.db), "127.0.0.11")
    assert again.returncode == 1 and "not known" in again.stderr
    bad = nat64ho("forget", "--yes", "--db", str(srv.db), "not-an-address")
    assert bad.returncode == 2 and bad.stderr.startswith("Error: ")
