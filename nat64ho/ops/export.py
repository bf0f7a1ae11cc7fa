"""The history as rows and as text: the rows ``export`` streams (and
``--follow`` polls), and the writers for log lines, JSON lines and CSV."""

from __future__ import annotations

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
        return tiers.snapshot(
            conn,
            lambda arch: tiers.history_rows(
                conn,
                arch,
                lambda: _hot_rows(conn, nat, since, until, after, upto, True, limit),
                nat=nat,
                since=since,
                until=until,
                after=after,
                upto=upto,
                with_id=with_id,
                limit=limit,
            ),
            lambda: _hot_rows(conn, nat, since, until, after, upto, with_id, limit),
        )
    return _hot_rows(conn, nat, since, until, after, upto, with_id, limit)


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


class TextSink(Protocol):
    """Where a writer puts its text: a text file, or anything else with ``write``."""

    def write(self, text: str, /) -> int: ...


#: A writer: rows in, the count of events written out.
Writer = Callable[[Iterable[tuple[Any, ...]], TextSink], int]


def write_log(rows: Iterable[tuple[Any, ...]], out: TextSink) -> int:
    """Write rows as §6 log lines; returns how many."""
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
