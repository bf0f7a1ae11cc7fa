"""The PostgreSQL schema rules: migrations applied and recorded once, a read
never creates anything, a read-only session refuses writes, a newer or
foreign database is refused by name."""

from __future__ import annotations

import asyncio

import pytest

from nat64ho.ops import pgconn
from nat64ho.storage import pg_schema, schema
from tests.helpers import nat64ho, one_error


def test_serve_migrates_once_and_reads_never_create(pg_url, pg_cluster):
    async def applied_and_migrated() -> tuple[list[int], list[int]]:
        conn = await pg_schema.connect(pg_url)
        try:
            return await pg_schema.applied(conn, pg_url), await pg_schema.migrate(conn, pg_url)
        finally:
            await conn.close()

    with pytest.raises(schema.DatabaseMissing, match="no nat64ho tables"):
        pgconn.connect(pg_url, readonly=True)
    assert asyncio.run(applied_and_migrated()) == ([], [1, 2, 3])
    assert asyncio.run(applied_and_migrated()) == ([1, 2, 3], [])  # nothing more to apply
    conn = pgconn.connect(pg_url, readonly=True)
    with pytest.raises(pgconn.PgError, match="read-only"):
        conn.execute("DELETE FROM entry")
    conn.close()


def test_missing_newer_and_foreign_databases_are_refused(pg_cluster):
    def go(url, **how):
        pgconn.connect(url, **how).close()

    with pytest.raises(schema.DatabaseMissing, match="no such database"):
        go(pg_cluster.url("nope"), readonly=True)

    name = pg_cluster.createdb()
    go(pg_cluster.url(name), create=True)
    pg_cluster.psql(name, "INSERT INTO schema_migrations VALUES (99, 'future', 0)")
    with pytest.raises(schema.NewerDatabase, match="schema version 99"):
        go(pg_cluster.url(name), readonly=True)

    other = pg_cluster.createdb()
    pg_cluster.psql(other, "CREATE TABLE invoices (id int)")
    with pytest.raises(schema.NotOurDatabase, match="another program"):
        go(pg_cluster.url(other), readonly=True)


@pytest.mark.parametrize(
    "tables",
    [
        # Rails keeps its versions as text in a schema_migrations of its own.
        "CREATE TABLE schema_migrations (version varchar PRIMARY KEY); "
        "INSERT INTO schema_migrations VALUES ('20230101000000'); CREATE TABLE users (id int)",
        "CREATE TABLE schema_migrations (version varchar PRIMARY KEY); CREATE TABLE users (id int)",
        "CREATE TABLE schema_migrations (version integer PRIMARY KEY, name text NOT NULL, "
        "applied bigint NOT NULL); CREATE TABLE users (id int)",
    ],
    ids=["rails", "rails_empty", "ours_empty_beside_others"],
)
def test_another_programs_schema_migrations_is_refused_and_left_alone(pg_cluster, tables):
    name = pg_cluster.createdb()
    pg_cluster.psql(name, tables)
    before = pg_cluster.psql(name, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    url = pg_cluster.url(name)
    for args in (["query"], ["serve", "--listen", "127.0.0.1:0", "--log-file", "-"]):
        r = nat64ho(*args, "--db", url)
        assert r.returncode == 1, r
        assert one_error(r) == f"Error: {url}: a database of another program " + (
            "(tables, none recorded by nat64ho)"
            if "applied" in tables
            else "(its schema_migrations is not nat64ho's)"
        )
    after = pg_cluster.psql(name, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    assert after == before


def test_passwords_never_reach_messages():
    url = "postgresql://app:s3cret@db.example:5432/nat64ho"
    assert schema.shown(url) == "postgresql://app:***@db.example:5432/nat64ho"
    for url, seen in (
        (
            "postgresql://db.example/n?user=app&password=s3cret&sslmode=require",
            "postgresql://db.example/n?user=app&password=***&sslmode=require",
        ),
        (
            "postgres://app:s3cret@h1:5432,h2:5432/n?sslpassword=s3cret",
            "postgres://app:***@h1:5432,h2:5432/n?sslpassword=***",
        ),
        ("postgresql://app:s3c@ret@[db/n", "postgresql://app:***@[db/n"),  # does not parse
        ("postgresql://app@db/n", "postgresql://app@db/n"),
    ):
        assert schema.shown(url) == seen
        assert schema.is_postgres(url)
    assert not schema.is_postgres("/var/lib/nat64ho/table.db")


@pytest.mark.parametrize(
    "args", [["query"], ["export"], ["serve", "--listen", "127.0.0.1:0"], ["import", "-"]]
)
def test_a_url_that_does_not_parse_is_one_error_line_without_its_password(args):
    r = nat64ho(*args, "--db", "postgresql://app:s3cret@[db.example/nat64ho", input="")
    assert r.returncode == 2, r
    assert one_error(r) == (
        "Error: --db postgresql://app:***@[db.example/nat64ho: not a valid URL (Invalid IPv6 URL)"
    )
    assert "s3cret" not in r.stderr + r.stdout
