"""The history as rows and as text: the rows ``export`` streams (and
``--follow`` polls), and the writers for log lines, JSON lines and CSV."""

from __future__ import annotations

import functools
import itertools
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

from nat64ho.eventlog import ipv4_str, ipv6_str, ts_rfc3339, ts_str
from nat64ho.ops.db import FETCH, Conn, arg, id_event_ok, stream
from nat64ho.storage import schema


def history_rows(
    conn: Conn,
    *,
    nat: int | None = None,
    since: int | None = None,
    until: int | None = None,
    after: int | None = None,
    upto: int | None = None,
    with_id: bool = False,
    limit: int | None = None,
) -> Iterator[tuple[Any, ...]]:
    """History rows ``(ts, kind, nat, port, addr, aport)``, streamed; with
    ``with_id``, the event id (its sequence number) comes first.

    Without a time window: in the order the server logged them (id order),
    which is what makes an export byte-identical to its log. With ``since``
    (inclusive) or ``until`` (exclusive): in time order along the ts index,
    so that a narrow window of a huge history costs only its own rows; the
    two orders differ only where the clock stepped back or older logs were
    imported later. ``after``: only events with a higher id (id order), so
    that a reader resumes exactly where it stopped; ``upto``: none above this
    id (see :func:`settled_id`). Sealed events (nat64ho.archive) come in
    their place in either order.
    """
    from nat64ho.archive import tiers

    if tiers.has_segments(conn):
        return HistoryRows(
            tiers.snapshot(
                conn,
                lambda arch: tiers.history_blocks(
                    conn,
                    arch,
                    lambda: _hot_rows(conn, nat, since, until, after, upto, True, limit),
                    nat=nat,
                    since=since,
                    until=until,
                    after=after,
                    upto=upto,
                ),
                lambda: tiers.blocks_of(
                    _hot_rows(conn, nat, since, until, after, upto, True, limit)
                ),
            ),
            with_id=with_id,
            limit=limit,
        )
    return _hot_rows(conn, nat, since, until, after, upto, with_id, limit)


class HistoryRows(Iterator[tuple[Any, ...]]):
    """History rows one by one, and (``blocks``) the same in blocks: Arrow
    tables of sealed rows or lists of row tuples, each with its id first,
    for a writer that formats a block at once."""

    def __init__(self, blocks: Iterator[Any], *, with_id: bool, limit: int | None):
        self._blocks = blocks
        self.with_id = with_id
        self._rows = self._each()
        if limit is not None:
            self._rows = itertools.islice(self._rows, limit)
        self.limited = limit is not None

    def _each(self) -> Iterator[tuple[Any, ...]]:
        from nat64ho.archive import segment

        for block in self._blocks:
            if isinstance(block, list):
                yield from block if self.with_id else (r[1:] for r in block)
            else:
                yield from segment.as_rows(block, with_id=self.with_id)

    def __next__(self) -> tuple[Any, ...]:
        try:
            return next(self._rows)
        except StopIteration:
            self.close()  # a limit reached: the read ends now, not when freed
            raise

    def close(self) -> None:
        """End the read (its transaction) before all rows were taken."""
        close = getattr(self._blocks, "close", None)
        if close is not None:
            close()

    def blocks(self) -> Iterator[Any] | None:
        """The rows in blocks, each row with its id first; None with a limit."""
        return None if self.limited else self._blocks


def _hot_rows(
    conn: Conn,
    nat: int | None,
    since: int | None,
    until: int | None,
    after: int | None,
    upto: int | None,
    with_id: bool,
    limit: int | None,
) -> Iterator[tuple[Any, ...]]:
    where: list[str] = []
    args: list[Any] = []
    if after is not None:
        where.append(f"id > {arg(args, after)}")
    if upto is not None:
        where.append(f"id <= {arg(args, upto)}")
    if nat is not None:
        where.append(f"nat = {arg(args, nat)}")
    if since is not None:
        where.append(f"ts >= {arg(args, since)}")
    if until is not None:
        where.append(f"ts < {arg(args, until)}")
    if since is None and until is None:
        order, table = "id", "event"
    else:
        order, table = "ts, id", conn.sql.event_by_ts
    sql = f"SELECT {'id, ' if with_id else ''}ts, kind, nat, port, addr, aport FROM {table}"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += f" ORDER BY {order}"
    if limit is not None:
        sql += f" LIMIT {int(limit)}"
    return stream(conn.execute(sql, args), None, id_event_ok if with_id else schema.event_ok, conn)


