"""What operators ask of a database: the current table, who held a NAT port
when, and the history as log lines (out, in, and pruned).

Synchronous sqlite3 on a connection from :func:`nat64ho.schema.open_db`;
nothing here prints. Every query walks an index of migration 0001 (the plans
are checked in the tests), so answers cost the same on a fresh database and on
one with 100 M events. Times are integer microseconds since the epoch (UTC).

Attribution rules (``who``): a NAT port is held from its ``Created`` to its
``Deleted``. The history may start late (logs imported from another server,
pruned rows), so a ``Deleted`` with no ``Created`` before it still names the
holder, and the current table names holders whose ``Created`` is gone. When
two events of one port share a timestamp, the ``Deleted`` came first: a full
table deletes the least recently used entry and then reuses its port.
"""

from __future__ import annotations

import fcntl
import gzip
import ipaddress
import os
import socket
import sqlite3
import struct
import sys
from dataclasses import dataclass
from typing import BinaryIO, Callable, Iterable, Iterator, NamedTuple, Optional, TextIO

from nat64ho.storage import schema
from nat64ho.eventlog import BadLine, Event, EventKind, ipv4_str, ipv6_str, parse_line, ts_str

_CREATED, _DELETED = int(EventKind.CREATED), int(EventKind.DELETED)

#: Lines per import transaction: big enough that the commit (one fsync) is
#: a small part of the cost, small enough that the server's own commits wait
#: well under a second for the write lock.
IMPORT_BATCH = 20_000
#: Lines between two progress reports of an import.
PROGRESS_LINES = 4096
#: Events deleted per prune transaction, for the same reason.
PRUNE_BATCH = 50_000
#: Rows fetched from SQLite at a time while streaming.
FETCH = 4096


class HistoryError(Exception):
    """Base of the named errors below; the message is meant for an operator."""


class LogUnreadable(HistoryError):
    """A log file to import cannot be opened or read (missing, not gzip, I/O error)."""


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
    start: Optional[int]  #: None: began before the history we have
    end: Optional[int]  #: None: still held (``current``) or not recorded
    current: bool  #: the entry is in the table now
    created: Optional[Event]  #: the Created that began it, if recorded
    deleted: Optional[Event]  #: the Deleted that ended it, if recorded

    def covers(self, at: int) -> bool:
        """Whether the holding includes the instant ``at``; an end that was
        not recorded is taken as open, so that no candidate is hidden."""
        return (self.start is None or self.start <= at) and (self.end is None or at < self.end)


class ImportResult(NamedTuple):
    lines: int  #: lines read
    added: int  #: events that were new to the history
    skipped: int  #: lines that did not parse
    entries: int  #: entries added to the current table by ``rebuild_table``


@dataclass
class NatStats:
    """One NAT64 as ``stats`` reports it; times may be None when unknown."""
    nat: int
    entries: int
    capacity: int
    oldest_last_use: Optional[int]
    first_hello: Optional[int]
    last_hello: Optional[int]
    created_hour: int
    deleted_hour: int
    created_day: int
    deleted_day: int


# ---------------------------------------------------------------- NAT64s

def nat_addresses(conn: sqlite3.Connection, *, history: bool = True) -> list[int]:
    """Every NAT64 the database knows: said HELLO, has entries, or (unless
    ``history`` is false) has history."""
    found = {r[0] for r in conn.execute("SELECT nat FROM nat")}
    # A loose index scan: one index seek per distinct NAT64 instead of
    # reading millions of rows to find a hundred values.
    for table in ("entry", "event") if history else ("entry",):
        sql = f"SELECT min(nat) FROM {table} WHERE nat > ?"
        nat = conn.execute(f"SELECT min(nat) FROM {table}").fetchone()[0]
        while nat is not None:
            found.add(nat)
            nat = conn.execute(sql, (nat,)).fetchone()[0]
    return sorted(found)


# ---------------------------------------------------------------- query

def prefix_range(network: ipaddress.IPv6Network) -> tuple[bytes, bytes]:
    """First and last address of a prefix as blobs: SQLite compares blobs
    octet by octet, so a prefix is one range of the address indexes."""
    return network.network_address.packed, network.broadcast_address.packed


