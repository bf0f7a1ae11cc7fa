"""The load generator of ``nat64ho bench``: client processes built on
:mod:`nat64ho.peer` and :mod:`nat64ho.core.wire`, and the bare UDP echo server
that is the first ceiling. Each in-flight request has its own UDP socket, so
a reply needs no request id to be matched: whatever arrives on a slot's
socket answers that slot's request.
"""

from __future__ import annotations

import asyncio
import functools
import multiprocessing
import os
import random
import signal
import socket
import struct
import sys
import time
from array import array
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, NamedTuple, cast

from nat64ho.core import wire
from nat64ho.peer import ANSWERS, Client, Peer
from nat64ho.testing import Child, proc_peak_rss, proc_tree_cpu_by_role

MODES = ("create", "lookup", "mixed")
#: A request unanswered for this long is counted lost and its slot reused.
REPLY_TIMEOUT = 1.0
#: Open loop: how often the sender wakes to send what is due.
TICK = 0.001
#: Ports each TOUCH of the mixed mode names.
TOUCH_PORTS = 4
#: Distinct lookup/mixed request datagrams per NAT64: enough that the
#: server sees varied ports, few enough to encode up front.
POOL = 256
#: MAPs per datagram while filling the tables before a lookup/mixed run.
PREFILL_BATCH = 50
_SERIAL = struct.Struct("!I")
#: An address of make_history.py's population: 2001:db8, c >> 10, zeros, c & 0x3ff.
_CLIENT = struct.Struct("!IIIHH")
#: Clients in that population (make_history.py's CLIENTS), and the odd
#: multiplier that scatters consecutive serials over them.
POPULATION = 1 << 20
_SCATTER = 2654435761


def population_address(serial: int) -> tuple[int, int, int, int, int]:
    """The fields of ``_CLIENT`` for a new endpoint's serial: distinct for
    POPULATION consecutive serials."""
    c = (serial * _SCATTER) % POPULATION
    return 0x20010DB8, c >> 10, 0, 0, c & 0x3FF


def population_client(serial: int) -> bytes:
    """The 16-octet address of a new endpoint's serial in the population."""
    return _CLIENT.pack(*population_address(serial))


@dataclass
class BenchConfig:
    mode: str = "create"
    batch: int = 1  #: messages per request datagram
    window: int = 32  #: requests in flight per client process (open loop: at most)
    rate: float = 0.0  #: offered messages/s over all clients; 0 = closed loop
    duration: float = 10.0  #: seconds measured
    warmup: float = 1.0  #: seconds run before measuring
    clients: int = 1  #: client processes
    nats: int = 1  #: NAT64s, each on its own loopback source address
    entries: int = 20_000  #: entries per NAT64 created before a lookup/mixed run
    server: tuple[str, int] | None = None  #: drive this server instead of starting one
    server_pid: int | None = None  #: its process, to read CPU and RSS
    sync: str = "full"
    server_args: list[str] = field(default_factory=list)
    ceilings: bool = True
    timeout: float = (
        REPLY_TIMEOUT  #: seconds before a request counts as lost and its slot is reused
    )
    tmp: Path | None = None  #: where a started server keeps its database
    #: A PostgreSQL URL for the started server's table (a scratch database:
    #: the run writes to it); None: an SQLite file in ``tmp``.
    db: str | None = None
    #: New endpoints are clients of benchmarks/make_history.py's population
    #: (2001:db8:0:XXXX::YYY), so that a history it made for these NAT64s
    #: takes their events across its indexes as a real host's would; False:
    #: addresses of this run alone, which sort beside one another.
    population: bool = False
    #: The population's serial the first client process starts at: runs one
    #: after another on one history each ask for clients the others did not.
    population_start: int = 0


#: Serials a client process may use in one run (it starts its own stretch).
SERIALS_PER_PROCESS = 1 << 16


def first_serial(cfg: BenchConfig, index: int) -> int:
    """The serial client process ``index`` numbers its new endpoints from:
    its own stretch of the population, or 0 for the run's own addresses."""
    return cfg.population_start + index * SERIALS_PER_PROCESS if cfg.population else 0


# ---------------------------------------------------------------- requests


#: NAT64s a run may have (``bench --nats``): each is one source address.
MAX_NATS = 4000
_FIRST_SOURCE = (127 << 24) | (1 << 16)  # 127.1.0.0


def nat_source(index: int) -> str:
    """The loopback address NAT64 number ``index`` sends from (127.1.0.1 on)."""
    n = index + 1
    return f"127.1.{n >> 8}.{n & 255}"


