"""Protocol v1.2 against forgers, over real UDP to a real server with its
default limits (docs/protocol.md §2, §4.3, §4.5, §7): floods with forged
sources go through a raw socket on loopback, each paced in its own process,
while a NAT64 times its answers. Each runs a few seconds."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from nat64ho.bench.floods import (
    Flood,
    Forged,
    Replay,
    big_junk,
    drops_logged,
    map_key,
    maps_under_way,
    new_endpoint,
    paced,
    reboot,
)
from nat64ho.core import wire
from nat64ho.peer import Client, Peer
from tests.helpers import ServerProcess, connect, run, wait_for

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="forging source addresses needs a raw socket (root)"
)


def serve(tmp_path, workers: int = 1):
    # sync normal: what is measured is the datagram path, not the disk's fsync.
    args = ["--sync", "normal", "--workers", str(workers)]
    return ServerProcess(tmp_path, *args).start()


@pytest.fixture
def srv(tmp_path):
    server = serve(tmp_path)
    yield server
    server.kill()


@pytest.fixture(params=[1, 2], ids=["workers1", "workers2"])
def served(tmp_path, request):
    """A server with one front end, then with two: the flooder and the
    neighbour then sit on the same worker (addresses of one parity)."""
    server = serve(tmp_path, request.param)
    yield server
    server.kill()


def drops(server: ServerProcess) -> dict[str, int]:
    """The drops the server counted, from the summaries its processes log
    when they stop."""
    assert server.stop() == 0
    return drops_logged(server.stderr_lines)


def test_spoofed_biggest_datagrams_leave_a_nat64_its_latency(served):
    srv = served
    # 100 datagrams of 65,507 octets a second (52 Mbit/s) from random
    # sources, each opened by a forged COOKIE: each costs a look-up.
    with Flood((srv.host, srv.port), big_junk, rate=100, seconds=4.5) as flood:
        time.sleep(0.5)
        latency = run(maps_under_way((srv.host, srv.port), "127.0.0.21", 3.0))
    assert flood.sent.value >= 400
    assert latency.lost == 0 and latency.errors == 0, latency
    assert latency.p99_ms is not None and latency.p99_ms < 50, latency
    assert drops(srv)["bad_cookie"] >= 300


def test_a_rebooting_nat64_confirms_among_a_thousand_forged_hellos_a_second(srv):
    nat = "127.0.0.31"

    async def go() -> list[float]:
        first = await connect(srv, local=nat, boot_id=b"boot-one")
        await first.quiet(0.05)
        first.close()
        clients = []
        for boot in (b"boot-two", b"boot-3!!"):
            clients.append(await Client.connect(srv.host, srv.port, local=nat, peer=Peer(boot)))
        took = []
        for c in clients:
            # Forged HELLOs from the NAT64's very address and port: their
            # WELCOMEs reach it, and it must ignore them.
            port = c.transport.get_extra_info("sockname")[1]
            with Flood((srv.host, srv.port), Forged((nat, port)), rate=1000, seconds=2.5):
                await asyncio.sleep(0.5)
                took.append(await reboot(c))
            c.close()
        return took

    took = run(go())
    assert max(took) < 2.0, took
    assert drops(srv).get("hello_rate", 0) == 0  # a thousand a second is within the budget
    assert srv.log.read_text().count("Initialized") == 3  # the first boot and two reboots


def test_a_working_nat64_keeps_its_session_under_forged_hellos_and_bad_cookie_triggers(srv):
    nat = "127.0.0.32"

    async def go():
        c = await connect(srv, local=nat)
        await c.quiet(0.05)
        port = c.transport.get_extra_info("sockname")[1]
        # 1,000 forged HELLOs a second from its address and port, one of them
        # a second a wrong COOKIE, which makes the server answer it BAD_COOKIE.
        with Flood((srv.host, srv.port), Forged((nat, port), every=1000), rate=1000, seconds=4):
            await asyncio.sleep(0.3)
            latency = await paced(c, 3.0, new_endpoint(5), map_key)
        c.close()
        return latency, c.rehellos

    latency, rehellos = run(go())
    assert rehellos >= 2  # the triggers reached it, and it said HELLO again
    assert latency.lost == 0, latency  # and every MAP meanwhile was answered
    assert latency.errors >= 2  # the BAD_COOKIEs, each a hint only
    assert drops(srv)["bad_cookie"] >= 3
    assert srv.log.read_text().count("Initialized") == 1


def test_mtu_size_touches_at_the_request_rate_leave_a_neighbour_its_latency(served):
    srv = served

    async def attacker() -> bytes:
        c = await connect(srv, local="127.0.0.41")
        await c.quiet(0.05)
        c.close()
        # 727 ports in 1,470 octets: three TOUCH messages, 727 requests.
        ports = list(range(2000, 2727))
        return c.peer.request(
            [
                wire.Touch(tuple(ports[:255])),
                wire.Touch(tuple(ports[255:510])),
                wire.Touch(tuple(ports[510:])),
            ]
        )

    datagram = run(attacker())
    assert len(datagram) <= wire.MAX_DATAGRAM
    # 3,400 datagrams a second: 10,000 TOUCH messages, the default request
    # rate as messages used to be counted; as work, 2.5 million ports.
    source = ("127.0.0.41", 40000)
    with Flood((srv.host, srv.port), Replay(source, datagram), rate=3400, seconds=4.5) as flood:
        time.sleep(0.5)
        latency = run(maps_under_way((srv.host, srv.port), "127.0.0.43", 3.0))
    assert flood.sent.value >= 10_000
    assert latency.lost == 0 and latency.errors == 0, latency
    assert latency.p99_ms is not None and latency.p99_ms < 100, latency
    # At most its share was served: 10,000 ports a second, 14 datagrams.
    assert drops(srv)["request_rate"] >= 0.9 * flood.sent.value


def test_a_v1_1_confirmation_holding_only_the_cookie_still_works(srv):
    async def go():
        c = await Client.connect(srv.host, srv.port, local="127.0.0.51", auto=False)
        await c.hello()
        c.send_raw(wire.encode(wire.Cookie(c.peer.cookie)))  # the v1.1 form
        # Confirmed by that datagram alone: the boot is logged.
        wait_for(lambda: "Initialized" in srv.log.read_text())
        [m] = await c.map(b"\x20\x01\x0d\xb8" + bytes(11) + b"\x09", 9)
        c.close()
        return m

    assert isinstance(run(go()), wire.Mapping)
