"""The SQLite writer process: commits the server's groups of rows, already
encoded, so that SQLite's work (binding, B-trees, the WAL, fsync) runs on
its own core and interpreter lock, not on the event loop's.

The server (:class:`nat64ho.storage.sqlite.Store`) sends one group at a time
over a socketpair and learns the outcome from the reply; nothing is
acknowledged to a NAT64 before the reply says committed. The process ignores
SIGINT and SIGTERM (the server decides when to stop: it sends ``None``) and
exits when the server's end closes, so a SIGKILL of either side loses only
groups that nobody was told about.
"""

from __future__ import annotations

import asyncio
import marshal
import os
import selectors
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import threading
import time
from typing import Any, cast

from nat64ho.sql import INSERT_EVENT, UPSERT_ENTRY

_LEN = struct.Struct("!I")
#: A group as marshal carries it: (entries, recency, events, nats, clock_hwm
#: or None), each a list of plain tuples.
Group = tuple[list[Any], list[Any], list[Any], list[Any], int | None]
_UPDATE_RECENCY = "UPDATE entry SET last_use = ? WHERE nat = ? AND port = ?"
_UPSERT_NAT = (
    "INSERT INTO nat (nat, boot_id, first_hello, last_hello) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (nat) DO UPDATE SET boot_id = excluded.boot_id, last_hello = excluded.last_hello"
)


#: Seconds the writer waits for the other workers' groups once one came.
GATHER = 0.001
#: WAL size at which the checkpointer starts: SQLite's automatic one's (1000
#: pages of 4 KiB).
CHECKPOINT_BYTES = 4 * 1024 * 1024
#: WAL pages beyond which the writer checkpoints itself between commits (a
#: long pause, rare): commits kept the WAL from ever being copied whole, and
#: it must not grow without bound (64 MiB of 4 KiB pages).
WAL_LIMIT_PAGES = 16384
#: How often the checkpointer copies what the WAL holds. A page changed by
#: many commits in between is copied once: every 0.5 s cost the writer 10%
#: less CPU than every 0.05 s, with the same p99 (A/B runs, docs).
CHECKPOINT_POLL = 0.5


#: How often the server looks whether its writer process ended.
EXIT_POLL = 0.01
#: How long a lost writer's connection waits for its exit status, to say
#: why it ended (a writer that closed its end exits at once).
LOST_WAIT = 1.0
#: How long a kill waits for the process to end.
KILL_WAIT = 1.0


#: Never lowers it: with workers, each sends the newest last use it saw.
_RAISE_HWM = (
    "INSERT INTO meta VALUES ('clock_hwm', ?) "
    "ON CONFLICT (key) DO UPDATE SET value = max(value, excluded.value)"
)


class WriterLost(Exception):
    """The writer process died or closed its end: nothing more commits."""


class CommitFailed(sqlite3.DatabaseError):
    """A commit the writer process rolled back, with SQLite's result code
    (``sqlite_errorcode``) so that the server tells damage from a full disk."""

    def __init__(self, message: str, code: int, integrity: bool):
        super().__init__(message)
        self.sqlite_errorcode = code
        self.integrity = integrity


# ---------------------------------------------------------------- the process


