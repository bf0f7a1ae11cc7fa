"""``nat64ho bench``: load a handoff server over loopback and compare it with
the ceilings of the same machine, measured in the same run. The load
generator is in :mod:`.load`, the run and its report in :mod:`.report`; the
server never imports this package."""

from nat64ho.bench.load import (
    MAX_NATS,
    MODES,
    REPLY_TIMEOUT,
    BenchConfig,
    Result,
    drive,
    is_bench_nat,
    nat_source,
)
from nat64ho.bench.report import (
    SQLITE_BATCHES,
    Replay,
    Report,
    describe,
    run,
    sqlite_ceiling,
    sqlite_replay,
)

__all__ = [
    "MAX_NATS",
    "MODES",
    "REPLY_TIMEOUT",
    "SQLITE_BATCHES",
    "BenchConfig",
    "Replay",
    "Report",
    "Result",
    "describe",
    "drive",
    "is_bench_nat",
    "nat_source",
    "run",
    "sqlite_ceiling",
    "sqlite_replay",
]
