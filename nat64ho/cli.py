"""The ``nat64ho`` command line: parses options, calls the library, prints.

Every named library error is turned here, once, into one ``Error: …`` line
and exit status 2 (1 for a runtime failure); the parser's own complaints
(a missing option, a number out of range) take the same one-line form in
:class:`_Group`. Nothing else prints tracebacks for operator mistakes.
"""

from __future__ import annotations

import datetime as dt
import functools
import ipaddress
import sys
from pathlib import Path
from typing import Annotated, NoReturn, Optional

import typer
from typer.core import TyperGroup

from nat64ho.storage import schema

try:  # typer raises the exceptions of the click it carries
    from typer._click.exceptions import ClickException, NoArgsIsHelpError
except ImportError:  # typer releases that depend on click instead
    from click.exceptions import ClickException, NoArgsIsHelpError


class _Group(TyperGroup):
    """Every usage mistake as one ``Error:`` line (click prints a usage block),
    and option help without the framework's range notes."""

    def get_command(self, ctx, cmd_name):
        command = super().get_command(ctx, cmd_name)
        for param in getattr(command, "params", ()):
            if hasattr(param, "_get_number_range_help_str"):
                # "[x>=0]" in help: the help text says the range in words.
                param._get_number_range_help_str = lambda: None
            if hasattr(param, "_usage_display_name"):
                # An argument shows as NAME, [NAME] or NAME..., as man pages
                # write it: no "{NAME}" and no "<list[str]>" beside it.
                param._usage_display_name = functools.partial(_usage_name, param)
                param.display_type_rich = lambda ctx: None
        return command

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, False, **extra)
        except NoArgsIsHelpError as exc:
            exc.show()
            sys.exit(EXIT_USAGE)
        except ClickException as exc:
            typer.echo(f"Error: {_one_line(exc.format_message())}", err=True)
            sys.exit(exc.exit_code)
        except typer.Abort:
            sys.exit(130)
        # Without standalone mode a typer.Exit comes back as its status.
        sys.exit(rv if isinstance(rv, int) else 0)


def _usage_name(param) -> str:
    name = param.display_name_raw if param.required else f"[{param.display_name_raw}]"
    return name + ("..." if param.nargs != 1 else "")


def _one_line(message: str) -> str:
    return " ".join(message.split())


app = typer.Typer(
    cls=_Group,
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

@app.command(short_help="Run the handoff server on UDP, keeping the tables in SQLite.")
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
             "At the default a full 64508-port table turns over in 65 s, faster than the 2 minutes "
             "a UDP mapping must live (RFC 4787): a NAT64 creating faster keeps nothing alive.",
        min=0)] = 1000.0,
    request_rate: Annotated[float, typer.Option(
        metavar="N", help="Request messages (MAP, LOOKUP, TOUCH) per second per NAT64, with a burst "
             "of as many (0 = unlimited); beyond it requests get ERROR RATE_LIMITED, so one "
             "NAT64 cannot take the server from the others.", min=0)] = 10_000.0,
    cookie_lifetime: Annotated[int, typer.Option(
        metavar="SECONDS", help="Cookies change every SECONDS and are accepted for one or two "
             "of these; a NAT64 holding an expired one says HELLO again (nothing is logged).",
        min=1)] = 86400,
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
        metavar="N", help="Confirmed NAT64 addresses the server keeps tables for; a new one beyond "
             "this gets ERROR NOT_ALLOWED. Only a NAT64 that proved its address (its cookie came "
             "back) counts, so spoofed HELLOs take no place; 'nat64ho forget' frees one.",
        min=1)] = 4096,
    standby: Annotated[bool, typer.Option(
        "--standby", help="If another server owns the table, wait until it stops, then take "
             "over and serve (default: exit 1).")] = False,
    ipfix: Annotated[Optional[list[str]], typer.Option(
        metavar="ADDR:PORT", help="Send each Created and Deleted event as an IPFIX record (NAT64 BIB "
                                  "create/delete) over UDP to this collector; repeat for more. "
                                  "Best effort: the history stays the record. Default: off.",
        show_default=False)] = None,
    ipfix_domain: Annotated[int, typer.Option(
        metavar="N", help="IPFIX observation domain id in the messages (0-4294967295).")] = 0,
) -> None:
    """Run the handoff server: answer NAT64s over UDP and keep their tables in SQLite.

    SIGTERM or SIGINT: stop reading, commit what is in flight, exit 0.
    SIGHUP: reopen the log file (for logrotate).
    """
    from nat64ho.daemon import serve as server

    try:
        host, port = parse_listen(listen)
        if ipaddress.ip_address(host).version == 6 and host not in ("::", "::0"):
            raise UsageError(f"--listen {listen!r}: the handoff protocol runs over IPv4 (NAT64s "
                             "are IPv4 peers); give an IPv4 address, or [::] for all addresses "
                             "of both families")
        first, last = parse_ports(ports)
        prefixes = [parse_prefix4(p, "--allow") for p in allow or []]
        metrics_at = parse_listen(metrics, "--metrics") if metrics else None
        collectors = parse_collectors(ipfix or [], ipfix_domain)
        if sync not in ("full", "normal"):
            raise UsageError(f"--sync {sync!r}: expected 'full' or 'normal'")
    except UsageError as exc:
        fail(str(exc))
    path = db_path(db)
    if log_file is None:
        log_file = str(path.parent / "nat64ho.log")
    config = server.Config(
        db=path, host=host, port=port, log_file=log_file, first_port=first, last_port=last,
        allow=prefixes, min_idle=min_idle, hello_rate=hello_rate, create_rate=create_rate,
        request_rate=request_rate, cookie_lifetime=cookie_lifetime,
        sync=sync, cache_size=cache_size, keep_history_days=keep_history, metrics=metrics_at,
        max_nats=max_nats, standby=standby, ipfix=collectors, ipfix_domain=ipfix_domain,
    )
    try:
        server.run(config)
    except KeyboardInterrupt:
        # A Ctrl-C that lands while Python tears the loop down: still one line.
        fail("interrupted", 130)
    except schema.DatabaseError as exc:
        fail(str(exc), 1)
    except server.ListenError as exc:
        fail(exc.strerror, 1)
    except OSError as exc:
        fail(f"{exc.filename or ''}{': ' if exc.filename else ''}{exc.strerror or exc}", 1)


