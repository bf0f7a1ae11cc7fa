"""``serve --workers N``: N front-end processes on SO_REUSEPORT sockets, each
NAT64 steered to one of them by its source address, all committing through
one writer process. The parent owns the table and watches; it serves nothing.

Steering is a classic BPF program on the socket group: the worker of a NAT64
is its IPv4 address modulo N, so its table, cache, session and share live in
one process, and reads run in parallel (WAL). Event times stay unique over
the server: worker i hands out times that are i modulo N. A worker that dies
takes the server down (the others stop cleanly, the parent exits 1 with one
line): a restarted one would have to reload its NAT64s' tables anyway, and
an operator learns of it at once. Nothing acknowledged is lost whichever
process dies, as answers wait for the writer's reply.
"""

from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import logging
import mmap
import os
import signal
import socket
import struct
import time
from collections.abc import Callable, Coroutine
from types import FrameType
from typing import Any

from nat64ho.daemon import journal, systemd
from nat64ho.daemon.config import Config
from nat64ho.daemon.sockets import bind_group, rcvbuf_line
from nat64ho.daemon.sockets import steering as steering
from nat64ho.daemon.sockets import worker_of as worker_of
from nat64ho.daemon.standby import STANDBY_POLL, try_take_table
from nat64ho.errors import DatabaseError
from nat64ho.storage import schema, writer
from nat64ho.storage.owner import Ownership

log = logging.getLogger("nat64ho")

PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15
#: How long the parent waits for the writer to finish once the workers left.
WRITER_GRACE = 10.0
#: How often the parent looks for ended children (and beats the watchdog).
WAIT_POLL = 0.1


_STOPS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_BEAT = struct.Struct("d")
#: Per worker, shared with the parent: the monotonic time of its last
#: keep-alive; 0 before its first, negative while its commits stall (it
#: said so itself).
_beats: mmap.mmap | None = None


def beat(i: int, alive: bool) -> None:
    """Worker ``i``'s watchdog keep-alive, for its parent to pass on."""
    if _beats is not None:
        _BEAT.pack_into(_beats, i * _BEAT.size, time.monotonic() if alive else -1.0)


def _silent(n: int, bound: float) -> tuple[list[int], list[int]]:
    """(workers whose commits stall, workers not heard from for ``bound`` s)."""
    assert _beats is not None
    now = time.monotonic()
    stalled, silent = [], []
    for i in range(n):
        (at,) = _BEAT.unpack_from(_beats, i * _BEAT.size)
        if at < 0:
            stalled.append(i)
        elif at and now - at > bound:
            silent.append(i)
    return stalled, silent


class WorkerFailed(DatabaseError):
    """A worker or the writer died; the server stopped."""


def _prepare(config: Config) -> None:
    """Create and migrate the database, and its cookie secret, once: every
    worker must read the same one."""
    conn = schema.open_db(config.db, create=True)
    try:
        if conn.execute("SELECT 1 FROM meta WHERE key = 'secret'").fetchone() is None:
            conn.execute("INSERT INTO meta VALUES ('secret', ?)", (os.urandom(32),))
            conn.commit()
    finally:
        conn.close()


def _take_table(config: Config, stopping: list[int]) -> Ownership | None:
    told = False
    while (ownership := try_take_table(config, told)) is None:
        told = True
        if stopping:
            return None
        time.sleep(STANDBY_POLL)
    return ownership


#: What a worker runs: nat64ho.daemon.serve.serve, passed in by it.
Serve = Callable[[Config], Coroutine[Any, Any, object]]


