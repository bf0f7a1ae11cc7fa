"""``prune``, ``forget`` and ``check``: the commands that look after a database;
the two that delete say what they would remove and ask first."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from nat64ho.cli.archive import archive_check
from nat64ho.cli.database import Database
from nat64ho.cli.options import (
    EXIT_DB,
    DbOption,
    db_target,
    fail,
    parse_ipv4,
    parse_time,
    parser,
)
from nat64ho.cli.render import Progress, interrupted
from nat64ho.daemon.clock import wall_us
from nat64ho.eventlog import ipv4_str, ts_str
from nat64ho.ops import db as opsdb
from nat64ho.ops import maintenance
from nat64ho.storage import schema

DryRun = Annotated[
    bool,
    typer.Option("--dry-run", help="Only say what would be removed; change nothing."),
]
Yes = Annotated[
    bool,
    typer.Option(
        "--yes",
        "-y",
        help="Do not ask before changing the database (needed when stdin is not a terminal).",
    ),
]


def off_terminal_needs_yes(yes: bool, dry_run: bool) -> None:
    """Off a terminal a destructive command needs --yes (a script must say it
    means it): checked before the database is even read."""
    if not (yes or dry_run) and not sys.stdin.isatty():
        fail(
            "this changes the database: give --yes to go ahead, "
            "or --dry-run to see what it would do"
        )


def ask(question: str) -> None:
    """On a terminal: go on only if the operator says yes; else nothing changes (exit 1)."""
    if not typer.confirm(question, default=False, err=True):
        fail("nothing changed", EXIT_DB)


def prune(
    before: Annotated[
        int,
        typer.Option(
            metavar="TIME",
            parser=parser(parse_time, "--before"),
            help="Delete history events older than this (UTC unless a zone is "
            "given; or relative: -30d), e.g. 2024-01-01. Not in the future.",
            show_default=False,
        ),
    ],
    db: DbOption = None,
    dry_run: DryRun = False,
    yes: Yes = False,
) -> None:
    """Delete old history events. Changes the database; current entries are never touched.

    Asks first on a terminal; elsewhere needs --yes. Refused while a server
    owns the table (it prunes itself with serve --keep-history).
    """
    if before > wall_us():
        # A date slip (2062 for 2026) would delete the whole history.
        fail(
            f"--before {ts_str(before)}: in the future; prune deletes events older than a past time"
        )
    off_terminal_needs_yes(yes, dry_run)
    if dry_run or not yes:
        with Database(db) as conn:
            total = maintenance.prune_count(conn, before)
        if dry_run:
            typer.echo(f"would delete {total} history events before {ts_str(before)}")
            return
        ask(f"Delete {total} history events before {ts_str(before)}?")
    with Database(db, write=True, own="prune") as conn:
        todo = maintenance.prune_count(conn, before) if sys.stderr.isatty() else None
        bar = Progress("prune", "events", todo, show=bool(todo))
        done = {"n": 0}

        def batch(n: int) -> None:
            done["n"] = n
            bar.update(n, n)

        try:
            n = maintenance.prune(conn, before, on_batch=batch)
        except KeyboardInterrupt:
            bar.close()
            interrupted(
                f"{done['n']} history events before {ts_str(before)} deleted so far "
                "(each batch is committed); run the same command again to finish"
            )
        finally:
            bar.close()
    typer.echo(f"{n} history events before {ts_str(before)} deleted")


def forget(
    nat: Annotated[
        int,
        typer.Argument(
            metavar="NAT",
            help="The NAT64's IPv4 nat.",
            parser=parser(parse_ipv4, "NAT"),
            show_default=False,
        ),
    ],
    db: DbOption = None,
    dry_run: DryRun = False,
    yes: Yes = False,
) -> None:
    """Remove a NAT64 and its table from the database, so that it no longer counts
    against serve --max-nats; its history (the log's events) stays. The NAT64 is
    welcomed again as a new one if it comes back.

    Asks first on a terminal; elsewhere needs --yes. Refused while a server
    owns the table: stop it first.
    """
    off_terminal_needs_yes(yes, dry_run)
    if dry_run or not yes:
        with Database(db) as conn:
            entries, known = maintenance.forget_count(conn, nat)
        if not entries and not known:
            fail(f"NAT64 {ipv4_str(nat)} is not known in {schema.describe(db_target(db))}", EXIT_DB)
        what = f"NAT64 {ipv4_str(nat)}: {entries} entries" + (
            " and its boot record" if known else ""
        )
        if dry_run:
            typer.echo(f"would forget {what}; its history stays")
            return
        ask(f"Forget {what}?")
    with Database(db, write=True, own="forget") as conn:
        try:
            entries, known = maintenance.forget(conn, nat)
        except maintenance.NotKnown:
            fail(f"NAT64 {ipv4_str(nat)} is not known in {schema.describe(db_target(db))}", EXIT_DB)
    typer.echo(
        f"forgot NAT64 {ipv4_str(nat)}: {entries} entries"
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
        report = opsdb.check(target)
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
    typer.echo(f"ok: {schema.describe(target)}: {report.passed}; {facts}")