def query_entries(conn: sqlite3.Connection, *, nat: Optional[int] = None,
                  ipv6: Optional[ipaddress.IPv6Network] = None,
                  port: Optional[int] = None) -> Iterator[Entry]:
    """Current entries, by NAT64 then port, optionally only one NAT64, one
    port, or clients in one IPv6 prefix (a /128 for one address)."""
    cols = "nat, port, addr, aport, created, last_use"
    if nat is None and ipv6 is None and port is None:
        yield from _stream(conn.execute(f"SELECT {cols} FROM entry ORDER BY nat, port"), Entry,
                           schema.entry_ok, conn)
        return
    for n in [nat] if nat is not None else nat_addresses(conn, history=False):
        if ipv6 is not None:
            lo, hi = prefix_range(ipv6)
            extra, args = ("AND port = ?", (port,)) if port is not None else ("", ())
            cur = conn.execute(f"SELECT {cols} FROM entry WHERE nat = ? AND addr BETWEEN ? AND ? "
                               f"{extra} ORDER BY port", (n, lo, hi, *args))
        elif port is not None:
            cur = conn.execute(f"SELECT {cols} FROM entry WHERE nat = ? AND port = ?", (n, port))
        else:
            cur = conn.execute(f"SELECT {cols} FROM entry WHERE nat = ? ORDER BY port", (n,))
        yield from _stream(cur, Entry, schema.entry_ok, conn)


def _stream(cur: sqlite3.Cursor, make=None, ok=None, conn=None) -> Iterator:
    """Rows of ``cur`` in chunks; each must pass ``ok`` (see schema.entry_ok)."""
    while rows := cur.fetchmany(FETCH):
        if ok is not None:
            for row in rows:
                if not ok(row):
                    raise _bad(conn, row, ok)
        if make is None:
            yield from rows
        else:
            yield from map(make._make, rows)


def _db_path(conn) -> str:
    try:
        return conn.execute("PRAGMA database_list").fetchone()[2] or "database"
    except sqlite3.Error:
        return "database"


def _bad(conn, row, ok) -> Exception:
    if ok is schema.entry_ok:
        return schema.bad_entry(_db_path(conn), row)
    if ok is _id_event_ok:
        row = row[1:]
    return schema.bad_event(_db_path(conn), row, conn)


def _entry_row(conn, row):
    """A (addr, aport, created) read of one entry, checked."""
    if row is not None and not (type(row[0]) is bytes and len(row[0]) == 16
                                and type(row[1]) is int and type(row[2]) is int):
        raise schema.BadRow(f"{_db_path(conn)}: table entry, a row of this query does not decode "
                            f"(addr {row[0]!r:.40}, aport {row[1]!r}, created {row[2]!r}); run "
                            "'nat64ho check'")
    return row


# ---------------------------------------------------------------- who

def _make_event(row, nat: int, port: int) -> Event:
    ts, kind, addr, aport = row
    return Event(ts, EventKind(kind), nat, port, addr, aport)


def _order(e: Event) -> tuple[int, int]:
    # At one timestamp a Deleted precedes the Created that reuses the port.
    return e.ts, 1 if e.kind == EventKind.CREATED else 0