def last_event_id(conn: Conn) -> int:
    """The highest event id (0 for an empty history): a cheap upper bound
    for progress."""
    return int(conn.execute("SELECT coalesce(max(id), 0) FROM event").fetchone()[0])


#: How often settled_id looks again whether the writers it waits for are done.
SETTLE_POLL_S = 0.01


def settled_id(conn: Conn) -> int | None:
    """An event id up to which the history is final: no event with a lower
    or equal id can still appear. None on SQLite, where a writer holds the
    database alone from its first insert to its commit, so ids are
    committed in order and every id read is final.

    PostgreSQL draws identity ids when a row is inserted, not when it is
    committed: a transaction that drew id 7 may commit after one that drew
    id 8, and a reader resuming after 8 would never see 7. So: read the
    last id drawn (the sequence, cache 1 as the schema makes it), then the
    transactions that hold the insert lock (ROW EXCLUSIVE) on ``event``, and
    wait until those are over. Every id up to the one read was drawn by a
    transaction that held that lock when it drew it, so it is then
    committed or gone. Chosen over ``LOCK TABLE event IN SHARE MODE``
    (which needs a writing session and stops the server's commits while
    waiting) and over snapshot xmin (an insert draws its id before it gets
    a transaction id, so xmin alone leaves a gap). The wait is for commits
    already under way: milliseconds."""
    if not conn.sql.postgres:
        return None
    last = int(
        conn.execute(
            "SELECT coalesce(pg_sequence_last_value("
            "pg_get_serial_sequence('event', 'id')::regclass), 0)"
        ).fetchone()[0]
    )
    lock = (
        "SELECT virtualtransaction FROM pg_locks WHERE locktype = 'relation' "
        "AND relation = 'event'::regclass AND mode = 'RowExclusiveLock' AND granted "
        "AND pid <> pg_backend_pid()"
    )
    writers = [r[0] for r in conn.execute(lock).fetchall()]
    while writers:
        time.sleep(SETTLE_POLL_S)
        writers = [
            r[0]
            for r in conn.execute(lock + " AND virtualtransaction = ANY($1)", (writers,)).fetchall()
        ]
    return last


_KINDS = ("Initialized", "Created", "Deleted")


