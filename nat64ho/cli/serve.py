"""``serve``: the options of the handoff server, checked, as a server.Config."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Annotated

import typer

from nat64ho.cli.options import (
    SYNC_CHOICE,
    DbOption,
    Sync,
    UsageError,
    db_target,
    fail,
    parse_listen,
    parse_ports,
    parse_prefix4,
)
from nat64ho.storage import schema


def serve(
    db: DbOption = None,
    listen: Annotated[
        str,
        typer.Option(
            metavar="ADDR:PORT", envvar="NAT64HO_LISTEN", help="UDP address and port to listen on."
        ),
    ] = "0.0.0.0:6464",
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
        str,
        typer.Option(
            metavar="FIRST-LAST",
            help="NAT port range of each NAT64's table (announced in WELCOME).",
        ),
    ] = "1028-65535",
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
            min=0,
        ),
    ] = 0.0,
    hello_rate: Annotated[
        float,
        typer.Option(
            metavar="N",
            help="HELLOs per second accepted from one source address, with a burst of as many "
            "(0 = unlimited). A NAT64 says HELLO once per boot.",
            min=0,
        ),
    ] = 5.0,
    create_rate: Annotated[
        float,
        typer.Option(
            metavar="N",
            help="New entries per second per NAT64, with a burst of as many (0 = unlimited). "
            "At the default a full 64508-port table turns over in 65 s, faster than the 2 minutes "
            "a UDP mapping must live (RFC 4787): a NAT64 creating faster keeps nothing alive.",
            min=0,
        ),
    ] = 1000.0,
    request_rate: Annotated[
        float,
        typer.Option(
            metavar="N",
            help="Request messages (MAP, LOOKUP, TOUCH) per second per NAT64, with a burst "
            "of as many (0 = unlimited); beyond it requests get ERROR RATE_LIMITED, so one "
            "NAT64 cannot take the server from the others.",
            min=0,
        ),
    ] = 10_000.0,
    cookie_lifetime: Annotated[
        int,
        typer.Option(
            metavar="SECONDS",
            help="Cookies change every SECONDS and are accepted for one or two "
            "of these; a NAT64 holding an expired one says HELLO again (nothing is logged).",
            min=1,
        ),
    ] = 86400,
    sync: Annotated[
        Sync,
        typer.Option(
            metavar="full|normal",
            parser=SYNC_CHOICE,
            help="SQLite synchronous mode: 'full' survives power loss, 'normal' only crashes.",
        ),
    ] = Sync.FULL,
    cache_size: Annotated[
        int,
        typer.Option(
            metavar="N", help="Table entries kept in memory (all NAT64s together).", min=1
        ),
    ] = 100_000,
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
    keep_history: Annotated[
        float | None,
        typer.Option(
            metavar="DAYS",
            help="Delete history events older than this many days (current entries are never "
            "touched). Default: keep all.",
            min=0,
            show_default=False,
        ),
    ] = None,
    seal_every: Annotated[
        float,
        typer.Option(
            metavar="SECONDS",
            envvar="NAT64HO_SEAL_EVERY",
            help="Seal each closed period of this length into an immutable Parquet segment "
            "(SQLite: under the database's archive/; see docs/archive.md). 0: never.",
            min=0,
        ),
    ] = 3600.0,
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
            min=1,
        ),
    ] = 4096,
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
            metavar="N", help="IPFIX observation domain id in the messages (0-4294967295)."
        ),
    ] = 0,
    workers: Annotated[
        str,
        typer.Option(
            metavar="N|auto",
            help="Front-end processes, each serving the NAT64s steered to it by source "
            "address, all committing through one writer process; 'auto': one per CPU. "
            "Above 1: SQLite only, and not with --metrics or --ipfix.",
        ),
    ] = "1",
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
        host, port = parse_listen(listen)
        if ipaddress.ip_address(host).version == 6 and host not in ("::", "::0"):
            raise UsageError(
                f"--listen {listen!r}: the handoff protocol runs over IPv4 (NAT64s "
                "are IPv4 peers); give an IPv4 address, or [::] for all addresses "
                "of both families"
            )
        first, last = parse_ports(ports)
        prefixes = [parse_prefix4(p, "--allow") for p in allow or []]
        metrics_at = parse_listen(metrics, "--metrics") if metrics else None
        collectors = parse_collectors(ipfix or [], ipfix_domain)
        n_workers = parse_workers(workers)
        if n_workers > 1 and (metrics_at or collectors):
            raise UsageError(
                "--workers above 1 with --metrics or --ipfix: each would show one "
                "worker's share only; run one worker to use them"
            )
    except UsageError as exc:
        fail(str(exc))
    target = db_target(db)  # a URL that does not parse is a bad option too
    if n_workers > 1 and isinstance(target, str):
        fail(
            "--workers above 1 needs an SQLite table (its writer process commits for "
            "every worker); on PostgreSQL run one worker"
        )
    if check_config:
        typer.echo("ok: the options are valid")
        raise typer.Exit(0)
    if log_file is None:
        log_file = str(default_log(target))
    config = server.Config(
        db=target,
        host=host,
        port=port,
        log_file=log_file,
        first_port=first,
        last_port=last,
        allow=prefixes,
        min_idle=min_idle,
        hello_rate=hello_rate,
        create_rate=create_rate,
        request_rate=request_rate,
        cookie_lifetime=cookie_lifetime,
        sync=sync.value,
        cache_size=cache_size,
        keep_history_days=keep_history,
        seal_every=seal_every,
        archive=archive,
        metrics=metrics_at,
        max_nats=max_nats,
        standby=standby,
        ipfix=collectors,
        ipfix_domain=ipfix_domain,
        workers=n_workers,
    )
    try:
        server.run(config)
    except KeyboardInterrupt:
        # A Ctrl-C that lands while Python tears the loop down: still one line.
        fail("interrupted", 130)
    except schema.DatabaseError as exc:
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


def parse_workers(text: str) -> int:
    """``--workers``: a count from 1 to 64, or ``auto`` (the CPUs)."""
    if text == "auto":
        return max(1, len(os.sched_getaffinity(0)))
    try:
        n = int(text)
    except ValueError:
        n = 0
    if not 1 <= n <= 64:
        raise UsageError(f"--workers {text!r}: expected a number from 1 to 64, or 'auto'")
    return n


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
