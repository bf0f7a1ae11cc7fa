"""``check`` on PostgreSQL: the schema version, every table, column and
index the migrations make, and the rows the code could not decode, read in
a read-only session (see :func:`nat64ho.storage.schema.check` for SQLite)."""

from __future__ import annotations

import asyncio

import asyncpg

from nat64ho.storage import declared, pg_schema
from nat64ho.storage.schema import (
    CheckReport,
    DatabaseError,
    NewerDatabase,
    NotOurDatabase,
    OutdatedDatabase,
    shown,
)

# Rows whose values the code cannot decode although PostgreSQL's types let
# them in (SQLite's check asks for types; here the types hold, the ranges
# and sizes may not).
_BAD_ROWS = (
    (
        "SELECT nat, port FROM entry WHERE nat NOT BETWEEN 0 AND 4294967295 OR port NOT "
        "BETWEEN 0 AND 65535 OR length(addr) != 16 OR aport NOT BETWEEN 0 AND 65535 LIMIT $1",
        "table entry, row (nat={0!r}, port={1!r}) does not decode (value out of range or size)",
    ),
    (
        "SELECT id FROM event WHERE nat NOT BETWEEN 0 AND 4294967295 OR port NOT BETWEEN 0 "
        "AND 65535 OR (kind != 0 AND (addr IS NULL OR length(addr) != 16 OR aport IS NULL "
        "OR aport NOT BETWEEN 0 AND 65535)) LIMIT $1",
        "table event, row id {0} does not decode (value out of range or size)",
    ),
)


async def catalog_problems(conn: asyncpg.Connection) -> list[str]:
    """How the current schema's catalog differs from the declared schema."""
    tables: dict[str, dict[str, str]] = {}
    nulls: dict[str, set[str]] = {}
    for table, column, kind, nullable in await conn.fetch(
        "SELECT table_name, column_name, data_type, is_nullable = 'YES' "
        "FROM information_schema.columns "
        "WHERE table_schema = current_schema() ORDER BY table_name, ordinal_position"
    ):
        tables.setdefault(table, {})[column] = kind
        nulls.setdefault(table, set())
        if nullable:
            nulls[table].add(column)
    keys: dict[str, tuple[str, ...]] = {}
    indexes = {}
    for name, table, unique, primary, partial, columns in await conn.fetch(
        "SELECT i.relname, t.relname, x.indisunique, x.indisprimary, x.indpred IS NOT NULL, "
        "array(SELECT a.attname FROM unnest(x.indkey) WITH ORDINALITY AS k(n, o) "
        "JOIN pg_attribute AS a ON a.attrelid = t.oid AND a.attnum = k.n ORDER BY k.o) "
        "FROM pg_index AS x JOIN pg_class AS i ON i.oid = x.indexrelid "
        "JOIN pg_class AS t ON t.oid = x.indrelid "
        "WHERE t.relnamespace = current_schema()::regnamespace"
    ):
        if primary:
            keys[table] = tuple(columns)
        else:
            indexes[name] = declared.Index(table, tuple(columns), unique, partial)
    live = declared.Catalog(tables, keys, indexes, {t: frozenset(c) for t, c in nulls.items()})
    return declared.differences(declared.POSTGRES, live)


async def _check(url: str, report: CheckReport) -> None:
    conn = await pg_schema.connect(url)
    try:
        await conn.execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            try:
                applied = await pg_schema.check_version(conn, url)
                await pg_schema.require_current(conn, url)
            except (NotOurDatabase, NewerDatabase, OutdatedDatabase) as exc:
                report.problems.append(str(exc))
                return
            where = f"{shown(url)}: "
            report.problems += [where + p for p in await catalog_problems(conn)]
            if report.problems:
                return
            for sql, text in _BAD_ROWS:
                for row in await conn.fetch(sql, 10):
                    report.problems.append(where + text.format(*row))
            if report.ok:
                report.facts = {
                    "schema version": max(applied),
                    "NAT64s": await conn.fetchval("SELECT count(*) FROM nat"),
                    "entries": await conn.fetchval("SELECT count(*) FROM entry"),
                    "events": await conn.fetchval("SELECT count(*) FROM event"),
                }
    except asyncpg.PostgresError as exc:
        report.problems.append(f"{shown(url)}: {exc}")
    finally:
        await conn.close()


def check(url: str) -> CheckReport:
    """Check a PostgreSQL database without changing it. Raises DatabaseMissing
    (and DatabaseError when it cannot be reached); every other finding goes
    in the report."""
    report = CheckReport(url)
    report.passed = "schema current, rows decode"
    try:
        asyncio.run(_check(url, report))
    except (OSError, asyncpg.InterfaceError, asyncpg.InternalClientError) as exc:
        raise DatabaseError(f"{shown(url)}: {exc}") from None
    return report