class LineFormatter:
    """:func:`nat64ho.eventlog.format_event` for history rows, several times
    faster: NAT64 address text is remembered here (times come from ts_str,
    which remembers recent seconds), and IPv6 text comes from the C library
    wherever it agrees with RFC 5952 (the tests check that every line equals
    format_event's)."""

    def __init__(self) -> None:
        self._nats: dict[int, str] = {}

    ts = staticmethod(ts_str)  # it remembers the text of recent seconds
    rfc3339 = staticmethod(ts_rfc3339)  # the same, for the machine formats

    def nat(self, nat: int) -> str:
        text = self._nats.get(nat)
        if text is None:
            if len(self._nats) >= 65536:  # bounded, like the import caches
                self._nats.clear()
            text = self._nats[nat] = ipv4_str(nat)
        return text

    @staticmethod
    def ipv6(addr: bytes) -> str:
        # glibc writes ::a.b.c.d for the deprecated IPv4-compatible form and
        # ipaddress does not; leave all of ::/80 to the reference function.
        if len(addr) == 16 and addr[:10] != b"\0" * 10:
            return socket.inet_ntop(socket.AF_INET6, addr)
        return ipv6_str(addr)

    def line(self, row: tuple[Any, ...]) -> str:
        ts, kind, nat, port, addr, aport = row
        if kind == 0:
            return f"{self.ts(ts)} Initialized {self.nat(nat)}"
        return f"{self.ts(ts)} {_KINDS[kind]} {self.nat(nat)}:{port} [{self.ipv6(addr)}]:{aport}"

    def lines(self, table: Any) -> str:
        """The log lines, each with its newline, of an Arrow table of history
        rows (a block of a segment): formatted by column, in Arrow, rather
        than row by row; the same text as :meth:`line` (the tests compare)."""
        import pyarrow as pa
        import pyarrow.compute as pc

        table = table.combine_chunks()
        n = table.num_rows
        ts, kind = table["ts"].chunk(0), table["kind"].chunk(0)
        if n == 0:
            return ""
        span = pc.min_max(ts).as_py()
        if span["min"] < 0 or span["max"] >= _YEAR_10000 or pc.max(kind).as_py() > 2:
            return "".join([self.line(r) + "\n" for r in _table_rows(table)])
        second = pc.divide(ts, 1_000_000)
        micro = pc.subtract(ts, pc.multiply(second, 1_000_000))
        seconds = pc.dictionary_encode(second)
        when = pc.binary_join_element_wise(
            self._texts(seconds.dictionary, lambda s: self.ts(s * 1_000_000)[:-7]).take(
                seconds.indices
            ),
            pc.utf8_lpad(micro.cast(pa.string()), 6, "0"),
            ".",
        )
        nats = pc.dictionary_encode(table["nat"].chunk(0))
        nat = self._texts(nats.dictionary, self.nat).take(nats.indices)
        head = pc.binary_join_element_wise(when, _arrow_kinds().take(kind), nat, " ")
        endpoint = pc.binary_join_element_wise(
            head,
            ":",
            table["port"].chunk(0).cast(pa.string()),
            " [",
            self._ipv6_texts(table["addr"].chunk(0), pc.greater(kind, 0)),
            "]:",
            table["aport"].chunk(0).cast(pa.string()),
            "\n",
            "",
        )
        lines = pc.if_else(pc.equal(kind, 0), pc.binary_join_element_wise(head, "\n", ""), endpoint)
        # The lines, newlines included, are one run of the array's data.
        _, offsets, data = lines.buffers()
        at = memoryview(offsets).cast("i")
        return memoryview(data)[at[lines.offset] : at[lines.offset + n]].tobytes().decode("ascii")

    @staticmethod
    def _texts(values: Any, text: Callable[[Any], str]) -> Any:
        import pyarrow as pa

        return pa.array([text(v) for v in values.to_pylist()], pa.string())

    def _ipv6_texts(self, addr: Any, used: Any) -> Any:
        """RFC 5952 text of a fixed_size_binary(16) array: the eight hextets
        by table lookup and joined, which is the text wherever no two
        consecutive hextets are zero (nothing to compress); the others (and
        all of ::/80, a run) by :meth:`ipv6`. ``used``: the rows that matter."""
        import pyarrow as pa
        import pyarrow.compute as pc

        n = len(addr)
        words = pa.Array.from_buffers(
            pa.uint16(), 8 * n, [None, addr.buffers()[1]], offset=8 * addr.offset
        )
        hextets = _hextets().take(words)
        text = pc.binary_join(pa.ListArray.from_arrays(_eights(n), hextets), ":")
        # A zero hextet followed by another in the same address: one bit per
        # hextet, so each address is one byte of the bitmap.
        zero = pc.equal(words, 0)
        pair = pc.and_(zero, pa.concat_arrays([zero.slice(1), pa.array([False])]))
        pair = pc.and_(pair, _within(n))
        run = pa.Array.from_buffers(
            pa.uint8(), n, [None, pair.buffers()[1]], offset=pair.offset // 8
        )
        odd = pc.and_(pc.not_equal(run, 0), pc.fill_null(used, False))
        where = pc.indices_nonzero(odd)
        if len(where):
            slow = [self.ipv6(a) for a in addr.take(where).to_pylist()]
            text = pc.replace_with_mask(text, odd, pa.array(slow, pa.string()))
        return text


#: 10000-01-01 in µs: the calendar of the log lines ends before.
_YEAR_10000 = 253_402_300_800_000_000


def _table_rows(table: Any) -> Iterator[tuple[Any, ...]]:
    cols = ["ts", "kind", "nat", "port", "addr", "aport"]
    return zip(*(table[c].to_pylist() for c in cols), strict=True)


@functools.cache
def _arrow_kinds() -> Any:
    import pyarrow as pa

    return pa.array(list(_KINDS), pa.string())