def who_port(conn: sqlite3.Connection, nat: int, port: int, at: int) -> Optional[Holding]:
    """Who held NAT ``nat``:``port`` at ``at``; None if, as far as the
    database knows, nobody did."""
    key = (nat, port)

    def _event(r, nat, port):
        full = (r[0], r[1], nat, port, r[2], r[3])
        if not schema.event_ok(full):
            raise _bad(conn, full, schema.event_ok)
        return _make_event(r, nat, port)

    before = [_event(r, *key) for r in conn.execute(
        "SELECT ts, kind, addr, aport FROM event WHERE nat = ? AND port = ? AND kind > 0 "
        "AND ts <= ? ORDER BY ts DESC, kind DESC LIMIT 2", (*key, at))]
    after = [_event(r, *key) for r in conn.execute(
        "SELECT ts, kind, addr, aport FROM event WHERE nat = ? AND port = ? AND kind > 0 "
        "AND ts > ? ORDER BY ts, kind LIMIT 2", (*key, at))]
    # Two rows each way are enough: only a Deleted and a Created can share a
    # timestamp, and the rule above says which of them came first.
    prev = max(before, key=_order) if before else None
    nxt = min(after, key=_order) if after else None
    row = _entry_row(conn, conn.execute(
        "SELECT addr, aport, created FROM entry WHERE nat = ? AND port = ?", key).fetchone())
    if prev is not None and prev.kind == EventKind.CREATED:
        holder = (prev.addr, prev.aport)
        if row is not None and (row[0], row[1]) != holder and prev.ts < row[2] <= at:
            # The table holds a later tenant whose Created (and the Deleted
            # of this one) the history lacks: the table is the truth.
            return Holding(nat, port, row[0], row[1], row[2], None, True, None, None)
        ended = nxt if (nxt is not None and nxt.kind == EventKind.DELETED
                        and (nxt.addr, nxt.aport) == holder) else None
        current = ended is None and row is not None and (row[0], row[1]) == holder
        return Holding(nat, port, *holder, prev.ts, ended.ts if ended else None, current,
                       prev, ended)
    if nxt is not None and nxt.kind == EventKind.DELETED:
        # No Created between the last event before `at` and this Deleted:
        # the holder it names was already holding at `at`.
        return Holding(nat, port, nxt.addr, nxt.aport, None, nxt.ts, False, None, nxt)
    if row is not None and nxt is None and row[2] <= at:
        # A current entry whose Created is not in the history (pruned, or
        # the table came from elsewhere). Its created time is the server's
        # table clock, which may differ from the log's by a little.
        return Holding(nat, port, row[0], row[1], row[2], None, True, None, None)
    return None


#: Events of one port looked at within a tolerance window: a port reused
#: more often than this within minutes makes a report useless anyway.
WINDOW_EVENTS = 1000


def who_port_window(conn: sqlite3.Connection, nat: int, port: int, at: int,
                    tolerance: int) -> list[Holding]:
    """Every holder of ``nat``:``port`` at some instant of
    [at - tolerance, at + tolerance], closest to ``at`` first (a holding
    that covers ``at`` is at distance 0)."""
    lo, hi = at - tolerance, at + tolerance
    # Each holding that overlaps the window either covers its start, its
    # end, or begins inside it with a Created.
    instants = [lo, hi, at] + [r[0] for r in conn.execute(
        "SELECT ts FROM event WHERE nat = ? AND port = ? AND kind = ? AND ts > ? AND ts <= ? "
        "ORDER BY ts LIMIT ?", (nat, port, _CREATED, lo, hi, WINDOW_EVENTS))]
    found: dict[tuple, Holding] = {}
    for t in instants:
        h = who_port(conn, nat, port, t)
        if h is not None:
            found.setdefault((h.addr, h.aport, h.start, h.end), h)
    return sorted(found.values(), key=lambda h: (distance(h, at), h.start or 0))


def distance(h: Holding, at: int) -> int:
    """Microseconds from ``at`` to the nearest instant of the holding."""
    if h.covers(at):
        return 0
    if h.start is not None and at < h.start:
        return h.start - at
    return at - h.end if h.end is not None else 0


