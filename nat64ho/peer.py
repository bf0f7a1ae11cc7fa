"""The NAT64 side of the protocol: a sans-I/O peer and a small asyncio driver.

Used by the end-to-end tests, the benchmark and anyone simulating a NAT64.
:class:`Peer` keeps the session (boot id, cookie, port range) and the NAT64's
cache of mappings; :class:`Client` moves its datagrams over UDP, confirms
each WELCOME at once with COOKIE and HELLO (docs/protocol.md §4.5) and says
HELLO again, with the same boot id, when the server answers BAD_COOKIE
(§4.3), keeping its cookie until a WELCOME replaces it: anyone can make the
server send BAD_COOKIE to a NAT64.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from nat64ho.core import wire

#: Messages that answer a request (a DELETED only accompanies a MAPPING).
ANSWERS = (wire.Welcome, wire.Mapping, wire.Unmapped, wire.Error)


class NoSession(RuntimeError):
    """A request was built before a WELCOME gave this peer its cookie."""


class Peer:
    """A NAT64's view of one handoff server."""

    def __init__(self, boot_id: bytes | None = None):
        self.boot_id = boot_id if boot_id is not None else os.urandom(8)
        self.cookie: bytes | None = None
        self.first_port: int | None = None
        self.last_port: int | None = None
        #: NAT port -> (IPv6 address, IPv6 port), as the server announced.
        self.cache: dict[int, tuple[bytes, int]] = {}

    def hello(self) -> bytes:
        return wire.encode(wire.Hello(self.boot_id))

    def confirm(self) -> bytes:
        """The datagram that confirms our boot (§4.5): our COOKIE, then our
        HELLO, so that the server needs no memory of the claim."""
        if self.cookie is None:
            raise NoSession("no cookie yet: send hello() and feed the WELCOME to receive()")
        return wire.encode(wire.Cookie(self.cookie)) + self.hello()

    def request(self, messages: list[wire.Message]) -> bytes:
        """A datagram: our COOKIE, then ``messages``."""
        if self.cookie is None:
            raise NoSession("no cookie yet: send hello() and feed the WELCOME to receive()")
        return wire.encode(wire.Cookie(self.cookie)) + wire.build(messages)

    def receive(self, datagram: bytes) -> list[wire.Message]:
        """Parse a server datagram and update the session and cache.
        Raises wire.Malformed like wire.parse."""
        messages = wire.parse(datagram, wire.Direction.TO_NAT64)
        for m in messages:
            if isinstance(m, wire.Mapping):
                self.cache[m.nat_port] = (m.addr, m.port)
            elif isinstance(m, (wire.Deleted, wire.Unmapped)):
                self.cache.pop(m.nat_port, None)
            elif isinstance(m, wire.Welcome) and m.boot_id == self.boot_id:
                self.cookie = m.cookie
                self.first_port, self.last_port = m.first_port, m.last_port
        return messages


#: Least time between two HELLOs a :class:`Client` sends by itself after
#: BAD_COOKIE: one per round of refusals, well inside the allowance the
#: server gives HELLOs with a recorded boot id.
REHELLO_INTERVAL = 0.5


class Client(asyncio.DatagramProtocol):
    """A :class:`Peer` on a UDP socket. Replies queue up in :attr:`inbox`.

    With ``auto`` (the default) it keeps its session by itself: a WELCOME
    for our boot is confirmed at once, and a BAD_COOKIE is answered with a
    HELLO (same boot id), at most once per REHELLO_INTERVAL, and the
    confirmation of its WELCOME; requests refused meanwhile are the caller's
    to retry."""

    def __init__(self, peer: Peer | None = None, *, auto: bool = True):
        self.peer = peer or Peer()
        self.inbox: asyncio.Queue[wire.Message] = asyncio.Queue()
        self.transport: asyncio.DatagramTransport | None = None
        self.malformed = 0
        self.auto = auto
        self.rehellos = 0  #: HELLOs sent after BAD_COOKIE
        self._last_rehello = float("-inf")

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        *,
        local: str = "127.0.0.1",
        peer: Peer | None = None,
        auto: bool = True,
    ) -> Client:
        loop = asyncio.get_running_loop()
        _, client = await loop.create_datagram_endpoint(
            lambda: cls(peer, auto=auto), local_addr=(local, 0), remote_addr=(host, port)
        )
        return client

    # A datagram endpoint always hands over a DatagramTransport; typeshed's
    # DatagramProtocol narrows the base the same way, with the same ignore.
    def connection_made(self, transport: asyncio.DatagramTransport) -> None:  # type: ignore[override]
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        peer = self.peer
        try:
            messages = peer.receive(data)
        except wire.Malformed:
            self.malformed += 1
            return
        for m in messages:
            self.inbox.put_nowait(m)
            if not self.auto or self.transport is None:
                continue
            if (
                isinstance(m, wire.Welcome)
                and m.boot_id == peer.boot_id
                and peer.cookie is not None
            ):
                self.transport.sendto(peer.confirm())
            elif isinstance(m, wire.Error) and m.code == wire.ErrorCode.BAD_COOKIE:
                now = asyncio.get_running_loop().time()
                if now - self._last_rehello >= REHELLO_INTERVAL:
                    self._last_rehello = now
                    self.rehellos += 1
                    self.transport.sendto(peer.hello())

    def error_received(self, exc: Exception) -> None:
        pass

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def send_raw(self, data: bytes) -> None:
        if self.transport is None:
            raise RuntimeError("not connected: make the Client with Client.connect()")
        self.transport.sendto(data)

    def send(self, messages: list[wire.Message]) -> None:
        self.send_raw(self.peer.request(messages))

    async def collect(self, answers: int, timeout: float = 2.0) -> list[wire.Message]:
        """Messages received until ``answers`` answers came, or ``timeout``
        seconds passed without completing them."""
        out: list[wire.Message] = []
        got = 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while got < answers:
            left = deadline - loop.time()
            if left <= 0:
                break
            try:
                m = await asyncio.wait_for(self.inbox.get(), left)
            except TimeoutError:
                break
            out.append(m)
            if isinstance(m, ANSWERS):
                got += 1
        return out

    async def quiet(self, seconds: float = 0.2) -> list[wire.Message]:
        """Whatever arrives within ``seconds``."""
        out: list[wire.Message] = []
        try:
            while True:
                out.append(await asyncio.wait_for(self.inbox.get(), seconds))
        except TimeoutError:
            return out

    async def hello(self, timeout: float = 2.0) -> wire.Welcome:
        self.send_raw(self.peer.hello())
        for m in await self.collect(1, timeout):
            if isinstance(m, wire.Welcome):
                return m
            if isinstance(m, wire.Error):
                raise ConnectionRefusedError(f"server answered HELLO with ERROR {m.code}")
        raise TimeoutError("no WELCOME")

    async def exchange(
        self, messages: list[wire.Message], answers: int | None = None, timeout: float = 2.0
    ) -> list[wire.Message]:
        """Send ``messages`` in one datagram and collect the answers (by
        default one per MAP/LOOKUP)."""
        if answers is None:
            answers = sum(isinstance(m, (wire.Map, wire.Lookup)) for m in messages)
        self.send(messages)
        return await self.collect(answers, timeout)

    async def map(self, addr: bytes, port: int) -> list[wire.Message]:
        return await self.exchange([wire.Map(addr, port)])
