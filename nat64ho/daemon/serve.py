"""Running the server: ownership of the table, standby, the socket,
signals, timers (watchdog, prune), metrics and IPFIX, and a clean stop."""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import os
import signal
import socket
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

from nat64ho.daemon import journal
from nat64ho.daemon.clock import wall_us
from nat64ho.daemon.config import Config
from nat64ho.daemon.endpoints import Endpoints
from nat64ho.daemon.ipfix_export import Exporter
from nat64ho.daemon.logfile import LogFile
from nat64ho.daemon.protocol import Server
from nat64ho.ops.db import HistoryError
from nat64ho.storage.base import Storage
from nat64ho.storage.schema import (
    DatabaseError,
    NewerDatabase,
    NotOurDatabase,
    describe,
    is_postgres,
    shown,
)
from nat64ho.storage.sqlite import RECENCY_INTERVAL, Store

log = logging.getLogger("nat64ho")

#: Kernel receive buffer asked for: a burst from a busy NAT64 waits here
#: rather than being dropped while a commit runs. The kernel caps it at
#: net.core.rmem_max (install.sh raises that: contrib/sysctl).
RCVBUF = 4 * 1024 * 1024
RMEM_MAX = Path("/proc/sys/net/core/rmem_max")
#: The least time a commit may go unanswered before the server stops
#: sending systemd's WATCHDOG=1 (see :func:`stall_bound`).
MIN_COMMIT_STALL = 1.0
#: How long a clean stop waits for datagrams in flight before committing.
STOP_GRACE = 10.0
#: How often a standby server tries to take the table.
STANDBY_POLL = 0.2
#: The longest wait between a standby's tries to reach PostgreSQL.
STANDBY_MAX_BACKOFF = 5.0
#: Interval between history prunes when --keep-history is set.
PRUNE_INTERVAL = 3600.0
#: Young-generation collections between two full ones (Python's default:
#: 10). A full collection walks every object, the cache's too: its pauses
#: of 20-30 ms set the p99 of answers at 10,000 creates/s (27 ms; 10-13 ms
#: with this). The young generations, where garbage is, go on as usual:
#: the datagram path makes no cycles (tests/test_server_inproc.py).
GC_FULL_EVERY = 1000


class ListenError(OSError):
    """The UDP socket could not be bound; the message says where and why."""


def _bind(host: str, port: int, reuseport: bool = False) -> socket.socket:
    # Bound here rather than by the event loop, whose errors (uvloop's in
    # particular) do not say why a bind failed.
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    try:
        if reuseport:  # one of the workers' sockets (nat64ho.daemon.workers)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
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


def rcvbuf_line(sock: socket.socket) -> tuple[int, str]:
    """The log level and line that say what receive buffer ``sock`` got:
    the kernel cuts RCVBUF to net.core.rmem_max without an error."""
    got = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    # Linux reports twice what it grants (the other half is its bookkeeping).
    if got >= 2 * RCVBUF:
        return logging.INFO, f"UDP receive buffer {got // 1024} KiB (SO_RCVBUF), as asked"
    try:
        limit = f"net.core.rmem_max is {int(RMEM_MAX.read_text())}"
    except (OSError, ValueError):
        limit = "net.core.rmem_max is lower"
    return logging.WARNING, (
        f"UDP receive buffer {got // 1024} KiB (SO_RCVBUF), not the {RCVBUF // 1024} KiB "
        f"asked for: {limit}, and bursts beyond the buffer are dropped by the kernel; "
        f"set net.core.rmem_max to {RCVBUF} or more (install.sh does: "
        "/etc/sysctl.d/60-nat64ho.conf)"
    )


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


def stall_bound(watchdog_usec: int) -> float:
    """How long a commit may go unanswered before the keep-alives stop: half
    the watchdog's timeout (15 s with WatchdogSec=30s in
    contrib/nat64ho.service), far above any commit's time (a group fsynced
    on a slow disk, a WAL checkpoint: seconds). systemd then restarts a
    server whose writer hangs within 1.5 WatchdogSec. A commit that fails
    (disk full) returns, and is retried: not a stall."""
    return max(watchdog_usec / 2e6, MIN_COMMIT_STALL)


