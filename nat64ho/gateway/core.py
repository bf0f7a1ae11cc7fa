"""The gateway's state, sans-I/O: flows, the sessions with handoff servers,
requests waiting for answers, and timers. Packets from the TUN device go in
with ``now``; packets for the TUN device come out of :meth:`Gateway.flush`.

The gateway owns the pool address: every packet to it arrives through the
TUN device, the handoff servers' answers included, so its handoff datagrams
are IPv4/UDP packets it writes there too, from ``pool:handoff_port``. The
servers know it by that source address (docs/protocol.md §1).

Per server, a cache maps NAT ports to client endpoints and back; the server
holds the truth. A miss queues the packet (bounded) behind one MAP or LOOKUP,
sent at the next :meth:`flush` and retransmitted with backoff; the answer
releases every packet waiting for it. Ports in use are TOUCHed in batches.
"""

from __future__ import annotations

import collections
import ipaddress
import os
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from nat64ho.core import wire
from nat64ho.gateway import translate as t
from nat64ho.peer import Peer

#: Source port of handoff datagrams: below the default table range 1028-65535,
#: so it is never a NAT port there.
HANDOFF_PORT = 1027
#: Packets kept per flow while its MAP or LOOKUP is outstanding (a TCP
#: handshake needs one; a burst after a restart a few).
MAX_WAITING_PACKETS = 16
#: Flows with a request outstanding, per server: bounds the memory a flood
#: of new flows can take while a server is slow.
MAX_PENDING = 8192
#: First retransmission timeout of a request, doubled after each try.
REQUEST_RTO = 0.25
#: Sends of a request; its packets are dropped 4 s after the last (sent at
#: 0, 0.25, 0.75, 1.75 and 3.75 s).
REQUEST_TRIES = 5
#: HELLO retransmission: first timeout and the cap of its backoff; a gateway
#: keeps trying for as long as it runs.
HELLO_RTO = 0.5
HELLO_RTO_MAX = 5.0
#: ICMPv6 errors the gateway originates per second, with a burst of as many
#: (RFC 4443 §2.4 asks for a limit).
ICMP_ERRORS_PER_S = 100.0
#: The count of packets dropped because handling them raised: always 0
#: unless translate.py has a bug.
DROP_BUG = "drop_bug"
#: Room for requests in a handoff datagram, after IPv4+UDP and our COOKIE.
_ROOM = wire.MAX_DATAGRAM - 10

#: How a waiting packet was parsed: t.Parsed6 behind a MAP, t.Parsed4 behind a LOOKUP.
P = TypeVar("P", t.Parsed6, t.Parsed4)


class Pending(Generic[P]):
    """Packets waiting for one request's answer."""

    __slots__ = ("packets", "due", "tries", "request")

    def __init__(self, request: wire.Map | wire.Lookup, now: float):
        self.packets: list[tuple[bytes, P]] = []
        self.request = request
        self.due = now  # sent at the next flush
        self.tries = 0


class Server:
    """One handoff server: its session and this gateway's cache of its table."""

    def __init__(self, addr: bytes, port: int, boot_id: bytes):
        self.addr = addr
        self.port = port
        self.name = f"{ipaddress.IPv4Address(addr)}:{port}"
        self.peer = Peer(boot_id)
        #: NAT port -> endpoint is ``peer.cache``; this is the reverse, checked
        #: against it on use because a MAPPING may move a port without notice.
        self.endpoints: dict[tuple[bytes, int], int] = {}
        self.maps: dict[tuple[bytes, int], Pending[t.Parsed6]] = {}
        self.lookups: dict[int, Pending[t.Parsed4]] = {}
        self.used: set[int] = set()
        self.outbox: list[wire.Message] = []
        self.hello_due = 0.0
        self.hello_rto = HELLO_RTO
        self.last_hello = float("-inf")
        #: HELLO again (same boot) while still using the cookie we hold: the
        #: server answered BAD_COOKIE, which anyone can make it do (§4.3).
        self.rehello = False
        self.confirm = False

    def port_of(self, key: tuple[bytes, int]) -> int | None:
        port = self.endpoints.get(key)
        if port is not None and self.peer.cache.get(port) != key:
            del self.endpoints[key]
            return None
        return port


