"""Sealing: moving closed periods of the hot tier into segments.

Order, so that a SIGKILL anywhere leaves every event exactly once as every
reader sees it: one read of the hot tier (several periods, whole) gives one
file per period, each written, fsynced and renamed into place; then one
transaction records those segments, pending, each with the cut of its
period (ts < cut_ts, id <= cut_id; the last cut covers the earlier ones);
then their events leave the hot tier a batch per transaction and the
segments stop being pending. Killed before the record's commit, the events
are still hot and the files are unrecorded: :func:`remove_orphans` (run by
whoever owns the table: a seal, a server start, ``check``) deletes them.
Killed while deleting, the next seal finishes; readers skip the hot events
a pending segment holds meanwhile. On PostgreSQL the segments' octets go
into table segment_data in the transaction that records them, so there are
no files and nothing to leave behind."""

from __future__ import annotations

import bisect
import contextlib
import contextvars
import gc
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from nat64ho.archive import catalog, chain
from nat64ho.archive.catalog import Segment
from nat64ho.ops.db import Conn, atomic, bad_row, id_event_ok
from nat64ho.ops.export import settled_id

#: The period of segments made outside a server (an import's).
DEFAULT_PERIOD_US = 3600 * 1_000_000
#: Sealed events deleted from the hot tier per transaction.
DELETE_BATCH = 2000
#: Hot events one seal pass holds in memory, in whole periods: alone, and
#: in a server's sealer (whose memory is the server's).
PASS_EVENTS = 2_000_000
SERVER_PASS_EVENTS = 250_000
#: Periods one seal pass makes segments of, at most (recorded in one transaction).
PASS_PERIODS = 24
#: Set while a seal runs with nobody else writing (the caller owns the table).
_ALONE: contextvars.ContextVar[bool] = contextvars.ContextVar("seal_alone", default=False)
#: Hot events read at a time by a seal, turned into columns before the next.
READ_CHUNK = 65_536
#: Page cache of a connection while it deletes sealed events (KiB): the
#: pages of the event indexes those deletes touch.
DELETE_CACHE_KIB = 256 * 1024
#: A seal alone rebuilds the hot tier's indexes rather than delete from them
#: when it seals at least this many events and REBUILD_RATIO times as many
#: as stay hot. Measured on a million events: a delete costs 2.7 µs a
#: row with the three indexes and 0.3 without; a build 1.4 µs a survivor.
REBUILD_AT_LEAST = 100_000
REBUILD_RATIO = 1
#: Sealed events a seal alone leaves hot before it deletes them: bounds
#: its delete's transaction (its WAL: about 200 bytes an event).
DEFER_EVENTS = 20_000_000


def orphans(conn: Conn, directory: Path | None = None) -> list[Path]:
    """Files in the archive directory that no live segment records:
    interrupted seals (and files of pruned segments not yet unlinked)."""
    if catalog.in_database(conn):
        return []
    directory = directory or catalog.archive_dir(conn)
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    recorded = {s.file for s in catalog.segments(conn, live=True)}
    return sorted(
        directory / name
        for name in names
        if name.startswith("segment-")
        and (name.endswith(".tmp") or name.endswith(".parquet"))
        and name not in recorded
    )


def remove_orphans(conn: Conn) -> list[Path]:
    """Delete :func:`orphans`; only the table's owner may (a seal in flight
    of another process has an unrecorded file too)."""
    found = orphans(conn)
    for path in found:
        path.unlink(missing_ok=True)
    return found


def period_start(ts: int, period_us: int) -> int:
    return ts - ts % period_us


