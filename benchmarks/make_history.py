"""Generate a benchmark database: N NAT64s with full tables and a long history.

The history is what a full table under steady load logs: round after round,
every port's least recently used entry is deleted and handed to a new client
(``Deleted`` then ``Created``), so every port has a consistent chain of
events and the current table is the last ``Created`` of each port.

Rows are produced inside SQLite by one recursive query (only the IPv6 address
is made by a Python function), with the history indexes dropped during the
load and rebuilt afterwards: sorting once is far faster than keeping three
random-order indexes up to date row by row.

    python benchmarks/make_history.py /tmp/bench.db --events 100000000
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nat64ho.storage import schema  # noqa: E402

FIRST_PORT, LAST_PORT = 1028, 65535
PORTS = LAST_PORT - FIRST_PORT + 1  # 64508, a prime times 4
#: Steps through the ports in a scattered order; coprime to PORTS, so it is a
#: permutation of them.
PORT_STRIDE = 7919
NAT_BASE = (198 << 24) | (18 << 16)  # 198.18.0.0/15, the benchmarking range
CLIENT_PREFIX = bytes.fromhex("20010db8")  # 2001:db8::/32, clients spread below it
#: Distinct client addresses; the multiplier below is odd, so serial numbers
#: less than this far apart never share an address (and the few current
#: entries that would repeat an endpoint on one NAT64 are simply left out).
CLIENTS = 1 << 20
HASH = 2654435761
#: Rows of the integer table cross-joined with itself to count events; a
#: recursive CTE costs more per row than the insert.
SEQ = 10_000


def client_addrs() -> list[bytes]:
    # 2001:db8:0:XXXX::YYY -- clients share /64s, as households do. Looked up
    # by a built-in method: a Python function per row would double load time.
    return [
        CLIENT_PREFIX + (c >> 10).to_bytes(4, "big") + bytes(6) + (c & 0x3FF).to_bytes(2, "big")
        for c in range(CLIENTS)
    ]


def build(path: Path, nats: int, events: int, span_days: float, nat_base: int = NAT_BASE) -> None:
    if path.exists():
        raise SystemExit(f"{path} exists; remove it first")
    slots = nats * PORTS
    conn = schema.open_db(path, create=True)
    conn.create_function("client_addr", 1, client_addrs().__getitem__, deterministic=True)
    # A throw-away file: speed over durability while loading.
    conn.execute("PRAGMA journal_mode = OFF")
    conn.execute("PRAGMA synchronous = OFF")
    conn.execute("PRAGMA cache_size = -2000000")
    conn.execute("PRAGMA threads = 2")
    end = int(time.time() * 1_000_000)
    start = end - int(span_days * 86400 * 1_000_000)
    step = max(1, (end - start) // max(1, events))
    index_sql = [
        r[0]
        for r in conn.execute(
            "SELECT sql FROM sqlite_master WHERE type = 'index' AND tbl_name = 'event' AND sql IS NOT NULL"
        )
    ]
    for (name,) in conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'event' "
        "AND sql IS NOT NULL"
    ).fetchall():
        conn.execute(f"DROP INDEX {name}")

    t0 = time.monotonic()
    conn.execute("CREATE TEMP TABLE seq (i INTEGER PRIMARY KEY)")
    conn.executemany("INSERT INTO temp.seq VALUES (?)", ((i,) for i in range(SEQ)))
    if events > SEQ * SEQ:
        raise SystemExit(f"--events above {SEQ * SEQ}: raise SEQ")
    conn.execute("BEGIN")
    conn.executemany(
        "INSERT INTO nat VALUES (?, ?, ?, ?)",
        [(nat_base + 1 + k, os.urandom(8), start, start) for k in range(nats)],
    )
    conn.executemany(
        "INSERT INTO event (ts, kind, nat, port) VALUES (?, 0, ?, 0)",
        [(start, nat_base + 1 + k) for k in range(nats)],
    )
    # Event i: round 0 creates every slot once; each later round deletes and
    # re-creates every slot. A slot j is (NAT64 j % nats, a scattered port).
    conn.execute(f"""
        INSERT INTO event (ts, kind, nat, port, addr, aport)
        WITH seq(i) AS (SELECT a.i * {SEQ} + b.i FROM temp.seq AS a, temp.seq AS b
                        WHERE a.i <= ({events} - 1) / {SEQ} AND a.i * {SEQ} + b.i < {events}),
        slot AS (
            SELECT i,
                   CASE WHEN i < {slots} THEN i ELSE ((i - {slots}) % (2 * {slots})) / 2 END AS j,
                   CASE WHEN i < {slots} OR (i - {slots}) % 2 = 1 THEN 1 ELSE 2 END AS kind,
                   CASE WHEN i < {slots} THEN 0
                        ELSE 1 + (i - {slots}) / (2 * {slots}) - ((i - {slots}) % 2 = 0) END AS r
            FROM seq),
        spot AS (SELECT i, kind, r, j % {nats} AS k, ((j / {nats}) * {PORT_STRIDE}) % {PORTS} AS p FROM slot)
        SELECT {start} + (i + 1) * {step}, kind, {nat_base + 1} + k, {FIRST_PORT} + p,
               client_addr(((r * {slots} + k * {PORTS} + p) * {HASH}) % {CLIENTS}),
               1024 + (p * {PORT_STRIDE} + r * 131) % {PORTS}
        FROM spot
    """)
    conn.execute("COMMIT")
    t1 = time.monotonic()
    print(f"events: {events + nats} rows in {t1 - t0:.0f} s", flush=True)

    for sql in index_sql:
        conn.execute(sql)
        print(f"index built at {time.monotonic() - t0:.0f} s: {sql.split(' ON ')[0]}", flush=True)

    # The current table is the last Created of every slot.
    conn.execute(f"""
        INSERT OR IGNORE INTO entry (nat, port, addr, aport, created, last_use)
        SELECT nat, port, addr, aport, ts, ts FROM event AS e
        WHERE kind = 1 AND ts = (SELECT max(ts) FROM event WHERE nat = e.nat AND port = e.port AND kind = 1)
          AND e.id > {max(0, events - 2 * slots)}
    """)
    conn.execute("ANALYZE")
    conn.execute("PRAGMA journal_mode = WAL")
    n_entry = conn.execute("SELECT count(*) FROM entry").fetchone()[0]
    conn.close()
    print(
        f"entries: {n_entry}; done in {time.monotonic() - t0:.0f} s; "
        f"{path.stat().st_size / 1e9:.1f} GB",
        flush=True,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("db", type=Path, help="database file to create (must not exist)")
    ap.add_argument("--nats", type=int, default=100, help="number of NAT64s (default 100)")
    ap.add_argument(
        "--events",
        type=int,
        default=100_000_000,
        help="Created/Deleted history rows (default 100 M); the current table is "
        "full once this reaches NATS x 64508",
    )
    ap.add_argument(
        "--span-days",
        type=float,
        default=90.0,
        help="the history ends now and starts this many days ago (default 90)",
    )
    ap.add_argument(
        "--nat-base",
        type=ipaddress.IPv4Address,
        default=ipaddress.IPv4Address(NAT_BASE),
        help="the NAT64s are the addresses after this one (default 198.18.0.0; "
        "127.1.0.0 makes them the ones a benchmark load sends from)",
    )
    args = ap.parse_args()
    build(args.db, args.nats, args.events, args.span_days, int(args.nat_base))


if __name__ == "__main__":
    main()
