"""The declared schema (nat64ho.storage.declared) against the migrations,
and ``check``'s findings when a live catalog differs from it, on both
backends."""

from __future__ import annotations

import sqlite3

import asyncpg
import pytest

from nat64ho.storage import declared, pg_check, schema
from tests.conftest import _database
from tests.helpers import db_exec, is_postgres, make_tables, nat64ho, one_error, run


def problems(db: str) -> list[str]:
    """The catalog's differences from the declared schema, read directly."""
    if is_postgres(db):

        async def read() -> list[str]:
            conn = await asyncpg.connect(db)
            try:
                return await pg_check.catalog_problems(conn)
            finally:
                await conn.close()

        return run(read())
    conn = sqlite3.connect(db)
    try:
        return schema.catalog_problems(conn)
    finally:
        conn.close()


def test_the_migrations_make_exactly_the_declared_schema(db_target):
    # A migration that changes a table or an index without changing the
    # declaration fails here.
    assert problems(make_tables(db_target)) == []


def test_a_live_catalog_is_compared_both_ways():
    want = declared.SQLITE
    have = declared.Catalog(
        {**want.tables, "entry": {**want.tables["entry"], "x": "INTEGER"}, "planted": {}},
        {**want.keys, "meta": ()},
        {k: v for k, v in want.indexes.items() if k != "event_ts"}
        | {"extra": declared.Index("entry", ("aport",))},
        # A key column's NULL is not a finding: SQLite reports rowid keys so.
        {**want.nullable, "nat": frozenset({"nat", "boot_id"}), "event": frozenset({"addr"})},
    )
    assert declared.differences(want, have) == [
        "unknown table planted",
        "table meta has no primary key",
        "column nat.boot_id accepts NULL (the schema says NOT NULL)",
        "table entry differs from the schema",
        "column event.aport is NOT NULL (the schema lets it be NULL)",
        "unknown index extra on entry",
        "index event_ts is missing",
    ]
    assert declared.differences(want, want) == []


COMMON = [
    (["DROP INDEX event_ts"], "index event_ts is missing"),
    (["CREATE INDEX extra ON entry (aport)"], "unknown index extra on entry"),
    (
        ["DROP INDEX entry_lru", "CREATE INDEX entry_lru ON entry (last_use)"],
        "index entry_lru differs from the schema",
    ),
    (
        ["DROP INDEX event_ts", "CREATE INDEX event_ts ON event (ts) WHERE kind > 0"],
        "index event_ts differs from the schema",
    ),
    (["ALTER TABLE entry ADD COLUMN extra integer"], "table entry differs from the schema"),
    (["CREATE TABLE planted (x int)"], "unknown table planted"),
]
POSTGRES_ONLY = [
    (["ALTER TABLE entry ALTER COLUMN aport TYPE bigint"], "table entry differs from the schema"),
    (
        ["ALTER TABLE entry ALTER COLUMN addr DROP NOT NULL"],
        "column entry.addr accepts NULL (the schema says NOT NULL)",
    ),
    (
        ["ALTER TABLE event ALTER COLUMN aport SET NOT NULL"],
        "column event.aport is NOT NULL (the schema lets it be NULL)",
    ),
    (["ALTER TABLE meta DROP CONSTRAINT meta_pkey"], "table meta has no primary key"),
]
SQLITE_ONLY = [
    (["CREATE VIEW planted AS SELECT 1"], "unknown view planted"),
    (
        # SQLite changes a column's constraints only by making the table again.
        [
            "ALTER TABLE nat RENAME TO old_nat",
            "CREATE TABLE nat (nat INTEGER PRIMARY KEY, boot_id BLOB, "
            "first_hello INTEGER NOT NULL, last_hello INTEGER NOT NULL)",
            "DROP TABLE old_nat",
        ],
        "column nat.boot_id accepts NULL (the schema says NOT NULL)",
    ),
    (
        # The same columns, but ids that a sealed event's deletion frees again.
        [
            "ALTER TABLE event RENAME TO old_event",
            "CREATE TABLE event (id INTEGER PRIMARY KEY, ts INTEGER NOT NULL, "
            "kind INTEGER NOT NULL, nat INTEGER NOT NULL, port INTEGER NOT NULL, "
            "addr BLOB, aport INTEGER)",
            "DROP TABLE old_event",
            "CREATE INDEX event_ts ON event (ts)",
            "CREATE UNIQUE INDEX event_nat_port_ts ON event (nat, port, ts, kind)",
        ],
        "table event differs from the schema (its ids are not AUTOINCREMENT)",
    ),
    (
        ["CREATE TRIGGER planted AFTER INSERT ON event BEGIN SELECT 1; END"],
        "unknown trigger planted on event",
    ),
]


CASES = [(b, s, f) for b in ("sqlite", "postgresql") for s, f in COMMON]
CASES += [("postgresql", s, f) for s, f in POSTGRES_ONLY] + [
    ("sqlite", s, f) for s, f in SQLITE_ONLY
]


@pytest.mark.parametrize("backend, statements, finding", CASES)
def test_check_names_each_difference_from_the_schema(
    request, tmp_path, backend, statements, finding
):
    db = str(make_tables(_database(request, backend, tmp_path)))
    assert nat64ho("check", "--db", db).returncode == 0
    for sql in statements:
        db_exec(db, sql)
    r = nat64ho("check", "--db", db)
    assert r.returncode == 1 and r.stdout == ""
    assert one_error(r) == f"Error: {schema.describe(db)}: {finding}"


def v1_database(path) -> str:
    """An SQLite database as nat64ho's first schema version left it."""
    conn = sqlite3.connect(path, isolation_level=None)
    [(version, name, sql)] = schema.migrations()[:1]
    conn.execute(
        "CREATE TABLE schema_migrations ("
        "version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied INTEGER NOT NULL)"
    )
    for statement in schema._statements(sql):
        conn.execute(statement)
    conn.execute("INSERT INTO schema_migrations VALUES (?, ?, 0)", (version, name))
    conn.close()
    return str(path)


def test_an_older_schema_is_upgraded_to_the_declared_one(tmp_path):
    db = v1_database(tmp_path / "v1.db")
    with pytest.raises(schema.OutdatedDatabase):
        schema.open_db(db, readonly=True)
    schema.open_db(db, create=True).close()  # what serve does
    assert problems(db) == []


def test_sql_planted_in_an_older_schema_is_refused(tmp_path):
    db = v1_database(tmp_path / "v1.db")
    db_exec(db, "CREATE TRIGGER planted AFTER INSERT ON event BEGIN SELECT 1; END")
    with pytest.raises(schema.NotOurDatabase, match="unknown trigger planted on event"):
        schema.open_db(db, create=True)


def test_an_older_schema_with_an_extra_index_is_refused_once_upgraded(tmp_path):
    db = v1_database(tmp_path / "v1.db")
    db_exec(db, "CREATE INDEX planted ON entry (aport)")
    with pytest.raises(schema.NotOurDatabase, match="unknown index planted on entry"):
        schema.open_db(db, create=True)
