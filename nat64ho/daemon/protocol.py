"""The datagram side of the server: an asyncio DatagramProtocol that joins
the codec, the session rules, the tables (all in :mod:`nat64ho.core`) and
storage.

A datagram's first message is checked (source, cookie) and the datagram
checked against its NAT64's share before it is parsed whole
(docs/protocol.md §2); then it is decided by its NAT64's table and
answered; answers that announce something not yet durable wait for their
commit. Nothing a peer sends raises out of
:meth:`Server.datagram_received`: every drop is counted under a named reason.
Clocks come in (:class:`nat64ho.daemon.clock.SystemClock` by default).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import random
import socket
from collections import Counter
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, cast

from nat64ho.core import wire
from nat64ho.core.counters import LIMITED, Count, Drop
from nat64ho.core.records import Event, EventClock, EventKind
from nat64ho.core.session import Confirmation, Refused, Sessions
from nat64ho.core.tables import NatState, Tables, Waiting
from nat64ho.daemon.clock import Clock, SystemClock
from nat64ho.daemon.config import Config
from nat64ho.daemon.ipfix_export import Exporter
from nat64ho.daemon.logfile import LogFile
from nat64ho.errors import BadRow, DatabaseDamaged, Fault
from nat64ho.storage.base import Committed, Storage

if TYPE_CHECKING:
    from nat64ho.daemon.http import HttpServer
    from nat64ho.daemon.metrics import Metrics

log = logging.getLogger("nat64ho")
#: A NAT64's address as the socket gives it (the core's Waiting has it so).
Address = tuple[str, int]

#: Datagrams waiting on database reads or commits at once, all NAT64s
#: together; beyond this new work is dropped ("overloaded") so memory stays
#: bounded. The last guard: each NAT64's own share (below) comes first.
MAX_INFLIGHT = 8192
#: Rows waiting to be committed beyond which new entries are refused (no
#: answer; the NAT64 retries): a full or stuck disk must not grow memory
#: without bound.
MAX_BACKLOG = 200_000
#: A NAT64's share (docs/protocol.md §7): its datagrams waiting for reads, its
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
#: Source addresses whose conversion is remembered; beyond, the memory
#: starts over.
MAX_SOURCES = 4096
#: The meta key of the start (UTC seconds) of the highest cookie epoch
#: issued (§4.6): a time, not an epoch number, so that it still means the
#: same after --cookie-lifetime changes.
EPOCH_KEY = "cookie_epoch_start"
#: Shortest interval between two reports of unexpected errors in the log;
#: the ones between are counted (metric "internal_error") and summed up.
BUG_LOG_INTERVAL = 60.0

# Counted per datagram: plain strings, as an enum member costs 0.2 µs more
# to fetch and hash (nat64ho.core.counters still names and exports them).
_DATAGRAMS_IN = Count.DATAGRAMS_IN.value
_DATAGRAMS_OUT = Count.DATAGRAMS_OUT.value
_CACHE_HIT = Count.CACHE_HIT.value
_CACHE_MISS = Count.CACHE_MISS.value
_LIMITED_REQUEST_RATE = Count.LIMITED_REQUEST_RATE.value
_REQUEST_RATE = Drop.REQUEST_RATE.value
#: A datagram holding one HELLO; one holding a COOKIE and then a HELLO.
_HELLO_SIZE = 26
_CONFIRM_SIZE = 36


class Server(asyncio.DatagramProtocol):
    def __init__(
        self,
        config: Config,
        store: Storage,
        logfile: LogFile,
        clock: Clock | None = None,
        *,
        ipfix: Exporter | None = None,
        http: Sequence[HttpServer] = (),
    ):
        self.config = config
        self.store = store
        self.logfile = logfile
        #: IPFIX export of committed events (serve --ipfix); None: off.
        self.ipfix = ipfix
        #: now() (table clock, µs), wall() (UTC, µs), monotonic() (s).
        self.clock = clock if clock is not None else SystemClock(store.clock_hwm)
        self.events = EventClock(store.last_event_ts, config.workers, config.worker or 0)
        events, clock_ = self.events, self.clock
        #: An event's time: the wall clock read only when a datagram makes one.
        self._stamp = lambda: events.stamp(clock_.wall())
        self._epoch_task: asyncio.Future[None] | None = None
        kept_epoch = int(cast("str | int", store.meta.get(EPOCH_KEY, 0)))
        self.sessions = Sessions(
            store.secret,
            first_port=config.first_port,
            last_port=config.last_port,
            allow=config.allow,
            hello_rate=config.hello_rate,
            max_nats=config.max_nats,
            cookie_lifetime=config.cookie_lifetime,
            known={nat: r.boot_id for nat, r in store.nats.items()},
            epoch_floor=kept_epoch // config.cookie_lifetime,
            on_epoch=self._keep_epoch,
            rng=random.Random(os.urandom(32)),
            now=self.clock.now(),
        )
        self.transport: asyncio.DatagramTransport | None = None
        #: By the names of nat64ho.core.counters (metrics export each one).
        self.drops: Counter[str] = Counter()
        self.counts: Counter[str] = Counter()
        self.tasks: set[asyncio.Task[None]] = set()
        self.tables = Tables(
            config.first_port,
            config.last_port,
            min_idle_us=int(config.min_idle * 1_000_000),
            create_rate=config.create_rate,
            request_rate=config.request_rate,
            cache_size=config.cache_size,
            rng=random.Random(os.urandom(32)),
        )
        #: Loads of NAT64 tables in flight, shared by the datagrams that need them.
        self._loading: dict[int, asyncio.Task[None]] = {}
        #: Answers that announce what is not yet durable, by the sequence
        #: number of the commit they wait for: (NAT64, encoded units, address).
        self._held: dict[int, list[tuple[int, list[list[bytes]], Address]]] = {}
        self.waiting = 0  #: datagrams whose answers wait for a commit, all NAT64s
        #: Source address text -> IPv4 as an int (None: not IPv4).
        self._sources: dict[str, int | None] = {}
        self._bug_quiet_until = 0.0
        self._bugs_suppressed = 0
        self._bad_row_quiet = 0.0
        #: Histograms of commit sizes and times (serve --metrics); None: off.
        self.metrics: Metrics | None = None
        if config.metrics is not None:
            from nat64ho.daemon.metrics import Metrics

            self.metrics = Metrics(self, http)
        self._commits = asyncio.ensure_future(self._take_commits())

    def _keep_epoch(self, epoch: int) -> None:
        """Keep the highest epoch issued with the table (§4.6): a restart
        with the clock behind goes on as of it. Once per epoch; a write
        that fails is tried again at the next start of an epoch."""
        start = epoch * self.config.cookie_lifetime
        task = asyncio.ensure_future(self.store.set_meta(EPOCH_KEY, start))
        self._epoch_task = task
        task.add_done_callback(self._epoch_kept)

    def _epoch_kept(self, task: asyncio.Future[None]) -> None:
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.warning("could not keep the cookie epoch in the database: %s", exc)

    # ------------------------------------------------------------ socket
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def error_received(self, exc: Exception) -> None:
        # ICMP errors for earlier replies (a NAT64 went away): not ours to fix.
        self.counts[Count.ICMP_ERRORS] += 1

    def datagram_received(self, data: bytes, addr: Address) -> None:
        self.counts[_DATAGRAMS_IN] += 1
        try:
            self._datagram(data, addr)
        except Exception as exc:
            self._drop(Drop.INTERNAL_ERROR)
            self._bug(f"datagram from {addr[0]} raised", exc)

    def _bug(self, what: str, exc: BaseException) -> None:
        """Log an unexpected error, at most once per BUG_LOG_INTERVAL: a peer
        that keeps triggering one must not flood the journal."""
        now = self.clock.monotonic()
        if now < self._bug_quiet_until:
            self._bugs_suppressed += 1
            return
        more = (
            f" ({self._bugs_suppressed} more since the last report)"
            if self._bugs_suppressed
            else ""
        )
        log.error("bug: %s%s", what, more, exc_info=exc)
        self._bugs_suppressed = 0
        self._bug_quiet_until = now + BUG_LOG_INTERVAL

    def _drop(self, reason: Drop | str) -> None:
        self.drops[reason] += 1

    def _send(self, units: list[list[bytes]], addr: Address) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        if len(units) == 1 and len(units[0]) == 1:  # most answers: one message
            self.transport.sendto(units[0][0], addr)
            self.counts[_DATAGRAMS_OUT] += 1
            return
        for d in wire.pack(units):
            self.transport.sendto(d, addr)
            self.counts[_DATAGRAMS_OUT] += 1

    def _refused(self, verdict: Refused, addr: Address) -> None:
        self._drop(verdict.reason)
        if verdict.answer is not None:
            self._send([[verdict.answer]], addr)

    # ------------------------------------------------------------ dispatch
    def _datagram(self, data: bytes, addr: Address) -> None:
        host = addr[0]
        try:
            nat = self._sources[host]  # None is remembered too: not IPv4
        except KeyError:
            nat = _source_ipv4(host)
            if len(self._sources) >= MAX_SOURCES:
                self._sources.clear()  # forged sources must not grow it
            self._sources[host] = nat
        if nat is None:
            self._drop(Drop.NOT_IPV4)
            return
        size = len(data)
        if size >= 10 and data[0] == 0x30 and data[1] == 4:
            self._opened(nat, data, size, addr)
            return
        # Not opened by a COOKIE: only the first message is looked at (§2).
        try:
            first = wire.head(data)
        except wire.Malformed as exc:
            self._drop(exc.reason)
            return
        if first != wire.Kind.HELLO:
            self._refused(self.sessions.no_cookie(first, size), addr)
            return
        if size != _HELLO_SIZE:
            self._drop(Drop.HELLO_NOT_ALONE)
            return
        self.counts[Count.HELLOS] += 1
        clock = self.clock
        hello = cast(wire.Hello, wire.parse(data)[0])  # 26 octets: cheap
        verdict = self.sessions.hello(nat, hello, size, clock.now(), clock.wall())
        if isinstance(verdict, Refused):
            self._refused(verdict, addr)
        else:
            self._send([[verdict.answer]], addr)

    def _opened(self, nat: int, data: bytes, size: int, addr: Address) -> None:
        """A datagram that starts with a COOKIE: checked against its NAT64's
        share, then its cookie, before it is parsed whole (§2)."""
        sessions = self.sessions
        skip = 1
        boot_id = None
        now = self.clock.now()
        if size >= _CONFIRM_SIZE and data[10] == 0x31 and data[11] == 12:
            # COOKIE then HELLO: a confirmation naming its boot (§4.5).
            boot_id = data[14:22]
            skip = 2
        # A reboot is not held to the share its address ran into debt; the
        # boot already recorded is, whatever its datagram starts with.
        if boot_id is None or sessions.boots.get(nat) == boot_id:
            state = self.tables.nats.get(nat)
            if state is not None:
                requests = state.share.requests
                if requests.tokens < 1.0 and not requests.ready(now):
                    self._over_share(state, data, size, addr, now)
                    return
        opened = sessions.open(nat, data[2:10], size, self.clock.wall(), boot_id)
        if isinstance(opened, Refused):
            self._refused(opened, addr)
            return
        confirmation = opened.confirmation
        try:
            messages = wire.parse(data)
        except wire.Malformed as exc:
            self._drop(exc.reason)
            return
        body = messages[skip:]
        # What the datagram costs of its share (§7): a TOUCH of n ports n,
        # any other message one (skipped ones cost a parse too).
        cost = len(body)
        for m in body:
            kind = type(m)
            if kind is wire.Touch:
                cost += len(cast(wire.Touch, m).ports) - 1
            elif kind is wire.Cookie or kind is wire.Hello:
                self._drop(Drop.MISPLACED_SESSION)
                return
        if confirmation is not None:
            confirmation = sessions.confirm(confirmation)
        state = self.tables.state(nat, now)
        share = state.share
        if not body:
            if confirmation is not None:
                self._record_boot(confirmation)
            return
        if not share.requests.spend(cost, now):
            self._limited(state, body, Drop.REQUEST_RATE, addr, confirmation)
            return
        if share.waiting >= MAX_NAT_WAITING:
            self._limited(state, body, Drop.NAT_WAITING, addr, confirmation)
            return
        tables = self.tables
        if tables.hit(state, body):
            self.counts[_CACHE_HIT] += 1
            self._decide(state, body, addr, confirmation, now)
        elif share.queued >= MAX_NAT_QUEUE:
            self._limited(state, body, Drop.NAT_READS, addr, confirmation)
        elif tables.queued + self.waiting >= MAX_INFLIGHT:
            if confirmation is not None:
                self._record_boot(confirmation)
            self._drop(Drop.OVERLOADED)
        else:
            self.counts[_CACHE_MISS] += 1
            tables.enqueue(state, (body, addr, confirmation))
            self._read_next()

    def _over_share(self, state: NatState, data: bytes, size: int, addr: Address, now: int) -> None:
        """Refuse a datagram from a NAT64 in debt with its share, for the
        cost of a look-up. It is checked and parsed only to answer ERROR
        RATE_LIMITED while the NAT64's error budget lasts, and only if no
        bigger than a NAT64's requests (§2): answering must not cost a parse
        of 64 KiB a time."""
        share = state.share
        if size > wire.MAX_DATAGRAM or not share.errors.take(now):
            self.drops[_REQUEST_RATE] += 1
            self.counts[_LIMITED_REQUEST_RATE] += 1
            return
        opened = self.sessions.open(state.nat, data[2:10], size, self.clock.wall())
        if isinstance(opened, Refused):
            self._refused(opened, addr)
            return
        try:
            body = wire.parse(data)[1:]
        except wire.Malformed as exc:
            self._drop(exc.reason)
            return
        self._limited(state, body, Drop.REQUEST_RATE, addr, None, answered=True)

    def _limited(
        self,
        state: NatState,
        body: list[wire.Message],
        reason: Drop,
        addr: Address,
        confirmation: Confirmation | None,
        answered: bool = False,
    ) -> None:
        """Refuse a datagram over its NAT64's share whole (§7): ERROR
        RATE_LIMITED for each request while the NAT64's error budget lasts
        (``answered``: that budget was just taken from)."""
        if confirmation is not None:
            self._record_boot(confirmation)
        self._drop(reason)
        self.counts[LIMITED[reason]] += 1
        if answered or state.share.errors.take(self.clock.now()):
            units = [[_RATE_LIMITED[type(m)]] for m in body if type(m) in _RATE_LIMITED]
            if units:
                self._send(units, addr)

    def _record_boot(self, c: Confirmation) -> None:
        """A confirmed boot joins the next commit: recorded, and logged as
        ``Initialized`` when its boot id is new (docs/protocol.md §4.4)."""
        wall = self.clock.wall()
        event = None
        if c.initialized:
            event = Event(self.events.stamp(wall), EventKind.INITIALIZED, c.nat)
        self.store.add_boot(c.nat, c.boot_id, wall, event)

    def _decide(
        self,
        state: NatState,
        body: list[wire.Message],
        addr: Address,
        confirmation: Confirmation | None = None,
        now: int | None = None,
    ) -> None:
        """Decide ``body`` from memory and answer it (now, or once what it
        announces is committed). ``now``: the table clock, if just read."""
        store = self.store
        share = state.share
        if confirmation is not None:
            self._record_boot(confirmation)
        out = self.tables.decide(
            state,
            body,
            self.clock.now() if now is None else now,
            self._stamp,
            store.pending_seq,
            create_ok=store.failing is None and store.backlog < MAX_BACKLOG,
            share_ok=share.backlog < MAX_NAT_BACKLOG,
        )
        if out.created or out.events:
            share.backlog += store.add(state.nat, out.created, out.events)
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
                self._drop(Drop.OVERLOADED)
                return
            held = self._held.get(out.wait_seq)
            if held is None:
                held = self._held[out.wait_seq] = []
            held.append((state.nat, out.units, addr))
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

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            self._read_failed(exc)
        self._read_next()

    def _read_failed(self, exc: BaseException) -> None:
        if isinstance(exc, DatabaseDamaged):
            return  # the store said so once, and the server is stopping
        if isinstance(exc, BadRow):
            # One NAT64's row: refuse that datagram, keep serving the rest.
            self._drop(Drop.BAD_ROW)
            now = self.clock.monotonic()
            if now >= self._bad_row_quiet:
                log.error("%s (datagram dropped)", exc)
                self._bad_row_quiet = now + BUG_LOG_INTERVAL
            return
        if self.store.classify(exc) is Fault.DAMAGED:
            self.store.damage(exc)
            return
        self._drop(Drop.INTERNAL_ERROR)
        self._bug("datagram read failed", exc)

    async def _read_one(self, state: NatState, item: Waiting) -> None:
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

    async def _read_for(self, state: NatState, body: list[wire.Message]) -> None:
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

    async def drain(self, timeout: float, give_up: Callable[[], bool] = lambda: False) -> None:
        """Decide the datagrams waiting for reads, for at most ``timeout`` s,
        checking ``give_up()`` (answers that wait for a failing commit would
        wait in vain) every tenth of a second."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.tasks and not give_up() and (left := deadline - loop.time()) > 0:
            await asyncio.wait(list(self.tasks), timeout=min(left, 0.1))

    # ------------------------------------------------------------ commits
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
        answers = self._held.pop(batch.seq, ())
        try:
            self._record(batch)
        finally:
            # Durable whatever the log or an exporter made of it: the
            # answers go, or they would wait forever.
            self.tables.committed(batch.rows_by_nat, [nat for nat, _, _ in answers])
            if answers:
                send = self._send
                for _, units, addr in answers:
                    send(units, addr)
                self.waiting -= len(answers)
        if self.tables.excess > 0:
            self._trim()

    def _record(self, batch: Committed) -> None:
        """What a commit tells the log file, IPFIX, metrics and counters."""
        if self.metrics is not None:
            self.metrics.observe_commit(batch.rows, batch.seconds)
        if batch.recency:
            self.tables.saved(batch.recency)
        if batch.events:
            self.logfile.write(batch.events)
            if self.ipfix is not None:
                self.ipfix.export(batch.events)
            initialized = 0
            for e in batch.events:
                if e.kind is EventKind.INITIALIZED:
                    initialized += 1
            if initialized:
                self.counts[Count.INITIALIZED] += initialized

    def _trim(self) -> None:
        if self.tables.trim(self.store.committed_seq):
            self.save_recency()

    def save_recency(self) -> None:
        """Hand the recency of the entries used since the last time to
        storage, to be written with the next commit (the LRU order on disk
        follows memory at least every RECENCY_INTERVAL)."""
        recency = self.tables.take_recency()
        if recency:
            self.store.add_recency(recency)
        self.store.flush_recency_soon()

    async def save_recency_every(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            self.save_recency()

    # ------------------------------------------------------------ reports
    def summary(self) -> str:
        drops = ", ".join(f"{k}={v}" for k, v in sorted(self.drops.items())) or "none"
        return (
            f"{self.counts['datagrams_in']} datagrams in, {self.counts['datagrams_out']} out, "
            f"{self.counts['created']} created, {self.counts['deleted']} deleted; drops: {drops}"
        )


#: The answer to a request refused over its NAT64's share, by message type.
_RATE_LIMITED: dict[type[wire.Message], bytes] = {
    cls: wire.encode(wire.Error(wire.ErrorCode.RATE_LIMITED, kind))
    for cls, kind in (
        (wire.Map, wire.Kind.MAP),
        (wire.Lookup, wire.Kind.LOOKUP),
        (wire.Touch, wire.Kind.TOUCH),
    )
}


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
    if isinstance(ip, ipaddress.IPv6Address):
        mapped = ip.ipv4_mapped
        return None if mapped is None else int(mapped)
    return int(ip)
