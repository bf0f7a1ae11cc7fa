"""``import``: log files into the history, with progress and a summary."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, BinaryIO

import typer

from nat64ho.cli.database import Database, create_database
from nat64ho.cli.options import EXIT_DB, DbOption, db_target, fail
from nat64ho.cli.render import Progress, interrupted
from nat64ho.ops import db as opsdb
from nat64ho.ops import importer
from nat64ho.storage import schema


@dataclass
class _State:
    done: int = 0  # octets of the files finished
    stream: BinaryIO | None = None  # the file being read
    lines: int = 0
    added: int = 0


#: SQLite page cache of an import, in KiB (the default is 2 MiB).
IMPORT_CACHE_KIB = 256 * 1024


def import_(
    files: Annotated[
        list[str],
        typer.Argument(
            metavar="FILE",
            help="Log files in the docs/protocol.md §6 format (this server's or the "
            "original handoff server's); .gz is decompressed; '-' reads stdin.",
            show_default=False,
        ),
    ],
    db: DbOption = None,
    rebuild_table: Annotated[
        bool,
        typer.Option(
            "--rebuild-table",
            help="Also replay the events into the current table (moving from "
            "another server): a port whose last event is a Created gets that entry, unless the "
            "table already has one for the port or the endpoint. Only with the server stopped: "
            "a running server keeps its free ports in memory.",
        ),
    ] = False,
    seal: Annotated[
        bool,
        typer.Option(
            "--seal",
            help="Write the events of closed hours straight into sealed segments, sorted and "
            "in bulk (the default once the history has segments); not with --rebuild-table.",
        ),
    ] = False,
) -> None:
    """Add log files to the history; creates the database if it is missing.

    Events already in the history are left alone, so importing a file twice adds
    nothing and an interrupted import is finished by running it again. A line
    that does not parse (or is longer than 4096 octets) is reported as
    FILE:LINE and skipped; the exit status is then 1 (0 when every line was taken).
    """
    if seal and rebuild_table:
        fail("--seal and --rebuild-table go separately: the table is rebuilt from the hot tier")
    for name in files:
        if name != "-" and not os.path.isfile(name):
            fail(f"{name!r}: no such file")
    path = db_target(db)
    created = None
    if not isinstance(path, str):
        if rebuild_table and opsdb.database_in_use(path):
            fail(
                f"{path}: another process has this database open (a running server?); "
                "stop it before --rebuild-table: a server keeps its free ports in memory",
                EXIT_DB,
            )
        if not path.exists():
            created = create_database(path)
    # On PostgreSQL a running server holds the owner lock, which
    # --rebuild-table asks for; the tables are made if the database has none.

    def bad(name: str, number: int, reason: str) -> None:
        if bar.bar is not None:
            bar.bar.console.print(
                f"{name}:{number}: skipped: {reason}", markup=False, highlight=False
            )
        else:
            typer.echo(f"{name}:{number}: skipped: {reason}", err=True)

    sizes = {name: os.path.getsize(name) for name in files if name != "-"}
    total = sum(sizes.values()) if "-" not in files else None
    state = _State()

    def logs() -> Iterator[tuple[str, BinaryIO]]:
        for name in files:
            stream = importer.open_log(name)
            state.stream = stream
            try:
                yield name, stream
            finally:
                if name != "-":
                    stream.close()
                state.done += sizes.get(name, 0)

    def progress(lines: int, added: int) -> None:
        state.lines, state.added = lines, added
        at = importer.log_position(state.stream) if state.stream is not None else None
        bar.update(None if total is None else state.done + (at or 0), lines)

    bar = Progress("import", "lines", total)
    try:
        with Database(
            db, write=True, own="import --rebuild-table" if rebuild_table else None, create=True
        ) as conn:
            if isinstance(path, str):
                created = getattr(conn, "created", 0) or None
            else:
                # New events land at random places in the address index; a cache
                # that holds its hot pages saves a read per row on a big history.
                conn.execute(f"PRAGMA cache_size = -{IMPORT_CACHE_KIB}")
            result = importer.import_logs(
                conn,
                logs(),
                bad,
                rebuild_table=rebuild_table,
                into_segments=seal,
                on_progress=progress,
                on_rebuild=bar.rebuilding,
            )
    except KeyboardInterrupt:
        bar.close()
        interrupted(
            f"{state.lines} lines read and {state.added} events added so far "
            "(each batch is committed); run the same command again to finish: "
            "events already imported are skipped"
        )
    finally:
        bar.close()
    summary = (
        f"{result.lines} lines read, {result.added} events added, "
        f"{result.lines - result.skipped - result.added} already present, "
        f"{result.skipped} skipped"
    )
    if rebuild_table:
        summary += f"; {result.entries} entries added to the table"
    if created is not None:
        made = "the tables in " if isinstance(path, str) else ""
        summary = f"created {made}{schema.describe(path)} (schema version {created}); " + summary
    typer.echo(summary, err=True)
    if result.skipped:
        raise typer.Exit(1)
