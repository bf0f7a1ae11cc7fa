"""``query``, ``who`` and ``stats``: the read-only questions, rendered."""

from __future__ import annotations

import csv
import itertools
import re
import sys
import time
from collections.abc import Iterator
from typing import Annotated, Any

import typer

from nat64ho.archive import catalog
from nat64ho.cli.database import Database
from nat64ho.cli.options import (
    DbOption,
    FormatOption,
    IPv6Target,
    NoHeadersOption,
    PortRange,
    TableFormat,
    UsageError,
    fail,
    parse_ipv4,
    parse_ipv6_target,
    parse_nat_port,
    parse_port,
    parse_ports,
    parse_seconds,
    parse_time,
    parser,
)
from nat64ho.cli.render import TS_W, emit, endpoint, rfc3339, seconds, ts_or
from nat64ho.eventlog import format_event, ipv4_str, ipv6_str, ts_str
from nat64ho.ops import db as opsdb
from nat64ho.ops import export as ops_export
from nat64ho.ops import queries


def query(
    db: DbOption = None,
    nat: Annotated[
        int | None,
        typer.Option(
            metavar="IPV4",
            help="Only this NAT64's table. Default: every NAT64.",
            parser=parser(parse_ipv4, "--nat"),
            show_default=False,
        ),
    ] = None,
    ipv6: Annotated[
        IPv6Target | None,
        typer.Option(
            metavar="ADDR|PREFIX/LEN",
            help="Only entries of this client address or prefix.",
            parser=parser(parse_ipv6_target, "--ipv6"),
            show_default=False,
        ),
    ] = None,
    port: Annotated[
        int | None,
        typer.Option(
            metavar="N",
            help="Only this NAT port.",
            parser=parser(parse_port, "--port"),
            show_default=False,
        ),
    ] = None,
    fmt: FormatOption = TableFormat.TABLE,
    no_headers: NoHeadersOption = False,
) -> None:
    """The current entries: NAT port, client endpoint, created, last use; by NAT64 and port.

    Reads the database without changing it; safe while the server runs.
    """
    if ipv6 is not None and ipv6.port is not None:
        fail(
            f"--ipv6 [{ipv6.net.network_address}]:{ipv6.port}: give an address or prefix without a port"
        )
    text = ops_export.LineFormatter()  # cached dates and NAT64 addresses, C-library IPv6
    human = fmt == "table"  # the log's times; RFC 3339 for machines
    with Database(db) as conn:
        rows = (
            {
                "nat": text.nat(e.nat),
                "port": e.port,
                "ipv6": (v6 := text.ipv6(e.addr)),
                "ipv6_port": e.aport,
                "endpoint": f"[{v6}]:{e.aport}",
                "created": text.ts(e.created) if human else rfc3339(e.created),
                "last_use": text.ts(e.last_use) if human else rfc3339(e.last_use),
            }
            for e in queries.query_entries(
                conn, nat=nat, ipv6=ipv6.net if ipv6 else None, port=port
            )
        )
        if fmt == "table":
            cols = [
                ("nat", "NAT64", 15),
                ("port", "PORT", 5),
                ("created", "CREATED", TS_W),
                ("last_use", "LAST USE", TS_W),
                ("endpoint", "IPV6 ENDPOINT", 0),
            ]
        else:
            cols = [
                ("nat", "", 0),
                ("port", "", 0),
                ("ipv6", "", 0),
                ("ipv6_port", "", 0),
                ("created", "", 0),
                ("last_use", "", 0),
            ]
        emit(rows, fmt, cols)


def _holding_dict(h: queries.Holding) -> dict[str, Any]:
    return {
        "nat": ipv4_str(h.nat),
        "port": h.port,
        "ipv6": ipv6_str(h.addr),
        "ipv6_port": h.aport,
        "endpoint": endpoint(h.addr, h.aport),
        "from": rfc3339(h.start),
        "until": rfc3339(h.end),
        "current": h.current,
        "from_text": ts_or(h.start, "before history"),
        "until_text": "now (current)" if h.current else ts_or(h.end, "not recorded"),
        "events": [format_event(e) for e in (h.created, h.deleted) if e is not None],
    }


