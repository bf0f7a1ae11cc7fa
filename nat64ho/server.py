"""The UDP server: sockets, clocks, the log file, signals, and the dispatch
that joins the codec, the per-NAT64 tables and the store.

A datagram is parsed whole, checked (source, cookie, rates), decided by its
NAT64's table, and answered; answers that announce something not yet durable
wait for their commit. Nothing a peer sends raises out of
:meth:`Server.datagram_received`: every drop is counted under a named reason.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import heapq
import ipaddress
import logging
import os
import random
import signal
import socket
import sqlite3
import sys
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from nat64ho import wire
from nat64ho.eventlog import Event, EventKind, format_event
from nat64ho.ipfix_udp import Exporter
from nat64ho.schema import BadRow, DatabaseError, NotOurDatabase
from nat64ho.store import Batch, DatabaseDamaged, Store, is_damage
from nat64ho.table import Bucket, NatTable

log = logging.getLogger("nat64ho")

#: Kernel receive buffer asked for: a burst from a busy NAT64 waits here
#: rather than being dropped while a commit runs.
RCVBUF = 4 * 1024 * 1024
#: Datagrams waiting on database reads or commits at once; beyond this new
#: work is dropped ("overloaded") so memory stays bounded.
MAX_INFLIGHT = 8192
#: Rows waiting to be committed beyond which new entries are refused (no
#: answer): a full or stuck disk must not grow memory without bound.
MAX_BACKLOG = 200_000
#: Pages of LRU candidates read for one datagram before giving up.
MAX_VICTIM_PAGES = 64
#: Sources whose HELLO rate is tracked; the oldest are forgotten beyond this.
MAX_HELLO_SOURCES = 65536
#: How long a clean stop waits for datagrams in flight before committing.
STOP_GRACE = 10.0
#: How often a standby server tries to take the table.
STANDBY_POLL = 0.2
#: Shortest interval between two reports of unexpected errors in the log;
#: the ones between are counted (metric "internal_error") and summed up.
BUG_LOG_INTERVAL = 60.0
#: Interval between history prunes when --keep-history is set.
PRUNE_INTERVAL = 3600.0

#: Counter names of the event kinds. Naming them per event (an enum's
#: .name, lower(), an f-string) cost 1.2 us each, on the commit path.
_EVENT_COUNTS = {kind: f"events_{kind.name.lower()}" for kind in EventKind}


@dataclass
class Config:
    db: Path
    host: str = "0.0.0.0"
    port: int = wire.DEFAULT_PORT
    log_file: str = "-"
    first_port: int = 1028
    last_port: int = 65535
    allow: list = field(default_factory=list)  # IPv4Network; empty = any
    min_idle: float = 0.0  # seconds
    hello_rate: float = 5.0
    create_rate: float = 50_000.0
    sync: str = "full"
    cache_size: int = 100_000
    keep_history_days: float | None = None
    max_nats: int = 4096
    metrics: tuple[str, int] | None = None
    standby: bool = False  #: wait for another server to release the table
    ipfix: list = field(default_factory=list)  # (host, port) of IPFIX collectors
    ipfix_domain: int = 0  # IPFIX observation domain id


def wall_us() -> int:
    # Rounded, not truncated: a clock that computes ns from a float (as
    # freezegun does) is otherwise one µs early.
    return (time.time_ns() + 500) // 1000


class Clock:
    """The table clock, in µs: monotonic, and never behind any last use
    already saved, so recency stays ordered across wall-clock steps and
    restarts; close to UTC so stored times read naturally."""

    def __init__(self, floor: int = 0):
        self._base = max(wall_us(), floor + 1)
        self._mono = time.monotonic_ns()

    def now(self) -> int:
        return self._base + (time.monotonic_ns() - self._mono) // 1000


class LogFile:
    """The event log (PROTOCOL.md §6). Lines reach the OS before the answers
    they describe are sent; SIGHUP reopens the file for logrotate.

    When a write fails (disk full) the file is cut back to its last whole
    line and later lines are not written directly: every CATCH_UP_RETRY a
    task copies them from the history (the event table, in id order) until
    the file has caught up, so it ends equal to ``nat64ho export``.
    """

    #: Seconds between tries to write a failing log file again.
    CATCH_UP_RETRY = 1.0
    #: History rows read per catch-up step.
    CATCH_UP_ROWS = 2000

    def __init__(self, path: str):
        self.path = path
        self._fd = -1
        self._good = 0  # size of the file after the last whole write
        #: Lines committed to the database but not yet in the file.
        self.waiting = 0
        self.store: Store | None = None  #: where catch-up reads the history
        self._behind: tuple | None = None  # key of the first missing event, while behind
        self._after = -1  # id of the last event copied by the catch-up (-1: not known yet)
        self._last: tuple | None = None  # key of the last event committed while behind
        self._task: asyncio.Task | None = None
        self.open()

    def open(self) -> None:
        if self.path == "-":
            return
        Path(self.path).parent.mkdir(mode=0o750, parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        self._good = os.fstat(self._fd).st_size

    def reopen(self) -> None:
        if self.path == "-":
            return
        old = self._fd
        self.open()
        os.close(old)
        log.info("reopened log file %s", self.path)

    def _emit(self, data: str) -> None:
        if self.path == "-":
            sys.stdout.write(data)
            sys.stdout.flush()
            return
        raw = data.encode("ascii")
        view = memoryview(raw)
        try:
            while view:
                view = view[os.write(self._fd, view):]
        except OSError:
            # A part of a line must not stay: the catch-up rewrites it whole.
            try:
                os.ftruncate(self._fd, self._good)
            except OSError:
                pass
            raise
        self._good += len(raw)

    def write(self, events: list[Event]) -> None:
        """Write the lines of ``events``, just committed."""
        if self._behind is not None:
            # Catching up: the order comes from the history, not from here.
            self.waiting += len(events)
            self._last = _event_key(events[-1])
            return
        try:
            self._emit("".join([format_event(e) + "\n" for e in events]))
        except OSError as exc:
            self.waiting += len(events)
            self._behind = _event_key(events[0])
            self._after = -1
            self._last = _event_key(events[-1])
            log.error("cannot write log file %s: %s; its lines wait in the database and are "
                      "copied in order once it can be written", self.path, exc)
            if self.store is not None and self._task is None:
                self._task = asyncio.ensure_future(self._catch_up())

    async def _catch_up(self) -> None:
        store = self.store
        copied = 0
        told = False
        while True:
            await asyncio.sleep(self.CATCH_UP_RETRY)
            try:
                if self._after < 0:
                    first = await store.event_id(self._behind)
                    if first is None:
                        continue  # not found yet: ask again next time
                    self._after = first - 1
                while True:
                    rows = await store.read_events(self._after, self.CATCH_UP_ROWS)
                    lines = []
                    done = False
                    for row in rows:
                        lines.append(format_event(Event(row[1], EventKind(row[2]), *row[3:])) + "\n")
                        if _event_key(row[1:]) == self._last:
                            done = True  # later rows come with their own commit
                            break
                    self._emit("".join(lines))
                    copied += len(lines)
                    self.waiting = max(0, self.waiting - len(lines))
                    if lines:
                        self._after = rows[len(lines) - 1][0]
                    if done or not rows:
                        break
            except OSError:
                continue  # still failing: the error was said once
            except (sqlite3.Error, ValueError, TypeError) as exc:
                if not told:
                    log.error("cannot read the history to catch up log file %s: %s", self.path, exc)
                    told = True
                continue
            # No await since the last row: nothing committed in between.
            self._behind = self._last = None
            self.waiting = 0
            self._task = None
            log.warning("log file %s written again: %d lines caught up from the database",
                        self.path, copied)
            return

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            log.error("log file %s stops %d lines short (they are in the database: "
                      "'nat64ho export' has them)", self.path, self.waiting)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _event_key(e) -> tuple:
    """What identifies an event in the history (its unique index)."""
    return (e[0], int(e[1]), e[2], e[3])


class NatState:
    """What the server knows of one NAT64 beside its table."""

    __slots__ = ("nat", "boot_id", "boot_seq", "cookie", "old_cookie", "table", "create", "loading")

    def __init__(self, nat: int, boot_id: bytes, cookie: bytes, table: NatTable, create: Bucket):
        self.nat = nat
        self.boot_id = boot_id
        self.boot_seq = 0  #: the write batch recording boot_id (0: already on disk)
        self.cookie = cookie
        #: The previous boot's cookie, still accepted until the new one is
        #: used: a HELLO with a spoofed source must not cut the real NAT64 off.
        self.old_cookie: bytes | None = None
        self.table = table
        self.create = create
        self.loading: asyncio.Task | None = None


class Server(asyncio.DatagramProtocol):
    def __init__(self, config: Config, store: Store, logfile: LogFile):
        self.config = config
        self.store = store
        self.logfile = logfile
        logfile.store = store
        self.clock = Clock(store.clock_hwm)
        self.transport: asyncio.DatagramTransport | None = None
        self.nats: dict[int, NatState] = {}
        self.hello_buckets: OrderedDict[int, Bucket] = OrderedDict()
        self.drops: Counter[str] = Counter()
        self.counts: Counter[str] = Counter()
        self.tasks: set[asyncio.Task] = set()
        self.rng = random.Random(os.urandom(32))
        self.min_idle_us = int(config.min_idle * 1_000_000)
        self.cached = 0  # entries held in memory, all NAT64s together
        #: NAT64s welcomed whose first HELLO is not committed yet: counted
        #: against --max-nats, or a burst between two commits would overshoot.
        self.pending_nats: set[int] = set()
        self._bug_quiet_until = 0.0
        self._bugs_suppressed = 0
        self._bad_row_quiet = 0.0
        store.on_commit = self._committed
        self._allow = config.allow

    # ------------------------------------------------------------ socket
    def connection_made(self, transport) -> None:
        self.transport = transport

    def error_received(self, exc: Exception) -> None:
        # ICMP errors for earlier replies (a NAT64 went away): not ours to fix.
        self.counts["icmp_errors"] += 1

    def datagram_received(self, data: bytes, addr) -> None:
        self.counts["datagrams_in"] += 1
        try:
            self._datagram(data, addr)
        except Exception as exc:
            self._drop("internal_error")
            self._bug(f"datagram from {addr[0]} raised", exc)

    def _bug(self, what: str, exc: BaseException) -> None:
        """Log an unexpected error, at most once per BUG_LOG_INTERVAL: a peer
        that keeps triggering one must not flood the journal."""
        now = time.monotonic()
        if now < self._bug_quiet_until:
            self._bugs_suppressed += 1
            return
        more = f" ({self._bugs_suppressed} more since the last report)" if self._bugs_suppressed else ""
        log.error("bug: %s%s", what, more, exc_info=exc)
        self._bugs_suppressed = 0
        self._bug_quiet_until = now + BUG_LOG_INTERVAL

    def _drop(self, reason: str) -> None:
        self.drops[reason] += 1

    def _send(self, units: list[list[bytes]], addr) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        for d in wire.pack(units):
            self.transport.sendto(d, addr)
            self.counts["datagrams_out"] += 1

    def _error(self, code: wire.ErrorCode, offending: int, received: int, addr) -> None:
        # PROTOCOL.md §7: never more octets to an unproven source than it sent.
        if received >= 4:
            self._send([[bytes((wire.Kind.ERROR, 1, code, offending))]], addr)

    # ------------------------------------------------------------ dispatch
    def _datagram(self, data: bytes, addr) -> None:
        nat = _source_ipv4(addr[0])
        if nat is None:
            self._drop("not_ipv4")
            return
        try:
            messages = wire.parse(data)
        except wire.Malformed as exc:
            self._drop(exc.reason)
            return
        first = messages[0]
        kind = type(first)
        if kind is wire.Hello:
            if len(messages) != 1:
                self._drop("hello_not_alone")
                return
            self._hello(nat, first, len(data), addr)
            return
        if kind is not wire.Cookie:
            self._drop("no_cookie")
            self._error(wire.ErrorCode.BAD_COOKIE, data[0], len(data), addr)
            return
        state = self.nats.get(nat) or self._known(nat)
        if state is None or not self._cookie_ok(state, first.cookie):
            self._drop("bad_cookie")
            self._error(wire.ErrorCode.BAD_COOKIE, wire.Kind.COOKIE, len(data), addr)
            return
        body = messages[1:]
        for m in body:
            if type(m) is wire.Cookie or type(m) is wire.Hello:
                self._drop("misplaced_session")
                return
        if not body:
            return
        table = state.table
        if table.loaded and table.needs(body) is None:
            self.counts["cache_hit"] += 1
            self._decide(state, body, addr)
        elif len(self.tasks) >= MAX_INFLIGHT:
            self._drop("overloaded")
        else:
            self.counts["cache_miss"] += 1
            self._spawn(self._slow(state, body, addr))

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            if isinstance(exc, DatabaseDamaged):
                return  # the store said so once, and the server is stopping
            if isinstance(exc, BadRow):
                # One NAT64's row: refuse that datagram, keep serving the rest.
                self._drop("bad_row")
                now = time.monotonic()
                if now >= self._bad_row_quiet:
                    log.error("%s (datagram dropped)", exc)
                    self._bad_row_quiet = now + BUG_LOG_INTERVAL
                return
            if is_damage(exc):
                self.store.damage(exc)
                return
            self._drop("internal_error")
            self._bug("datagram task failed", exc)

    def _decide(self, state: NatState, body: list, addr) -> None:
        store = self.store
        out = state.table.apply(body, self.clock.now(), wall_us(), store.pending_seq,
                                state.create,
                                create_ok=store.failing is None and store.backlog < MAX_BACKLOG)
        if out.created or out.touched or out.events:
            store.add(state.nat, out.created, out.touched, out.events)
        counts = self.counts
        for what, n in out.counts.items():  # Counter.update costs twice this per datagram
            counts[what] += n
        if not out.units:
            return
        if out.wait_seq > store.committed_seq:
            self._send_later(out.wait_seq, out.units, addr)
        else:
            self._send(out.units, addr)

    def _send_later(self, seq: int, units, addr) -> None:
        """Send ``units`` once batch ``seq`` is committed. While a commit is
        stuck (disk full, lock held) a NAT64 retransmits, and each waiting
        answer holds memory: beyond MAX_INFLIGHT the answer is dropped; the
        retransmission after the commit gets the same one."""
        if len(self.tasks) >= MAX_INFLIGHT:
            self._drop("overloaded")
            return
        self._spawn(self._send_after(seq, units, addr))

    async def _send_after(self, seq: int, units, addr) -> None:
        await self.store.wait(seq)
        self._send(units, addr)

    async def _slow(self, state: NatState, body: list, addr) -> None:
        """Read from the database what memory lacks, then decide."""
        table = state.table
        if not table.loaded:
            await self._load(state)
        store = self.store
        absent: set = set()
        after = None
        pages = 0
        table.readers += 1
        try:
            while (needs := table.needs(body, absent)) is not None:
                rows = []
                if needs.endpoints:
                    found = await store.read_endpoints(state.nat, needs.endpoints)
                    rows += found
                    absent.update(set(needs.endpoints) - {(r.addr, r.aport) for r in found})
                if needs.ports:
                    rows += await store.read_ports(state.nat, needs.ports)
                candidates = []
                if needs.victims:
                    if after is None and table.candidates:
                        last = table.candidates[next(reversed(table.candidates))]
                        after = (last.last_use, last.port)
                    candidates = await store.read_oldest(state.nat, needs.victims, after)
                    pages += 1
                    if candidates:
                        after = (candidates[-1].last_use, candidates[-1].port)
                table.feed(rows, candidates)
                if needs.victims and (not candidates or pages >= MAX_VICTIM_PAGES):
                    break  # the database has no more: apply() answers TABLE_FULL
        finally:
            table.readers -= 1
        self._decide(state, body, addr)
        if table.readers == 0 and self.cached > self.config.cache_size:
            # Trimming skips NAT64s with reads in flight; under steady misses
            # that can be most of them at every commit, and the cache grew
            # without bound (150k entries of 100k after 100 s of churn).
            # Only after _decide: the rows just read are then in use, and
            # forgetting one before would make its endpoint look new.
            self._trim(self.cached - self.config.cache_size)

    async def _load(self, state: NatState) -> None:
        if state.loading is None:
            state.loading = asyncio.ensure_future(self._load_table(state))
        await asyncio.shield(state.loading)

    async def _load_table(self, state: NatState) -> None:
        ports, total = await self.store.load_table(state.nat)
        state.table.load(ports, total)

    # ------------------------------------------------------------ session
    def _cookie(self, nat: int, boot_id: bytes) -> bytes:
        return hmac.new(self.store.secret, nat.to_bytes(4, "big") + boot_id,
                        hashlib.sha256).digest()[:8]

    @staticmethod
    def _cookie_ok(state: NatState, cookie: bytes) -> bool:
        if hmac.compare_digest(state.cookie, cookie):
            state.old_cookie = None
            return True
        return state.old_cookie is not None and hmac.compare_digest(state.old_cookie, cookie)

    def _new_state(self, nat: int, boot_id: bytes) -> NatState:
        table = NatTable(nat, self.config.first_port, self.config.last_port,
                         min_idle=self.min_idle_us, rng=random.Random(self.rng.getrandbits(128)))
        state = NatState(nat, boot_id, self._cookie(nat, boot_id), table,
                         Bucket(self.config.create_rate, self.clock.now()))
        self.nats[nat] = state
        return state

    def _known(self, nat: int) -> NatState | None:
        """State for a NAT64 that said HELLO before this server started."""
        record = self.store.nats.get(nat)
        if record is None:
            return None
        return self._new_state(nat, record.boot_id)

    def _allowed(self, nat: int) -> bool:
        if not self._allow:
            return True
        ip = ipaddress.IPv4Address(nat)
        return any(ip in net for net in self._allow)

    def _hello(self, nat: int, hello: wire.Hello, received: int, addr) -> None:
        self.counts["hellos"] += 1
        if not self._allowed(nat):
            self._drop("not_allowed")
            self._error(wire.ErrorCode.NOT_ALLOWED, wire.Kind.HELLO, received, addr)
            return
        now = self.clock.now()
        bucket = self.hello_buckets.get(nat)
        if bucket is None:
            bucket = self.hello_buckets[nat] = Bucket(self.config.hello_rate, now)
            if len(self.hello_buckets) > MAX_HELLO_SOURCES:
                self.hello_buckets.popitem(last=False)
        if not bucket.take(now):
            self._drop("hello_rate")
            self._error(wire.ErrorCode.RATE_LIMITED, wire.Kind.HELLO, received, addr)
            return
        if hello.version != wire.VERSION:
            self._drop("bad_version")
            self._error(wire.ErrorCode.BAD_VERSION, wire.Kind.HELLO, received, addr)
            return
        state = self.nats.get(nat) or self._known(nat)
        if state is None:
            if len(self.store.nats) + len(self.pending_nats) >= self.config.max_nats:
                self._drop("too_many_nats")
                self._error(wire.ErrorCode.NOT_ALLOWED, wire.Kind.HELLO, received, addr)
                return
            state = self._new_state(nat, hello.boot_id)
            self.pending_nats.add(nat)
            new_boot = True
        else:
            new_boot = state.boot_id != hello.boot_id
        wall = wall_us()
        if new_boot:
            # A NAT64 (re)start: logged once, even if the HELLO is repeated
            # before the commit; the WELCOME waits for that commit.
            state.boot_id = hello.boot_id
            state.old_cookie = state.cookie
            state.cookie = self._cookie(nat, hello.boot_id)
            self.store.add_hello(nat, hello.boot_id, wall, Event(wall, EventKind.INITIALIZED, nat))
            state.boot_seq = self.store.pending_seq
        else:
            self.store.add_hello(nat, hello.boot_id, wall, None)
        welcome = [[wire.encode(wire.Welcome(self.config.first_port, self.config.last_port,
                                             state.cookie, hello.boot_id))]]
        if state.boot_seq > self.store.committed_seq:
            self._send_later(state.boot_seq, welcome, addr)
        else:
            self._send(welcome, addr)

    # ------------------------------------------------------------ commits
    #: IPFIX export of committed events (serve --ipfix); None: off.
    ipfix: Exporter | None = None

    def _committed(self, batch: Batch) -> None:
        if self.pending_nats:
            self.pending_nats.difference_update(batch.nats)
        if batch.events:
            self.logfile.write(batch.events)
            if self.ipfix is not None:
                self.ipfix.export(batch.events)
            for kind, n in Counter(e.kind for e in batch.events).items():
                self.counts[_EVENT_COUNTS[kind]] += n
        self.cached = sum(len(s.table.by_port) for s in self.nats.values())
        if self.cached > self.config.cache_size:
            self._trim(self.cached - self.config.cache_size)

    def _trim(self, excess: int) -> None:
        """Forget the least recently used entries of all NAT64s until the
        cache fits; entries not yet durable (or whose recency is unsaved) stay."""
        committed = self.store.committed_seq
        heap = []
        for s in self.nats.values():
            t = s.table
            if t.by_port and t.readers == 0:
                heap.append((t.by_port[next(iter(t.by_port))].last_use, s.nat))
        heapq.heapify(heap)
        unsaved = False
        while excess > 0 and heap:
            _, nat = heapq.heappop(heap)
            t = self.nats[nat].table
            e = t.by_port[next(iter(t.by_port))]
            if e.seq > committed or e.dirty:
                unsaved = True
                continue
            t.forget(e)
            excess -= 1
            self.cached -= 1
            if t.by_port:
                heapq.heappush(heap, (t.by_port[next(iter(t.by_port))].last_use, nat))
        if unsaved:
            self.store.flush_recency_soon()

    # ------------------------------------------------------------ reports
    def summary(self) -> str:
        drops = ", ".join(f"{k}={v}" for k, v in sorted(self.drops.items())) or "none"
        return (f"{self.counts['datagrams_in']} datagrams in, {self.counts['datagrams_out']} out, "
                f"{self.counts['created']} created, {self.counts['deleted']} deleted; drops: {drops}")


def _source_ipv4(host: str) -> int | None:
    try:
        # Every datagram comes through here; on an IPv4 socket the kernel's
        # dotted quad converts 10x faster this way than through ipaddress.
        return int.from_bytes(socket.inet_pton(socket.AF_INET, host), "big")
    except OSError:
        pass
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if ip.version == 6:
        ip = ip.ipv4_mapped
        if ip is None:
            return None
    return int(ip)


class ListenError(OSError):
    """The UDP socket could not be bound; the message says where and why."""


def _bind(host: str, port: int) -> socket.socket:
    # Bound here rather than by the event loop, whose errors (uvloop's in
    # particular) do not say why a bind failed.
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    try:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
        except OSError:
            pass
        if sock.family == socket.AF_INET6:
            # Only [::] gets here (the CLI refuses other IPv6 addresses): it
            # serves IPv4 NAT64s, which arrive as ::ffff:a.b.c.d.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ListenError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.setblocking(False)
    return sock


def _sd_notify(message: str) -> None:
    """Tell systemd (Type=notify) about our state; a no-op outside systemd."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(path)
            s.sendall(message.encode())
    except OSError as exc:
        log.warning("cannot notify systemd: %s", exc)


