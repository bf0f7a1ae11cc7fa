"""nat64ho.ops.pgconn: the sqlite3-like session on PostgreSQL the operator
modules run on, against the suite's real cluster; and settled_id, which
keeps export --follow from skipping an event committed out of id order."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import threading
import time

import asyncpg
import pytest

from nat64ho.cli.export import FOLLOW_POLL_S
from nat64ho.ops import export as ops_export
from nat64ho.ops import pgconn
from nat64ho.ops.db import EVENT_COLUMNS
from nat64ho.storage.owner import TableOwned
from tests.helpers import Follower, db_exec, db_rows, make_tables, nat64ho, one_error, ops_conn, v6


@pytest.fixture
def url(pg_url):
    return make_tables(pg_url)


@pytest.fixture
def conn(url):
    c = pgconn.connect(url)
    yield c
    c.close()


INSERT_EVENT = (
    "INSERT INTO event (ts, kind, nat, port, addr, aport) VALUES ($1, $2, $3, $4, $5, $6) "
    "ON CONFLICT DO NOTHING"
)


def event(i: int) -> tuple:
    return (1_000_000 + i, 1, 7, 1000 + i, v6(i), 2000 + i)


def test_statements_run_as_written(conn):
    # No statement is rewritten on its way: SQLite's spellings are refused,
    # and the dialect's own spellings are taken.
    with pytest.raises(pgconn.PgError, match="syntax error"):
        conn.execute("SELECT id FROM event INDEXED BY event_ts WHERE ts > $1", (0,)).fetchall()
    with pytest.raises(pgconn.PgError, match="syntax error"):
        conn.execute("INSERT OR IGNORE INTO meta VALUES ($1, $2)", ("k", b"v"))
    sql = f"SELECT count(*) FROM {conn.sql.event_by_ts} WHERE ts > $1 AND port IS NOT DISTINCT FROM $2"
    assert conn.execute(sql, (0, None)).fetchone() == (0,)


def test_statements_commit_on_their_own_and_count_changes(conn, url):
    assert conn.execute(INSERT_EVENT, event(1)).rowcount == 1
    assert conn.execute(INSERT_EVENT, event(1)).rowcount == 0  # the same event: ignored
    assert conn.total_changes == 1
    # Seen by another session at once: nothing was left open.
    assert db_rows(url, "SELECT port FROM event") == [(1001,)]
    assert conn.execute("DELETE FROM event WHERE port > $1", (0,)).rowcount == 1
    assert conn.total_changes == 2


def test_begin_rollback_discards_and_begin_commit_keeps(conn, url):
    conn.execute(conn.sql.begin)
    conn.execute(INSERT_EVENT, event(1))
    assert conn.in_transaction
    conn.execute("ROLLBACK")
    assert not conn.in_transaction and db_rows(url, "SELECT count(*) FROM event") == [(0,)]
    conn.execute("BEGIN")
    conn.execute(INSERT_EVENT, event(2))
    assert db_rows(url, "SELECT count(*) FROM event") == [(0,)]  # not committed yet
    conn.execute("COMMIT")
    assert db_rows(url, "SELECT count(*) FROM event") == [(1,)]


def test_insert_many_copies_in_order_and_skips_what_is_there(conn, url):
    rows = [event(i) for i in range(50)]
    conn.execute(INSERT_EVENT, event(10))  # already there
    before = conn.total_changes
    # And one twice in the batch.
    assert conn.insert_many("event", EVENT_COLUMNS, rows + [event(3)], ignore=True) == 49
    assert conn.total_changes - before == 49
    # Ids follow the order of the batch (export order is id order).
    ports = [p for (p,) in db_rows(url, "SELECT port FROM event ORDER BY id")]
    assert ports == [1010] + [1000 + i for i in range(50) if i != 10]
    # In a temp schema, as import's replay uses it.
    conn.execute(conn.sql.create_replay)
    replay = f"{conn.sql.temp}.replay"
    assert conn.insert_many(replay, ("nat", "port"), [(1, 2), (1, 2), (3, 4)], ignore=True) == 2
    assert conn.execute(f"SELECT * FROM {replay} ORDER BY 1").fetchall() == [(1, 2), (3, 4)]
    # Without ignore, a conflict is an error.
    with pytest.raises(pgconn.PgError, match="duplicate key"):
        conn.insert_many(replay, ("nat", "port"), [(1, 2)], ignore=False)


def test_streaming_cursor_reads_in_chunks_beside_other_statements(conn, monkeypatch):
    monkeypatch.setattr(pgconn, "CURSOR_ROWS", 7)
    conn.insert_many("event", EVENT_COLUMNS, [event(i) for i in range(30)], ignore=False)
    cur = conn.execute("SELECT port, addr FROM event ORDER BY id")
    first = cur.fetchmany(4)
    assert [p for p, _ in first] == [1000, 1001, 1002, 1003]
    assert type(first[0]) is tuple and type(first[0][1]) is bytes
    # Other statements run while the cursor is open (who does this).
    assert conn.execute("SELECT count(*) FROM event").fetchone() == (30,)
    rest = list(cur)
    assert [p for p, _ in rest] == [1000 + i for i in range(4, 30)]
    assert not conn.in_transaction  # the cursor's transaction ended with it


def test_a_readonly_session_refuses_writes_in_one_line(url):
    ro = pgconn.connect(url, readonly=True)
    try:
        with pytest.raises(pgconn.PgError) as err:
            ro.execute(INSERT_EVENT, event(1))
        text = str(err.value)
        assert text.startswith(f"{url}: ") and "read-only transaction" in text
        assert "\n" not in text
    finally:
        ro.close()
    assert db_rows(url, "SELECT count(*) FROM event") == [(0,)]


def test_connect_create_makes_tables_only_in_an_empty_database(pg_url):
    c = pgconn.connect(pg_url, create=True)
    assert c.created == 3  # the latest schema version
    c.close()
    c = pgconn.connect(pg_url, create=True)
    assert c.created == 0
    c.close()


class Writer:
    """An open transaction in its own session and thread that has inserted
    an event (so it holds an id) and commits when told."""

    def __init__(self, url: str, row: tuple):
        self.url, self.row = url, row
        self.inserted, self.commit = threading.Event(), threading.Event()
        self.thread = threading.Thread(target=asyncio.run, args=(self._go(),), daemon=True)
        self.thread.start()
        assert self.inserted.wait(10)

    async def _go(self) -> None:
        conn = await asyncpg.connect(self.url)
        try:
            async with conn.transaction():
                await conn.execute(
                    "INSERT INTO event (ts, kind, nat, port, addr, aport) "
                    "VALUES ($1, $2, $3, $4, $5, $6)",
                    *self.row,
                )
                self.inserted.set()
                while not self.commit.is_set():
                    await asyncio.sleep(0.01)
        finally:
            await conn.close()

    def done(self) -> None:
        self.commit.set()
        self.thread.join(10)


def test_settled_id_waits_for_a_transaction_that_drew_a_lower_id(conn, url):
    slow = Writer(url, event(1))  # draws id 1, commits last
    fast = Writer(url, event(2))  # draws id 2, commits first
    fast.done()
    assert db_rows(url, "SELECT id FROM event") == [(2,)]
    got: list[int | None] = []
    reader = threading.Thread(target=lambda: got.append(ops_export.settled_id(conn)))
    reader.start()
    time.sleep(0.3)
    assert got == []  # still waiting: id 1 may yet commit
    slow.done()
    reader.join(10)
    assert got == [2]
    rows = list(ops_export.history_rows(conn, after=0, upto=got[0], with_id=True))
    assert [r[0] for r in rows] == [1, 2]


def test_settled_id_without_writers_is_the_last_id_drawn(conn, tmp_path):
    assert ops_export.settled_id(conn) == 0
    conn.execute(INSERT_EVENT, event(1))
    conn.execute("BEGIN")
    conn.execute(INSERT_EVENT, event(2))
    conn.execute("ROLLBACK")  # id 2 is drawn and never used
    assert ops_export.settled_id(conn) == 2
    sqlite = ops_conn(tmp_path / "t.db", create=True)
    try:
        assert ops_export.settled_id(sqlite) is None  # one writer: ids commit in order
    finally:
        sqlite.close()


def test_take_table_names_the_holder(conn, url):
    other = pgconn.connect(url, name="nat64ho serve")
    try:
        release = other.take_table("serve")
        with pytest.raises(TableOwned) as err:
            conn.take_table("prune")
        assert "owned by nat64ho serve (on a local socket, PostgreSQL backend" in str(err.value)
        assert str(err.value).endswith("prune needs it alone")
        release()
        conn.take_table("prune")()  # free once released
        other.take_table("serve")
    finally:
        other.close()
    conn.take_table("prune")  # free once the holder's session ends


def test_export_follow_misses_no_event_committed_out_of_id_order(url):
    make_tables(url, events=[event(0)])
    follower = Follower(url)
    try:
        assert [e["seq"] for e in follower.take_until(1, timeout=20)] == [1]  # it is polling
        slow = Writer(url, event(1))  # id 2, committed last
        fast = Writer(url, event(2))  # id 3, committed first
        fast.done()
        # A follower that printed id 3 now and went on after it would never
        # print id 2: it must hold id 3 back while id 2 may still come.
        time.sleep(8 * FOLLOW_POLL_S)
        assert follower.lines.empty()
        slow.done()
        got = follower.take_until(3, timeout=20)
        third = Writer(url, event(3))
        third.done()
        got += follower.take_until(4, timeout=20)
        assert [(e["seq"], e["port"]) for e in got] == [(2, 1001), (3, 1002), (4, 1003)]
    finally:
        follower.proc.send_signal(signal.SIGTERM)
        assert follower.proc.wait(20) == 0
    assert follower.proc.stderr.read() == "stopped after seq 4; resume with --after 4\n"


def test_read_commands_need_only_select(url, tmp_path):
    log = tmp_path / "x.log"
    log.write_text(
        "2019-03-18 10:06:28.436754 Initialized 192.0.2.7\n"
        "2019-03-18 10:06:28.491727 Created 192.0.2.7:3719 [2001:db8::17]:53186\n"
    )
    assert nat64ho("import", "--rebuild-table", str(log), "--db", url).returncode == 0
    role = "reader_" + url.split("///", 1)[1].split("?", 1)[0]  # roles span the cluster
    db_exec(url, f"CREATE ROLE {role} LOGIN")
    db_exec(url, f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role}")
    db_exec(url, f"GRANT SELECT ON ALL SEQUENCES IN SCHEMA public TO {role}")
    reader = url.replace("user=nat64ho", f"user={role}")
    for args in (
        ["query"],
        ["who", "192.0.2.7:3719", "--at", "2019-03-18 11:00"],
        ["who", "2001:db8::17"],
        ["stats"],
        ["check"],
        ["export", "--after", "1"],
    ):
        r = nat64ho(*args, "--db", reader)
        assert r.returncode == 0, (args, r.stderr)
    assert r.stdout == log.read_text().splitlines(True)[1]
    r = nat64ho("prune", "--yes", "--before", "2020-01-01", "--db", reader)
    assert r.returncode == 1 and "permission denied for table event" in one_error(r)


def test_a_session_cut_by_the_server_ends_a_follower_in_one_line(url):
    make_tables(url, events=[event(0)])
    follower = Follower(url)
    assert [e["seq"] for e in follower.take_until(1, timeout=20)] == [1]
    [(n,)] = db_rows(
        url,
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
        "WHERE application_name = 'nat64ho read'",
    )
    assert n == 1
    assert follower.proc.wait(20) == 1
    line = one_error(follower.proc.stderr.read())
    assert line.startswith(f"Error: {url}: connection lost ("), line


@pytest.mark.parametrize("fmt", ["log", "jsonl"])
def test_a_session_cut_while_export_streams_is_one_error_line(url, fmt):
    db_exec(
        url,
        "INSERT INTO event (ts, kind, nat, port, addr, aport) SELECT 1000000 + i, 1, 7, "
        "1028 + i % 60000, decode(lpad(to_hex(i), 32, '0'), 'hex'), 2000 "
        "FROM generate_series(0, 199999) AS i",
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "nat64ho", "export", "--format", fmt, "--db", url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.readline()
    # Not read further, the export waits on a full pipe between two fetches
    # of its cursor when its session is ended.
    [(n,)] = db_rows(
        url,
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
        "WHERE application_name = 'nat64ho read'",
    )
    assert n == 1
    time.sleep(0.2)
    rest = proc.stdout.read()
    assert proc.wait(20) == 1
    assert len(rest.splitlines()) < 199_999
    line = one_error(proc.stderr.read())
    assert line.startswith(f"Error: {url}: connection lost ("), line


def test_a_cursor_closed_after_its_transaction_ended_leaves_later_cursors_open(conn, monkeypatch):
    monkeypatch.setattr(pgconn, "CURSOR_ROWS", 7)
    conn.insert_many("event", EVENT_COLUMNS, [event(i) for i in range(30)], ignore=False)
    stale = conn.execute("SELECT port FROM event ORDER BY id")
    assert stale.fetchmany(2) == [(1000,), (1001,)]
    conn.execute("BEGIN")  # ends the cursor's transaction: its rows are not needed
    conn.execute("COMMIT")
    stale.close()
    # Two cursors streaming side by side: the first one's end must not end
    # the transaction the second still reads in.
    a = conn.execute("SELECT port FROM event WHERE port < 1010 ORDER BY id")
    b = conn.execute("SELECT port FROM event ORDER BY id")
    assert a.fetchmany(1) == [(1000,)] and b.fetchmany(1) == [(1000,)]
    assert len(list(a)) == 9
    assert conn.in_transaction
    assert [p for (p,) in b] == [1000 + i for i in range(1, 30)]
    assert not conn.in_transaction


def test_a_write_beside_an_unread_cursor_commits_as_outside_begin(conn, url, monkeypatch):
    monkeypatch.setattr(pgconn, "CURSOR_ROWS", 7)
    conn.insert_many("event", EVENT_COLUMNS, [event(i) for i in range(30)], ignore=False)
    cur = conn.execute("SELECT port FROM event ORDER BY id")
    assert cur.fetchmany(2) == [(1000,), (1001,)]
    conn.execute("INSERT INTO meta VALUES ($1, $2)", ("probe", b"x"))
    conn.close()  # the cursor never read to its end
    assert db_rows(url, "SELECT value FROM meta WHERE key = 'probe'") == [(b"x",)]
