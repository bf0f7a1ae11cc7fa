"""``prune``: deleting old history. The server's ``--keep-history`` runs the
same statement in the same batches (nat64ho.sql.PRUNE_EVENTS)."""

from __future__ import annotations

from collections.abc import Callable

from nat64ho.archive import retention
from nat64ho.ops.db import Conn, atomic
from nat64ho.sql import PRUNE_BATCH

#: nat64ho.sql.PRUNE_EVENTS with the operator commands' placeholders.
_PRUNE = "DELETE FROM event WHERE id IN (SELECT id FROM event WHERE ts < $1 ORDER BY ts LIMIT $2)"


def prune_count(conn: Conn, before_us: int) -> int:
    """How many events :func:`prune` would delete (a walk of the ts index)."""
    hot = int(conn.execute("SELECT count(*) FROM event WHERE ts < $1", (before_us,)).fetchone()[0])
    return hot + sum(s.events for s in retention.prunable(conn, before_us))


def prune(conn: Conn, before_us: int, on_batch: Callable[[int], None] | None = None) -> int:
    """Delete history events older than ``before_us``; returns how many.

    Current entries are never touched. Works in transactions of
    :data:`PRUNE_BATCH` events, each committed, so a writer sharing the
    database waits for one batch at most; call it outside a transaction.
    """
    total = 0
    while True:
        with atomic(conn):
            n = conn.execute(_PRUNE, (before_us, PRUNE_BATCH)).rowcount
        total += n
        if on_batch is not None:
            on_batch(total)
        if n < PRUNE_BATCH:
            # Sealed history goes by whole segments (nat64ho.archive).
            return total + retention.prune(conn, before_us)


class NotKnown(LookupError):
    """The NAT64 has no row and no entries in the database."""


def forget_count(conn: Conn, nat: int) -> tuple[int, bool]:
    """What :func:`forget` would remove: the entries, and whether it has a row."""
    entries = conn.execute("SELECT count(*) FROM entry WHERE nat = $1", (nat,)).fetchone()[0]
    known = conn.execute("SELECT 1 FROM nat WHERE nat = $1", (nat,)).fetchone() is not None
    return int(entries), known


def forget(conn: Conn, nat: int) -> tuple[int, bool]:
    """Remove a NAT64 and its table (its history stays); returns the entries
    removed and whether it had a row. Raises :class:`NotKnown`."""
    with atomic(conn):
        entries = conn.execute("DELETE FROM entry WHERE nat = $1", (nat,)).rowcount
        known = conn.execute("DELETE FROM nat WHERE nat = $1", (nat,)).rowcount > 0
        if not entries and not known:
            raise NotKnown(nat)
    return entries, known