async def _watchdog(interval: float) -> None:
    while True:
        _sd_notify("WATCHDOG=1")
        await asyncio.sleep(interval)


async def _prune(store: Store, days: float) -> None:
    while True:
        before = wall_us() - int(days * 86400 * 1_000_000)
        n = await store.prune(before)
        if n:
            log.info("pruned %d history events older than %g days", n, days)
        await asyncio.sleep(PRUNE_INTERVAL)


class NotCommitted(DatabaseError):
    """A stop gave up on changes whose commits kept failing."""


def _new_dirs(path: Path) -> list[Path]:
    """The ancestors of ``path`` that do not exist yet, outermost first."""
    missing = []
    for parent in path.parents:
        if parent.exists():
            break
        missing.append(parent)
    return missing[::-1]


def _made_private(dirs: list[Path], files: list[Path]) -> None:
    """Tighten what this start created, whatever umask it ran under: the
    database holds the cookie secret, the log holds who used which port."""
    for d in dirs:
        try:
            os.chmod(d, 0o750)
        except OSError:
            pass
    for f in files:
        try:
            mode = os.stat(f).st_mode & 0o777
            if mode & ~0o640:
                os.chmod(f, mode & 0o640)
        except OSError:
            pass


async def _take_table(config: Config, stop: asyncio.Event):
    """Own the table of ``config.db`` (see nat64ho.owner); with ``standby``
    wait for it, or for a stop. Returns None when stopped while waiting."""
    from nat64ho import owner

    told = False
    while True:
        try:
            return owner.acquire(config.db, what="serve")
        except owner.TableOwned as exc:
            if not config.standby or getattr(exc, "holder", None) is None:
                raise
            if not told:
                log.info("standby: %s is owned by %s; waiting to take over", config.db,
                         exc.holder)
                _sd_notify(f"STATUS=standby, waiting for {exc.holder} to release {config.db}")
                told = True
        try:
            await asyncio.wait_for(stop.wait(), STANDBY_POLL)
            return None
        except asyncio.TimeoutError:
            pass


