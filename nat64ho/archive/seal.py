"""Sealing: moving closed periods of the hot tier into segments.

Order, so that a SIGKILL anywhere leaves every event exactly once as every
reader sees it: the file is written, fsynced and renamed into place; then
one transaction records the segment, pending, with its cut (ts < cut_ts,
id <= cut_id); then its events leave the hot tier a batch per transaction
and the segment stops being pending. Killed before the record's commit, the
events are still hot and the file is unrecorded: :func:`remove_orphans`
(run by whoever owns the table: a seal, a server start, ``check``) deletes
it. Killed while deleting, the next seal finishes; readers skip the hot
events a pending segment holds meanwhile. On PostgreSQL the segment's
octets go into table segment_data in the transaction that records it, so
there are no files and nothing to leave behind.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from nat64ho.archive import catalog, chain
from nat64ho.archive.catalog import Segment
from nat64ho.ops.db import Conn, atomic, bad_row, id_event_ok

#: The period of segments made outside a server (an import's).
DEFAULT_PERIOD_US = 3600 * 1_000_000
#: Sealed events deleted from the hot tier per transaction.
DELETE_BATCH = 5000
#: Events read from the hot tier per query while sealing one segment.
_CHUNK = 65536


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
) -> list[Segment]:
    """Seal the hot tier's events of every period that ends by ``before``,
    one segment per period (periods are ``period_us`` long, aligned to the
    epoch). Returns the new segments. ``stop``: checked between segments."""
    made = []
    directory = None
    if not catalog.in_database(conn):
        directory = catalog.archive_dir(conn)
        directory.mkdir(mode=0o750, parents=True, exist_ok=True)
    finish_pending(conn)  # what a killed seal left
    while not stop():
        seg = seal_one(conn, directory, before=before, period_us=period_us, now=now)
        if seg is None:
            break
        made.append(seg)
    return made


def seal_one(
    conn: Conn, directory: Path | None, *, before: int, period_us: int, now: Callable[[], int]
) -> Segment | None:
    """Seal the oldest closed period of the hot tier, if any: every hot event
    before the end of the period of the oldest one. Events of a period
    sealed earlier (a log imported since, a wall clock that stepped back)
    go into a segment of their own."""
    first = conn.execute("SELECT min(ts) FROM event").fetchone()[0]
    if first is None or type(first) is not int or first >= before:
        return None
    end = min(before, period_start(first, period_us) + period_us)
    # Up to the last id read now: a server's later commits are not in the
    # file, so they must not be deleted with it either.
    last = conn.execute("SELECT max(id) FROM event").fetchone()[0]
    return seal_rows(conn, directory, end, last, now)


def seal_rows(
    conn: Conn, directory: Path | None, cut_ts: int, cut_id: int, now: Callable[[], int]
) -> Segment | None:
    """Move the hot events with ts < cut_ts and id <= cut_id into a new
    segment, a file in ``directory`` or (None) octets in the database; None
    if there are none."""
    from nat64ho.archive import segment  # pyarrow: only where something is sealed

    rows = []
    cur = conn.execute(
        "SELECT id, ts, kind, nat, port, addr, aport FROM event WHERE ts < $1 AND id <= $2",
        (cut_ts, cut_id),
    )
    while chunk := cur.fetchmany(_CHUNK):
        for r in chunk:
            if not id_event_ok(r):
                raise bad_row(conn, r, id_event_ok)
        rows += chunk
    if not rows:
        return None
    segs = catalog.segments(conn)
    n = segs[-1].n + 1 if segs else 1
    previous = segs[-1].chain if segs else chain.GENESIS
    # A name no other sealer can pick: two that raced for n never replace
    # each other's file (the loser's commit fails, its file is an orphan).
    name = catalog.file_name(n, os.urandom(4).hex())
    table = segment.table_from_rows(rows)
    if directory is None:
        octets, written = segment.encode(table)
    else:
        written = segment.write(table, directory / name)
    period = (written.first_id, written.last_id, written.ts_lo, written.ts_hi)
    counts = (written.events, written.initialized, written.created, written.deleted)
    link = chain.link(previous, written.sha256, period, counts)
    with atomic(conn):
        conn.execute(
            "INSERT INTO segment (n, file, first_id, last_id, ts_lo, ts_hi, events, "
            "initialized, created, deleted, bytes, sha256, chain, sealed, cut_ts, cut_id, "
            "pending) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, 1)",
            (n, name, *period, *counts, written.size, written.sha256, link, now(), cut_ts, cut_id),
        )
        if directory is None:
            conn.execute("INSERT INTO segment_data (n, data) VALUES ($1, $2)", (n, octets))
    finish_pending(conn)
    return catalog.segments(conn)[-1]


def finish_pending(conn: Conn) -> int:
    """Delete from the hot tier the events of segments still pending, a
    batch per transaction, so that a server's commits wait for one batch at
    most; returns how many. Until done, readers skip those events (see
    :func:`nat64ho.archive.tiers.sealed_hot`)."""
    total = 0
    for cut_ts, cut_id in catalog.pending(conn):
        while True:
            with atomic(conn):
                n = conn.execute(
                    "DELETE FROM event WHERE id IN "
                    "(SELECT id FROM event WHERE ts < $1 AND id <= $2 LIMIT $3)",
                    (cut_ts, cut_id, DELETE_BATCH),
                ).rowcount
                if n < DELETE_BATCH:
                    conn.execute(
                        "UPDATE segment SET pending = 0 WHERE cut_ts = $1 AND cut_id = $2",
                        (cut_ts, cut_id),
                    )
            total += n
            if n < DELETE_BATCH:
                break
    return total


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


def seal_after_import(conn: Conn) -> list[Segment]:
    """An import into an archived history: its events of closed periods go
    into segments now if this process can own the table; else the owning
    server's next round seals them."""
    from nat64ho.archive import tiers
    from nat64ho.storage import owner

    if not tiers.has_segments(conn):
        return []
    try:
        release = conn.take_table("import")
    except owner.TableOwned:
        return []
    try:
        now = time.time_ns() // 1000
        return seal(conn, before=period_start(now, DEFAULT_PERIOD_US), period_us=DEFAULT_PERIOD_US)
    finally:
        release()
