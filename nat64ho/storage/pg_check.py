"""``check`` on PostgreSQL: the schema version, every table, column and
index the migrations make, and the rows the code could not decode, read in
a read-only session (see :func:`nat64ho.storage.schema.check` for SQLite)."""

from __future__ import annotations

import asyncio
import functools
import re

import asyncpg

from nat64ho.storage import pg_schema
from nat64ho.storage.schema import (
    CheckReport,
    DatabaseError,
    DatabaseMissing,
    NewerDatabase,
    NotOurDatabase,
    OutdatedDatabase,
    shown,
)

_TABLE = re.compile(r"CREATE TABLE (\w+) \((.*?)\n\);", re.S)
_INDEX = re.compile(r"CREATE (UNIQUE )?INDEX (\w+) ON (\w+) \(([^)]*)\)")
_ADD_COLUMN = re.compile(r"ALTER TABLE (\w+) ADD COLUMN (?:IF NOT EXISTS )?(\w+) (\w+)")
_DROP_INDEX = re.compile(r"DROP INDEX (?:IF EXISTS )?(\w+)")
_NOT_COLUMN = ("PRIMARY", "UNIQUE", "CHECK", "CONSTRAINT", "FOREIGN")


@functools.cache
def expected() -> tuple[dict[str, dict[str, str]], dict[str, tuple[str, bool, str]]]:
    """From the shipped migrations: table -> {column: type}, and index ->
    (table, unique, columns), schema_migrations included."""
    tables: dict[str, dict[str, str]] = {
        "schema_migrations": {"version": "integer", "name": "text", "applied": "bigint"}
    }
    indexes: dict[str, tuple[str, bool, str]] = {}
    for _v, _name, sql in pg_schema.migrations():
        sql = re.sub(r"--[^\n]*", "", sql)
        for name, body in _TABLE.findall(sql):
            cols = {}
            for line in body.splitlines():
                words = line.strip().rstrip(",").split()
                if len(words) >= 2 and words[0].upper() not in _NOT_COLUMN:
                    cols[words[0]] = words[1].lower()
            tables[name] = cols
        for table, column, kind in _ADD_COLUMN.findall(sql):
            tables[table][column] = kind.lower()
        for name in _DROP_INDEX.findall(sql):
            indexes.pop(name, None)
        for unique, name, table, cols in _INDEX.findall(sql):
            indexes[name] = (table, bool(unique), ", ".join(c.strip() for c in cols.split(",")))
    return tables, indexes


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


async def _check(url: str, report: CheckReport) -> None:
    conn = await pg_schema.connect(url)
    try:
        await conn.execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            try:
                applied = await pg_schema.check_version(conn, url)
                await pg_schema.require_current(conn, url)
            except DatabaseMissing:
                raise
            except (NotOurDatabase, NewerDatabase, OutdatedDatabase) as exc:
                report.problems.append(str(exc))
                return
            tables, indexes = expected()
            have_cols: dict[str, dict[str, str]] = {}
            for table, column, kind in await conn.fetch(
                "SELECT table_name, column_name, data_type FROM information_schema.columns "
                "WHERE table_schema = current_schema() ORDER BY table_name, ordinal_position"
            ):
                have_cols.setdefault(table, {})[column] = kind
            where = f"{shown(url)}: "
            for table in sorted(set(have_cols) - set(tables)):
                report.problems.append(f"{where}unknown table {table}")
            for table, cols in tables.items():
                if table not in have_cols:
                    report.problems.append(f"{where}table {table} is missing")
                elif have_cols[table] != cols:
                    report.problems.append(f"{where}table {table} differs from the schema")
            have_idx = {
                name: (on, unique, definition)
                for name, on, unique, definition in await conn.fetch(
                    "SELECT i.relname, t.relname, x.indisunique, "
                    "pg_get_indexdef(x.indexrelid) FROM pg_index AS x "
                    "JOIN pg_class AS i ON i.oid = x.indexrelid "
                    "JOIN pg_class AS t ON t.oid = x.indrelid "
                    "WHERE t.relnamespace = current_schema()::regnamespace AND NOT x.indisprimary"
                )
            }
            for name in sorted(set(have_idx) - set(indexes)):
                report.problems.append(f"{where}unknown index {name} on {have_idx[name][0]}")
            for name, (on, unique, keys) in indexes.items():
                found = have_idx.get(name)
                if found is None:
                    report.problems.append(f"{where}index {name} is missing")
                elif found[:2] != (on, unique) or f"({keys})" not in found[2]:
                    report.problems.append(f"{where}index {name} differs from the schema")
            for table in tables:
                if table in have_cols and not await conn.fetchval(
                    "SELECT count(*) FROM pg_index WHERE indrelid = $1::regclass AND indisprimary",
                    table,
                ):
                    report.problems.append(f"{where}table {table} has no primary key")
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
    report = CheckReport(url)  # type: ignore[arg-type]
    try:
        asyncio.run(_check(url, report))
    except (OSError, asyncpg.InterfaceError, asyncpg.InternalClientError) as exc:
        raise DatabaseError(f"{shown(url)}: {exc}") from None
    return report