def parse_collectors(texts: list[str], domain: int) -> list[tuple[str, int]]:
    """The ``--ipfix`` collectors, each once, and a valid ``--ipfix-domain``."""
    if not 0 <= domain <= 0xFFFFFFFF:
        raise UsageError(f"--ipfix-domain {domain}: not a 32-bit unsigned number (0-4294967295)")
    out: list[tuple[str, int]] = []
    for text in texts:
        host, port = parse_listen(text, "--ipfix")
        if port == 0:
            raise UsageError(f"--ipfix {text!r}: not a port number (1-65535)")
        if (host, port) in out:
            raise UsageError(f"--ipfix {text!r}: given twice")
        out.append((host, port))
    return out


# ---------------------------------------------------------------- operator commands
# query, who, export, import, stats, prune: thin shells over nat64ho.history.
# Reads open the database read-only, so they never create or change one.

import collections  # noqa: E402  (kept with the commands that use them)
import csv  # noqa: E402
import gzip  # noqa: E402
import io  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sqlite3  # noqa: E402
import time  # noqa: E402
from typing import Iterable, Iterator  # noqa: E402

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

    def __init__(self, db: Optional[Path], *, write: bool = False, own: Optional[str] = None):
        self.path = db_path(db)
        self.write = write
        self.own = own  # the command, if it must own the table (nat64ho.owner)
        self.ownership = None
        self.conn = None

    def __enter__(self):
        deadline = time.monotonic() + BUSY_RETRY_S
        while True:
            try:
                self.conn = schema.open_db(self.path, readonly=not self.write)
                break
            except schema.DatabaseBusy as exc:
                if time.monotonic() >= deadline:
                    fail(str(exc), EXIT_DB)
                time.sleep(0.1)
            except schema.DatabaseError as exc:
                fail(str(exc), EXIT_DB)
        if self.own is not None:
            from nat64ho.storage import owner
            try:
                self.ownership = owner.acquire(self.path, what=self.own)
            except owner.TableOwned as exc:
                self.conn.close()
                fail(str(exc), EXIT_DB)
        return self.conn

    def __exit__(self, kind, exc, tb):
        self.conn.close()
        if self.ownership is not None:
            self.ownership.release()
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
        if isinstance(exc, (history.HistoryError, schema.DatabaseError)):
            fail(str(exc), EXIT_DB)
        return False


class _Progress:
    """A progress bar on stderr while it is a terminal, else nothing at all.

    ``total`` is in the bar's own unit (octets of input, rows); ``count`` is
    what the operator counts (lines, events), shown with its rate.
    """

    def __init__(self, what: str, noun: str, total: Optional[int], show: bool = True):
        self.noun = noun
        self.bar = None
        if not show or not sys.stderr.isatty():
            return
        from rich.console import Console
        from rich.progress import (BarColumn, Progress, ProgressColumn, TaskProgressColumn,
                                   TextColumn, TimeRemainingColumn)
        from rich.text import Text

        class Rate(ProgressColumn):
            def render(self, task):
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

    def update(self, done: Optional[int], count: int) -> None:
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


def _interrupted(message: str) -> NoReturn:
    """Ctrl-C: say how far the work got and how to go on; exit 130 as a shell does."""
    typer.echo(f"\nInterrupted: {message}", err=True)
    raise typer.Exit(130)


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


@app.command(short_help="Show the current entries of the tables.")
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


