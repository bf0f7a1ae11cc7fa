"""The read-only questions: the current table (``query``), who held a NAT
port when (``who``), and per-NAT64 figures (``stats``).

Every query walks an index of migration 0001 (the plans are checked in the
tests), so answers cost the same on a fresh database and on one with 100 M
events. Times are integer microseconds since the epoch (UTC).

Attribution rules (``who``): a NAT port is held from its ``Created`` to its
``Deleted``. The history may start late (logs imported from another server,
pruned rows), so a ``Deleted`` with no ``Created`` before it still names the
holder, and the current table names holders whose ``Created`` is gone. When
two events of one port share a timestamp, the ``Deleted`` came first: a full
table deletes the least recently used entry and then reuses its port.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

from nat64ho.archive import tiers
from nat64ho.eventlog import Event, EventKind, ipv4_str
from nat64ho.ops.db import Conn, arg, bad_row, db_path, stream
from nat64ho.storage import schema

_CREATED, _DELETED = int(EventKind.CREATED), int(EventKind.DELETED)


class Entry(NamedTuple):
    """One row of the current table."""

    nat: int  #: NAT64 IPv4 address as an integer
    port: int  #: NAT port
    addr: bytes  #: client IPv6 address, 16 octets
    aport: int  #: client port
    created: int  #: when the entry was created
    last_use: int  #: when it was created or last named by MAP, LOOKUP or TOUCH


class Holding(NamedTuple):
    """One endpoint's tenure of one NAT port, and the events that prove it."""

    nat: int
    port: int
    addr: bytes
    aport: int
    start: int | None  #: None: began before the history we have
    end: int | None  #: None: still held (``current``) or not recorded
    current: bool  #: the entry is in the table now
    created: Event | None  #: the Created that began it, if recorded
    deleted: Event | None  #: the Deleted that ended it, if recorded

    def covers(self, at: int) -> bool:
        """Whether the holding includes the instant ``at``; an end that was
        not recorded is taken as open, so that no candidate is hidden."""
        return (self.start is None or self.start <= at) and (self.end is None or at < self.end)

    def overlaps(self, lo: int, hi: int) -> bool:
        """Whether the holding includes some instant of [lo, hi]."""
        return (self.start is None or self.start <= hi) and (self.end is None or lo < self.end)


@dataclass
class NatStats:
    """One NAT64 as ``stats`` reports it; times may be None when unknown."""

    nat: int
    entries: int
    capacity: int
    oldest_last_use: int | None
    first_hello: int | None
    last_hello: int | None
    created_hour: int
    deleted_hour: int
    created_day: int
    deleted_day: int


# ---------------------------------------------------------------- NAT64s


def nat_addresses(conn: Conn, *, history: bool = True) -> list[int]:
    """Every NAT64 the database knows: said HELLO, has entries, or (unless
    ``history`` is false) has history."""
    found = {r[0] for r in conn.execute("SELECT nat FROM nat")}
    # A loose index scan: one index seek per distinct NAT64 instead of
    # reading millions of rows to find a hundred values.
    for table in ("entry", "event") if history else ("entry",):
        sql = f"SELECT min(nat) FROM {table} WHERE nat > $1"
        nat = conn.execute(f"SELECT min(nat) FROM {table}").fetchone()[0]
        while nat is not None:
            found.add(nat)
            nat = conn.execute(sql, (nat,)).fetchone()[0]
    if history:
        found |= tiers.nats(conn)
    return sorted(found)


# ---------------------------------------------------------------- query


def prefix_range(network: ipaddress.IPv6Network) -> tuple[bytes, bytes]:
    """First and last address of a prefix as blobs: SQLite (and PostgreSQL's
    bytea) compare octet by octet, so a prefix is one range of the address
    indexes."""
    return network.network_address.packed, network.broadcast_address.packed