class Heartbeat:
    """Whether this server's commits still return: what the watchdog hears
    (:func:`_watchdog`, and with workers the parent, by :meth:`beat`)."""

    def __init__(self, store: Storage, where: str, bound: float):
        self.store = store
        self.where = where
        self.bound = bound
        self.stalled = False

    def alive(self) -> bool:
        """False while a commit has run longer than ``bound``; says so once
        when it starts and once when it ends."""
        running = self.store.commit_running_for()
        if running > self.bound:
            if not self.stalled:
                self.stalled = True
                log.error(
                    "a commit to %s has not returned for %.0f s (writer process stopped, "
                    "or the disk hung): no more watchdog keep-alives, so that systemd "
                    "restarts the server",
                    self.where,
                    running,
                )
            return False
        if self.stalled:
            self.stalled = False
            log.warning("commits to %s return again: watchdog keep-alives resume", self.where)
        return True


async def _watchdog(interval: float, heart: Heartbeat, keep_alive: Callable[[bool], None]) -> None:
    # From the event loop, so a hung loop stops the keep-alives too.
    while True:
        keep_alive(heart.alive())
        await asyncio.sleep(interval)


def _sd_watchdog(alive: bool) -> None:
    if alive:
        _sd_notify("WATCHDOG=1")


async def _prune(store: Storage, days: float, db: Path | str) -> None:
    from nat64ho.archive import retention

    while True:
        before = wall_us() - int(days * 86400 * 1_000_000)
        n = await store.prune(before)
        if not is_postgres(db):  # sealed history goes by whole segments
            n += await asyncio.to_thread(retention.prune_db, Path(db), before)
        if n:
            log.info("pruned %d history events older than %g days", n, days)
        await asyncio.sleep(PRUNE_INTERVAL)


async def _seal(db: Path | str, seconds: float, directory: Path | None) -> None:
    """Seal each closed period into a segment, in a thread with a connection
    of its own; the first round at start-up also removes what a killed one
    left."""
    from nat64ho.archive import seal as sealing

    while True:
        try:
            made = await asyncio.to_thread(sealing.seal_db, db, seconds, directory)
        except (DatabaseError, HistoryError, OSError, sqlite3.Error) as exc:
            log.warning("sealing the history failed (retried next period): %s", exc)
        else:
            if made:
                log.info(
                    "sealed %d history events into %d segments",
                    sum(s.events for s in made),
                    len(made),
                )
        # Just past the period's end: its last events are committed by then.
        grace = min(1.0, seconds / 4)
        await asyncio.sleep(seconds - time.time() % seconds + grace)


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


def try_take_table(config: Config, told: bool):
    """One try to own the table of ``config.db`` (nat64ho.storage.owner): the
    ownership, or None while another server holds it and ``standby`` lets
    this one wait (said once, unless ``told``). Shared by the one-process
    server and the parent of workers."""
    from nat64ho.storage import owner

    try:
        return owner.acquire(config.db, what="serve")
    except owner.TableOwned as exc:
        if not config.standby or getattr(exc, "holder", None) is None:
            raise
        if not told:
            log.info("standby: %s is owned by %s; waiting to take over", config.db, exc.holder)
            _sd_notify(f"STATUS=standby, waiting for {exc.holder} to release {config.db}")
        return None


async def _take_table(config: Config, stop: asyncio.Event):
    """Own the table of ``config.db``; with ``standby`` wait for it, or for a
    stop. Returns None when stopped while waiting."""
    told = False
    while (ownership := try_take_table(config, told)) is None:
        told = True
        try:
            await asyncio.wait_for(stop.wait(), STANDBY_POLL)
            return None
        except TimeoutError:
            pass
    return ownership