async def serve(config: Config, ready: asyncio.Future | None = None) -> Server | None:
    """Run until SIGTERM/SIGINT; returns the server after a clean stop (None
    when stopped before it served, in standby)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    hurry = asyncio.Event()

    def on_signal() -> None:
        if stop.is_set() and not hurry.is_set():
            hurry.set()
            log.warning("second signal: giving up on commits that fail")
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    try:
        return await _serve(config, ready, stop, hurry)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)


async def _serve(config: Config, ready, stop: asyncio.Event, hurry: asyncio.Event):
    db = Path(config.db)
    created_dirs = _new_dirs(db)
    log_path = Path(config.log_file) if config.log_file != "-" else None
    if log_path is not None:
        created_dirs += [d for d in _new_dirs(log_path) if d not in created_dirs]
    if created_dirs:
        db.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
    candidates = [db, Path(f"{db}-wal"), Path(f"{db}-shm"), Path(f"{db}.lock")]
    if log_path is not None:
        candidates.append(log_path)
    created = [f for f in candidates if not f.exists()]
    ownership = await _take_table(config, stop)
    if ownership is None:
        log.info("stopped while in standby")
        return None
    try:
        return await _serve_owned(config, ready, stop, hurry, created_dirs, created)
    finally:
        ownership.release()


async def _serve_owned(config: Config, ready, stop, hurry, created_dirs, created):
    loop = asyncio.get_running_loop()
    store = await Store.open(config.db, sync=config.sync)
    try:
        # Read commands (stats) take the table size from here.
        await store.set_meta("ports", f"{config.first_port}-{config.last_port}")
    except sqlite3.Error as exc:
        log.warning("cannot record the port range in %s: %s", config.db, exc)
    try:
        logfile = LogFile(config.log_file)
    except OSError:
        await store.close()
        raise
    _made_private(created_dirs, created)
    server = Server(config, store, logfile)
    store.on_damage = lambda why: stop.set()
    try:
        transport, _ = await loop.create_datagram_endpoint(
            lambda: server, sock=_bind(config.host, config.port))
    except BaseException:
        await store.close()
        logfile.close()
        raise
    helpers = []
    loop.add_signal_handler(signal.SIGHUP, logfile.reopen)
    sockname = transport.get_extra_info("sockname")
    log.info("listening on %s:%d, database %s, log %s, ports %d-%d",
             sockname[0], sockname[1], config.db, config.log_file, config.first_port,
             config.last_port)
    watchdog_usec = int(os.environ.get("WATCHDOG_USEC", "0") or 0)
    if watchdog_usec > 0:
        helpers.append(asyncio.ensure_future(_watchdog(watchdog_usec / 2e6)))
    if config.keep_history_days is not None:
        helpers.append(asyncio.ensure_future(_prune(store, config.keep_history_days)))
    metrics = None
    if config.metrics is not None:
        from nat64ho.metrics import Metrics
        metrics = Metrics(server)
        try:
            where = await metrics.start(*config.metrics)
        except OSError:
            transport.close()
            await store.close()
            logfile.close()
            raise
        log.info("metrics on http://%s:%d/metrics", where[0], where[1])
    if config.ipfix:
        exporter = Exporter(config.ipfix, config.ipfix_domain)
        try:
            exporter.start()
        except OSError:
            transport.close()
            if metrics is not None:
                await metrics.stop()
            await store.close()
            logfile.close()
            raise
        server.ipfix = exporter
        log.info("IPFIX export to %s, observation domain %d",
                 ", ".join(c.name for c in exporter.collectors), config.ipfix_domain)
    _sd_notify(f"READY=1\nSTATUS=listening on {sockname[0]}:{sockname[1]}")
    if ready is not None and not ready.done():
        ready.set_result(sockname)
    unsaved = 0
    try:
        await stop.wait()
    finally:
        _sd_notify("STOPPING=1")
        log.info("stopping: committing what is in flight")
        transport.close()
        if server.tasks:
            # Answers that wait for a failing commit would wait in vain.
            waiting = asyncio.ensure_future(asyncio.wait(list(server.tasks), timeout=STOP_GRACE))
            while not waiting.done():
                await asyncio.wait([waiting], timeout=0.1)
                if store.failing is not None or hurry.is_set():
                    waiting.cancel()
                    break
        for h in helpers:
            h.cancel()
        if metrics is not None:
            await metrics.stop()
        unsaved = await store.close(hurry)
        if server.ipfix is not None:
            server.ipfix.close()
        logfile.close()
        log.info("stopped: %s", server.summary())
    if store.damaged is not None:
        raise NotOurDatabase(f"{store.damaged}; run 'nat64ho check --db {config.db}'")
    if unsaved:
        why = store.failing or "a second signal came first"
        raise NotCommitted(f"{config.db}: stopped with {unsaved} changes not committed ({why}); "
                           "none of them was acknowledged to a NAT64")
    return server


def run(config: Config) -> None:
    """Blocking entry point for ``nat64ho serve``."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="nat64ho: %(levelname)s: %(message)s")
    # Nothing serve creates is for other users, whatever umask it inherits.
    os.umask(0o027)
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(config))
    else:
        uvloop.run(serve(config))
