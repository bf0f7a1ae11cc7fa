"""What tests share: a real ``nat64ho serve`` process and a NAT64 client for
it, the ``nat64ho`` command, read-only views of a table file, and tmpfs mounts.

Fixtures stay in conftest.py; test files import helpers from here."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import ipaddress
import json
import os
import queue
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from nat64ho.core import wire
from nat64ho.ops import db as opsdb
from nat64ho.peer import Client, Peer
from nat64ho.sql import numbered
from nat64ho.storage.schema import is_postgres
from nat64ho.testing import Child, spawn_logged


def v6(i: int, prefix: str = "2001:db8::") -> bytes:
    """A distinct test IPv6 address."""
    return (int(ipaddress.IPv6Address(prefix)) + i).to_bytes(16, "big")


class ServerProcess:
    """``nat64ho serve`` in a child process, bound to an ephemeral port."""

    def __init__(
        self,
        tmp: Path,
        *args: str,
        db: Path | str | None = None,
        log: Path | None = None,
        env: dict | None = None,
    ):
        self.tmp = tmp
        self.db = db or tmp / "table.db"
        self.log = log or tmp / "events.log"
        self.args = list(args)
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.host = "127.0.0.1"
        self.port = 0
        self.stderr_lines: list[str] = []

    def start(self, timeout: float = 20.0) -> ServerProcess:
        cmd = [
            sys.executable,
            "-m",
            "nat64ho",
            "serve",
            "--db",
            str(self.db),
            "--listen",
            f"127.0.0.1:{self.port}",
            "--log-file",
            str(self.log),
            *self.args,
        ]
        self.child = Child(cmd, timeout, env=self.env)
        self.proc = self.child.proc
        self.stderr_lines = self.child.lines
        self.port = self.child.address[1]
        return self

    @property
    def stderr(self) -> str:
        return "".join(self.stderr_lines)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; returns the exit status."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def restart(self) -> ServerProcess:
        self.stop()
        return self.start()


class Proc:
    """A command whose stderr lines are collected as they come."""

    def __init__(self, args: list[str], *, shell_umask: int | None = None, env: dict | None = None):
        cmd = [sys.executable, "-m", "nat64ho", *args]
        if shell_umask is not None:
            cmd = ["sh", "-c", f'umask {shell_umask:03o}; exec "$@"', "sh", *cmd]
        self.proc = spawn_logged(cmd, env)
        self.lines: list[str] = []
        self.pump = threading.Thread(target=self._pump, daemon=True)
        self.pump.start()

    def _pump(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)

    @property
    def stderr(self) -> str:
        return "".join(self.lines)

    def wait_line(self, pattern: str, timeout: float = 20) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                m = re.search(pattern, line)
                if m:
                    return m
            if self.proc.poll() is not None and not any(
                re.search(pattern, ln) for ln in self.lines
            ):
                self.pump.join(10)  # it ends at EOF, having read the last lines
                if not any(re.search(pattern, ln) for ln in self.lines):
                    raise AssertionError(f"exited without {pattern!r}:\n{self.stderr}")
            time.sleep(0.05)
        raise AssertionError(f"no {pattern!r} in time:\n{self.stderr}")

    def port(self) -> int:
        return int(self.wait_line(r"listening on \S+?:(\d+),").group(1))

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def serve_args(db: Path | str, log: Path, *more: str) -> list[str]:
    return [
        "serve",
        "--db",
        str(db),
        "--listen",
        "127.0.0.1:0",
        "--log-file",
        str(log),
        "--hello-rate",
        "0",
        *more,
    ]


async def connect(
    server: ServerProcess,
    *,
    boot_id: bytes | None = None,
    local: str = "127.0.0.1",
    hello: bool = True,
) -> Client:
    """A NAT64 client for ``server``, after HELLO/WELCOME unless told not to."""
    client = await Client.connect(server.host, server.port, local=local, peer=Peer(boot_id))
    if hello:
        await client.hello()
    return client


def hello_from(srv: ServerProcess, locals_: list[str]) -> list:
    """One session with ``srv`` from each local address; their peers, to
    speak again without a HELLO."""

    async def hello() -> list:
        clients = [(await connect(srv, local=a)) for a in locals_]
        for c in clients:
            c.close()
        return [c.peer for c in clients]

    return run(hello())


async def mapping_load(
    srv: ServerProcess,
    peers: list,
    locals_: list[str],
    acked: list[dict],
    counter,
    kill_after: float,
    per_datagram: int = 8,
    kill=None,
) -> None:
    """NAT64s asking for new endpoints as fast as they are answered, until
    the server is SIGKILLed ``kill_after`` seconds in (or ``kill`` is called
    then, and the server ends); ``acked[i]`` gathers
    endpoint -> NAT port of every MAPPING NAT64 ``i`` received."""
    from nat64ho.peer import Client

    clients = [
        await Client.connect(srv.host, srv.port, local=local, peer=peer)
        for peer, local in zip(peers, locals_, strict=False)
    ]
    asyncio.get_running_loop().call_later(kill_after, kill or srv.kill)

    async def one(i: int, c) -> None:
        while srv.proc.poll() is None:
            c.send([wire.Map(v6(next(counter)), 7) for _ in range(per_datagram)])
            for m in await c.collect(per_datagram, timeout=0.5):
                if isinstance(m, wire.Mapping):
                    acked[i][(m.addr, m.port)] = m.nat_port
                elif isinstance(m, wire.Deleted):
                    acked[i].pop((m.addr, m.port), None)

    await asyncio.gather(*(one(i, c) for i, c in enumerate(clients)))
    for c in clients:
        c.close()


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05):
    """Poll ``predicate`` until it is true (returned) or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("condition not met in time")


