"""What ``serve --ipfix`` adds to each commit: encoding and sending the
committed events to one collector on loopback, in µs per event, beside the
cost of formatting the same events' log lines (which every commit pays).

    python benchmarks/ipfix.py --runs 7
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nat64ho.daemon.ipfix_export import Exporter  # noqa: E402
from nat64ho.eventlog import Event, EventKind, format_event  # noqa: E402

BATCHES = (1, 20, 1000, 20000)


def events(n: int) -> list[Event]:
    t = time.time_ns() // 1000
    kinds = (EventKind.CREATED, EventKind.DELETED)
    return [
        Event(t + i, kinds[i % 2], 0xC0000207, 1028 + i % 64508, os.urandom(16), 1024 + i % 60000)
        for i in range(n)
    ]


def per_event_us(fn, batch: list[Event], runs: int) -> float:
    # Enough repetitions that a small batch is timed over ~20k events.
    reps = max(1, 20000 // len(batch))
    samples = []
    for _ in range(runs):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn(batch)
        samples.append((time.perf_counter() - t0) / (reps * len(batch)) * 1e6)
    return statistics.median(samples)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args()
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))  # never read: the kernel drops what overflows
    exporter = Exporter([sink.getsockname()])
    exporter.start()
    print("events/commit  log lines µs/event  IPFIX export µs/event")
    for n in BATCHES:
        batch = events(n)
        log_us = per_event_us(lambda b: [format_event(e) + "\n" for e in b], batch, args.runs)
        ipfix_us = per_event_us(exporter.export, batch, args.runs)
        print(f"{n:>13}  {log_us:>18.2f}  {ipfix_us:>21.2f}")
    c = exporter.collectors[0]
    print(f"sent {c.messages} messages, {c.records} records; failed: {c.failures or 'none'}")
    exporter.close()
    sink.close()


if __name__ == "__main__":
    main()
