"""``import`` straight into the sealed tier: parsed events of closed periods,
rid of those either tier already holds, written as segments in bulk.

Events keep the order of the logs' lines in their ids, taken as one block
from the hot tier's id sequence, so that ``export`` gives them back as the
lines came. A period goes into a segment once a later one shows up in the
logs; one that comes back after that (a log out of order, a second log of
the same hours) gets a segment of its own, and ids after those written.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from nat64ho.archive import catalog, segment, tiers
from nat64ho.archive.seal import DEFAULT_PERIOD_US, period_start, write_segments
from nat64ho.ops.db import Conn, atomic

#: Parsed lines held at least before the closed periods among them are
#: written (when a later period shows up).
CHUNK = 1 << 18
_KEYS = ["nat", "port", "ts", "kind"]
#: Parsed rows: (ts, kind, nat, port, addr, aport), as the hot tier's INSERT takes them.
_ROW = pa.schema(
    [
        pa.field("ts", pa.int64()),
        pa.field("kind", pa.uint8()),
        pa.field("nat", pa.uint32()),
        pa.field("port", pa.uint16()),
        pa.field("addr", pa.binary(16)),
        pa.field("aport", pa.uint16()),
    ]
)
_HELD = _ROW.append(pa.field("seq", pa.int64()))


class Ingest:
    """Takes parsed rows of an import, in line order; those of the open
    period (ts from ``open_from`` on) go into the hot tier, at the end. Only
    for the table's owner: segment files of another sealer would be
    orphans here."""

    def __init__(self, conn: Conn, now_us: int, period_us: int = DEFAULT_PERIOD_US):
        self.conn = conn
        self.period_us = period_us
        self.open_from = period_start(now_us, period_us)
        self.directory: Path | None = None
        if not catalog.in_database(conn):
            self.directory = catalog.archive_dir(conn)
            self.directory.mkdir(mode=0o750, parents=True, exist_ok=True)
        self._held: list[pa.Table] = []
        self._newest = 0  # start of the newest period written up to
        self._keys: dict[int, pa.Table] = {}  # n -> keys of a segment read
        self.added = 0

    def take(
        self, table: pa.Table | None, rows: list[tuple[Any, ...]], now: Callable[[], int]
    ) -> None:
        """Take parsed lines: ``table`` (columns of _ROW and ``seq``, the
        line's place in the import) and ``rows`` (the same as tuples); writes
        the periods that a later one in the logs closed."""
        if table is not None and table.num_rows:
            self._held.append(table.select(_HELD.names).cast(_HELD))
        if rows:
            cols = list(zip(*rows, strict=True))
            arrays = [pa.array(c, f.type) for c, f in zip(cols, _HELD, strict=True)]
            self._held.append(pa.Table.from_arrays(arrays, schema=_HELD))
        if not self._held:
            return
        newest = period_start(pc.max(self._held[-1]["ts"]).as_py(), self.period_us)
        if newest <= self._newest or sum(t.num_rows for t in self._held) < CHUNK:
            return  # no period closed since the last write, or little held
        self._newest = newest
        held = pa.concat_tables(self._held)
        # The newest period may go on in the next lines: held back (so is
        # the open one, always the newest).
        done = pc.less(held["ts"], newest)
        self._held = [held.filter(pc.invert(done))]
        self._write(held.filter(done), now)

    def finish(self, now: Callable[[], int]) -> None:
        """Write whatever is held: closed periods into segments, the open
        one into the hot tier."""
        if self._held:
            self._write(pa.concat_tables(self._held), now)
            self._held = []

    def _write(self, table: pa.Table, now: Callable[[], int]) -> None:
        table = self._new(table)
        if not table.num_rows:
            return
        table = table.sort_by("seq")
        first = _take_ids(self.conn, table.num_rows)
        ids = pa.array(range(first, first + table.num_rows), pa.int64())
        table = table.drop_columns(["seq"]).append_column("id", ids)
        hot = pc.greater_equal(table["ts"], self.open_from)
        if pc.any(hot).as_py():
            rows = table.filter(hot).select(["id", *_ROW.names]).to_pylist()
            with atomic(self.conn):
                self.conn.insert_many(
                    "event",
                    ("id", *_ROW.names),
                    [tuple(r.values()) for r in rows],
                    ignore=False,
                )
            table = table.filter(pc.invert(hot))
        period = pc.divide(table["ts"], self.period_us)
        parts = []
        for p in sorted(pc.unique(period).to_pylist()):
            part = table.filter(pc.equal(period, p)).select(segment.SCHEMA.names)
            # Took no hot event: id <= 0 matches none.
            parts.append((part, pc.min(part["ts"]).as_py(), 0))
        write_segments(self.conn, self.directory, parts, now, pending=False)
        self.added += len(ids)

    def _new(self, table: pa.Table) -> pa.Table:
        """``table`` less repeated events (the first of each kept, as the
        hot tier's unique index keeps it) and those either tier holds."""
        first = table.group_by(_KEYS).aggregate([("seq", "min")])
        if first.num_rows < table.num_rows:
            table = table.filter(pc.is_in(table["seq"], first["seq_min"]))
        lo, hi = pc.min(table["ts"]).as_py(), pc.max(table["ts"]).as_py()
        if lo is None:
            return table
        hot = self.conn.execute(
            "SELECT nat, port, ts, kind FROM event WHERE ts >= $1 AND ts <= $2", (lo, hi)
        ).fetchall()
        if hot:
            cols = list(zip(*hot, strict=True))
            held = pa.table(
                {k: pa.array(c, table[k].type) for k, c in zip(_KEYS, cols, strict=True)}
            )
            table = table.join(held, keys=_KEYS, join_type="left anti")
        arch = tiers.archive(self.conn)
        if arch is None:
            return table
        for seg in arch.segments:
            if seg.ts_hi < lo or seg.ts_lo > hi or not table.num_rows:
                continue
            keys = self._keys.get(seg.n)
            if keys is None:
                if len(self._keys) >= 2:  # a log goes forward in time
                    self._keys.clear()
                keys = self._keys[seg.n] = arch.table(seg, _KEYS)
            table = table.join(keys, keys=_KEYS, join_type="left anti")
        return table


def _take_ids(conn: Conn, count: int) -> int:
    """The first of ``count`` event ids taken from the hot tier's sequence,
    never given to another event (ids are log order: after every event
    already stored)."""
    with atomic(conn):
        if conn.sql.postgres:
            # Taken alone: an insert elsewhere (an import into the hot tier
            # beside this one) could otherwise draw an id inside the block.
            conn.execute("LOCK TABLE event IN SHARE ROW EXCLUSIVE MODE")
            first = conn.execute(
                "SELECT nextval(pg_get_serial_sequence('event', 'id'))"
            ).fetchone()[0]
            conn.execute(
                "SELECT setval(pg_get_serial_sequence('event', 'id'), $1)", (first + count - 1,)
            ).fetchone()
            return int(first)
        top = conn.execute(
            "SELECT max(coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'event'), 0), "
            "coalesce((SELECT max(id) FROM event), 0), "
            "coalesce((SELECT max(last_id) FROM segment), 0))"
        ).fetchone()[0]
        if not conn.execute(
            "UPDATE sqlite_sequence SET seq = $1 WHERE name = 'event'", (top + count,)
        ).rowcount:
            conn.execute(
                "INSERT INTO sqlite_sequence (name, seq) VALUES ('event', $1)", (top + count,)
            )
        return int(top) + 1
