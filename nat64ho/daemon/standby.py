"""Taking the table to serve: its ownership (SQLite's lock file, PostgreSQL's
session lock), and with ``--standby`` waiting until the holder lets go."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import TYPE_CHECKING, TypeVar

from nat64ho.daemon import systemd
from nat64ho.daemon.config import Config
from nat64ho.storage.schema import DatabaseError, NewerDatabase, NotOurDatabase, shown

if TYPE_CHECKING:
    import asyncpg

    from nat64ho.storage.owner import Ownership

log = logging.getLogger("nat64ho")
T = TypeVar("T")

#: How often a standby server tries to take the table.
STANDBY_POLL = 0.2
#: The longest wait between a standby's tries to reach PostgreSQL.
STANDBY_MAX_BACKOFF = 5.0


def try_take_table(config: Config, told: bool) -> Ownership | None:
    """One try to own the table of ``config.db`` (nat64ho.storage.owner): the
    ownership, or None while another server holds it and ``standby`` lets
    this one wait (said once, unless ``told``). Shared by the one-process
    server and the parent of workers."""
    from nat64ho.storage import owner

    try:
        return owner.acquire(config.db, what="serve")
    except owner.TableOwned as exc:
        if not config.standby or getattr(exc, "holder", None) is None:
            raise
        if not told:
            log.info("standby: %s is owned by %s; waiting to take over", config.db, exc.holder)
            systemd.notify(f"STATUS=standby, waiting for {exc.holder} to release {config.db}")
        return None


async def take_table(config: Config, stop: asyncio.Event) -> Ownership | None:
    """Own the table of ``config.db``; with ``standby`` wait for it, or for a
    stop. Returns None when stopped while waiting."""
    told = False
    while (ownership := try_take_table(config, told)) is None:
        told = True
        try:
            await asyncio.wait_for(stop.wait(), STANDBY_POLL)
            return None
        except TimeoutError:
            pass
    return ownership


async def take_pg_table(url: str, config: Config, stop: asyncio.Event) -> asyncpg.Connection | None:
    """The writer session of ``url``, migrated and holding the owner lock
    (nat64ho.storage.pg_owner); with ``standby`` wait for the lock (and for
    the database, if it cannot be reached), or for a stop (None). A database
    that is not ours, is newer, or refuses the role stops even a standby:
    waiting would not mend it."""
    from nat64ho.storage import pg_owner, pg_schema, postgres
    from nat64ho.storage.owner import TableOwned

    told: str | None = None
    conn = None
    delay = STANDBY_POLL
    while True:
        try:
            if conn is None:
                conn = await _unless_stopped(postgres.connect(url), stop)
                if conn is None:
                    return None
                # serve is the command that migrates; a failed migration
                # closes the session, so that a retry starts clean.
                async with pg_schema.closed_on_failure(conn, url):
                    await pg_schema.migrate(conn, url)
            await pg_owner.try_acquire(conn, url, what="serve")
            if told is not None:
                log.info("standby: took over the table of %s", shown(url))
            return conn
        except (NotOurDatabase, NewerDatabase, pg_schema.AccessRefused):
            drop(conn)
            raise
        except TableOwned as exc:
            if not config.standby:
                drop(conn)
                raise
            why = f"owned by {exc.holder}"
            delay = STANDBY_POLL  # the session is up: polling the lock is cheap
        except Exception as exc:
            # Unreachable, missing, or the session failed while we waited:
            # start over with a new session, backing off to spare the server.
            drop(conn)
            conn = None
            if not config.standby:
                if isinstance(exc, DatabaseError):
                    raise
                raise DatabaseError(f"{shown(url)}: {exc}") from None
            why = str(exc) if isinstance(exc, DatabaseError) else f"{shown(url)}: {exc}"
            delay = min(delay * 2, STANDBY_MAX_BACKOFF)
        if told != why:
            log.info("standby: %s; waiting to take over", why)
            systemd.notify(f"STATUS=standby, {why}")
            told = why
        try:
            await asyncio.wait_for(stop.wait(), delay)
        except TimeoutError:
            continue
        drop(conn)
        return None


async def _unless_stopped(coro: Awaitable[T], stop: asyncio.Event) -> T | None:
    """``coro``'s result, or None as soon as ``stop`` is set (a standby's
    connect can hang for CONNECT_TIMEOUT on an unreachable host)."""
    task = asyncio.ensure_future(coro)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait((task, stopped), return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
    if task.done():
        return task.result()
    task.cancel()
    return None


def drop(conn: asyncpg.Connection | None) -> None:
    """Close a session without waiting on a server that may be gone."""
    if conn is not None and not conn.is_closed():
        conn.terminate()
