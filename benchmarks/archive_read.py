"""Time the sealed history's readers at the scale operators keep it: ``who``
by NAT port and by client endpoint, and ``export``, over segments made
straight with pyarrow (no hot tier to fill and seal first).

    python benchmarks/archive_read.py --events 100000000

Each segment is an hour of a busy host: ports handed from client to client
(a Deleted and a Created at one instant) at random times, clients with
random interface identifiers under 2,000 /32s. The segments are written by
nat64ho.archive.segment.write, as a seal writes them, and recorded in a
fresh SQLite database; the library calls are those the commands make. The
data goes under a temporary directory (or --keep DIR) and is removed after.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.archive import pct  # noqa: E402
from benchmarks.bench_ops import Null  # noqa: E402
from nat64ho.archive import catalog, segment  # noqa: E402
from nat64ho.archive.seal import write_segments  # noqa: E402
from nat64ho.ops import db as opsdb  # noqa: E402
from nat64ho.ops import export, queries  # noqa: E402

NAT_BASE = (198 << 24) | (18 << 16)  # 198.18.0.0/15, the benchmarking range
FIRST_PORT, PORTS = 1028, 64508
HOUR = 3_600_000_000
START = 1_767_225_600_000_000  # 2026-01-01 00:00 UTC


def rand_ints(n: int, hi: int) -> pa.Array:
    """``n`` uniform integers in [0, hi)."""
    return pc.cast(pc.floor(pc.multiply(pc.random(n), hi)), pa.int64())


def client_pool(n: int, prefixes: int) -> pa.Array:
    """``n`` client addresses: one of ``prefixes`` random /32s, then random
    bits (the /64) and a random interface identifier."""
    tops = [os.urandom(4) for _ in range(prefixes)]
    rest = os.urandom(12 * n)
    which = random.Random(5).choices(range(prefixes), k=n)
    octets = b"".join(tops[w] + rest[12 * i : 12 * i + 12] for i, w in enumerate(which))
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(16), n, [None, pa.py_buffer(octets)])


def hour_table(hour: int, events: int, nats: int, pool: pa.Array, first_id: int) -> pa.Table:
    """One hour's events: ``events // 2`` handovers of random ports."""
    m = events // 2
    slot = rand_ints(m, nats * PORTS)
    ts = pc.add(rand_ints(m, HOUR), START + hour * HOUR)
    # By port then time, so that a Deleted names the port's previous holder.
    order = pc.sort_indices(
        pa.table({"s": slot, "t": ts}), [("s", "ascending"), ("t", "ascending")]
    )
    slot, ts = slot.take(order), ts.take(order)
    client = rand_ints(m, len(pool))
    aport = pc.add(rand_ints(m, 64512), 1024)
    prev_client = pa.concat_arrays([rand_ints(1, len(pool)), client[:-1]])
    prev_aport = pa.concat_arrays([pc.add(rand_ints(1, 64512), 1024), aport[:-1]])
    nat = pc.cast(pc.add(pc.divide(slot, PORTS), NAT_BASE + 1), pa.uint32())
    port = pc.cast(
        pc.add(pc.subtract(slot, pc.multiply(pc.divide(slot, PORTS), PORTS)), FIRST_PORT),
        pa.uint16(),
    )

    def half(kind: int, who: pa.Array, ap: pa.Array) -> pa.Table:
        return pa.table(
            {
                "nat": nat,
                "port": port,
                "ts": ts,
                "kind": pa.array([kind] * m, pa.uint8()),
                "addr": pool.take(who),
                "aport": pc.cast(ap, pa.uint16()),
            }
        )

    t = pa.concat_tables([half(2, prev_client, prev_aport), half(1, client, aport)])
    # Log order: by time, a Deleted before the Created that reuses its port.
    t = t.take(pc.sort_indices(t, [("ts", "ascending"), ("kind", "descending")]))
    ids = pc.add(pc.cumulative_sum(pa.array([1] * t.num_rows, pa.int64())), first_id - 1)
    return t.append_column("id", ids)


