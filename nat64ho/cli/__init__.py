"""The ``nat64ho`` command line: the typer app, its commands in the order
``--help`` lists them, and :func:`main`.

Each command lives in the module of its group (serve, query, export,
importer, maintenance, bench, gateway, probe); shared option types and
parsers are in :mod:`.options`, output in :mod:`.render`. Every named library
error is turned, once, into one ``Error: …`` line and exit status 2 (1 for a
runtime failure); the parser's own complaints (a missing option, a number
out of range) take the same one-line form in :class:`_Group`. Nothing else
prints tracebacks for operator mistakes.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from nat64ho import __version__
from nat64ho.cli import (
    archive,
    bench,
    export,
    gateway,
    importer,
    maintenance,
    probe,
    query,
    serve,
)
from nat64ho.cli.options import fail, usage_help
from nat64ho.daemon import journal


class _Group(TyperGroup):
    """Every usage mistake as one ``Error:`` line (click prints a usage block).

    Values are checked by the ``parser=`` of each option (nat64ho.cli.options),
    which raise :class:`typer.TyperException` with the whole line; the
    framework's own complaints (a missing option, an unknown command) are
    TyperExceptions too."""

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        windows_expand_args: bool = True,
        **extra: Any,
    ) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, windows_expand_args, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, False, windows_expand_args, **extra)
        except typer.TyperException as exc:
            typer.echo(f"Error: {_one_line(exc.format_message())}", err=True)
            sys.exit(exc.exit_code)
        except typer.Abort:
            sys.exit(130)
        # Without standalone mode a typer.Exit comes back as its status.
        sys.exit(rv if isinstance(rv, int) else 0)


def _one_line(message: str) -> str:
    return " ".join(message.split())


app = typer.Typer(
    cls=_Group,
    help="NAT64 handoff server: the authoritative, durable connection table for NAT64s "
    "(protocol v1.2, docs/protocol.md).",
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    # typer's --install-completion and --show-completion (bash, zsh, fish).
    add_completion=True,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"nat64ho {__version__}")
        raise typer.Exit()


@app.callback(invoke_without_command=True)
def _root(
    ctx: typer.Context,
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="serve: log debug lines too.")
    ] = False,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="serve: log only warnings and errors.")
    ] = False,
) -> None:
    """NAT64 handoff server: the authoritative, durable connection table for NAT64s."""
    if verbose and quiet:
        fail("--verbose and --quiet: give one of them")
    journal.verbosity(verbose, quiet)
    usage_help(ctx)


# One place that lists every command, in the order of --help.
app.command(short_help="Run the handoff server on UDP; its tables in SQLite or PostgreSQL.")(
    serve.serve
)
app.command(short_help="Show the current entries of the tables.")(query.query)
app.command(short_help="Who held a NAT port when; or every port a client held.")(query.who)
app.command(short_help="Write the history as log lines, JSON lines or CSV.")(export.export)
app.command("import", short_help="Add log files to the history (creates the database).")(
    importer.import_
)
app.command(short_help="Per NAT64: table fill, HELLOs, recent Created/Deleted.")(query.stats)
app.command(short_help="Delete history events older than a time.")(maintenance.prune)
app.command(short_help="Remove a NAT64 and its table; its history stays.")(maintenance.forget)
app.command(short_help="Check a database without changing it.")(maintenance.check)
app.command(short_help="Move closed periods of the history into sealed Parquet segments.")(
    archive.seal
)
app.add_typer(archive.archive_app, name="archive")
app.command(short_help="Load a server over loopback and report its speed.")(bench.bench)
app.command(short_help="Run a userspace NAT64 on TUN whose ports come from handoff servers.")(
    gateway.gateway
)
app.command(short_help="Talk to a server as a NAT64 would and print each answer.")(probe.probe)
app.add_typer(gateway.testbed_app, name="testbed")


def main() -> None:
    journal.install()
    try:
        app(prog_name="nat64ho")
    except PermissionError as exc:
        # E.g. a user outside group nat64ho on the installed database.
        where = exc.filename or "a file"
        typer.echo(
            f"Error: {where}: permission denied (run as root or as a member of the file's group)",
            err=True,
        )
        sys.exit(1)
