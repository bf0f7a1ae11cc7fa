"""Output apart from the commands: rows as an aligned table, JSON or CSV,
progress bars on a terminal, and the texts of times and endpoints."""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Iterable
from typing import Any, NoReturn, TextIO, overload

import typer

from nat64ho.eventlog import ipv6_str, ts_rfc3339, ts_str


class Progress:
    """A progress bar on stderr while it is a terminal, else nothing at all.

    ``total`` is in the bar's own unit (octets of input, rows); ``count`` is
    what the operator counts (lines, events), shown with its rate.
    """

    def __init__(self, what: str, noun: str, total: int | None, show: bool = True):
        self.noun = noun
        self.bar = None
        if not show or not sys.stderr.isatty():
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            Progress,
            ProgressColumn,
            Task,
            TaskProgressColumn,
            TextColumn,
            TimeRemainingColumn,
        )
        from rich.text import Text

        class Rate(ProgressColumn):
            def render(self, task: Task) -> Text:
                elapsed = task.elapsed or 0
                rate = task.fields["count"] / elapsed if elapsed > 0.2 else 0
                return Text(f"{task.fields['count']:,} {noun}  {rate:,.0f} {noun}/s")

        columns = [TextColumn("{task.description}"), BarColumn()]
        if total:
            columns += [TaskProgressColumn(), TimeRemainingColumn()]
        columns.append(Rate())
        self.bar = Progress(*columns, console=Console(file=sys.stderr), transient=False)
        self.task = self.bar.add_task(what, total=total or None, count=0)
        self.bar.start()

    def update(self, done: int | None, count: int) -> None:
        if self.bar is not None:
            if done is None:
                self.bar.update(self.task, count=count)
            else:
                self.bar.update(self.task, completed=done, count=count)

    def rebuilding(self) -> None:
        if self.bar is not None:
            self.bar.update(self.task, description="import, now rebuilding the table")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def interrupted(message: str) -> NoReturn:
    """Ctrl-C: say how far the work got and how to go on; exit 130 as a shell does."""
    typer.echo(f"\nInterrupted: {message}", err=True)
    raise typer.Exit(130)


@overload
def ts_or(value: int | None, missing: str) -> str: ...
@overload
def ts_or(value: int | None, missing: None) -> str | None: ...
def ts_or(value: int | None, missing: str | None) -> str | None:
    return ts_str(value) if value is not None else missing


def rfc3339(ts: int | None) -> str | None:
    """A time of the machine formats: RFC 3339 in UTC, ``2019-03-18T15:22:02.062254Z``."""
    return None if ts is None else ts_rfc3339(ts)


def seconds(us: int) -> int | float:
    """Microseconds as a JSON number of seconds (whole seconds stay integers)."""
    whole, frac = divmod(us, 1_000_000)
    return whole if not frac else us / 1e6


def endpoint(addr: bytes, aport: int) -> str:
    return f"[{ipv6_str(addr)}]:{aport}"


#: Whether tables and CSV start with their header line (--no-headers, set by
#: the option's callback so that every command that prints rows obeys it).
headers = True


def set_headers(no_headers: bool) -> bool:
    global headers
    headers = not no_headers
    return no_headers


def emit(rows: Iterable[dict[str, Any]], fmt: str, columns: list[tuple[str, str, int]]) -> None:
    """Print dicts as an aligned table (columns: key, header, width; the last
    one unpadded so that rows can stream), a JSON array, or CSV; the header
    line of a table or CSV unless --no-headers."""
    out = sys.stdout
    keys = [k for k, _, _ in columns]
    if fmt == "json":
        out.write("[")
        first = True
        for row in rows:
            out.write(("\n  " if first else ",\n  ") + json.dumps({k: row[k] for k in keys}))
            first = False
        out.write("\n]\n" if not first else "]\n")
    elif fmt == "csv":
        w = csv.writer(out, lineterminator="\n")
        if headers:
            w.writerow(keys)
        for row in rows:
            w.writerow(
                [
                    ""
                    if row[k] is None
                    else str(row[k]).lower()
                    if isinstance(row[k], bool)
                    else row[k]
                    for k in keys
                ]
            )
    else:
        # One format string for the whole row: a table of 64508 entries is
        # printed per row, so per-cell work shows (2.9 s -> 1.1 s for query).
        template = "  ".join(
            [f"{{{i}!s:<{w}}}" for i, (_, _, w) in enumerate(columns[:-1])]
            + [f"{{{len(columns) - 1}}}"]
        )
        if headers:
            out.write(template.format(*[h for _, h, _ in columns]).rstrip() + "\n")
        buf = []
        for row in rows:
            cells = [row[k] for k in keys]
            if None in cells:
                cells = ["-" if c is None else c for c in cells]
            buf.append(template.format(*cells).rstrip())
            if len(buf) >= 4096:
                out.write("\n".join(buf) + "\n")
                buf.clear()
        if buf:
            out.write("\n".join(buf) + "\n")


TS_W = 26  # 2019-03-18 15:22:02.062254


class LineCounter:
    """A text stream that counts the lines written through it."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.lines = 0

    def write(self, text: str) -> int:
        n: int = self.out.write(text)
        self.lines += text.count("\n")
        return n