def who(
    target: Annotated[
        str | None,
        typer.Argument(
            metavar="NAT:PORT|CLIENT",
            help="A NAT port (192.0.2.9:47102): who held it. A client endpoint ([2001:db8::55]:34643), "
            "address (2001:db8::55) or prefix (2001:db8::/48): every NAT port it held. "
            "Not with --reports.",
            show_default=False,
        ),
    ] = None,
    at: Annotated[
        str | None,
        typer.Option(
            metavar="TIME",
            help="The time asked about: 'YYYY-MM-DD HH:MM[:SS[.ffffff]]' in UTC "
            "or RFC 3339 with any offset; it covers what its precision says (15:22:02 is "
            "that whole second). Default: now for a NAT port; every time for a client.",
            show_default=False,
        ),
    ] = None,
    tolerance: Annotated[
        str | None,
        typer.Option(
            metavar="SECONDS",
            help="For a NAT port: list every holder at some instant within "
            "this many seconds of --at, closest first, and say when that is more than one "
            "(the report's clock may be off).",
            show_default=False,
        ),
    ] = None,
    reports: Annotated[
        str | None,
        typer.Option(
            metavar="FILE",
            help="Answer a CSV of abuse reports, one per row: nat,port,time"
            "[,tolerance] (a header row is optional; '-' reads stdin); --tolerance is the "
            "default for rows without one. One output row per report and holder.",
            show_default=False,
        ),
    ] = None,
    db: DbOption = None,
    fmt: FormatOption = TableFormat.TABLE,
    no_headers: NoHeadersOption = False,
) -> None:
    """Attribute a NAT port at an instant to the client that held it, with the events that prove it;
    or list every NAT port a client endpoint, address or prefix held, with time ranges.

    The history may begin after a holding began: a Deleted with no Created before
    it still names the holder, and the current table names holders whose history
    was pruned. No holder is a normal answer (exit status 0). With --reports, a
    row that cannot be read is named in one Error line and skipped; the exit
    status is then 1.
    """
    try:
        when = parse_time(at, "--at") if at is not None else None
        tol = parse_seconds(tolerance, "--tolerance") if tolerance is not None else None
        if reports is not None:
            if target is not None or at is not None:
                raise UsageError(
                    "--reports answers the reports in the file: give no NAT:PORT and no --at"
                )
        elif target is None:
            raise UsageError("give a NAT:PORT or a client to ask about, or --reports FILE")
        elif target.startswith("[") or target.count(":") > 1:
            nat_port, (net, aport) = None, parse_ipv6_target(target, "target")
            if tol is not None:
                raise UsageError(
                    "--tolerance is for a NAT:PORT; a client's holdings are "
                    "listed with their whole time ranges"
                )
        else:
            nat_port = parse_nat_port(target, "target")
    except UsageError as exc:
        fail(str(exc))
    if reports is not None:
        _who_reports(db, reports, tol or 0, fmt)
        return
    span = time_span(at) if at is not None else 1
    with Database(db) as conn:
        if nat_port is not None:
            instant = when if when is not None else int(time.time() * 1_000_000)
            found = queries.who_port_window(conn, *nat_port, instant, tol or 0, span)
            _who_window(found, nat_port, instant, span, tol, fmt)
        else:
            holdings: Iterator[dict[str, Any]] = map(
                _holding_dict, queries.who_endpoint(conn, net, aport, when, span)
            )
            if fmt == "table":
                first = next(holdings, None)
                if first is None:
                    what = (
                        f"[{net.network_address}]:{aport}"
                        if aport is not None
                        else (str(net.network_address) if net.prefixlen == 128 else str(net))
                    )
                    typer.echo(
                        f"No entry: {what} held no NAT port"
                        + (f" at {_when(when, span)}" if when is not None else "")
                        + " as far as this database knows."
                    )
                    return
                holdings = itertools.chain([first], holdings)
                cols = [
                    ("nat", "NAT64", 15),
                    ("port", "PORT", 5),
                    ("from_text", "FROM", TS_W),
                    ("until_text", "UNTIL", TS_W),
                    ("endpoint", "IPV6 ENDPOINT", 0),
                ]
            else:
                cols = [
                    (k, "", 0)
                    for k in ("nat", "port", "ipv6", "ipv6_port", "from", "until", "current")
                ]
            emit(holdings, fmt, cols)