@app.command(short_help="Who held a NAT port when; or every port a client held.")
def who(
    target: Annotated[Optional[str], typer.Argument(
        metavar="NAT:PORT|CLIENT",
        help="A NAT port (192.0.2.9:47102): who held it. A client endpoint ([2001:db8::55]:34643), "
             "address (2001:db8::55) or prefix (2001:db8::/48): every NAT port it held. "
             "Not with --reports.",
        show_default=False)] = None,
    at: Annotated[Optional[str], typer.Option(
        metavar="TIME", help="The instant asked about: 'YYYY-MM-DD HH:MM[:SS[.ffffff]]' in UTC "
             "or RFC 3339 with any offset. Default: now for a NAT port; every time for a client.",
        show_default=False)] = None,
    tolerance: Annotated[Optional[str], typer.Option(
        metavar="SECONDS", help="For a NAT port: list every holder at some instant within "
             "this many seconds of --at, closest first, and say when that is more than one "
             "(the report's clock may be off).", show_default=False)] = None,
    reports: Annotated[Optional[str], typer.Option(
        metavar="FILE", help="Answer a CSV of abuse reports, one per row: nat,port,time"
             "[,tolerance] (a header row is optional; '-' reads stdin); --tolerance is the "
             "default for rows without one. One output row per report and holder.",
        show_default=False)] = None,
    db: DbOption = None,
    fmt: FormatOption = "table",
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
        _check_format(fmt, _TABLE_FORMATS)
        when = parse_time(at, "--at") if at is not None else None
        tol = parse_seconds(tolerance, "--tolerance") if tolerance is not None else None
        if reports is not None:
            if target is not None or at is not None:
                raise UsageError("--reports answers the reports in the file: give no "
                                 "NAT:PORT and no --at")
        elif target is None:
            raise UsageError("give a NAT:PORT or a client to ask about, or --reports FILE")
        elif target.startswith("[") or target.count(":") > 1:
            nat_port, (net, aport) = None, parse_ipv6_target(target, "target")
            if tol is not None:
                raise UsageError("--tolerance is for a NAT:PORT; a client's holdings are "
                                 "listed with their whole time ranges")
        else:
            nat_port = parse_nat_port(target, "target")
    except UsageError as exc:
        fail(str(exc))
    if reports is not None:
        _who_reports(db, reports, tol or 0, fmt)
        return
    with _Database(db) as conn:
        if nat_port is not None:
            instant = when if when is not None else int(time.time() * 1_000_000)
            if tol is not None:
                found = history.who_port_window(conn, *nat_port, instant, tol)
                _who_window(found, nat_port, instant, tol, fmt)
                return
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


def parse_seconds(text: str, what: str) -> int:
    """Non-negative seconds (a fraction allowed) as microseconds."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 366 * 86400:
        raise UsageError(f"{what} {text!r}: expected seconds, 0 to 31622400, e.g. 60")
    return round(value * 1_000_000)


def _utc(ts: Optional[int]) -> Optional[str]:
    """Times of abuse answers: in UTC and saying so (RFC 3339, space form)."""
    return None if ts is None else ts_str(ts) + "Z"


def _seconds(us: int) -> str:
    return f"{us / 1e6:g}"


def _window_rows(report, nat_port, at: int, tol: int, found: list) -> Iterator[dict]:
    base = {"report": report, "nat": ipv4_str(nat_port[0]), "port": nat_port[1], "at": _utc(at),
            "tolerance_s": _seconds(tol), "holders": len(found), "ambiguous": len(found) > 1}
    if not found:
        yield {**base, "ipv6": None, "ipv6_port": None, "from": None, "until": None,
               "current": None, "distance_s": None, "endpoint": None,
               "from_text": None, "until_text": None}
    for h in found:
        yield {**base, "ipv6": ipv6_str(h.addr), "ipv6_port": h.aport, "from": _utc(h.start),
               "until": _utc(h.end), "current": h.current,
               "distance_s": _seconds(history.distance(h, at)),
               "endpoint": _endpoint(h.addr, h.aport),
               "from_text": _utc(h.start) or "before history",
               "until_text": "now (current)" if h.current else _utc(h.end) or "not recorded"}


_WINDOW_KEYS = ("report", "nat", "port", "at", "tolerance_s", "holders", "ambiguous", "ipv6",
                "ipv6_port", "from", "until", "current", "distance_s")


def _who_window(found: list, nat_port, at: int, tol: int, fmt: str) -> None:
    rows = list(_window_rows(None, nat_port, at, tol, found))
    if fmt != "table":
        _emit(rows, fmt, [(k, "", 0) for k in _WINDOW_KEYS if k != "report"])
        return
    subject = f"{ipv4_str(nat_port[0])}:{nat_port[1]} at {_utc(at)} ± {_seconds(tol)} s"
    if not found:
        typer.echo(f"No entry: {subject}: not held as far as this database knows.")
        return
    verdict = "1 holder" if len(found) == 1 else f"{len(found)} holders: AMBIGUOUS"
    typer.echo(f"{subject}: {verdict} (closest to the reported time first)")
    _emit(rows, "table", [("endpoint", "IPV6 ENDPOINT", 46), ("from_text", "FROM", _TS_W + 1),
                          ("until_text", "UNTIL", _TS_W + 1), ("distance_s", "AWAY (S)", 0)])


def _who_reports(db: Optional[Path], name: str, default_tol: int, fmt: str) -> None:
    try:
        source = sys.stdin if name == "-" else open(name, newline="", encoding="utf-8",
                                                    errors="replace")
    except OSError as exc:
        fail(f"--reports {name!r}: {exc.strerror or exc}")
    label = "stdin" if name == "-" else name
    bad = {"n": 0}

    def answers(conn) -> Iterator[dict]:
        reader = csv.reader(source)
        while True:
            try:
                row = next(reader, None)
            except csv.Error as exc:  # e.g. a field over the csv module's size limit
                bad["n"] += 1
                typer.echo(f"Error: {label}:{reader.line_num}: {exc}; the rest of the file "
                           "is not read", err=True)
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
                tol = parse_seconds(cells[3], "tolerance") if len(cells) == 4 and cells[3] \
                    else default_tol
            except UsageError as exc:
                bad["n"] += 1
                typer.echo(f"Error: {label}:{number}: {exc}", err=True)
                continue
            found = history.who_port_window(conn, nat, port, at, tol)
            yield from _window_rows(number, (nat, port), at, tol, found)

    with _Database(db) as conn:
        if fmt == "table":
            cols = [("report", "ROW", 4), ("natport", "NAT:PORT", 21), ("at", "AT (UTC)", _TS_W + 1),
                    ("tol", "±S", 5), ("answer", "ANSWER", 11), ("endpoint", "IPV6 ENDPOINT", 46),
                    ("from_text", "FROM", _TS_W + 1), ("until_text", "UNTIL", 0)]
            rows = ({**r, "natport": f"{r['nat']}:{r['port']}", "tol": r["tolerance_s"],
                     "answer": ("none" if not r["holders"] else "AMBIGUOUS" if r["ambiguous"]
                                else "1 holder")} for r in answers(conn))
            _emit(rows, "table", cols)
        else:
            _emit(answers(conn), fmt, [(k, "", 0) for k in _WINDOW_KEYS])
    if name != "-":
        source.close()
    if bad["n"]:
        raise typer.Exit(1)


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


@app.command(short_help="Write the history as log lines, JSON lines or CSV.")
def export(
    db: DbOption = None,
    nat: Annotated[Optional[str], typer.Option(
        metavar="IPV4", help="Only this NAT64's events.", show_default=False)] = None,
    since: Annotated[Optional[str], typer.Option(
        metavar="TIME", help="Only events at or after this time (UTC unless a zone is given).",
        show_default=False)] = None,
    until: Annotated[Optional[str], typer.Option(
        metavar="TIME", help="Only events before this time.", show_default=False)] = None,
    after: Annotated[Optional[str], typer.Option(
        metavar="SEQ", help="Only events after this sequence number (the 'seq' of --format "
             "jsonl): resumes an export or a --follow exactly where it stopped.",
        show_default=False)] = None,
    follow: Annotated[bool, typer.Option(
        "--follow", "-f", help="After the history, keep printing each new event once the "
             "server has committed it, until SIGINT or SIGTERM.")] = False,
    fmt: Annotated[str, typer.Option(
        "--format", metavar="log|jsonl|csv",
        help="log: PROTOCOL.md §6 lines, byte-identical to the server's log; jsonl: one JSON "
             "object per line, with its sequence number; csv: with a header row.")] = "log",
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
        after_v = parse_seq(after, "--after") if after is not None else None
        if (after_v is not None or follow) and (since_v is not None or until_v is not None):
            raise UsageError("--after and --follow go in sequence order: use them without "
                             "--since/--until")
        if follow and output not in (None, "-"):
            raise UsageError("--follow writes to stdout: redirect it instead of --output")
    except UsageError as exc:
        fail(str(exc))
    writer = {"log": history.write_log, "jsonl": history.write_jsonl, "csv": history.write_csv}[fmt]
    if follow:
        _follow(db, writer, fmt, nat_v, after_v)
        return
    # The last rows handed to the writer, for an interrupted export to name
    # the last one that reached the file (a writer holds at most FETCH).
    recent: collections.deque = collections.deque(maxlen=2 * history.FETCH + 2)
    handed = [0]

    def counted(rows):
        # Ids travel with the rows so that an interrupted export can say
        # exactly where to resume; the writers other than jsonl drop them.
        n = 0
        for row in rows:
            n += 1
            handed[0] = n
            recent.append(row[:2])
            if not n % history.FETCH:
                bar.update(n, n)
            yield row if fmt == "jsonl" else row[1:]

    with _Database(db) as conn:
        rows = history.history_rows(conn, nat=nat_v, since=since_v, until=until_v,
                                    after=after_v, with_id=True)
        if output is None or output == "-":
            bar = _Progress("export", "events", None, show=False)  # stdout is the data
            writer(counted(rows), sys.stdout)
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
        if nat_v is None and since_v is None and until_v is None:
            lo = after_v or 0
            total = max(history.last_event_id(conn) - lo, 0)
        else:
            total = None
        bar = _Progress("export", "events", total)
        lines = _LineCounter(out)
        try:
            with out:
                n = writer(counted(rows), lines)
        except KeyboardInterrupt:
            bar.close()
            written = lines.lines - (fmt == "csv")
            if written <= 0:
                _interrupted(f"nothing written to {output}")
            # Rows handed over but still in the writer's buffer were not written.
            seq, ts = recent[-(handed[0] - written + 1)]
            if since_v is None and until_v is None:
                how = f"--after {seq}"
            else:
                how = f"--since '{ts_str(ts)}' (its events at that instant again)"
            _interrupted(f"{written} events written to {output}, the last one "
                         f"seq {seq} at {ts_str(ts)}; to write the rest to "
                         f"another file, run the same command with {how}")
        finally:
            bar.close()
        typer.echo(f"{n} events written to {output}", err=True)


class _LineCounter:
    """A text stream that counts the lines written through it."""

    def __init__(self, out):
        self.out = out
        self.lines = 0

    def write(self, text: str) -> int:
        n = self.out.write(text)
        self.lines += text.count("\n")
        return n


#: How often --follow asks the database for new events, in seconds: a read of
#: the id index, so the server's commits never wait on it.
FOLLOW_POLL_S = 0.25


def _follow(db: Optional[Path], writer, fmt: str, nat: Optional[int], after: Optional[int]) -> None:
    """``export --follow``: the history, then every event committed after it,
    each written once in id order and flushed, until a signal."""
    import signal

    stop = {"signal": None, "writing": False}

    def on_signal(signum, frame):
        # Between writing a batch and noting its last seq the signal waits,
        # so that the resume point printed is exactly what was delivered; a
        # second signal (a reader that stopped reading) ends it at once.
        again = stop["signal"] is not None
        stop["signal"] = signum
        if again or not stop["writing"]:
            raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    last = after or 0
    header = fmt == "csv"
    try:
        with _Database(db) as conn:
            while True:
                # One short read transaction per batch: the WAL a reader pins
                # stays small and a checkpoint of the server is never held up.
                rows = list(history.history_rows(conn, nat=nat, after=last, with_id=True,
                                                 limit=history.FETCH))
                if rows:
                    stop["writing"] = True
                    if fmt == "jsonl":
                        writer(rows, sys.stdout)
                    else:
                        text = io.StringIO()
                        writer((r[1:] for r in rows), text)
                        out = text.getvalue()
                        if fmt == "csv" and not header:
                            out = out.split("\n", 1)[1]
                        header = False
                        sys.stdout.write(out)
                    sys.stdout.flush()
                    last = rows[-1][0]
                    stop["writing"] = False
                    if stop["signal"] is not None:
                        raise KeyboardInterrupt
                if len(rows) < history.FETCH:
                    time.sleep(FOLLOW_POLL_S)
    except KeyboardInterrupt:
        typer.echo(f"stopped after seq {last}; resume with --after {last}", err=True)
        raise typer.Exit(0 if stop["signal"] == signal.SIGTERM else 130)


def parse_seq(text: str, what: str) -> int:
    if not text.isdigit():
        raise UsageError(f"{what} {text!r}: not a sequence number (the 'seq' of --format jsonl)")
    return int(text)


@app.command("import", short_help="Add log files to the history (creates the database).")
def import_(
    files: Annotated[list[str], typer.Argument(
        metavar="FILE", help="Log files in the PROTOCOL.md §6 format (this server's or the "
             "original handoff server's); .gz is decompressed; '-' reads stdin.",
        show_default=False)],
    db: DbOption = None,
    rebuild_table: Annotated[bool, typer.Option(
        "--rebuild-table", help="Also replay the events into the current table (moving from "
             "another server): a port whose last event is a Created gets that entry, unless the "
             "table already has one for the port or the endpoint. Only with the server stopped: "
             "a running server keeps its free ports in memory.")] = False,
) -> None:
    """Add log files to the history; creates the database if it is missing.

    Events already in the history are left alone, so importing a file twice adds
    nothing and an interrupted import is finished by running it again. A line
    that does not parse (or is longer than 4096 octets) is reported as
    FILE:LINE and skipped; the exit status is then 1 (0 when every line was taken).
    """
    for name in files:
        if name != "-" and not os.path.isfile(name):
            fail(f"{name!r}: no such file")
    path = db_path(db)
    if rebuild_table and history.database_in_use(path):
        fail(f"{path}: another process has this database open (a running server?); "
             "stop it before --rebuild-table: a server keeps its free ports in memory", EXIT_DB)
    created = None
    if not path.exists():
        created = _create_database(path)

    def bad(name: str, number: int, reason: str) -> None:
        if bar.bar is not None:
            bar.bar.console.print(f"{name}:{number}: skipped: {reason}", markup=False,
                                  highlight=False)
        else:
            typer.echo(f"{name}:{number}: skipped: {reason}", err=True)

    sizes = {name: os.path.getsize(name) for name in files if name != "-"}
    total = sum(sizes.values()) if "-" not in files else None
    state = {"done": 0, "stream": None, "lines": 0, "added": 0}

    def logs():
        for name in files:
            stream = history.open_log(name)
            state["stream"] = stream
            try:
                yield name, stream
            finally:
                if name != "-":
                    stream.close()
                state["done"] += sizes.get(name, 0)

    def progress(lines: int, added: int) -> None:
        state["lines"], state["added"] = lines, added
        at = history.log_position(state["stream"]) if state["stream"] is not None else None
        bar.update(None if total is None else state["done"] + (at or 0), lines)

    bar = _Progress("import", "lines", total)
    try:
        with _Database(db, write=True, own="import --rebuild-table" if rebuild_table else None) as conn:
            # New events land at random places in the address index; a cache
            # that holds its hot pages saves a read per row on a big history.
            conn.execute(f"PRAGMA cache_size = -{IMPORT_CACHE_KIB}")
            result = history.import_logs(conn, logs(), bad, rebuild_table=rebuild_table,
                                         on_progress=progress, on_rebuild=bar.rebuilding)
    except KeyboardInterrupt:
        bar.close()
        _interrupted(f"{state['lines']} lines read and {state['added']} events added so far "
                     "(each batch is committed); run the same command again to finish: "
                     "events already imported are skipped")
    finally:
        bar.close()
    summary = (f"{result.lines} lines read, {result.added} events added, "
               f"{result.lines - result.skipped - result.added} already present, "
               f"{result.skipped} skipped")
    if rebuild_table:
        summary += f"; {result.entries} entries added to the table"
    if created is not None:
        summary = f"created {path} (schema version {created}); " + summary
    typer.echo(summary, err=True)
    if result.skipped:
        raise typer.Exit(1)


def _create_database(path: Path) -> int:
    """Make a new database as ``serve`` would (the same migrations), readable
    by its owner and group only: files 0640, directories 0750. Returns the
    schema version."""
    old = os.umask(0o027)
    try:
        missing = []
        parent = path.parent
        while not parent.exists():
            missing.append(parent)
            parent = parent.parent
        for d in reversed(missing):
            os.mkdir(d, 0o750)
        conn = schema.open_db(path, create=True)
    except schema.DatabaseError as exc:
        fail(str(exc), EXIT_DB)
    except OSError as exc:
        fail(f"{path}: cannot be created ({exc.strerror or exc})", EXIT_DB)
    finally:
        # The -wal and -shm files SQLite makes later take the database's mode.
        os.umask(old)
    try:
        return max(v for v, _, _ in schema.migrations())
    finally:
        conn.close()


@app.command(short_help="Per NAT64: table fill, HELLOs, recent Created/Deleted.")
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


@app.command(short_help="Delete history events older than a time.")
def prune(
    before: Annotated[str, typer.Option(
        metavar="TIME", help="Delete history events older than this (UTC unless a zone is "
             "given), e.g. 2024-01-01.", show_default=False)],
    db: DbOption = None,
) -> None:
    """Delete old history events. Changes the database; current entries are never touched.

    Refused while a server owns the table (it prunes itself with serve --keep-history).
    """
    try:
        cutoff = parse_time(before, "--before")
    except UsageError as exc:
        fail(str(exc))
    with _Database(db, write=True, own="prune") as conn:
        total = history.prune_count(conn, cutoff) if sys.stderr.isatty() else None
        bar = _Progress("prune", "events", total, show=bool(total))
        done = {"n": 0}

        def batch(n: int) -> None:
            done["n"] = n
            bar.update(n, n)

        try:
            n = history.prune(conn, cutoff, on_batch=batch)
        except KeyboardInterrupt:
            bar.close()
            _interrupted(f"{done['n']} history events before {ts_str(cutoff)} deleted so far "
                         "(each batch is committed); run the same command again to finish")
        finally:
            bar.close()
    typer.echo(f"{n} history events before {ts_str(cutoff)} deleted")


@app.command(short_help="Remove a NAT64 and its table; its history stays.")
def forget(
    nat: Annotated[str, typer.Argument(metavar="NAT", help="The NAT64's IPv4 address.",
                                       show_default=False)],
    db: DbOption = None,
) -> None:
    """Remove a NAT64 and its table from the database, so that it no longer counts
    against serve --max-nats; its history (the log's events) stays. The NAT64 is
    welcomed again as a new one if it comes back.

    Refused while a server owns the table: stop it first.
    """
    try:
        address = parse_ipv4(nat, "NAT")
    except UsageError as exc:
        fail(str(exc))
    with _Database(db, write=True, own="forget") as conn:
        try:
            entries, known = history.forget(conn, address)
        except history.NotKnown:
            fail(f"NAT64 {nat} is not known in {db_path(db)}", EXIT_DB)
    typer.echo(f"forgot NAT64 {ipv4_str(address)}: {entries} entries"
               + (" and its boot record" if known else "") + "; its history stays")


# ---------------------------------------------------------------- check

@app.command(short_help="Check a database without changing it.")
def check(db: DbOption = None) -> None:
    """Check a database without changing it: file header, schema version, tables
    and indexes, PRAGMA integrity_check. Safe while the server runs.

    Exit status 0 when healthy, 1 when anything is wrong (each finding on its
    own line) or the database is missing.
    """
    path = db_path(db)
    try:
        report = schema.check(path)
    except schema.DatabaseMissing as exc:
        fail(str(exc), EXIT_DB)
    except schema.DatabaseError as exc:
        fail(str(exc), 1)
    if not report.ok:
        for problem in report.problems:
            typer.echo(f"Error: {problem}", err=True)
        raise typer.Exit(1)
    facts = ", ".join(f"{k} {v}" for k, v in report.facts.items())
    typer.echo(f"ok: {path}: integrity ok, schema current; {facts}")


# ---------------------------------------------------------------- bench

@app.command(short_help="Load a server over loopback and report its speed.")
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


# ---------------------------------------------------------------- gateway, testbed
# The NAT64 side (nat64ho.gateway): a userspace NAT64 on a TUN device, and
# the namespaces to try it in.

@app.command(short_help="Run a userspace NAT64 on TUN whose ports come from handoff servers.")
def gateway(
    tun: Annotated[str, typer.Option(metavar="NAME", help="TUN device to attach to (created if "
                                     "missing; route the prefix and the pool address to it).")],
    pool: Annotated[str, typer.Option(metavar="IPV4", help="The pool address: the source of "
                                      "translated packets and of handoff datagrams.")],
    server: Annotated[list[str], typer.Option(
        metavar="ADDR:PORT", help="A handoff server; traffic to ADDR is translated with its table. "
             "Repeat for more hosts.")],
    prefix: Annotated[str, typer.Option(metavar="PREFIX/96", help="NAT64 prefix (RFC 6052).")]
        = "64:ff9b::/96",
    handoff_port: Annotated[str, typer.Option(
        metavar="N", help="Source port of handoff datagrams; keep it outside the servers' "
             "port range.")] = "1027",
    touch_interval: Annotated[float, typer.Option(
        metavar="SECONDS", help="How often the ports in use are TOUCHed (the servers' LRU "
             "order is this precise).", min=0.05, max=3600)] = 5.0,
) -> None:
    """Run a userspace stateful NAT64 whose port table lives in handoff servers.

    IPv6 packets to PREFIX::IPV4, where IPV4 has a handoff server, leave from
    POOL:PORT, PORT being what that server maps; packets to POOL:PORT return to
    the client the server names. Linux,
    root. SIGTERM: exit 0; SIGUSR1: log the counters.
    """
    from nat64ho.gateway import core, tun as tun_io

    try:
        net = ipaddress.IPv6Network(prefix, strict=True) if "/" in prefix else None
        if net is None or net.prefixlen != 96:
            raise UsageError(f"--prefix {prefix!r}: expected an IPv6 /96, e.g. 64:ff9b::/96")
        pool_v = parse_ipv4(pool, "--pool")
        hport = parse_port(handoff_port, "--handoff-port")
        servers = []
        for text in server:
            host, port = parse_listen(text, "--server")
            if ":" in host or port == 0:
                raise UsageError(f"--server {text!r}: expected IPV4:PORT, e.g. 192.0.2.1:6464")
            servers.append((ipaddress.IPv4Address(host).packed, port))
        if len({a for a, _ in servers}) != len(servers):
            raise UsageError("--server: one server per IPv4 address")
        if not tun or len(tun.encode()) > 15 or "/" in tun:
            raise UsageError(f"--tun {tun!r}: not an interface name (1-15 characters)")
    except ValueError:
        fail(f"--prefix {prefix!r}: not an IPv6 prefix")
    except UsageError as exc:
        fail(str(exc))
    gw = core.Gateway(net.network_address.packed[:12], pool_v.to_bytes(4, "big"), servers,
                      handoff_port=hport, touch_interval=touch_interval)
    banner = (f"tun {tun}, prefix {net}, pool {pool} (handoff from port {hport}), servers "
              + ", ".join(server) + f", boot id {gw.boot_id.hex()}")
    try:
        tun_io.run(gw, tun, banner)
    except OSError as exc:
        fail(f"--tun {tun}: {exc.strerror or exc}", 1)


testbed_app = typer.Typer(help="A NAT64 test bed in network namespaces (root): IPv6-only client, "
                          "gateway, IPv4 host with 'nat64ho serve' and services.",
                          short_help="Build or remove a NAT64 test bed in network namespaces.",
                          no_args_is_help=True)
app.add_typer(testbed_app, name="testbed")
TestbedName = Annotated[str, typer.Option("--name", metavar="NAME", help="Prefix of the "
                                          "namespaces: NAME-client, NAME-nat64, NAME-host.")]
TestbedState = Annotated[Path, typer.Option("--state", metavar="DIR", help="Database and logs.")]


@testbed_app.command("up")
def testbed_up(name: TestbedName = "nat64ho", state: TestbedState = Path("/tmp/nat64ho-testbed")) -> None:
    """Build the namespaces and start the server, the services and the gateway."""
    from nat64ho.gateway import testbed as tb

    try:
        tb.check_name(name)
    except tb.TestbedError as exc:
        fail(str(exc))
    if (why := tb.available()) is not None:
        fail(f"the test bed {why}", 1)
    try:
        bed = tb.up(name, state.absolute())
    except tb.TestbedError as exc:
        fail(str(exc), 1)
    typer.echo(f"""Test bed {name!r} is up; state in {bed.state}.
  client {tb.CLIENT6} (netns {bed.client}), NAT64 pool {tb.POOL} (netns {bed.nat64}),
  host {tb.HOST4} (netns {bed.host}): nat64ho serve :{tb.HANDOFF_PORT}, HTTP :{tb.HTTP_PORT}, echo :{tb.ECHO_PORT}
Try:
  ip netns exec {bed.client} curl http://[64:ff9b::{tb.HOST4}]:{tb.HTTP_PORT}/
  cat {bed.state}/services.out
  nat64ho who --db {bed.db} {tb.POOL}:PORT
Stop: nat64ho testbed down --name {name}""")


@testbed_app.command("down")
def testbed_down(name: TestbedName = "nat64ho", state: TestbedState = Path("/tmp/nat64ho-testbed")) -> None:
    """Stop everything in the test bed's namespaces and delete them (the state stays)."""
    from nat64ho.gateway import testbed as tb

    try:
        tb.check_name(name)
    except tb.TestbedError as exc:
        fail(str(exc))
    if (why := tb.available()) is not None:
        fail(f"the test bed {why}", 1)
    try:
        gone = tb.down(name, state)
    except tb.TestbedError as exc:
        fail(str(exc), 1)
    typer.echo(f"Test bed {name!r} " + ("removed." if gone else "was not up."))


@app.command(short_help="Talk to a server as a NAT64 would and print each answer.")
def probe(
    server_addr: Annotated[str, typer.Argument(
        metavar="SERVER", help="The server: IPV4 or IPV4:PORT (port 6464 if not given).",
        show_default=False)],
    map_: Annotated[Optional[list[str]], typer.Option(
        "--map", metavar="[IPV6]:PORT", help="Send a MAP for this client endpoint (repeat for "
             "more). Creates an entry, as a NAT64 would.", show_default=False)] = None,
    lookup: Annotated[Optional[list[str]], typer.Option(
        metavar="PORT", help="Send a LOOKUP for this NAT port (repeat for more).",
        show_default=False)] = None,
    touch: Annotated[Optional[list[str]], typer.Option(
        metavar="PORT[,PORT...]", help="Send a TOUCH of these NAT ports (repeat for more "
             "TOUCHes); only ports without an entry are answered.", show_default=False)] = None,
    source: Annotated[str, typer.Option(
        metavar="IPV4", help="Local address to send from: the server keeps one table per "
             "source address.")] = "0.0.0.0",
    timeout: Annotated[str, typer.Option(
        metavar="SECONDS", help="How long to wait for each answer.")] = "2",
) -> None:
    """Say HELLO to a server and confirm the session as a NAT64 does, then send each
    --map, then each --lookup, then each --touch, printing every answer decoded with
    its round-trip time.

    Exit status 0 when the server answered every HELLO, MAP and LOOKUP, 1 when
    one went unanswered, 2 for bad values. A probe is a new NAT64 boot for the
    source address: never probe from the address of a NAT64 in service.
    """
    from nat64ho import probe as p

    try:
        if ":" in server_addr:
            host, port = parse_listen(server_addr, "SERVER")
        else:
            host, port = parse_listen(f"{server_addr}:6464", "SERVER")
        if ipaddress.ip_address(host).version != 4 or port == 0:
            raise UsageError(f"SERVER {server_addr!r}: give an IPv4 address (and a port "
                             "1-65535): the protocol runs over IPv4")
        parse_ipv4(source, "--source")
        wait = parse_seconds(timeout, "--timeout") / 1e6
        if not 0 < wait <= 60:
            raise UsageError(f"--timeout {timeout!r}: expected seconds, above 0 and at most 60")
        maps = []
        for text in map_ or []:
            net, aport = parse_ipv6_target(text, "--map")
            if net.prefixlen != 128 or aport is None:
                raise UsageError(f"--map {text!r}: expected [IPV6]:PORT, e.g. '[2001:db8::1]:4000'")
            maps.append((net.network_address.packed, aport))
        lookups = [parse_port(x, "--lookup") for x in lookup or []]
        touches = []
        for text in touch or []:
            ports = [parse_port(x.strip(), "--touch") for x in text.split(",")]
            if len(ports) > 255:
                raise UsageError(f"--touch {text!r}: at most 255 ports in one TOUCH")
            touches.append(ports)
    except UsageError as exc:
        fail(str(exc))
    plan = p.Plan(maps, lookups, touches)

    def say(line: str) -> None:
        typer.echo(line)

    import asyncio

    try:
        ok = asyncio.run(p.run(host, port, source, plan, wait, say))
    except OSError as exc:
        fail(f"{host}:{port} from {source}: {exc.strerror or exc}", 1)
    except KeyboardInterrupt:
        raise typer.Exit(130)
    if not ok:
        raise typer.Exit(1)


def main() -> None:
    app(prog_name="nat64ho")