@functools.cache
def _hextets() -> Any:
    """Hex text of each 16-bit value as read from memory (little-endian),
    so that the address octets index it without a byte swap."""
    import pyarrow as pa

    return pa.array([f"{(v & 255) << 8 | v >> 8:x}" for v in range(65536)], pa.string())


def _eights(n: int) -> Any:
    import pyarrow as pa
    import pyarrow.compute as pc

    return pc.multiply(pa.array(range(n + 1), pa.int32()), 8)


def _within(n: int) -> Any:
    """A mask of 8 n bits: hextets 0-6 of each address (a pair starting at
    hextet 7 would span two addresses)."""
    import pyarrow as pa

    return pa.Array.from_buffers(pa.bool_(), 8 * n, [None, pa.py_buffer(b"\x7f" * n)])


class TextSink(Protocol):
    """Where a writer puts its text: a text file, or anything else with ``write``."""

    def write(self, text: str, /) -> int: ...


#: A writer: rows in, the count of events written out.
Writer = Callable[[Iterable[tuple[Any, ...]], TextSink], int]


def write_log(rows: Iterable[tuple[Any, ...]], out: TextSink) -> int:
    """Write rows as §6 log lines; returns how many."""
    blocks = rows.blocks() if isinstance(rows, HistoryRows) else None
    if blocks is not None:
        return write_log_blocks(blocks, out)
    fmt = LineFormatter().line
    n = 0
    buf = []
    for row in rows:
        buf.append(fmt(row))
        if len(buf) == FETCH:
            out.write("\n".join(buf) + "\n")
            n += len(buf)
            buf.clear()
    if buf:
        out.write("\n".join(buf) + "\n")
        n += len(buf)
    return n


def write_log_blocks(blocks: Iterable[Any], out: TextSink) -> int:
    """:func:`write_log` for :meth:`HistoryRows.blocks`; each block is
    written whole before the next is asked for."""
    f = LineFormatter()
    n = 0
    for block in blocks:
        if isinstance(block, list):
            out.write("".join([f.line(r[1:]) + "\n" for r in block]))
            n += len(block)
        else:
            out.write(f.lines(block))
            n += block.num_rows
    return n


def write_jsonl(rows: Iterable[tuple[Any, ...]], out: TextSink) -> int:
    """One JSON object per line with fixed keys: seq, ts, event, nat, port, ipv6,
    ipv6_port (the last three null for Initialized). ``rows`` carry their id
    first (``history_rows(with_id=True)``): it is ``seq``, for ``--after``."""
    f = LineFormatter()
    n = 0
    for seq, ts, kind, nat, port, addr, aport in rows:
        # Every value is digits, dots, colons or a fixed word: no escaping needed.
        if kind == 0:
            out.write(
                f'{{"seq": {seq}, "ts": "{f.rfc3339(ts)}", "event": "Initialized", '
                f'"nat": "{f.nat(nat)}", "port": null, "ipv6": null, "ipv6_port": null}}\n'
            )
        else:
            out.write(
                f'{{"seq": {seq}, "ts": "{f.rfc3339(ts)}", "event": "{_KINDS[kind]}", '
                f'"nat": "{f.nat(nat)}", "port": {port}, "ipv6": "{f.ipv6(addr)}", '
                f'"ipv6_port": {aport}}}\n'
            )
        n += 1
    return n


CSV_HEADER = "seq,ts,event,nat,port,ipv6,ipv6_port"


def write_csv(rows: Iterable[tuple[Any, ...]], out: TextSink) -> int:
    """CSV with a header row; the columns of :func:`write_jsonl`, empty for
    Initialized. ``rows`` carry their id first, as for write_jsonl."""
    f = LineFormatter()
    out.write(CSV_HEADER + "\n")
    n = 0
    for seq, ts, kind, nat, port, addr, aport in rows:
        if kind == 0:
            out.write(f"{seq},{f.rfc3339(ts)},Initialized,{f.nat(nat)},,,\n")
        else:
            out.write(
                f"{seq},{f.rfc3339(ts)},{_KINDS[kind]},{f.nat(nat)},{port},{f.ipv6(addr)},{aport}\n"
            )
        n += 1
    return n
