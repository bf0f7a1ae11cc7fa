"""Reads that span both tiers: the hot rows a query found, joined with the
sealed rows of the same question, in the same order and with no row twice.

Callers read the hot tier first and the segment table after: a seal that
commits in between then shows its events twice (removed below by id or
ignored by the who rules), never not at all.
"""

from __future__ import annotations

import heapq
import io
import itertools
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

from nat64ho.archive import catalog
from nat64ho.archive.catalog import Segment
from nat64ho.ops.db import Conn, HistoryError

if TYPE_CHECKING:
    import pyarrow as pa

    from nat64ho.archive import segment

Row = tuple[Any, ...]
T = TypeVar("T")


def _arrow() -> tuple[Any, Any, Any]:
    """pyarrow, pyarrow.compute and the segment module, imported only where
    there is an archive: commands on a database without one stay as small."""
    import pyarrow
    import pyarrow.compute

    from nat64ho.archive import segment

    return pyarrow, pyarrow.compute, segment


#: Segments kept in the database held open at once (each its footer).
_HELD_IN_MEMORY = 32


class Archive:
    """The live segments of one database, with their files opened on demand."""

    def __init__(self, conn: Conn, state: tuple[int, int]):
        self.state = state
        self.conn = conn
        self.dir = None if catalog.in_database(conn) else catalog.archive_dir(conn)
        self.segments = catalog.segments(conn, live=True)
        self._readers: dict[int, Any] = {}  # n -> segment.Reader
        self._nats: set[int] | None = None

    def source(self, seg: Segment) -> segment.Source:
        """The segment's file, or its octets read from the database."""
        if self.dir is not None:
            return self.dir / seg.file
        pa, _, _ = _arrow()
        octets = catalog.data(self.conn, seg.n)
        if octets is None:
            raise HistoryError(f"segment {seg.n} ({seg.file}): its data is missing")
        return pa.BufferReader(octets)

    def reader(self, seg: Segment) -> segment.Reader:
        """The segment opened for lookups: its file, or (PostgreSQL) the
        ranges of its octets that a lookup reads, not the whole value."""
        pa, _, segment = _arrow()
        r = self._readers.get(seg.n)
        if r is None:
            if self.dir is None and len(self._readers) >= _HELD_IN_MEMORY:
                self._readers.clear()
            source = (
                self.dir / seg.file
                if self.dir is not None
                else pa.PythonFile(_StoredSegment(self.conn, seg), mode="r")
            )
            r = self._readers[seg.n] = segment.Reader(source)
        return r

    def table(self, seg: Segment, columns: list[str] | None = None) -> pa.Table:
        _, _, segment = _arrow()
        return segment.read_table(self.source(seg), columns)

    def nats(self) -> set[int]:
        _, pc, _ = _arrow()
        if self._nats is None:
            found: set[int] = set()
            for seg in self.segments:
                col = self.table(seg, ["nat"])["nat"]
                found.update(pc.unique(col).to_pylist())
            self._nats = found
        return self._nats


class _StoredSegment(io.RawIOBase):
    """A segment kept in the database, as a file read by ranges."""

    def __init__(self, conn: Conn, seg: Segment):
        self.conn, self.seg, self.at = conn, seg, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.at

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.at, io.SEEK_END: self.seg.size}[whence]
        self.at = base + offset
        return self.at

    def read(self, size: int = -1) -> bytes:
        size = self.seg.size - self.at if size is None or size < 0 else size
        size = max(0, min(size, self.seg.size - self.at))
        if size == 0:
            return b""
        octets = catalog.data_range(self.conn, self.seg.n, self.at, size)
        if octets is None:
            raise HistoryError(f"segment {self.seg.n} ({self.seg.file}): its data is missing")
        self.at += len(octets)
        return octets


#: The last few databases' archives, by connection (held, so that an id is
#: never reused while cached): a who with many questions opens each file once.
_cache: dict[int, tuple[Any, Archive]] = {}


def archive(conn: Conn) -> Archive | None:
    """The sealed tier of ``conn``'s database; None when it has no live segment."""
    n, pruned = conn.execute("SELECT coalesce(max(n), 0), count(pruned) FROM segment").fetchone()
    if n == 0:
        return None
    state = (int(n), int(pruned))
    held = _cache.get(id(conn))
    if held is not None and held[0] is conn and held[1].state == state:
        found = held[1]
    else:
        found = Archive(conn, state)
        if len(_cache) >= 4:
            _cache.clear()
        _cache[id(conn)] = (conn, found)
    return found if found.segments else None


def has_segments(conn: Conn) -> bool:
    """Whether anything was ever sealed (a cheap look before the join)."""
    return conn.execute("SELECT 1 FROM segment WHERE pruned IS NULL LIMIT 1").fetchone() is not None


