"""The ``nat64ho`` command line: parses options, calls the library, prints.

Every named library error is turned here, once, into one ``Error: …`` line
and exit status 2 (1 for a runtime failure); nothing else prints tracebacks
for operator mistakes.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import sys
from pathlib import Path
from typing import Annotated, NoReturn, Optional

import typer

from nat64ho import schema

app = typer.Typer(
    help="NAT64 handoff server: the authoritative, durable connection table for NAT64s "
         "(PROTOCOL.md v1).",
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    add_completion=False,
)

#: Exit status for bad input (as click does for usage errors).
EXIT_USAGE = 2


class UsageError(Exception):
    """Bad operator input; the message names the value."""


def fail(message: str, status: int = EXIT_USAGE) -> NoReturn:
    typer.echo(f"Error: {message}", err=True)
    raise typer.Exit(status)


# ---------------------------------------------------------------- parsers
# Shared by every command so that a value is spelled and checked one way.

def parse_listen(text: str, what: str = "--listen") -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep:
        raise UsageError(f"{what} {text!r}: expected ADDR:PORT, e.g. 127.0.0.1:6464")
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise UsageError(f"{what} {text!r}: {host!r} is not an IP address") from None
    return host, parse_port(port, what, allow_zero=True)


def parse_port(text: str, what: str, *, allow_zero: bool = False) -> int:
    if not text.isdigit() or not (0 if allow_zero else 1) <= int(text) <= 65535:
        raise UsageError(f"{what} {text!r}: not a port number (1-65535)")
    return int(text)


def parse_ports(text: str) -> tuple[int, int]:
    first, sep, last = text.partition("-")
    if not sep:
        raise UsageError(f"--ports {text!r}: expected FIRST-LAST, e.g. 1028-65535")
    a, b = parse_port(first, "--ports"), parse_port(last, "--ports")
    if a > b:
        raise UsageError(f"--ports {text!r}: first port is above last port")
    return a, b


def parse_ipv4(text: str, what: str) -> int:
    try:
        return int(ipaddress.IPv4Address(text))
    except ValueError:
        raise UsageError(f"{what} {text!r}: not an IPv4 address") from None


def parse_prefix4(text: str, what: str) -> ipaddress.IPv4Network:
    try:
        return ipaddress.IPv4Network(text, strict=False)
    except ValueError:
        raise UsageError(f"{what} {text!r}: not an IPv4 address or prefix") from None


def parse_time(text: str, what: str) -> int:
    """Microseconds since the epoch from ``YYYY-MM-DD[ HH:MM[:SS[.ffffff]]]`` or
    ISO 8601 (``T``, ``Z``, offsets). Without a zone: UTC, like the log."""
    t = text.strip()
    if t.endswith(("Z", "z")):
        t = t[:-1] + "+00:00"
    try:
        when = dt.datetime.fromisoformat(t)
    except ValueError:
        raise UsageError(f"{what} {text!r}: not a time (use 'YYYY-MM-DD HH:MM:SS' in UTC, "
                         "or ISO 8601)") from None
    from nat64ho.eventlog import ts_from_datetime
    return ts_from_datetime(when)


DbOption = Annotated[
    Optional[Path],
    typer.Option("--db", metavar="PATH", help="The SQLite database. Default: $NAT64HO_DB, else "
                              "~/.local/share/nat64ho/table.db ($XDG_DATA_HOME).",
                 show_default=False),
]


def db_path(db: Optional[Path]) -> Path:
    return db if db is not None else schema.default_db_path()


def _version(value: bool) -> None:
    if value:
        from nat64ho import __version__
        typer.echo(f"nat64ho {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """NAT64 handoff server: the authoritative, durable connection table for NAT64s."""


# ---------------------------------------------------------------- serve

@app.command()
def serve(
    db: DbOption = None,
    listen: Annotated[str, typer.Option(
        metavar="ADDR:PORT", envvar="NAT64HO_LISTEN", help="UDP address and port to listen on.")] = "0.0.0.0:6464",
    log_file: Annotated[Optional[str], typer.Option(
        "--log-file", metavar="PATH", help="Event log (Created/Deleted/Initialized lines); '-' for stdout. "
                           "Default: nat64ho.log beside the database.", show_default=False)] = None,
    ports: Annotated[str, typer.Option(
        metavar="FIRST-LAST", help="NAT port range of each NAT64's table (announced in WELCOME).")] = "1028-65535",
    allow: Annotated[Optional[list[str]], typer.Option(
        metavar="PREFIX", envvar="NAT64HO_ALLOW", help="IPv4 prefix allowed to say HELLO; repeat for more. Default: any.",
        show_default=False)] = None,
    min_idle: Annotated[float, typer.Option(
        metavar="SECONDS", help="Seconds an entry must have been idle before it may be deleted to make room; "
             "a MAP that would need a younger one gets ERROR TABLE_FULL.", min=0)] = 0.0,
    hello_rate: Annotated[float, typer.Option(
        metavar="N", help="HELLOs per second accepted from one source address, with a burst of as many "
             "(0 = unlimited). A NAT64 says HELLO once per boot.", min=0)] = 5.0,
    create_rate: Annotated[float, typer.Option(
        metavar="N", help="New entries per second per NAT64, with a burst of as many (0 = unlimited). "
             "The default refills a full 64508-port table in under two seconds.",
        min=0)] = 50_000.0,
    sync: Annotated[str, typer.Option(
        metavar="full|normal", help="SQLite synchronous mode: 'full' survives power loss, 'normal' only crashes.")] = "full",
    cache_size: Annotated[int, typer.Option(
        metavar="N", help="Table entries kept in memory (all NAT64s together).", min=1)] = 100_000,
    metrics: Annotated[Optional[str], typer.Option(
        metavar="ADDR:PORT", envvar="NAT64HO_METRICS", help="Serve Prometheus metrics over HTTP at http://ADDR:PORT/metrics "
                                  "(e.g. 127.0.0.1:9464). Default: off.",
        show_default=False)] = None,
    keep_history: Annotated[Optional[float], typer.Option(
        metavar="DAYS", help="Delete history events older than this many days (current entries are never "
             "touched). Default: keep all.", min=0, show_default=False)] = None,
    max_nats: Annotated[int, typer.Option(
        metavar="N", help="NAT64 addresses the server keeps tables for; a HELLO from a new one beyond "
             "this gets ERROR NOT_ALLOWED. Bounds memory and disk against spoofed sources.",
        min=1)] = 4096,
    check_config: Annotated[bool, typer.Option(
        "--check-config", help="Only check the options (exit 0, or 2 with an Error: line); "
             "opens no database or socket. install.sh checks settings with it.")] = False,
) -> None:
    """Run the handoff server: answer NAT64s over UDP and keep their tables in SQLite.

    SIGTERM or SIGINT: stop reading, commit what is in flight, exit 0.
    SIGHUP: reopen the log file (for logrotate).
    """
    from nat64ho import server

    try:
        host, port = parse_listen(listen)
        first, last = parse_ports(ports)
        prefixes = [parse_prefix4(p, "--allow") for p in allow or []]
        metrics_at = parse_listen(metrics, "--metrics") if metrics else None
        if sync not in ("full", "normal"):
            raise UsageError(f"--sync {sync!r}: expected 'full' or 'normal'")
    except UsageError as exc:
        fail(str(exc))
    if check_config:
        typer.echo("ok: the options are valid")
        raise typer.Exit(0)
    path = db_path(db)
    if log_file is None:
        log_file = str(path.parent / "nat64ho.log")
    config = server.Config(
        db=path, host=host, port=port, log_file=log_file, first_port=first, last_port=last,
        allow=prefixes, min_idle=min_idle, hello_rate=hello_rate, create_rate=create_rate,
        sync=sync, cache_size=cache_size, keep_history_days=keep_history, metrics=metrics_at,
        max_nats=max_nats,
    )
    try:
        server.run(config)
    except schema.DatabaseError as exc:
        fail(str(exc), 1)
    except server.ListenError as exc:
        fail(exc.strerror, 1)
    except OSError as exc:
        fail(f"{exc.filename or ''}{': ' if exc.filename else ''}{exc.strerror or exc}", 1)


# ---------------------------------------------------------------- operator commands
# query, who, export, import, stats, prune: thin shells over nat64ho.history.
# Reads open the database read-only, so they never create or change one.

import csv  # noqa: E402  (kept with the commands that use them)
import gzip  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sqlite3  # noqa: E402
import time  # noqa: E402
from typing import Iterable  # noqa: E402

from nat64ho import history  # noqa: E402
from nat64ho.eventlog import format_event, ipv4_str, ipv6_str, ts_str  # noqa: E402

#: The one exit status for a database that cannot be used (missing, busy,
#: foreign, newer); bad values on the command line get EXIT_USAGE.
EXIT_DB = 1
#: How long a command keeps retrying a database that stays locked, on top of
#: the busy timeout of each attempt: a commit or checkpoint of the server
#: finishes well within it.
BUSY_RETRY_S = 2.0

#: SQLite page cache of an import, in KiB (the default is 2 MiB).
IMPORT_CACHE_KIB = 256 * 1024

_TABLE_FORMATS = ("table", "json", "csv")
_EXPORT_FORMATS = ("log", "jsonl", "csv")

FormatOption = Annotated[str, typer.Option(
    "--format", metavar="table|json|csv",
    help="table: aligned, with a header; json: one array of objects with fixed keys; "
         "csv: with a header row.")]


def _check_format(value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise UsageError(f"--format {value!r}: expected one of {', '.join(allowed)}")
    return value


def parse_nat_port(text: str, what: str) -> tuple[int, int]:
    """``192.0.2.9:47102``."""
    host, sep, port = text.rpartition(":")
    try:
        if not sep:
            raise UsageError("expected NAT:PORT")
        return parse_ipv4(host, what), parse_port(port, what)
    except UsageError:
        raise UsageError(f"{what} {text!r}: expected NAT:PORT with an IPv4 address and a port "
                         "1-65535, e.g. 192.0.2.9:47102") from None


def parse_ipv6_target(text: str, what: str) -> tuple[ipaddress.IPv6Network, Optional[int]]:
    """``[2001:db8::55]:34643``, ``2001:db8::55`` or ``2001:db8::/48``: a
    prefix (a /128 for one address) and the client port, if one was given."""
    port = None
    body = text
    try:
        if text.startswith("["):
            body, sep, rest = text[1:].partition("]")
            if not sep or (rest and not rest.startswith(":")) or "/" in body:
                raise ValueError
            if rest:
                port = parse_port(rest[1:], what, allow_zero=True)
        return ipaddress.IPv6Network(body, strict=False), port
    except (ValueError, UsageError):
        raise UsageError(f"{what} {text!r}: not an IPv6 address, [IPV6]:PORT or "
                         "IPV6/LEN prefix") from None


class _Database:
    """``with _Database(db) as conn``: the database of --db, or a clean exit.

    Read-only unless ``write``, and never created. A lock that outlasts the
    busy timeout is retried for BUSY_RETRY_S more before giving up; SQLite
    errors while the command runs become one ``Error:`` line; the connection
    is closed on the way out.
    """

    def __init__(self, db: Optional[Path], *, write: bool = False):
        self.path = db_path(db)
        self.write = write
        self.conn = None

    def __enter__(self):
        deadline = time.monotonic() + BUSY_RETRY_S
        while True:
            try:
                self.conn = schema.open_db(self.path, readonly=not self.write)
                return self.conn
            except schema.DatabaseBusy as exc:
                if time.monotonic() >= deadline:
                    fail(str(exc), EXIT_DB)
                time.sleep(0.1)
            except schema.DatabaseError as exc:
                fail(str(exc), EXIT_DB)

    def __exit__(self, kind, exc, tb):
        self.conn.close()
        if isinstance(exc, BrokenPipeError):
            # `nat64ho export | head`: the reader has all it wanted.
            try:
                sys.stdout = open(os.devnull, "w")
            except OSError:
                pass
            raise typer.Exit(0)
        if isinstance(exc, sqlite3.OperationalError) and any(
                w in str(exc) for w in ("locked", "busy")):
            fail(f"{self.path}: database is busy (locked by another process); try again", EXIT_DB)
        if isinstance(exc, sqlite3.DatabaseError):
            fail(f"{self.path}: {exc}", EXIT_DB)
        if isinstance(exc, history.HistoryError):
            fail(str(exc), EXIT_DB)
        return False


def _ts_or(value: Optional[int], missing: str) -> str:
    return ts_str(value) if value is not None else missing


def _endpoint(addr: bytes, aport: int) -> str:
    return f"[{ipv6_str(addr)}]:{aport}"


def _emit(rows: Iterable[dict], fmt: str, columns: list[tuple[str, str, int]]) -> None:
    """Print dicts as an aligned table (columns: key, header, width; the last
    one unpadded so that rows can stream), a JSON array, or CSV."""
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
        w.writerow(keys)
        for row in rows:
            w.writerow(["" if row[k] is None else str(row[k]).lower() if isinstance(row[k], bool)
                        else row[k] for k in keys])
    else:
        # One format string for the whole row: a table of 64508 entries is
        # printed per row, so per-cell work shows (2.9 s -> 1.1 s for query).
        template = "  ".join([f"{{{i}!s:<{w}}}" for i, (_, _, w) in enumerate(columns[:-1])]
                             + [f"{{{len(columns) - 1}}}"])
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


_TS_W = 26  # 2019-03-18 15:22:02.062254


@app.command()
def query(
    db: DbOption = None,
    nat: Annotated[Optional[str], typer.Option(
        metavar="IPV4", help="Only this NAT64's table. Default: every NAT64.", show_default=False)] = None,
    ipv6: Annotated[Optional[str], typer.Option(
        metavar="ADDR|PREFIX/LEN", help="Only entries of this client address or prefix.",
        show_default=False)] = None,
    port: Annotated[Optional[str], typer.Option(
        metavar="N", help="Only this NAT port.", show_default=False)] = None,
    fmt: FormatOption = "table",
) -> None:
    """The current entries: NAT port, client endpoint, created, last use; by NAT64 and port.

    Reads the database without changing it; safe while the server runs.
    """
    try:
        _check_format(fmt, _TABLE_FORMATS)
        nat_v = parse_ipv4(nat, "--nat") if nat is not None else None
        net = parse_ipv6_target(ipv6, "--ipv6") if ipv6 is not None else None
        if net is not None and net[1] is not None:
            raise UsageError(f"--ipv6 {ipv6!r}: give an address or prefix without a port")
        port_v = parse_port(port, "--port") if port is not None else None
    except UsageError as exc:
        fail(str(exc))
    text = history.LineFormatter()  # cached dates and NAT64 addresses, C-library IPv6
    with _Database(db) as conn:
        rows = ({"nat": text.nat(e.nat), "port": e.port, "ipv6": (v6 := text.ipv6(e.addr)),
                 "ipv6_port": e.aport, "endpoint": f"[{v6}]:{e.aport}",
                 "created": text.ts(e.created), "last_use": text.ts(e.last_use)}
                for e in history.query_entries(conn, nat=nat_v, ipv6=net[0] if net else None,
                                               port=port_v))
        if fmt == "table":
            cols = [("nat", "NAT64", 15), ("port", "PORT", 5), ("created", "CREATED", _TS_W),
                    ("last_use", "LAST USE", _TS_W), ("endpoint", "IPV6 ENDPOINT", 0)]
        else:
            cols = [("nat", "", 0), ("port", "", 0), ("ipv6", "", 0), ("ipv6_port", "", 0),
                    ("created", "", 0), ("last_use", "", 0)]
        _emit(rows, fmt, cols)


def _holding_dict(h: history.Holding) -> dict:
    return {
        "nat": ipv4_str(h.nat), "port": h.port, "ipv6": ipv6_str(h.addr), "ipv6_port": h.aport,
        "endpoint": _endpoint(h.addr, h.aport),
        "from": _ts_or(h.start, None), "until": _ts_or(h.end, None), "current": h.current,
        "from_text": _ts_or(h.start, "before history"),
        "until_text": "now (current)" if h.current else _ts_or(h.end, "not recorded"),
        "events": [format_event(e) for e in (h.created, h.deleted) if e is not None],
    }


@app.command()
def who(
    target: Annotated[str, typer.Argument(
        metavar="TARGET",
        help="A NAT port (192.0.2.9:47102): who held it. A client endpoint ([2001:db8::55]:34643), "
             "address (2001:db8::55) or prefix (2001:db8::/48): every NAT port it held.",
        show_default=False)],
    at: Annotated[Optional[str], typer.Option(
        metavar="TIME", help="The instant asked about: 'YYYY-MM-DD HH:MM[:SS[.ffffff]]' in UTC "
             "or ISO 8601. Default: now for a NAT port; every time for a client.",
        show_default=False)] = None,
    db: DbOption = None,
    fmt: FormatOption = "table",
) -> None:
    """Attribute a NAT port at an instant to the client that held it, with the events that prove it;
    or list every NAT port a client endpoint, address or prefix held, with time ranges.

    The history may begin after a holding began: a Deleted with no Created before
    it still names the holder, and the current table names holders whose history
    was pruned. No holder is a normal answer (exit status 0).
    """
    try:
        _check_format(fmt, _TABLE_FORMATS)
        when = parse_time(at, "--at") if at is not None else None
        if target.startswith("[") or target.count(":") > 1:
            nat_port, (net, aport) = None, parse_ipv6_target(target, "target")
        else:
            nat_port = parse_nat_port(target, "target")
    except UsageError as exc:
        fail(str(exc))
    with _Database(db) as conn:
        if nat_port is not None:
            instant = when if when is not None else int(time.time() * 1_000_000)
            _who_port(history.who_port(conn, *nat_port, instant), nat_port, instant, fmt)
        else:
            holdings = map(_holding_dict, history.who_endpoint(conn, net, aport, when))
            if fmt == "table":
                first = next(holdings, None)
                if first is None:
                    what = f"[{net.network_address}]:{aport}" if aport is not None else (
                        str(net.network_address) if net.prefixlen == 128 else str(net))
                    typer.echo(f"No entry: {what} held no NAT port"
                               + (f" at {ts_str(when)}" if when is not None else "")
                               + " as far as this database knows.")
                    return
                holdings = itertools.chain([first], holdings)
                cols = [("nat", "NAT64", 15), ("port", "PORT", 5), ("from_text", "FROM", _TS_W),
                        ("until_text", "UNTIL", _TS_W), ("endpoint", "IPV6 ENDPOINT", 0)]
            else:
                cols = [(k, "", 0) for k in ("nat", "port", "ipv6", "ipv6_port", "from", "until",
                                              "current")]
            _emit(holdings, fmt, cols)


def _who_port(h: Optional[history.Holding], nat_port: tuple[int, int], at: int, fmt: str) -> None:
    subject = f"{ipv4_str(nat_port[0])}:{nat_port[1]}"
    if fmt != "table":
        row = {"nat": ipv4_str(nat_port[0]), "port": nat_port[1], "at": ts_str(at),
               "held": h is not None}
        d = _holding_dict(h) if h is not None else {}
        for k in ("ipv6", "ipv6_port", "from", "until", "current"):
            row[k] = d.get(k)
        if fmt == "json":
            row["events"] = d.get("events", [])
            typer.echo(json.dumps(row, indent=2))
        else:
            _emit([row], "csv", [(k, "", 0) for k in row])
        return
    if h is None:
        typer.echo(f"No entry: {subject} was not held at {ts_str(at)} as far as this database knows.")
        return
    d = _holding_dict(h)
    typer.echo(f"{subject} at {ts_str(at)}: {d['endpoint']}")
    typer.echo(f"  from   {d['from_text']}")
    typer.echo(f"  until  {d['until_text']}")
    if d["events"]:
        typer.echo("  events:")
        for line in d["events"]:
            typer.echo(f"    {line}")
    else:
        typer.echo("  events: none recorded (known from the current table)")


@app.command()
def export(
    db: DbOption = None,
    nat: Annotated[Optional[str], typer.Option(
        metavar="IPV4", help="Only this NAT64's events.", show_default=False)] = None,
    since: Annotated[Optional[str], typer.Option(
        metavar="TIME", help="Only events at or after this time (UTC unless a zone is given).",
        show_default=False)] = None,
    until: Annotated[Optional[str], typer.Option(
        metavar="TIME", help="Only events before this time.", show_default=False)] = None,
    fmt: Annotated[str, typer.Option(
        "--format", metavar="log|jsonl|csv",
        help="log: PROTOCOL.md §6 lines, byte-identical to the server's log; jsonl: one JSON "
             "object per line; csv: with a header row.")] = "log",
    output: Annotated[Optional[str], typer.Option(
        "--output", "-o", metavar="FILE", help="Write here instead of stdout; a name ending in "
             ".gz is gzip-compressed.", show_default=False)] = None,
) -> None:
    """Stream the history, in the order the server logged it (time order with --since/--until).

    Constant memory however long the history; reads the database without
    changing it, safe while the server runs.
    """
    try:
        _check_format(fmt, _EXPORT_FORMATS)
        nat_v = parse_ipv4(nat, "--nat") if nat is not None else None
        since_v = parse_time(since, "--since") if since is not None else None
        until_v = parse_time(until, "--until") if until is not None else None
    except UsageError as exc:
        fail(str(exc))
    writer = {"log": history.write_log, "jsonl": history.write_jsonl, "csv": history.write_csv}[fmt]
    with _Database(db) as conn:
        rows = history.history_rows(conn, nat=nat_v, since=since_v, until=until_v)
        if output is None or output == "-":
            writer(rows, sys.stdout)
            sys.stdout.flush()
            return
        try:
            if output.endswith(".gz"):
                out = gzip.open(output, "wt", encoding="ascii", newline="", compresslevel=6)
            else:
                out = open(output, "w", encoding="ascii", newline="", buffering=1 << 20)
        except OSError as exc:
            fail(f"--output {output!r}: {exc.strerror or exc}", EXIT_DB)
        with out:
            n = writer(rows, out)
        typer.echo(f"{n} events written to {output}", err=True)


@app.command("import")
def import_(
    files: Annotated[list[str], typer.Argument(
        metavar="FILE...", help="Log files in the PROTOCOL.md §6 format (this server's or the "
             "original handoff server's); .gz is decompressed; '-' reads stdin.",
        show_default=False)],
    db: DbOption = None,
    rebuild_table: Annotated[bool, typer.Option(
        "--rebuild-table", help="Also replay the events into the current table (moving from "
             "another server): a port whose last event is a Created gets that entry, unless the "
             "table already has one for the port or the endpoint. Only with the server stopped: "
             "a running server keeps its free ports in memory.")] = False,
) -> None:
    """Add log files to the history. Changes the database (which must exist).

    Events already in the history are left alone, so importing a file twice adds
    nothing. A line that does not parse is reported as FILE:LINE and skipped;
    the exit status is then 1 (0 when every line was taken).
    """
    for name in files:
        if name != "-" and not os.path.isfile(name):
            fail(f"{name!r}: no such file")
    if rebuild_table and history.database_in_use(db_path(db)):
        fail(f"{db_path(db)}: another process has this database open (a running server?); "
             "stop it before --rebuild-table: a server keeps its free ports in memory", EXIT_DB)
    def bad(name: str, number: int, reason: str) -> None:
        typer.echo(f"{name}:{number}: skipped: {reason}", err=True)

    def logs():
        for name in files:
            stream = history.open_log(name)
            try:
                yield name, stream
            finally:
                if name != "-":
                    stream.close()

    with _Database(db, write=True) as conn:
        # New events land at random places in the address index; a cache
        # that holds its hot pages saves a read per row on a big history.
        conn.execute(f"PRAGMA cache_size = -{IMPORT_CACHE_KIB}")
        result = history.import_logs(conn, logs(), bad, rebuild_table=rebuild_table)
    summary = (f"{result.lines} lines read, {result.added} events added, "
               f"{result.lines - result.skipped - result.added} already present, "
               f"{result.skipped} skipped")
    if rebuild_table:
        summary += f"; {result.entries} entries added to the table"
    typer.echo(summary, err=True)
    if result.skipped:
        raise typer.Exit(1)


@app.command()
def stats(
    db: DbOption = None,
    ports: Annotated[Optional[str], typer.Option(
        metavar="FIRST-LAST", help="Port range for the capacity column. Default: the --ports "
             "the server last started with (1028-65535 if it never recorded one).",
        show_default=False)] = None,
    fmt: FormatOption = "table",
) -> None:
    """Per NAT64: entries / capacity, oldest last use, first and last HELLO, Created and
    Deleted over the last hour and day.

    Reads the database without changing it; safe while the server runs.
    """
    try:
        _check_format(fmt, _TABLE_FORMATS)
        if ports is not None:
            first, last = parse_ports(ports)
    except UsageError as exc:
        fail(str(exc))
    now = int(time.time() * 1_000_000)
    with _Database(db) as conn:
        if ports is None:
            row = conn.execute("SELECT value FROM meta WHERE key = 'ports'").fetchone()
            first, last = parse_ports(row[0] if row else "1028-65535")
        found = history.stats(conn, now, last - first + 1)
    rows = [{"nat": ipv4_str(s.nat), "entries": s.entries, "capacity": s.capacity,
             "fill": f"{s.entries}/{s.capacity}",
             "oldest_last_use": _ts_or(s.oldest_last_use, None),
             "first_hello": _ts_or(s.first_hello, None), "last_hello": _ts_or(s.last_hello, None),
             "created_hour": s.created_hour, "deleted_hour": s.deleted_hour,
             "created_day": s.created_day, "deleted_day": s.deleted_day,
             "hour": f"+{s.created_hour} -{s.deleted_hour}",
             "day": f"+{s.created_day} -{s.deleted_day}"} for s in found]
    if fmt == "table":
        if not rows:
            typer.echo("No NAT64 has said HELLO to this database yet.")
            return
        cols = [("nat", "NAT64", 15), ("fill", "ENTRIES", 13), ("oldest_last_use", "OLDEST LAST USE", _TS_W),
                ("first_hello", "FIRST HELLO", _TS_W), ("last_hello", "LAST HELLO", _TS_W),
                ("hour", "HOUR +/-", 15), ("day", "DAY +/-", 0)]
    else:
        cols = [(k, "", 0) for k in ("nat", "entries", "capacity", "oldest_last_use", "first_hello",
                                      "last_hello", "created_hour", "deleted_hour", "created_day",
                                      "deleted_day")]
    _emit(rows, fmt, cols)


@app.command()
def prune(
    before: Annotated[str, typer.Option(
        metavar="TIME", help="Delete history events older than this (UTC unless a zone is "
             "given), e.g. 2024-01-01.", show_default=False)],
    db: DbOption = None,
) -> None:
    """Delete old history events. Changes the database; current entries are never touched.

    Works in small transactions, so a running server is delayed by one batch at most.
    """
    try:
        cutoff = parse_time(before, "--before")
    except UsageError as exc:
        fail(str(exc))
    with _Database(db, write=True) as conn:
        n = history.prune(conn, cutoff)
    typer.echo(f"{n} history events before {ts_str(cutoff)} deleted")


# ---------------------------------------------------------------- check

@app.command()
def check(db: DbOption = None) -> None:
    """Check a database without changing it: file header, schema version, tables
    and indexes, PRAGMA integrity_check. Safe while the server runs.

    Exit status 0 when healthy, 1 when anything is wrong (each finding on its
    own line), 2 when the database is missing.
    """
    path = db_path(db)
    try:
        report = schema.check(path)
    except schema.DatabaseMissing as exc:
        fail(str(exc))
    except schema.DatabaseError as exc:
        fail(str(exc), 1)
    if not report.ok:
        for problem in report.problems:
            typer.echo(f"Error: {problem}", err=True)
        raise typer.Exit(1)
    facts = ", ".join(f"{k} {v}" for k, v in report.facts.items())
    typer.echo(f"ok: {path}: integrity ok, schema current; {facts}")


# ---------------------------------------------------------------- bench

@app.command()
def bench(
    mode: Annotated[str, typer.Option(
        metavar="create|lookup|mixed", help="create: new endpoints (durable answers); lookup: "
             "existing entries (cache hits); mixed: mostly LOOKUP/TOUCH, some MAP, a tenth "
             "new endpoints.")] = "create",
    batch: Annotated[int, typer.Option(metavar="K", help="Messages per request datagram.",
                                       min=1, max=60)] = 1,
    window: Annotated[int, typer.Option(
        metavar="N", help="Requests in flight per client process (closed loop), or at most "
             "in flight (open loop, with --rate).", min=1, max=4096)] = 32,
    rate: Annotated[float, typer.Option(
        metavar="R", help="Open loop: offer R messages/s over all clients. Default: closed loop.",
        min=0)] = 0.0,
    duration: Annotated[float, typer.Option(metavar="S", help="Seconds measured (after a "
                                            "second of warm-up).", min=0.5, max=3600)] = 10.0,
    clients: Annotated[int, typer.Option(metavar="P", help="Client processes.", min=1, max=64)] = 1,
    nats: Annotated[int, typer.Option(metavar="N", help="NAT64s, each from its own 127.1.x.y "
                                      "source address.", min=1, max=4000)] = 1,
    entries: Annotated[int, typer.Option(
        metavar="N", help="lookup/mixed: entries created per NAT64 before measuring.",
        min=1, max=65535)] = 20_000,
    server_addr: Annotated[Optional[str], typer.Option(
        "--server", metavar="ADDR:PORT", help="Drive this running server (loopback only). "
             "Default: start one on a temporary database.", show_default=False)] = None,
    server_pid: Annotated[Optional[int], typer.Option(
        metavar="PID", help="With --server: its process id, to report its CPU and RSS.",
        show_default=False)] = None,
    sync: Annotated[str, typer.Option(metavar="full|normal",
                                      help="SQLite synchronous mode of the started server and "
                                           "of the SQLite ceiling.")] = "full",
    server_arg: Annotated[Optional[list[str]], typer.Option(
        metavar="ARG", help="Extra argument for the started 'nat64ho serve' (repeat), e.g. "
             "--server-arg=--cache-size=500000.", show_default=False)] = None,
    ceilings: Annotated[bool, typer.Option(
        "--ceilings/--no-ceilings", help="Also measure the UDP echo and raw SQLite ceilings.")] = True,
) -> None:
    """Load a handoff server over loopback and print throughput, latency, CPU and RSS
    beside the echo and SQLite ceilings of this machine, measured in the same run."""
    from nat64ho import bench as b

    try:
        if mode not in b.MODES:
            raise UsageError(f"--mode {mode!r}: expected one of {', '.join(b.MODES)}")
        if sync not in ("full", "normal"):
            raise UsageError(f"--sync {sync!r}: expected 'full' or 'normal'")
        address = None
        if server_addr is not None:
            address = parse_listen(server_addr)
            if not ipaddress.ip_address(address[0]).is_loopback or address[1] == 0:
                raise UsageError(f"--server {server_addr!r}: give a loopback ADDR:PORT; the "
                                 "benchmark floods what it drives")
    except UsageError as exc:
        fail(str(exc))
    cfg = b.BenchConfig(mode=mode, batch=batch, window=window, rate=rate, duration=duration,
                        clients=clients, nats=nats, entries=entries, server=address,
                        server_pid=server_pid, sync=sync, server_args=server_arg or [],
                        ceilings=ceilings)
    try:
        report = b.run(cfg)
    except (RuntimeError, OSError) as exc:
        fail(str(exc), 1)
    typer.echo(report.format())


def main() -> None:
    try:
        app(prog_name="nat64ho")
    except PermissionError as exc:
        # E.g. a user outside group nat64ho on the installed database.
        where = exc.filename or "a file"
        typer.echo(f"Error: {where}: permission denied (run as root or as a member of the "
                   "file's group)", err=True)
        sys.exit(1)
