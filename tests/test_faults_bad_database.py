"""Wrong and damaged database files: serve and check refuse them clearly and
leave them as they were; damage found while serving stops the server."""

from __future__ import annotations

import asyncio
import functools
import random
import socket
import sqlite3
import stat
import tempfile
from pathlib import Path

import pytest

from nat64ho.core import wire
from nat64ho.storage import schema
from tests.helpers import (
    ServerProcess,
    connect,
    digest,
    mappings,
    nat64ho,
    one_error,
    run,
    serve_args,
    v6,
)


def healthy_db(path: Path, entries_n: int = 3000) -> Path:
    """A nat64ho database with enough rows to span many pages, checkpointed
    into the main file (as after a clean stop)."""
    data, mode = _healthy_image(entries_n)
    path.write_bytes(data)
    path.chmod(mode)
    return path


@functools.cache
def _healthy_image(entries_n: int) -> tuple[bytes, int]:
    # Built once per run and copied: several tests damage a fresh one each.
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "table.db"
        conn = schema.open_db(path, create=True)
        conn.execute("BEGIN")
        conn.execute("INSERT INTO nat VALUES (3221226249, x'0102030405060708', 1, 1)")
        conn.executemany(
            "INSERT INTO entry VALUES (3221226249, ?, ?, ?, ?, ?)",
            [(1028 + i, v6(i), 1000 + i % 50000, i, i) for i in range(entries_n)],
        )
        conn.executemany(
            "INSERT INTO event (ts, kind, nat, port, addr, aport) "
            "VALUES (?, 1, 3221226249, ?, ?, ?)",
            [(i, 1028 + i, v6(i), 1000 + i % 50000) for i in range(entries_n)],
        )
        conn.execute("COMMIT")
        conn.close()
        assert not Path(f"{path}-wal").exists() and not Path(f"{path}-journal").exists()
        return path.read_bytes(), stat.S_IMODE(path.stat().st_mode)