_TIME_FIELDS = re.compile(
    r"\s*\d{4}-\d\d-\d\d(?:[T ](\d\d)(?::(\d\d)(?::(\d\d)(?:[.,](\d+))?)?)?)?"
    r"\s*(?:[Zz]|[+-]\d\d(?::?\d\d)?)?\s*"
)


def time_span(text: str) -> int:
    """The µs a reported time covers, by its precision: ``15:22:02`` is that
    whole second, ``15:22`` that minute, ``.06`` ten milliseconds; a time
    it cannot tell (relative ones) is one instant."""
    m = _TIME_FIELDS.fullmatch(text)
    if m is None:
        return 1
    hour, minute, second, fraction = m.groups()
    if hour is None:
        return 86_400_000_000
    if minute is None:
        return 3_600_000_000
    if second is None:
        return 60_000_000
    if fraction is None:
        return 1_000_000
    return 10 ** max(6 - len(fraction), 0)


def _utc(ts: int | None) -> str | None:
    """Times of abuse answers in a table: in UTC and saying so."""
    return None if ts is None else ts_str(ts) + "Z"


def _when(at: int, span: int) -> str:
    """The reported time as asked: an instant, or the stretch its precision covers."""
    if span == 1:
        return ts_str(at)
    last = ts_str(at + span - 1)
    first = ts_str(at)
    return f"{first} to {last[11:] if last[:10] == first[:10] else last}"


def _window_rows(
    report: int | None,
    nat_port: tuple[int, int],
    at: int,
    span: int,
    tol: int,
    found: list[queries.Holding],
) -> Iterator[dict[str, Any]]:
    """One row per holder (one with no holder when none): the one shape of
    every answer about a NAT port, with or without a tolerance."""
    base = {
        "report": report,
        "nat": ipv4_str(nat_port[0]),
        "port": nat_port[1],
        "at": rfc3339(at),
        "window_from": rfc3339(at - tol),
        "window_until": rfc3339(at + span - 1 + tol),
        "tolerance_s": seconds(tol),
        "holders": len(found),
        "ambiguous": len(found) > 1,
    }
    if not found:
        yield {
            **base,
            "ipv6": None,
            "ipv6_port": None,
            "from": None,
            "until": None,
            "current": None,
            "distance_s": None,
            "events": [],
            "endpoint": None,
            "from_text": None,
            "until_text": None,
            "away": None,
        }
    for h in found:
        away = queries.distance(h, at, span)
        yield {
            **base,
            "ipv6": ipv6_str(h.addr),
            "ipv6_port": h.aport,
            "from": rfc3339(h.start),
            "until": rfc3339(h.end),
            "current": h.current,
            "distance_s": seconds(away),
            "events": [format_event(e) for e in (h.created, h.deleted) if e is not None],
            "endpoint": endpoint(h.addr, h.aport),
            "from_text": _utc(h.start) or "before history",
            "until_text": "now (current)" if h.current else _utc(h.end) or "not recorded",
            "away": f"{away / 1e6:g}",
        }


_WINDOW_KEYS = (
    "report",
    "nat",
    "port",
    "at",
    "window_from",
    "window_until",
    "tolerance_s",
    "holders",
    "ambiguous",
    "ipv6",
    "ipv6_port",
    "from",
    "until",
    "current",
    "distance_s",
)


def _window_columns(fmt: str, report: bool) -> list[tuple[str, str, int]]:
    """JSON carries each holding's log lines too; CSV keeps flat cells."""
    keys = [k for k in _WINDOW_KEYS if report or k != "report"]
    return [(k, "", 0) for k in keys + (["events"] if fmt == "json" else [])]


