"""Time the sealed history's write side: sealing, import into segments, the
writer's CPU with the hot tier's indexes, the hot tier under constant load,
and what sealing adds to the answers' latency.

    python benchmarks/make_history.py /tmp/h.db --nats 4 --events 1000000 --span-days 1
    python benchmarks/archive_write.py seal /tmp/h.db --period 3600
    python benchmarks/archive_write.py import /tmp/h.db --compare
    python benchmarks/archive_write.py writer --before REV --history 2000000
    python benchmarks/archive_write.py hot --seal-every 2 --periods 24
    python benchmarks/archive_write.py p99 --seal-every 2 --duration 20
    python benchmarks/archive_write.py anatomy /tmp/h.db

``writer --before REV`` runs a server of the tree at git revision REV (one
with the hot tier's three event indexes) beside this one, in the same run.
``hot`` compresses a day: periods of --seal-every seconds stand for hours,
and it reports the most events the hot tier ever held, in periods' worth.
``anatomy`` splits the writer's WAL and CPU by the hot tier's indexes.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import resource
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from statistics import median
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nat64ho.archive import seal as sealing  # noqa: E402
from nat64ho.bench.load import (  # noqa: E402
    POPULATION,
    SERIALS_PER_PROCESS,
    BenchConfig,
    Result,
    drive,
    population_client,
)
from nat64ho.ops import db as opsdb  # noqa: E402
from nat64ho.ops import export  # noqa: E402
from nat64ho.storage import schema, writer  # noqa: E402
from nat64ho.storage.sqlite import PAGE_CACHE_KIB  # noqa: E402
from nat64ho.testing import Child, start_server  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def scratch() -> Iterator[Path]:
    work = Path(tempfile.mkdtemp(prefix="nat64ho-archive-write-"))
    try:
        yield work
    finally:
        shutil.rmtree(work)


def bench_seal(args: argparse.Namespace) -> None:
    """Seal every closed period of a copy of ``args.db`` in this process, as
    ``nat64ho seal`` does (or, ``--batches``, as a server's sealer does)."""
    with scratch() as work, postgresql(args.pg) as url:
        conn: Any
        if url is None:
            db = work / "table.db"
            shutil.copy(args.db, db)
            conn = opsdb.connect(db, readonly=False, create=True)
        else:
            conn = copied_to_postgresql(args.db, url)
        events = conn.execute("SELECT count(*) FROM event").fetchone()[0]
        deleting = [0.0, 0.0]
        originals = {"finish_pending": sealing.finish_pending}

        def timed(f):  # type: ignore[no-untyped-def]
            def run(*a):  # type: ignore[no-untyped-def]
                t, cpu = time.perf_counter(), time.process_time()
                try:
                    return f(*a)
                finally:
                    deleting[0] += time.perf_counter() - t
                    deleting[1] += time.process_time() - cpu

            return run

        for name, f in originals.items():
            setattr(sealing, name, timed(f))
        t, cpu = time.perf_counter(), time.process_time()
        made = sealing.seal(
            conn,
            before=time.time_ns() // 1000,
            period_us=args.period * 1_000_000,
            alone=not args.batches,
        )
        wall, cpu = time.perf_counter() - t, time.process_time() - cpu
        for name, f in originals.items():
            setattr(sealing, name, f)
        sealed = sum(s.events for s in made)
        print(
            f"sealing: {sealed:,} of {events:,} hot events into {len(made)} segments in "
            f"{wall:.1f} s: {sealed / wall:,.0f} events/s wall, {sealed / cpu:,.0f} per CPU "
            f"second; deleting them from the hot tier {deleting[0]:.1f} s wall, "
            f"{deleting[1]:.1f} s CPU; at rest "
            f"{sum(s.size for s in made) / max(1, sealed):.1f} bytes/event"
        )
        conn.close()


def bench_import(args: argparse.Namespace) -> None:
    """``nat64ho import --seal`` of the history of ``args.db`` as a log, into
    a new database; then again (adds nothing); ``--compare``: the import of
    the line-by-line path into the hot tier then ``seal``, same run."""
    with scratch() as work, postgresql(args.pg) as url:
        log = work / "history.log"
        conn = schema.open_db(args.db, readonly=True)
        with open(log, "w") as f:
            lines = export.write_log(export.history_rows(conn), f)
        conn.close()

        def timed(*cmd: str) -> tuple[float, float]:
            """(wall, CPU) seconds of a nat64ho command."""
            t = time.perf_counter()
            cpu = _children_cpu()
            r = subprocess.run(
                [sys.executable, "-m", "nat64ho", *cmd], capture_output=True, text=True
            )
            took = time.perf_counter() - t
            if r.returncode != 0:
                raise SystemExit(r.stderr)
            said = (r.stderr or r.stdout).strip().splitlines()
            print(f"    {' '.join(cmd[:2])} ...: {said[-1] if said else ''}")
            return took, _children_cpu() - cpu

        def rates(what: str, wall: float, cpu: float) -> None:
            print(
                f"{what}: {lines:,} lines in {wall:.1f} s: {lines / wall:,.0f} lines/s wall, "
                f"{lines / cpu:,.0f} per CPU second"
            )

        fresh = str(work / "seal.db") if url is None else url
        rates("import --seal (command)", *timed("import", "--seal", str(log), "--db", fresh))
        rates("the same log again (adds nothing)", *timed("import", str(log), "--db", fresh))
        if args.compare:
            old = work / "hot.db"
            wall, cpu = timed("import", str(log), "--db", str(old))
            w2, c2 = timed("seal", "--db", str(old), "--period", "3600")
            rates("import into the hot tier, then seal", wall + w2, cpu + c2)


@contextlib.contextmanager
def postgresql(wanted: bool) -> Iterator[str | None]:
    """The URL of a database of a temporary PostgreSQL cluster, if ``wanted``."""
    if not wanted:
        yield None
        return
    from tests import pgcluster

    why = pgcluster.missing()
    if why:
        raise SystemExit(why)
    cluster = pgcluster.Cluster().start()
    try:
        yield cluster.url()
    finally:
        cluster.stop()


def copied_to_postgresql(db: Path, url: str) -> Any:
    """The events of SQLite ``db`` in the hot tier of a new PostgreSQL
    database (COPY); an operator connection to it."""
    import asyncio

    import asyncpg

    from nat64ho.ops import pgconn

    pgconn.connect(url, create=True).close()
    src = schema.open_db(db, readonly=True)
    rows = src.execute("SELECT id, ts, kind, nat, port, addr, aport FROM event").fetchall()
    src.close()

    async def load() -> None:
        conn = await asyncpg.connect(url)
        try:
            cols = ["id", "ts", "kind", "nat", "port", "addr", "aport"]
            await conn.copy_records_to_table("event", records=rows, columns=cols)
            # Ids given, as a restore gives them: the sequence goes past them.
            await conn.execute(
                "SELECT setval(pg_get_serial_sequence('event', 'id'), max(id)) FROM event"
            )
            await conn.execute("ANALYZE event")
        finally:
            await conn.close()

    asyncio.run(load())
    return pgconn.connect(url)


def _children_cpu() -> float:
    use = resource.getrusage(resource.RUSAGE_CHILDREN)
    return use.ru_utime + use.ru_stime


def serve(work: Path, name: str, extra: list[str], tree: Path | None = None) -> Child:
    db, log = work / f"{name}.db", work / f"{name}.log"
    if tree is None:
        return start_server(db, log, "full", extra)
    from nat64ho.testing import serve_command

    limits = ["--hello-rate", "0", "--create-rate", "0", "--request-rate", "0"]
    cmd, env = tree_command(tree, serve_command(db, log, "--sync", "full", *limits, *extra))
    return Child(cmd, env=env)


def tree_command(tree: Path, cmd: list[str]) -> tuple[list[str], dict[str, str]]:
    """``cmd`` (``python -m nat64ho …``) run on the package of ``tree``, and
    its environment. ``-P``: ``-m`` would otherwise put the working
    directory first on the path, and from this checkout that is this
    tree's package, which would also migrate the other tree's database."""
    return [cmd[0], "-P", *cmd[1:]], {"PYTHONPATH": str(tree)}


def load(duration: float, rate: float, population: bool = False, run: int = 0) -> BenchConfig:
    """A load of new entries; with ``population``, the ``run``-th on one
    history asks for clients none of the earlier runs did."""
    return BenchConfig(
        mode="create",
        batch=1,
        rate=rate,
        window=512,
        duration=duration,
        population=population,
        population_start=run * SERIALS_PER_PROCESS,  # one client process a run
    )


def per_entry(r: Result) -> tuple[float, float]:
    """µs of server CPU, and of its writer, per new entry answered."""
    assert r.cpu is not None and r.cpu_by is not None
    n = max(1, r.counts["messages"])
    return r.cpu * r.seconds / n * 1e6, r.cpu_by.get("writer", 0.0) * r.seconds / n * 1e6


def read_through(db: Path) -> None:
    """Read ``db`` whole, into the page cache, as a server running for
    days has the pages it writes. The history built first would otherwise
    be read from the disk once the other was built after it, and its
    writer's reads are not what the comparison is about."""
    with db.open("rb") as f:
        while f.read(1 << 24):
            pass


def seal_all_but_last_hour(db: Path) -> None:
    """What a server sealing hourly keeps of a history: the events of its
    last one to two hours (``nat64ho seal --before``)."""
    conn = schema.open_db(db, readonly=True)
    last = conn.execute("SELECT max(ts) FROM event").fetchone()[0]
    conn.close()
    hour = 3_600_000_000
    before = sealing.period_start(last - hour, hour)
    iso = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(before // 1_000_000))
    cmd = [sys.executable, "-m", "nat64ho", "seal", "--db", str(db), "--before", iso]
    subprocess.run(cmd, check=True, capture_output=True)


def bench_writer(args: argparse.Namespace) -> None:
    """Server CPU per new entry at a fixed open-loop rate: the tree at
    ``--before`` (its hot tier's indexes) and this one, alternately; with
    ``--sealed``, this one's history sealed as a server sealing hourly
    would have it (the before tree keeps its whole history in the table).
    With ``--churn``, the history is the load's own NAT64's (full tables:
    each new entry evicts one, two events) and the load's clients are the
    history's, so new events land across its indexes, not beside each
    other at one end of them."""
    if args.churn and not args.history:
        raise SystemExit("--churn needs --history")
    # Each run's new clients must be its own: a repeat asking for an endpoint
    # an earlier run created would find it, not create it.
    if args.churn and args.rate * (args.duration + 2) > SERIALS_PER_PROCESS:
        raise SystemExit(f"--churn: at most {SERIALS_PER_PROCESS:,} new entries a run")
    if args.churn and args.repeat * SERIALS_PER_PROCESS > POPULATION:
        raise SystemExit(f"--churn: at most {POPULATION // SERIALS_PER_PROCESS} repeats")
    with scratch() as work:
        base = work / "before"
        base.mkdir()
        tar = subprocess.run(
            ["git", "-C", str(ROOT), "archive", args.before], capture_output=True, check=True
        )
        subprocess.run(["tar", "-x", "-C", str(base)], input=tar.stdout, check=True)
        # Both histories from this generator (its --nat-base is newer), each
        # with its own tree's schema: it imports the tree it sits in.
        shutil.copy(ROOT / "benchmarks" / "make_history.py", base / "benchmarks")
        churn = ["--nat-base", "127.1.0.0"] if args.churn else []
        got: dict[str, list[tuple[float, float]]] = {"before": [], "after": []}
        for rnd in range(args.rounds):
            for name, tree in (("before", base), ("after", None)):
                if args.history:
                    # A hot tier of this many events already, made by that tree.
                    subprocess.run(
                        [
                            sys.executable,
                            str((tree or ROOT) / "benchmarks" / "make_history.py"),
                            str(work / f"{name}{rnd}.db"),
                            "--nats",
                            "4",
                            "--events",
                            str(args.history),
                            "--span-days",
                            str(args.span_days),
                            *churn,
                        ],
                        check=True,
                        capture_output=True,
                        env=dict(os.environ, PYTHONPATH=str(tree or ROOT)),
                    )
                    if args.sealed and tree is None:
                        seal_all_but_last_hour(work / f"{name}{rnd}.db")
            # Runs alternate on the same two histories: the machine's drift
            # (±15% from one run to the next here) falls on both alike, and a
            # repeat costs seconds where a history costs many minutes.
            for run in range(args.repeat):
                for name, tree in (("before", base), ("after", None)):
                    read_through(work / f"{name}{rnd}.db")
                    child = serve(work, f"{name}{rnd}", ["--seal-every", "0"], tree)
                    try:
                        cfg = load(args.duration, args.rate, args.churn, run)
                        r = drive(cfg, child.address, child.pid)
                    finally:
                        child.stop()
                    got[name].append(per_entry(r))
                    print(f"{name}: server {got[name][-1][0]:.1f}, writer {got[name][-1][1]:.1f}")
        for name, runs in got.items():
            print(
                f"{name}: server {median(a for a, _ in runs):.1f} µs CPU per new entry, "
                f"writer {median(w for _, w in runs):.1f} (median of {len(runs)} at "
                f"{args.rate:,.0f}/s; writer {min(w for _, w in runs):.1f} to "
                f"{max(w for _, w in runs):.1f})"
            )
        b, a = (median(w for _, w in got[k]) for k in ("before", "after"))
        sb, sa = (median(s for s, _ in got[k]) for k in ("before", "after"))
        pairs = [1 - a / b for (_, b), (_, a) in zip(got["before"], got["after"], strict=True)]
        print(
            f"writer CPU per entry {(1 - a / b) * 100:.0f}% lower (medians; run by run "
            f"{', '.join(f'{x * 100:.0f}%' for x in pairs)}); server {(1 - sa / sb) * 100:.0f}%"
        )


def bench_anatomy(args: argparse.Namespace) -> None:
    """Where the writer's work goes: its own commit (``writer._commit``) of
    ``--per-commit`` new entries at a time on a copy of ``args.db``, each
    taking the least recently used entry's port (Deleted, Created), with
    the clients of make_history.py's population; once with every index,
    then with each of the database's own indexes left out (a tree from
    before the hot tier has its address index too). Checkpoints are off, so
    the WAL's growth is what the commits wrote."""
    conn = sqlite3.connect(f"file:{args.db}?mode=ro", uri=True)
    indexes = [
        name
        for (name,) in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL "
            "AND tbl_name IN ('entry', 'event') ORDER BY name"
        )
    ]
    conn.close()
    with scratch() as work:
        for drop in (None, *indexes):
            db = work / "copy.db"
            shutil.copy(args.db, db)
            size, cpu, page = _anatomy_run(db, drop, args.per_commit, args.warm, args.commits)
            n = args.commits * args.per_commit
            print(
                f"{'without ' + drop if drop else 'every index'}: {size / n:,.0f} WAL octets, "
                f"{size / (page + 24) / args.commits:.1f} pages a commit, "
                f"{cpu / n * 1e6:.1f} µs CPU per new entry",
                flush=True,
            )
            for f in work.iterdir():
                f.unlink()


def _anatomy_run(
    db: Path, drop: str | None, per_commit: int, warm: int, commits: int
) -> tuple[int, float, int]:
    """WAL octets and CPU seconds of ``commits`` commits, and the page size."""
    conn = sqlite3.connect(db, isolation_level=None)
    if drop:
        conn.execute(f"DROP INDEX {drop}")
    conn.execute(f"PRAGMA cache_size = -{PAGE_CACHE_KIB}")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("PRAGMA wal_autocheckpoint = 0")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    page = conn.execute("PRAGMA page_size").fetchone()[0]
    victims = iter(conn.execute("SELECT nat, port, addr, aport FROM entry ORDER BY last_use, port"))
    now = conn.execute("SELECT max(ts) FROM event").fetchone()[0]
    serials = itertools.count()

    def group() -> writer.Group:
        nonlocal now
        entries, events = [], []
        for _ in range(per_commit):
            nat, port, addr, aport = next(victims)
            new = population_client(next(serials))
            now += 1
            # The history's clients use ports from 1024 up: 443 is never theirs.
            entries.append((nat, port, new, 443, now, now))
            events += [(now, 2, nat, port, addr, aport), (now, 1, nat, port, new, 443)]
        return entries, [], events, [], now

    for _ in range(warm):
        writer._commit(conn, [group()])
    wal = Path(f"{db}-wal")
    size, cpu = wal.stat().st_size, time.process_time()
    for _ in range(commits):
        writer._commit(conn, [group()])
    cpu = time.process_time() - cpu
    size = wal.stat().st_size - size
    conn.close()
    return size, cpu, page


def bench_hot(args: argparse.Namespace) -> None:
    """A server at a constant rate for ``--periods`` periods of
    ``--seal-every`` seconds; the hot tier's size sampled all along."""
    with scratch() as work:
        child = serve(work, "hot", ["--seal-every", str(args.seal_every)])
        samples: list[int] = []
        stop = threading.Event()

        def sample() -> None:
            conn = None
            while not stop.wait(args.seal_every / 10):
                try:
                    conn = conn or schema.open_db(work / "hot.db", readonly=True)
                    samples.append(conn.execute("SELECT count(*) FROM event").fetchone()[0])
                except Exception:  # noqa: BLE001 - not created yet
                    conn = None

        watcher = threading.Thread(target=sample, daemon=True)
        watcher.start()
        try:
            r = drive(load(args.seal_every * args.periods, args.rate), child.address, child.pid)
        finally:
            stop.set()
            watcher.join()
            child.stop()
        conn = schema.open_db(work / "hot.db", readonly=True)
        sealed, segs = conn.execute("SELECT sum(events), count(*) FROM segment").fetchone()
        hot = conn.execute("SELECT count(*) FROM event").fetchone()[0]
        conn.close()
        per_period = (sealed + hot) / (r.seconds + 1) * args.seal_every  # events a period
        print(
            f"hot tier over {args.periods} periods of {args.seal_every} s at "
            f"{r.messages_per_s:,.0f} new entries/s: at most {max(samples):,} events "
            f"({max(samples) / per_period:.2f} periods' worth), {hot:,} at the end; "
            f"{segs} segments, {sealed:,} events sealed"
        )


def bench_p99(args: argparse.Namespace) -> None:
    """The same load on a server that never seals and one that seals every
    ``--seal-every`` seconds: the latency of the answers."""
    with scratch() as work:
        out = {}
        for name, every in (
            ("no seal", "0"),
            (f"--seal-every {args.seal_every}", str(args.seal_every)),
        ):
            child = serve(work, name.replace(" ", "-"), ["--seal-every", every])
            try:
                r = drive(load(args.duration, args.rate), child.address, child.pid)
            finally:
                child.stop()
            out[name] = r
            print(
                f"{name}: {r.messages_per_s:,.0f} answers/s, p50 {r.percentile(0.5) * 1e3:.2f} ms, "  # type: ignore[operator]
                f"p99 {r.percentile(0.99) * 1e3:.2f} ms, p99.9 {r.percentile(0.999) * 1e3:.2f} ms"  # type: ignore[operator]
            )
        a, b = out.values()
        print(f"a seal adds {(b.percentile(0.99) - a.percentile(0.99)) * 1e3:+.2f} ms to p99")  # type: ignore[operator]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    p = sub.add_parser("seal", help="seal a copy of a make_history.py database")
    p.add_argument("db", type=Path)
    p.add_argument("--period", type=int, default=3600, help="seconds per segment")
    p.add_argument(
        "--batches", action="store_true", help="delete in a server's batches (as serve does)"
    )
    p.add_argument("--pg", action="store_true", help="on a temporary PostgreSQL cluster")
    p.set_defaults(run=bench_seal)
    p = sub.add_parser("import", help="import --seal of a database's history as a log")
    p.add_argument("db", type=Path)
    p.add_argument("--compare", action="store_true", help="also the hot-tier import + seal")
    p.add_argument("--pg", action="store_true", help="on a temporary PostgreSQL cluster")
    p.set_defaults(run=bench_import)
    p = sub.add_parser("writer", help="server CPU per new entry, before and after")
    p.add_argument("--before", required=True, help="git revision of the tree to compare with")
    p.add_argument("--rate", type=float, default=3000)
    p.add_argument("--duration", type=float, default=15)
    p.add_argument("--rounds", type=int, default=2, help="histories built, each pair afresh")
    p.add_argument(
        "--repeat", type=int, default=1, help="runs of each tree, alternating, per history"
    )
    p.add_argument("--history", type=int, default=0, help="events in the history before the load")
    p.add_argument("--span-days", type=float, default=0.1, help="days the history spans")
    p.add_argument(
        "--sealed",
        action="store_true",
        help="this tree's history sealed but for its last one to two hours",
    )
    p.add_argument(
        "--churn",
        action="store_true",
        help="the history is the load's NAT64's, with full tables, and the load's "
        "clients are the history's (needs --history)",
    )
    p.set_defaults(run=bench_writer)
    p = sub.add_parser("anatomy", help="the writer's WAL and CPU per index of the hot tier")
    p.add_argument("db", type=Path, help="a history with full tables (make_history.py)")
    p.add_argument("--per-commit", type=int, default=12, help="new entries a commit")
    p.add_argument("--warm", type=int, default=500, help="commits before measuring")
    p.add_argument("--commits", type=int, default=2000, help="commits measured")
    p.set_defaults(run=bench_anatomy)
    p = sub.add_parser("hot", help="the hot tier's size under constant load")
    p.add_argument("--seal-every", type=float, default=2)
    p.add_argument("--periods", type=int, default=24)
    p.add_argument("--rate", type=float, default=3000)
    p.set_defaults(run=bench_hot)
    p = sub.add_parser("p99", help="what sealing adds to the answers' p99")
    p.add_argument("--seal-every", type=float, default=2)
    p.add_argument("--duration", type=float, default=20)
    p.add_argument("--rate", type=float, default=3000)
    p.set_defaults(run=bench_p99)
    args = ap.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