def is_bench_nat(nat: int) -> bool:
    """Whether the NAT64 address ``nat`` (an integer) is one a run sends from."""
    return 1 <= nat - _FIRST_SOURCE <= MAX_NATS


class Template(NamedTuple):
    """A request datagram, encoded once by the peer and reused: only the
    endpoint serials of its new MAPs are rewritten for each send, so the
    client spends its share of the two CPUs on sockets, not on encoding."""

    data: bytes
    serials: tuple[int, ...]  #: offsets of the 4-octet serials that make endpoints new
    answers: int  #: answers expected (one per MAP and LOOKUP)


class NatLoad:
    """One NAT64 as one client process drives it: its session, the endpoints
    it creates, and the entries it may look up."""

    def __init__(
        self,
        index: int,
        peer: Peer,
        tag: bytes,
        rng: random.Random,
        population: bool = False,
        first_serial: int = 0,
    ):
        self.index = index
        self.population = population
        self.local = nat_source(index)
        self.peer = peer
        self.tag = tag  # 12 octets: keeps endpoints of processes and runs apart
        self.rng = rng
        self.serial = first_serial
        self.ports: list[int] = []
        self.endpoints: list[tuple[bytes, int]] = []
        self.pool: list[Template] = []

    def known(self) -> None:
        """Take what the peer's cache holds now as the targets of lookups."""
        self.ports = list(self.peer.cache)
        self.endpoints = list(self.peer.cache.values())

    def prepare(self, mode: str, batch: int) -> None:
        self.pool = [self._template(mode, batch) for _ in range(1 if mode == "create" else POOL)]

    def _template(self, mode: str, batch: int) -> Template:
        rng = self.rng
        ports = self.ports or [1028]
        new = wire.Map(self.tag + bytes(4), 443)
        messages: list[wire.Message]
        if mode == "create":
            messages = [new] * batch
        elif mode == "lookup":
            messages = [wire.Lookup(rng.choice(ports)) for _ in range(batch)]
        else:
            # mixed: mostly cache-hit traffic, some re-MAPs, a tenth new
            # endpoints (which evict the least recently used once the table
            # is full).
            messages = []
            for _ in range(batch):
                r = rng.random()
                if r < 0.6:
                    messages.append(wire.Lookup(rng.choice(ports)))
                elif r < 0.8:
                    messages.append(
                        wire.Touch(tuple(rng.choice(ports) for _ in range(TOUCH_PORTS)))
                    )
                elif r < 0.9 and self.endpoints:
                    messages.append(wire.Map(*rng.choice(self.endpoints)))
                else:
                    messages.append(new)
            if all(type(m) is wire.Touch for m in messages):
                messages[-1] = wire.Lookup(rng.choice(ports))
        data = self.peer.request(messages)
        serials, answers = [], 0
        offset = len(data) - sum(len(wire.encode(m)) for m in messages)
        for m in messages:
            if m is new:
                serials.append(offset + 2 + 12)
            if type(m) is not wire.Touch:
                answers += 1
            offset += len(wire.encode(m))
        return Template(data, tuple(serials), answers)

    def request(self) -> tuple[bytes, int]:
        """A request datagram and how many answers it expects."""
        t = self.pool[self.rng.randrange(len(self.pool))] if len(self.pool) > 1 else self.pool[0]
        if not t.serials:
            return t.data, t.answers
        data = bytearray(t.data)
        s = self.serial
        for offset in t.serials:
            s += 1
            if self.population:  # the whole address, which starts 12 octets before
                _CLIENT.pack_into(data, offset - 12, *population_address(s))
            else:
                _SERIAL.pack_into(data, offset, s & 0xFFFFFFFF)
        self.serial = s
        return bytes(data), t.answers


_DELETED, _ERROR = wire.Kind.DELETED, wire.Kind.ERROR
_NO_ERRORS: tuple[int, ...] = ()


def tally(datagram: bytes) -> tuple[int, int, tuple[int, ...]]:
    """(answers, DELETED, the codes of its ERRORs) in a server datagram, by
    its framing alone; raises wire.Malformed when the framing does not add
    up. The full parse (:meth:`Peer.receive`) is kept for replies whose
    content matters."""
    answers = deleted = 0
    errors = _NO_ERRORS
    pos, end = 0, len(datagram)
    while pos < end - 1:
        kind = datagram[pos]
        if kind == _DELETED:
            deleted += 1
        else:
            answers += 1
            if kind == _ERROR and pos + 2 < end:
                errors += (datagram[pos + 2],)
        pos += 2 + 2 * datagram[pos + 1]
    if pos != end:
        raise wire.Malformed(wire.TRUNCATED, pos)
    return answers, deleted, errors


