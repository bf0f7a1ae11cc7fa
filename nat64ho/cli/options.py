"""What the commands share about their input: the option types, the
parsers that spell and check each kind of value one way, the fixed choices
as Enums, and the one-line error with its exit status."""

from __future__ import annotations

import datetime as dt
import enum
import ipaddress
import math
import os
import re
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, NamedTuple, NoReturn

import typer

from nat64ho.cli import render
from nat64ho.daemon.clock import wall_us
from nat64ho.eventlog import ts_from_datetime
from nat64ho.storage import schema

#: Exit status for bad input (as click does for usage errors).
EXIT_USAGE = 2


class UsageError(Exception):
    """Bad operator input; the message names the value."""


def fail(message: str, status: int = EXIT_USAGE) -> NoReturn:
    typer.echo(f"Error: {message}", err=True)
    raise typer.Exit(status)


def usage_help(ctx: typer.Context) -> None:
    """A group's callback: no command given is a usage mistake; the help goes
    to stderr, exit 2."""
    if ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help(), err=True)
        raise typer.Exit(EXIT_USAGE)


class BadValue(typer.TyperException):
    """A value a typer ``parser=`` rejects while reading the command line:
    the same one line and exit status as a :class:`UsageError` found later
    (a ValueError would come out in the framework's validation wording)."""

    exit_code = EXIT_USAGE


def parser(parse: Callable[[str, str], object], option: str) -> Callable[[str], object]:
    """``parse(text, option)`` as a typer ``parser=``: a value that is already
    parsed (a default) passes, a bad one is one ``Error:`` line."""

    def run(value: object) -> object:
        if not isinstance(value, str):
            return value
        try:
            return parse(value, option)
        except UsageError as exc:
            raise BadValue(str(exc)) from None

    return run


def number(
    option: str, low: float, high: float | None = None, *, whole: bool = False
) -> Callable[[str], object]:
    """A typer ``parser=`` for a number from ``low`` to ``high``: the range in
    the error line, not in --help (the help text says it in words)."""
    kind = "a whole number" if whole else "a number"
    show = "{:d}" if whole else "{:g}"
    span = show.format(low) + (" or more" if high is None else " to " + show.format(high))

    def parse(text: str, what: str) -> float:
        try:
            value: float = int(text) if whole else float(text)
        except ValueError:
            value = float("nan")
        if not (math.isfinite(value) and low <= value and (high is None or value <= high)):
            raise UsageError(f"{what} {text!r}: expected {kind}, {span}")
        return value

    return parser(parse, option)


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


NoHeadersOption = Annotated[
    bool,
    typer.Option(
        "--no-headers",
        callback=render.set_headers,
        help="Tables and CSV without their header line (for scripts).",
    ),
]


# ---------------------------------------------------------------- parsers
# Shared by every command so that a value is spelled and checked one way.


class Endpoint(NamedTuple):
    host: str
    port: int


def parse_listen(text: str, what: str = "--listen") -> Endpoint:
    host, sep, port = text.rpartition(":")
    if not sep:
        raise UsageError(f"{what} {text!r}: expected ADDR:PORT, e.g. 127.0.0.1:6464")
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise UsageError(f"{what} {text!r}: {host!r} is not an IP address") from None
    return Endpoint(host, parse_port(port, what, allow_zero=True))


def parse_port(text: str, what: str, *, allow_zero: bool = False) -> int:
    # isascii: str.isdigit also takes digits such as '²' that int() refuses.
    if (
        not (text.isascii() and text.isdigit())
        or not (0 if allow_zero else 1) <= int(text) <= 65535
    ):
        raise UsageError(f"{what} {text!r}: not a port number (1-65535)")
    return int(text)


class PortRange(NamedTuple):
    first: int
    last: int


def parse_ports(text: str, what: str = "--ports") -> PortRange:
    first, sep, last = text.partition("-")
    if not sep:
        raise UsageError(f"{what} {text!r}: expected FIRST-LAST, e.g. 1028-65535")
    a, b = parse_port(first, what), parse_port(last, what)
    if a > b:
        raise UsageError(f"{what} {text!r}: first port is above last port")
    return PortRange(a, b)


def parse_ipv4(text: str, what: str) -> int:
    try:
        return int(ipaddress.IPv4Address(text))
    except ValueError:
        raise UsageError(f"{what} {text!r}: not an IPv4 address") from None


