"""The segment table: where the archive lives (files beside an SQLite
database, table segment_data on PostgreSQL), and the recorded segments."""

from __future__ import annotations

import builtins
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nat64ho.archive import chain
from nat64ho.ops.db import Conn, HistoryError, arg, atomic, db_file

_COLUMNS = (
    "n, file, first_id, last_id, ts_lo, ts_hi, events, initialized, created, deleted, "
    "bytes, sha256, chain, sealed, pruned, cut_ts, cut_id, pending"
)
#: meta key of an archive directory given with --archive (absolute path).
META_DIR = "archive_dir"


@dataclass(frozen=True)
class Segment:
    n: int
    file: str
    first_id: int
    last_id: int
    ts_lo: int
    ts_hi: int
    events: int
    initialized: int
    created: int
    deleted: int
    size: int
    sha256: builtins.bytes
    chain: builtins.bytes
    sealed: int
    pruned: int | None
    cut_ts: int  #: the segment took the hot events with ts < cut_ts
    cut_id: int  #: and id <= cut_id
    pending: int  #: 1 while those may still be in the hot tier too

    @property
    def period(self) -> tuple[int, int, int, int]:
        return (self.first_id, self.last_id, self.ts_lo, self.ts_hi)

    @property
    def counts(self) -> tuple[int, int, int, int]:
        return (self.events, self.initialized, self.created, self.deleted)

    def link(self, previous: builtins.bytes) -> builtins.bytes:
        return chain.link(previous, self.sha256, self.period, self.counts)


def in_database(conn: Conn) -> bool:
    """Whether segments live in the database itself (PostgreSQL: a standby
    has them) rather than as files beside it (SQLite)."""
    return conn.sql.postgres


def data(conn: Conn, n: int) -> builtins.bytes | None:
    """The octets of segment ``n`` kept in the database; None if absent."""
    row = conn.execute("SELECT data FROM segment_data WHERE n = $1", (n,)).fetchone()
    return None if row is None else builtins.bytes(row[0])


def data_range(conn: Conn, n: int, offset: int, length: int) -> builtins.bytes | None:
    """``length`` octets of segment ``n`` from ``offset`` (PostgreSQL keeps
    them uncompressed in TOAST, so only the chunks asked for are read)."""
    row = conn.execute(
        "SELECT substring(data FROM $1 FOR $2) FROM segment_data WHERE n = $3",
        (offset + 1, length, n),
    ).fetchone()
    return None if row is None else builtins.bytes(row[0])


def segments(conn: Conn, *, live: bool = False) -> list[Segment]:
    """Recorded segments by n; ``live``: only those not pruned."""
    sql = f"SELECT {_COLUMNS} FROM segment"
    if live:
        sql += " WHERE pruned IS NULL"
    return [Segment(*r) for r in conn.execute(sql + " ORDER BY n")]


def pending(conn: Conn) -> list[tuple[int, int]]:
    """(cut_ts, cut_id) of segments whose events may still be hot too, but
    for the cuts another covers: a seal alone leaves one a period, and
    readers test each of them on every hot event."""
    cuts = sorted(
        conn.execute("SELECT cut_ts, cut_id FROM segment WHERE pending = 1"), reverse=True
    )
    kept: list[tuple[int, int]] = []
    for t, i in cuts:
        if not kept or i > kept[-1][1]:  # not within one with a later ts and as high an id
            kept.append((t, i))
    return kept


def pending_held(args: list[Any], cuts: list[tuple[int, int]]) -> str:
    """A condition on table event, true for a hot event that a pending
    segment holds too (its placeholders appended to ``args``). The cuts of
    one pass overlap, so it is their union: never one test per cut."""
    return " OR ".join(f"(ts < {arg(args, t)} AND id <= {arg(args, i)})" for t, i in cuts)


def default_dir(db: Path) -> Path:
    """``archive/`` beside the database."""
    return db.parent / "archive"


def archive_dir(conn: Conn) -> Path:
    """Where this database's segment files are."""
    row = conn.execute("SELECT value FROM meta WHERE key = $1", (META_DIR,)).fetchone()
    if row is not None:
        value = row[0]
        return Path(value.decode() if isinstance(value, bytes) else value)
    return default_dir(db_file(conn))


def use_dir(conn: Conn, directory: Path) -> None:
    """Make ``directory`` this database's archive (``--archive``); refused
    while live segments are elsewhere."""
    if in_database(conn):
        raise HistoryError(
            f"--archive {directory}: on PostgreSQL the segments are kept in the database itself"
        )
    new, old = directory.resolve(), archive_dir(conn).resolve()
    if new == old:
        return
    if segments(conn, live=True):
        raise HistoryError(f"--archive {directory}: the segments of this database are in {old}")
    with atomic(conn):
        set_archive_dir(conn, new)


def set_archive_dir(conn: Conn, directory: Path) -> None:
    """Record ``directory`` (made absolute) as where segments go; the default
    needs no record."""
    directory = directory.resolve()
    if directory == default_dir(db_file(conn)).resolve():
        conn.execute("DELETE FROM meta WHERE key = $1", (META_DIR,))
    else:
        conn.execute(
            "INSERT INTO meta (key, value) VALUES ($1, $2) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (META_DIR, str(directory).encode()),
        )


def file_name(n: int, token: str) -> str:
    return f"segment-{n:08d}-{token}.parquet"


@dataclass(frozen=True)
class Totals:
    """The sealed tier at a glance: live segments, their events and octets."""

    segments: int
    events: int
    size: int

    @property
    def bytes_per_event(self) -> float | None:
        return round(self.size / self.events, 2) if self.events else None


def totals(conn: Conn) -> Totals:
    n, events, size = conn.execute(
        "SELECT count(*), coalesce(sum(events), 0), coalesce(sum(bytes), 0) FROM segment "
        "WHERE pruned IS NULL"
    ).fetchone()
    return Totals(int(n), int(events), int(size))


def summary(conn: Conn) -> str | None:
    """One line for ``stats``: the sealed tier's totals, None without one."""
    t = totals(conn)
    if not t.segments:
        return None
    hot = conn.execute("SELECT count(*) FROM event").fetchone()[0]
    return (
        f"Sealed history: {t.segments} segments, {t.events} events, {t.size} bytes "
        f"({t.size / max(t.events, 1):.1f} bytes/event); {hot} events not yet sealed."
    )
