"""Retention of the sealed tier: whole segments older than a cut-off are
dropped, their rows kept (marked pruned) so that the chain still verifies."""

from __future__ import annotations

import time
from pathlib import Path

from nat64ho.archive import catalog
from nat64ho.ops.db import Conn, atomic


def prunable(conn: Conn, before: int) -> list[catalog.Segment]:
    """Live segments whose every event is older than ``before``."""
    return [s for s in catalog.segments(conn, live=True) if s.ts_hi < before]


def prune(conn: Conn, before: int) -> int:
    """Drop :func:`prunable` segments; returns their events. The rows are
    marked first, the files removed after the commit: a file left by a kill
    in between is an orphan, removed like an interrupted seal's. On
    PostgreSQL the octets go in the same transaction as the marks."""
    gone = prunable(conn, before)
    if not gone:
        return 0
    with atomic(conn):
        now = time.time_ns() // 1000
        for s in gone:
            conn.execute("UPDATE segment SET pruned = $1 WHERE n = $2", (now, s.n))
            if catalog.in_database(conn):
                conn.execute("DELETE FROM segment_data WHERE n = $1", (s.n,))
    if catalog.in_database(conn):
        return sum(s.events for s in gone)
    directory = catalog.archive_dir(conn)
    for s in gone:
        (directory / s.file).unlink(missing_ok=True)
    return sum(s.events for s in gone)


def prune_db(db: Path | str, before: int) -> int:
    """:func:`prune` on a connection of its own (the server's --keep-history)."""
    from nat64ho.archive.seal import open_target

    conn = open_target(db)
    try:
        return prune(conn, before)
    finally:
        conn.close()
