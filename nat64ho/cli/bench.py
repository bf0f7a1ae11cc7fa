"""``bench``: the options of the benchmark; the benchmark itself is the
nat64ho.bench package, imported only when the command runs."""

from __future__ import annotations

import ipaddress
from typing import Annotated

import typer

from nat64ho.cli.options import (
    SYNC_CHOICE,
    BenchMode,
    Sync,
    UsageError,
    choice,
    fail,
    number,
    parse_listen,
)
from nat64ho.storage import schema


def bench(
    mode: Annotated[
        BenchMode,
        typer.Option(
            metavar="create|lookup|mixed",
            parser=choice(BenchMode, "--mode"),
            help="create: new endpoints (durable answers); lookup: "
            "existing entries (cache hits); mixed: mostly LOOKUP/TOUCH, some MAP, a tenth "
            "new endpoints.",
        ),
    ] = BenchMode.CREATE,
    batch: Annotated[
        int,
        typer.Option(
            metavar="K",
            help="Messages per request datagram.",
            parser=number("--batch", 1, 60, whole=True),
        ),
    ] = 1,
    window: Annotated[
        int,
        typer.Option(
            metavar="N",
            help="Requests in flight per client process (closed loop), or at most "
            "in flight (open loop, with --rate).",
            parser=number("--window", 1, 4096, whole=True),
        ),
    ] = 32,
    rate: Annotated[
        float,
        typer.Option(
            metavar="R",
            help="Open loop: offer R messages/s over all clients. Default: closed loop.",
            parser=number("--rate", 0),
        ),
    ] = 0.0,
    duration: Annotated[
        float,
        typer.Option(
            metavar="S",
            help="Seconds measured (after a second of warm-up).",
            parser=number("--duration", 0.5, 3600),
        ),
    ] = 10.0,
    clients: Annotated[
        int,
        typer.Option(
            metavar="P", help="Client processes.", parser=number("--clients", 1, 64, whole=True)
        ),
    ] = 1,
    nats: Annotated[
        int,
        typer.Option(
            metavar="N",
            help="NAT64s, each from its own 127.1.x.y source address.",
            parser=number("--nats", 1, 4000, whole=True),
        ),
    ] = 1,
    entries: Annotated[
        int,
        typer.Option(
            metavar="N",
            help="lookup/mixed: entries created per NAT64 before measuring.",
            parser=number("--entries", 1, 65535, whole=True),
        ),
    ] = 20_000,
    server_addr: Annotated[
        str | None,
        typer.Option(
            "--server",
            metavar="ADDR:PORT",
            help="Drive this running server (loopback only). "
            "Default: start one on a temporary database.",
            show_default=False,
        ),
    ] = None,
    server_pid: Annotated[
        int | None,
        typer.Option(
            metavar="PID",
            help="With --server: its process id, to report its CPU and RSS.",
            parser=number("--server-pid", 1, whole=True),
            show_default=False,
        ),
    ] = None,
    sync: Annotated[
        Sync,
        typer.Option(
            metavar="full|normal",
            parser=SYNC_CHOICE,
            help="SQLite synchronous mode of the started server and of the SQLite ceiling.",
        ),
    ] = Sync.FULL,
    server_arg: Annotated[
        list[str] | None,
        typer.Option(
            metavar="ARG",
            help="Extra argument for the started 'nat64ho serve' (repeat), e.g. "
            "--server-arg=--cache-size=500000.",
            show_default=False,
        ),
    ] = None,
    db: Annotated[
        str | None,
        typer.Option(
            "--db",
            metavar="URL|PATH",
            help="Keep the started server's table in this PostgreSQL database "
            "(postgresql://…; a scratch database: the run writes to it). "
            "Default: a temporary SQLite file. With --server: that server's database, "
            "read to check that it holds no NAT64 but the benchmark's.",
            show_default=False,
        ),
    ] = None,
    yes: Annotated[
        bool,
        typer.Option(
            "--yes",
            "-y",
            help="With --server: write into its table without checking it, or "
            "although it holds other NAT64s.",
        ),
    ] = False,
    ceilings: Annotated[
        bool,
        typer.Option(
            "--ceilings/--no-ceilings", help="Also measure the UDP echo and raw SQLite ceilings."
        ),
    ] = True,
) -> None:
    """Load a handoff server over loopback and print throughput, latency, CPU and RSS
    beside the echo and SQLite ceilings of this machine, measured in the same run."""
    from nat64ho import bench as b

    try:
        address = None
        if server_addr is not None:
            address = parse_listen(server_addr)
            if not ipaddress.ip_address(address[0]).is_loopback or address[1] == 0:
                raise UsageError(
                    f"--server {server_addr!r}: give a loopback ADDR:PORT; the "
                    "benchmark floods what it drives"
                )
        if db is not None and address is None and not schema.is_postgres(db):
            raise UsageError(
                f"--db {db!r}: give a postgresql://… URL (the SQLite default is a temporary file)"
            )
        if address is not None and db is None and not yes:
            raise UsageError(
                f"--server {server_addr}: the run writes into its table; give the server's "
                "--db to check that it holds no other NAT64, or --yes"
            )
    except UsageError as exc:
        fail(str(exc))
    if address is not None and db is not None and not yes:
        _only_bench_nats(db, server_addr or "")
    cfg = b.BenchConfig(
        mode=mode.value,
        batch=batch,
        window=window,
        rate=rate,
        duration=duration,
        clients=clients,
        nats=nats,
        entries=entries,
        server=address,
        server_pid=server_pid,
        sync=sync.value,
        server_args=server_arg or [],
        ceilings=ceilings,
        db=db if address is None else None,
    )
    typer.echo(b.describe(cfg), err=True)
    try:
        report = b.run(cfg)
    except (RuntimeError, OSError) as exc:
        fail(str(exc), 1)
    typer.echo(report.format())


def _only_bench_nats(db: str, server: str) -> None:
    """Refuse a server whose table holds NAT64s other than the benchmark's:
    its entries would share their ports with the run's."""
    from nat64ho.bench import is_bench_nat
    from nat64ho.cli.database import Database
    from nat64ho.eventlog import ipv4_str
    from nat64ho.ops.queries import nat_addresses

    with Database(db) as conn:
        others = [n for n in nat_addresses(conn) if not is_bench_nat(n)]
    if others:
        named = ", ".join(ipv4_str(n) for n in others[:3])
        more = f" and {len(others) - 3} more" if len(others) > 3 else ""
        fail(
            f"--server {server}: its table holds NAT64s besides the benchmark's "
            f"({named}{more}); the run would write beside them: give --yes to do so anyway"
        )
