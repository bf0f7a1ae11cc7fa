"""End to end over loopback: a real server process and a NAT64 written from
docs/protocol.md, through every message and every ERROR of §3."""

from __future__ import annotations

import asyncio

from nat64ho.core import wire
from tests.helpers import connect, run, v6


def test_hello_map_lookup_touch(server_factory, db_target):
    srv = server_factory("--ports", "1028-1035", db=db_target)

    async def go():
        c = await connect(srv)
        assert (c.peer.first_port, c.peer.last_port) == (1028, 1035)
        [m] = await c.map(v6(1), 4000)
        assert isinstance(m, wire.Mapping) and 1028 <= m.nat_port <= 1035
        [again] = await c.map(v6(1), 4000)
        assert again == m
        out = await c.exchange([wire.Lookup(m.nat_port), wire.Lookup(1000)])
        assert out == [m, wire.Unmapped(1000)]
        c.close()

    run(go())


def test_eviction_sends_deleted_then_mapping_in_one_datagram(server_factory, db_target):
    srv = server_factory("--ports", "1028-1035", db=db_target)

    async def go():
        c = await connect(srv)
        first = {}
        for i in range(8):
            [m] = await c.map(v6(i), 5000 + i)
            first[i] = m.nat_port
        # Raw datagrams, to see how the answer was framed.
        c.inbox = type(c.inbox)()
        got = []
        arrived = asyncio.Event()
        c.datagram_received = lambda data, addr: (got.append(data), arrived.set())
        c.send([wire.Map(v6(100), 6000)])
        await asyncio.wait_for(arrived.wait(), 5)
        assert len(got) == 1
        assert wire.parse(got[0], wire.Direction.TO_NAT64) == [
            wire.Deleted(first[0], v6(0), 5000),
            wire.Mapping(first[0], v6(100), 6000),
        ]
        c.close()

    run(go())
    lines = srv.log.read_text().splitlines()
    assert lines[-2].split()[2:] == [
        "Deleted",
        f"127.0.0.1:{lines[-1].split()[3].split(':')[1]}",
        "[2001:db8::]:5000",
    ]
    assert lines[-1].split()[2] == "Created"


def test_table_full_and_rate_limited_errors(server_factory, db_target):
    srv = server_factory(
        "--ports", "1028-1029", "--min-idle", "60", "--create-rate", "3", db=db_target
    )

    async def go():
        c = await connect(srv)
        # One datagram, so the server decides all four at one instant: no
        # token can come back between them however slow the machine is.
        answers = await c.exchange([wire.Map(v6(i), 1) for i in (0, 1, 2, 9)])
        assert [type(a) for a in answers] == [wire.Mapping] * 2 + [wire.Error] * 2
        # The bucket (3/s, burst 3) is empty after three tries.
        assert answers[2:] == [
            wire.Error(wire.ErrorCode.TABLE_FULL, 0x33),
            wire.Error(wire.ErrorCode.RATE_LIMITED, 0x33),
        ]
        c.close()

    run(go())


def test_replies_fit_in_1472_octets(server_factory, db_target):
    srv = server_factory("--ports", "1028-1535", db=db_target)

    async def go():
        c = await connect(srv)
        sizes = []
        c_receive = c.datagram_received

        def spy(data, addr):
            sizes.append(len(data))
            c_receive(data, addr)

        c.datagram_received = spy
        # 255 unmapped ports in one TOUCH: 1020 octets of UNMAPPED.
        await c.exchange([wire.Touch(tuple(range(2000, 2255)))], answers=255)
        # Many MAPs in one datagram: 2 + 20 octets each would exceed 1472.
        maps = [wire.Map(v6(i), 7) for i in range(70)]
        got = await c.exchange(maps)
        assert len([m for m in got if isinstance(m, wire.Mapping)]) == 70
        assert max(sizes) <= wire.MAX_DATAGRAM and len(sizes) >= 3
        c.close()

    run(go())