def who_endpoint(conn: sqlite3.Connection, network: ipaddress.IPv6Network,
                 aport: Optional[int] = None, at: Optional[int] = None) -> Iterator[Holding]:
    """Every NAT port held by clients in ``network`` (and on ``aport`` if
    given), endpoint by endpoint in time order; with ``at``, only the
    holdings that include that instant. Holdings known only from the current
    table (their history pruned) come last."""
    lo, hi = prefix_range(network)
    # One address is an equality, so that an aport condition stays on the
    # index too and the rows need no sort.
    where, args = ("addr = ?", [lo]) if lo == hi else ("addr BETWEEN ? AND ?", [lo, hi])
    if aport is not None:
        where += " AND aport = ?"
        args.append(aport)
    cur = conn.execute(f"SELECT ts, kind, nat, port, addr, aport FROM event WHERE {where} "
                       "ORDER BY addr, aport, ts", args)
    seen_current: set[tuple[int, int]] = set()
    group: Optional[tuple[bytes, int]] = None
    open_: dict[tuple[int, int], Event] = {}
    done: list[Holding] = []

    def flush() -> Iterator[Holding]:
        for (n, p), created in open_.items():
            row = _entry_row(conn, conn.execute(
                "SELECT addr, aport, created FROM entry WHERE nat = ? AND port = ?", (n, p)).fetchone())
            current = row is not None and (row[0], row[1]) == (created.addr, created.aport)
            if current:
                seen_current.add((n, p))
            done.append(Holding(n, p, created.addr, created.aport, created.ts, None, current,
                                created, None))
        open_.clear()
        done.sort(key=lambda h: (h.start if h.start is not None else h.end, h.nat, h.port))
        for h in done:
            if at is None or h.covers(at):
                yield h
        done.clear()

    for ts, kind, n, p, addr, ap in _stream(cur, None, schema.event_ok, conn):
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
            done.append(Holding(n, p, addr, ap, created.ts if created else None, ts, False,
                                created, e))
    yield from flush()

    extra, args = ("AND aport = ?", (aport,)) if aport is not None else ("", ())
    for n in nat_addresses(conn, history=False):
        for p, addr, ap, created in conn.execute(
                f"SELECT port, addr, aport, created FROM entry WHERE nat = ? AND addr BETWEEN ? AND ? "
                f"{extra} ORDER BY addr, aport", (n, lo, hi, *args)).fetchall():
            if (n, p) in seen_current:
                continue
            _entry_row(conn, (addr, ap, created))
            h = Holding(n, p, addr, ap, created, None, True, None, None)
            if at is None or h.covers(at):
                yield h


# ---------------------------------------------------------------- export

def history_rows(conn: sqlite3.Connection, *, nat: Optional[int] = None,
                 since: Optional[int] = None, until: Optional[int] = None,
                 after: Optional[int] = None, with_id: bool = False,
                 limit: Optional[int] = None) -> Iterator[tuple]:
    """History rows ``(ts, kind, nat, port, addr, aport)``, streamed; with
    ``with_id``, the event id (its sequence number) comes first.

    Without a time window: in the order the server logged them (id order),
    which is what makes an export byte-identical to its log. With ``since``
    (inclusive) or ``until`` (exclusive): in time order along the ts index,
    so that a narrow window of a huge history costs only its own rows; the
    two orders differ only where the clock stepped back or older logs were
    imported later. ``after``: only events with a higher id (id order), so
    that a reader resumes exactly where it stopped.
    """
    where, args = [], []
    if after is not None:
        where.append("id > ?")
        args.append(after)
    if nat is not None:
        where.append("nat = ?")
        args.append(nat)
    if since is not None:
        where.append("ts >= ?")
        args.append(since)
    if until is not None:
        where.append("ts < ?")
        args.append(until)
    if since is None and until is None:
        order = "id"
    else:
        order = "ts, id"
    sql = f"SELECT {'id, ' if with_id else ''}ts, kind, nat, port, addr, aport FROM event"
    if where:
        sql += " WHERE " + " AND ".join(where)
    if since is not None or until is not None:
        # Otherwise the planner may prefer the (nat, port, ts) index for a
        # --nat filter and then sort the whole result before the first row.
        sql = sql.replace("FROM event", "FROM event INDEXED BY event_ts")
    sql += f" ORDER BY {order}"
    if limit is not None:
        sql += f" LIMIT {int(limit)}"
    return _stream(conn.execute(sql, args), None, _id_event_ok if with_id else schema.event_ok, conn)


def _id_event_ok(row) -> bool:
    """schema.event_ok for a row that starts with its id."""
    return schema.event_ok(row[1:])


def last_event_id(conn: sqlite3.Connection) -> int:
    """The highest event id (0 for an empty history): a cheap upper bound
    for progress."""
    return conn.execute("SELECT coalesce(max(id), 0) FROM event").fetchone()[0]


