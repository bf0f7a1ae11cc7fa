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

def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep:
        raise UsageError(f"--listen {text!r}: expected ADDR:PORT, e.g. 0.0.0.0:6464")
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise UsageError(f"--listen {text!r}: {host!r} is not an IP address") from None
    return host, parse_port(port, "--listen", allow_zero=True)


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
    listen: Annotated[str, typer.Option(metavar="ADDR:PORT", help="UDP address and port to listen on.")] = "0.0.0.0:6464",
    log_file: Annotated[Optional[str], typer.Option(
        "--log-file", metavar="PATH", help="Event log (Created/Deleted/Initialized lines); '-' for stdout. "
                           "Default: nat64ho.log beside the database.", show_default=False)] = None,
    ports: Annotated[str, typer.Option(
        metavar="FIRST-LAST", help="NAT port range of each NAT64's table (announced in WELCOME).")] = "1028-65535",
    allow: Annotated[Optional[list[str]], typer.Option(
        metavar="PREFIX", help="IPv4 prefix allowed to say HELLO; repeat for more. Default: any.",
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
    keep_history: Annotated[Optional[float], typer.Option(
        metavar="DAYS", help="Delete history events older than this many days (current entries are never "
             "touched). Default: keep all.", min=0, show_default=False)] = None,
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
        sync=sync, cache_size=cache_size, keep_history_days=keep_history,
    )
    try:
        server.run(config)
    except schema.DatabaseError as exc:
        fail(str(exc), 1)
    except OSError as exc:
        fail(f"{exc.strerror or exc} ({listen})" if exc.errno else str(exc), 1)


def main() -> None:
    app(prog_name="nat64ho")
