"""Power loss: the files as a cut leaves them right after each
acknowledgment still hold every acknowledged entry."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest

from tests.helpers import connect, run, v6


@pytest.mark.parametrize("workers", ["1", "4"])
def test_power_cut_right_after_an_acknowledgment_keeps_it(server_factory, tmp_path, workers):
    srv = server_factory("--sync", "full", "--ports", "1028-2000", "--workers", workers)
    # The mode the writer connection really runs in, read back from SQLite.
    assert f"database {srv.db}: journal_mode=wal, synchronous=FULL" in srv.stderr

    async def go(workers: str):
        c = await connect(srv)
        acked = {}
        for i in range(30):
            [m] = await c.map(v6(i), 9)
            acked[(m.addr, m.port)] = m.nat_port
            # What a power cut leaves: the files as they are now, without the
            # process, its memory or its -shm index.
            cut = tmp_path / f"cut{workers}-{i}"
            cut.mkdir()
            for suffix in ("", "-wal"):
                src = Path(f"{srv.db}{suffix}")
                if src.exists():
                    shutil.copyfile(src, cut / f"table.db{suffix}")
            got = entries_recovered(cut / "table.db")
            assert all(got.get(k) == p for k, p in acked.items()), f"lost after ack {i}"
        c.close()

    run(go(workers))
    assert srv.stop() == 0


def entries_recovered(db: Path) -> dict[tuple[bytes, int], int]:
    # Read-write, as a restarted server opens it: SQLite rebuilds the WAL
    # index from the WAL's checksummed frames, keeping whole transactions only.
    conn = sqlite3.connect(db)
    try:
        return {
            (bytes(a), ap): p for p, a, ap in conn.execute("SELECT port, addr, aport FROM entry")
        }
    finally:
        conn.close()
