"""Time the sealed history: sealing, its size at rest, who over it, export
from it, import into it. Works on a copy of a database made by make_history.py.

    python benchmarks/make_history.py /tmp/h.db --nats 4 --events 2000000
    python benchmarks/archive.py /tmp/h.db --period 86400

Prints one line per figure of the issue's target table, with the scale it
was taken at (the events in the archive): the who latencies grow with the
number of segments a question has to open, not with their size.
"""

from __future__ import annotations

import argparse
import ipaddress
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_ops import Null  # noqa: E402
from nat64ho.archive import catalog  # noqa: E402
from nat64ho.archive import seal as sealing  # noqa: E402
from nat64ho.ops import export, queries  # noqa: E402
from nat64ho.ops.db import SqliteConn  # noqa: E402
from nat64ho.storage import schema  # noqa: E402


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("db", type=Path, help="a database made by make_history.py (not changed)")
    ap.add_argument("--period", type=int, default=86400, help="seconds per segment")
    ap.add_argument("--questions", type=int, default=500, help="who questions of each kind")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="nat64ho-archive-"))
    try:
        run(args, work)
    finally:
        shutil.rmtree(work)


def run(args: argparse.Namespace, work: Path) -> None:
    db = work / "table.db"
    shutil.copy(args.db, db)
    conn = schema.open_db(db, create=True, factory=SqliteConn)  # the archive migration, a copy
    events = conn.execute("SELECT count(*) FROM event").fetchone()[0]
    hot_bytes = db.stat().st_size
    print(f"history: {events} events, {hot_bytes / events:.1f} bytes/event in the table's file")

    t = time.perf_counter()
    rows = export.write_log(export.history_rows(conn), Null())
    hot_export = rows / (time.perf_counter() - t)

    t = time.perf_counter()
    cpu = time.process_time()
    made = sealing.seal(
        conn, before=time.time_ns() // 1000 - args.period * 1_000_000, period_us=args.period * 10**6
    )
    wall, cpu = time.perf_counter() - t, time.process_time() - cpu
    sealed = sum(s.events for s in made)
    size = sum(s.size for s in made)
    print(
        f"sealing: {sealed} events into {len(made)} segments in {wall:.1f} s "
        f"({sealed / wall:,.0f} events/s wall, {sealed / cpu:,.0f} per CPU second)"
    )
    print(f"sealed history at rest: {size / sealed:.1f} bytes/event ({size} bytes)")

    t = time.perf_counter()
    rows = export.write_log(export.history_rows(conn), Null())
    took = time.perf_counter() - t
    print(
        f"export (log format, library): {rows / took:,.0f} lines/s from both tiers "
        f"(hot tier alone before sealing: {hot_export:,.0f})"
    )

    rnd = random.Random(1)
    nats = queries.nat_addresses(conn)
    segs = catalog.segments(conn)
    lo, hi = segs[0].ts_lo, segs[-1].ts_hi
    lat = []
    for _ in range(args.questions):
        nat, port, at = rnd.choice(nats), rnd.randint(1028, 65535), rnd.randint(lo, hi)
        t = time.perf_counter()
        queries.who_port(conn, nat, port, at)
        lat.append(time.perf_counter() - t)
    print(
        f"who NAT:PORT --at T (library, {len(segs)} segments, {sealed} events): median "
        f"{statistics.median(lat) * 1e3:.1f} ms, p99 {pct(lat, 0.99) * 1e3:.1f} ms"
    )
    sample = conn.execute(
        "SELECT addr, aport FROM entry ORDER BY random() LIMIT $1", (args.questions // 10,)
    ).fetchall()
    lat = []
    for addr, aport in sample:
        t = time.perf_counter()
        list(queries.who_endpoint(conn, ipaddress.IPv6Network(addr), aport))
        lat.append(time.perf_counter() - t)
    print(
        f"who [IPV6]:PORT (library, {len(sample)} questions): median "
        f"{statistics.median(lat) * 1e3:.1f} ms, p99 {pct(lat, 0.99) * 1e3:.1f} ms"
    )

    log = work / "history.log"
    with open(log, "w") as f:
        n = export.write_log(export.history_rows(conn), f)
    conn.close()
    fresh = work / "import.db"
    t = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "nat64ho", "import", str(log), "--db", str(fresh)],
        check=True,
        capture_output=True,
    )
    imported = time.perf_counter() - t
    t = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "nat64ho", "seal", "--db", str(fresh), "--period", str(args.period)],
        check=True,
        capture_output=True,
    )
    sealed_s = time.perf_counter() - t
    print(
        f"import then seal (commands): {n} lines in {imported:.1f} + {sealed_s:.1f} s "
        f"({n / (imported + sealed_s):,.0f} lines/s into the archive)"
    )


if __name__ == "__main__":
    main()