def build(work: Path, args: argparse.Namespace) -> Path:
    db = work / "table.db"
    conn = opsdb.connect(db, readonly=False, create=True)
    directory = catalog.archive_dir(conn)
    directory.mkdir(parents=True, exist_ok=True)
    pool = client_pool(args.clients, args.prefixes)
    next_id, hours = 1, -(-args.events // args.per_segment)
    t0 = time.perf_counter()
    for h in range(hours):
        table = hour_table(h, args.per_segment, args.nats, pool, next_id)
        # Recorded and chained as an import records them: no hot event taken.
        cut = pc.max(table["ts"]).as_py() + 1
        (seg,) = write_segments(conn, directory, [(table, cut, 0)], lambda: 0, pending=False)
        next_id = seg.last_id + 1
        print(
            f"  segment {h + 1}/{hours}: {seg.events} events, {seg.size / seg.events:.2f} B/event",
            flush=True,
        )
    conn.close()
    print(f"built {hours} segments in {time.perf_counter() - t0:.0f} s", flush=True)
    return db


def measure(db: Path, args: argparse.Namespace) -> None:
    conn = opsdb.connect(db)
    segs = catalog.segments(conn, live=True)
    events = sum(s.events for s in segs)
    size = sum(s.size for s in segs)
    print(f"archive: {len(segs)} segments, {events:,} events, {size / events:.2f} B/event at rest")
    rnd = random.Random(1)
    lo, hi = segs[0].ts_lo, segs[-1].ts_hi

    t = time.perf_counter()
    queries.who_port(conn, NAT_BASE + 1, FIRST_PORT, (lo + hi) // 2)
    print(f"first who (opens the archive): {(time.perf_counter() - t) * 1e3:.0f} ms")
    lat = []
    for _ in range(args.questions):
        nat = NAT_BASE + 1 + rnd.randrange(args.nats)
        port, at = FIRST_PORT + rnd.randrange(PORTS), rnd.randint(lo, hi)
        t = time.perf_counter()
        queries.who_port(conn, nat, port, at)
        lat.append(time.perf_counter() - t)
    print(
        f"who NAT:PORT --at T (library, {len(lat)} questions): median "
        f"{statistics.median(lat) * 1e3:.1f} ms, p99 {pct(lat, 0.99) * 1e3:.1f} ms"
    )

    # Endpoints that held a port: Created rows of random row groups.
    arch_dir = catalog.archive_dir(conn)
    endpoints = []
    while len(endpoints) < args.questions // 2:
        f = segment.Reader(arch_dir / rnd.choice(segs).file).file
        rows = f.read_row_group(rnd.randrange(f.num_row_groups), columns=["kind", "addr", "aport"])
        i = rnd.randrange(rows.num_rows)
        if rows["kind"][i].as_py() == 1:
            endpoints.append((rows["addr"][i].as_py(), rows["aport"][i].as_py()))
    lat, found = [], 0
    for addr, aport in endpoints:
        t = time.perf_counter()
        found += len(list(queries.who_endpoint(conn, ipaddress.IPv6Network(addr), aport)))
        lat.append(time.perf_counter() - t)
    print(
        f"who [IPV6]:PORT (library, {len(lat)} questions, {found} holdings): median "
        f"{statistics.median(lat) * 1e3:.1f} ms, p99 {pct(lat, 0.99) * 1e3:.1f} ms"
    )

    upto = segs[min(len(segs), args.export_segments) - 1].last_id
    t = time.perf_counter()
    n = export.write_log(export.history_rows(conn, upto=upto), Null())
    took = time.perf_counter() - t
    print(
        f"export, log format (library, first {args.export_segments} segments): {n:,} lines, {n / took:,.0f} lines/s"
    )
    until = segs[0].ts_lo + args.export_segments * HOUR
    t = time.perf_counter()
    n = export.write_log(export.history_rows(conn, until=until), Null())
    took = time.perf_counter() - t
    print(f"export --until (library, time order): {n:,} lines, {n / took:,.0f} lines/s")
    conn.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=100_000_000, help="archived events in all")
    ap.add_argument("--per-segment", type=int, default=3_600_000, help="events per hourly segment")
    ap.add_argument("--nats", type=int, default=4, help="NAT64s (64,508 ports each)")
    ap.add_argument("--clients", type=int, default=1_000_000, help="distinct client addresses")
    ap.add_argument("--prefixes", type=int, default=2000, help="/32s the clients are under")
    ap.add_argument("--questions", type=int, default=500, help="who NAT:PORT questions")
    ap.add_argument("--export-segments", type=int, default=2, help="segments export reads")
    ap.add_argument("--keep", type=Path, help="build into (or reuse) this directory; not removed")
    args = ap.parse_args()
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
        db = args.keep / "table.db"
        measure(db if db.exists() else build(args.keep, args), args)
        return
    work = Path(tempfile.mkdtemp(prefix="nat64ho-archive-read-"))
    try:
        measure(build(work, args), args)
    finally:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