def snapshot(
    conn: Conn,
    spanning: Callable[[Archive], Iterator[T]],
    hot_only: Callable[[], Iterator[T]],
) -> Iterator[T]:
    """Rows of ``spanning`` (or ``hot_only`` if nothing is sealed) read in
    one read transaction, so that the segment list and the hot tier are the
    same instant's: a seal between the two cannot hide its events."""
    own = not conn.in_transaction
    if own:
        conn.execute(conn.sql.begin_snapshot)
    try:
        arch = archive(conn)
        yield from spanning(arch) if arch is not None else hot_only()
    finally:
        if own:
            conn.execute("COMMIT")


def sealed_hot(conn: Conn, hot: Callable[[], Iterator[Row]]) -> Callable[[], Iterator[Row]]:
    """``hot`` (rows with their id first) without the events that a pending
    segment already holds (see nat64ho.archive.seal.finish_pending)."""
    cuts = catalog.pending(conn)
    if not cuts:
        return hot

    def rows() -> Iterator[Row]:
        for r in hot():
            if not any(r[1] < ts and r[0] <= i for ts, i in cuts):
                yield r

    return rows


# ---------------------------------------------------------------- history rows


def merge(
    sources: list[tuple[Any, Callable[[], Iterator[Row]]]], key: Callable[[Row], Any]
) -> Iterator[Row]:
    """Rows of several sorted sources in ``key`` order. Each source is (a
    lower bound of its keys, a function that opens it); a source is opened
    only once the rows before its bound are out, so segments in sequence are
    read one after the other, not all at once."""
    sources = sorted(sources, key=lambda s: s[0])
    heap: list[tuple[Any, int, Row, Iterator[Row]]] = []
    tie = itertools.count()
    i = 0
    while True:
        while i < len(sources) and (not heap or sources[i][0] <= heap[0][0]):
            it = sources[i][1]()
            i += 1
            first = next(it, None)
            if first is not None:
                heapq.heappush(heap, (key(first), next(tie), first, it))
        if not heap:
            return
        _, _, row, it = heapq.heappop(heap)
        yield row
        if not heap:
            # The only open source: stream it up to the next one's bound.
            bound = sources[i][0] if i < len(sources) else None
            for row in it:
                k = key(row)
                if bound is not None and k >= bound:
                    heapq.heappush(heap, (k, next(tie), row, it))
                    break
                yield row
            continue
        nxt = next(it, None)
        if nxt is not None:
            heapq.heappush(heap, (key(nxt), next(tie), nxt, it))


#: Rows per block handed to a writer: an Arrow slice of a segment, or a list
#: of hot rows; large enough that formatting a block at once pays.
BLOCK = 1 << 18


def blocks_of(rows: Iterator[Row], size: int = BLOCK) -> Iterator[list[Row]]:
    while block := list(itertools.islice(rows, size)):
        yield block


def history_blocks(
    conn: Conn,
    arch: Archive,
    hot: Callable[[], Iterator[Row]],
    *,
    nat: int | None,
    since: int | None,
    until: int | None,
    after: int | None,
    upto: int | None,
) -> Iterator[pa.Table | list[Row]]:
    """ops.export.history_rows over both tiers, with the id first, in blocks:
    Arrow tables of sealed rows (columns id, ts, kind, nat, port, addr,
    aport) and lists of row tuples; ``hot`` opens the hot tier's rows, each
    with its id first, in the same order."""
    _, pc, segment = _arrow()
    by_time = since is not None or until is not None

    def wanted(s: Segment) -> bool:
        return (
            (after is None or s.last_id > after)
            and (upto is None or s.first_id <= upto)
            and (since is None or s.ts_hi >= since)
            and (until is None or s.ts_lo < until)
        )

    def sealed(s: Segment) -> pa.Table:
        t = arch.table(s)
        mask = None
        for cond in (
            pc.equal(t["nat"], nat) if nat is not None else None,
            pc.greater(t["id"], after) if after is not None else None,
            pc.less_equal(t["id"], upto) if upto is not None else None,
            pc.greater_equal(t["ts"], since) if since is not None else None,
            pc.less(t["ts"], until) if until is not None else None,
        ):
            if cond is not None:
                mask = cond if mask is None else pc.and_(mask, cond)
        if mask is not None:
            t = t.filter(mask)
        keys = [("ts", "ascending"), ("id", "ascending")] if by_time else [("id", "ascending")]
        return t.take(pc.sort_indices(t, sort_keys=keys)).select(["id", *segment.ROW_COLUMNS])

    segs = sorted(
        (s for s in arch.segments if wanted(s)),
        key=(lambda s: s.ts_lo) if by_time else (lambda s: s.first_id),
    )
    hot_rows = sealed_hot(conn, hot)
    column = "ts" if by_time else "id"
    first = conn.execute(f"SELECT min({column}) FROM event").fetchone()[0]
    lo = first if first is not None else 0
    # (first, last) key of each segment, then the hot tier's first.
    bounds = [b for s in segs for b in ((s.ts_lo, s.ts_hi) if by_time else (s.first_id, s.last_id))]
    bounds += [lo] if first is not None else []
    if all(bounds[i] < bounds[i + 1] for i in range(1, len(bounds) - 1, 2)):
        # Nothing interleaves (the usual case: periods sealed in sequence),
        # so the sources follow each other and a segment goes out whole.
        for s in segs:
            t = sealed(s)
            for off in range(0, t.num_rows, BLOCK):
                yield t.slice(off, BLOCK)
        yield from blocks_of(hot_rows())
        return

    def opener(s: Segment) -> Callable[[], Iterator[Row]]:
        return lambda: segment.as_rows(sealed(s), with_id=True)

    sources: list[tuple[Any, Callable[[], Iterator[Row]]]]
    if by_time:
        sources = [((s.ts_lo, 0), opener(s)) for s in segs]
        sources.append(((lo, 0), hot_rows))
        rows = merge(sources, key=lambda r: (r[1], r[0]))
    else:
        sources = [(s.first_id, opener(s)) for s in segs]
        sources.append((lo, hot_rows))
        rows = merge(sources, key=lambda r: r[0])
    yield from blocks_of(rows)


