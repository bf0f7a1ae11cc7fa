"""``seal`` and ``archive ls|get``: the sealed tier of the history, from the
command line."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Annotated

import typer

from nat64ho.archive import catalog
from nat64ho.archive import seal as sealing
from nat64ho.cli.database import Database
from nat64ho.cli.options import EXIT_DB, DbOption, fail, number, parse_time, parser
from nat64ho.daemon.config import Config
from nat64ho.eventlog import ts_str
from nat64ho.ops import db as opsdb
from nat64ho.ops.db import Conn
from nat64ho.storage import schema

archive_app = typer.Typer(
    help="The sealed history: list its segments, copy them out as Parquet files.",
    short_help="List the sealed segments of the history or copy them out.",
    no_args_is_help=True,
    rich_markup_mode=None,
)

#: seal --period: serve --seal-every's default, one segment per hour.
DEFAULT_PERIOD_S = int(Config.seal_every)

ArchiveOption = Annotated[
    str | None,
    typer.Option(
        "--archive",
        metavar="DIR",
        help="Where segment files go (SQLite), remembered in the database. "
        "Default: archive/ beside the database. PostgreSQL keeps them in the database.",
        show_default=False,
    ),
]


def seal(
    db: DbOption = None,
    archive: ArchiveOption = None,
    period: Annotated[
        int,
        typer.Option(
            metavar="SECONDS",
            help="Length of a period: one segment each.",
            parser=number("--period", 1, whole=True),
        ),
    ] = DEFAULT_PERIOD_S,
    before: Annotated[
        int | None,
        typer.Option(
            metavar="TIME",
            parser=parser(parse_time, "--before"),
            help="Seal only periods that end by this time. Default: the start of the "
            "current period (every closed one).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Move the history's closed periods from the database into sealed, chained
    Parquet segments. Refused while a server owns the table (it seals itself with
    serve --seal-every)."""
    period_us = period * 1_000_000
    until = before
    now = time.time_ns() // 1000
    cutoff = sealing.period_start(now, period_us)
    if until is not None:
        cutoff = min(cutoff, until)
    with Database(db, write=True, own="seal") as conn:
        if archive is not None:
            catalog.use_dir(conn, Path(archive))
        sealing.remove_orphans(conn)
        made = sealing.seal(conn, before=cutoff, period_us=period_us, alone=True)
        events = sum(s.events for s in made)
        size = sum(s.size for s in made)
        head = catalog.segments(conn)[-1].chain.hex() if made else None
    if not made:
        typer.echo(f"nothing to seal before {ts_str(cutoff)}")
        return
    typer.echo(
        f"{len(made)} segments sealed: {events} events, {size} bytes "
        f"({size / events:.1f} bytes/event); chain head {head}"
    )


@archive_app.command("ls")
def ls(db: DbOption = None) -> None:
    """List the segments: number, period, events, bytes, SHA-256; pruned ones as such."""
    with Database(db) as conn:
        segs = catalog.segments(conn)
    typer.echo(f"{'n':>6}  {'from':26}  {'to':26}  {'events':>10}  {'bytes':>10}  sha256")
    for s in segs:
        digest = s.sha256.hex() + ("  (pruned)" if s.pruned is not None else "")
        typer.echo(
            f"{s.n:>6}  {ts_str(s.ts_lo):26}  {ts_str(s.ts_hi):26}  {s.events:>10}  "
            f"{s.size:>10}  {digest}"
        )


@archive_app.command("get")
def get(
    directory: Annotated[
        Path,
        typer.Argument(metavar="DIR", help="Where to copy the segments to.", show_default=False),
    ],
    db: DbOption = None,
) -> None:
    """Copy every live segment into DIR as a plain Parquet file, each checked
    against its recorded SHA-256."""
    from nat64ho.archive import segment

    with Database(db) as conn:
        segs = catalog.segments(conn, live=True)
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            fail(f"{directory}: cannot be created ({exc.strerror or exc})", EXIT_DB)
        for s in segs:
            _copy_out(conn, s, directory / s.file)
            if segment.file_digest(directory / s.file) != s.sha256:
                fail(f"segment {s.n} ({s.file}): its SHA-256 differs from the recorded one", 1)
    typer.echo(f"{len(segs)} segments copied to {directory}")


def _copy_out(conn: Conn, s: catalog.Segment, target: Path) -> None:
    """Segment ``s`` as the file ``target``: copied from its file, or
    written from its octets in the database."""
    try:
        if catalog.in_database(conn):
            octets = catalog.data(conn, s.n)
            if octets is None:
                fail(f"segment {s.n} ({s.file}): its data is missing from the database", 1)
            target.write_bytes(octets)
        else:
            shutil.copyfile(catalog.archive_dir(conn) / s.file, target)
    except OSError as exc:
        fail(f"segment {s.n}: cannot be copied ({exc.strerror or exc})", EXIT_DB)


def archive_check(db: Path | str, report: schema.CheckReport, head: bytes | None) -> None:
    """``check``'s part for the sealed tier: findings and facts go in ``report``.
    Files of interrupted seals are removed when no other process owns the table
    (a seal in flight has one too)."""
    from nat64ho.archive import verify  # pyarrow, for the segment files
    from nat64ho.storage import owner

    conn = opsdb.connect(db, name="nat64ho check")
    try:
        verdict = verify.verify(conn, head)
        stray = sealing.orphans(conn)
        if stray:
            try:
                release = conn.take_table("check")
            except owner.TableOwned:
                report.facts["unrecorded segment files (a seal in flight?)"] = len(stray)
            else:
                stray = sealing.remove_orphans(conn)
                release()
                report.facts["unrecorded segment files removed"] = len(stray)
    finally:
        conn.close()
    report.problems += verdict.problems
    report.facts.update(verdict.facts)