def _read(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        try:
            chunk = sock.recv(n - len(buf))
        except ConnectionResetError:
            # A server process killed before it read our last reply: on a
            # Unix socket its unread data make this a reset, not an EOF.
            return None
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def _commit(conn: sqlite3.Connection, groups: list[Group]) -> None:
    """One transaction for the groups of every server process that sent one."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        hwm = None
        for entries, recency, events, nats, group_hwm in groups:
            if entries:
                conn.executemany(UPSERT_ENTRY, entries)
            if recency:
                conn.executemany(_UPDATE_RECENCY, recency)
            if events:
                conn.executemany(INSERT_EVENT, events)
            if nats:
                conn.executemany(_UPSERT_NAT, nats)
            if group_hwm is not None and (hwm is None or group_hwm > hwm):
                hwm = group_hwm
        if hwm is not None:
            conn.execute(_RAISE_HWM, (hwm,))
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
        raise


def _checkpointer(path: str, busy_ms: int, stop: threading.Event, behind: threading.Event) -> None:
    """Copy the WAL into the database beside the commits (PASSIVE: never
    holding the writer's lock), rather than inside whichever commit crosses
    SQLite's automatic threshold: that commit took 10 to 50 ms, and every
    answer behind it waited. Sets ``behind`` when the WAL grew past
    WAL_LIMIT_PAGES all the same."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute(f"PRAGMA busy_timeout = {busy_ms}")
    wal = f"{path}-wal"
    try:
        while not stop.wait(CHECKPOINT_POLL):
            try:
                # As SQLite's own: not before the WAL reached that size once
                # (its file keeps the size while copies let it wrap).
                if os.path.getsize(wal) < CHECKPOINT_BYTES:
                    continue
                # Cheap when there is nothing to copy: it reads the WAL index.
                [(_, frames, _)] = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            except (OSError, sqlite3.Error):
                continue  # the commits report the database's trouble
            if frames > WAL_LIMIT_PAGES:
                behind.set()
    finally:
        conn.close()


def _receive(sock: socket.socket) -> Group | None:
    """The next group a server process sent; None when it stopped."""
    head = _read(sock, _LEN.size)
    if head is None:
        return None
    body = _read(sock, _LEN.unpack(head)[0])
    return None if body is None else marshal.loads(body)


def main(argv: list[str]) -> int:
    """``python -m nat64ho.storage.writer FD[,FD...] PATH SYNC CACHE_KIB``:
    one socket per server process (each worker has its own)."""
    # The server decides when to stop; a ^C to the process group must not
    # take the writer away while groups are in flight.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from nat64ho.storage import schema

    path, sync, cache_kib = argv[1], argv[2], int(argv[3])
    socks = [socket.socket(fileno=int(fd)) for fd in argv[0].split(",")]
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA trusted_schema = OFF")
    conn.execute(f"PRAGMA busy_timeout = {schema.BUSY_TIMEOUT_MS}")
    conn.execute(f"PRAGMA cache_size = -{cache_kib}")
    conn.execute(f"PRAGMA synchronous = {'FULL' if sync == 'full' else 'NORMAL'}")
    conn.execute("PRAGMA wal_autocheckpoint = 0")  # the checkpointer's job
    stop, behind = threading.Event(), threading.Event()
    threading.Thread(
        target=_checkpointer, args=(path, schema.BUSY_TIMEOUT_MS, stop, behind), daemon=True
    ).start()
    sel = selectors.DefaultSelector()
    for s in socks:
        sel.register(s, selectors.EVENT_READ)
    try:
        while socks:
            # Every process that has a group waiting joins this transaction.
            senders: list[socket.socket] = []
            groups: list[Group] = []
            timeout = None
            while True:
                for key, _ in sel.select(timeout):
                    sock = cast(socket.socket, key.fileobj)
                    if sock in senders:
                        continue  # its next group waits for this one's reply
                    group = _receive(sock)
                    if group is None:
                        sel.unregister(sock)
                        socks.remove(sock)
                        sock.close()
                    else:
                        senders.append(sock)
                        groups.append(group)
                if timeout is not None or not groups or len(senders) == len(socks):
                    break
                # Workers answered together send together: wait a moment
                # for the others, so one fsync serves them all.
                timeout = GATHER
            if not groups:
                continue
            start = time.perf_counter()
            try:
                _commit(conn, groups)
                reply: tuple[tuple[str, int, bool] | None, float] = (
                    None,
                    time.perf_counter() - start,
                )
            except sqlite3.Error as exc:
                code = getattr(exc, "sqlite_errorcode", 0) or 0
                failed = (str(exc), code, isinstance(exc, sqlite3.IntegrityError))
                reply = (failed, time.perf_counter() - start)
            out = marshal.dumps(reply)
            for sock in senders:
                try:
                    sock.sendall(_LEN.pack(len(out)) + out)
                except OSError:
                    pass  # that process is gone; its EOF comes next
            if behind.is_set():
                behind.clear()
                try:
                    conn.execute("PRAGMA wal_checkpoint(RESTART)").fetchall()
                except sqlite3.Error:
                    pass
        return 0
    finally:
        stop.set()
        conn.close()


def spawn(
    path: str, sync: str, cache_kib: int, n: int
) -> tuple[subprocess.Popen[bytes], list[socket.socket]]:
    """Start a writer process for ``n`` server processes; their sockets."""
    ours, theirs = [], []
    for _ in range(n):
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ours.append(a)
        theirs.append(b)
    try:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "nat64ho.storage.writer",
                ",".join(str(t.fileno()) for t in theirs),
                path,
                sync,
                str(cache_kib),
            ],
            pass_fds=[t.fileno() for t in theirs],
            stdin=subprocess.DEVNULL,
        )
    finally:
        for t in theirs:
            t.close()
    return proc, ours