def _who_window(
    found: list[queries.Holding],
    nat_port: tuple[int, int],
    at: int,
    span: int,
    tol: int | None,
    fmt: str,
) -> None:
    rows = list(_window_rows(None, nat_port, at, span, tol or 0, found))
    if fmt != "table":
        emit(rows, fmt, _window_columns(fmt, False))
        return
    if tol is None and len(found) <= 1:
        _who_port(found[0] if found else None, nat_port, at, span)
        return
    subject = f"{ipv4_str(nat_port[0])}:{nat_port[1]} at {_when(at, span)}Z"
    if tol is not None:
        subject += f" ± {tol / 1e6:g} s"
    if not found:
        typer.echo(f"No entry: {subject}: not held as far as this database knows.")
        return
    verdict = "1 holder" if len(found) == 1 else f"{len(found)} holders: AMBIGUOUS"
    typer.echo(f"{subject}: {verdict} (closest to the reported time first)")
    emit(
        rows,
        "table",
        [
            ("endpoint", "IPV6 ENDPOINT", 46),
            ("from_text", "FROM", TS_W + 1),
            ("until_text", "UNTIL", TS_W + 1),
            ("away", "AWAY (S)", 0),
        ],
    )


def _who_reports(db: str | None, name: str, default_tol: int, fmt: str) -> None:
    try:
        source = (
            sys.stdin if name == "-" else open(name, newline="", encoding="utf-8", errors="replace")
        )
    except OSError as exc:
        fail(f"--reports {name!r}: {exc.strerror or exc}")
    label = "stdin" if name == "-" else name
    bad = {"n": 0}

    def answers(conn: opsdb.Conn) -> Iterator[dict[str, Any]]:
        reader = csv.reader(source)
        while True:
            try:
                row = next(reader, None)
            except csv.Error as exc:  # e.g. a field over the csv module's size limit
                bad["n"] += 1
                typer.echo(
                    f"Error: {label}:{reader.line_num}: {exc}; the rest of the file is not read",
                    err=True,
                )
                return
            if row is None:
                return
            number = reader.line_num
            cells = [c.strip() for c in row]
            if not cells or not any(cells) or cells[0].startswith("#"):
                continue
            if number == 1 and cells[0].lower() == "nat":
                continue  # the optional header
            try:
                if len(cells) not in (3, 4):
                    raise UsageError(f"expected nat,port,time[,tolerance], got {len(cells)} fields")
                nat = parse_ipv4(cells[0], "nat")
                port = parse_port(cells[1], "port")
                at = parse_time(cells[2], "time")
                span = time_span(cells[2])
                tol = (
                    parse_seconds(cells[3], "tolerance")
                    if len(cells) == 4 and cells[3]
                    else default_tol
                )
            except UsageError as exc:
                bad["n"] += 1
                typer.echo(f"Error: {label}:{number}: {exc}", err=True)
                continue
            found = queries.who_port_window(conn, nat, port, at, tol, span)
            yield from _window_rows(number, (nat, port), at, span, tol, found)

    with Database(db) as conn:
        if fmt == "table":
            cols = [
                ("report", "ROW", 4),
                ("natport", "NAT:PORT", 21),
                ("at", "AT (UTC)", TS_W + 1),
                ("tol", "±S", 5),
                ("answer", "ANSWER", 11),
                ("endpoint", "IPV6 ENDPOINT", 46),
                ("from_text", "FROM", TS_W + 1),
                ("until_text", "UNTIL", 0),
            ]
            rows = (
                {
                    **r,
                    "natport": f"{r['nat']}:{r['port']}",
                    "tol": f"{r['tolerance_s']:g}",
                    "answer": (
                        "none"
                        if not r["holders"]
                        else "AMBIGUOUS"
                        if r["ambiguous"]
                        else "1 holder"
                    ),
                }
                for r in answers(conn)
            )
            emit(rows, "table", cols)
        else:
            emit(answers(conn), fmt, _window_columns(fmt, True))
    if name != "-":
        source.close()
    if bad["n"]:
        raise typer.Exit(1)


