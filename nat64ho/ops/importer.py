"""``import``: log files into the history, and the replay of their last
events into the current table (``--rebuild-table``)."""

from __future__ import annotations

import contextlib
import gzip
import socket
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, BinaryIO, NamedTuple, cast

from nat64ho.archive.seal import owning, seal_after_import
from nat64ho.archive.tiers import SealedFilter, has_segments
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


#: Octets of a log the block reader takes at once (import into segments).
BLOCK = 1 << 22
#: The common line; one it does not match goes to the line parser, which
#: decides. Fixed widths as _FastParser checks them.
_LINE_RE = (
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6} (Created|Deleted) "
    r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}:\d{1,5} \[[0-9a-fA-F:.]+\]:\d{1,5}$"
)


class _BlockParser:
    """Lines to columns a block at a time (pyarrow), the same values as
    :class:`_FastParser` gives line by line; a line that is not of the
    common form, or has a value out of range, goes to that parser."""

    def __init__(self, parse: _FastParser):
        self.parse = parse

    def __call__(self, lines: Any, first: int) -> tuple[Any, list[int]]:
        """(table of ts, kind, nat, port, addr, aport, seq, for the lines
        taken; indexes into ``lines`` (a pyarrow binary array) of the
        others). ``first``: seq of ``lines[0]``."""
        import pyarrow as pa
        import pyarrow.compute as pc

        try:
            text = lines.cast(pa.string())
        except pa.ArrowInvalid:  # not UTF-8: those lines are the line parser's
            return None, list(range(len(lines)))
        ok = pc.and_(pc.string_is_ascii(text), pc.match_substring_regex(text, _LINE_RE))
        seq = pa.array(range(first, first + len(lines)), pa.int64())
        if not pc.all(ok).as_py():
            seq = seq.filter(ok)
            others = pc.indices_nonzero(pc.invert(ok)).to_pylist()
            text = text.filter(ok)
        else:
            others = []

        def cut(start: int, stop: int) -> Any:
            return pc.utf8_slice_codeunits(text, start, stop)

        def num(col: Any) -> Any:
            return pc.cast(col, pa.int64())

        def looked_up(col: Any, find: Callable[[str], Any], kind: Any) -> Any:
            uniq = pc.unique(col)
            values = []
            for u in uniq.to_pylist():
                try:
                    values.append(find(u))
                except (ValueError, KeyError, IndexError, OSError, BadLine):
                    values.append(None)
            return pc.take(pa.array(values, kind), pc.index_in(col, uniq))

        # "NAT:PORT [ADDR]:APORT" after the kind's word.
        nat_port, v6 = _halves(pc.utf8_slice_codeunits(text, 35, MAX_LINE + 1), " [")
        nat_text, port_text = _halves(nat_port, ":")
        addr_text, aport_text = _halves(v6, "]:")
        day = looked_up(cut(0, 10), self.parse._day, pa.int64())
        h, m, s, us = num(cut(11, 13)), num(cut(14, 16)), num(cut(17, 19)), num(cut(20, 26))
        port, aport = num(port_text), num(aport_text)
        nat = looked_up(nat_text, self.parse._nat, pa.int64())
        addr = looked_up(addr_text, self._addr, pa.binary(16))
        good = pc.and_(pc.is_valid(day), pc.and_(pc.is_valid(nat), pc.is_valid(addr)))
        for col, top in ((h, 23), (m, 59), (s, 59), (port, 65535), (aport, 65535)):
            good = pc.and_(good, pc.less_equal(col, top))
        secs = pc.add(pc.multiply(pc.add(pc.multiply(h, 60), m), 60), s)
        ts = pc.add(pc.add(day, pc.multiply(secs, 1_000_000)), us)
        kind = pc.if_else(pc.equal(cut(27, 28), "C"), _CREATED, _DELETED)
        table = pa.table(
            {"ts": ts, "kind": kind, "nat": nat, "port": port, "addr": addr, "aport": aport}
        )
        table = table.append_column("seq", seq)
        good = pc.fill_null(good, False)
        if not pc.all(good).as_py():
            # In form, out of range: the line parser names the fault.
            others += [v - first for v in seq.filter(pc.invert(good)).to_pylist()]
            table = table.filter(good)
        return table, sorted(others)

    def _addr(self, text: str) -> bytes:
        return socket.inet_pton(socket.AF_INET6, text)


def _split(data: bytes) -> Any:
    """The lines of ``data`` (LF between them), as a pyarrow binary array."""
    import pyarrow as pa
    import pyarrow.compute as pc

    return pc.split_pattern(pa.array([data], pa.binary()), b"\n").values


def _halves(col: Any, sep: str) -> tuple[Any, Any]:
    """Each string of ``col`` split at the first ``sep`` (matched lines have one)."""
    import pyarrow.compute as pc

    parts = pc.split_pattern(col, sep, max_splits=1)
    return pc.list_element(parts, 0), pc.list_element(parts, 1)


