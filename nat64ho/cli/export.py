"""``export``: the history to stdout or a file, and ``--follow``."""

from __future__ import annotations

import collections
import gzip
import io
import signal
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from types import FrameType
from typing import Annotated, Any

import typer

from nat64ho.cli.database import Database
from nat64ho.cli.options import (
    EXIT_DB,
    DbOption,
    ExportFormat,
    UsageError,
    choice,
    fail,
    parse_ipv4,
    parse_seq,
    parse_time,
    parser,
)
from nat64ho.cli.render import LineCounter, Progress, interrupted
from nat64ho.eventlog import ts_str
from nat64ho.ops import db as opsdb
from nat64ho.ops import export as ops_export


def export(
    db: DbOption = None,
    nat: Annotated[
        int | None,
        typer.Option(
            metavar="IPV4",
            help="Only this NAT64's events.",
            parser=parser(parse_ipv4, "--nat"),
            show_default=False,
        ),
    ] = None,
    since: Annotated[
        int | None,
        typer.Option(
            metavar="TIME",
            help="Only events at or after this time (UTC unless a zone is given; or -1h, yesterday).",
            parser=parser(parse_time, "--since"),
            show_default=False,
        ),
    ] = None,
    until: Annotated[
        int | None,
        typer.Option(
            metavar="TIME",
            help="Only events before this time.",
            parser=parser(parse_time, "--until"),
            show_default=False,
        ),
    ] = None,
    after: Annotated[
        int | None,
        typer.Option(
            metavar="SEQ",
            parser=parser(parse_seq, "--after"),
            help="Only events after this sequence number (the 'seq' of --format "
            "jsonl or csv): resumes an export or a --follow exactly where it stopped.",
            show_default=False,
        ),
    ] = None,
    follow: Annotated[
        bool,
        typer.Option(
            "--follow",
            "-f",
            help="After the history, keep printing each new event once the "
            "server has committed it, until SIGINT or SIGTERM.",
        ),
    ] = False,
    fmt: Annotated[
        ExportFormat,
        typer.Option(
            "--format",
            metavar="log|jsonl|csv",
            parser=choice(ExportFormat, "--format"),
            help="log: docs/protocol.md §6 lines, byte-identical to the server's log; jsonl: one "
            "JSON object per line, with its sequence number; csv: the same columns, with a header "
            "row. Times in jsonl and csv are RFC 3339 in UTC.",
        ),
    ] = ExportFormat.LOG,
    output: Annotated[
        str | None,
        typer.Option(
            "--output",
            "-o",
            metavar="FILE",
            help="Write here instead of stdout; a name ending in .gz is gzip-compressed.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Stream the history, in the order the server logged it (time order with --since/--until).

    Constant memory however long the history; reads the database without
    changing it, safe while the server runs.
    """
    try:
        if (after is not None or follow) and (since is not None or until is not None):
            raise UsageError(
                "--after and --follow go in sequence order: use them without --since/--until"
            )
        if follow and output not in (None, "-"):
            raise UsageError("--follow writes to stdout: redirect it instead of --output")
    except UsageError as exc:
        fail(str(exc))
    writer: ops_export.Writer = {
        "log": ops_export.write_log,
        "jsonl": ops_export.write_jsonl,
        "csv": ops_export.write_csv,
    }[fmt]
    if follow:
        _follow(db, writer, fmt, nat, after)
        return
    # The last rows handed to the writer, for an interrupted export to name
    # the last one that reached the file (a writer holds at most FETCH).
    recent: collections.deque[tuple[Any, ...]] = collections.deque(maxlen=2 * opsdb.FETCH + 2)
    handed = [0]
    # Ctrl-C while writing to a file only asks to stop: the stop is taken
    # between two rows, never inside a write, so the count of lines written
    # is exact (an interrupt landing right after a write returned, before it
    # was counted, named a sequence number thousands of lines early).
    stop_asked = [False]

    def ask_stop(signum: int, frame: FrameType | None) -> None:
        if stop_asked[0]:
            raise KeyboardInterrupt  # a second Ctrl-C: a write that blocks stops too
        stop_asked[0] = True

    def counted(rows: Iterable[tuple[Any, ...]]) -> Iterator[tuple[Any, ...]]:
        # Ids travel with the rows so that an interrupted export can say
        # exactly where to resume; the log writer drops them.
        n = 0
        for row in rows:
            if stop_asked[0]:
                raise KeyboardInterrupt
            n += 1
            handed[0] = n
            recent.append(row[:2])
            if not n % opsdb.FETCH:
                bar.update(n, n)
            yield row if fmt != "log" else row[1:]

    # Blocks handed to the log writer (sealed history), by the count of rows
    # before each: an interrupted export finds its last written row there.
    marks: collections.deque[tuple[int, Any]] = collections.deque(maxlen=3)

    def counted_blocks(blocks: Iterable[Any]) -> Iterator[Any]:
        n = 0
        for block in blocks:
            if stop_asked[0]:
                raise KeyboardInterrupt
            marks.append((n, block))
            n += len(block) if isinstance(block, list) else block.num_rows
            handed[0] = n
            bar.update(n, n)
            yield block

    def handed_row(k: int) -> tuple[Any, ...]:
        """(id, ts) of the k-th row handed to the writer (1-based)."""
        if not marks:
            return tuple(recent[-(handed[0] - k + 1)])
        for first, block in reversed(marks):
            if k > first:
                i = k - first - 1
                if isinstance(block, list):
                    return tuple(block[i][:2])
                return (block["id"][i].as_py(), block["ts"][i].as_py())
        raise IndexError(k)

    def write(out: ops_export.TextSink) -> int:
        blocks = rows.blocks() if isinstance(rows, ops_export.HistoryRows) else None
        try:
            if fmt == "log" and blocks is not None:
                # Sealed history goes out a block at a time, formatted in Arrow.
                return ops_export.write_log_blocks(counted_blocks(blocks), out)
            return writer(counted(rows), out)
        finally:
            if isinstance(rows, ops_export.HistoryRows):
                rows.close()  # its read transaction ends while the database is open

    with Database(db) as conn:
        # In sequence order, only the settled ids (PostgreSQL): an --after of
        # the last one printed then resumes without missing a late commit.
        upto = ops_export.settled_id(conn) if since is None and until is None else None
        rows = ops_export.history_rows(
            conn, nat=nat, since=since, until=until, after=after, upto=upto, with_id=True
        )
        if output is None or output == "-":
            bar = Progress("export", "events", None, show=False)  # stdout is the data
            write(sys.stdout)
            sys.stdout.flush()
            return
        try:
            if output.endswith(".gz"):
                out = gzip.open(output, "wt", encoding="ascii", newline="", compresslevel=6)
            else:
                out = open(output, "w", encoding="ascii", newline="", buffering=1 << 20)
        except OSError as exc:
            fail(f"--output {output!r}: {exc.strerror or exc}", EXIT_DB)
        # Rows to write: exact for a NAT64 or a window (a walk of an index),
        # else the id range, which is what an unpruned history holds.
        if nat is None and since is None and until is None:
            lo = after or 0
            total = max(ops_export.last_event_id(conn) - lo, 0)
        else:
            total = None
        bar = Progress("export", "events", total)
        lines = LineCounter(out)
        previous = signal.signal(signal.SIGINT, ask_stop)
        try:
            with out:
                n = write(lines)
        except KeyboardInterrupt:
            bar.close()
            written = lines.lines - (fmt == "csv")
            if written <= 0:
                interrupted(f"nothing written to {output}")
            # Rows handed over but still in the writer's buffer were not written.
            seq, ts = handed_row(written)
            if since is None and until is None:
                how = f"--after {seq}"
            else:
                how = f"--since '{ts_str(ts)}' (its events at that instant again)"
            interrupted(
                f"{written} events written to {output}, the last one "
                f"seq {seq} at {ts_str(ts)}; to write the rest to "
                f"another file, run the same command with {how}"
            )
        finally:
            signal.signal(signal.SIGINT, previous)
            bar.close()
        typer.echo(f"{n} events written to {output}", err=True)


@dataclass
class _Stop:
    signal: int | None = None  # the first signal received
    writing: bool = False  # a batch is being written


#: How often --follow asks the database for new events, in seconds: a read of
#: the id index, so the server's commits never wait on it.
FOLLOW_POLL_S = 0.25


def _follow(
    db: str | None, writer: ops_export.Writer, fmt: str, nat: int | None, after: int | None
) -> None:
    """``export --follow``: the history, then every event committed after it,
    each written once in id order and flushed, until a signal."""
    import signal

    stop = _Stop()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        # Between writing a batch and noting its last seq the signal waits,
        # so that the resume point printed is exactly what was delivered; a
        # second signal (a reader that stopped reading) ends it at once.
        again = stop.signal is not None
        stop.signal = signum
        if again or not stop.writing:
            raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    last = after or 0
    header = fmt == "csv"
    try:
        with Database(db) as conn:
            while True:
                # One short read transaction per batch: the WAL a reader pins
                # stays small and a checkpoint of the server is never held up.
                # Never past an id that a transaction in flight may still
                # commit below (PostgreSQL; see settled_id): nothing is skipped.
                upto = ops_export.settled_id(conn)
                rows = list(
                    ops_export.history_rows(
                        conn, nat=nat, after=last, upto=upto, with_id=True, limit=opsdb.FETCH
                    )
                )
                if rows:
                    stop.writing = True
                    if fmt == "jsonl":
                        writer(rows, sys.stdout)
                    else:
                        # csv carries the seq (the resume point), log lines do not.
                        text = io.StringIO()
                        writer(rows if fmt == "csv" else (r[1:] for r in rows), text)
                        out = text.getvalue()
                        if fmt == "csv" and not header:
                            out = out.split("\n", 1)[1]
                        header = False
                        sys.stdout.write(out)
                    sys.stdout.flush()
                    last = rows[-1][0]
                    stop.writing = False
                    if stop.signal is not None:
                        raise KeyboardInterrupt
                if len(rows) < opsdb.FETCH:
                    time.sleep(FOLLOW_POLL_S)
    except KeyboardInterrupt:
        typer.echo(f"stopped after seq {last}; resume with --after {last}", err=True)
        raise typer.Exit(0 if stop.signal == signal.SIGTERM else 130) from None