def run(coro):
    return asyncio.run(coro)


async def committed(store, seq: int | None = None) -> None:
    """Until group ``seq`` of an in-process store is committed (None: every
    change added so far); raises DatabaseDamaged once it is given up on.
    Yields at least once, so that the reader of its commits runs."""
    from nat64ho.errors import DatabaseDamaged

    while True:
        await asyncio.sleep(0.001)
        if store.damaged is not None:
            raise DatabaseDamaged(store.damaged)
        if (store.unsaved == 0) if seq is None else store.committed_seq >= seq:
            return


def nat64ho(
    *args: str, input: str | None = None, timeout: float = 60
) -> subprocess.CompletedProcess:
    """The ``nat64ho`` command, run to its end; stdin is ``input`` or nothing."""
    return subprocess.run(
        [sys.executable, "-m", "nat64ho", *args],
        input=input,
        stdin=None if input is not None else subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def one_error(out: subprocess.CompletedProcess | str) -> str:
    """The single ``Error:`` line of a failed command's stderr (and no traceback)."""
    text = out if isinstance(out, str) else out.stderr
    assert "Traceback" not in text, text
    errors = [line for line in text.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, text
    return errors[0]


def mappings(messages: list) -> list[wire.Mapping]:
    return [m for m in messages if isinstance(m, wire.Mapping)]


def db_rows(db: Path | str, sql: str, *params: object) -> list[tuple]:
    """Rows of ``sql`` (``?`` placeholders, blobs as bytes) from an SQLite file
    or a PostgreSQL URL, read in a session that cannot write."""
    if is_postgres(str(db)):
        coro = _pg_rows(str(db), numbered(sql), params)
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return run(coro)
        # Called from a test's coroutine: read beside its loop, blocking it
        # as the SQLite read does.
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            return pool.submit(run, coro).result()
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return [
            tuple(bytes(v) if isinstance(v, memoryview) else v for v in row)
            for row in conn.execute(sql, params)
        ]
    finally:
        conn.close()


async def _pg_rows(url: str, sql: str, params: tuple) -> list[tuple]:
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        await conn.execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
        return [tuple(r) for r in await conn.fetch(sql, *params)]
    finally:
        await conn.close()


def ops_conn(db: Path | str, *, create: bool = False, readonly: bool = False):
    """An operator-side connection (nat64ho.ops.db.Conn) to an SQLite file or
    a PostgreSQL URL; ``create`` makes the tables first."""
    return opsdb.connect(db, create=create, readonly=readonly)


ENTRY_COLUMNS = ("nat", "port", "addr", "aport", "created", "last_use")


def make_tables(db: Path | str, *, entries=(), events=(), nats=()) -> Path | str:
    """The tables of ``db`` on either backend (made if missing), with rows
    written directly as a server would have: ``entries`` (nat, port, addr,
    aport, created, last_use), ``events`` (ts, kind, nat, port, addr, aport),
    ``nats`` (nat, boot_id, first_hello, last_hello). Returns ``db``."""
    conn = ops_conn(db, create=True)
    try:
        with opsdb.atomic(conn):
            conn.insert_many("entry", ENTRY_COLUMNS, entries, ignore=False)
            conn.insert_many("event", opsdb.EVENT_COLUMNS, events, ignore=True)
            conn.insert_many("nat", ("nat", "boot_id", "first_hello", "last_hello"), nats, False)
    finally:
        conn.close()
    return db


def db_exec(db: Path | str, sql: str, *params: object) -> None:
    """Run one writing statement (``?`` placeholders) on either backend,
    behind nat64ho's back (to plant what a test needs)."""
    if is_postgres(str(db)):
        run(_pg_exec(str(db), numbered(sql), params))
        return
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        conn.execute(sql, params)
    finally:
        conn.close()


async def _pg_exec(url: str, sql: str, params: tuple) -> None:
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        await conn.execute(sql, *params)
    finally:
        await conn.close()


def db_state(db: Path | str) -> object:
    """Everything a read command could change: the SQLite file's octets (the
    WAL checkpointed first), or every table's rows, the event id sequence
    and the list of tables on PostgreSQL."""
    if is_postgres(str(db)):
        tables = [
            r[0]
            for r in db_rows(
                db, "SELECT tablename FROM pg_tables WHERE schemaname = current_schema() ORDER BY 1"
            )
        ]
        rows = {t: sorted(db_rows(db, f"SELECT * FROM {t}"), key=repr) for t in tables}
        seq = db_rows(
            db, "SELECT relname, pg_sequence_last_value(oid) FROM pg_class WHERE relkind = 'S'"
        )
        return tables, rows, seq
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return Path(db).read_bytes()


def absent_db(db: Path | str) -> Path | str:
    """A database like ``db`` (same backend) that does not exist."""
    if is_postgres(str(db)):
        return str(db).replace("///", "///absent_", 1)
    return Path(db).parent / "sub" / "none.db"


def db_exists(db: Path | str) -> bool:
    """Whether the database (the file, or the PostgreSQL database) exists."""
    if is_postgres(str(db)):
        name = str(db).split("///", 1)[1].split("?", 1)[0]
        base = str(db).replace(f"///{name}", "///postgres", 1)
        return bool(db_rows(base, "SELECT 1 FROM pg_database WHERE datname = ?", name))
    return Path(db).exists() or Path(db).parent.exists()


@contextlib.contextmanager
def table_owned(db: Path | str):
    """Hold the table's ownership the way a running server does: the flock
    beside an SQLite file, the advisory lock on PostgreSQL (in a thread of
    its own, so the session stays open while the test runs commands)."""
    if not is_postgres(str(db)):
        from nat64ho.storage import owner

        held = owner.acquire(db, what="test")
        try:
            yield
        finally:
            held.release()
        return
    import asyncpg

    from nat64ho.storage.pg_schema import OWNER_LOCK

    held, done = threading.Event(), threading.Event()

    async def hold() -> None:
        conn = await asyncpg.connect(str(db))
        try:
            await conn.execute("SET application_name = 'nat64ho serve (test)'")
            await conn.execute("SELECT pg_advisory_lock($1)", OWNER_LOCK)
            held.set()
            while not done.is_set():
                await asyncio.sleep(0.02)
        finally:
            await conn.close()

    t = threading.Thread(target=asyncio.run, args=(hold(),), daemon=True)
    t.start()
    assert held.wait(10), "could not take the owner lock"
    try:
        yield
    finally:
        done.set()
        t.join(10)


class Follower:
    """``export --follow --format jsonl`` in a child, its lines in a queue."""

    def __init__(self, db, *extra: str):
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "nat64ho",
                "export",
                "--follow",
                "--format",
                "jsonl",
                "--db",
                str(db),
                *extra,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self):
        for line in self.proc.stdout:
            self.lines.put(line)

    def take_until(self, seq: int, timeout: float = 60.0) -> list[dict]:
        """Lines until the event ``seq`` has come."""
        out = []
        deadline = time.monotonic() + timeout
        while not out or out[-1]["seq"] < seq:
            out.append(json.loads(self.lines.get(timeout=max(0.1, deadline - time.monotonic()))))
        return out


def entries(db: Path | str) -> dict[tuple[bytes, int], int]:
    """(IPv6 address, port) -> NAT port of every entry, read without writing."""
    return {(a, ap): p for p, a, ap in db_rows(db, "SELECT port, addr, aport FROM entry")}


def table_rows(db: Path | str) -> dict[tuple[int, int], tuple[bytes, int]]:
    """(NAT64, port) -> endpoint of every entry, read without writing."""
    return {
        (n, p): (a, ap) for n, p, a, ap in db_rows(db, "SELECT nat, port, addr, aport FROM entry")
    }


def digest(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


class Recorder:
    """A transport for an in-process server that keeps what it sends."""

    def __init__(self):
        self.sent: list[tuple[bytes, tuple]] = []

    def sendto(self, data, addr):
        self.sent.append((data, addr))

    def is_closing(self):
        return False

    def get_extra_info(self, name, default=None):
        return default


def tmpfs(where: Path, size: str) -> Path:
    """A fresh tmpfs of ``size`` mounted on ``where`` (made here)."""
    where.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "nat64ho-test", str(where)],
        capture_output=True,
        text=True,
    )
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs (needs root): {r.stderr.strip()}")
    return where


def umount(where: Path) -> None:
    if subprocess.run(["umount", str(where)]).returncode:
        subprocess.run(["umount", "-l", str(where)], check=True)


def fill(directory: Path) -> Path:
    """Write a file until the filesystem refuses more; returns it."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    chunk = b"\0" * 65536
    try:
        while True:
            try:
                os.write(fd, chunk)
            except OSError:
                if len(chunk) == 1:
                    break
                chunk = chunk[: len(chunk) // 2]
    finally:
        os.close(fd)
    return filler
