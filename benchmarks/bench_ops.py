"""Time the operator commands on a database made by make_history.py.

    python benchmarks/bench_ops.py /tmp/bench.db

Each operation is timed twice where it matters: the library call (what the
command does after start-up) and the whole ``nat64ho`` command in a fresh
process (what an operator waits for, Python start-up included). Import
writes only to scratch databases beside the benchmark one, except with
--import-into, which adds and then removes events of a NAT64 the benchmark
data does not use.
"""

from __future__ import annotations

import argparse
import io
import itertools
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ipaddress  # noqa: E402

from nat64ho.eventlog import ipv4_str, ipv6_str, ts_str  # noqa: E402
from nat64ho.ops import export, queries  # noqa: E402
from nat64ho.ops.db import SqliteConn  # noqa: E402
from nat64ho.storage import schema  # noqa: E402

SCRATCH_NAT = (203 << 24) | (0 << 16) | (113 << 8) | 1  # 203.0.113.1, TEST-NET-3


class Null(io.TextIOBase):
    """A text sink that costs nothing, so the writer is what gets timed."""

    def write(self, s: str) -> int:
        return len(s)


def timed(fn, *args, **kw):
    t = time.perf_counter()
    out = fn(*args, **kw)
    return time.perf_counter() - t, out


def command(*args: str) -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "nat64ho", *args], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def ms(s: float) -> str:
    return f"{s * 1000:.1f} ms"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("db", type=Path)
    ap.add_argument(
        "--samples", type=int, default=200, help="who lookups of each kind (default 200)"
    )
    ap.add_argument(
        "--export-lines",
        type=int,
        default=2_000_000,
        help="lines exported for the rate (default 2 M; 0 = the whole history)",
    )
    ap.add_argument(
        "--import-lines",
        type=int,
        default=1_000_000,
        help="lines imported for the rate (default 1 M)",
    )
    ap.add_argument(
        "--import-into",
        action="store_true",
        help="also import new events into the benchmark database itself",
    )
    args = ap.parse_args()
    db = str(args.db)
    rng = random.Random(64)

    conn = schema.open_db(args.db, readonly=True, factory=SqliteConn)
    events = conn.execute("SELECT max(id) FROM event").fetchone()[0]
    entries = conn.execute("SELECT count(*) FROM entry").fetchone()[0]
    nats = queries.nat_addresses(conn)
    t_min, t_max = conn.execute("SELECT min(ts), max(ts) FROM event").fetchone()
    print(
        f"database: {args.db}: {len(nats)} NAT64s, {entries} entries, {events} events, "
        f"{os.path.getsize(args.db) / 1e9:.1f} GB, history {ts_str(t_min)} .. {ts_str(t_max)}"
    )

    # How fast this machine is, to compare numbers across machines: an empty
    # Python loop, and SQLite reading rows in C.
    t, _ = timed(lambda: [None for _ in range(1_000_000)])
    t2, _ = timed(lambda: conn.execute("SELECT count(*) FROM event WHERE id <= 2000000").fetchone())
    print(
        f"machine: Python {1 / t:.1f} M loop iterations/s; SQLite {min(events, 2_000_000) / t2 / 1e6:.1f} M "
        f"rows/s scanned; {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}"
    )

    # query --nat: every entry of one NAT64, formatted as the table output.
    nat = nats[len(nats) // 2]

    def query_nat():
        out = Null()
        n = 0
        for e in queries.query_entries(conn, nat=nat):
            out.write(
                f"{ipv4_str(e.nat):<15}  {e.port:<5}  {ts_str(e.created)}  "
                f"{ts_str(e.last_use)}  [{ipv6_str(e.addr)}]:{e.aport}\n"
            )
            n += 1
        return n

    t, n = timed(query_nat)
    t_cmd = command("query", "--nat", ipv4_str(nat), "--db", db)
    print(f"query --nat {ipv4_str(nat)}: {n} rows; library {ms(t)}, command {ms(t_cmd)}")

    # who NAT:PORT --at T, at random ports and instants.
    times = []
    found = 0
    for _ in range(args.samples):
        n_, p = rng.choice(nats), rng.randint(1028, 65535)
        at = rng.randint(t_min, t_max)
        t, h = timed(queries.who_port, conn, n_, p, at)
        times.append(t)
        found += h is not None
    sample = (ipv4_str(n_), p, ts_str(at))
    t_cmd = command("who", f"{sample[0]}:{sample[1]}", "--at", sample[2], "--db", db)
    print(
        f"who NAT:PORT --at T: {args.samples} lookups ({found} held); library median "
        f"{ms(statistics.median(times))}, max {ms(max(times))}; command {ms(t_cmd)}"
    )

    # who [IPV6]:PORT and who PREFIX/64, for endpoints taken from the history.
    ids = [rng.randint(1, events) for _ in range(args.samples)]
    picks = [
        r
        for i in ids
        for r in conn.execute(
            "SELECT addr, aport FROM event WHERE id = $1 AND addr IS NOT NULL", (i,)
        )
    ]
    times, rows = [], 0
    for addr, aport in picks:
        net = ipaddress.IPv6Network((addr, 128))
        t, hs = timed(lambda net=net, aport=aport: list(queries.who_endpoint(conn, net, aport)))
        times.append(t)
        rows += len(hs)
    addr, aport = picks[-1]
    t_cmd = command("who", f"[{ipv6_str(addr)}]:{aport}", "--db", db)
    print(
        f"who [IPV6]:PORT: {len(picks)} lookups, {rows / max(1, len(picks)):.1f} holdings each; "
        f"library median {ms(statistics.median(times))}, max {ms(max(times))}; command {ms(t_cmd)}"
    )
    times, rows = [], 0
    for addr, _ in picks[: max(1, len(picks) // 4)]:
        net = ipaddress.IPv6Network((addr, 64), strict=False)
        t, hs = timed(lambda net=net: list(queries.who_endpoint(conn, net)))
        times.append(t)
        rows += len(hs)
    print(
        f"who PREFIX/64: {len(times)} lookups, {rows / len(times):.1f} holdings each; "
        f"library median {ms(statistics.median(times))}, max {ms(max(times))}"
    )

    # export: log lines, streamed.
    limit = args.export_lines or None
    t, n = timed(export.write_log, itertools.islice(export.history_rows(conn), limit), Null())
    print(f"export (library, {n} lines): {n / t:,.0f} lines/s")
    with tempfile.TemporaryDirectory(dir=args.db.parent) as tmp:
        log = Path(tmp) / "sample.log"
        t = time.perf_counter()
        with open(log, "w") as out:
            # The same command an operator runs, cut after --import-lines by
            # a window on the first events.
            rows = itertools.islice(export.history_rows(conn), args.import_lines)
            export.write_log(rows, out)
        until = ts_str(
            conn.execute(
                "SELECT ts FROM event WHERE id = $1", (min(events, args.import_lines) + 1,)
            ).fetchone()[0]
        )
        t_cmd = command(
            "export", "--until", until, "--db", db, "--output", str(Path(tmp) / "w.log")
        )
        n_cmd = sum(1 for _ in open(Path(tmp) / "w.log"))
        print(
            f"export --until (command, {n_cmd} lines): {n_cmd / t_cmd:,.0f} lines/s "
            f"including start-up"
        )

        # import into an empty database.
        fresh = Path(tmp) / "fresh.db"
        schema.open_db(fresh, create=True).close()
        t_cmd = command("import", str(log), "--db", str(fresh))
        n = sum(1 for _ in open(log))
        print(f"import into an empty database (command, {n} lines): {n / t_cmd:,.0f} lines/s")
        t_cmd = command("import", str(log), "--db", str(fresh))
        print(f"import the same lines again (all present): {n / t_cmd:,.0f} lines/s")

        if args.import_into:
            # New events (another NAT64) into the full-size database.
            scratch = Path(tmp) / "scratch.log"
            with open(log) as src, open(scratch, "w") as out:
                fixed = ipv4_str(SCRATCH_NAT)
                for line in src:
                    parts = line.split(" ")
                    if len(parts) == 5:
                        nat_port = parts[3].rsplit(":", 1)
                        parts[3] = f"{fixed}:{nat_port[1]}"
                        out.write(" ".join(parts))
            t_cmd = command("import", str(scratch), "--db", db)
            n = sum(1 for _ in open(scratch))
            print(
                f"import into the benchmark database (command, {n} new lines): "
                f"{n / t_cmd:,.0f} lines/s"
            )
            rw = schema.open_db(args.db)
            rw.execute("DELETE FROM event WHERE nat = ?", (SCRATCH_NAT,))
            rw.close()
    conn.close()


if __name__ == "__main__":
    main()
