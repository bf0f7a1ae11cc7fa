"""One segment file: history events as Parquet, written once and read by
column, row group or whole; the format other engines read as it is.

Rows are sorted by (nat, port, ts, id), zstd, with row-group statistics and
the page index, so a lookup of one NAT port reads one row group.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import os
import struct
import sys
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
#: Small enough that one port's lookup decodes little (a who reads one or
#: two row groups), large enough that the footer of a segment of millions of
#: events stays small (a few hundred row groups).
ROW_GROUP = 8192
#: zstd's level for segments: 5 is about as small as 9 (within 2%) for the
#: CPU of 3; the size at rest is what retention pays for.
ZSTD_LEVEL = 5


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
    with pq.ParquetWriter(
        where,
        table.schema,
        compression="zstd",
        compression_level=ZSTD_LEVEL,
        write_statistics=True,
        write_page_index=True,
        use_dictionary=["nat", "kind"],
        column_encoding={"port": "DELTA_BINARY_PACKED", "ts": "DELTA_BINARY_PACKED"},
        sorting_columns=[pq.SortingColumn(i) for i in range(3)],
    ) as writer:
        writer.write_table(table, row_group_size=ROW_GROUP)
        index = endpoint_index(table)
        if index is not None:
            writer.add_key_value_metadata({ENDPOINT_INDEX: index})


# ---------------------------------------------------------------- endpoint index

#: Footer key of the client endpoint index: which blocks of ``INDEX_BLOCK``
#: rows hold an (addr, aport), so that ``who [IPV6]:PORT`` reads a few row
#: groups of a segment instead of all of them. Other engines ignore it.
ENDPOINT_INDEX = b"nat64ho.endpoint_index"
INDEX_BLOCK = ROW_GROUP
#: Bits of an endpoint's key: a key shared by chance costs one row group read;
#: at 28 bits the index costs about 1.3 bytes an event.
_KEY_BITS = 28
_BUCKET_BITS = 8
_MIX = (0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9)
_HEADER = struct.Struct("<4sIII")


def endpoint_key(addr: bytes, aport: int, bits: int) -> int:
    """The index key of one endpoint: the top ``bits`` of a multiplicative
    hash of the address as two little-endian 64-bit words and the port
    (what the writer computes by column)."""
    lo, hi = int.from_bytes(addr[:8], "little"), int.from_bytes(addr[8:], "little")
    mixed = (lo * _MIX[0] + hi * _MIX[1] + aport * _MIX[2]) & 0xFFFF_FFFF_FFFF_FFFF
    return mixed >> (64 - bits)


def endpoint_index(table: pa.Table) -> bytes | None:
    """The index of a sorted segment table: its (key, block) pairs sorted, repeats
    dropped, in up to 256 buckets by the key's top bits, each a zstd frame of key
    deltas (uint32) then blocks (uint16); None where the octets of an
    address would not read as little-endian words."""
    n = table.num_rows
    if sys.byteorder != "little" or n == 0 or n > INDEX_BLOCK * 65535:
        return None
    table = table.combine_chunks()
    addr, aport = table["addr"].chunk(0), table["aport"].chunk(0)
    u64 = pa.uint64()
    words = pa.Array.from_buffers(u64, 2 * n, [None, addr.buffers()[1]], offset=2 * addr.offset)
    pairs = pa.FixedSizeListArray.from_arrays(words, 2)
    mixed = pc.multiply(pc.list_element(pairs, 0), pa.scalar(_MIX[0], u64))
    mixed = pc.add(mixed, pc.multiply(pc.list_element(pairs, 1), pa.scalar(_MIX[1], u64)))
    mixed = pc.add(mixed, pc.multiply(aport.cast(u64), pa.scalar(_MIX[2], u64)))
    blocks = b"".join(
        struct.pack("<H", b) * min(INDEX_BLOCK, n - b * INDEX_BLOCK)
        for b in range(-(-n // INDEX_BLOCK))
    )
    block = pa.Array.from_buffers(pa.uint16(), n, [None, pa.py_buffer(blocks)])
    both = pc.bit_wise_or(
        pc.shift_left(pc.shift_right(mixed, pa.scalar(64 - _KEY_BITS, u64)), pa.scalar(16, u64)),
        block.cast(u64),
    )
    # A tenure's Created and Deleted are neighbours in (nat, port, ts) order:
    # dropping a pair equal to the row before leaves about as few as unique(),
    # without hashing (a rare repeat left over names a block twice).
    repeat = pa.concat_arrays([pa.array([False]), pc.equal(both[1:], both[:-1])])
    # Initialized: no endpoint.
    both = both.filter(pc.and_(pc.greater(table["kind"].chunk(0), 0), pc.invert(repeat)))
    if len(both) == 0:  # only Initialized events: one empty bucket
        return _HEADER.pack(b"NEI1", INDEX_BLOCK, _KEY_BITS, 1) + struct.pack("<4I", 0, 0, 0, 0)
    both = both.take(pc.sort_indices(both))
    keys = pc.shift_right(both, pa.scalar(16, u64)).cast(pa.uint32())
    prev = pa.concat_arrays([pa.array([0], pa.uint32()), keys[:-1]])
    deltas = memoryview(pc.subtract(keys, prev).buffers()[1])[: 4 * len(keys)]
    owned = memoryview(pc.bit_wise_and(both, pa.scalar(0xFFFF, u64)).cast(pa.uint16()).buffers()[1])
    starts = memoryview(keys.buffers()[1]).cast("I")[: len(keys)]
    counts, bases, frames = [], [], []
    # Buckets of about a thousand keys or more: a small segment's index small.
    buckets = min(_BUCKET_BITS, _KEY_BITS, (len(keys) >> 10).bit_length())
    shift = _KEY_BITS - buckets
    i = 0
    for b in range(1 << buckets):
        j = bisect.bisect_left(starts, (b + 1) << shift, i)
        counts.append(j - i)
        bases.append(starts[i - 1] if i > 0 else 0)
        frames.append(
            pa.compress(
                deltas[4 * i : 4 * j].tobytes() + owned[2 * i : 2 * j].tobytes(),
                "zstd",
                asbytes=True,
            )
            if j > i
            else b""
        )
        i = j
    offsets = list(itertools.accumulate((len(f) for f in frames), initial=0))
    head = _HEADER.pack(b"NEI1", INDEX_BLOCK, _KEY_BITS, 1 << buckets)
    nums = struct.pack(f"<{len(counts) * 2 + len(offsets)}I", *counts, *bases, *offsets)
    return head + nums + b"".join(frames)


class EndpointIndex:
    """A segment's endpoint index, read from its footer."""

    def __init__(self, octets: bytes):
        magic, self.block, self.bits, buckets = _HEADER.unpack_from(octets)
        if magic != b"NEI1":
            raise ValueError("not an endpoint index")
        nums = struct.unpack_from(f"<{buckets * 3 + 1}I", octets, _HEADER.size)
        self.counts, self.bases = nums[:buckets], nums[buckets : 2 * buckets]
        self.offsets = nums[2 * buckets :]
        self.data = memoryview(octets)[_HEADER.size + 4 * len(nums) :]
        self.shift = self.bits - (buckets.bit_length() - 1)

    def blocks(self, addr: bytes, aport: int) -> list[int]:
        """The blocks that may hold events of (addr, aport), by number."""
        key = endpoint_key(addr, aport, self.bits)
        b = key >> self.shift
        count = self.counts[b]
        if not count:
            return []
        raw = pa.decompress(
            self.data[self.offsets[b] : self.offsets[b + 1]], 6 * count, "zstd", asbytes=True
        )
        keys = list(
            itertools.accumulate(memoryview(raw)[: 4 * count].cast("I"), initial=self.bases[b])
        )[1:]
        owners = memoryview(raw)[4 * count :].cast("H")
        i = bisect.bisect_left(keys, key)
        found = []
        while i < count and keys[i] == key:
            found.append(owners[i])
            i += 1
        return found


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
        self.starts = list(
            itertools.accumulate(
                (meta.row_group(g).num_rows for g in range(meta.num_row_groups)), initial=0
            )
        )
        kv = meta.metadata or {}
        self.index = EndpointIndex(kv[ENDPOINT_INDEX]) if ENDPOINT_INDEX in kv else None
        self._last: tuple[tuple[int, int] | None, pa.Table] = (None, SCHEMA.empty_table())

    def port_table(self, nat: int, port: int) -> pa.Table:
        """Every event of ``nat``:``port`` in this segment, by (ts, id)."""
        hit = [
            g
            for g, (n0, n1, p0, p1) in enumerate(self.groups)
            if n0 <= nat <= n1 and (n0 < n1 or p0 <= port <= p1)
        ]
        if not hit:
            return SCHEMA.empty_table()
        if self._last[0] == (nat, port):  # a who looks before, then after
            return self._last[1]
        # Without the id column, and in this thread: a lookup decodes little.
        t = self.file.read_row_groups(hit, columns=ROW_COLUMNS, use_threads=False)
        mask = pc.and_(pc.equal(t["nat"], nat), pc.equal(t["port"], port))
        t = t.filter(mask)
        self._last = ((nat, port), t)
        return t

    def endpoint_table(self, addr: bytes, aport: int) -> pa.Table | None:
        """Every event of client ``addr``:``aport`` in this segment (all
        columns), from the row groups its index names; None without an index."""
        if self.index is None:
            return None
        groups: set[int] = set()
        size = self.index.block
        for b in self.index.blocks(addr, aport):
            lo, hi = b * size, (b + 1) * size
            first = bisect.bisect_right(self.starts, lo) - 1
            last = bisect.bisect_left(self.starts, hi)
            groups.update(range(max(first, 0), min(last, len(self.starts) - 1)))
        if not groups:
            return SCHEMA.empty_table()
        t = self.file.read_row_groups(sorted(groups), use_threads=False)
        mask = pc.and_(
            pc.equal(t["addr"], pa.scalar(addr, pa.binary(16))), pc.equal(t["aport"], aport)
        )
        return t.filter(pc.fill_null(mask, False))
