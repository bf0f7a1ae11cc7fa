"""What the commands share about their input: the option types, the
parsers that spell and check each kind of value one way, the fixed choices
as Enums, and the one-line error with its exit status."""

from __future__ import annotations

import datetime as dt
import enum
import ipaddress
import os
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from nat64ho.eventlog import ts_from_datetime
from nat64ho.storage import schema

try:  # typer raises the exceptions of the click it carries
    from typer._click.exceptions import ClickException, NoArgsIsHelpError
except ImportError:  # typer releases that depend on click instead
    # Only that fallback needs click, which these typer releases do not install.
    from click.exceptions import (  # type: ignore[import-not-found, no-redef]
        ClickException,
        NoArgsIsHelpError,
    )

__all__ = ["ClickException", "NoArgsIsHelpError"]


#: Exit status for bad input (as click does for usage errors).
EXIT_USAGE = 2


class UsageError(Exception):
    """Bad operator input; the message names the value."""


def fail(message: str, status: int = EXIT_USAGE) -> NoReturn:
    typer.echo(f"Error: {message}", err=True)
    raise typer.Exit(status)


class BadValue(ClickException):
    """A value the parser rejects while reading the command line: the same
    one line and exit status as a :class:`UsageError` found later."""

    exit_code = EXIT_USAGE


# ---------------------------------------------------------------- choices


class TableFormat(enum.StrEnum):
    TABLE = "table"
    JSON = "json"
    CSV = "csv"


class ExportFormat(enum.StrEnum):
    LOG = "log"
    JSONL = "jsonl"
    CSV = "csv"


class Sync(enum.StrEnum):
    FULL = "full"
    NORMAL = "normal"


class BenchMode(enum.StrEnum):
    CREATE = "create"
    LOOKUP = "lookup"
    MIXED = "mixed"


def choice(
    kind: type[enum.StrEnum], option: str, expected: str | None = None
) -> Callable[[str], enum.StrEnum]:
    """A parser for an option whose values are the members of ``kind``."""
    expected = expected or "expected one of " + ", ".join(m.value for m in kind)

    def parse(value: str | enum.StrEnum) -> enum.StrEnum:
        if isinstance(value, kind):
            return value  # a default
        try:
            return kind(value)
        except ValueError:
            raise BadValue(f"{option} {value!r}: {expected}") from None

    return parse


SYNC_CHOICE = choice(Sync, "--sync", "expected 'full' or 'normal'")

FormatOption = Annotated[
    TableFormat,
    typer.Option(
        "--format",
        metavar="table|json|csv",
        parser=choice(TableFormat, "--format"),
        help="table: aligned, with a header; json: one array of objects with fixed keys; "
        "csv: with a header row.",
    ),
]


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
    # isascii: str.isdigit also takes digits such as '²' that int() refuses.
    if (
        not (text.isascii() and text.isdigit())
        or not (0 if allow_zero else 1) <= int(text) <= 65535
    ):
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
        raise UsageError(
            f"{what} {text!r}: not a time (use 'YYYY-MM-DD HH:MM:SS' in UTC, or ISO 8601)"
        ) from None
    try:
        # Its offset may carry it out of the years 1-9999, which the answer
        # (printed in UTC) could not show.
        when.astimezone(dt.UTC)
    except OverflowError:
        raise UsageError(f"{what} {text!r}: out of range (years 1 to 9999 in UTC)") from None
    return ts_from_datetime(when)


DbOption = Annotated[
    str | None,
    typer.Option(
        "--db",
        metavar="PATH|URL",
        help="The table's database: an SQLite file, or postgresql://… for a "
        "PostgreSQL database shared by several hosts. Default: $NAT64HO_DB, else "
        "~/.local/share/nat64ho/table.db ($XDG_DATA_HOME).",
        show_default=False,
    ),
]


def db_target(db: str | None) -> Path | str:
    """``--db`` as a backend takes it: a PostgreSQL URL as given, else a path."""
    if db is None:
        env = os.environ.get("NAT64HO_DB")
        if env and schema.is_postgres(env):
            return _valid_url(env, "$NAT64HO_DB")
        return schema.default_db_path()
    return _valid_url(db, "--db") if schema.is_postgres(db) else Path(db)


def _valid_url(url: str, what: str) -> str:
    """A PostgreSQL URL that parses, or one ``Error:`` line (a URL that does
    not would otherwise fail deep inside the first command that shows it)."""
    try:
        urllib.parse.urlsplit(url)
    except ValueError as exc:
        fail(f"{what} {schema.shown(url)}: not a valid URL ({exc})")
    return url


#: The one exit status for a database that cannot be used (missing, busy,
#: foreign, newer); bad values on the command line get EXIT_USAGE.
EXIT_DB = 1


def parse_nat_port(text: str, what: str) -> tuple[int, int]:
    """``192.0.2.9:47102``."""
    host, sep, port = text.rpartition(":")
    try:
        if not sep:
            raise UsageError("expected NAT:PORT")
        return parse_ipv4(host, what), parse_port(port, what)
    except UsageError:
        raise UsageError(
            f"{what} {text!r}: expected NAT:PORT with an IPv4 address and a port "
            "1-65535, e.g. 192.0.2.9:47102"
        ) from None


def parse_ipv6_target(text: str, what: str) -> tuple[ipaddress.IPv6Network, int | None]:
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
        raise UsageError(
            f"{what} {text!r}: not an IPv6 address, [IPV6]:PORT or IPV6/LEN prefix"
        ) from None


def parse_seconds(text: str, what: str) -> int:
    """Non-negative seconds (a fraction allowed) as microseconds."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 366 * 86400:
        raise UsageError(f"{what} {text!r}: expected seconds, 0 to 31622400, e.g. 60")
    return round(value * 1_000_000)


#: The highest sequence number: both backends keep it in a signed 64-bit integer.
SEQ_MAX = 2**63 - 1


def parse_seq(text: str, what: str) -> int:
    if not (text.isascii() and text.isdigit()):
        raise UsageError(f"{what} {text!r}: not a sequence number (the 'seq' of --format jsonl)")
    if int(text) > SEQ_MAX:
        raise UsageError(f"{what} {text!r}: out of range (a sequence number is at most {SEQ_MAX})")
    return int(text)
