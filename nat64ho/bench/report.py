"""The report of ``nat64ho bench``: one run (the server under load, then
the ceilings), the raw SQLite ceilings (new rows into an empty table, and
the server's own rows replayed), and the table printed."""

from __future__ import annotations

import contextlib
import os
import random
import sqlite3
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from nat64ho.bench.load import (
    MODES,
    BenchConfig,
    Result,
    drive,
    loop_name,
    nat_source,
    start_echo,
)
from nat64ho.eventlog import EventKind
from nat64ho.storage import schema
from nat64ho.testing import start_server

#: Batch sizes tried for the raw SQLite ceiling; the best one is reported.
SQLITE_BATCHES = (20, 200, 2000, 10000)
#: Seconds the SQLite ceiling spends on each batch size.
SQLITE_SECONDS = 0.7
#: Entries a commit when ``nat64ho bench`` replays its server's rows.
REPLAY_BATCH = 2000
#: New entries per transaction while a replay fills its table untimed.
PREFILL_COMMIT = 5000


def sqlite_ceiling(
    directory: Path,
    sync: str,
    nats: int,
    batches: tuple[int, ...] = SQLITE_BATCHES,
    seconds: float = SQLITE_SECONDS,
) -> tuple[float, int]:
    """Entries/s of raw inserts of what a new entry costs the store (its row
    and its Created event, same schema, same statements, same synchronous
    mode), one transaction per batch; returns the best rate and its batch."""
    from nat64ho.sql import INSERT_EVENT, UPSERT_ENTRY
    from nat64ho.storage.sqlite import PAGE_CACHE_KIB

    path = directory / "ceiling.db"
    conn = schema.open_db(path, create=True)
    conn.execute(f"PRAGMA cache_size = -{PAGE_CACHE_KIB}")
    conn.execute(f"PRAGMA synchronous = {'FULL' if sync == 'full' else 'NORMAL'}")
    rng = random.Random(1)
    serial = 0
    best = (0.0, batches[0])
    try:
        for size in batches:
            spent = 0.0
            done = 0
            wall_end = time.perf_counter() + 3 * seconds
            while spent < seconds and time.perf_counter() < wall_end:
                ts = time.time_ns() // 1000
                entries, events = [], []
                for _ in range(size):
                    serial += 1
                    nat = (127 << 24) + serial % nats
                    port = rng.randint(1028, 65535)
                    addr = b"\x20\x01\x0d\xb8" + serial.to_bytes(12, "big")
                    entries.append((nat, port, addr, 443, ts, ts))
                    events.append((ts, EventKind.CREATED, nat, port, addr, 443))
                t = time.perf_counter()
                conn.execute("BEGIN IMMEDIATE")
                try:
                    conn.executemany(UPSERT_ENTRY, entries)
                    conn.executemany(INSERT_EVENT, events)
                    conn.execute("COMMIT")
                except sqlite3.IntegrityError:
                    # A random endpoint that collides is vanishingly rare;
                    # drop the batch rather than bend the statements.
                    conn.execute("ROLLBACK")
                    continue
                spent += time.perf_counter() - t
                done += size
            if spent and done / spent > best[0]:
                best = (done / spent, size)
    finally:
        conn.close()
    return best


class Replay(NamedTuple):
    """Raw SQLite redoing a server's commits: entries/s of commit time, and
    µs of CPU per entry (SQLite's and the kernel's, in the committing thread)."""

    rate: float
    cpu_us: float


def sqlite_replay(src: Path, directory: Path, sync: str, per_commit: int, timed: int) -> Replay:
    """Raw SQLite writing the rows a server wrote: the events of the server's
    database ``src`` in log order (with each ``Created`` its entry row, as
    the store writes them), in transactions of ``per_commit`` new entries,
    into a fresh database with the same schema, statements and synchronous
    mode, and SQLite's own checkpoints. Only the last ``timed`` new entries
    are timed; those before fill the table untimed, in big transactions, so
    that the timed ones meet the table and history the server's met.
    Leaves its database at ``directory/replay.db``."""
    from nat64ho.sql import INSERT_EVENT, UPSERT_ENTRY
    from nat64ho.storage.sqlite import PAGE_CACHE_KIB

    with contextlib.closing(schema.open_db(src, readonly=True)) as source:
        rows = source.execute(
            "SELECT ts, kind, nat, port, addr, aport FROM event ORDER BY id"
        ).fetchall()
    created = sum(1 for r in rows if r[1] == EventKind.CREATED)
    untimed = max(0, created - timed)
    path = directory / "replay.db"
    conn = schema.open_db(path, create=True)
    conn.execute(f"PRAGMA cache_size = -{PAGE_CACHE_KIB}")
    conn.execute(f"PRAGMA synchronous = {'FULL' if sync == 'full' else 'NORMAL'}")
    wall = cpu = 0.0
    done = i = 0
    try:
        while i < len(rows):
            size = per_commit if untimed <= 0 else min(untimed, PREFILL_COMMIT)
            entries: list[tuple] = []
            events: list[tuple] = []
            while i < len(rows) and len(entries) < size:
                ts, kind, nat, port, addr, aport = r = rows[i]
                i += 1
                events.append(r)
                if kind == EventKind.CREATED:
                    entries.append((nat, port, addr, aport, ts, ts))
            t, c = time.perf_counter(), time.thread_time()
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(UPSERT_ENTRY, entries)
            conn.executemany(INSERT_EVENT, events)
            conn.execute("COMMIT")
            if untimed > 0:
                untimed -= len(entries)
            else:
                wall += time.perf_counter() - t
                cpu += time.thread_time() - c
                done += len(entries)
    finally:
        conn.close()
    return Replay(done / wall if wall else 0.0, cpu / done * 1e6 if done else 0.0)


