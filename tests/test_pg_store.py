"""The PostgreSQL store in-process, on a real cluster: what it keeps across
a restart, a port given twice in one group, a commit that waits out a lock,
and a refused commit that stops everything (nothing acknowledged)."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from nat64ho.core.records import Event, EventKind, Row
from nat64ho.errors import DatabaseDamaged
from nat64ho.storage import pg_owner, pg_schema, postgres
from nat64ho.storage.postgres import PgStore
from tests.helpers import committed, db_rows, run, table_rows, v6

NAT = 0x7F000001


async def opened(url: str, **settings: str) -> tuple[PgStore, list, asyncio.Task]:
    """A store as serve opens it, and a task taking its commits (as the
    server does, sending the answers held for each)."""
    writer = await postgres.connect(url)
    for name, value in settings.items():
        await writer.execute(f"SET {name} = '{value}'")
    await pg_schema.migrate(writer, url)
    await pg_owner.try_acquire(writer, url, what="test")
    store = await PgStore.open(url, writer=writer)
    taken: list = []

    async def take():
        async for batch in store.commits():
            taken.append(batch)

    return store, taken, asyncio.ensure_future(take())


def test_secret_boots_and_clock_survive_a_reopen(pg_url):
    async def go():
        store, _, reader = await opened(pg_url)
        secret = store.secret
        assert len(secret) == 32
        store.add_boot(NAT, b"boot0001", 1_000, Event(1_000, EventKind.INITIALIZED, NAT))
        store.add(NAT, [Row(2000, v6(1), 7, 5_000, 9_000)], [])
        await committed(store)
        await store.set_meta("ports", "1028-65535")
        assert await store.close() == 0
        await reader
        again, _, reader = await opened(pg_url)
        assert again.secret == secret
        assert again.nats[NAT].boot_id == b"boot0001"
        assert again.clock_hwm == 9_000
        assert again.meta["ports"] == "1028-65535"
        assert again.last_event_ts == 1_000
        assert await again.read_ports(NAT, [2000, 2001]) == [Row(2000, v6(1), 7, 5_000, 9_000)]
        assert await again.read_endpoints(NAT, [(v6(1), 7), (v6(2), 7)]) == [
            Row(2000, v6(1), 7, 5_000, 9_000)
        ]
        # Reads go through sessions that cannot write.
        with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
            await again._pool.execute("DELETE FROM entry")
        await again.close()
        await reader

    run(go())


def test_a_port_given_twice_in_one_group_ends_with_the_last(pg_url):
    async def go():
        store, taken, reader = await opened(pg_url)
        # A takeover inside one group: 2000 to v6(1), then v6(1) moves on
        # and 2000 goes to v6(2), with their events in order.
        store.add(
            NAT,
            [Row(2000, v6(1), 1, 10, 10), Row(2001, v6(3), 1, 11, 11)],
            [Event(10, EventKind.CREATED, NAT, 2000, v6(1), 1)],
        )
        store.add(
            NAT,
            [Row(2000, v6(2), 1, 12, 12)],
            [
                Event(12, EventKind.DELETED, NAT, 2000, v6(1), 1),
                Event(13, EventKind.CREATED, NAT, 2000, v6(2), 1),
            ],
        )
        assert store.pending_seq == 1  # all one group
        await committed(store)
        await store.close()
        await reader
        assert [b.rows for b in taken] == [6]

    run(go())
    assert table_rows(pg_url) == {(NAT, 2000): (v6(2), 1), (NAT, 2001): (v6(3), 1)}
    assert db_rows(pg_url, "SELECT ts, kind FROM event ORDER BY id") == [(10, 1), (12, 2), (13, 1)]


def test_a_commit_waits_out_a_held_lock_then_answers(pg_url, pg_cluster):
    async def go():
        # A short lock_timeout turns a held lock into a failed commit (55P03),
        # which is retried until the lock is released.
        store, taken, reader = await opened(pg_url, lock_timeout="50ms")
        other = await asyncpg.connect(pg_url)
        tx = other.transaction()
        await tx.start()
        await other.execute("LOCK TABLE entry IN EXCLUSIVE MODE")
        seq = store.pending_seq
        store.add(NAT, [Row(3000, v6(7), 1, 20, 20)], [])
        await asyncio.sleep(0.5)
        assert store.failing is not None and "lock" in store.failing
        assert store.stats["commit_failures"] >= 2
        assert taken == [] and store.committed_seq < seq  # nothing answered
        await tx.rollback()
        await asyncio.wait_for(committed(store, seq), 5)
        assert store.failing is None
        await asyncio.sleep(0.01)  # the reader of the commits takes it
        assert [(g.seq, g.rows) for g in taken] == [(seq, 1)]
        await other.close()
        await store.close()
        await reader

    run(go())
    assert table_rows(pg_url) == {(NAT, 3000): (v6(7), 1)}


def test_a_refused_commit_stops_and_acknowledges_nothing(pg_url):
    async def go():
        store, taken, reader = await opened(pg_url)
        other = await asyncpg.connect(pg_url)
        # A constraint the server's decisions break: a bug to stop on, not retry.
        await other.execute("ALTER TABLE entry ADD CONSTRAINT low CHECK (aport < 100) NOT VALID")
        await other.close()
        seq = store.pending_seq
        store.add(NAT, [Row(4000, v6(8), 443, 30, 30)], [])
        await asyncio.wait_for(store.damage_found.wait(), 5)
        with pytest.raises(DatabaseDamaged):
            await committed(store, seq)
        assert "inconsistent" in (store.damaged or "")
        await store.close()
        with pytest.raises(DatabaseDamaged):
            await reader
        assert taken == []

    run(go())
    assert table_rows(pg_url) == {}
