"""The archive's write side: ``import`` straight into segments (idempotent,
in log order, the same events as the line-by-line path) and migration 0003
(the hot tier's trimmed indexes) on an existing database. Both backends."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import asyncpg
import pytest

from nat64ho.eventlog import Event, EventKind, format_event, ts_str
from nat64ho.ops import importer
from nat64ho.storage import pg_schema, schema
from nat64ho.storage.schema import is_postgres
from tests.helpers import db_exec, db_rows, nat64ho, ops_conn
from tests.test_archive import NATS, START, check, churn_log, export, imported
from tests.test_archive import seal as seal_command

HOUR = 3_600_000_000


def migrate(db: Path | str) -> None:
    """What ``serve`` does first: apply the pending migrations."""
    if not is_postgres(str(db)):
        conn = sqlite3.connect(db)
        try:
            schema.migrate(conn, Path(db))
        finally:
            conn.close()
        return

    async def up() -> None:
        conn = await asyncpg.connect(str(db))
        try:
            await pg_schema.migrate(conn, str(db))
        finally:
            await conn.close()

    asyncio.run(up())


def segments(db: Path | str) -> int:
    return int(db_rows(db, "SELECT count(*) FROM segment")[0][0])


def test_import_seal_writes_segments_in_log_order_and_twice_adds_nothing(tmp_path, db_target):
    lines = churn_log(4000)
    # The open hour's events stay hot; the rest is sealed at once.
    now = time.time_ns() // 1000
    recent = [
        format_event(
            Event(now - 1000 + i, EventKind.CREATED, NATS[0], 5000 + i, bytes(15) + b"\1", 7)
        )
        + "\n"
        for i in range(3)
    ]
    log = tmp_path / "h.log"
    log.write_text("".join(lines + recent))
    r = nat64ho("import", "--seal", str(log), "--db", str(db_target))
    assert r.returncode == 0, r.stderr
    assert f" {len(lines) + 3} events added" in r.stderr, r.stderr
    assert db_rows(db_target, "SELECT count(*) FROM event") == [(3,)]
    made = segments(db_target)
    assert made >= 10  # one an hour of history
    assert db_rows(db_target, "SELECT sum(events) FROM segment")[0][0] == len(lines)
    assert export(db_target) == log.read_text()
    assert check(db_target).returncode == 0
    # Again, and a log overlapping it: only what is new goes in.
    more = churn_log(600, seed=3, start=START + 200 * HOUR)
    other = tmp_path / "more.log"
    other.write_text("".join(lines[-50:] + more))
    r = nat64ho("import", str(log), str(other), "--db", str(db_target))
    assert r.returncode == 0, r.stderr
    assert f" {len(more)} events added, {len(lines) + 3 + 50} already present" in r.stderr
    r = nat64ho("import", str(log), str(other), "--db", str(db_target))
    assert " 0 events added" in r.stderr, r.stderr
    assert segments(db_target) > made
    assert export(db_target) == log.read_text() + "".join(more)
    assert check(db_target).returncode == 0


def test_import_seal_gives_what_the_line_by_line_import_gives(tmp_path):
    # Lines the block parser must hand to the line parser: out of range,
    # odd forms, not ASCII, too long, CR LF, a repeat, no final LF.
    good = churn_log(300)
    odd = [
        good[5][:11] + "24" + good[5][13:],
        good[6].rsplit("]:", 1)[0] + "]:99999\n",
        good[7].replace("192.0.2", "192.0.300"),
        good[8].replace("[2001:db8", "[2001:::db8"),
        good[9][:-1] + "\r\n",
        "2026-01-01 00:00:00.000000 Créé 192.0.2.9:1 [::1]:1\n",
        "x" * 5000 + "\n",
        "\n",
        good[10],
        good[11][:-1],
    ]
    text = "".join(good[:200] + odd[:-1] + good[200:] + odd[-1:])
    log = tmp_path / "odd.log"
    log.write_bytes(text.encode("utf-8"))
    results = {}
    for seal in (False, True):
        db = tmp_path / f"{seal}.db"
        conn = ops_conn(db, create=True)
        bad: list[tuple[str, int, str]] = []
        with open(log, "rb") as f:
            result = importer.import_logs(
                conn, [("odd.log", f)], lambda *a, bad=bad: bad.append(a), into_segments=seal
            )
        conn.close()
        results[seal] = (result, bad, export(db))
    assert results[True] == results[False]
    result, bad, _ = results[True]
    assert len(bad) == 7 and result.skipped == 7


def test_migration_0003_drops_the_address_index_of_an_existing_history(tmp_path, db_target):
    db, log = imported(tmp_path, churn_log(500), db_target)
    # The database as migration 0002 left it.
    db_exec(db, "CREATE INDEX event_addr_ts ON event (addr, aport, ts) WHERE addr IS NOT NULL")
    db_exec(db, "DELETE FROM schema_migrations WHERE version = 3")
    r = nat64ho("export", "--db", str(db))
    assert r.returncode != 0  # a read command never migrates
    if is_postgres(str(db)):
        names = "SELECT indexname FROM pg_indexes WHERE tablename = 'event'"
    else:
        names = "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'event'"
    assert ("event_addr_ts",) in db_rows(db, names)
    migrate(db)

    assert ("event_addr_ts",) not in db_rows(db, names)
    assert db_rows(db, "SELECT max(version) FROM schema_migrations") == [(3,)]
    assert export(db) == log.read_text()
    assert check(db).returncode == 0


def test_seal_passes_of_whole_periods_bounded_in_events(tmp_path, db_target, monkeypatch):
    from nat64ho.archive import seal as sealing

    lines = churn_log(3000)
    db, log = imported(tmp_path, lines, db_target)
    conn = ops_conn(db)
    # About 180 events an hour: a pass of 500 stops at a period's end, and
    # a pass of 50 reads one period whole all the same. Read 64 at a time,
    # the period a pass stops at begins chunks before the limit.
    monkeypatch.setattr(sealing, "READ_CHUNK", 64)
    for limit, until in ((500, START + 6 * HOUR), (50, START + 9 * HOUR)):
        monkeypatch.setattr(sealing, "SERVER_PASS_EVENTS", limit)  # not alone: a server's bound
        made = sealing.seal(conn, before=until, period_us=HOUR)
        assert [s.ts_hi < until for s in made] == [True] * len(made)
        assert len({s.ts_lo // HOUR for s in made}) == len(made)  # one a period
    conn.close()
    assert segments(db) == 9
    assert db_rows(db, "SELECT count(*) FROM event WHERE ts < ?", START + 9 * HOUR) == [(0,)]
    assert export(db) == log.read_text()
    assert check(db).returncode == 0


def test_a_seal_alone_rebuilds_the_hot_indexes_only_when_most_events_leave(
    tmp_path, db_target, monkeypatch
):
    """A seal that owns the table deletes what it sealed with the hot tier's
    indexes dropped and built again over the events that stay, when those
    are fewer (SQLite; PostgreSQL's deletes leave its indexes to vacuum).
    Either way the same events stay hot, export and check agree, and the
    indexes are the declared ones."""
    from nat64ho.archive import seal as sealing

    db, log = imported(tmp_path, churn_log(3000), db_target)
    sqlite = not is_postgres(str(db))
    if sqlite:
        indexes = "SELECT name, sql FROM sqlite_master WHERE tbl_name = 'event' ORDER BY name"
    else:
        indexes = "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'event' ORDER BY 1"
    declared = db_rows(db, indexes)
    last = db_rows(db, "SELECT max(ts) FROM event")[0][0]
    rebuilt: list[int] = []
    real = sealing._delete_rebuilding

    def spy(*a):  # type: ignore[no-untyped-def]
        rebuilt.append(real(*a))
        return rebuilt[-1]

    monkeypatch.setattr(sealing, "_delete_rebuilding", spy)
    monkeypatch.setattr(sealing, "REBUILD_AT_LEAST", 1)  # this history is small
    conn = ops_conn(db)
    # First the older few hours (most stays hot), then all but the last.
    for until in (START + 3 * HOUR, last - last % HOUR):
        stays = db_rows(db, "SELECT * FROM event WHERE ts >= ? ORDER BY id", until)
        sealing.seal(conn, before=until, period_us=HOUR, alone=True)
        assert db_rows(db, "SELECT * FROM event ORDER BY id") == stays
        assert db_rows(db, indexes) == declared
    conn.close()
    if sqlite:
        assert rebuilt[0] == 0 and rebuilt[-1] > 0  # most stayed; then most left
    else:
        assert rebuilt == []
    assert export(db) == log.read_text()
    assert check(db).returncode == 0


def test_a_seal_alone_deletes_after_its_last_pass_and_a_kill_before_loses_nothing(
    tmp_path, db_target, monkeypatch
):
    """A seal that owns the table leaves every pass's events hot, their
    segments pending, until its last pass: killed before the deletes,
    readers see each event once and check passes; the next seal deletes."""
    from nat64ho.archive import catalog
    from nat64ho.archive import seal as sealing

    lines = churn_log(3000)
    db, log = imported(tmp_path, lines, db_target)
    real = sealing.finish_pending

    def killed(conn) -> int:  # type: ignore[no-untyped-def]
        if catalog.pending(conn):
            raise RuntimeError("killed")
        return real(conn)

    monkeypatch.setattr(sealing, "finish_pending", killed)
    monkeypatch.setattr(sealing, "PASS_EVENTS", 500)  # about three hours a pass
    conn = ops_conn(db)
    with pytest.raises(RuntimeError):
        sealing.seal(conn, before=START + 9 * HOUR, period_us=HOUR, alone=True)
    conn.close()
    assert db_rows(db, "SELECT count(*), min(pending) FROM segment") == [(9, 1)]
    assert db_rows(db, "SELECT count(*) FROM event") == [(len(lines),)]
    assert export(db) == log.read_text()
    assert check(db).returncode == 0

    monkeypatch.setattr(sealing, "finish_pending", real)
    conn = ops_conn(db)
    assert sealing.seal(conn, before=START + 9 * HOUR, period_us=HOUR, alone=True) == []
    conn.close()
    assert db_rows(db, "SELECT count(*) FROM segment WHERE pending = 1") == [(0,)]
    assert db_rows(db, "SELECT count(*) FROM event WHERE ts < ?", START + 9 * HOUR) == [(0,)]
    sealed = db_rows(db, "SELECT sum(events) FROM segment")[0][0]
    assert sealed + db_rows(db, "SELECT count(*) FROM event")[0][0] == len(lines)
    assert export(db) == log.read_text()
    assert check(db).returncode == 0


def test_a_seal_alone_leaves_what_an_import_adds_between_its_passes_hot(
    tmp_path, db_target, monkeypatch
):
    """An import may commit beside ``nat64ho seal`` (it does not need the
    table alone). An event it adds between two passes, in an hour a pass
    already sealed, is neither sealed, hidden from readers nor deleted by
    that seal; the next seal puts it in a segment of its own."""
    from nat64ho.archive import seal as sealing

    lines = churn_log(3000)
    db, log = imported(tmp_path, lines, db_target)
    monkeypatch.setattr(sealing, "PASS_EVENTS", 500)
    monkeypatch.setattr(sealing, "DEFER_EVENTS", 1000)  # and deletes during the seal
    real = sealing.seal_pass
    late = (START + HOUR + 1, 1, NATS[0], 60000, bytes(16), 1)

    seen: list[bool] = []

    def seal_pass(*a, **k):  # type: ignore[no-untyped-def]
        made = real(*a, **k)
        if made and k.get("after") is not None and not seen:
            # After the second pass, with both passes' events still hot:
            # readers see the late event (no cut may cover it).
            seen.append(":60000 [" in export(db))
        if made and k.get("after") is None:  # after the first pass, in an hour it sealed
            assert made[-1].cut_ts > late[0]
            db_exec(
                db,
                "INSERT INTO event (ts, kind, nat, port, addr, aport) VALUES (?, ?, ?, ?, ?, ?)",
                *late,
            )
        return made

    monkeypatch.setattr(sealing, "seal_pass", seal_pass)
    conn = ops_conn(db)
    made = sealing.seal(conn, before=START + 9 * HOUR, period_us=HOUR, alone=True)
    conn.close()
    assert len(made) == 9 and seen == [True]
    hot = db_rows(
        db, "SELECT ts, kind, nat, port, addr, aport FROM event WHERE ts < ?", START + 9 * HOUR
    )
    assert hot == [late]
    assert sum(s.events for s in made) + db_rows(db, "SELECT count(*) FROM event")[0][0] == (
        len(lines) + 1
    )
    seal_command(db, "--period", "3600", "--before", ts_str(START + 9 * HOUR))
    assert db_rows(db, "SELECT count(*) FROM event WHERE ts < ?", START + 9 * HOUR) == [(0,)]
    hot = db_rows(db, "SELECT count(*) FROM event")[0][0]
    assert db_rows(db, "SELECT sum(events), count(*) FROM segment") == [(len(lines) + 1 - hot, 10)]
    assert check(db).returncode == 0