#: Why the server answers ERROR, for the notes under the report.
_WHY = {
    "RATE_LIMITED": "over a NAT64's share (--create-rate, --request-rate)",
    "TABLE_FULL": "no port free and none idle for --min-idle",
    "NOT_ALLOWED": "the source is not in --allow",
    "BAD_COOKIE": "the session was not known (the server restarted its secret?)",
}


def losses(c: dict[str, int]) -> list[tuple[str, str, str, str]]:
    """The rows that count what did not go as asked."""
    return [
        ("unanswered in time (lost)", f"{c['lost']}", "", ""),
        ("ERROR answers", f"{c['errors']}", "", ""),
        ("DELETED (oldest reused)", f"{c['deleted']}", "", ""),
    ]


def loss_notes(c: dict[str, int], timeout: float, server_drops: str | None) -> list[str]:
    """What the loss rows mean, for those that are not zero."""
    notes = []
    if c["lost"]:
        notes.append(
            f"lost: {c['lost']} requests had no whole answer within {timeout:g} s: the "
            "server dropped them or their answer (its drop counters say why), or the "
            "kernel did (a full socket buffer)"
        )
    for key, n in sorted(c.items()):
        if key.startswith("error ") and n:
            name = key[6:]
            notes.append(f"ERROR {name}: {n}, {_WHY.get(name, 'refused by the server')}")
    if c["deleted"]:
        notes.append(f"DELETED: {c['deleted']} entries made room for new ones (the table was full)")
    if server_drops is not None:
        notes.append(f"the server's own count of dropped datagrams: {server_drops}")
    return notes


def describe(cfg: BenchConfig) -> str:
    """One line: what the run will write, and where."""
    last = nat_source(cfg.nats - 1)
    under = "127.1.0.1" + (f" to {last}" if cfg.nats > 1 else "")
    what = (
        f"new entries as fast as answered for {cfg.duration:g} s"
        if cfg.mode == "create"
        else f"{cfg.entries} entries per NAT64, then {cfg.mode} requests for {cfg.duration:g} s"
    )
    if cfg.server is None:
        where = (
            f"the PostgreSQL database {schema.shown(cfg.db)}"
            if cfg.db
            else "a temporary SQLite database, removed afterwards"
        )
        return (
            f"bench: writes {what} under NAT64s {under} into {where}, served by a server it starts"
        )
    host, port = cfg.server
    return (
        f"bench: writes {what} under NAT64s {under} into the table of the server at "
        f"{host}:{port}; they stay there"
    )


def _drops(lines: list[str]) -> str | None:
    """The drops of a stopped server's last line (``… drops: none``)."""
    for line in reversed(lines):
        if "stopped: " in line and "drops: " in line:
            return line.rsplit("drops: ", 1)[1].strip()
    return None


