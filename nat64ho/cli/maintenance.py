"""``prune`` and ``check``: the commands that look after a database."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from nat64ho.cli.archive import archive_check
from nat64ho.cli.database import Database
from nat64ho.cli.options import (
    EXIT_DB,
    DbOption,
    UsageError,
    db_target,
    fail,
    parse_ipv4,
    parse_time,
)
from nat64ho.cli.render import Progress, interrupted
from nat64ho.eventlog import ipv4_str, ts_str
from nat64ho.ops import maintenance
from nat64ho.storage import schema


def prune(
    before: Annotated[
        str,
        typer.Option(
            metavar="TIME",
            help="Delete history events older than this (UTC unless a zone is "
            "given), e.g. 2024-01-01.",
            show_default=False,
        ),
    ],
    db: DbOption = None,
) -> None:
    """Delete old history events. Changes the database; current entries are never touched.

    Refused while a server owns the table (it prunes itself with serve --keep-history).
    """
    try:
        cutoff = parse_time(before, "--before")
    except UsageError as exc:
        fail(str(exc))
    with Database(db, write=True, own="prune") as conn:
        total = maintenance.prune_count(conn, cutoff) if sys.stderr.isatty() else None
        bar = Progress("prune", "events", total, show=bool(total))
        done = {"n": 0}

        def batch(n: int) -> None:
            done["n"] = n
            bar.update(n, n)

        try:
            n = maintenance.prune(conn, cutoff, on_batch=batch)
        except KeyboardInterrupt:
            bar.close()
            interrupted(
                f"{done['n']} history events before {ts_str(cutoff)} deleted so far "
                "(each batch is committed); run the same command again to finish"
            )
        finally:
            bar.close()
    typer.echo(f"{n} history events before {ts_str(cutoff)} deleted")


def forget(
    nat: Annotated[
        str, typer.Argument(metavar="NAT", help="The NAT64's IPv4 address.", show_default=False)
    ],
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
    with Database(db, write=True, own="forget") as conn:
        try:
            entries, known = maintenance.forget(conn, address)
        except maintenance.NotKnown:
            fail(f"NAT64 {nat} is not known in {schema.describe(db_target(db))}", EXIT_DB)
    typer.echo(
        f"forgot NAT64 {ipv4_str(address)}: {entries} entries"
        + (" and its boot record" if known else "")
        + "; its history stays"
    )


def check(
    db: DbOption = None,
    head: Annotated[
        str | None,
        typer.Option(
            metavar="HEX",
            help="A chain head printed earlier: fail unless the sealed history up to it "
            "is unchanged.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Check a database without changing it: file header, schema version, tables
    and indexes, PRAGMA integrity_check (on PostgreSQL: schema version, tables,
    columns and indexes, rows that do not decode). Safe while the server runs.

    Exit status 0 when healthy, 1 when anything is wrong (each finding on its
    own line) or the database is missing.
    """
    target = db_target(db)
    try:
        head_v = bytes.fromhex(head) if head is not None else None
    except ValueError:
        fail(f"--head {head!r}: not a hexadecimal chain value")
    try:
        if isinstance(target, str):
            from nat64ho.storage import pg_check

            report = pg_check.check(target)
        else:
            report = schema.check(target)
            if report.ok:
                archive_check(target, report, head_v)
    except schema.DatabaseMissing as exc:
        fail(str(exc), EXIT_DB)
    except schema.DatabaseError as exc:
        fail(str(exc), 1)
    if not report.ok:
        for problem in report.problems:
            typer.echo(f"Error: {problem}", err=True)
        raise typer.Exit(1)
    facts = ", ".join(f"{k} {v}" for k, v in report.facts.items())
    if isinstance(target, str):
        typer.echo(f"ok: {schema.shown(target)}: schema current, rows decode; {facts}")
    else:
        typer.echo(f"ok: {target}: integrity ok, schema current; {facts}")
