"""Server CPU per message at a fixed offered rate, beside a bare UDP echo.

Each run starts ``nat64ho serve`` on a temporary database, offers a fixed
rate open loop (so the client sharing the cores does not set the pace), and
reads the CPU of the server's whole process tree from /proc (every process
and thread: workers and the writer count) before and after: CPU per message
is then independent of how fast the client could go. A bare uvloop UDP echo
server is measured the same way at the same rate in the same run; the ratio
to it is the figure of merit. Each create run is also compared with raw
SQLite writing the rows the server wrote, at the entries per commit it
made (read from its metrics): SQLite's own CPU per entry, and for the
closed-loop create with batch 20 its rate.

    python benchmarks/efficiency.py --duration 6
    python benchmarks/efficiency.py --duration 6 --empty-table-ceiling
    python benchmarks/efficiency.py --duration 6 --nats 2 --server-arg=--workers=2
"""

from __future__ import annotations

import argparse
import re
import socket
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nat64ho.bench.load import BenchConfig, Result, drive, start_echo  # noqa: E402
from nat64ho.bench.report import sqlite_ceiling, sqlite_replay  # noqa: E402
from nat64ho.testing import start_server  # noqa: E402

#: (name, configuration, target)
RUNS = [
    ("create b1 3,000/s", dict(mode="create", batch=1, rate=3000, window=512), "<= 3.0 x echo"),
    ("create b1 10,000/s", dict(mode="create", batch=1, rate=10000, window=1024), "p99 <= 10 ms"),
    ("lookup b1 10,000/s", dict(mode="lookup", batch=1, rate=10000, window=512), "<= 1.3 x echo"),
    ("create b20 window 64", dict(mode="create", batch=20, window=64), ">= 0.7 raw SQLite"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def commit_rows(metrics: str) -> tuple[float, float]:
    """(sum of rows, commits) from the server's commit-size histogram."""
    for _ in range(50):  # metrics start just after the socket
        try:
            text = urllib.request.urlopen(f"http://{metrics}/metrics", timeout=5).read().decode()
            break
        except OSError:
            time.sleep(0.1)
    else:
        raise RuntimeError(f"no metrics at {metrics}")
    total = re.search(r"^nat64ho_commit_batch_rows_sum (\S+)", text, re.M)
    count = re.search(r"^nat64ho_commit_batch_rows_count (\S+)", text, re.M)
    return (float(total.group(1)) if total else 0.0, float(count.group(1)) if count else 0.0)


def per_message(r: Result) -> float:
    """µs of server CPU per message answered in the measured window."""
    assert r.cpu is not None
    return r.cpu * r.seconds / max(1, r.counts["messages"]) * 1e6


def writer_share(r: Result) -> float:
    """µs of the writer process's CPU per message answered."""
    assert r.cpu_by is not None
    return r.cpu_by["writer"] * r.seconds / max(1, r.counts["messages"]) * 1e6


def ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1e3:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=6.0)
    ap.add_argument("--only", help="run only those whose name contains this")
    ap.add_argument("--server-arg", action="append", default=[], help="passed to serve")
    ap.add_argument("--entries", type=int, default=5000, help="entries looked up (cached)")
    ap.add_argument("--nats", type=int, default=1, help="NAT64s (source addresses) sending")
    ap.add_argument(
        "--empty-table-ceiling",
        action="store_true",
        help="also compare batch 20 with the earlier ceiling: new rows into an empty table",
    )
    args = ap.parse_args()
    workers = 1
    for i, a in enumerate(args.server_arg):
        if a.startswith("--workers="):
            workers = int(a.split("=", 1)[1])
        elif a == "--workers" and i + 1 < len(args.server_arg):
            workers = int(args.server_arg[i + 1])
    print(
        "| run | offered/s | answered/s | server µs/msg | of which writer | echo µs/msg | ratio "
        "| raw SQLite µs/entry (entries/commit) | p50 / p99 ms | lost | target |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for name, kw, target in RUNS:
        if args.only and args.only not in name:
            continue
        cfg = BenchConfig(duration=args.duration, entries=args.entries, nats=args.nats, **kw)  # type: ignore[arg-type]
        # Commit sizes come from the metrics, which one worker alone serves.
        metrics = None if workers > 1 else f"127.0.0.1:{free_port()}"
        with tempfile.TemporaryDirectory(prefix="nat64ho-eff-") as tmp:
            db = Path(tmp) / "t.db"
            child = start_server(
                db,
                Path(tmp) / "t.log",
                "full",
                [*(["--metrics", metrics] if metrics else []), *args.server_arg],
            )
            try:
                before = commit_rows(metrics) if metrics else (0.0, 0.0)
                r = drive(cfg, child.address, child.pid)
                after = commit_rows(metrics) if metrics else (0.0, 0.0)
            finally:
                child.stop()
            creates = cfg.mode == "create"
            replay = None
            if creates and metrics is not None:
                # The same rows, at the same entries per commit, on the same
                # table: what SQLite alone costs for the server's work.
                per_commit = max(1, round(r.counts["messages"] / max(1.0, after[1] - before[1])))
                replay = sqlite_replay(db, Path(tmp), "full", per_commit, r.counts["messages"])
                raw_text = f"{replay.cpu_us:.1f} ({per_commit:,})"
            else:
                raw_text = "-"
            if cfg.rate:
                echo = start_echo()
                try:
                    e = drive(cfg, echo.address, echo.pid, echo=True)
                finally:
                    echo.stop()
                ratio = per_message(r) / per_message(e)
                echo_text, ratio_text = f"{per_message(e):.1f}", f"{ratio:.2f} x echo"
                if replay is not None:
                    ratio_text += f" (SQLite alone: {replay.cpu_us / per_message(e):.2f} x)"
            elif replay is None:
                echo_text, ratio_text = "-", "- (commit sizes need --metrics: one worker)"
            else:
                echo_text = "-"
                ratio_text = (
                    f"{r.messages_per_s / replay.rate:.2f} of raw SQLite writing the same rows "
                    f"({replay.rate:,.0f}/s)"
                )
                if args.empty_table_ceiling:
                    raw, _ = sqlite_ceiling(Path(tmp), "full", cfg.nats, batches=(per_commit,))
                    ratio_text += f"; {r.messages_per_s / raw:.2f} of new rows into an empty table"
            print(
                f"| {name} | {f'{cfg.rate:,.0f}' if cfg.rate else '-'} | {r.messages_per_s:,.0f} | "
                f"{per_message(r):.1f} | {writer_share(r):.1f} | {echo_text} | {ratio_text} | "
                f"{raw_text} | {ms(r.percentile(0.5))} / {ms(r.percentile(0.99))} | "
                f"{r.counts['lost'] + r.counts['unsent']} | {target} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
