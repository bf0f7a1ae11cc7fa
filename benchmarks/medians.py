"""The README's performance table: each ``nat64ho bench`` configuration run
several times, medians reported. Each run measures its own ceilings, so a
ratio compares numbers taken minutes apart on the same machine, not days.

    python benchmarks/medians.py --runs 3 --duration 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nat64ho.bench import BenchConfig, run  # noqa: E402

#: (name, configuration, the equivalent command line)
CONFIGS = [
    (
        "create, batch 20, sync full",
        dict(mode="create", batch=20, window=64),
        "nat64ho bench --mode create --batch 20 --window 64 --sync full",
    ),
    (
        "lookup, batch 50",
        dict(mode="lookup", batch=50, window=32),
        "nat64ho bench --mode lookup --batch 50 --window 32",
    ),
    (
        "lookup, batch 1",
        dict(mode="lookup", batch=1, window=32),
        "nat64ho bench --mode lookup --batch 1 --window 32",
    ),
    (
        "create, batch 1, 5,000/s offered",
        dict(mode="create", batch=1, window=512, rate=5000),
        "nat64ho bench --mode create --batch 1 --rate 5000 --window 512 --sync full",
    ),
    (
        "mixed, batch 10, 10 NAT64s",
        dict(mode="mixed", batch=10, window=32, nats=10, entries=5000),
        "nat64ho bench --mode mixed --batch 10 --window 32 --nats 10 --entries 5000",
    ),
]


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--only", help="run only configurations whose name contains this")
    args = ap.parse_args()
    print(
        "| run | messages/s | datagrams/s | ceiling | ratio | p50 / p99 / p99.9 ms | server CPU | peak RSS MB |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, kw, command in CONFIGS:
        if args.only and args.only not in name:
            continue
        reports = [run(BenchConfig(duration=args.duration, **kw)) for _ in range(args.runs)]
        s = [r.server for r in reports]
        msgs = median([x.messages_per_s for x in s])
        dgrams = median([x.datagrams_per_s for x in s])
        if kw["mode"] == "create" and not kw.get("rate"):
            ceiling = median([r.sqlite[0] for r in reports])
            ratio = median(
                [x.messages_per_s / r.sqlite[0] for x, r in zip(s, reports, strict=True)]
            )
            ceiling_text = f"{ceiling:,.0f} entries/s (SQLite)"
        else:
            ceiling = median([r.echo.datagrams_per_s for r in reports])
            ratio = median(
                [
                    x.datagrams_per_s / r.echo.datagrams_per_s
                    for x, r in zip(s, reports, strict=True)
                ]
            )
            ceiling_text = f"{ceiling:,.0f} datagrams/s (echo)"
        lat = "/".join(
            f"{median([x.percentile(q) for x in s]) * 1e3:.1f}" for q in (0.5, 0.99, 0.999)
        )
        cpu = median([x.cpu for x in s])
        rss = median([x.peak_rss for x in s]) / 2**20
        lost = sum(x.counts["lost"] + x.counts["unsent"] for x in s)
        print(
            f"| {name} | {msgs:,.0f} | {dgrams:,.0f} | {ceiling_text} | {ratio:.2f} | {lat} | "
            f"{cpu:.2f} | {rss:.0f} |" + (f" ({lost} lost or unsent)" if lost else "")
        )
        print(f"<!-- {command} --duration {args.duration:g}  (x{args.runs}) -->", flush=True)


if __name__ == "__main__":
    main()