def _page_of(path: Path, name: str) -> tuple[int, int]:
    """(page size, a page of ``name``'s b-tree that is not its root)."""
    conn = sqlite3.connect(path)
    try:
        size = conn.execute("PRAGMA page_size").fetchone()[0]
        pages = [
            p
            for (p,) in conn.execute(
                "SELECT pageno FROM dbstat WHERE name = ? AND pagetype = 'leaf' ORDER BY pageno",
                (name,),
            )
        ]
    except sqlite3.OperationalError:  # SQLite built without dbstat
        pages = []
    finally:
        conn.close()
    return size, pages[len(pages) // 2] if pages else 3


def make_not_sqlite(p: Path) -> str:
    p.write_bytes(random.Random(1).randbytes(8192))
    return "not an SQLite database"


def make_text_file(p: Path) -> str:
    p.write_text("2019-03-18 10:06:28.436754 Initialized 192.0.2.7\n" * 100)
    return "not an SQLite database"


def make_foreign(p: Path) -> str:
    conn = sqlite3.connect(p)
    conn.execute("CREATE TABLE moz_places (id INTEGER PRIMARY KEY, url TEXT)")
    conn.execute("INSERT INTO moz_places (url) VALUES ('https://example.org/')")
    conn.commit()
    conn.close()
    return "another program"


def make_foreign_empty(p: Path) -> str:
    conn = sqlite3.connect(p)
    conn.execute("PRAGMA user_version = 7")
    conn.close()
    return "another program"


def make_newer(p: Path) -> str:
    healthy_db(p, 10)
    conn = sqlite3.connect(p, isolation_level=None)
    conn.execute("INSERT INTO schema_migrations VALUES (99, 'from_the_future', 0)")
    conn.close()
    return "written by a newer nat64ho (schema version 99"


def make_truncated(p: Path) -> str:
    healthy_db(p)
    size, _ = _page_of(p, "entry")
    with open(p, "r+b") as f:
        f.truncate(p.stat().st_size // size // 2 * size)
    return "truncated"


def make_torn(p: Path) -> str:
    healthy_db(p)
    with open(p, "r+b") as f:
        f.truncate(p.stat().st_size - 1000)
    return "not a whole number of"


def make_bad_header(p: Path) -> str:
    healthy_db(p)
    with open(p, "r+b") as f:
        f.seek(100)  # page 1's b-tree header: the schema itself
        f.write(b"\xff" * 8)
    return "not a nat64ho database"


def make_bad_page(p: Path) -> str:
    if not p.exists():
        healthy_db(p)
    size, page = _page_of(p, "entry")
    with open(p, "r+b") as f:
        f.seek((page - 1) * size)
        f.write(random.Random(2).randbytes(size))
    return "malformed"


BAD_FILES = [
    make_not_sqlite,
    make_text_file,
    make_foreign,
    make_foreign_empty,
    make_newer,
    make_truncated,
    make_torn,
    make_bad_header,
]


@pytest.mark.parametrize("make", BAD_FILES, ids=lambda f: f.__name__[5:])
def test_serve_refuses_a_bad_database_and_leaves_it_alone(tmp_path, make):
    db = tmp_path / "table.db"
    expected = make(db)
    before = digest(db)
    r = nat64ho(*serve_args(db, tmp_path / "events.log"))
    assert r.returncode == 1
    error = one_error(r)
    assert error.startswith(f"Error: {db}: ") and expected in error, r.stderr
    assert digest(db) == before
    assert not (tmp_path / "events.log").exists()
    # 'check' says the same, and changes nothing either.
    c = nat64ho("check", "--db", str(db))
    assert c.returncode == 1 and f"Error: {db}: " in c.stderr and "Traceback" not in c.stderr
    assert digest(db) == before


def test_check_finds_a_damaged_page_that_start_up_does_not_read(tmp_path):
    db = tmp_path / "table.db"
    healthy_db(db)
    r = nat64ho("check", "--db", str(db))
    assert (r.returncode, r.stderr) == (0, "")
    assert (
        r.stdout == f"ok: {db}: integrity ok, schema current; schema version 3, NAT64s 1, "
        "entries 3000, events 3000\n"
    )
    expected = make_bad_page(db)
    before = digest(db)
    r = nat64ho("check", "--db", str(db))
    assert r.returncode == 1
    assert r.stderr.startswith(f"Error: {db}: ") and expected in r.stderr, r.stderr
    assert digest(db) == before


def test_check_runs_beside_a_serving_server(server_factory):
    srv = server_factory("--ports", "1028-2000")

    async def go():
        c = await connect(srv)
        for i in range(20):
            await c.map(v6(i), 1)
        r = await asyncio.to_thread(nat64ho, "check", "--db", str(srv.db))
        [m] = await c.map(v6(100), 1)  # still committing
        c.close()
        return r, m

    r, m = run(go())
    assert r.returncode == 0 and r.stdout.startswith(f"ok: {srv.db}: integrity ok"), r.stderr
    assert "entries 20," in r.stdout  # every acknowledged entry, seen by a reader
    assert isinstance(m, wire.Mapping)


def test_check_finds_a_schema_that_was_changed(tmp_path):
    db = healthy_db(tmp_path / "table.db", 10)
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("DROP INDEX entry_lru")
    conn.close()
    r = nat64ho("check", "--db", str(db))
    assert (r.returncode, r.stderr) == (1, f"Error: {db}: index entry_lru is missing\n")


def test_check_of_a_missing_file_creates_nothing(tmp_path):
    db = tmp_path / "absent.db"
    r = nat64ho("check", "--db", str(db))
    assert (r.returncode, r.stderr) == (1, f"Error: {db}: no such database\n")
    assert not db.exists()


def test_damage_found_while_serving_stops_the_server_unanswered(tmp_path):
    db = healthy_db(tmp_path / "table.db")
    here = int.from_bytes(socket.inet_aton("127.0.0.1"), "big")
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("UPDATE nat SET nat = ?", (here,))
    conn.execute("UPDATE entry SET nat = ?", (here,))
    size = conn.execute("PRAGMA page_size").fetchone()[0]
    leaves = [
        p
        for (p,) in conn.execute(
            "SELECT pageno FROM dbstat WHERE name = 'entry' AND pagetype = 'leaf'"
        )
    ]
    conn.close()
    assert len(leaves) > 3
    # Every leaf of the table (not its indexes): start-up cannot see it, the
    # first read or write of an entry must.
    with open(db, "r+b") as f:
        for page in leaves:
            f.seek((page - 1) * size)
            f.write(b"\x0d" + random.Random(page).randbytes(size - 1))
    srv = ServerProcess(tmp_path, "--ports", "1028-65535").start()
    try:

        async def go():
            c = await connect(srv)
            assert await c.exchange([wire.Lookup(1028)], timeout=1) == []
            c.send([wire.Map(v6(99999), 1)])
            return await c.quiet(0.5)

        assert mappings(run(go())) == []
        assert srv.proc.wait(15) == 1
    finally:
        srv.kill()
    assert f"Error: {db}: damaged while serving (" in srv.stderr
    assert f"run 'nat64ho check --db {db}'" in srv.stderr
    assert "Traceback" not in srv.stderr and "bug:" not in srv.stderr
    r = nat64ho("check", "--db", str(db))
    assert r.returncode == 1 and "malformed" in r.stderr