@dataclass
class Report:
    cfg: BenchConfig
    server: Result
    echo: Result | None = None
    sqlite: tuple[float, int] | None = None
    #: Raw SQLite writing the server's own rows at REPLAY_BATCH a commit.
    replay: Replay | None = None
    #: The started server's own count of datagrams it dropped, by reason.
    server_drops: str | None = None

    def rows(self) -> list[tuple[str, str, str, str]]:
        s, e = self.server, self.echo
        rows = []

        def ratio(a: float, b: float) -> str:
            return f"{a / b:.2f}" if a and b else "-"

        rows.append(
            (
                "messages/s",
                f"{s.messages_per_s:,.0f}",
                f"{e.messages_per_s:,.0f} (echo)" if e else "-",
                ratio(s.messages_per_s, e.messages_per_s if e else 0),
            )
        )
        rows.append(
            (
                "datagrams/s (requests)",
                f"{s.datagrams_per_s:,.0f}",
                f"{e.datagrams_per_s:,.0f} (echo)" if e else "-",
                ratio(s.datagrams_per_s, e.datagrams_per_s if e else 0),
            )
        )
        for q, name in ((0.5, "p50"), (0.99, "p99"), (0.999, "p99.9")):
            v = s.percentile(q)
            ev = e.percentile(q) if e else None
            rows.append(
                (
                    f"latency {name} ms",
                    f"{v * 1e3:.2f}" if v is not None else "-",
                    f"{ev * 1e3:.2f} (echo)" if ev is not None else "-",
                    "",
                )
            )
        if self.cfg.mode == "create":
            # A MAP refused with ERROR created nothing.
            created = (s.counts["messages"] - s.counts["errors"]) / s.seconds
            sq = self.sqlite
            rows.append(
                (
                    "new entries/s",
                    f"{created:,.0f}",
                    f"{sq[0]:,.0f} (sqlite, batch {sq[1]})" if sq else "-",
                    ratio(created, sq[0] if sq else 0),
                )
            )
            rp = self.replay
            rows.append(
                (
                    "  same rows as the server",
                    "",
                    f"{rp.rate:,.0f} (sqlite, batch {REPLAY_BATCH})" if rp else "-",
                    ratio(created, rp.rate if rp else 0),
                )
            )
        rows.append(
            (
                "server CPU (cores)",
                f"{s.cpu:.2f}" if s.cpu is not None else "n/a",
                f"{e.cpu:.2f} (echo)" if e and e.cpu is not None else "-",
                "",
            )
        )
        rows.append(
            (
                "server peak RSS MB",
                f"{s.peak_rss / 2**20:.0f}" if s.peak_rss is not None else "n/a",
                "-",
                "",
            )
        )
        rows.extend(losses(s.counts))
        if self.cfg.rate:
            rows.append(("offered but no free slot", f"{s.counts['unsent']}", "", ""))
        return rows

    def format(self) -> str:
        cfg = self.cfg
        loop = (
            f"{'open loop ' + format(cfg.rate, ',.0f') + ' msg/s' if cfg.rate else 'closed loop'}"
        )
        head = (
            f"nat64ho bench: mode {cfg.mode}, batch {cfg.batch}, window {cfg.window}, {loop}, "
            f"{cfg.duration:g} s, {cfg.clients} client process(es), {cfg.nats} NAT64(s), "
            f"{'PostgreSQL' if cfg.db else 'SQLite sync ' + cfg.sync}, {loop_name()}, {os.cpu_count()} CPUs (clients share them "
            f"with the server)"
        )
        rows = [("", "nat64ho", "ceiling", "ratio")] + self.rows()
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = [head]
        for r in rows:
            lines.append(
                "  ".join(
                    v.ljust(w) if i == 0 else v.rjust(w)
                    for i, (v, w) in enumerate(zip(r, widths, strict=True))
                ).rstrip()
            )
        notes = loss_notes(self.server.counts, cfg.timeout, self.server_drops)
        lines += ["  " + n for n in notes]
        return "\n".join(lines)


def run(cfg: BenchConfig) -> Report:
    """One benchmark: the server under load, then the ceilings."""
    if cfg.mode not in MODES:
        raise ValueError(f"mode {cfg.mode!r}: expected one of {', '.join(MODES)}")
    own_tmp = None
    if cfg.tmp is None:
        own_tmp = tempfile.TemporaryDirectory(prefix="nat64ho-bench-")
        tmp = Path(own_tmp.name)
    else:
        tmp = cfg.tmp
    try:
        if cfg.server is None:
            db = cfg.db or tmp / "table.db"
            child = start_server(db, tmp / "events.log", cfg.sync, cfg.server_args)
            try:
                result = drive(cfg, child.address, child.pid)
            finally:
                child.stop()
            # Its last line comes through the pipe once it has exited.
            deadline = time.monotonic() + 2.0
            while _drops(child.lines) is None and time.monotonic() < deadline:
                time.sleep(0.02)
            drops = _drops(child.lines)
        else:
            result = drive(cfg, cfg.server, cfg.server_pid)
            drops = None
        report = Report(cfg, result, server_drops=drops)
        if cfg.ceilings:
            # Shorter than the main run: a ceiling is steady from the start.
            seconds = min(cfg.duration, 3.0)
            echo = start_echo()
            try:
                report.echo = drive(cfg, echo.address, echo.pid, echo=True, duration=seconds)
            finally:
                echo.stop()
            if cfg.mode == "create" and cfg.db is None:
                report.sqlite = sqlite_ceiling(
                    tmp, cfg.sync, cfg.nats, seconds=min(SQLITE_SECONDS, cfg.duration / 4)
                )
                if cfg.server is None:
                    # The rows this run's server wrote, on the table they met
                    # (evictions and their Deleted events included).
                    report.replay = sqlite_replay(
                        tmp / "table.db", tmp, cfg.sync, REPLAY_BATCH, result.counts["messages"]
                    )
        return report
    finally:
        if own_tmp is not None:
            own_tmp.cleanup()
