"""``serve``: the options of the handoff server, checked, as a server.Config."""

from __future__ import annotations

import ipaddress
import os
import socket
from pathlib import Path
from typing import Annotated

import typer

from nat64ho.cli.options import (
    SYNC_CHOICE,
    DbOption,
    PortRange,
    Sync,
    UsageError,
    db_target,
    fail,
    number,
    parse_listen,
    parse_ports,
    parse_prefix4,
    parser,
)
from nat64ho.daemon.config import Config
from nat64ho.storage import owner, schema

#: The least --keep-history above 0: anything shorter deletes nearly the
#: whole history at start, which is a slip more often than a wish.
MIN_KEEP_DAYS = 1 / 24
DEFAULT_SYNC = Sync(Config.sync)
#: Databases refused at start: the lock file made beside them is removed.
REFUSED = (
    schema.NotOurDatabase,
    schema.NewerDatabase,
    schema.OutdatedDatabase,
    schema.DatabaseUnwritable,
)
DEFAULT_PORTS = PortRange(Config.first_port, Config.last_port)


def serve(
    ctx: typer.Context,
    db: DbOption = None,
    listen: Annotated[
        str,
        typer.Option(
            metavar="ADDR:PORT", envvar="NAT64HO_LISTEN", help="UDP address and port to listen on."
        ),
    ] = f"{Config.host}:{Config.port}",
    log_file: Annotated[
        str | None,
        typer.Option(
            "--log-file",
            metavar="PATH",
            help="Event log (Created/Deleted/Initialized lines); '-' for stdout. "
            "Default: nat64ho.log beside an SQLite database; with a PostgreSQL URL, "
            "$XDG_STATE_HOME/nat64ho/nat64ho.log (~/.local/state/nat64ho/nat64ho.log): "
            "each host keeps its own log.",
            show_default=False,
        ),
    ] = None,
    ports: Annotated[
        PortRange,
        typer.Option(
            metavar="FIRST-LAST",
            help="NAT port range of each NAT64's table (announced in WELCOME).",
            parser=parser(parse_ports, "--ports"),
            show_default=f"{Config.first_port}-{Config.last_port}",
        ),
    ] = DEFAULT_PORTS,
    allow: Annotated[
        list[str] | None,
        typer.Option(
            metavar="PREFIX",
            envvar="NAT64HO_ALLOW",
            help="IPv4 prefix allowed to say HELLO; repeat for more. Default: any.",
            show_default=False,
        ),
    ] = None,
    min_idle: Annotated[
        float,
        typer.Option(
            metavar="SECONDS",
            help="Seconds an entry must have been idle before it may be deleted to make room; "
            "a MAP that would need a younger one gets ERROR TABLE_FULL.",
            parser=number("--min-idle", 0),
        ),
    ] = Config.min_idle,
    hello_rate: Annotated[
        float,
        typer.Option(
            metavar="N",
            help="HELLOs answered per second, all sources together (each --workers process "
            "has its own budget; 0 = unlimited). Beyond it HELLOs are dropped at random, so a "
            "NAT64 retrying among forged ones gets through; a HELLO repeating a NAT64's "
            "recorded boot id has its own allowance of 5 a second (docs/protocol.md §7).",
            parser=number("--hello-rate", 0),
        ),
    ] = Config.hello_rate,
    create_rate: Annotated[
        float,
        typer.Option(
            metavar="N",
            help="New entries per second per NAT64, with a burst of as many (0 = unlimited). "
            "At the default a full 64508-port table turns over in 65 s, faster than the 2 minutes "
            "a UDP mapping must live (RFC 4787): a NAT64 creating faster keeps nothing alive.",
            parser=number("--create-rate", 0),
        ),
    ] = Config.create_rate,
    request_rate: Annotated[
        float,
        typer.Option(
            metavar="N",
            help="Requests per second per NAT64, a TOUCH of n ports counting n, with a burst "
            "of as many (0 = unlimited); beyond it requests get ERROR RATE_LIMITED, so one "
            "NAT64 cannot take the server from the others.",
            parser=number("--request-rate", 0),
        ),
    ] = Config.request_rate,
    cookie_lifetime: Annotated[
        int,
        typer.Option(
            metavar="SECONDS",
            help="Cookies change every SECONDS and are accepted for one or two "
            "of these; a NAT64 holding an expired one says HELLO again (nothing is logged).",
            parser=number("--cookie-lifetime", 1, whole=True),
        ),
    ] = Config.cookie_lifetime,
    sync: Annotated[
        Sync,
        typer.Option(
            metavar="full|normal",
            parser=SYNC_CHOICE,
            help="SQLite synchronous mode: 'full' survives power loss, 'normal' only crashes.",
        ),
    ] = DEFAULT_SYNC,
    cache_size: Annotated[
        int,
        typer.Option(
            metavar="N",
            help="Table entries kept in memory (all NAT64s together).",
            parser=number("--cache-size", 1, whole=True),
        ),
    ] = Config.cache_size,
    metrics: Annotated[
        str | None,
        typer.Option(
            metavar="ADDR:PORT",
            envvar="NAT64HO_METRICS",
            help="Serve Prometheus metrics over HTTP at http://ADDR:PORT/metrics "
            "(e.g. 127.0.0.1:9464). Default: off.",
            show_default=False,
        ),
    ] = None,
    api: Annotated[
        str | None,
        typer.Option(
            metavar="unix:PATH|ADDR:PORT",
            envvar="NAT64HO_API",
            help="Serve the read-only attribution API (GET /v1/client?nat=&port=, docs/api.md) "
            "on a Unix socket (made 0660) or, only where given, on TCP. Default: off.",
            show_default=False,
        ),
    ] = None,
    keep_history: Annotated[
        float | None,
        typer.Option(
            metavar="DAYS",
            help="Delete history events older than this many days (current entries are never "
            "touched); at least one hour (0.042). Default, or 0: keep all.",
            parser=number("--keep-history", 0),
            show_default=False,
        ),
    ] = Config.keep_history_days,
    seal_every: Annotated[
        float,
        typer.Option(
            metavar="SECONDS",
            envvar="NAT64HO_SEAL_EVERY",
            help="Seal each closed period of this length into an immutable Parquet segment "
            "(SQLite: under the database's archive/; PostgreSQL: in the database; see "
            "docs/archive.md). 0: never.",
            parser=number("--seal-every", 0),
        ),
    ] = Config.seal_every,
    archive: Annotated[
        Path | None,
        typer.Option(
            metavar="DIR",
            help="Where sealed segments go (SQLite), remembered in the database. "
            "Default: archive/ beside the database.",
            show_default=False,
        ),
    ] = None,
    max_nats: Annotated[
        int,
        typer.Option(
            metavar="N",
            help="Confirmed NAT64 addresses the server keeps tables for; a new one beyond "
            "this gets ERROR NOT_ALLOWED. Only a NAT64 that proved its address (its cookie came "
            "back) counts, so spoofed HELLOs take no place; 'nat64ho forget' frees one.",
            parser=number("--max-nats", 1, whole=True),
        ),
    ] = Config.max_nats,
    standby: Annotated[
        bool,
        typer.Option(
            "--standby",
            help="If another server owns the table, wait until it stops, then take "
            "over and serve (default: exit 1).",
        ),
    ] = False,
    ipfix: Annotated[
        list[str] | None,
        typer.Option(
            metavar="ADDR:PORT",
            help="Send each Created and Deleted event as an IPFIX record (NAT64 BIB "
            "create/delete) over UDP to this collector; repeat for more. "
            "Best effort: the history stays the record. Default: off.",
            show_default=False,
        ),
    ] = None,
    ipfix_domain: Annotated[
        int,
        typer.Option(
            metavar="N",
            help="IPFIX observation domain id in the messages (0-4294967295).",
            parser=parser(parse_ipfix_domain, "--ipfix-domain"),
        ),
    ] = Config.ipfix_domain,
    workers: Annotated[
        int,
        typer.Option(
            metavar="N|auto",
            help="Front-end processes, each serving the NAT64s steered to it by source "
            "address, all committing through one writer process; 'auto': one per CPU. "
            "Above 1: SQLite only, and not with --metrics or --ipfix.",
            parser=parser(parse_workers, "--workers"),
        ),
    ] = Config.workers,
    check_config: Annotated[
        bool,
        typer.Option(
            "--check-config",
            help="Only check the options (exit 0, or 2 with an Error: line); "
            "opens no database or socket. install.sh checks settings with it.",
        ),
    ] = False,
) -> None:
    """Run the handoff server: answer NAT64s over UDP and keep their tables in SQLite
    or PostgreSQL.

    SIGTERM or SIGINT: stop reading, commit what is in flight, exit 0.
    SIGHUP: reopen the log file (for logrotate).
    """
    from nat64ho.daemon import serve as server

    try:
        host, port = parse_listen(listen, _named(ctx, "listen", "NAT64HO_LISTEN"))
        if ipaddress.ip_address(host).version == 6 and host not in ("::", "::0"):
            raise UsageError(
                f"--listen {listen!r}: the handoff protocol runs over IPv4 (NAT64s "
                "are IPv4 peers); give an IPv4 address, or [::] for all addresses "
                "of both families"
            )
        prefixes = [parse_prefix4(p, _named(ctx, "allow", "NAT64HO_ALLOW")) for p in allow or []]
        metrics_at = (
            parse_listen(metrics, _named(ctx, "metrics", "NAT64HO_METRICS")) if metrics else None
        )
        collectors = parse_collectors(ipfix or [], ipfix_domain)
        api_at = parse_api(api) if api else None
        if workers > 1 and (metrics_at or collectors):
            raise UsageError(
                "--workers above 1 with --metrics or --ipfix: each would show one "
                "worker's share only; run one worker to use them"
            )
        if keep_history is not None and 0 < keep_history < MIN_KEEP_DAYS:
            raise UsageError(
                f"--keep-history {keep_history:g}: under an hour would delete nearly all "
                f"history; give at least {MIN_KEEP_DAYS:.3f} days, or 0 to keep all"
            )
        if workers > 1 and api_at:
            raise UsageError(
                "--workers above 1 with --api: each worker holds only its NAT64s' "
                "tables; run one worker to use the API"
            )
    except UsageError as exc:
        fail(str(exc))
    target = db_target(db)  # a URL that does not parse is a bad option too
    if workers > 1 and isinstance(target, str):
        fail(
            "--workers above 1 needs an SQLite table (its writer process commits for "
            "every worker); on PostgreSQL run one worker"
        )
    if check_config:
        if isinstance(target, Path) and target.is_dir():
            # What serve would say when it opens it (exit 1 there).
            fail(f"{target}: is a directory, not a database file")
        typer.echo("ok: the options are valid")
        raise typer.Exit(0)
    if metrics_at is not None:
        # Before the database is opened and "listening" is logged: a busy
        # port is one line here, not a server that starts and then stops.
        _port_free(metrics_at, "--metrics")
    if log_file is None:
        log_file = str(default_log(target))
    config = Config(
        db=target,
        host=host,
        port=port,
        log_file=log_file,
        first_port=ports[0],
        last_port=ports[1],
        allow=prefixes,
        min_idle=min_idle,
        hello_rate=hello_rate,
        create_rate=create_rate,
        request_rate=request_rate,
        cookie_lifetime=cookie_lifetime,
        sync=sync.value,
        cache_size=cache_size,
        keep_history_days=keep_history or None,  # 0: keep all, as 0 means unlimited elsewhere
        seal_every=seal_every,
        archive=archive,
        metrics=metrics_at,
        api=api_at,
        max_nats=max_nats,
        standby=standby,
        ipfix=collectors,
        ipfix_domain=ipfix_domain,
        workers=workers,
    )
    lock = None if isinstance(target, str) else owner.lock_path(target)
    stray = lock is not None and not lock.exists()
    try:
        server.run(config)
    except KeyboardInterrupt:
        # A Ctrl-C that lands while Python tears the loop down: still one line.
        fail("interrupted", 130)
    except schema.DatabaseError as exc:
        if lock is not None and stray and isinstance(exc, REFUSED):
            # The lock file was made for a database that is not ours to serve.
            lock.unlink(missing_ok=True)
        fail(str(exc), 1)
    except server.ListenError as exc:
        fail(exc.strerror or str(exc), 1)
    except OSError as exc:
        fail(f"{exc.filename or ''}{': ' if exc.filename else ''}{exc.strerror or exc}", 1)


