"""SQLite and PostgreSQL side by side, in one run on one machine: new
entries/s at batch 1 and 20, lookups/s, p99 latency, and PostgreSQL's rate
as a fraction of SQLite's (the target for creates: at least 0.5).

PostgreSQL is a throwaway cluster started here (Debian's initdb/pg_ctl, on a
Unix socket, fsync on, synchronous_commit on: durable like SQLite's
synchronous=FULL), or the scratch database of --pg-url; each measurement on
PostgreSQL gets a fresh database of the cluster.

    python benchmarks/backends.py --duration 3
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nat64ho import bench  # noqa: E402

#: (label, mode, batch): what is measured on each backend.
RUNS = [
    ("creates/s, batch 1", "create", 1),
    ("creates/s, batch 20", "create", 20),
    ("lookups/s, batch 20", "lookup", 20),
]


def measure(db: str | None, mode: str, batch: int, args) -> bench.Result:
    cfg = bench.BenchConfig(
        mode=mode,
        batch=batch,
        window=args.window,
        duration=args.duration,
        warmup=0.5,
        entries=args.entries,
        ceilings=False,
        db=db,
        # Rates are policy, not capacity.
        server_args=["--create-rate=0", "--request-rate=0"],
    )
    return bench.run(cfg).server


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=3.0, help="seconds measured per run")
    ap.add_argument("--window", type=int, default=32, help="requests in flight")
    ap.add_argument("--entries", type=int, default=5000, help="entries before a lookup run")
    ap.add_argument("--pg-url", help="a scratch PostgreSQL database (default: a throwaway cluster)")
    args = ap.parse_args()
    cluster = None
    if args.pg_url is None:
        from tests import pgcluster

        why = pgcluster.missing()
        if why is not None:
            sys.exit(f"Error: {why}")
        cluster = pgcluster.Cluster().start()
    try:
        rows = []
        for label, mode, batch in RUNS:
            sq = measure(None, mode, batch, args)
            pg_url = args.pg_url or cluster.url()  # type: ignore[union-attr]
            pg = measure(pg_url, mode, batch, args)
            rows.append((label, sq, pg))
    finally:
        if cluster is not None:
            cluster.stop()

    def p99(r: bench.Result) -> str:
        v = r.percentile(0.99)
        return f"{v * 1e3:.2f}" if v is not None else "-"

    table = [("", "SQLite", "PostgreSQL", "PG/SQLite", "p99 ms SQLite", "p99 ms PG")]
    for label, sq, pg in rows:
        a, b = sq.messages_per_s, pg.messages_per_s
        table.append(
            (label, f"{a:,.0f}", f"{b:,.0f}", f"{b / a:.2f}" if a else "-", p99(sq), p99(pg))
        )
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    print(
        f"nat64ho backends: window {args.window}, {args.duration:g} s per run, "
        f"SQLite synchronous=FULL, PostgreSQL fsync on"
    )
    for r in table:
        print(
            "  ".join(
                v.ljust(w) if i == 0 else v.rjust(w)
                for i, (v, w) in enumerate(zip(r, widths, strict=True))
            )
        )
    lost = sum(r.counts["lost"] + r.counts["errors"] for _, s, p in rows for r in (s, p))
    if lost:
        print(f"warning: {lost} requests lost or answered with errors")


if __name__ == "__main__":
    main()