def error_name(code: int) -> str:
    """An ERROR code by its docs/protocol.md §3 name."""
    try:
        return wire.ErrorCode(code).name
    except ValueError:
        return f"code {code}"


# ---------------------------------------------------------------- load


class _Slot(asyncio.DatagramProtocol):
    """One request in flight, on its own socket."""

    def __init__(self, load: Load, nat: NatLoad):
        self.load = load
        self.nat = nat
        # Set by connection_made, before create_datagram_endpoint returns.
        self.transport: asyncio.DatagramTransport
        self.sent = 0.0  # 0 while idle
        self.expect = 0
        self.got = 0
        self.messages = 0
        self.deleted = 0
        self.errors: tuple[int, ...] = ()  # codes of the ERRORs answered

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A datagram endpoint always gets a DatagramTransport; typeshed types the base.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.load.reply(self, data)

    def error_received(self, exc: Exception) -> None:
        self.load.counts["icmp_errors"] += 1


class Load:
    """The requests of one client process: closed loop (every answer sends the
    next request) or open loop (a ticker sends at a fixed rate)."""

    def __init__(
        self,
        nats: list[NatLoad],
        batch: int,
        *,
        echo: bool = False,
        learn: bool = False,
        timeout: float = REPLY_TIMEOUT,
    ):
        self.nats = nats
        self.timeout = timeout
        self.batch = batch
        self.echo = echo  # the echo ceiling: any datagram back completes a request
        self.learn = learn  # parse replies fully, so the peers' caches fill
        self.slots: list[_Slot] = []
        self.idle: list[_Slot] = []
        self.closed_loop = True
        self.sending = False
        self.measure = (0.0, 0.0)
        self.latencies = array("d")
        self.counts = {
            "messages": 0,
            "requests": 0,
            "answers": 0,
            "lost": 0,
            "unsent": 0,
            "created": 0,
            "deleted": 0,
            "errors": 0,
            "malformed": 0,
            "icmp_errors": 0,
            "late": 0,
        }
        self.done_count = 0  # requests completed in any phase

    async def open(self, host: str, port: int, window: int) -> None:
        loop = asyncio.get_running_loop()
        for i in range(window):
            nat = self.nats[i % len(self.nats)]
            _, slot = await loop.create_datagram_endpoint(
                functools.partial(_Slot, self, nat),
                local_addr=(nat.local, 0),
                remote_addr=(host, port),
            )
            self.slots.append(slot)
        self.idle = list(self.slots)

    def close(self) -> None:
        for s in self.slots:
            s.transport.close()

    def send(self, slot: _Slot) -> None:
        data, expect = slot.nat.request()
        slot.expect = expect
        slot.got = slot.deleted = 0
        slot.errors = ()
        slot.messages = self.batch
        slot.sent = time.perf_counter()
        slot.transport.sendto(data)

    def reply(self, slot: _Slot, data: bytes) -> None:
        if not slot.sent:
            self.counts["late"] += 1
            return
        counts = self.counts
        if self.echo:
            slot.got = slot.expect
        else:
            try:
                if self.learn:
                    messages = slot.nat.peer.receive(data)
                    got = sum(1 for m in messages if isinstance(m, ANSWERS))
                else:
                    got, deleted, errors = tally(data)
                    slot.deleted += deleted
                    slot.errors += errors
            except wire.Malformed:
                counts["malformed"] += 1
                return
            slot.got += got
        if slot.got < slot.expect:
            return
        now = time.perf_counter()
        self.done_count += 1
        if self.measure[0] <= now < self.measure[1]:
            self.latencies.append(now - slot.sent)
            self.counts["requests"] += 1
            self.counts["messages"] += slot.messages
            self.counts["answers"] += slot.got
            self.counts["deleted"] += slot.deleted
            if slot.errors:
                # By name: a refusal by the server's limits is policy, not loss.
                self.counts["errors"] += len(slot.errors)
                for code in slot.errors:
                    key = f"error {error_name(code)}"
                    self.counts[key] = self.counts.get(key, 0) + 1
        slot.sent = 0.0
        if self.sending and self.closed_loop:
            self.send(slot)
        else:
            self.idle.append(slot)

    def _expire(self) -> None:
        limit = time.perf_counter() - self.timeout
        for slot in self.slots:
            if slot.sent and slot.sent < limit:
                self.counts["lost"] += 1
                slot.sent = 0.0
                if self.sending and self.closed_loop:
                    self.send(slot)
                else:
                    self.idle.append(slot)

    async def run(
        self, start: float, measure: float, end: float, rate: float = 0.0, until_done: int = 0
    ) -> None:
        """Send from ``start`` until ``end`` (monotonic clock, shared by the
        processes), counting what completes in [``measure``, ``end``); with
        ``until_done``, stop as soon as that many requests completed."""
        clock = time.perf_counter  # CLOCK_MONOTONIC on Linux, like time.monotonic
        self.measure = (measure, end)
        self.closed_loop = rate <= 0
        await asyncio.sleep(max(0.0, start - clock()))
        self.sending = True
        t0 = clock()
        next_expire = t0 + self.timeout / 4
        if self.closed_loop:
            idle, self.idle = self.idle, []
            for slot in idle:
                self.send(slot)
            while clock() < end and not (until_done and self.done_count >= until_done):
                await asyncio.sleep(0.05 if until_done else 0.1)
                if clock() >= next_expire:
                    self._expire()
                    next_expire = clock() + self.timeout / 4
        else:
            per_second = rate / self.batch
            sent = 0
            while (now := clock()) < end:
                due = int((now - t0) * per_second) - sent
                while due > 0:
                    due -= 1
                    sent += 1
                    if self.idle:
                        self.send(self.idle.pop())
                    else:
                        self.counts["unsent"] += 1
                if now >= next_expire:
                    self._expire()
                    next_expire = now + self.timeout / 4
                await asyncio.sleep(TICK)
        self.sending = False
        # Let the requests in flight finish, so the next phase starts clean.
        deadline = clock() + self.timeout
        while any(s.sent for s in self.slots) and clock() < deadline:
            await asyncio.sleep(0.01)
        self._expire()


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def loop_name() -> str:
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    return f"uvloop {uvloop.__version__}"