def default_log(target: Path | str) -> Path:
    """The log beside an SQLite file; for PostgreSQL, in this host's state
    directory (the database is shared, the log is each server's own)."""
    if isinstance(target, Path):
        return target.parent / "nat64ho.log"
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "state"
    )
    return Path(state) / "nat64ho" / "nat64ho.log"


def _named(ctx: typer.Context, param: str, envvar: str) -> str:
    """The option as the operator gave it: from the environment, its variable."""
    source = ctx.get_parameter_source(param)
    return f"${envvar}" if source is not None and source.name == "ENVIRONMENT" else f"--{param}"


def _port_free(at: tuple[str, int], what: str) -> None:
    """Exit 1 with one line when the TCP address is taken (or not ours)."""
    family = socket.AF_INET6 if ":" in at[0] else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(at)
        except OSError as exc:
            fail(f"{what} {at[0]}:{at[1]}: {exc.strerror or exc}", 1)


def parse_api(text: str) -> tuple[str, int] | str:
    """``--api``: ``unix:PATH`` (absolute or relative), or ADDR:PORT for TCP."""
    if text.startswith("unix:"):
        path = text[5:]
        if not path or "\0" in path or len(os.fsencode(path)) > 107:
            raise UsageError(f"--api {text!r}: expected unix:PATH (at most 107 octets)")
        return path
    return parse_listen(text, "--api")


def parse_workers(text: str, what: str = "--workers") -> int:
    """``--workers``: a count from 1 to 64, or ``auto`` (the CPUs)."""
    if text == "auto":
        return max(1, len(os.sched_getaffinity(0)))
    try:
        n = int(text)
    except ValueError:
        n = 0
    if not 1 <= n <= 64:
        raise UsageError(f"{what} {text!r}: expected a number from 1 to 64, or 'auto'")
    return n


def parse_ipfix_domain(text: str, what: str) -> int:
    if not text.isdigit() or int(text) > 0xFFFFFFFF:
        raise UsageError(f"{what} {text}: not a 32-bit unsigned number (0-4294967295)")
    return int(text)


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
