"""Running the server: its parts started in order (the table's owner, the
store, the socket, timers, metrics and IPFIX), signals, and a clean stop."""

from __future__ import annotations

import asyncio
import contextlib
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
from typing import TYPE_CHECKING, Any

from nat64ho.daemon import journal, standby, systemd
from nat64ho.daemon.clock import wall_us
from nat64ho.daemon.config import Config
from nat64ho.daemon.endpoints import Endpoints
from nat64ho.daemon.ipfix_export import Exporter
from nat64ho.daemon.logfile import LogFile
from nat64ho.daemon.protocol import Server
from nat64ho.daemon.sockets import RCVBUF as RCVBUF
from nat64ho.daemon.sockets import ListenError as ListenError
from nat64ho.daemon.sockets import bind, rcvbuf_line, worker_of
from nat64ho.errors import DatabaseDamaged, DatabaseError
from nat64ho.storage.base import RECENCY_INTERVAL, Storage
from nat64ho.storage.schema import describe, is_postgres

if TYPE_CHECKING:
    import asyncpg

log = logging.getLogger("nat64ho")
#: Told the socket's address once the server listens (tests wait on it).
Ready = asyncio.Future[tuple[Any, ...]]

#: How long a clean stop waits for datagrams in flight before committing.
STOP_GRACE = 10.0
#: Interval between history prunes when --keep-history is set.
PRUNE_INTERVAL = 3600.0
#: Young-generation collections between two full ones (Python's default:
#: 10). A full collection walks every object, the cache's too: its pauses
#: of 20-30 ms set the p99 of answers at 10,000 creates/s (27 ms; 10-13 ms
#: with this). The young generations, where garbage is, go on as usual:
#: the datagram path makes no cycles (tests/test_server_inproc.py).
GC_FULL_EVERY = 1000


async def _prune(store: Storage, days: float, db: Path | str) -> None:
    from nat64ho.archive import retention

    while True:
        before = wall_us() - int(days * 86400 * 1_000_000)
        n = await store.prune(before)
        # Sealed history goes by whole segments, on either backend.
        n += await asyncio.to_thread(retention.prune_db, db, before)
        if n:
            log.info("pruned %d history events older than %g days", n, days)
        await asyncio.sleep(PRUNE_INTERVAL)


async def _seal(db: Path | str, seconds: float, directory: Path | None, logfile: LogFile) -> None:
    """Seal each closed period into a segment, in a thread with a connection
    of its own; the first round at start-up also removes what a killed one
    left. Not while the log file is behind: its catch-up reads the hot tier."""
    # Lazily, as the archive: the datagram path never loads the operator commands' layer.
    from nat64ho.archive import seal as sealing
    from nat64ho.ops.db import HistoryError

    while True:
        try:
            made = []
            if not logfile.waiting:
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


async def serve(config: Config, ready: Ready | None = None) -> Server | None:
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


