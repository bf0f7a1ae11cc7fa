"""Build a database with full tables: N NAT64s x 64508 entries (100 x 64508 =
6.45 M rows by default), directly with sqlite3 in the nat64ho schema.

Rows are made inside SQLite by one query over a recursive port sequence (no
Python per row), in primary-key order, with the two secondary indexes dropped
during the load and rebuilt after: one sort beats 6.45 M random index
inserts. Last uses are spread over the past day in a scattered order, so the
LRU index is not the port order. NAT64 n is 127.1.x.y, the address
``nat64ho bench`` sends from, and its boot id is recorded so that a HELLO
from ``nat64ho.bench`` is a reconnect, not a restart.

    python benchmarks/make_tables.py /tmp/big.db            # about a minute
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nat64ho.bench import nat_source  # noqa: E402
from nat64ho.storage import schema  # noqa: E402

FIRST_PORT, LAST_PORT = 1028, 65535
#: Multiplier that scatters last uses across ports; coprime to 64508.
STRIDE = 7919
#: Boot id every NAT64 of the generated tables last said HELLO with.
BOOT_ID = bytes(8)


def nat_int(index: int) -> int:
    a, b, c, d = (int(x) for x in nat_source(index).split("."))
    return (a << 24) | (b << 16) | (c << 8) | d


def build(path: Path, nats: int, first: int = FIRST_PORT, last: int = LAST_PORT) -> int:
    if path.exists():
        raise SystemExit(f"{path} exists; remove it first")
    conn = schema.open_db(path, create=True)
    # A throw-away file while it is built: speed over durability.
    conn.execute("PRAGMA synchronous = OFF")
    conn.execute("PRAGMA cache_size = -262144")
    indexes = [
        sql
        for (sql,) in conn.execute(
            "SELECT sql FROM sqlite_master WHERE type = 'index' AND tbl_name = 'entry' AND sql IS NOT NULL"
        )
    ]
    for name in ("entry_endpoint", "entry_lru"):
        conn.execute(f"DROP INDEX {name}")
    now = time.time_ns() // 1000
    day = 86_400 * 1_000_000
    span = last - first + 1
    conn.execute("BEGIN")
    conn.executemany(
        "INSERT INTO nat VALUES (?, ?, ?, ?)",
        [(nat_int(i), BOOT_ID, now - day, now - day) for i in range(nats)],
    )
    conn.execute(
        """
        WITH RECURSIVE port(p) AS (SELECT ? UNION ALL SELECT p + 1 FROM port WHERE p < ?)
        INSERT INTO entry (nat, port, addr, aport, created, last_use)
        SELECT nat.nat, p,
               CAST(x'20010db8' || randomblob(12) AS BLOB),
               1024 + abs(random()) % 64512,
               ? - ((p * ?) % ?) * 1000 - 1000,
               ? - ((p * ?) % ?) * 1000 - (nat.nat & 255)
        FROM nat, port ORDER BY nat.nat, p
        """,
        (first, last, now, STRIDE, span, now, STRIDE, span),
    )
    conn.execute("COMMIT")
    for sql in indexes:  # exactly as the migrations made them
        conn.execute(sql)
    conn.execute("PRAGMA optimize")
    rows = conn.execute("SELECT count(*) FROM entry").fetchone()[0]
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("db", type=Path)
    ap.add_argument("--nats", type=int, default=100)
    args = ap.parse_args()
    t = time.perf_counter()
    rows = build(args.db, args.nats)
    size = args.db.stat().st_size / 2**20
    print(
        f"{args.db}: {rows:,} entries for {args.nats} NAT64s, {size:,.0f} MiB, "
        f"{time.perf_counter() - t:.1f} s"
    )


if __name__ == "__main__":
    main()