def _who_port(h: queries.Holding | None, nat_port: tuple[int, int], at: int, span: int) -> None:
    subject = f"{ipv4_str(nat_port[0])}:{nat_port[1]}"
    if h is None:
        typer.echo(
            f"No entry: {subject} was not held at {_when(at, span)} as far as this database knows."
        )
        return
    d = _holding_dict(h)
    typer.echo(f"{subject} at {_when(at, span)}: {d['endpoint']}")
    typer.echo(f"  from   {d['from_text']}")
    typer.echo(f"  until  {d['until_text']}")
    if d["events"]:
        typer.echo("  events:")
        for line in d["events"]:
            typer.echo(f"    {line}")
    else:
        typer.echo("  events: none recorded (known from the current table)")


def stats(
    db: DbOption = None,
    ports: Annotated[
        PortRange | None,
        typer.Option(
            metavar="FIRST-LAST",
            parser=parser(parse_ports, "--ports"),
            help="Port range for the capacity column. Default: the --ports "
            "the server last started with (1028-65535 if it never recorded one).",
            show_default=False,
        ),
    ] = None,
    fmt: FormatOption = TableFormat.TABLE,
    no_headers: NoHeadersOption = False,
) -> None:
    """Per NAT64: entries / capacity, oldest last use, first and last HELLO, Created and
    Deleted over the last hour and day.

    Reads the database without changing it; safe while the server runs.
    """
    if ports is not None:
        first, last = ports
    now = int(time.time() * 1_000_000)
    with Database(db) as conn:
        if ports is None:
            row = conn.execute("SELECT value FROM meta WHERE key = 'ports'").fetchone()
            value = row[0] if row else "1028-65535"
            # PostgreSQL keeps meta values as octets (UTF-8 text).
            first, last = parse_ports(value.decode() if isinstance(value, bytes) else value)
        found = queries.stats(conn, now, last - first + 1)
        sealed = catalog.summary(conn) if fmt == "table" else None
        archived = catalog.totals(conn)
    rows = [
        {
            "nat": ipv4_str(s.nat),
            "entries": s.entries,
            "capacity": s.capacity,
            "fill": f"{s.entries}/{s.capacity}",
            "oldest_last_use": ts_or(s.oldest_last_use, None)
            if fmt == "table"
            else rfc3339(s.oldest_last_use),
            "first_hello": ts_or(s.first_hello, None) if fmt == "table" else rfc3339(s.first_hello),
            "last_hello": ts_or(s.last_hello, None) if fmt == "table" else rfc3339(s.last_hello),
            "created_hour": s.created_hour,
            "deleted_hour": s.deleted_hour,
            "created_day": s.created_day,
            "deleted_day": s.deleted_day,
            "hour": f"+{s.created_hour} -{s.deleted_hour}",
            "day": f"+{s.created_day} -{s.deleted_day}",
            # The whole sealed tier's, the same on every row: the machine
            # formats stay one flat row per NAT64.
            "sealed_segments": archived.segments,
            "sealed_events": archived.events,
            "sealed_bytes": archived.size,
            "sealed_bytes_per_event": archived.bytes_per_event,
        }
        for s in found
    ]
    if fmt == "table":
        if not rows:
            typer.echo("No NAT64 has said HELLO to this database yet.")
            return
        cols = [
            ("nat", "NAT64", 15),
            ("fill", "ENTRIES", 13),
            ("oldest_last_use", "OLDEST LAST USE", TS_W),
            ("first_hello", "FIRST HELLO", TS_W),
            ("last_hello", "LAST HELLO", TS_W),
            ("hour", "HOUR +/-", 15),
            ("day", "DAY +/-", 0),
        ]
    else:
        cols = [
            (k, "", 0)
            for k in (
                "nat",
                "entries",
                "capacity",
                "oldest_last_use",
                "first_hello",
                "last_hello",
                "created_hour",
                "deleted_hour",
                "created_day",
                "deleted_day",
                "sealed_segments",
                "sealed_events",
                "sealed_bytes",
                "sealed_bytes_per_event",
            )
        ]
    emit(rows, fmt, cols)
    if fmt == "table" and sealed is not None:
        typer.echo(sealed)