async def _take_pg_table(url: str, config: Config, stop: asyncio.Event):
    """The writer session of ``url``, migrated and holding the owner lock
    (nat64ho.storage.pg_owner); with ``standby`` wait for the lock (and for
    the database, if it cannot be reached), or for a stop (None). A database
    that is not ours, is newer, or refuses the role stops even a standby:
    waiting would not mend it."""
    from nat64ho.storage import pg_owner, pg_schema, postgres
    from nat64ho.storage.owner import TableOwned

    told: str | None = None
    conn = None
    delay = STANDBY_POLL
    while True:
        try:
            if conn is None:
                conn = await _unless_stopped(postgres.connect(url), stop)
                if conn is None:
                    return None
                # serve is the command that migrates; a failed migration
                # closes the session, so that a retry starts clean.
                async with pg_schema.closed_on_failure(conn, url):
                    await pg_schema.migrate(conn, url)
            await pg_owner.try_acquire(conn, url, what="serve")
            if told is not None:
                log.info("standby: took over the table of %s", shown(url))
            return conn
        except (NotOurDatabase, NewerDatabase, pg_schema.AccessRefused):
            _drop(conn)
            raise
        except TableOwned as exc:
            if not config.standby:
                _drop(conn)
                raise
            why = f"owned by {exc.holder}"
            delay = STANDBY_POLL  # the session is up: polling the lock is cheap
        except Exception as exc:
            # Unreachable, missing, or the session failed while we waited:
            # start over with a new session, backing off to spare the server.
            _drop(conn)
            conn = None
            if not config.standby:
                if isinstance(exc, DatabaseError):
                    raise
                raise DatabaseError(f"{shown(url)}: {exc}") from None
            why = str(exc) if isinstance(exc, DatabaseError) else f"{shown(url)}: {exc}"
            delay = min(delay * 2, STANDBY_MAX_BACKOFF)
        if told != why:
            log.info("standby: %s; waiting to take over", why)
            _sd_notify(f"STATUS=standby, {why}")
            told = why
        try:
            await asyncio.wait_for(stop.wait(), delay)
        except TimeoutError:
            continue
        _drop(conn)
        return None