def query_entries(
    conn: Conn,
    *,
    nat: int | None = None,
    ipv6: ipaddress.IPv6Network | None = None,
    port: int | None = None,
) -> Iterator[Entry]:
    """Current entries, by NAT64 then port, optionally only one NAT64, one
    port, or clients in one IPv6 prefix (a /128 for one address)."""
    cols = "nat, port, addr, aport, created, last_use"
    if nat is None and ipv6 is None and port is None:
        yield from stream(
            conn.execute(f"SELECT {cols} FROM entry ORDER BY nat, port"),
            Entry,
            schema.entry_ok,
            conn,
        )
        return
    for n in [nat] if nat is not None else nat_addresses(conn, history=False):
        if ipv6 is not None:
            lo, hi = prefix_range(ipv6)
            extra, args = ("AND port = $4", (port,)) if port is not None else ("", ())
            cur = conn.execute(
                f"SELECT {cols} FROM entry WHERE nat = $1 AND addr BETWEEN $2 AND $3 "
                f"{extra} ORDER BY port",
                (n, lo, hi, *args),
            )
        elif port is not None:
            cur = conn.execute(f"SELECT {cols} FROM entry WHERE nat = $1 AND port = $2", (n, port))
        else:
            cur = conn.execute(f"SELECT {cols} FROM entry WHERE nat = $1 ORDER BY port", (n,))
        yield from stream(cur, Entry, schema.entry_ok, conn)


def _entry_row(conn: Conn, row: Any) -> Any:
    """A (addr, aport, created) read of one entry, checked."""
    if row is not None and not (
        type(row[0]) is bytes and len(row[0]) == 16 and type(row[1]) is int and type(row[2]) is int
    ):
        raise schema.BadRow(
            f"{db_path(conn)}: table entry, a row of this query does not decode "
            f"(addr {row[0]!r:.40}, aport {row[1]!r}, created {row[2]!r}); run "
            "'nat64ho check'"
        )
    return row


# ---------------------------------------------------------------- who


def _make_event(row: Any, nat: int, port: int) -> Event:
    ts, kind, addr, aport = row
    return Event(ts, EventKind(kind), nat, port, addr, aport)


def _endpoint(e: Event) -> tuple[bytes, int]:
    # Rows passed event_ok, which gives every Created and Deleted its endpoint.
    assert e.addr is not None and e.aport is not None
    return e.addr, e.aport


def _order(e: Event) -> tuple[int, int]:
    # At one timestamp a Deleted precedes the Created that reuses the port.
    return e.ts, 1 if e.kind == EventKind.CREATED else 0


def who_port(conn: Conn, nat: int, port: int, at: int) -> Holding | None:
    """Who held NAT ``nat``:``port`` at ``at``; None if, as far as the
    database knows, nobody did."""
    key = (nat, port)

    def _event(r: Any, nat: int, port: int) -> Event:
        full = (r[0], r[1], nat, port, r[2], r[3])
        if not schema.event_ok(full):
            raise bad_row(conn, full, schema.event_ok)
        return _make_event(r, nat, port)

    before = [
        _event(r, *key)
        for r in conn.execute(
            "SELECT ts, kind, addr, aport FROM event WHERE nat = $1 AND port = $2 AND kind > 0 "
            "AND ts <= $3 ORDER BY ts DESC, kind DESC LIMIT 2",
            (*key, at),
        )
    ]
    after = [
        _event(r, *key)
        for r in conn.execute(
            "SELECT ts, kind, addr, aport FROM event WHERE nat = $1 AND port = $2 AND kind > 0 "
            "AND ts > $3 ORDER BY ts, kind LIMIT 2",
            (*key, at),
        )
    ]
    sealed_before, sealed_after = tiers.port_neighbours(
        conn, nat, port, at, [e.ts for e in before], [e.ts for e in after]
    )
    before += [_event(r, *key) for r in sealed_before]
    after += [_event(r, *key) for r in sealed_after]
    # Two rows each way are enough: only a Deleted and a Created can share a
    # timestamp, and the rule above says which of them came first.
    prev = max(before, key=_order) if before else None
    nxt = min(after, key=_order) if after else None
    row = _entry_row(
        conn,
        conn.execute(
            "SELECT addr, aport, created FROM entry WHERE nat = $1 AND port = $2", key
        ).fetchone(),
    )
    if prev is not None and prev.kind == EventKind.CREATED:
        holder = _endpoint(prev)
        if row is not None and (row[0], row[1]) != holder and prev.ts < row[2] <= at:
            # The table holds a later tenant whose Created (and the Deleted
            # of this one) the history lacks: the table is the truth.
            return Holding(nat, port, row[0], row[1], row[2], None, True, None, None)
        ended = (
            nxt
            if (
                nxt is not None
                and nxt.kind == EventKind.DELETED
                and (nxt.addr, nxt.aport) == holder
            )
            else None
        )
        current = ended is None and row is not None and (row[0], row[1]) == holder
        return Holding(
            nat, port, *holder, prev.ts, ended.ts if ended else None, current, prev, ended
        )
    if nxt is not None and nxt.kind == EventKind.DELETED:
        # No Created between the last event before `at` and this Deleted:
        # the holder it names was already holding at `at`.
        return Holding(nat, port, *_endpoint(nxt), None, nxt.ts, False, None, nxt)
    if row is not None and nxt is None and row[2] <= at:
        # A current entry whose Created is not in the history (pruned, or
        # the table came from elsewhere): its created time is that of the
        # Created event no longer kept.
        return Holding(nat, port, row[0], row[1], row[2], None, True, None, None)
    return None


