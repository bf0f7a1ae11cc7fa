"""End to end over loopback: a real server process and a NAT64 written from
PROTOCOL.md, through every message and every ERROR of §3."""

from __future__ import annotations

from nat64ho import wire
from tests.conftest import connect, run, v6


def test_hello_map_lookup_touch(server_factory):
    srv = server_factory("--ports", "1028-1035")

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
