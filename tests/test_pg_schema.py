"""The PostgreSQL schema rules: migrations applied and recorded once, a read
never creates anything, a read-only session refuses writes, a newer or
foreign database is refused by name."""

from __future__ import annotations

import asyncio

import pytest

from nat64ho.storage import pg_schema, schema


def test_serve_migrates_once_and_reads_never_create(pg_url, pg_cluster):
    async def go():
        with pytest.raises(schema.DatabaseMissing, match="no nat64ho tables"):
            await pg_schema.open_db(pg_url, readonly=True)
        conn = await pg_schema.open_db(pg_url, create=True)
        assert await pg_schema.applied(conn, pg_url) == [1]
        await conn.close()
        conn = await pg_schema.open_db(pg_url, create=True)  # nothing more to apply
        assert await pg_schema.migrate(conn, pg_url) == []
        await conn.close()
        conn = await pg_schema.open_db(pg_url, readonly=True)
        with pytest.raises(Exception, match="read-only"):
            await conn.execute("DELETE FROM entry")
        await conn.close()

    asyncio.run(go())


def test_missing_newer_and_foreign_databases_are_refused(pg_cluster):
    async def go(url, **how):
        await (await pg_schema.open_db(url, **how)).close()

    with pytest.raises(schema.DatabaseMissing, match="no such database"):
        asyncio.run(go(pg_cluster.url("nope"), readonly=True))

    name = pg_cluster.createdb()
    asyncio.run(go(pg_cluster.url(name), create=True))
    pg_cluster.psql(name, "INSERT INTO schema_migrations VALUES (99, 'future', 0)")
    with pytest.raises(schema.NewerDatabase, match="schema version 99"):
        asyncio.run(go(pg_cluster.url(name), readonly=True))

    other = pg_cluster.createdb()
    pg_cluster.psql(other, "CREATE TABLE invoices (id int)")
    with pytest.raises(schema.NotOurDatabase, match="another program"):
        asyncio.run(go(pg_cluster.url(other), readonly=True))


def test_passwords_never_reach_messages():
    url = "postgresql://app:s3cret@db.example:5432/nat64ho"
    assert schema.shown(url) == "postgresql://app:***@db.example:5432/nat64ho"
    assert schema.is_postgres(url) and not schema.is_postgres("/var/lib/nat64ho/table.db")