#: Events of one port looked at within a tolerance window: a port reused
#: more often than this within minutes makes a report useless anyway.
WINDOW_EVENTS = 1000


def who_port_window(
    conn: Conn, nat: int, port: int, at: int, tolerance: int, span: int = 1
) -> list[Holding]:
    """Every holder of ``nat``:``port`` at some instant of
    [at - tolerance, at + span - 1 + tolerance], closest to the reported
    time first (a holding within [at, at + span - 1] is at distance 0).
    ``span`` is the precision of the reported time in µs: a time given to
    the second covers that second."""
    lo, hi = at - tolerance, at + span - 1 + tolerance
    # Each holding that overlaps the window either covers its start, its
    # end, or begins inside it with a Created.
    instants = [lo, hi, at] + [
        r[0]
        for r in conn.execute(
            "SELECT ts FROM event WHERE nat = $1 AND port = $2 AND kind = $3 AND ts > $4 "
            "AND ts <= $5 ORDER BY ts LIMIT $6",
            (nat, port, _CREATED, lo, hi, WINDOW_EVENTS),
        )
    ]
    instants += tiers.created_between(conn, nat, port, lo, hi)[:WINDOW_EVENTS]
    found: dict[tuple[bytes, int, int | None, int | None], Holding] = {}
    for t in dict.fromkeys(instants):  # an exact instant is asked about once
        h = who_port(conn, nat, port, t)
        if h is not None:
            found.setdefault((h.addr, h.aport, h.start, h.end), h)
    return sorted(found.values(), key=lambda h: (distance(h, at, span), h.start or 0))


def distance(h: Holding, at: int, span: int = 1) -> int:
    """Microseconds from [at, at + span - 1] to the nearest instant of the holding."""
    last = at + span - 1
    if h.overlaps(at, last):
        return 0
    if h.start is not None and last < h.start:
        return h.start - last
    return at - h.end if h.end is not None else 0


