"""Import and export of one log on both backends: lines/s and peak RSS.

    python benchmarks/ops_backends.py [--lines 1000000] [--pg URL]

Writes a log of ``--lines`` Created lines, then runs ``nat64ho import`` into
a new SQLite file and into an empty PostgreSQL database, and ``nat64ho
export -o`` back out of each (checked equal to the log), each command in a
fresh process timed whole (start-up included). Peak RSS is the command's
own (wait4), not PostgreSQL's. Without --pg a throwaway cluster is started
as the tests do (Debian's postgresql package).
"""

from __future__ import annotations

import argparse
import datetime as dt
import filecmp
import ipaddress
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests import pgcluster  # noqa: E402

BASE = int(ipaddress.IPv6Address("2001:db8::"))


def write_log(path: Path, n: int) -> None:
    """``n`` distinct Created lines, 1 ms apart, over 16 NAT64s."""
    start = int(dt.datetime(2024, 1, 1, tzinfo=dt.UTC).timestamp())
    with open(path, "w", encoding="ascii") as f:
        day_s = ""
        second = -1
        buf = []
        for i in range(n):
            s, ms = divmod(i, 1000)
            if s != second:
                second = s
                day_s = dt.datetime.fromtimestamp(start + s, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
            buf.append(
                f"{day_s}.{ms * 1000:06d} Created 192.0.2.{i % 16 + 1}:{1028 + i // 16 % 64000} "
                f"[{ipaddress.IPv6Address(BASE + i)}]:{1024 + i % 60000}\n"
            )
            if len(buf) == 10000:
                f.write("".join(buf))
                buf.clear()
        f.write("".join(buf))


def command(*args: str) -> tuple[float, int, str]:
    """Seconds, peak RSS in KiB, and stderr of one ``nat64ho`` run."""
    t = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "nat64ho", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    took = time.perf_counter() - t
    if proc.returncode:
        raise SystemExit(f"nat64ho {' '.join(args)}: exit {proc.returncode}: {err}")
    return took, usage.ru_maxrss, err.strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lines", type=int, default=1_000_000)
    ap.add_argument("--pg", metavar="URL", help="an empty PostgreSQL database to import into")
    a = ap.parse_args()
    cluster = None
    url = a.pg
    if url is None:
        why = pgcluster.missing()
        if why:
            raise SystemExit(why)
        cluster = pgcluster.Cluster().start()
        url = cluster.url()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            log = Path(tmp) / "big.log"
            write_log(log, a.lines)
            print(f"{a.lines} lines, {log.stat().st_size / 2**20:.0f} MiB of log")
            print(f"{'backend':<11} {'command':<7} {'seconds':>8} {'lines/s':>10} {'peak RSS':>9}")
            for name, db in (("sqlite", str(Path(tmp) / "t.db")), ("postgresql", url)):
                out = Path(tmp) / f"{name}.log"
                for op, args in (
                    ("import", ("import", str(log), "--db", db)),
                    ("export", ("export", "--db", db, "-o", str(out))),
                ):
                    took, rss, _ = command(*args)
                    print(
                        f"{name:<11} {op:<7} {took:8.2f} {a.lines / took:10,.0f} "
                        f"{rss / 1024:6.0f} MiB",
                        flush=True,
                    )
                if not filecmp.cmp(log, out, shallow=False):
                    raise SystemExit(f"{name}: the export differs from the log")
    finally:
        if cluster is not None:
            cluster.stop()


if __name__ == "__main__":
    main()
