"""One segment file: history events as Parquet, written once and read by
column, row group or whole; the format other engines read as it is.

Rows are sorted by (nat, port, ts, id), zstd, with row-group statistics and
the page index, so a lookup of one NAT port reads one row group.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

#: The columns, in file order. ``id`` is the event's sequence number in the
#: hot tier: the order the server logged it, which export reproduces.
SCHEMA = pa.schema(
    [
        pa.field("nat", pa.uint32(), nullable=False),
        pa.field("port", pa.uint16(), nullable=False),
        pa.field("ts", pa.int64(), nullable=False),
        pa.field("kind", pa.uint8(), nullable=False),
        pa.field("addr", pa.binary(16)),
        pa.field("aport", pa.uint16()),
        pa.field("id", pa.int64(), nullable=False),
    ]
)
ROW_COLUMNS = ["ts", "kind", "nat", "port", "addr", "aport"]
#: Small enough that one port's lookup decodes little, large enough that the
#: footer of a segment of millions of events stays small.
ROW_GROUP = 65536


@dataclass(frozen=True)
class Written:
    """What writing a segment gave: its size and digest, and its contents' summary."""

    size: int
    sha256: bytes
    events: int
    initialized: int
    created: int
    deleted: int
    first_id: int
    last_id: int
    ts_lo: int
    ts_hi: int


_INT, _MAYBE = frozenset({int}), frozenset({int, type(None)})
_PY_TYPES = [_INT, _INT, _INT, _INT, frozenset({bytes, type(None)}), _MAYBE, _INT]


def table_from_rows(rows: Iterable[tuple[Any, ...]]) -> pa.Table:
    """A table of ``(id, ts, kind, nat, port, addr, aport)`` rows, in SCHEMA's
    columns. Raises pyarrow's errors (ValueError, TypeError) for a value
    its column cannot hold."""
    columns = list(zip(*rows, strict=True))
    if not columns:
        return SCHEMA.empty_table()
    ids, ts, kind, nat, port, addr, aport = columns
    arrays = [nat, port, ts, kind, addr, aport, ids]
    # pyarrow would take 1.0 for 1 and text for octets: what SQLite's
    # loose types could hold, and the readers refuse.
    for c, allowed in zip(arrays, _PY_TYPES, strict=True):
        if not set(map(type, c)) <= allowed:
            raise TypeError("a value of another type")
    return pa.Table.from_arrays(
        [pa.array(c, f.type) for c, f in zip(arrays, SCHEMA, strict=True)], schema=SCHEMA
    )


def rows_decode(table: pa.Table) -> bool:
    """Whether every row of ``table`` (from :func:`table_from_rows`) is an
    event the readers decode: schema.event_ok, a column at a time."""
    if any(table[c].null_count for c in ("nat", "port", "ts", "kind", "id")):
        return False
    kind = table["kind"]
    if pc.any(pc.greater(kind, 2)).as_py():
        return False
    # Created and Deleted name a client endpoint.
    named = table.filter(pc.greater(kind, 0))
    return not (named["addr"].null_count or named["aport"].null_count)


def sorted_table(table: pa.Table) -> pa.Table:
    order = [(c, "ascending") for c in ("nat", "port", "ts", "id")]
    return table.take(pc.sort_indices(table, sort_keys=order))


def _write_parquet(table: pa.Table, where: str | Path | pa.NativeFile) -> None:
    pq.write_table(
        table,
        where,
        compression="zstd",
        compression_level=3,
        row_group_size=ROW_GROUP,
        write_statistics=True,
        write_page_index=True,
        use_dictionary=["nat", "kind"],
        column_encoding={"port": "DELTA_BINARY_PACKED", "ts": "DELTA_BINARY_PACKED"},
        sorting_columns=[pq.SortingColumn(i) for i in range(3)],
    )


def _written(table: pa.Table, size: int, sha256: bytes) -> Written:
    kinds = pc.value_counts(table["kind"]).to_pylist()
    by_kind = {k["values"]: k["counts"] for k in kinds}
    mm_id = pc.min_max(table["id"]).as_py()
    mm_ts = pc.min_max(table["ts"]).as_py()
    return Written(
        size=size,
        sha256=sha256,
        events=table.num_rows,
        initialized=by_kind.get(0, 0),
        created=by_kind.get(1, 0),
        deleted=by_kind.get(2, 0),
        first_id=mm_id["min"],
        last_id=mm_id["max"],
        ts_lo=mm_ts["min"],
        ts_hi=mm_ts["max"],
    )


def write(table: pa.Table, path: Path, *, durable: bool = True) -> Written:
    """Write ``table`` (sorted here) to ``path`` durably: a temporary name,
    fsync, rename, fsync of the directory (``durable=False``: the caller
    fsyncs the directory, once for several files). Returns what was written."""
    table = sorted_table(table.cast(SCHEMA))
    tmp = path.with_name(path.name + ".tmp")
    _write_parquet(table, tmp)
    sha256 = file_digest(tmp, fsync=True)
    os.replace(tmp, path)
    if durable:
        fsync_dir(path.parent)
    return _written(table, path.stat().st_size, sha256)


def encode(table: pa.Table) -> tuple[bytes, Written]:
    """The octets of ``table`` (sorted here) as a segment, and what they hold:
    a segment kept in the database (PostgreSQL)."""
    table = sorted_table(table.cast(SCHEMA))
    sink = pa.BufferOutputStream()
    _write_parquet(table, sink)
    data = sink.getvalue().to_pybytes()
    return data, _written(table, len(data), hashlib.sha256(data).digest())


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_digest(path: Path, *, fsync: bool = False) -> bytes:
    """The SHA-256 of a file; ``fsync``: and make it durable first."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if fsync:
            os.fsync(f.fileno())
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.digest()


#: Where a segment is read from: its file, or its octets (PostgreSQL).
Source: TypeAlias = "Path | pa.NativeFile"


def read_table(source: Source, columns: list[str] | None = None) -> pa.Table:
    return pq.read_table(source, columns=columns, schema=SCHEMA)


def as_rows(table: pa.Table, *, with_id: bool) -> Iterator[tuple[Any, ...]]:
    names = (["id"] if with_id else []) + ROW_COLUMNS
    for batch in table.select(names).to_batches(max_chunksize=4096):
        yield from zip(*(col.to_pylist() for col in batch.columns), strict=True)


class Reader:
    """A segment file opened once: its footer, for lookups by NAT port."""

    def __init__(self, source: Source):
        self.file = pq.ParquetFile(source)
        meta = self.file.metadata
        names = meta.schema.names
        inat, iport = names.index("nat"), names.index("port")
        # (nat min, nat max, port min, port max) of each row group.
        self.groups = []
        for g in range(meta.num_row_groups):
            rg = meta.row_group(g)
            ns, ps = rg.column(inat).statistics, rg.column(iport).statistics
            self.groups.append((ns.min, ns.max, ps.min, ps.max))

    def port_table(self, nat: int, port: int) -> pa.Table:
        """Every event of ``nat``:``port`` in this segment, by (ts, id)."""
        hit = [
            g
            for g, (n0, n1, p0, p1) in enumerate(self.groups)
            if n0 <= nat <= n1 and (n0 < n1 or p0 <= port <= p1)
        ]
        if not hit:
            return SCHEMA.empty_table()
        # Without the id column, and in this thread: a lookup decodes little.
        t = self.file.read_row_groups(hit, columns=ROW_COLUMNS, use_threads=False)
        mask = pc.and_(pc.equal(t["nat"], nat), pc.equal(t["port"], port))
        return t.filter(mask)
