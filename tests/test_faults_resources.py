"""Resource bounds: ten thousand NAT64s saying HELLO against --max-nats, the
biggest datagrams, and a NAT64 that never reads its answers."""

from __future__ import annotations

import os
import socket
import sqlite3
import time

import pytest

from nat64ho.core import wire
from tests.helpers import connect, rss_kib, run


def hello_from(sources: list[str], port: int, timeout: float = 10.0) -> dict[str, object]:
    """One HELLO from each source address (127/8 on loopback), confirmed by a
    datagram with the cookie and a LOOKUP; the last answer each got: the
    LOOKUP's (UNMAPPED: confirmed) or an ERROR, or None if none came."""
    import selectors

    answers: dict[str, object] = {}
    sel = selectors.DefaultSelector()
    socks = []
    try:
        for src in sources:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind((src, 0))
            s.setblocking(False)
            s.sendto(wire.encode(wire.Hello(os.urandom(8))), ("127.0.0.1", port))
            sel.register(s, selectors.EVENT_READ, src)
            socks.append(s)
        deadline = time.monotonic() + timeout
        while len(answers) < len(sources) and time.monotonic() < deadline:
            for key, _ in sel.select(0.2):
                [m] = wire.parse(key.fileobj.recv(2048), wire.Direction.TO_NAT64)
                if isinstance(m, wire.Welcome):
                    key.fileobj.sendto(
                        wire.build([wire.Cookie(m.cookie), wire.Lookup(1028)]), ("127.0.0.1", port)
                    )
                    continue
                answers[key.data] = m
                sel.unregister(key.fileobj)
    finally:
        for s in socks:
            s.close()
        sel.close()
    return {src: answers.get(src) for src in sources}


@pytest.mark.slow
def test_ten_thousand_nat64s_say_hello_and_max_nats_holds(server_factory):
    # Ten thousand HELLOs in seconds are over the server-wide HELLO budget,
    # whose random drops a real NAT64 outlasts by retrying; this test is
    # about --max-nats, so every HELLO is answered.
    srv = server_factory("--max-nats", "2000", "--hello-rate", "0")
    sources = [f"127.{1 + i // 65536}.{i // 256 % 256}.{i % 256}" for i in range(1, 10_001)]
    base = rss_kib(srv.proc.pid)
    welcomed, refused = [], []
    for i in range(0, len(sources), 500):  # 500 sockets at a time
        for src, m in hello_from(sources[i : i + 500], srv.port).items():
            if isinstance(m, wire.Unmapped):
                welcomed.append(src)
            else:
                assert m == wire.Error(wire.ErrorCode.NOT_ALLOWED, wire.Kind.HELLO), (src, m)
                refused.append(src)
    assert welcomed == sources[:2000] and len(refused) == 8000
    grown = rss_kib(srv.proc.pid) - base
    assert grown < 40 * 1024, f"RSS grew by {grown} KiB for 10,000 sources"
    # The limit counts what is on disk, so a restart does not reset it; known
    # NAT64s come back, new ones are still refused.
    srv.restart()
    again = hello_from([sources[0], sources[1999], sources[2000], sources[-1]], srv.port)
    assert [type(m) for m in again.values()] == [
        wire.Unmapped,
        wire.Unmapped,
        wire.Error,
        wire.Error,
    ]
    conn = sqlite3.connect(f"file:{srv.db}?mode=ro", uri=True)
    assert conn.execute("SELECT count(*) FROM nat").fetchone()[0] == 2000
    conn.close()


@pytest.mark.slow
def test_biggest_datagrams_and_a_reader_that_never_reads(server_factory):
    srv = server_factory("--request-rate", "0")  # sizes here, not rates
    lookups = (65507 - 10) // 4  # the largest UDP payload over IPv4, all LOOKUPs

    async def go():
        c = await connect(srv)
        # Every answer comes, each datagram within 1472 octets.
        sizes = []
        receive = c.datagram_received
        c.datagram_received = lambda data, addr: (sizes.append(len(data)), receive(data, addr))
        out = await c.exchange(
            [wire.Lookup(1028 + i % 60000) for i in range(lookups)], answers=lookups, timeout=30
        )
        c.datagram_received = receive
        assert len(out) == lookups and all(isinstance(m, wire.Unmapped) for m in out)
        assert max(sizes) <= 1472 and len(sizes) >= lookups * 4 // 1472

        # A malformed datagram that big is dropped whole, unanswered.
        c.send_raw(wire.encode(wire.Cookie(c.peer.cookie)) + b"\x50" * 65497)
        assert await c.quiet(0.3) == []

        # A NAT64 (same session, another socket) that asks and never reads,
        # then goes away: the kernel drops what does not fit; the server's
        # memory does not keep it.
        base = rss_kib(srv.proc.pid)
        deaf = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        deaf.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        deaf.bind(("127.0.0.1", 0))
        big = c.peer.request([wire.Lookup(1028 + i) for i in range(lookups)])
        for _ in range(10):
            deaf.sendto(big, ("127.0.0.1", srv.port))
        deaf.close()  # most of its answers meet a closed port: ICMP errors
        # The server works through the backlog, then answers as before.
        for _ in range(10):
            if await c.exchange([wire.Lookup(1028)], timeout=2):
                break
        await c.quiet(0.3)
        t = time.monotonic()
        assert await c.exchange([wire.Lookup(1028)], timeout=5) == [wire.Unmapped(1028)]
        assert time.monotonic() - t < 1
        c.close()
        return rss_kib(srv.proc.pid) - base

    grown = run(go())
    assert grown < 32 * 1024, f"RSS grew by {grown} KiB"
    assert srv.proc.poll() is None