async def _serve(
    config: Config, ready: Ready | None, stop: asyncio.Event, hurry: asyncio.Event
) -> Server | None:
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
    loop = asyncio.get_running_loop()
    where = describe(config.db)
    unsaved = 0
    # Closed in the reverse order. What commits write to (the log file,
    # IPFIX) outlives the store's last commit in ``sinks``, the table's
    # ownership all else.
    async with contextlib.AsyncExitStack() as sinks, contextlib.AsyncExitStack() as stack:
        writer = None
        if config.worker is not None:
            pass  # its parent owns the table (daemon.workers)
        elif pg:
            writer = await standby.take_pg_table(str(config.db), config, stop)
            if writer is None:
                log.info("stopped while in standby")
                return None
            sinks.callback(standby.drop, writer)  # the store closed it, unless it failed to open
        else:
            ownership = await standby.take_table(config, stop)
            if ownership is None:
                log.info("stopped while in standby")
                return None
            sinks.callback(ownership.release)
        store = await _open_store(config, writer)

        async def close_store() -> None:
            nonlocal unsaved
            unsaved = await store.close(hurry)

        stack.push_async_callback(close_store)
        try:
            # Read commands (stats) take the table size from here.
            await store.set_meta("ports", f"{config.first_port}-{config.last_port}")
        except Exception as exc:
            if store.classify(exc) is None:
                raise
            log.warning("cannot record the port range in %s: %s", where, exc)
        logfile = sinks.enter_context(
            contextlib.closing(LogFile(config.log_file, store, _owns(config)))
        )
        _made_private(created_dirs, created)
        exporter = Exporter(config.ipfix, config.ipfix_domain) if config.ipfix else None
        endpoints = Endpoints()  # --metrics, --api
        server = Server(config, store, logfile, ipfix=exporter, http=endpoints.servers)
        damage = asyncio.ensure_future(store.damage_found.wait())
        damage.add_done_callback(lambda _: stop.set())
        sinks.callback(damage.cancel)
        transport, _ = await loop.create_datagram_endpoint(
            lambda: server,
            sock=bind(config.host, config.port)
            if config.sock_fd is None
            else socket.socket(fileno=config.sock_fd),
        )
        stack.callback(transport.close)
        helpers = [asyncio.ensure_future(server.save_recency_every(RECENCY_INTERVAL))]
        stack.callback(lambda: [h.cancel() for h in helpers])  # timers, when all is decided
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
            heart = systemd.Heartbeat(store, where, systemd.stall_bound(watchdog_usec))
            interval = watchdog_usec / 2e6
            keep_alive = systemd.keep_alive
            if config.worker is not None:  # the parent speaks to systemd
                from nat64ho.daemon import workers

                keep_alive = functools.partial(workers.beat, config.worker)
                # The parent checks each interval: a beat late by a moment is not silence.
                interval /= 4
            helpers.append(asyncio.ensure_future(systemd.watchdog(interval, heart, keep_alive)))
        if config.keep_history_days is not None and not config.worker:
            helpers.append(
                asyncio.ensure_future(_prune(store, config.keep_history_days, config.db))
            )
        if config.seal_every > 0 and not config.worker:
            helpers.append(
                asyncio.ensure_future(_seal(config.db, config.seal_every, config.archive, logfile))
            )
        await endpoints.start(config, server)
        stack.push_async_callback(endpoints.stop)
        if exporter is not None:
            exporter.start()
            sinks.callback(exporter.close)
            log.info(
                "IPFIX export to %s, observation domain %d",
                ", ".join(c.name for c in exporter.collectors),
                config.ipfix_domain,
            )
        gc.freeze()  # start-up's objects live as long as the server: no collection walks them
        systemd.notify(f"READY=1\nSTATUS=listening on {sockname[0]}:{sockname[1]}")
        if ready is not None and not ready.done():
            ready.set_result(sockname)

        async def stop_serving() -> None:
            systemd.notify("STOPPING=1")
            log.info("stopping: committing what is in flight")
            transport.close()
            await server.drain(
                STOP_GRACE, give_up=lambda: store.failing is not None or hurry.is_set()
            )
            server.save_recency()  # a clean stop keeps the LRU order to the µs

        sinks.callback(lambda: log.info("stopped: %s", server.summary()))
        stack.push_async_callback(stop_serving)
        await stop.wait()
    if store.damaged is not None:
        # A lost session is not damage: the table may have a new owner.
        hint = "" if store.lost is not None else f"; run 'nat64ho check --db {where}'"
        raise DatabaseDamaged(store.damaged + hint)
    if unsaved:
        why = store.failing or "a second signal came first"
        raise NotCommitted(
            f"{where}: stopped with {unsaved} changes not committed ({why}); "
            "none of them was acknowledged to a NAT64"
        )
    return server


async def _open_store(config: Config, writer: asyncpg.Connection | None) -> Storage:
    """The store of ``config.db``."""
    if writer is not None:
        from nat64ho.storage.postgres import PgStore

        return await PgStore.open(str(config.db), writer=writer)
    from nat64ho.storage.sqlite import Store

    return await Store.open(config.db, sync=config.sync, writer_fd=config.writer_fd)


def _owns(config: Config) -> Callable[[int], bool] | None:
    """Whether this process writes the events of a NAT64 (with workers, each
    catches up its own lines of the shared log file); None: all."""
    if config.worker is None:
        return None
    n, mine = config.workers, config.worker
    return lambda nat: worker_of(nat, n) == mine


def run(config: Config) -> None:
    """Blocking entry point for ``nat64ho serve``."""
    journal.setup_logging()
    # Nothing serve creates is for other users, whatever umask it inherits.
    os.umask(0o027)
    gen0, gen1, _ = gc.get_threshold()
    gc.set_threshold(gen0, gen1, GC_FULL_EVERY)
    if config.workers > 1:
        from nat64ho.daemon import workers

        workers.run(config, serve)
        return
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(config))
    else:
        uvloop.run(serve(config))