_KINDS = ("Initialized", "Created", "Deleted")


class LineFormatter:
    """:func:`nat64ho.eventlog.format_event` for history rows, several times
    faster: the date part and the NAT64 address are remembered, and IPv6 text
    comes from the C library wherever it agrees with RFC 5952 (the tests check
    that every line equals format_event's)."""

    def __init__(self) -> None:
        self._nats: dict[int, str] = {}

    ts = staticmethod(ts_str)  # it remembers the text of recent seconds

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

    def line(self, row: tuple) -> str:
        ts, kind, nat, port, addr, aport = row
        if kind == 0:
            return f"{self.ts(ts)} Initialized {self.nat(nat)}"
        return f"{self.ts(ts)} {_KINDS[kind]} {self.nat(nat)}:{port} [{self.ipv6(addr)}]:{aport}"


def write_log(rows: Iterable[tuple], out: TextIO) -> int:
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


def write_jsonl(rows: Iterable[tuple], out: TextIO) -> int:
    """One JSON object per line with fixed keys: seq, ts, event, nat, port, ipv6,
    ipv6_port (the last three null for Initialized). ``rows`` carry their id
    first (``history_rows(with_id=True)``): it is ``seq``, for ``--after``."""
    f = LineFormatter()
    n = 0
    for seq, ts, kind, nat, port, addr, aport in rows:
        # Every value is digits, dots, colons or a fixed word: no escaping needed.
        if kind == 0:
            out.write(f'{{"seq": {seq}, "ts": "{f.ts(ts)}", "event": "Initialized", '
                      f'"nat": "{f.nat(nat)}", "port": null, "ipv6": null, "ipv6_port": null}}\n')
        else:
            out.write(f'{{"seq": {seq}, "ts": "{f.ts(ts)}", "event": "{_KINDS[kind]}", '
                      f'"nat": "{f.nat(nat)}", "port": {port}, "ipv6": "{f.ipv6(addr)}", '
                      f'"ipv6_port": {aport}}}\n')
        n += 1
    return n


CSV_HEADER = "ts,event,nat,port,ipv6,ipv6_port"


def write_csv(rows: Iterable[tuple], out: TextIO) -> int:
    """CSV with a header row; the columns of :func:`write_jsonl`, empty for Initialized."""
    f = LineFormatter()
    out.write(CSV_HEADER + "\n")
    n = 0
    for ts, kind, nat, port, addr, aport in rows:
        if kind == 0:
            out.write(f"{f.ts(ts)},Initialized,{f.nat(nat)},,,\n")
        else:
            out.write(f"{f.ts(ts)},{_KINDS[kind]},{f.nat(nat)},{port},{f.ipv6(addr)},{aport}\n")
        n += 1
    return n


# ---------------------------------------------------------------- import

#: Where SQLite's unix VFS keeps the "dead man switch" lock in a WAL
#: database's -shm file: every open connection holds a read lock on it.
_SHM_DMS = 128


def database_in_use(path) -> bool:
    """Whether another process has the database open (a running server, or
    any other connection), from the locks SQLite holds on its -shm file.
    Call it before opening the database in this process: POSIX locks do not
    see the caller's own, and closing a descriptor drops them."""
    try:
        fd = os.open(f"{path}-shm", os.O_RDONLY)
    except OSError:
        return False  # no -shm file: nobody has the database open
    try:
        query = struct.pack("hhqqixxxx", fcntl.F_WRLCK, os.SEEK_SET, _SHM_DMS, 1, 0)
        answer = fcntl.fcntl(fd, fcntl.F_GETLK, query)
        return struct.unpack("hhqqixxxx", answer)[0] != fcntl.F_UNLCK
    finally:
        os.close(fd)


def open_log(name: str) -> BinaryIO:
    """A log to import as octets: ``-`` is stdin, ``*.gz`` is decompressed.
    Lines are read from it with :func:`read_lines`. Raises :class:`LogUnreadable`."""
    try:
        if name == "-":
            return sys.stdin.buffer
        if name.endswith(".gz"):
            return gzip.open(name, "rb")
        return open(name, "rb")
    except OSError as exc:
        raise LogUnreadable(f"{name}: {exc.strerror or exc}") from None


