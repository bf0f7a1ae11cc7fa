"""What an attacker sends (docs/protocol.md §7), for the abuse tests and
``benchmarks/floods.py``: datagrams with forged source addresses through a raw
socket, each flood paced in a process of its own; and a NAT64 measuring its
answers meanwhile. Loopback only (127.0.0.0/8); forging needs root.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import random
import re
import socket
import statistics
import struct
import time
from collections.abc import Callable
from typing import NamedTuple

from nat64ho.core import wire
from nat64ho.peer import Client, Peer

#: A datagram of the largest size UDP over IPv4 carries.
BIGGEST = 65507
_UDP = struct.Struct("!HHHH")


def forged(src: str, sport: int, dst: str, dport: int, payload: bytes) -> bytes:
    """An IPv4 UDP packet from any source. The kernel fills in the IP
    checksum, length and id; the UDP checksum is left out (0 is allowed)."""
    head = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        20 + 8 + len(payload),
        0,
        0,
        64,
        socket.IPPROTO_UDP,
        0,
        socket.inet_aton(src),
        socket.inet_aton(dst),
    )
    return head + _UDP.pack(sport, dport, 8 + len(payload), 0) + payload


class Shot(NamedTuple):
    """One datagram of a flood: its forged source, and its payload."""

    src: str
    sport: int
    payload: bytes


# Makers of each flood's datagrams: module-level, so a process can take them.
def big_junk(i: int, rng: random.Random) -> Shot:
    """The largest datagram, from a random source, opened by a forged COOKIE."""
    src = f"127.{rng.randrange(10, 250)}.{rng.randrange(256)}.{rng.randrange(1, 255)}"
    return Shot(src, rng.randrange(1024, 65536), _BIG)


_BIG = b"\x30\x04" + bytes(8) + b"\x35\x01\x04\x04" * ((BIGGEST - 10) // 4)


class Forged(NamedTuple):
    """Forged HELLOs (new boot ids) from ``nat``'s address and port, and
    every ``every``-th datagram a wrong COOKIE instead (a BAD_COOKIE trigger);
    ``every`` 0: none."""

    nat: tuple[str, int]
    every: int = 0

    def __call__(self, i: int, rng: random.Random) -> Shot:
        if self.every and i % self.every == 0:
            return Shot(*self.nat, b"\x30\x04" + rng.randbytes(8) + b"\x35\x01\x04\x04")
        return Shot(*self.nat, wire.encode(wire.Hello(rng.randbytes(8))))


class Replay(NamedTuple):
    """The same datagram again and again from one source (a proven NAT64's
    requests, for instance)."""

    src: tuple[str, int]
    payload: bytes

    def __call__(self, i: int, rng: random.Random) -> Shot:
        return Shot(*self.src, self.payload)


def _flood(
    target: tuple[str, int],
    make: Callable[[int, random.Random], Shot],
    rate: float,
    seconds: float,
    sent: multiprocessing.sharedctypes.Synchronized,
) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    rng = random.Random(os.getpid())
    host, port = target
    start = time.monotonic()
    n = 0
    while (now := time.monotonic()) < start + seconds:
        # Open loop: as many as are due (rate 0: as fast as it goes).
        due = int((now - start) * rate) + 1 if rate > 0 else n + 64
        while n < due:
            shot = make(n, rng)
            try:
                sock.sendto(forged(shot.src, shot.sport, host, port, shot.payload), (host, 0))
            except OSError:
                pass  # a full send buffer drops it, as a full link would
            n += 1
        if rate > 0:
            time.sleep(max(0.0, start + (n + 1) / rate - time.monotonic()))
    sent.value = n
    sock.close()


class Flood:
    """A flood of ``make``'s datagrams to ``target`` at ``rate`` per second
    (0: open loop, as fast as one process sends), for ``seconds``."""

    def __init__(
        self,
        target: tuple[str, int],
        make: Callable[[int, random.Random], Shot],
        rate: float,
        seconds: float,
    ):
        ctx = multiprocessing.get_context("fork")
        self.sent = ctx.Value("q", 0)
        self.proc = ctx.Process(
            target=_flood, args=(target, make, rate, seconds, self.sent), daemon=True
        )

    def __enter__(self) -> Flood:
        self.proc.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.join(60)
        if self.proc.is_alive():
            self.proc.kill()


class Latency(NamedTuple):
    sent: int
    answered: int
    lost: int  #: unanswered, or answered after a second
    errors: int
    p50_ms: float | None
    p99_ms: float | None
    max_ms: float | None


async def paced(
    client: Client,
    seconds: float,
    requests: Callable[[int], list[wire.Message]],
    key: Callable[[wire.Message], object | None],
    interval: float = 0.01,
) -> Latency:
    """Send ``requests(i)`` every ``interval`` s for ``seconds`` and time each
    answer, matched by ``key`` (the request's key; None: not an answer).
    ``key`` of a request's first message is what its answer must match."""
    loop = asyncio.get_running_loop()
    pending: dict[object, float] = {}
    latencies: list[float] = []
    errors = 0
    receive = client.datagram_received

    def watch(data: bytes, addr: tuple) -> None:
        nonlocal errors
        now = loop.time()
        try:
            messages = wire.parse(data, wire.Direction.TO_NAT64)
        except wire.Malformed:
            messages = []
        for m in messages:
            k = key(m)
            if k is not None and k in pending:
                latencies.append(now - pending.pop(k))
            elif isinstance(m, wire.Error):
                errors += 1
        receive(data, addr)

    client.datagram_received = watch  # type: ignore[method-assign]
    start = loop.time()
    i = 0
    while loop.time() < start + seconds:
        messages = requests(i)
        pending[key(messages[0])] = loop.time()
        client.send(messages)
        i += 1
        await asyncio.sleep(max(0.0, start + i * interval - loop.time()))
    deadline = loop.time() + 1.0
    while pending and loop.time() < deadline:
        await asyncio.sleep(0.01)
    client.datagram_received = receive  # type: ignore[method-assign]
    late = [x for x in latencies if x > 1.0]
    ms = sorted(x * 1000 for x in latencies)
    return Latency(
        i,
        len(latencies) - len(late),
        len(pending) + len(late),
        errors,
        round(statistics.median(ms), 2) if ms else None,
        round(ms[max(0, int(len(ms) * 0.99) - 1)], 2) if ms else None,
        round(ms[-1], 2) if ms else None,
    )


def new_endpoint(net: int) -> Callable[[int], list[wire.Message]]:
    """Requests of :func:`paced`: a MAP of a new endpoint each time."""

    def make(i: int) -> list[wire.Message]:
        return [wire.Map(b"\x20\x01\x0d\xb8" + net.to_bytes(4, "big") + i.to_bytes(8, "big"), 1)]

    return make


def map_key(m: wire.Message) -> object | None:
    """What a MAP and its MAPPING have in common: the endpoint."""
    if isinstance(m, (wire.Map, wire.Mapping)):
        return (m.addr, m.port)
    return None


async def maps_under_way(
    address: tuple[str, int], local: str, seconds: float, net: int = 3, peer: Peer | None = None
) -> Latency:
    """A NAT64 at ``local`` asking for a new endpoint every 10 ms: the
    neighbour whose answers a flood must leave alone."""
    client = await Client.connect(*address, local=local, peer=peer)
    try:
        if client.peer.cookie is None:
            await client.hello()
            await client.quiet(0.05)  # its confirmation lands first
        return await paced(client, seconds, new_endpoint(net), map_key)
    finally:
        client.close()


async def reboot(client: Client, retry: float = 0.25) -> float:
    """A NAT64 starting among forged HELLOs: HELLO every ``retry`` s until the
    WELCOME of its own boot (the forged boots' WELCOMEs reach it too), then
    a MAP until its MAPPING. Returns the seconds it took."""
    loop = asyncio.get_running_loop()
    start = next_hello = loop.time()
    while client.peer.cookie is None:
        if loop.time() >= next_hello:
            client.send_raw(client.peer.hello())
            next_hello = loop.time() + retry
        await asyncio.sleep(0.005)
    # The confirmation (COOKIE, HELLO) left when the WELCOME came.
    while True:
        out = await client.exchange([wire.Map(b"\x20\x01\x0d\xb8" + bytes(11) + b"\x07", 7)])
        if any(isinstance(m, wire.Mapping) for m in out):
            return loop.time() - start


def drops_logged(lines: list[str]) -> dict[str, int]:
    """Drops by reason, summed over a server's processes, from the summary
    each logs when it stops."""
    out: dict[str, int] = {}
    for line in lines:
        if "stopped:" in line and "drops:" in line:
            for k, v in re.findall(r"(\w+)=(\d+)", line.split("drops:")[1]):
                out[k] = out.get(k, 0) + int(v)
    return out