class Gateway:
    """A stateful NAT64 between ``prefix``::/96 and the ``pool`` address."""

    def __init__(
        self,
        prefix: bytes,
        pool: bytes,
        servers: list[tuple[bytes, int]],
        *,
        handoff_port: int = HANDOFF_PORT,
        touch_interval: float = 5.0,
        boot_id: bytes | None = None,
        now: float = 0.0,
        log: Callable[[str], None] = lambda line: None,
    ):
        if len(prefix) != 12 or len(pool) != 4:
            raise ValueError("prefix is 12 octets, pool 4")
        self.prefix = prefix
        self.pool = pool
        self.handoff_port = handoff_port
        self.touch_interval = touch_interval
        self.boot_id = boot_id if boot_id is not None else os.urandom(8)
        self.servers = {addr: Server(addr, port, self.boot_id) for addr, port in servers}
        self.log = log
        self.out: list[bytes] = []
        self.counts: collections.Counter[str] = collections.Counter()
        self.touch_due = now + touch_interval
        self.icmp_tokens = ICMP_ERRORS_PER_S
        self.icmp_at = now

    # ------------------------------------------------------------ packets
    def packet(self, pkt: bytes, now: float) -> None:
        """A packet read from the TUN device; never raises for its content."""
        try:
            if not pkt:
                self.counts["drop_" + t.NOT_IPV6] += 1
            elif pkt[0] >> 4 == 6:
                self._outbound(pkt, now)
            else:
                self._inbound(pkt, now)
        except Exception as exc:
            # A packet translate.py failed to name a reason for is a bug of
            # ours: it costs that packet, not the gateway (tests keep it 0).
            self.counts[DROP_BUG] += 1
            if self.counts[DROP_BUG] == 1:
                self.log(f"bug: a packet raised {exc!r}; such packets are counted as {DROP_BUG}")

    def _outbound(self, pkt: bytes, now: float) -> None:
        try:
            p = t.parse6(pkt, self.prefix)
        except t.Untranslatable as exc:
            self.counts["drop_" + exc.reason] += 1
            return
        srv = self.servers.get(p.dst4)
        if srv is None:
            self.counts["drop_no_server"] += 1
            if not p.error:
                self._unreachable(pkt, p.dst4, now)
            return
        key = (p.client, p.port)
        port = srv.port_of(key)
        if port is not None:
            self._emit6(pkt, p, port, srv)
            return
        if p.error:  # an error never creates a flow
            self.counts["drop_error_unmapped"] += 1
            return
        waiting = srv.maps.get(key)
        if waiting is None:
            if len(srv.maps) + len(srv.lookups) >= MAX_PENDING:
                self.counts["drop_pending_full"] += 1
                return
            waiting = srv.maps[key] = Pending(wire.Map(*key), now)
        self._wait(waiting, (pkt, p))

    def _emit6(self, pkt: bytes, p: t.Parsed6, port: int, srv: Server) -> None:
        try:
            self.out.append(t.to_ipv4(pkt, p, self.pool, port))
        except t.Untranslatable as exc:
            self.counts["drop_" + exc.reason] += 1
            return
        srv.used.add(port)
        self.counts["to_ipv4"] += 1

    def _inbound(self, pkt: bytes, now: float) -> None:
        try:
            p = t.parse4(pkt, self.pool)
        except t.Untranslatable as exc:
            self.counts["drop_" + exc.reason] += 1
            return
        srv = self.servers.get(p.host)
        if srv is None:
            self.counts["drop_no_server"] += 1
            return
        if (
            not p.error
            and p.nat_port == self.handoff_port
            and p.proto == t.UDP
            and pkt[p.l4 : p.l4 + 2] == srv.port.to_bytes(2, "big")
        ):
            self._handoff(srv, pkt[p.l4 + 8 : pkt[2] << 8 | pkt[3]], now)
            return
        endpoint = srv.peer.cache.get(p.nat_port)
        if endpoint is not None:
            self._emit4(pkt, p, endpoint, srv)
            return
        waiting = srv.lookups.get(p.nat_port)
        if waiting is None:
            if len(srv.maps) + len(srv.lookups) >= MAX_PENDING:
                self.counts["drop_pending_full"] += 1
                return
            waiting = srv.lookups[p.nat_port] = Pending(wire.Lookup(p.nat_port), now)
        self._wait(waiting, (pkt, p))

    def _emit4(self, pkt: bytes, p: t.Parsed4, endpoint: tuple[bytes, int], srv: Server) -> None:
        try:
            self.out.append(t.to_ipv6(pkt, p, self.prefix, *endpoint))
        except t.Untranslatable as exc:
            self.counts["drop_" + exc.reason] += 1
            return
        srv.used.add(p.nat_port)
        self.counts["to_ipv6"] += 1

    def _wait(self, waiting: Pending[P], item: tuple[bytes, P]) -> None:
        if len(waiting.packets) >= MAX_WAITING_PACKETS:
            self.counts["drop_waiting_full"] += 1
        else:
            waiting.packets.append(item)

    def _unreachable(self, pkt: bytes, dst4: bytes, now: float) -> None:
        self.icmp_tokens = min(
            ICMP_ERRORS_PER_S, self.icmp_tokens + (now - self.icmp_at) * ICMP_ERRORS_PER_S
        )
        self.icmp_at = now
        if self.icmp_tokens < 1:
            return
        self.icmp_tokens -= 1
        # Destination unreachable, administratively prohibited: this gateway
        # serves only the IPv4 hosts that run a handoff server.
        self.out.append(t.icmp6_error(pkt, self.prefix + dst4, 1, 1))
        self.counts["icmp6_unreachable"] += 1

    # ------------------------------------------------------------ handoff
    def _handoff(self, srv: Server, data: bytes, now: float) -> None:
        try:
            messages = srv.peer.receive(data)
        except wire.Malformed as exc:
            self.counts["handoff_malformed_" + exc.reason] += 1
            return
        for m in messages:
            if isinstance(m, wire.Mapping):
                key = (m.addr, m.port)
                srv.endpoints[key] = m.nat_port
                mapped = srv.maps.pop(key, None)
                if mapped is not None:
                    for pkt, p6 in mapped.packets:
                        self._emit6(pkt, p6, m.nat_port, srv)
                looked = srv.lookups.pop(m.nat_port, None)
                if looked is not None:
                    for pkt, p4 in looked.packets:
                        self._emit4(pkt, p4, key, srv)
            elif isinstance(m, wire.Deleted):
                self.counts["deleted"] += 1
                if srv.endpoints.get((m.addr, m.port)) == m.nat_port:
                    del srv.endpoints[(m.addr, m.port)]
            elif isinstance(m, wire.Unmapped):
                self.counts["unmapped"] += 1
                looked = srv.lookups.pop(m.nat_port, None)
                if looked is not None:
                    self.counts["drop_unmapped"] += len(looked.packets)
            elif isinstance(m, wire.Welcome):
                if m.boot_id != srv.peer.boot_id:
                    continue
                self.log(f"session with {srv.name}: ports {m.first_port}-{m.last_port}")
                if m.first_port <= self.handoff_port <= m.last_port:
                    self.log(
                        f"warning: {srv.name}'s range holds the handoff port {self.handoff_port}"
                    )
                srv.confirm = True
                srv.rehello = False
                srv.hello_rto = HELLO_RTO
                for mapped in srv.maps.values():
                    mapped.due = now
                for looked in srv.lookups.values():
                    looked.due = now
            elif isinstance(m, wire.Error):
                try:
                    name = wire.ErrorCode(m.code).name
                except ValueError:
                    name = str(m.code)
                self.counts["error_" + name.lower()] += 1
                if m.code == wire.ErrorCode.BAD_COOKIE and not srv.rehello:
                    # The cookie expired, the server never confirmed us, or
                    # someone forged a datagram from our address: HELLO
                    # again with the same boot id, keeping the cookie until
                    # a WELCOME replaces it, and never faster than HELLO_RTO.
                    self.log(f"{srv.name} answered BAD_COOKIE: HELLO again")
                    srv.rehello = True
                    srv.hello_due = max(now, srv.last_hello + HELLO_RTO)
                    srv.hello_rto = HELLO_RTO

    # ------------------------------------------------------------ timers
    def tick(self, now: float) -> None:
        """Retransmissions, HELLOs and TOUCHes that are due."""
        touch = now >= self.touch_due
        if touch:
            self.touch_due = now + self.touch_interval
        for srv in self.servers.values():
            if (srv.peer.cookie is None or srv.rehello) and now >= srv.hello_due:
                self._send(srv, srv.peer.hello())
                srv.last_hello = now
                srv.hello_due = now + srv.hello_rto
                srv.hello_rto = min(srv.hello_rto * 2, HELLO_RTO_MAX)
                self.counts["hello_sent"] += 1
            if srv.peer.cookie is None:
                continue
            if touch and srv.used:
                # Before new requests: a MAP that must delete an entry to make
                # room has to see the recency of every port we used.
                ports = sorted(srv.used)
                srv.used.clear()
                for i in range(0, len(ports), 255):
                    srv.outbox.append(wire.Touch(tuple(ports[i : i + 255])))
                self.counts["touched"] += len(ports)
            tables: tuple[dict[Any, Pending[Any]], ...] = (srv.maps, srv.lookups)
            for table in tables:
                expired = []
                for key, waiting in table.items():
                    if now < waiting.due:
                        continue
                    if waiting.tries >= REQUEST_TRIES:
                        expired.append(key)
                        continue
                    srv.outbox.append(waiting.request)
                    waiting.due = now + REQUEST_RTO * 2**waiting.tries
                    if waiting.tries:
                        self.counts["retransmitted"] += 1
                    waiting.tries += 1
                for key in expired:
                    self.counts["drop_request_timeout"] += len(table.pop(key).packets)

    def flush(self, now: float) -> list[bytes]:
        """Everything for the TUN device since the last flush: translated
        packets, then handoff datagrams (requests new since then included)."""
        self.tick(now)
        for srv in self.servers.values():
            if srv.peer.cookie is None:
                srv.outbox.clear()  # resent from the pending tables after WELCOME
                continue
            if srv.confirm:
                # docs/protocol.md §4.5: COOKIE then HELLO confirms the boot,
                # whether or not the server still remembers our claim.
                self._send(srv, srv.peer.confirm())
                srv.confirm = False
            if srv.outbox:
                self._requests(srv)
        out, self.out = self.out, []
        return out

    def _requests(self, srv: Server) -> None:
        batch: list[wire.Message] = []
        size = 0
        for m in srv.outbox:
            n = len(wire.encode(m))
            if size + n > _ROOM:
                self._send(srv, srv.peer.request(batch))
                batch, size = [], 0
            batch.append(m)
            size += n
            self.counts["sent_" + type(m).__name__.lower()] += 1
        if batch:
            self._send(srv, srv.peer.request(batch))
        srv.outbox.clear()

    def _send(self, srv: Server, payload: bytes) -> None:
        self.out.append(t.udp4(self.pool, self.handoff_port, srv.addr, srv.port, payload))

    def pending(self) -> int:
        """Flows waiting for an answer, over all servers."""
        return sum(len(s.maps) + len(s.lookups) for s in self.servers.values())