def log_position(stream: BinaryIO) -> Optional[int]:
    """Octets of the file on disk consumed so far (the compressed ones for
    gzip), for progress against its size; None for a pipe."""
    try:
        raw = stream.fileobj if isinstance(stream, gzip.GzipFile) else stream
        return raw.tell()
    except (OSError, AttributeError, ValueError):
        return None


#: Longest line import reads (a log line is under 130 octets); a longer one
#: is skipped without ever being held in memory whole.
MAX_LINE = 4096


class _TooLong(str):
    """Stands in for a line longer than :data:`MAX_LINE`."""


def read_lines(stream: BinaryIO) -> Iterator[str]:
    """The lines of a log, split at LF only (as editors number them: a bare
    CR is part of its line), as ASCII text (anything else becomes U+FFFD and
    fails to parse). A line over MAX_LINE octets comes out as a _TooLong."""
    while True:
        line = stream.readline(MAX_LINE + 1)
        if not line:
            return
        if len(line) > MAX_LINE and not line.endswith(b"\n"):
            # Drop the rest of it in bounded reads.
            while True:
                rest = stream.readline(MAX_LINE)
                if not rest or rest.endswith(b"\n"):
                    break
            yield _TooLong()
            continue
        yield line.decode("ascii", "replace")


class _FastParser:
    """:func:`nat64ho.eventlog.parse_line` for the common line, several times
    faster; any line it is unsure of goes to parse_line, which decides (and
    names the fault). The tests check that both agree."""

    def __init__(self) -> None:
        self._days: dict[str, int] = {}
        self._nats: dict[str, int] = {}

    def __call__(self, line: str) -> tuple:
        try:
            return self._fast(line)
        except (ValueError, KeyError, IndexError, OSError):
            e = parse_line(line)
            return (e.ts, int(e.kind), e.nat, e.port, e.addr, e.aport)

    def _fast(self, line: str) -> tuple:
        if line.endswith("\n"):
            line = line[:-2] if line.endswith("\r\n") else line[:-1]
        if (len(line) < 40 or line[10] != " " or line[13] != ":" or line[16] != ":"
                or line[19] != "." or line[26] != " " or not line.isascii()):
            raise ValueError
        day = self._days.get(line[:10])
        if day is None:
            day = self._day(line[:10])
        hms, frac = line[11:19], line[20:26]
        h, m, s = int(hms[0:2]), int(hms[3:5]), int(hms[6:8])
        if not (hms[0:2] + hms[3:5] + hms[6:8] + frac).isdigit() or h > 23 or m > 59 or s > 59:
            raise ValueError
        ts = day + ((h * 60 + m) * 60 + s) * 1_000_000 + int(frac)
        word, _, rest = line[27:].partition(" ")
        if word == "Created":
            kind = _CREATED
        elif word == "Deleted":
            kind = _DELETED
        else:
            raise ValueError  # Initialized is rare: parse_line takes it
        natport, sp, v6 = rest.partition(" [")
        nat_text, colon, port_text = natport.partition(":")
        addr_text, close, aport_text = v6.partition("]:")
        if not (sp and colon and close) or not port_text.isdigit() or not aport_text.isdigit() \
                or len(port_text) > 5 or len(aport_text) > 5:
            raise ValueError
        port, aport = int(port_text), int(aport_text)
        nat = self._nats.get(nat_text)
        if nat is None:
            nat = self._nat(nat_text)
        if port > 65535 or aport > 65535 or not set(addr_text) <= _HEX_COLON:
            raise ValueError
        return ts, kind, nat, port, socket.inet_pton(socket.AF_INET6, addr_text), aport

    def _day(self, text: str) -> int:
        e = parse_line(f"{text} 00:00:00.000000 Initialized 0.0.0.0")
        if len(self._days) >= 4096:
            # Bounded: a log of garbage dates must not grow it without end.
            self._days.clear()
        self._days[text] = e.ts
        return e.ts

    def _nat(self, text: str) -> int:
        # parse_line allows a line end after an Initialized address; here
        # the address is followed by its port, so nothing may trail it.
        if not set(text) <= _DIGIT_DOT:
            raise ValueError
        if len(self._nats) > 65536:
            self._nats.clear()
        e = parse_line(f"1970-01-01 00:00:00.000000 Initialized {text}")
        self._nats[text] = e.nat
        return e.nat