def parse_prefix4(text: str, what: str) -> ipaddress.IPv4Network:
    try:
        net = ipaddress.IPv4Network(text, strict=False)
    except ValueError:
        raise UsageError(f"{what} {text!r}: not an IPv4 address or prefix") from None
    host = ipaddress.IPv4Interface(text).ip if "/" in text else net.network_address
    if host != net.network_address:
        # 192.0.2.7/24 is a typo for one address as often as for its network.
        raise UsageError(
            f"{what} {text!r}: host bits set; write {net} for that network, "
            f"or {host} for the one address"
        )
    return net


#: A time relative to now, as journalctl and nfdump take it: -1h, +30min,
#: -1h30min, "2d ago".
_RELATIVE = re.compile(r"([+-]?)((?:\d+(?:\.\d+)?\s*[a-z]+\s*)+?)(\s+ago)?")
_UNIT = re.compile(r"(\d+(?:\.\d+)?)\s*([a-z]+)\s*")
_UNIT_US = {
    **dict.fromkeys(("us", "usec"), 1),
    **dict.fromkeys(("ms", "msec"), 1000),
    **dict.fromkeys(("s", "sec", "secs", "second", "seconds"), 1_000_000),
    **dict.fromkeys(("m", "min", "mins", "minute", "minutes"), 60_000_000),
    **dict.fromkeys(("h", "hr", "hour", "hours"), 3_600_000_000),
    **dict.fromkeys(("d", "day", "days"), 86_400_000_000),
    **dict.fromkeys(("w", "week", "weeks"), 7 * 86_400_000_000),
}
_DAYS = {"today": 0, "yesterday": -1, "tomorrow": 1}


def parse_time(text: str, what: str) -> int:
    """Microseconds since the epoch from ``YYYY-MM-DD[ HH:MM[:SS[.ffffff]]]`` or
    ISO 8601 (``T``, ``Z``, offsets), without a zone in UTC like the log; or
    as journalctl takes it: ``now``, ``today``, ``yesterday`` (midnight UTC),
    ``-1h``, ``+30min``, ``2d ago``."""
    t = text.strip().lower()
    now = wall_us()
    if t == "now":
        return now
    if t in _DAYS:
        midnight = now - now % 86_400_000_000
        return midnight + _DAYS[t] * 86_400_000_000
    rel = _RELATIVE.fullmatch(t)
    if rel and (rel[1] or rel[3]) and not (rel[1] and rel[3]):
        total = 0.0
        for amount, unit in _UNIT.findall(rel[2]):
            if unit not in _UNIT_US:
                break
            total += float(amount) * _UNIT_US[unit]
        else:
            return now + round(total) * (1 if rel[1] == "+" else -1)
    t = text.strip()
    if t.endswith(("Z", "z")):
        t = t[:-1] + "+00:00"
    try:
        when = dt.datetime.fromisoformat(t)
    except ValueError:
        raise UsageError(
            f"{what} {text!r}: not a time (use 'YYYY-MM-DD HH:MM:SS' in UTC, ISO 8601, "
            "'now', 'yesterday', or -1h, -2d)"
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
    """``--db`` as a backend takes it: a PostgreSQL URL as given, else a path.
    A URL of another scheme is refused: as a path it would start a second,
    empty table (a typo such as postgressql:// must not split the brain)."""
    if db is None:
        env = os.environ.get("NAT64HO_DB")
        if not env:
            return schema.default_db_path()
        db, what = env, "$NAT64HO_DB"
    else:
        what = "--db"
    if schema.is_postgres(db):
        return _valid_url(db, what)
    scheme = _SCHEME.match(db)
    if scheme:
        fail(
            f"{what} {schema.shown(db)!r}: unknown URL scheme {scheme[1]!r}; a PostgreSQL "
            "database is postgresql://…, an SQLite database a file path"
        )
    path = Path(db)
    if path.name in ("", ".", ".."):
        fail(
            f"{what} {db!r}: not a file name; give the database file, e.g. /var/lib/nat64ho/table.db"
        )
    return path


#: Anything that looks like a URL: ``scheme://``.
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")


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


class IPv6Target(NamedTuple):
    net: ipaddress.IPv6Network
    port: int | None  #: the client port, if one was given


def parse_ipv6_target(text: str, what: str) -> IPv6Target:
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
        return IPv6Target(ipaddress.IPv6Network(body, strict=False), port)
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