# ---------------------------------------------------------------- who


def _port_rows(arch: Archive, seg: Segment, nat: int, port: int) -> list[Row]:
    t = arch.reader(seg).port_table(nat, port)
    return list(zip(*(t[c].to_pylist() for c in ("ts", "kind", "addr", "aport")), strict=True))


def port_neighbours(
    conn: Conn,
    nat: int,
    port: int,
    at: int,
    hot_before: list[int] = [],  # noqa: B006 (never changed)
    hot_after: list[int] = [],  # noqa: B006
) -> tuple[list[Row], list[Row]]:
    """Sealed events ``(ts, kind, addr, aport)`` of ``nat``:``port`` (not
    Initialized): the last two at or before ``at`` and the first two after
    it, as who_port's queries of the hot tier find them. ``hot_before`` and
    ``hot_after``: the times the hot tier found, so that segments that
    cannot hold anything closer are not opened."""
    arch = archive(conn)
    if arch is None:
        return [], []
    before: list[Row] = []
    seen = sorted(hot_before, reverse=True)
    for s in sorted(arch.segments, key=lambda s: -s.ts_hi):
        if s.ts_lo > at:
            continue
        if len(seen) >= 2 and seen[1] > s.ts_hi:
            break
        before += [r for r in _port_rows(arch, s, nat, port) if r[0] <= at and r[1] > 0]
        before.sort(key=lambda r: (r[0], r[1]), reverse=True)
        seen = sorted(hot_before + [r[0] for r in before], reverse=True)
    after: list[Row] = []
    seen = sorted(hot_after)
    for s in sorted(arch.segments, key=lambda s: s.ts_lo):
        if s.ts_hi <= at:
            continue
        if len(seen) >= 2 and seen[1] < s.ts_lo:
            break
        after += [r for r in _port_rows(arch, s, nat, port) if r[0] > at and r[1] > 0]
        after.sort(key=lambda r: (r[0], r[1]))
        seen = sorted(hot_after + [r[0] for r in after])
    return before[:2], after[:2]


def created_between(conn: Conn, nat: int, port: int, lo: int, hi: int) -> list[int]:
    """Times of the sealed Created events of ``nat``:``port`` in (lo, hi]."""
    arch = archive(conn)
    if arch is None:
        return []
    return sorted(
        r[0]
        for s in arch.segments
        if s.ts_hi > lo and s.ts_lo <= hi
        for r in _port_rows(arch, s, nat, port)
        if r[1] == 1 and lo < r[0] <= hi
    )