# Characters the reference parser's IPv6 pattern allows; inet_pton rejects
# anything else anyway, but "%zone" and spaces must never reach it.
_HEX_COLON = frozenset("0123456789abcdefABCDEF:.")
_DIGIT_DOT = frozenset("0123456789.")


def import_logs(conn: sqlite3.Connection, logs: Iterable[tuple[str, BinaryIO]],
                on_bad: Callable[[str, int, str], None], *,
                rebuild_table: bool = False,
                on_progress: Optional[Callable[[int, int], None]] = None,
                on_rebuild: Optional[Callable[[], None]] = None) -> ImportResult:
    """Add the events of each ``(name, stream from open_log)`` to the history.

    Events already there are left alone (the unique event index), so an
    import can be repeated or resumed. A line that does not parse is passed
    to ``on_bad(name, line number, reason)`` and skipped. ``rebuild_table``
    then sets every port the logs mention to its last event, adding the
    entry where that event is a Created, never replacing an entry already in
    the table. It is meant for a stopped server: a running one keeps its
    free ports in memory and would not see entries added behind its back.
    ``on_progress(lines, added)`` is called every few thousand lines with the
    lines read and the events committed so far; ``on_rebuild()`` before the
    table is rebuilt (one statement, no progress of its own). Raises :class:`LogUnreadable` for read errors (the
    batches committed before it stay: importing again completes the work).
    """
    parse = _FastParser()
    lines = skipped = added = 0
    batch: list[tuple] = []
    if rebuild_table:
        conn.execute("CREATE TEMP TABLE IF NOT EXISTS replay "
                     "(nat INTEGER, port INTEGER, PRIMARY KEY (nat, port)) WITHOUT ROWID")
        conn.execute("DELETE FROM temp.replay")

    def commit() -> int:
        before = conn.total_changes
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany("INSERT OR IGNORE INTO event (ts, kind, nat, port, addr, aport) "
                             "VALUES (?, ?, ?, ?, ?, ?)", batch)
            new = conn.total_changes - before
            if rebuild_table:
                conn.executemany("INSERT OR IGNORE INTO temp.replay VALUES (?, ?)",
                                 [(r[2], r[3]) for r in batch if r[1] != 0])
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        batch.clear()
        return new

    for name, stream in logs:
        number = 0
        try:
            for number, line in enumerate(read_lines(stream), 1):
                if type(line) is _TooLong:
                    skipped += 1
                    on_bad(name, number, f"line longer than {MAX_LINE} octets")
                    continue
                try:
                    batch.append(parse(line))
                except BadLine as exc:
                    skipped += 1
                    on_bad(name, number, str(exc))
                if len(batch) >= IMPORT_BATCH:
                    added += commit()
                if on_progress is not None and not number % PROGRESS_LINES:
                    on_progress(lines + number, added)
        except (OSError, EOFError, gzip.BadGzipFile) as exc:
            if batch:
                added += commit()
            raise LogUnreadable(f"{name}: line {number + 1}: {exc}") from None
        lines += number
    if batch:
        added += commit()
    if on_progress is not None:
        on_progress(lines, added)
    if rebuild_table and on_rebuild is not None:
        on_rebuild()
    entries = _rebuild(conn) if rebuild_table else 0
    return ImportResult(lines, added, skipped, entries)