def _read_blocks(
    name: str,
    stream: BinaryIO,
    lines_before: int,
    blocks: _BlockParser,
    take: Callable[[Any, list[tuple[Any, ...]], int], None],
    on_bad: Callable[[str, int, str], None],
) -> tuple[int, int]:
    """The lines of one log, a block at a time, given to ``take(table,
    rows)``: the block parser's table and the line parser's rows (each with
    its seq last), and the lines read so far. Returns (lines, skipped). Lines as :func:`read_lines`
    splits them: at LF, one over MAX_LINE octets skipped unread."""
    number = skipped = 0
    rest = b""
    skipping = False  # in a line over MAX_LINE, until its end
    while True:
        try:
            data = stream.read(BLOCK)
        except (OSError, EOFError, gzip.BadGzipFile) as exc:
            raise LogUnreadable(f"{name}: line {number + 1}: {exc}") from None
        if not data:
            if not rest or skipping:
                return number, skipped
            lines, rest, ends = _split(rest), b"", False
        else:
            if skipping:
                end = data.find(b"\n")
                if end < 0:
                    continue
                data, skipping = data[end + 1 :], False
            data = rest + data
            cut = data.rfind(b"\n")
            if cut < 0:
                rest = data
                if len(rest) > MAX_LINE:
                    number += 1
                    skipped += 1
                    on_bad(name, number, f"line longer than {MAX_LINE} octets")
                    rest, skipping = b"", True
                continue
            lines, rest, ends = _split(data[:cut]), data[cut + 1 :], True
        table, others = blocks(lines, lines_before + number)
        rows = []
        for i in others:
            line = lines[i].as_py()
            if len(line) > MAX_LINE:
                skipped += 1
                on_bad(name, number + i + 1, f"line longer than {MAX_LINE} octets")
                continue
            text = line.decode("ascii", "replace") + ("\n" if ends else "")
            try:
                rows.append((*blocks.parse(text), lines_before + number + i))
            except BadLine as exc:
                skipped += 1
                on_bad(name, number + i + 1, str(exc))
        number += len(lines)
        take(table, rows, lines_before + number)


def import_logs(
    conn: Conn,
    logs: Iterable[tuple[str, BinaryIO]],
    on_bad: Callable[[str, int, str], None],
    *,
    rebuild_table: bool = False,
    on_progress: Callable[[int, int], None] | None = None,
    on_rebuild: Callable[[], None] | None = None,
    into_segments: bool = False,
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

    ``into_segments`` (or a history that has segments already), unless
    ``rebuild_table``: the events of closed periods go straight into new
    segments, sorted and in bulk, when no server owns the table (see
    :mod:`nat64ho.archive.ingest`); those of the open period and, while a
    server owns the table, all of them go into the hot tier.
    """
    parse = _FastParser()
    batch: list[tuple[Any, ...]] = []
    if rebuild_table:
        conn.execute(conn.sql.create_replay)
        conn.execute(f"DELETE FROM {conn.sql.temp}.replay")

    sealed = SealedFilter(conn)
    owned = contextlib.ExitStack()
    ingest = None
    if not rebuild_table and (into_segments or has_segments(conn)):
        if owned.enter_context(owning(conn, "import")):
            from nat64ho.archive.ingest import Ingest  # pyarrow: only where it is used

            ingest = Ingest(conn, time.time_ns() // 1000)

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

    with owned:
        try:
            if ingest is not None:
                lines, skipped = _read_into(ingest, logs, parse, on_bad, on_progress)
            else:
                lines, added, skipped = _read(logs, parse, batch, commit, on_bad, on_progress)
        except LogUnreadable:
            if ingest is not None:
                ingest.finish(_now_us)  # what was read stays, as committed batches do
            raise
        if ingest is not None:
            ingest.finish(_now_us)
            added = ingest.added
        if on_progress is not None:
            on_progress(lines, added)
        if rebuild_table and on_rebuild is not None:
            on_rebuild()
        entries = rebuild(conn) if rebuild_table else 0
        seal_after_import(conn, owned=ingest is not None)
    return ImportResult(lines, added, skipped, entries)


def _read_into(
    ingest: Any,
    logs: Iterable[tuple[str, BinaryIO]],
    parse: _FastParser,
    on_bad: Callable[[str, int, str], None],
    on_progress: Callable[[int, int], None] | None,
) -> tuple[int, int]:
    """Every line of ``logs`` into ``ingest``, a block at a time; returns
    (lines, lines skipped)."""
    blocks = _BlockParser(parse)
    lines = skipped = 0

    def take(table: Any, rows: list[tuple[Any, ...]], upto: int) -> None:
        ingest.take(table, rows, _now_us)
        if on_progress is not None:
            on_progress(upto, ingest.added)

    for name, stream in logs:
        n, bad = _read_blocks(name, stream, lines, blocks, take, on_bad)
        lines += n
        skipped += bad
    return lines, skipped


def _now_us() -> int:
    return time.time_ns() // 1000


def _read(
    logs: Iterable[tuple[str, BinaryIO]],
    parse: Callable[[str], tuple[Any, ...]],
    batch: list[tuple[Any, ...]],
    commit: Callable[[], int],
    on_bad: Callable[[str, int, str], None],
    on_progress: Callable[[int, int], None] | None,
) -> tuple[int, int, int]:
    """Parse every line of ``logs`` into ``batch``, committed every
    IMPORT_BATCH; returns (lines, events added, lines skipped)."""
    lines = skipped = added = 0
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
    return lines, added, skipped


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