def endpoint_rows(
    conn: Conn, hot: Iterator[Row], lo: bytes, hi: bytes, aport: int | None
) -> Iterator[Row]:
    """The hot rows ``(ts, kind, nat, port, addr, aport)`` of clients in
    [lo, hi] (by addr, aport, ts) joined with the sealed ones, same order."""
    arch = archive(conn)
    if arch is None:
        return hot
    pa, pc, segment = _arrow()
    found = []
    for s in arch.segments:
        if lo == hi and aport is not None:
            # One endpoint: its rows by the segment's endpoint index, if any.
            t = arch.reader(s).endpoint_table(lo, aport)
            if t is not None:
                if t.num_rows:
                    found.append(t)
                continue
        t = arch.table(s, ["nat", "port", "ts", "kind", "addr", "aport", "id"])
        addr = t["addr"].cast(pa.binary())
        mask = pc.and_(
            pc.greater_equal(addr, pa.scalar(lo, pa.binary())),
            pc.less_equal(addr, pa.scalar(hi, pa.binary())),
        )
        if aport is not None:
            mask = pc.and_(mask, pc.equal(t["aport"], aport))
        t = t.filter(pc.fill_null(mask, False))
        if t.num_rows:
            found.append(t)
    if not found:
        return hot
    t = pa.concat_tables(found)
    t = t.take(pc.sort_indices(t, sort_keys=[(c, "ascending") for c in ("addr", "aport", "ts")]))
    sealed = list(segment.as_rows(t, with_id=False))
    seen = {(r[0], r[1], r[2], r[3]) for r in sealed}
    fresh = (r for r in hot if (r[0], r[1], r[2], r[3]) not in seen)
    return heapq.merge(sealed, fresh, key=lambda r: (r[4], r[5], r[0]))


def nats(conn: Conn) -> set[int]:
    arch = archive(conn)
    return arch.nats() if arch is not None else set()


def kind_counts(conn: Conn, lo: int, hi: int, hour: int) -> dict[tuple[int, int], list[int]]:
    """(nat, kind) -> [events in [lo, hi], of them at or after ``hour``], sealed."""
    arch = archive(conn)
    out: dict[tuple[int, int], list[int]] = {}
    if arch is None:
        return out
    _, pc, _ = _arrow()
    for s in arch.segments:
        if s.ts_hi < lo or s.ts_lo > hi:
            continue
        t = arch.table(s, ["nat", "ts", "kind"])
        t = t.filter(
            pc.and_(
                pc.and_(pc.greater_equal(t["ts"], lo), pc.less_equal(t["ts"], hi)),
                pc.greater(t["kind"], 0),
            )
        )
        for nat, kind, ts in zip(
            t["nat"].to_pylist(), t["kind"].to_pylist(), t["ts"].to_pylist(), strict=True
        ):
            c = out.setdefault((nat, kind), [0, 0])
            c[0] += 1
            c[1] += ts >= hour
    # The hot copies of a pending segment's events are counted by the caller.
    cuts = catalog.pending(conn)
    if not cuts:
        return out
    args: list[Any] = [hour, lo, hi]
    held = catalog.pending_held(args, cuts)
    for nat, kind, n_day, n_hour in conn.execute(
        "SELECT nat, kind, count(*), sum(CASE WHEN ts >= $1 THEN 1 ELSE 0 END) FROM event "
        f"WHERE ts >= $2 AND ts <= $3 AND kind > 0 AND ({held}) GROUP BY nat, kind",
        args,
    ):
        c = out.setdefault((nat, kind), [0, 0])
        c[0] -= n_day
        c[1] -= n_hour
    return out


class SealedFilter:
    """For ``import``: drops the rows ``(ts, kind, nat, port, addr, aport)``
    already in a segment, as the unique event index drops those already hot,
    so that importing a log twice adds nothing."""

    _KEYS = ["nat", "port", "ts", "kind"]

    def __init__(self, conn: Conn):
        self.arch = archive(conn)
        self._tables: dict[int, Any] = {}  # n -> pyarrow.Table of keys

    def _keys(self, seg: Segment) -> pa.Table:
        t = self._tables.get(seg.n)
        if t is None:
            if len(self._tables) >= 2:  # an import goes forward in time
                self._tables.clear()
            assert self.arch is not None
            t = self._tables[seg.n] = self.arch.table(seg, self._KEYS)
        return t

    def __call__(self, rows: list[Row]) -> list[Row]:
        if self.arch is None or not rows:
            return rows
        lo, hi = min(r[0] for r in rows), max(r[0] for r in rows)
        segs = [s for s in self.arch.segments if s.ts_hi >= lo and s.ts_lo <= hi]
        if not segs:
            return rows
        pa, pc, _ = _arrow()
        batch = pa.table(
            {
                "nat": pa.array([r[2] for r in rows], pa.uint32()),
                "port": pa.array([r[3] for r in rows], pa.uint16()),
                "ts": pa.array([r[0] for r in rows], pa.int64()),
                "kind": pa.array([r[1] for r in rows], pa.uint8()),
                "i": pa.array(range(len(rows)), pa.int64()),
            }
        )
        for s in segs:
            keys = self._keys(s)
            keys = keys.filter(
                pc.and_(pc.greater_equal(keys["ts"], lo), pc.less_equal(keys["ts"], hi))
            )
            if keys.num_rows:
                batch = batch.join(keys, keys=self._KEYS, join_type="left anti")
        if batch.num_rows == len(rows):
            return rows
        return [rows[i] for i in sorted(batch["i"].to_pylist())]