async def _unless_stopped(coro, stop: asyncio.Event):
    """``coro``'s result, or None as soon as ``stop`` is set (a standby's
    connect can hang for CONNECT_TIMEOUT on an unreachable host)."""
    task = asyncio.ensure_future(coro)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait((task, stopped), return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
    if task.done():
        return task.result()
    task.cancel()
    return None


def _drop(conn) -> None:
    """Close a session without waiting on a server that may be gone."""
    if conn is not None and not conn.is_closed():
        conn.terminate()


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
    pg = is_postgres(config.db)
    db = None if pg else Path(config.db)
    log_path = Path(config.log_file) if config.log_file != "-" else None
    created_dirs = _new_dirs(db) if db is not None else []
    if log_path is not None:
        created_dirs += [d for d in _new_dirs(log_path) if d not in created_dirs]
    if created_dirs and db is not None:
        db.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
    candidates = (
        [] if db is None else [db, Path(f"{db}-wal"), Path(f"{db}-shm"), Path(f"{db}.lock")]
    )
    if log_path is not None:
        candidates.append(log_path)
    created = [f for f in candidates if not f.exists()]
    if config.worker is not None:  # its parent owns the table (daemon.workers)
        return await _serve_owned(config, ready, stop, hurry, created_dirs, created)
    if pg:
        writer = await _take_pg_table(str(config.db), config, stop)
        if writer is None:
            log.info("stopped while in standby")
            return None
        try:
            return await _serve_owned(config, ready, stop, hurry, created_dirs, created, writer)
        finally:
            if not writer.is_closed():
                writer.terminate()  # the store closed it, unless it failed to open
    ownership = await _take_table(config, stop)
    if ownership is None:
        log.info("stopped while in standby")
        return None
    try:
        return await _serve_owned(config, ready, stop, hurry, created_dirs, created)
    finally:
        ownership.release()


async def _serve_owned(config: Config, ready, stop, hurry, created_dirs, created, writer=None):
    loop = asyncio.get_running_loop()
    store: Store
    errors: tuple[type[BaseException], ...] = (sqlite3.Error,)
    if writer is not None:
        import asyncpg

        from nat64ho.storage.postgres import PgStore

        store = await PgStore.open(str(config.db), writer=writer)
        errors = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError)
    else:
        store = await Store.open(config.db, sync=config.sync, writer_fd=config.writer_fd)
    where = describe(config.db)
    try:
        # Read commands (stats) take the table size from here.
        await store.set_meta("ports", f"{config.first_port}-{config.last_port}")
    except errors as exc:
        log.warning("cannot record the port range in %s: %s", where, exc)
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
            lambda: server,
            sock=_bind(config.host, config.port)
            if config.sock_fd is None
            else socket.socket(fileno=config.sock_fd),
        )
    except BaseException:
        await store.close()
        logfile.close()
        raise
    helpers = [asyncio.ensure_future(server.save_recency_every(RECENCY_INTERVAL))]
    loop.add_signal_handler(signal.SIGHUP, logfile.reopen)
    sockname = transport.get_extra_info("sockname")
    log.info(
        "listening on %s:%d, database %s, log %s, ports %d-%d",
        sockname[0],
        sockname[1],
        where,
        config.log_file,
        config.first_port,
        config.last_port,
    )
    log.debug(
        "limits: %g new entries/s and %g requests/s per NAT64, min idle %g s, %d NAT64s, "
        "cache %d entries, allow %s",
        config.create_rate,
        config.request_rate,
        config.min_idle,
        config.max_nats,
        config.cache_size,
        ", ".join(map(str, config.allow)) or "any",
    )
    if config.worker is None:  # the parent of workers says it for their sockets
        log.log(*rcvbuf_line(transport.get_extra_info("socket")))
    watchdog_usec = int(os.environ.get("WATCHDOG_USEC", "0") or 0)
    if watchdog_usec > 0:
        heart = Heartbeat(store, where, stall_bound(watchdog_usec))
        interval = watchdog_usec / 2e6
        keep_alive = _sd_watchdog
        if config.worker is not None:  # the parent speaks to systemd
            from nat64ho.daemon import workers

            keep_alive = functools.partial(workers.beat, config.worker)
            interval /= 4  # the parent checks each interval: a beat late by a moment is not silence
        helpers.append(asyncio.ensure_future(_watchdog(interval, heart, keep_alive)))
    if config.keep_history_days is not None and not config.worker:
        helpers.append(asyncio.ensure_future(_prune(store, config.keep_history_days, config.db)))
    if config.seal_every > 0 and not config.worker:
        helpers.append(asyncio.ensure_future(_seal(config.db, config.seal_every, config.archive)))
    endpoints = Endpoints()  # --metrics, --api
    try:
        await endpoints.start(config, server)
    except OSError:
        transport.close()
        await store.close()
        logfile.close()
        raise
    if config.ipfix:
        exporter = Exporter(config.ipfix, config.ipfix_domain)
        try:
            exporter.start()
        except OSError:
            transport.close()
            await endpoints.stop()
            await store.close()
            logfile.close()
            raise
        server.ipfix = exporter
        log.info(
            "IPFIX export to %s, observation domain %d",
            ", ".join(c.name for c in exporter.collectors),
            config.ipfix_domain,
        )
    gc.freeze()  # start-up's objects live as long as the server: no collection walks them
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
        server.save_recency()  # a clean stop keeps the LRU order to the µs
        await endpoints.stop()
        unsaved = await store.close(hurry)
        damage.cancel()
        if server.ipfix is not None:
            server.ipfix.close()
        logfile.close()
        log.info("stopped: %s", server.summary())
    if getattr(store, "lost", None) is not None:
        raise DatabaseError(store.damaged)
    if store.damaged is not None:
        raise NotOurDatabase(f"{store.damaged}; run 'nat64ho check --db {where}'")
    if unsaved:
        why = store.failing or "a second signal came first"
        raise NotCommitted(
            f"{where}: stopped with {unsaved} changes not committed ({why}); "
            "none of them was acknowledged to a NAT64"
        )
    return server


def run(config: Config) -> None:
    """Blocking entry point for ``nat64ho serve``."""
    journal.setup_logging()
    # Nothing serve creates is for other users, whatever umask it inherits.
    os.umask(0o027)
    gen0, gen1, _ = gc.get_threshold()
    gc.set_threshold(gen0, gen1, GC_FULL_EVERY)
    if config.workers > 1:
        from nat64ho.daemon import workers

        workers.run(config)
        return
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(config))
    else:
        uvloop.run(serve(config))
