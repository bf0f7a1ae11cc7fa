"""``import``: log files into the history, and the replay of their last
events into the current table (``--rebuild-table``)."""

from __future__ import annotations

import gzip
import socket
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any, BinaryIO, NamedTuple, cast

from nat64ho.archive.seal import seal_after_import
from nat64ho.archive.tiers import SealedFilter
from nat64ho.eventlog import BadLine, EventKind, parse_line
from nat64ho.ops.db import EVENT_COLUMNS, Conn, HistoryError, atomic

_CREATED, _DELETED = int(EventKind.CREATED), int(EventKind.DELETED)

#: Lines per import transaction: big enough that the commit (one fsync) is
#: a small part of the cost, small enough that the server's own commits wait
#: well under a second for the write lock.
IMPORT_BATCH = 20_000
#: Lines between two progress reports of an import.
PROGRESS_LINES = 4096


class LogUnreadable(HistoryError):
    """A log file to import cannot be opened or read (missing, not gzip, I/O error)."""


class ImportResult(NamedTuple):
    lines: int  #: lines read
    added: int  #: events that were new to the history
    skipped: int  #: lines that did not parse
    entries: int  #: entries added to the current table by ``rebuild_table``


def open_log(name: str) -> BinaryIO:
    """A log to import as octets: ``-`` is stdin, ``*.gz`` is decompressed.
    Lines are read from it with :func:`read_lines`. Raises :class:`LogUnreadable`."""
    try:
        if name == "-":
            return sys.stdin.buffer
        if name.endswith(".gz"):
            # A GzipFile reads like any binary file; typeshed does not call it BinaryIO.
            return cast(BinaryIO, gzip.open(name, "rb"))
        return open(name, "rb")
    except OSError as exc:
        raise LogUnreadable(f"{name}: {exc.strerror or exc}") from None


def log_position(stream: BinaryIO) -> int | None:
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

    def __call__(self, line: str) -> tuple[Any, ...]:
        try:
            return self._fast(line)
        except (ValueError, KeyError, IndexError, OSError):
            e = parse_line(line)
            return (e.ts, int(e.kind), e.nat, e.port, e.addr, e.aport)

    def _fast(self, line: str) -> tuple[Any, ...]:
        if line.endswith("\n"):
            line = line[:-2] if line.endswith("\r\n") else line[:-1]
        if (
            len(line) < 40
            or line[10] != " "
            or line[13] != ":"
            or line[16] != ":"
            or line[19] != "."
            or line[26] != " "
            or not line.isascii()
        ):
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
        if (
            not (sp and colon and close)
            or not port_text.isdigit()
            or not aport_text.isdigit()
            or len(port_text) > 5
            or len(aport_text) > 5
        ):
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


def import_logs(
    conn: Conn,
    logs: Iterable[tuple[str, BinaryIO]],
    on_bad: Callable[[str, int, str], None],
    *,
    rebuild_table: bool = False,
    on_progress: Callable[[int, int], None] | None = None,
    on_rebuild: Callable[[], None] | None = None,
) -> ImportResult:
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
    batch: list[tuple[Any, ...]] = []
    if rebuild_table:
        conn.execute(conn.sql.create_replay)
        conn.execute(f"DELETE FROM {conn.sql.temp}.replay")

    sealed = SealedFilter(conn)

    def commit() -> int:
        with atomic(conn):
            new = conn.insert_many("event", EVENT_COLUMNS, sealed(batch), ignore=True)
            if rebuild_table:
                conn.insert_many(
                    f"{conn.sql.temp}.replay",
                    ("nat", "port"),
                    [(r[2], r[3]) for r in batch if r[1] != 0],
                    ignore=True,
                )
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
    entries = rebuild(conn) if rebuild_table else 0
    seal_after_import(conn)
    return ImportResult(lines, added, skipped, entries)


def rebuild(conn: Conn) -> int:
    """Give each port named by the imported logs (collected in temp.replay)
    the entry its last event implies; returns the entries added."""
    with atomic(conn):
        # The last event of each port named by the logs, over the whole
        # history (a Deleted already stored counts too); DO NOTHING keeps
        # the entries the table has, by port and by endpoint.
        added = conn.execute(f"""
            INSERT INTO entry (nat, port, addr, aport, created, last_use)
            SELECT e.nat, e.port, e.addr, e.aport, e.ts, e.ts
            FROM {conn.sql.temp}.replay AS r JOIN event AS e ON e.id = (
                SELECT id FROM event WHERE nat = r.nat AND port = r.port AND kind > 0
                ORDER BY ts DESC, kind ASC LIMIT 1)
            WHERE e.kind = 1 ON CONFLICT DO NOTHING""").rowcount
        conn.execute(f"DELETE FROM {conn.sql.temp}.replay")
    return added
