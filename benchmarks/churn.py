"""RSS of the server under sustained churn on big tables: every MAP is a new
endpoint, so with full tables each one deletes the least recently used entry
of its NAT64 (read from the database, since the default cache holds only a
fraction of the entries). RSS is sampled every few seconds; it should level
off below the budget and stay there.

    python benchmarks/make_tables.py /tmp/big.db
    cp /tmp/big.db /tmp/churn.db
    python benchmarks/churn.py /tmp/churn.db --seconds 600

The database is changed: run it on a copy.
"""

from __future__ import annotations

import argparse
import socket
import sys
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nat64ho import bench, testing  # noqa: E402

#: Seconds between RSS samples.
SAMPLE = 5.0


def gauges(port: int) -> str:
    """The server's cache and backlog gauges, to tell what RSS is made of."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
            text = r.read().decode()
    except OSError as exc:
        return f"(metrics: {exc})"
    keep = ("nat64ho_cache_entries ", "nat64ho_commit_backlog ")
    return "  ".join(
        line.replace("nat64ho_", "") for line in text.splitlines() if line.startswith(keep)
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("db", type=Path)
    ap.add_argument("--seconds", type=float, default=600)
    ap.add_argument("--nats", type=int, default=100)
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--window", type=int, default=256, help="most requests in flight")
    ap.add_argument(
        "--rate",
        type=float,
        default=2000,
        help="new entries/s offered (open loop): a steady churn, not an overload",
    )
    ap.add_argument("--server-arg", action="append", default=[])
    args = ap.parse_args()
    with socket.socket() as s:  # a free loopback port for the metrics endpoint
        s.bind(("127.0.0.1", 0))
        metrics = s.getsockname()[1]
    server = testing.start_server(
        args.db,
        args.db.with_suffix(".log"),
        "full",
        [f"--metrics=127.0.0.1:{metrics}", *args.server_arg],
    )
    samples: list[tuple[float, int]] = []
    stop = threading.Event()

    def sample():
        t0 = time.monotonic()
        while not stop.wait(SAMPLE):
            rss = testing.proc_rss(server.pid)
            samples.append((time.monotonic() - t0, rss))
            print(
                f"{samples[-1][0]:7.0f} s  RSS {rss / 2**20:6.1f} MB  {gauges(metrics)}", flush=True
            )

    threading.Thread(target=sample, daemon=True).start()
    # A slow commit is not a lost request: retrying it would add load, not measure churn.
    cfg = bench.BenchConfig(
        mode="create",
        batch=args.batch,
        window=args.window,
        rate=args.rate,
        duration=args.seconds,
        nats=args.nats,
        warmup=0,
        timeout=30.0,
    )
    try:
        result = bench.drive(cfg, server.address, server.pid)
    finally:
        stop.set()
        peak = testing.proc_peak_rss(server.pid)
        server.stop()
    created = result.counts["messages"]
    half = [rss for t, rss in samples if t >= args.seconds / 2]
    print(
        f"{created:,} new entries in {args.seconds:g} s ({result.messages_per_s:,.0f}/s), "
        f"{result.counts['deleted']:,} deleted, {result.counts['unsent']:,} offered but not sent, "
        f"{result.counts['lost']:,} lost; "
        f"{created / (args.nats * 64508):.1%} of all entries replaced"
    )
    print(
        f"RSS: peak {peak / 2**20:.0f} MB; second half min {min(half) / 2**20:.0f} MB, "
        f"max {max(half) / 2**20:.0f} MB, last {half[-1] / 2**20:.0f} MB"
        if half
        else "no samples"
    )


if __name__ == "__main__":
    main()