# ---------------------------------------------------------------- the server's side


class Writer:
    """A server process's handle on the writer process: its own child, or,
    for a worker, the one its parent started (``proc`` None)."""

    def __init__(
        self,
        proc: subprocess.Popen[bytes] | None,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ):
        self.proc = proc
        self._reader = reader
        self._writer = writer

    @classmethod
    async def start(cls, path: str, sync: str, cache_kib: int) -> Writer:
        proc, [ours] = spawn(path, sync, cache_kib, 1)
        reader, writer = await asyncio.open_unix_connection(sock=ours)
        return cls(proc, reader, writer)

    @classmethod
    async def attach(cls, fd: int) -> Writer:
        """The writer a parent started, over the socket ``fd``."""
        reader, writer = await asyncio.open_unix_connection(sock=socket.socket(fileno=fd))
        return cls(None, reader, writer)

    async def commit(self, group: Group) -> float:
        """Commit ``group`` (entries, recency, events, nats, clock_hwm or
        None); the seconds it took. Raises CommitFailed (rolled back) or
        WriterLost."""
        data = marshal.dumps(group)
        try:
            self._writer.write(_LEN.pack(len(data)) + data)
            head = await self._reader.readexactly(_LEN.size)
            failed, seconds = marshal.loads(await self._reader.readexactly(_LEN.unpack(head)[0]))
        except (OSError, asyncio.IncompleteReadError) as exc:
            raise WriterLost(await self.why_lost()) from exc
        if failed is not None:
            raise CommitFailed(*failed)
        return float(seconds)

    async def _exited(self, timeout: float) -> int | None:
        """The writer's exit status, or None while it still runs after
        ``timeout`` s. Polled: the event loop serves meanwhile."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while (rc := self.proc.poll()) is None and time.monotonic() < deadline:
            await asyncio.sleep(EXIT_POLL)
        return rc

    async def why_lost(self) -> str:
        if self.proc is None:
            return "the writer process closed its end"
        rc = await self._exited(LOST_WAIT)
        if rc is None:
            return "its writer process stopped answering"
        if rc < 0:
            try:
                name = signal.Signals(-rc).name
            except ValueError:
                name = str(-rc)
            return f"its writer process was killed by {name}"
        return f"its writer process exited with status {rc}"

    async def kill(self) -> None:
        """Stop now, rolling back the group in flight (nothing of it was
        acknowledged)."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            # A writer blocked in the kernel (a hung disk) dies only once its
            # I/O returns: not waited for beyond KILL_WAIT (Popen reaps it).
            await self._exited(KILL_WAIT)
        self._writer.close()

    async def stop(self, timeout: float) -> None:
        """Let the writer finish and exit; kill it after ``timeout`` s."""
        if self.proc is None:
            self._writer.close()  # the parent waits for the writer
            return
        if self.proc.poll() is None:
            try:
                data = marshal.dumps(None)
                self._writer.write(_LEN.pack(len(data)) + data)
                await self._writer.drain()
            except OSError:
                pass
            await self._exited(timeout)
        await self.kill()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
