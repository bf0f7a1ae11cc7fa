"""The UDP server: sockets, clocks, the log file, signals, and the dispatch
that joins the codec, the per-NAT64 tables and the store.

A datagram is parsed whole, checked (source, cookie, rates), decided by its
NAT64's table, and answered; answers that announce something not yet durable
wait for their commit. Nothing a peer sends raises out of
:meth:`Server.datagram_received`: every drop is counted under a named reason.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import random
import signal
import socket
import sqlite3
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from nat64ho.core import wire
from nat64ho.core.records import Event, EventClock, EventKind
from nat64ho.eventlog import format_event
from nat64ho.ipfix_udp import Exporter
from nat64ho.storage.schema import BadRow, DatabaseError, NotOurDatabase
from nat64ho.core.session import DEFAULT_COOKIE_LIFETIME, Confirmation, Refused, Sessions
from nat64ho.storage.base import Committed, Storage
from nat64ho.storage.sqlite import DatabaseDamaged, Store, is_damage
from nat64ho.core.tables import NatState, Tables

log = logging.getLogger("nat64ho")

#: Kernel receive buffer asked for: a burst from a busy NAT64 waits here
#: rather than being dropped while a commit runs.
RCVBUF = 4 * 1024 * 1024
#: Datagrams waiting on database reads or commits at once, all NAT64s
#: together; beyond this new work is dropped ("overloaded") so memory stays
#: bounded. The last guard: each NAT64's own share (below) comes first.
MAX_INFLIGHT = 8192
#: Rows waiting to be committed beyond which new entries are refused (no
#: answer; the NAT64 retries): a full or stuck disk must not grow memory
#: without bound.
MAX_BACKLOG = 200_000
#: A NAT64's share (PROTOCOL.md §7): its datagrams waiting for reads, its
#: answers waiting for a commit, its rows waiting to be committed. Beyond
#: them its requests get ERROR RATE_LIMITED; the other NAT64s go on. Each
#: is far above what one NAT64 needs at its request rate while commits take
#: their usual milliseconds, and a small part of the server-wide bound.
MAX_NAT_QUEUE = 512
MAX_NAT_WAITING = 1024
MAX_NAT_BACKLOG = 20_000
#: Datagrams read for at once (of different NAT64s: each NAT64's datagrams
#: are decided in arrival order). More keeps the reader thread busy while
#: the event loop decides; the reads themselves run one at a time.
READERS = 4
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
    #: New entries per second per NAT64. At 1,000/s a full 64508-port table
    #: turns over in 65 s, under the 2-minute least lifetime RFC 4787 REQ-5
    #: asks of a UDP mapping: a NAT64 creating faster keeps nothing alive.
    create_rate: float = 1000.0
    #: Request messages (MAP, LOOKUP, TOUCH) per second per NAT64.
    request_rate: float = 10_000.0
    cookie_lifetime: int = DEFAULT_COOKIE_LIFETIME
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
        self.store: Storage | None = None  #: where catch-up reads the history
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


class Server(asyncio.DatagramProtocol):
    def __init__(self, config: Config, store: Storage, logfile: LogFile):
        self.config = config
        self.store = store
        self.logfile = logfile
        logfile.store = store
        self.clock = Clock(store.clock_hwm)
        self.events = EventClock(store.last_event_ts)
        self.sessions = Sessions(
            store.secret, first_port=config.first_port, last_port=config.last_port,
            allow=config.allow, hello_rate=config.hello_rate, max_nats=config.max_nats,
            cookie_lifetime=config.cookie_lifetime,
            known={nat: r.boot_id for nat, r in store.nats.items()})
        self.transport: asyncio.DatagramTransport | None = None
        self.drops: Counter[str] = Counter()
        self.counts: Counter[str] = Counter()
        self.tasks: set[asyncio.Task] = set()
        self.tables = Tables(
            config.first_port, config.last_port, min_idle_us=int(config.min_idle * 1_000_000),
            create_rate=config.create_rate, request_rate=config.request_rate,
            cache_size=config.cache_size, rng=random.Random(os.urandom(32)))
        #: Loads of NAT64 tables in flight, shared by the datagrams that need them.
        self._loading: dict[int, asyncio.Task] = {}
        self.waiting = 0  #: datagrams whose answers wait for a commit, all NAT64s
        self._bug_quiet_until = 0.0
        self._bugs_suppressed = 0
        self._bad_row_quiet = 0.0
        #: Histograms of commit sizes and times (serve --metrics); None: off.
        self.metrics = None
        self._commits = asyncio.ensure_future(self._take_commits())

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

    def _refused(self, verdict: Refused, addr) -> None:
        self._drop(verdict.reason)
        if verdict.answer is not None:
            self._send([[verdict.answer]], addr)

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
        sessions = self.sessions
        if kind is wire.Hello:
            if len(messages) != 1:
                self._drop("hello_not_alone")
                return
            self.counts["hellos"] += 1
            verdict = sessions.hello(nat, first, len(data), self.clock.now(), wall_us())
            if type(verdict) is Refused:
                self._refused(verdict, addr)
            else:
                self._send([[verdict.answer]], addr)
            return
        if kind is not wire.Cookie:
            self._refused(sessions.no_cookie(data[0], len(data)), addr)
            return
        body = messages[1:]
        for m in body:
            if type(m) is wire.Cookie or type(m) is wire.Hello:
                self._drop("misplaced_session")
                return
        opened = sessions.open(nat, first.cookie, len(data), wall_us())
        if type(opened) is Refused:
            self._refused(opened, addr)
            return
        confirmation = opened.confirmation
        state = self.tables.state(nat, self.clock.now())
        if not body:
            if confirmation is not None:
                self._record_boot(confirmation)
            return
        share = state.share
        now = self.clock.now()
        if not share.requests.spend(len(body), now):
            self._limited(state, body, "request_rate", addr, confirmation)
            return
        if share.waiting >= MAX_NAT_WAITING:
            self._limited(state, body, "nat_waiting", addr, confirmation)
            return
        tables = self.tables
        if tables.hit(state, body):
            self.counts["cache_hit"] += 1
            self._decide(state, body, addr, confirmation)
        elif share.queued >= MAX_NAT_QUEUE:
            self._limited(state, body, "nat_reads", addr, confirmation)
        elif tables.queued + self.waiting >= MAX_INFLIGHT:
            if confirmation is not None:
                self._record_boot(confirmation)
            self._drop("overloaded")
        else:
            self.counts["cache_miss"] += 1
            tables.enqueue(state, (body, addr, confirmation))
            self._read_next()

    def _limited(self, state: NatState, body: list, reason: str, addr,
                 confirmation: Confirmation | None) -> None:
        """Refuse a datagram over its NAT64's share whole (§7): ERROR
        RATE_LIMITED for each request while the NAT64's error budget lasts."""
        if confirmation is not None:
            self._record_boot(confirmation)
        self._drop(reason)
        self.counts[f"limited_{reason}"] += 1
        if state.share.errors.take(self.clock.now()):
            units = [[_RATE_LIMITED[type(m)]] for m in body if type(m) in _RATE_LIMITED]
            if units:
                self._send(units, addr)

    def _record_boot(self, c: Confirmation) -> None:
        """A confirmed boot joins the next commit: recorded, and logged as
        ``Initialized`` when its boot id is new (PROTOCOL.md §4.4)."""
        wall = wall_us()
        event = None
        if c.initialized:
            event = Event(self.events.stamp(wall), EventKind.INITIALIZED, c.nat)
        self.store.add_boot(c.nat, c.boot_id, wall, event)

    def _decide(self, state: NatState, body: list, addr,
                confirmation: Confirmation | None = None) -> None:
        store = self.store
        share = state.share
        if confirmation is not None:
            self._record_boot(confirmation)
        out = self.tables.decide(state, body, self.clock.now(),
                                 partial(self.events.stamp, wall_us()), store.pending_seq,
                                 create_ok=store.failing is None and store.backlog < MAX_BACKLOG,
                                 share_ok=share.backlog < MAX_NAT_BACKLOG)
        if out.created or out.touched or out.events:
            share.backlog += store.add(state.nat, out.created, out.touched, out.events)
        counts = self.counts
        for what, n in out.counts.items():  # Counter.update costs twice this per datagram
            counts[what] += n
        if not out.units:
            return
        if out.wait_seq > store.committed_seq:
            # A commit that is stuck (disk full, lock held) meets
            # retransmissions: beyond MAX_INFLIGHT the answer is dropped, and
            # the retransmission after the commit gets the same one.
            if self.tables.queued + self.waiting >= MAX_INFLIGHT:
                self._drop("overloaded")
                return
            store.answer_after(out.wait_seq, state.nat, out.units, addr)
            share.waiting += 1
            self.waiting += 1
        else:
            self._send(out.units, addr)

    # ------------------------------------------------------------ reads
    def _read_next(self) -> None:
        """Start reads for the NAT64s next in turn, up to READERS at once."""
        while len(self.tasks) < READERS and (turn := self.tables.next_ready()) is not None:
            task = asyncio.ensure_future(self._read_one(*turn))
            self.tasks.add(task)
            task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._read_failed(task.exception())
        self._read_next()

    def _read_failed(self, exc: BaseException) -> None:
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
        self._bug("datagram read failed", exc)

    async def _read_one(self, state: NatState, item: tuple) -> None:
        """Decide a waiting datagram of ``state``, after reading what memory
        lacks; then give the NAT64 back its turn."""
        body, addr, confirmation = item
        try:
            await self._read_for(state, body)
            self._decide(state, body, addr, confirmation)
        finally:
            self.tables.turn_done(state)
        if state.table.readers == 0 and self.tables.excess > 0:
            # Trimming skips NAT64s with reads in flight; under steady misses
            # that can be most of them at every commit, and the cache grew
            # without bound (150k entries of 100k after 100 s of churn).
            # Only after _decide: the rows just read are then in use, and
            # forgetting one before would make its endpoint look new.
            self._trim()

    async def _read_for(self, state: NatState, body: list) -> None:
        """Read from the database what memory lacks to decide ``body``."""
        if not state.table.loaded:
            await self._load(state)
        store = self.store
        nat = state.nat
        reading = self.tables.reading(state, body)
        try:
            while (needs := reading.next()) is not None:
                rows = []
                if needs.endpoints:
                    rows += await store.read_endpoints(nat, needs.endpoints)
                if needs.ports:
                    rows += await store.read_ports(nat, needs.ports)
                candidates = []
                if needs.victims:
                    candidates = await store.read_oldest(nat, needs.victims, reading.after)
                reading.fill(rows, candidates)
        finally:
            reading.close()

    async def _load(self, state: NatState) -> None:
        task = self._loading.get(state.nat)
        if task is None:
            task = self._loading[state.nat] = asyncio.ensure_future(self._load_table(state))
        await asyncio.shield(task)

    async def _load_table(self, state: NatState) -> None:
        ports, total = await self.store.load_table(state.nat)
        state.table.load(ports, total)

    async def drain(self, timeout: float, give_up=lambda: False) -> None:
        """Decide the datagrams waiting for reads, for at most ``timeout`` s,
        checking ``give_up()`` (answers that wait for a failing commit would
        wait in vain) every tenth of a second."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.tasks and not give_up() and (left := deadline - loop.time()) > 0:
            await asyncio.wait(list(self.tasks), timeout=min(left, 0.1))

    # ------------------------------------------------------------ commits
    #: IPFIX export of committed events (serve --ipfix); None: off.
    ipfix: Exporter | None = None

    async def _take_commits(self) -> None:
        """Act on each commit of the store, in order, until it closes."""
        try:
            async for batch in self.store.commits():
                try:
                    self._committed(batch)
                except Exception as exc:
                    self._bug("acting on a commit raised", exc)
        except DatabaseDamaged:
            pass  # the store said so, and the server is stopping

    def _committed(self, batch: Committed) -> None:
        if self.metrics is not None:
            self.metrics.observe_commit(batch.rows, batch.seconds)
        if batch.recency:
            self.tables.saved(batch.recency)
        if batch.events:
            self.logfile.write(batch.events)
            if self.ipfix is not None:
                self.ipfix.export(batch.events)
            for kind, n in Counter(e.kind for e in batch.events).items():
                self.counts[_EVENT_COUNTS[kind]] += n
        self.tables.committed(batch.rows_by_nat, [nat for nat, _, _ in batch.answers])
        if batch.answers:
            send = self._send
            for _, units, addr in batch.answers:
                send(units, addr)
            self.waiting -= len(batch.answers)
        if self.tables.excess > 0:
            self._trim()

    def _trim(self) -> None:
        if self.tables.trim(self.store.committed_seq):
            self.store.flush_recency_soon()

    # ------------------------------------------------------------ reports
    def summary(self) -> str:
        drops = ", ".join(f"{k}={v}" for k, v in sorted(self.drops.items())) or "none"
        return (f"{self.counts['datagrams_in']} datagrams in, {self.counts['datagrams_out']} out, "
                f"{self.counts['created']} created, {self.counts['deleted']} deleted; drops: {drops}")


#: The answer to a request refused over its NAT64's share, by message type.
_RATE_LIMITED = {cls: wire.encode(wire.Error(wire.ErrorCode.RATE_LIMITED, kind))
                 for cls, kind in ((wire.Map, wire.Kind.MAP), (wire.Lookup, wire.Kind.LOOKUP),
                                   (wire.Touch, wire.Kind.TOUCH))}


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


async def _prune(store: Storage, days: float) -> None:
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
    """Own the table of ``config.db`` (see nat64ho.storage.owner); with ``standby``
    wait for it, or for a stop. Returns None when stopped while waiting."""
    from nat64ho.storage import owner

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
    damage = asyncio.ensure_future(store.damage_found.wait())
    damage.add_done_callback(lambda _: stop.set())
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
        server.metrics = metrics
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
        await server.drain(STOP_GRACE, give_up=lambda: store.failing is not None or hurry.is_set())
        for h in helpers:
            h.cancel()
        if metrics is not None:
            await metrics.stop()
        unsaved = await store.close(hurry)
        damage.cancel()
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
