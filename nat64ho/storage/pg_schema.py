"""Opening a nat64ho database on PostgreSQL and bringing its schema up to
date: the migrations of ``migrations/postgresql/``, recorded and refused
the same way as SQLite's (see :mod:`nat64ho.storage.schema`)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator

import asyncpg

from nat64ho.storage import declared, schema
from nat64ho.storage.schema import (
    DatabaseError,
    DatabaseMissing,
    NewerDatabase,
    NotOurDatabase,
    OutdatedDatabase,
    shown,
)

#: Seconds to wait for a connection before saying the server cannot be reached.
CONNECT_TIMEOUT = 10.0

#: Advisory lock key taken while migrating, so two servers starting at once
#: do not both apply a migration ("nat64ho-migrate" as a 64-bit number).
MIGRATE_LOCK = 0x6E61_7436_346D_6772

#: Advisory lock key of the table's owner: held by the active server for its
#: whole session (a standby waits on it), and taken by operator commands that
#: rewrite the table (import --rebuild-table, prune, forget). Advisory locks
#: are per database, so one key serves every table ("nat64ho-owner").
OWNER_LOCK = 0x6E61_7436_346F_776E


class AccessRefused(DatabaseError):
    """PostgreSQL refused the role or its password: an operator's mistake,
    which waiting does not mend."""


_SCHEMA_MIGRATIONS = (
    "CREATE TABLE IF NOT EXISTS schema_migrations ("
    "version integer PRIMARY KEY, name text NOT NULL, applied bigint NOT NULL)"
)
_OUR_MIGRATIONS_COLUMNS = list(declared.POSTGRES.tables["schema_migrations"].items())


def migrations() -> list[tuple[int, str, str]]:
    """(version, name, sql) of every shipped PostgreSQL migration, in order."""
    folder = schema._migration_dir().joinpath("postgresql")
    found = []
    for item in folder.iterdir():
        m = schema._MIGRATION_NAME.match(item.name)
        if m:
            found.append((int(m.group(1)), m.group(2), item.read_text(encoding="utf-8")))
    found.sort()
    versions = [v for v, _, _ in found]
    if versions != list(range(1, len(found) + 1)):
        raise RuntimeError(f"PostgreSQL migrations are not numbered 1..n: {versions}")
    return found


async def connect(url: str, **kwargs: object) -> asyncpg.Connection:
    """A connection to ``url``; every failure a DatabaseError naming it."""
    try:
        return await asyncpg.connect(dsn=url, timeout=CONNECT_TIMEOUT, **kwargs)
    except asyncpg.InvalidCatalogNameError:
        raise DatabaseMissing(
            f"{shown(url)}: no such database (create it with 'createdb', then start "
            "'nat64ho serve --db URL' to make its tables)"
        ) from None
    except (asyncpg.InvalidAuthorizationSpecificationError, asyncpg.InvalidPasswordError) as exc:
        raise AccessRefused(f"{shown(url)}: refused: {exc}") from None
    except (OSError, TimeoutError, asyncpg.PostgresError, ValueError) as exc:
        why = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise DatabaseError(f"{shown(url)}: cannot connect ({why})") from None


async def applied(conn: asyncpg.Connection, url: str) -> list[int]:
    """Versions recorded in the database; NotOurDatabase for another program's."""
    tables = {
        r[0]
        for r in await conn.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
        )
    }
    if not tables:
        return []
    if "schema_migrations" not in tables:
        raise NotOurDatabase(
            f"{shown(url)}: a database of another program (tables but no schema_migrations)"
        )
    # Other frameworks keep a schema_migrations too (Rails: one text column).
    columns = await conn.fetch(
        "SELECT column_name, data_type FROM information_schema.columns WHERE table_schema = "
        "current_schema() AND table_name = 'schema_migrations' ORDER BY ordinal_position"
    )
    if [tuple(c) for c in columns] != _OUR_MIGRATIONS_COLUMNS:
        raise NotOurDatabase(
            f"{shown(url)}: a database of another program (its schema_migrations is not nat64ho's)"
        )
    done = [r[0] for r in await conn.fetch("SELECT version FROM schema_migrations ORDER BY 1")]
    if not done and tables != {"schema_migrations"}:
        raise NotOurDatabase(
            f"{shown(url)}: a database of another program (tables, none recorded by nat64ho)"
        )
    return done


async def check_version(conn: asyncpg.Connection, url: str) -> list[int]:
    done = await applied(conn, url)
    known = {v for v, _, _ in migrations()}
    unknown = [v for v in done if v not in known]
    if unknown:
        raise NewerDatabase(
            f"{shown(url)}: written by a newer nat64ho (schema version {max(unknown)}, "
            f"this one knows up to {max(known)}); upgrade nat64ho"
        )
    return done


async def migrate(conn: asyncpg.Connection, url: str) -> list[int]:
    """Apply the pending migrations, each in one transaction with its record;
    the versions applied now."""
    done = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATE_LOCK)
        have = set(await check_version(conn, url))
        for version, name, sql in migrations():
            if version in have:
                continue
            async with conn.transaction():
                await conn.execute(_SCHEMA_MIGRATIONS)
                await conn.execute(sql)
                await conn.execute(
                    "INSERT INTO schema_migrations VALUES ($1, $2, $3)",
                    version,
                    name,
                    int(time.time() * 1_000_000),
                )
            done.append(version)
    return done


async def require_current(conn: asyncpg.Connection, url: str) -> None:
    have = set(await check_version(conn, url))
    missing = [v for v, _, _ in migrations() if v not in have]
    if not have:
        raise DatabaseMissing(
            f"{shown(url)}: holds no nat64ho tables yet (start 'nat64ho serve --db URL' "
            "to make them)"
        )
    if missing:
        raise OutdatedDatabase(
            f"{shown(url)}: lacks schema versions {missing}; start 'nat64ho serve' "
            "of this version once to apply them"
        )


@contextlib.asynccontextmanager
async def closed_on_failure(conn: asyncpg.Connection, url: str) -> AsyncIterator[None]:
    """Close ``conn`` if the block fails (so no half-set-up session is left
    for a retry to reuse); PostgreSQL's refusals become a DatabaseError."""
    try:
        yield
    except asyncpg.PostgresError as exc:
        await conn.close()
        raise DatabaseError(f"{shown(url)}: {exc}") from None
    except BaseException:
        await conn.close()
        raise