def _client_process(
    cfg: BenchConfig,
    address: tuple[str, int],
    index: int,
    sessions: list[tuple[int, bytes, bytes]],
    conn: Connection,
    echo: bool,
) -> None:
    """Body of one client process: prefill, report ready, run when told, report."""
    loop = _new_loop()
    asyncio.set_event_loop(loop)
    try:
        loop.run_until_complete(_client(cfg, address, index, sessions, conn, echo))
    finally:
        loop.close()
        conn.close()


async def _client(
    cfg: BenchConfig,
    address: tuple[str, int],
    index: int,
    sessions: list[tuple[int, bytes, bytes]],
    conn: Connection,
    echo: bool,
) -> None:
    rng = random.Random(index * 7919 + os.getpid())
    run_tag = os.urandom(4)
    nats = []
    for nat_index, boot_id, cookie in sessions:
        peer = Peer(boot_id)
        peer.cookie = cookie
        tag = (
            b"\x20\x01\x0d\xb8" + run_tag + index.to_bytes(2, "big") + nat_index.to_bytes(2, "big")
        )
        nats.append(NatLoad(nat_index, peer, tag, rng, cfg.population, first_serial(cfg, index)))
    load = Load(nats, cfg.batch, echo=echo, timeout=cfg.timeout)
    await load.open(*address, cfg.window)
    loop = asyncio.get_running_loop()
    if cfg.mode != "create" and not echo:
        # Give every NAT64 its entries first (this process's share of them).
        for n in nats:
            n.prepare("create", PREFILL_BATCH)
        prefill = Load(nats, PREFILL_BATCH, learn=True, timeout=cfg.timeout)
        prefill.slots, prefill.idle = load.slots, list(load.slots)
        for s in load.slots:
            s.load = prefill
        want = -(-cfg.entries * len(nats) // prefill.batch)
        now = time.perf_counter()
        await prefill.run(now, now, now + 600, until_done=want)
        for s in load.slots:
            s.load = load
        load.idle = list(load.slots)
        for n in nats:
            n.known()
    for n in nats:
        n.prepare(cfg.mode, cfg.batch)
    conn.send(("ready", None))
    start, measure, end = await loop.run_in_executor(None, conn.recv)
    await load.run(start, measure, end, cfg.rate / cfg.clients)
    load.close()
    conn.send(("done", (load.counts, load.latencies.tobytes())))


def start_echo() -> Child:
    return Child([sys.executable, "-c", "from nat64ho.bench.load import echo_main; echo_main()"])


class _Echo(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # As in _Slot: the base type in typeshed, a DatagramTransport here.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.transport.sendto(data, addr)


def echo_main() -> None:
    """The echo ceiling: receive a datagram, send it back, on the server's
    event loop and socket settings."""
    from nat64ho.daemon.serve import RCVBUF

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        transport, _ = await loop.create_datagram_endpoint(_Echo, local_addr=("127.0.0.1", 0))
        transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
        host, port = transport.get_extra_info("sockname")[:2]
        print(f"listening on {host}:{port}", file=sys.stderr, flush=True)
        await stop.wait()
        transport.close()

    loop = _new_loop()
    loop.run_until_complete(main())


async def hello_all(address: tuple[str, int], nats: int) -> list[tuple[int, bytes, bytes]]:
    """HELLO once per NAT64; every client process then shares the session."""
    out = []
    for i in range(nats):
        client = await Client.connect(*address, local=nat_source(i))
        try:
            await client.hello(timeout=5.0)
        finally:
            client.close()
        cookie = client.peer.cookie
        if cookie is None:  # the WELCOME answered another boot id
            raise ConnectionRefusedError(f"NAT64 {i}: no session after HELLO")
        out.append((i, client.peer.boot_id, cookie))
    return out


@dataclass
class Result:
    """What one load phase measured."""

    seconds: float
    counts: dict[str, int]
    latencies: list[float]  # seconds, sorted
    cpu: float | None = None  # server CPU, fraction of one core
    peak_rss: int | None = None  # bytes
    cpu_by: dict[str, float] | None = None  # cpu by role (testing.proc_tree_cpu_by_role)

    @property
    def messages_per_s(self) -> float:
        return self.counts["messages"] / self.seconds

    @property
    def datagrams_per_s(self) -> float:
        return self.counts["requests"] / self.seconds

    def percentile(self, q: float) -> float | None:
        if not self.latencies:
            return None
        return self.latencies[min(len(self.latencies) - 1, int(q * len(self.latencies)))]


def drive(
    cfg: BenchConfig,
    address: tuple[str, int],
    pid: int | None,
    echo: bool = False,
    duration: float | None = None,
) -> Result:
    """Run the client processes against ``address`` and gather their numbers."""
    duration = cfg.duration if duration is None else duration
    sessions = (
        asyncio.run(hello_all(address, cfg.nats))
        if not echo
        else [(i, os.urandom(8), os.urandom(8)) for i in range(cfg.nats)]
    )
    ctx = multiprocessing.get_context("spawn")
    procs, pipes = [], []
    for p in range(cfg.clients):
        mine = [s for s in sessions if s[0] % cfg.clients == p] or [sessions[p % len(sessions)]]
        parent, child = ctx.Pipe()
        proc = ctx.Process(
            target=_client_process, args=(cfg, address, p, mine, child, echo), daemon=True
        )
        proc.start()
        child.close()
        procs.append(proc)
        pipes.append(parent)
    try:
        for conn in pipes:
            if not conn.poll(900):
                raise RuntimeError("a client process did not get ready")
            tag, _ = conn.recv()
        start = time.perf_counter() + 0.2
        measure = start + cfg.warmup
        end = measure + duration
        for conn in pipes:
            conn.send((start, measure, end))
        cpu0 = None
        if pid is not None:
            time.sleep(max(0.0, measure - time.perf_counter()))
            cpu0 = proc_tree_cpu_by_role(pid)
            time.sleep(max(0.0, end - time.perf_counter()))
            cpu1 = proc_tree_cpu_by_role(pid)
            cpu_by = {k: (cpu1[k] - cpu0[k]) / duration for k in cpu1}
            cpu = sum(cpu_by.values())
            peak = proc_peak_rss(pid)
        counts: dict[str, int] = {}
        latencies = array("d")
        for conn in pipes:
            if not conn.poll(end - time.perf_counter() + 30):
                raise RuntimeError("a client process did not report")
            tag, (c, lat) = conn.recv()
            for k, v in c.items():
                counts[k] = counts.get(k, 0) + v
            latencies.frombytes(lat)
    finally:
        for proc in procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
    return Result(
        duration,
        counts,
        sorted(latencies),
        cpu if pid is not None else None,
        peak if pid is not None else None,
        cpu_by if pid is not None else None,
    )