def who_endpoint(
    conn: Conn,
    network: ipaddress.IPv6Network,
    aport: int | None = None,
    at: int | None = None,
    span: int = 1,
) -> Iterator[Holding]:
    """Every NAT port held by clients in ``network`` (and on ``aport`` if
    given), endpoint by endpoint in time order; with ``at``, only the
    holdings that include some instant of [at, at + span - 1]. Holdings known only from the current
    table (their history pruned) come last."""
    lo, hi = prefix_range(network)
    # One address is an equality, so that an aport condition stays on the
    # index too and the rows need no sort.
    args: list[bytes | int]
    where, args = ("addr = $1", [lo]) if lo == hi else ("addr BETWEEN $1 AND $2", [lo, hi])
    if aport is not None:
        where += f" AND aport = {arg(args, aport)}"
    cur = conn.execute(
        f"SELECT ts, kind, nat, port, addr, aport FROM event WHERE {where} "
        "ORDER BY addr, aport, ts",
        args,
    )
    seen_current: set[tuple[int, int]] = set()
    group: tuple[bytes, int] | None = None
    open_: dict[tuple[int, int], Event] = {}
    done: list[Holding] = []

    def flush() -> Iterator[Holding]:
        for (n, p), created in open_.items():
            row = _entry_row(
                conn,
                conn.execute(
                    "SELECT addr, aport, created FROM entry WHERE nat = $1 AND port = $2", (n, p)
                ).fetchone(),
            )
            current = row is not None and (row[0], row[1]) == (created.addr, created.aport)
            if current:
                seen_current.add((n, p))
            done.append(
                Holding(n, p, *_endpoint(created), created.ts, None, current, created, None)
            )
        open_.clear()
        done.sort(key=lambda h: (h.start if h.start is not None else h.end, h.nat, h.port))
        for h in done:
            if at is None or h.overlaps(at, at + span - 1):
                yield h
        done.clear()

    hot = stream(cur, None, schema.event_ok, conn)
    for ts, kind, n, p, addr, ap in tiers.endpoint_rows(conn, hot, lo, hi, aport):
        if (addr, ap) != group:
            yield from flush()
            group = (addr, ap)
        e = Event(ts, EventKind(kind), n, p, addr, ap)
        if kind == _CREATED:
            stale = open_.pop((n, p), None)
            if stale is not None:  # its Deleted is missing from the history
                done.append(Holding(n, p, addr, ap, stale.ts, None, False, stale, None))
            open_[(n, p)] = e
        elif kind == _DELETED:
            created = open_.pop((n, p), None)
            done.append(
                Holding(n, p, addr, ap, created.ts if created else None, ts, False, created, e)
            )
    yield from flush()

    extra, extra_args = ("AND aport = $4", (aport,)) if aport is not None else ("", ())
    for n in nat_addresses(conn, history=False):
        for p, addr, ap, created in conn.execute(
            "SELECT port, addr, aport, created FROM entry WHERE nat = $1 "
            f"AND addr BETWEEN $2 AND $3 {extra} ORDER BY addr, aport",
            (n, lo, hi, *extra_args),
        ).fetchall():
            if (n, p) in seen_current:
                continue
            _entry_row(conn, (addr, ap, created))
            h = Holding(n, p, addr, ap, created, None, True, None, None)
            if at is None or h.overlaps(at, at + span - 1):
                yield h


# ---------------------------------------------------------------- stats


def stats(conn: Conn, now: int, capacity: int) -> list[NatStats]:
    """Per NAT64, by address: table fill, oldest last use, first and last
    HELLO, Created and Deleted over the hour and the day before ``now``.
    ``capacity``: ports per table, as the caller knows it (``--ports``, or
    the range the server recorded when it last started)."""
    hour, day = now - 3_600_000_000, now - 86_400_000_000
    counts: dict[tuple[int, int], list[int]] = {}
    # One pass over the last day along the ts index, rather than a walk of
    # each NAT64's whole history.
    for nat, kind, n_day, n_hour in conn.execute(
        "SELECT nat, kind, count(*), sum(CASE WHEN ts >= $1 THEN 1 ELSE 0 END) FROM event "
        "WHERE ts >= $2 AND ts <= $3 "
        "AND kind > 0 GROUP BY nat, kind",
        (hour, day, now),
    ):
        counts[(nat, kind)] = [n_day, n_hour]
    for k, (n_day, n_hour) in tiers.kind_counts(conn, day, now, hour).items():
        c = counts.setdefault(k, [0, 0])
        c[0] += n_day
        c[1] += n_hour
    hellos = {
        r[0]: (r[1], r[2]) for r in conn.execute("SELECT nat, first_hello, last_hello FROM nat")
    }
    out = []
    for nat in nat_addresses(conn):
        entries = conn.execute("SELECT count(*) FROM entry WHERE nat = $1", (nat,)).fetchone()[0]
        oldest = conn.execute("SELECT min(last_use) FROM entry WHERE nat = $1", (nat,)).fetchone()[
            0
        ]
        first, last = hellos.get(nat, (None, None))
        for column, v in (
            ("entry.last_use", oldest),
            ("nat.first_hello", first),
            ("nat.last_hello", last),
        ):
            if v is not None and type(v) is not int:
                raise schema.BadRow(
                    f"{db_path(conn)}: {column} of NAT64 {ipv4_str(nat)} holds "
                    f"{type(v).__name__} {v!r:.40}, not a time; run 'nat64ho check'"
                )
        c = counts.get((nat, _CREATED), [0, 0])
        d = counts.get((nat, _DELETED), [0, 0])
        out.append(NatStats(nat, entries, capacity, oldest, first, last, c[1], d[1], c[0], d[0]))
    return out