def run(config: Config, serve: Serve) -> None:
    """Blocking: the parent of ``config.workers`` workers, each running
    ``serve`` on its socket."""
    n = config.workers
    stopping: list[int] = []  # signals received
    pids: dict[int, int] = {}  # pid -> worker index

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if not stopping:
            systemd.notify("STOPPING=1")
        stopping.append(signum)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def on_hup(signum: int, frame: FrameType | None) -> None:
        for pid in pids:  # each worker reopens the log file
            try:
                os.kill(pid, signal.SIGHUP)
            except ProcessLookupError:
                pass

    old = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    old[signal.SIGHUP] = signal.signal(signal.SIGHUP, on_hup)
    try:
        ownership = _take_table(config, stopping)
        if ownership is None:
            log.info("stopped while in standby")
            return
        try:
            _run_owned(config, serve, n, pids, stopping)
        finally:
            ownership.release()
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def _run_owned(
    config: Config, serve: Serve, n: int, pids: dict[int, int], stopping: list[int]
) -> None:
    from nat64ho.storage.sqlite import PAGE_CACHE_KIB

    global _beats
    _prepare(config)
    _beats = mmap.mmap(-1, n * _BEAT.size)  # shared: the workers write, the parent reads
    socks = bind_group(config.host, config.port, n)
    log.log(*rcvbuf_line(socks[0]))  # each socket of the group has its own, alike
    where = socks[0].getsockname()
    proc, ends = writer.spawn(str(config.db), config.sync, PAGE_CACHE_KIB, n)
    parent = os.getpid()
    try:
        for i in range(n):
            pid = os.fork()
            if pid == 0:
                _worker(config, serve, i, parent, socks, ends)  # never returns
            pids[pid] = i
    finally:
        for s in socks + ends:
            s.close()
    log.info("%d workers, each NAT64 steered to one by its source address", n)
    if stopping:  # a signal came while they were forked
        for pid in pids:
            os.kill(pid, signal.SIGTERM)
    # systemd (NotifyAccess=main) hears the parent only. The sockets are
    # bound: what arrives before a worker serves waits in its buffer.
    systemd.notify(f"READY=1\nSTATUS=listening on {where[0]}:{where[1]} ({n} workers)")
    watchdog_usec = int(os.environ.get("WATCHDOG_USEC", "0") or 0)
    watchdog, bound = watchdog_usec / 2e6, systemd.stall_bound(watchdog_usec)
    next_watchdog = 0.0
    told: list[int] = []
    failure = None
    while pids:
        if watchdog and time.monotonic() >= next_watchdog:
            # systemd hears only the parent: it passes on the workers'
            # keep-alives, and stops when one stalls or falls silent.
            stalled, silent = _silent(n, bound)
            if not stalled and not silent:
                systemd.notify("WATCHDOG=1")
            if silent and silent != told:
                log.error(
                    "worker %s silent for over %.0f s: no more watchdog keep-alives",
                    ", ".join(map(str, silent)),
                    bound,
                )
            told = silent
            next_watchdog = time.monotonic() + watchdog
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            time.sleep(WAIT_POLL)
            continue
        if pid == proc.pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            if not stopping:
                # The workers find out at their next commit; stop them now.
                for other in pids:
                    os.kill(other, signal.SIGTERM)
            continue
        if pid not in pids:
            continue
        i = pids.pop(pid)
        code = os.waitstatus_to_exitcode(status)
        if code != 0 and failure is None:
            failure = f"worker {i} (process {pid}) {_ended(code)}"
            if not stopping:
                # One worker's NAT64s get no answers now: stop all, loudly.
                for other in pids:
                    os.kill(other, signal.SIGTERM)
    try:
        proc.wait(WRITER_GRACE)
    except Exception:
        proc.kill()
        proc.wait()
    if proc.returncode not in (0, None):
        failure = f"the writer process {_ended(proc.returncode)}"
    if failure is not None:
        raise WorkerFailed(f"{config.db}: {failure}; the server stopped")


def _ended(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


def _worker(
    config: Config,
    serve: Serve,
    i: int,
    parent: int,
    socks: list[socket.socket],
    ends: list[socket.socket],
) -> None:
    """Body of worker ``i`` after the fork: serve, then leave the process."""
    code = 1
    try:
        # A stop that comes while the worker starts waits for serve()'s own
        # handlers, rather than killing it half started.
        signal.pthread_sigmask(signal.SIG_BLOCK, _STOPS)
        for sig in _STOPS:
            signal.signal(sig, signal.SIG_DFL)
        # A parent killed outright takes its workers along: the table's
        # lock (inherited) must not outlive the server as a whole.
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        # Its name in ps and top (/proc/PID/comm): which worker is busy.
        libc.prctl(PR_SET_NAME, f"nat64ho-w{i}".encode()[:15], 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)
        for j, s in enumerate(socks):
            if j != i:
                s.close()
        for j, e in enumerate(ends):
            if j != i:
                e.close()
        # The parent speaks to systemd for the server as a whole; the
        # worker's keep-alives go to it (beat).
        os.environ.pop("NOTIFY_SOCKET", None)
        journal.setup_logging(f"nat64ho[worker {i}]")
        mine = dataclasses.replace(
            config, worker=i, sock_fd=socks[i].detach(), writer_fd=ends[i].detach()
        )

        async def main() -> None:
            task = asyncio.ensure_future(serve(mine))
            await asyncio.sleep(0)  # serve() installed its signal handlers
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOPS)
            await task

        try:
            import uvloop
        except ImportError:
            asyncio.run(main())
        else:
            uvloop.run(main())
        code = 0
    except (DatabaseError, OSError) as exc:
        log.error("%s", exc)
    except BaseException as exc:  # a worker must end here, never return into the parent's code
        log.critical("worker %d failed", i, exc_info=exc)
    finally:
        logging.shutdown()
        os._exit(code)