def _rebuild(conn: sqlite3.Connection) -> int:
    conn.execute("BEGIN IMMEDIATE")
    try:
        # The last event of each port named by the logs, over the whole
        # history (a Deleted already stored counts too); OR IGNORE keeps
        # the entries the table has, by port and by endpoint.
        added = conn.execute("""
            INSERT OR IGNORE INTO entry (nat, port, addr, aport, created, last_use)
            SELECT e.nat, e.port, e.addr, e.aport, e.ts, e.ts
            FROM temp.replay AS r JOIN event AS e ON e.id = (
                SELECT id FROM event WHERE nat = r.nat AND port = r.port AND kind > 0
                ORDER BY ts DESC, kind ASC LIMIT 1)
            WHERE e.kind = 1""").rowcount
        conn.execute("DELETE FROM temp.replay")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return added


# ---------------------------------------------------------------- stats and prune

def stats(conn: sqlite3.Connection, now: int, capacity: int) -> list[NatStats]:
    """Per NAT64, by address. ``capacity``: ports per table (the server's
    ``--ports``), which the database does not record."""
    hour, day = now - 3_600_000_000, now - 86_400_000_000
    counts: dict[tuple[int, int], list[int]] = {}
    # One pass over the last day along the ts index, rather than a walk of
    # each NAT64's whole history.
    for nat, kind, n_day, n_hour in conn.execute(
            "SELECT nat, kind, count(*), sum(ts >= ?) FROM event WHERE ts >= ? AND ts <= ? "
            "AND kind > 0 GROUP BY nat, kind", (hour, day, now)):
        counts[(nat, kind)] = [n_day, n_hour]
    hellos = {r[0]: (r[1], r[2]) for r in conn.execute("SELECT nat, first_hello, last_hello FROM nat")}
    out = []
    for nat in nat_addresses(conn):
        entries = conn.execute("SELECT count(*) FROM entry WHERE nat = ?", (nat,)).fetchone()[0]
        oldest = conn.execute("SELECT min(last_use) FROM entry WHERE nat = ?", (nat,)).fetchone()[0]
        first, last = hellos.get(nat, (None, None))
        for column, v in (("entry.last_use", oldest), ("nat.first_hello", first),
                          ("nat.last_hello", last)):
            if v is not None and type(v) is not int:
                raise schema.BadRow(f"{_db_path(conn)}: {column} of NAT64 {ipv4_str(nat)} holds "
                                    f"{type(v).__name__} {v!r:.40}, not a time; run 'nat64ho check'")
        c = counts.get((nat, _CREATED), [0, 0])
        d = counts.get((nat, _DELETED), [0, 0])
        out.append(NatStats(nat, entries, capacity, oldest, first, last, c[1], d[1], c[0], d[0]))
    return out


class NotKnown(LookupError):
    """The NAT64 has no row and no entries in the database."""


def forget(conn: sqlite3.Connection, nat: int) -> tuple[int, bool]:
    """Remove a NAT64 and its table (its history stays); returns the entries
    removed and whether it had a row. Raises :class:`NotKnown`."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        entries = conn.execute("DELETE FROM entry WHERE nat = ?", (nat,)).rowcount
        known = conn.execute("DELETE FROM nat WHERE nat = ?", (nat,)).rowcount > 0
        if not entries and not known:
            raise NotKnown(nat)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return entries, known


def prune_count(conn: sqlite3.Connection, before_us: int) -> int:
    """How many events :func:`prune` would delete (a walk of the ts index)."""
    return conn.execute("SELECT count(*) FROM event WHERE ts < ?", (before_us,)).fetchone()[0]


def prune(conn: sqlite3.Connection, before_us: int,
          on_batch: Optional[Callable[[int], None]] = None) -> int:
    """Delete history events older than ``before_us``; returns how many.

    Current entries are never touched. Works in transactions of
    :data:`PRUNE_BATCH` events, each committed, so a writer sharing the
    database waits for one batch at most; call it outside a transaction.
    """
    total = 0
    while True:
        conn.execute("BEGIN IMMEDIATE")
        try:
            n = conn.execute("DELETE FROM event WHERE id IN (SELECT id FROM event WHERE ts < ? "
                             "ORDER BY ts LIMIT ?)", (before_us, PRUNE_BATCH)).rowcount
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        total += n
        if on_batch is not None:
            on_batch(total)
        if n < PRUNE_BATCH:
            return total