def seal(
    conn: Conn,
    *,
    before: int,
    period_us: int,
    now: Callable[[], int] = lambda: time.time_ns() // 1000,
    stop: Callable[[], bool] = lambda: False,
    alone: bool = False,
) -> list[Segment]:
    """Seal the hot tier's events of every period that ends by ``before``,
    one segment per period (periods are ``period_us`` long, aligned to the
    epoch). Returns the new segments. ``stop``: checked between passes.
    ``alone``: no server writes meanwhile (the caller owns the table), so
    the sealed events leave the hot tier after the last pass (or every
    DEFER_EVENTS), in one transaction, rather than after each pass in
    batches that a server's commits can come between: a long backlog
    dirties each index page once and leaves few enough events that its
    indexes are built again. Every pass then seals up to the first pass's
    last id: what an import adds meanwhile stays hot for the next seal."""
    made: list[Segment] = []
    directory = None
    if not catalog.in_database(conn):
        directory = catalog.archive_dir(conn)
        directory.mkdir(mode=0o750, parents=True, exist_ok=True)
    token = _ALONE.set(alone)
    try:
        finish_pending(conn)  # what a killed seal left
        after: tuple[int, int] | None = None  # alone: the cut of the passes still hot
        deferred = 0
        while not stop():
            with _gc_paused() if alone else contextlib.nullcontext():
                segs = seal_pass(
                    conn, directory, before=before, period_us=period_us, now=now, after=after
                )
            if not segs:
                break
            made += segs
            if alone:
                after = (segs[-1].cut_ts, segs[-1].cut_id)
                deferred += sum(s.events for s in segs)
                if deferred >= DEFER_EVENTS:  # bounds the transaction (and its WAL)
                    finish_pending(conn)
                    deferred = 0
        if alone:
            finish_pending(conn)
    finally:
        _ALONE.reset(token)
    return made


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """No cyclic collection while a seal alone reads its rows: the fresh
    tuples of a pass set it off a thousand times, each walking all of them
    (it tripled the time to turn the rows into columns). They hold no
    cycles. Not in a server's sealer: the switch is the whole process's."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def seal_pass(
    conn: Conn,
    directory: Path | None,
    *,
    before: int,
    period_us: int,
    now: Callable[[], int],
    after: tuple[int, int] | None = None,
) -> list[Segment]:
    """Seal the oldest closed periods of the hot tier, up to PASS_PERIODS
    and about PASS_EVENTS events of them (a single larger period whole),
    one segment each, from one read of the hot tier. Events of a period
    sealed earlier (a log imported since, a wall clock that stepped back)
    go into a segment of their own. A pass alone leaves its events hot
    (pending) for :func:`seal` to delete; ``after``: the cut (ts, id) its
    earlier passes sealed up to, whose events may still be hot."""
    # Past the earlier passes' events, and not from an import's newer ones.
    since = "" if after is None else f" AND ts >= {int(after[0])} AND id <= {int(after[1])}"
    first = conn.execute(f"SELECT min(ts) FROM event WHERE TRUE{since}").fetchone()[0]
    if first is None or type(first) is not int or first >= before:
        return []
    # Up to the last id read now: a server's later commits are not in the
    # files, so they must not be deleted with them either. On PostgreSQL an
    # id below it may still commit (an import's): wait for those first.
    last = settled_id(conn) if after is None else after[1]
    if last is None:
        last = conn.execute("SELECT max(id) FROM event").fetchone()[0]
    end = min(before, period_start(first, period_us) + PASS_PERIODS * period_us)
    most = PASS_EVENTS if _ALONE.get() else SERVER_PASS_EVENTS
    table, end = _hot_table(conn, first, end, last, most, period_us, since)
    if table is None:
        return []
    return seal_table(conn, directory, table, end, last, period_us, now, finish=not _ALONE.get())


def _hot_table(
    conn: Conn, first: int, end: int, cut_id: int, most: int, period_us: int, since: str
) -> tuple[Any | None, int]:
    """The hot events with ts < ``end`` and id <= ``cut_id``, by ts, as a
    segment table (None: none) of whole periods: about ``most`` events, a
    single larger period whole (``first``: the oldest event's time); and
    the time it ends at. Read a chunk at a time into columns, so that only
    the columns are held (41 bytes an event; as rows, 285)."""
    cur = conn.execute(
        f"SELECT id, ts, kind, nat, port, addr, aport FROM {conn.sql.event_by_ts} "
        f"WHERE ts < $1 AND id <= $2{since} ORDER BY ts",
        (end, cut_id),
    )
    tables, n, cut = [], 0, None
    while rows := cur.fetchmany(READ_CHUNK):
        if cut is None and n + len(rows) > most:
            # Whole periods only: up to the one the limit falls in, or the
            # first one whole.
            over = period_start(rows[most - n][1], period_us)
            cut = min(end, max(over, period_start(first, period_us) + period_us))
        past = cut is not None and rows[-1][1] >= cut
        if past:
            rows = rows[: bisect.bisect_left(rows, cut, key=lambda r: r[1])]
        if rows:
            tables.append(_checked_table(conn, rows))
        n += len(rows)
        if past:
            break
    cur.close()  # a statement (PostgreSQL: a cursor's transaction) left unread
    if cut is None:
        cut = end
    # The period cut at may have begun chunks before the one that set it.
    while tables and tables[-1]["ts"][-1].as_py() >= cut:
        last = tables.pop()
        keep = bisect.bisect_left(last["ts"].to_pylist(), cut)
        if keep:
            tables.append(last.slice(0, keep))
            break
    import pyarrow as pa  # only where something is sealed

    return (pa.concat_tables(tables) if tables else None), cut


def seal_table(
    conn: Conn,
    directory: Path | None,
    table: Any,
    cut_ts: int,
    cut_id: int,
    period_us: int,
    now: Callable[[], int],
    *,
    finish: bool = True,
) -> list[Segment]:
    """Move ``table``, the hot events with ts < cut_ts and id <= cut_id in ts
    order, into one new segment per period; then (``finish``) their events
    leave the hot tier."""
    ts = table.column("ts")

    def at(i: int) -> int:  # a few dozen lookups: no list of every time
        return int(ts[i].as_py())

    parts = []
    lo, n = 0, table.num_rows
    while lo < n:
        end = min(cut_ts, period_start(at(lo), period_us) + period_us)
        hi = bisect.bisect_left(range(n), end, lo, key=at)
        if hi == lo:  # an event at or past the cut: a bug above, not a loop forever
            raise AssertionError(f"event at {at(lo)} in a seal cut at {cut_ts}")
        # Each with the cut of its period's end: the last covers the others.
        parts.append((table.slice(lo, hi - lo), end, cut_id))
        lo = hi
    made = write_segments(conn, directory, parts, now, pending=True)
    if finish:
        finish_pending(conn)
    return made


def write_segments(
    conn: Conn,
    directory: Path | None,
    parts: list[tuple[Any, int, int]],
    now: Callable[[], int],
    *,
    pending: bool,
) -> list[Segment]:
    """One new segment for each ``(table, cut_ts, cut_id)`` of ``parts``: a
    file in ``directory`` (fsynced, renamed into place) or (None) octets
    in the database, then all recorded in one transaction, chained in
    order. ``pending``: their events may still be hot too (a seal)."""
    from nat64ho.archive import segment  # pyarrow: only where something is sealed

    segs = catalog.segments(conn)
    n = segs[-1].n + 1 if segs else 1
    previous = segs[-1].chain if segs else chain.GENESIS
    records = []
    for table, cut_ts, cut_id in parts:
        # A name no other sealer can pick: two that raced for n never
        # replace each other's file (the loser's commit fails, its files
        # are orphans).
        name = catalog.file_name(n, os.urandom(4).hex())
        octets = None
        if directory is None:
            octets, written = segment.encode(table)
        else:
            written = segment.write(table, directory / name, durable=False)
        period = (written.first_id, written.last_id, written.ts_lo, written.ts_hi)
        counts = (written.events, written.initialized, written.created, written.deleted)
        previous = chain.link(previous, written.sha256, period, counts)
        records.append(
            (n, name, *period, *counts, written.size, written.sha256, previous, now(), cut_ts)
            + (cut_id, int(pending), octets)
        )
        n += 1
    if directory is not None and records:
        segment.fsync_dir(directory)  # every file's rename, before any is recorded
    with atomic(conn):
        for *row, octets in records:
            conn.execute(
                "INSERT INTO segment (n, file, first_id, last_id, ts_lo, ts_hi, events, "
                "initialized, created, deleted, bytes, sha256, chain, sealed, cut_ts, cut_id, "
                "pending) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, "
                "$15, $16, $17)",
                tuple(row),
            )
            if octets is not None:
                conn.execute("INSERT INTO segment_data (n, data) VALUES ($1, $2)", (row[0], octets))
    return catalog.segments(conn)[-len(records) :] if records else []


def _checked_table(conn: Conn, rows: list[tuple[Any, ...]]) -> Any:
    """``rows`` as a segment table; a row that does not decode raises
    bad_row, as every reader of the hot tier does."""
    from nat64ho.archive import segment

    try:
        table = segment.table_from_rows(rows)
        if segment.rows_decode(table):
            return table
    except (ValueError, TypeError, OverflowError):  # pyarrow's errors derive from these
        pass
    for r in rows:
        if not id_event_ok(r):
            raise bad_row(conn, r, id_event_ok)
    return segment.table_from_rows(rows)


def finish_pending(conn: Conn) -> int:
    """Delete from the hot tier the events of segments still pending, by
    ranges of ids (a walk of the table's tree in order), DELETE_BATCH ids a
    transaction so that a server's commits wait for one batch at most, or
    all in one in a seal that is alone (which dirties each index page
    once); returns how many. Until done, readers skip those events (see
    :func:`nat64ho.archive.tiers.sealed_hot`). The deletes need not reach
    the disk at once: one lost in a crash leaves its events hot and the
    segment pending, which the next seal finishes."""
    total = 0
    # Only the cuts no other covers (a pass of several periods records one
    # a period, and the last one covers the others).
    cuts = catalog.pending(conn)
    if not cuts:
        return 0
    # The events a pending segment took are all at or below its last id.
    top = conn.execute("SELECT max(last_id) FROM segment WHERE pending = 1").fetchone()[0]
    step = None if _ALONE.get() else DELETE_BATCH
    with _lazy_commits(conn):
        for cut_ts, cut_id in cuts:
            hi = min(cut_id, top)
            if step is None and not conn.sql.postgres:
                total += _delete_rebuilding(conn, hi, cut_ts)
                # Whatever it left (too few to rebuild for) goes below.
            lo = conn.execute("SELECT min(id) FROM event").fetchone()[0]
            while lo is not None and lo <= hi:
                end = hi if step is None else min(hi, lo + step - 1)
                with atomic(conn):
                    if conn.sql.postgres:
                        conn.execute("SET LOCAL synchronous_commit = off")
                    total += conn.execute(
                        "DELETE FROM event WHERE id >= $1 AND id <= $2 AND ts < $3",
                        (lo, end, cut_ts),
                    ).rowcount
                # Past a gap of ids (those of imported segments) at once.
                lo = conn.execute("SELECT min(id) FROM event WHERE id > $1", (end,)).fetchone()[0]
            with atomic(conn):
                conn.execute(
                    "UPDATE segment SET pending = 0 WHERE pending = 1 AND cut_ts <= $1 "
                    "AND cut_id <= $2",
                    (cut_ts, cut_id),
                )
    return total


def _delete_rebuilding(conn: Conn, hi: int, cut_ts: int) -> int:
    """SQLite, a seal alone: delete the hot events with id <= ``hi`` and ts <
    ``cut_ts`` with the event table's indexes dropped, then build them again
    over what stays, all in one transaction; returns how many (0: not done,
    too few). Deleting a row seeks and rewrites a page of each index, where
    a build sorts only the survivors (see REBUILD_AT_LEAST):
    worth it when those are fewer than the sealed, as in a seal that
    catches up on a history (``nat64ho seal`` after an upgrade, an import)."""
    doomed = conn.execute(
        "SELECT count(*) FROM event WHERE ts < $1 AND id <= $2", (cut_ts, hi)
    ).fetchone()[0]
    if doomed < REBUILD_AT_LEAST:
        return 0
    survivors = conn.execute("SELECT count(*) FROM event").fetchone()[0] - doomed
    if survivors * REBUILD_RATIO > doomed:
        return 0
    with atomic(conn):
        indexes = conn.execute(
            "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND tbl_name = 'event' "
            "AND sql IS NOT NULL ORDER BY name"
        ).fetchall()
        for name, _ in indexes:
            conn.execute(f'DROP INDEX "{name}"')
        n = conn.execute("DELETE FROM event WHERE id <= $1 AND ts < $2", (hi, cut_ts)).rowcount
        for _, sql in indexes:
            conn.execute(sql)
    return int(n)


@contextlib.contextmanager
def _lazy_commits(conn: Conn) -> Iterator[None]:
    """SQLite: commits that wait for no fsync (WAL keeps them in order, so
    a crash loses a suffix of them), and room to cache the index pages the
    deletes touch; put back as they were."""
    if conn.sql.postgres:
        yield
        return
    sync = conn.execute("PRAGMA synchronous").fetchone()[0]
    cache = conn.execute("PRAGMA cache_size").fetchone()[0]
    conn.execute("PRAGMA synchronous = NORMAL")
    if _ALONE.get():  # a server's sealer keeps to the server's memory
        conn.execute(f"PRAGMA cache_size = {-DELETE_CACHE_KIB}")
    try:
        yield
    finally:
        conn.execute(f"PRAGMA synchronous = {int(sync)}")
        conn.execute(f"PRAGMA cache_size = {int(cache)}")


def open_target(db: Path | str) -> Conn:
    """A connection of its own to an SQLite file or a PostgreSQL URL (the
    server's threads: sealing, retention)."""
    from nat64ho.ops import db as opsdb

    return opsdb.connect(db, readonly=False, name="nat64ho seal")


def seal_db(db: Path | str, period_s: float, directory: Path | None = None) -> list[Segment]:
    """One round of the server's sealing: its own connection, unrecorded
    files of a killed round removed (the server owns the table), then every
    closed period sealed (into ``directory`` if given: serve --archive, on
    SQLite). Runs in a thread, off the datagram path."""
    period_us = max(1, int(period_s * 1_000_000))
    conn = open_target(db)
    try:
        if directory is not None and not catalog.in_database(conn):
            catalog.use_dir(conn, directory)
        remove_orphans(conn)
        cutoff = period_start(time.time_ns() // 1000, period_us)
        return seal(conn, before=cutoff, period_us=period_us)
    finally:
        conn.close()


def seal_after_import(conn: Conn, *, owned: bool = False) -> list[Segment]:
    """An import into an archived history: its events of closed periods go
    into segments now if this process can own the table (``owned``: it
    does already); else the owning server's next round seals them."""
    from nat64ho.archive import tiers

    if not tiers.has_segments(conn):
        return []
    if owned:
        return seal_closed(conn)
    with owning(conn, "import") as mine:
        return seal_closed(conn) if mine else []


def seal_closed(conn: Conn) -> list[Segment]:
    """Seal the hot events of every closed period of DEFAULT_PERIOD_US."""
    now = time.time_ns() // 1000
    return seal(
        conn, before=period_start(now, DEFAULT_PERIOD_US), period_us=DEFAULT_PERIOD_US, alone=True
    )


@contextlib.contextmanager
def owning(conn: Conn, what: str) -> Iterator[bool]:
    """Own the table for the block unless a server does (the lock file on
    SQLite, the advisory lock on PostgreSQL); yields whether it is owned."""
    from nat64ho.storage import owner

    try:
        release = conn.take_table(what)
    except owner.TableOwned:
        yield False
        return
    try:
        yield True
    finally:
        release()
