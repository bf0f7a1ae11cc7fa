"""The sealed tier: segments written by ``nat64ho seal``, read back by other
engines, and every reader giving the same answers across the two tiers;
``check`` finding each kind of tampering; SIGKILL during seals. On both
backends (segments are files beside an SQLite database, rows of
segment_data on PostgreSQL), but for what concerns files."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import random
import shutil
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from nat64ho.core import wire
from nat64ho.core.records import Event, EventKind
from nat64ho.eventlog import format_event, parse_line, ts_str
from nat64ho.ops import queries
from nat64ho.ops.db import atomic as schema_atomic
from nat64ho.storage.schema import is_postgres
from tests.helpers import (
    Follower,
    connect,
    db_exec,
    db_rows,
    nat64ho,
    one_error,
    ops_conn,
    table_owned,
    v6,
    wait_for,
)

NATS = (0xC0000209, 0xC000020A)  # 192.0.2.9, 192.0.2.10
START = 1_767_225_600_000_000  # 2026-01-01 00:00 UTC
HOUR = 3_600_000_000


def churn_log(n: int, *, seed: int = 7, ports: int = 300, start: int = START) -> list[str]:
    """Log lines of tables under churn: ports handed from client to client
    (Deleted then Created at one instant), over about ``n`` events."""
    rnd = random.Random(seed)
    clients = [
        ipaddress.IPv6Address(
            0x20010DB8 << 96 | rnd.getrandbits(64) << 16 | rnd.getrandbits(8)
        ).packed
        for _ in range(200)
    ]
    held: dict[tuple[int, int], tuple[bytes, int]] = {}
    ts = start
    events = [Event(ts, EventKind.INITIALIZED, nat) for nat in NATS]
    while len(events) < n:
        ts += rnd.randint(1, 40_000_000)
        key = (rnd.choice(NATS), 1024 + rnd.randrange(ports))
        if key in held:
            addr, aport = held.pop(key)
            events.append(Event(ts, EventKind.DELETED, *key, addr, aport))
            if rnd.random() < 0.3:
                continue
        endpoint = (rnd.choice(clients), rnd.randint(1024, 65535))
        if endpoint in held.values():
            continue
        held[key] = endpoint
        events.append(Event(ts, EventKind.CREATED, *key, *endpoint))
    return [format_event(e) + "\n" for e in events]


def imported(
    tmp_path: Path, lines: list[str], db: Path | str | None = None, name: str = "table.db"
) -> tuple[Path | str, Path]:
    """``lines`` imported into ``db`` (default: an SQLite file ``name``)."""
    log = tmp_path / f"{name}.log"
    log.write_text("".join(lines))
    db = db or tmp_path / name
    r = nat64ho("import", str(log), "--db", str(db))
    assert r.returncode == 0, r.stderr
    return db, log


@pytest.fixture
def twin(request, db_target: str, tmp_path: Path) -> str:
    """Another database of ``db_target``'s backend: the same history, left unsealed."""
    if is_postgres(db_target):
        return request.getfixturevalue("pg_cluster").url()
    return str(tmp_path / "before.db")


def stats_of(db: Path | str, fmt: str) -> str:
    r = nat64ho("stats", "--db", str(db), "--format", fmt)
    assert r.returncode == 0, r.stderr
    return r.stdout


def seal(db: Path | str, *args: str) -> subprocess.CompletedProcess:
    r = nat64ho("seal", "--db", str(db), *args)
    assert r.returncode == 0, r.stderr
    return r


def stored(db: Path | str, directory: Path | None = None) -> set[str]:
    """Names of the segments the archive holds: files in ``directory`` (by
    default archive/ beside an SQLite file), rows of segment_data on PostgreSQL."""
    if is_postgres(str(db)):
        return {r[0] for r in db_rows(db, "SELECT file FROM segment JOIN segment_data USING (n)")}
    return {f.name for f in (directory or Path(db).parent / "archive").iterdir()}


def export(db: Path | str, *args: str) -> str:
    r = nat64ho("export", "--db", str(db), *args)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_segments_are_sorted_zstd_parquet_that_other_engines_read(tmp_path):
    duckdb = pytest.importorskip("duckdb")
    db, log = imported(tmp_path, churn_log(3000))
    out = seal(db, "--period", "7200").stdout
    assert "segments sealed" in out and "chain head" in out
    files = sorted((tmp_path / "archive").glob("segment-*.parquet"))
    assert len(files) >= 3
    meta = pq.ParquetFile(files[1]).metadata
    col = meta.row_group(0).column(0)
    assert col.compression == "ZSTD" and col.statistics.has_min_max
    assert col.has_column_index and col.has_offset_index  # the page index
    t = pq.read_table(files[1])
    keys = list(zip(*(t[c].to_pylist() for c in ("nat", "port", "ts")), strict=True))
    assert keys == sorted(keys) and len(keys) > 100
    # The whole archive as one dataset, and as DuckDB reads it: every
    # sealed event, and none is left in the hot tier below the last one.
    sealed = pads.dataset([str(f) for f in files], format="parquet").count_rows()
    rows = db_rows(db, "SELECT count(*) FROM segment")[0][0]
    assert rows == len(files)
    assert sealed == db_rows(db, "SELECT sum(events) FROM segment")[0][0]
    hot = db_rows(db, "SELECT count(*) FROM event")[0][0]
    assert sealed + hot == len(log.read_text().splitlines())
    con = duckdb.connect()
    n, created = con.execute(
        "SELECT count(*), count(*) FILTER (WHERE kind = 1) FROM read_parquet(?)",
        [str(tmp_path / "archive" / "*.parquet")],
    ).fetchone()
    assert n == sealed and created == db_rows(db, "SELECT sum(created) FROM segment")[0][0]


def test_readers_give_the_same_answers_across_a_seal(tmp_path, db_target, twin, monkeypatch):
    from nat64ho.archive import tiers

    # Segments read from PostgreSQL are let go of a few at a time, in between.
    monkeypatch.setattr(tiers, "_HELD_IN_MEMORY", 2)
    lines = churn_log(4000)
    db, log = imported(tmp_path, lines, db_target)
    before, _ = imported(tmp_path, lines, twin, name="before")
    windows = [
        (),
        ("--since", ts_str(START + 5 * HOUR), "--until", ts_str(START + 20 * HOUR)),
        ("--nat", "192.0.2.10"),
        ("--after", "1500"),
        ("--format", "jsonl"),
        ("--format", "csv", "--since", ts_str(START + 30 * HOUR)),
    ]
    expected = [export(before, *w) for w in windows]
    assert expected[0] == log.read_text()
    seal(db, "--period", "7200")
    assert db_rows(db, "SELECT count(*) FROM segment")[0][0] >= 5
    assert db_rows(db, "SELECT count(*) FROM event")[0][0] < len(lines) // 4
    for w, text in zip(windows, expected, strict=True):
        assert export(db, *w) == text, w

    # who, in the library: 200 random (port, time) pairs, windows, clients.
    rnd = random.Random(3)
    a = ops_conn(before, readonly=True)
    b = ops_conn(db, readonly=True)
    end = START + len(lines) * 20_000_000
    found = 0
    for _ in range(200):
        nat, port, at = rnd.choice(NATS), 1024 + rnd.randrange(300), rnd.randint(START, end)
        h = queries.who_port(a, nat, port, at)
        found += h is not None
        assert queries.who_port(b, nat, port, at) == h
        assert queries.who_port_window(b, nat, port, at, HOUR) == queries.who_port_window(
            a, nat, port, at, HOUR
        )
    assert found > 100
    addrs = [r[0] for r in db_rows(before, "SELECT DISTINCT addr FROM event WHERE kind = 1")]
    for addr in addrs[:10]:
        for net in (ipaddress.IPv6Network(addr), ipaddress.IPv6Network((addr, 56), strict=False)):
            assert list(queries.who_endpoint(b, net)) == list(queries.who_endpoint(a, net))
    assert queries.stats(b, end, 300) == queries.stats(a, end, 300)
    a.close()
    b.close()

    # The commands themselves, on a few questions of each kind.
    at = ts_str(START + 12 * HOUR)
    client = str(ipaddress.IPv6Address(addrs[0]))
    reports = tmp_path / "reports.csv"
    reports.write_text(f"192.0.2.9,1030,{at},600\n192.0.2.10,1100,{ts_str(START + HOUR)}\n")
    for args in (
        ("who", "192.0.2.9:1030", "--at", at),
        ("who", "192.0.2.10:1200", "--at", at, "--tolerance", "3600", "--format", "json"),
        ("who", client),
        ("who", f"{client}/64", "--at", at),
        ("who", "--reports", str(reports), "--tolerance", "60"),
        ("query",),
    ):
        x, y = nat64ho(*args, "--db", str(before)), nat64ho(*args, "--db", str(db))
        assert (y.returncode, y.stdout) == (x.returncode, x.stdout), args
    # stats adds the sealed tier's totals below the same table, and to each
    # row of the machine formats.
    x, y = nat64ho("stats", "--db", str(before)), nat64ho("stats", "--db", str(db))
    row = db_rows(db, "SELECT count(*), sum(events), sum(bytes) FROM segment")[0]
    n, events, size = map(int, row)  # PostgreSQL's sums are numeric
    hot = db_rows(db, "SELECT count(*) FROM event")[0][0]
    assert y.stdout == x.stdout + (
        f"Sealed history: {n} segments, {events} events, {size} bytes "
        f"({size / events:.1f} bytes/event); {hot} events not yet sealed.\n"
    )
    sealed = {
        "sealed_segments": n,
        "sealed_events": events,
        "sealed_bytes": size,
        "sealed_bytes_per_event": round(size / events, 2),
    }
    unsealed = dict.fromkeys(sealed, 0) | {"sealed_bytes_per_event": None}
    x, y = (json.loads(stats_of(d, "json")) for d in (before, db))
    assert len(y) == len(NATS) and y == [row | sealed for row in x]
    assert all(row | unsealed == row for row in x)
    x, y = (stats_of(d, "csv").splitlines() for d in (before, db))
    assert y[0] == x[0] and y[0].endswith(",".join(sealed))
    tail = ",".join(str(v) for v in sealed.values())
    assert y[1:] == [line.removesuffix(",0,0,0,") + "," + tail for line in x[1:]]


def test_seal_is_refused_while_the_table_is_owned(tmp_path, db_target):
    db, _ = imported(tmp_path, churn_log(300), db_target)
    with table_owned(db):
        r = nat64ho("seal", "--db", str(db))
    assert r.returncode == 1 and "owned" in one_error(r)
    assert db_rows(db, "SELECT count(*) FROM segment") == [(0,)]


def check(db: Path | str, *args: str) -> subprocess.CompletedProcess:
    return nat64ho("check", "--db", str(db), *args)


def add_row_to_sealed_period(db) -> None:
    """Plant a hot event inside segment 2's period (removed by port 9)."""
    ts = db_rows(db, "SELECT ts_lo + 1 FROM segment WHERE n = 2")[0][0]
    db_exec(
        db,
        "INSERT INTO event (ts, kind, nat, port, addr, aport) VALUES (?, 1, ?, 9, ?, 9)",
        ts,
        NATS[0],
        bytes(16),
    )


def test_check_finds_each_kind_of_tampering_and_passes_once_restored(tmp_path):
    db, _ = imported(tmp_path, churn_log(3000))
    seal(db, "--period", "3600", "--before", ts_str(START + 3 * HOUR))
    first = check(db)
    assert first.returncode == 0, first.stderr
    head = first.stdout.split("chain head ")[1].split()[0]
    seal(db, "--period", "3600")
    ok = check(db, "--head", head)
    assert ok.returncode == 0 and "unchanged up to segment" in ok.stdout
    arch = tmp_path / "archive"
    files = sorted(arch.glob("segment-*.parquet"))
    assert len(files) >= 4
    saved = tmp_path / "saved"
    shutil.copytree(arch, saved)

    def restore() -> None:
        shutil.rmtree(arch)
        shutil.copytree(saved, arch)
        r = check(db, "--head", head)
        assert r.returncode == 0, r.stderr

    def fails(name: str) -> str:
        r = check(db)
        assert r.returncode == 1, r.stdout
        assert name in r.stderr, r.stderr
        return r.stderr

    # A changed byte.
    data = bytearray(files[1].read_bytes())
    data[len(data) // 2] ^= 1
    files[1].write_bytes(bytes(data))
    assert "SHA-256 differs" in fails("segment 2 (segment-00000002-")
    restore()
    # A missing segment.
    files[2].unlink()
    assert "missing" in fails("segment 3 (segment-00000003-")
    restore()
    # A replaced one (another valid segment in its place), and two reordered.
    shutil.copy(files[0], files[1])
    fails("segment 2 (segment-00000002-")
    restore()
    files[1].rename(tmp_path / "x")
    files[2].rename(files[1])
    (tmp_path / "x").rename(files[2])
    out = fails("segment 2 (segment-00000002-")
    assert "segment 3 (segment-00000003-" in out
    restore()
    # A row added to a sealed period, and a row of the segment table changed.
    add_row_to_sealed_period(db)
    assert "sealed period" in fails("segment 2 (segment-00000002-")
    db_exec(db, "DELETE FROM event WHERE port = 9")
    restore()
    db_exec(db, "UPDATE segment SET events = events + 1 WHERE n = 1")
    fails("segment 1 (segment-00000001-")
    r = check(db, "--head", head)
    assert r.returncode == 1 and "not a link" in r.stderr
    db_exec(db, "UPDATE segment SET events = events - 1 WHERE n = 1")
    restore()
    assert check(db, "--head", "00" * 32).returncode == 1


def swap(db: str) -> None:
    """Segments 2 and 3 trade places, rows and data alike."""
    for table in ("segment", "segment_data"):
        db_exec(db, f"UPDATE {table} SET n = -n WHERE n IN (2, 3)")
        db_exec(db, f"UPDATE {table} SET n = CASE n WHEN -2 THEN 3 ELSE 2 END WHERE n < 0")


def test_check_finds_tampering_with_segments_kept_in_postgresql(tmp_path, pg_url):
    db, _ = imported(tmp_path, churn_log(3000), pg_url)
    seal(db, "--period", "3600", "--before", ts_str(START + 3 * HOUR))
    first = check(db)
    assert first.returncode == 0, first.stderr
    head = first.stdout.split("chain head ")[1].split()[0]
    seal(db, "--period", "3600")
    ok = check(db, "--head", head)
    assert ok.returncode == 0 and "unchanged up to segment" in ok.stdout, ok.stderr
    assert db_rows(db, "SELECT count(*) FROM segment_data")[0][0] >= 4

    def fails(*names: str) -> str:
        r = check(db)
        assert r.returncode == 1, r.stdout
        for name in names:
            assert name in r.stderr, r.stderr
        return r.stderr

    def passes() -> None:
        r = check(db, "--head", head)
        assert r.returncode == 0, r.stderr

    # A changed byte in a stored segment, then put back.
    (data,) = db_rows(db, "SELECT data FROM segment_data WHERE n = 2")[0]
    bad = bytearray(data)
    bad[len(bad) // 2] ^= 1
    db_exec(db, "UPDATE segment_data SET data = ? WHERE n = 2", bytes(bad))
    assert "SHA-256 differs" in fails("segment 2 (segment-00000002-")
    db_exec(db, "UPDATE segment_data SET data = ? WHERE n = 2", data)
    passes()
    # Its data gone; another segment's in its place.
    (third,) = db_rows(db, "SELECT data FROM segment_data WHERE n = 3")[0]
    db_exec(db, "DELETE FROM segment_data WHERE n = 3")
    assert "data is missing" in fails("segment 3 (segment-00000003-")
    db_exec(db, "INSERT INTO segment_data (n, data) VALUES (3, ?)", data)  # segment 2's
    assert "SHA-256 differs" in fails("segment 3 (segment-00000003-")
    db_exec(db, "UPDATE segment_data SET data = ? WHERE n = 3", third)
    passes()
    # A segment row removed, then two reordered (their data with them).
    row = db_rows(db, "SELECT * FROM segment WHERE n = 2")[0]
    db_exec(db, "DELETE FROM segment WHERE n = 2")
    fails("segment 2 is missing from the segment table")
    r = check(db, "--head", head)
    assert r.returncode == 1 and "not a link" in r.stderr
    db_exec(db, f"INSERT INTO segment VALUES ({', '.join(['?'] * len(row))})", *row)
    passes()
    swap(db)
    fails("segment 2 (segment-00000003-", "chain value does not follow")
    swap(db)
    passes()
    # A row added to a sealed period, and a segment row changed.
    add_row_to_sealed_period(db)
    assert "sealed period" in fails("segment 2 (segment-00000002-")
    db_exec(db, "DELETE FROM event WHERE port = 9")
    db_exec(db, "UPDATE segment SET events = events + 1 WHERE n = 1")
    fails("segment 1 (segment-00000001-")
    db_exec(db, "UPDATE segment SET events = events - 1 WHERE n = 1")
    passes()


def sealed_or_over(db: Path | str, p: subprocess.Popen, segments: int) -> bool:
    return p.poll() is not None or db_rows(db, "SELECT count(*) FROM segment")[0][0] >= segments


def test_sigkill_during_seals_loses_and_duplicates_nothing(tmp_path, db_target):
    lines = churn_log(20000, ports=2000)
    db, log = imported(tmp_path, lines, db_target)
    rnd = random.Random(11)
    kills = 0
    for _ in range(10):
        p = subprocess.Popen(
            [sys.executable, "-m", "nat64ho", "seal", "--db", str(db), "--period", "600"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        # A random moment of a seal: after a few segments of this run, and
        # a little more (writing the next file, committing, deleting).
        done = db_rows(db, "SELECT count(*) FROM segment")[0][0] + rnd.randint(1, 3)
        wait_for(partial(sealed_or_over, db, p, done), timeout=30, interval=0.005)
        time.sleep(rnd.uniform(0, 0.05))
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            kills += 1
        p.wait()
        # Every event exactly once, in a recorded segment or in the hot tier.
        assert export(db) == log.read_text()
        if kills == 6:
            break
    r = check(db)
    assert r.returncode == 0, r.stderr
    seal(db, "--period", "600")
    assert export(db) == log.read_text()
    assert db_rows(db, "SELECT count(*) FROM segment WHERE pending = 1") == [(0,)]
    recorded = {r[0] for r in db_rows(db, "SELECT file FROM segment")}
    assert stored(db) == recorded
    assert kills >= 5


def test_archive_ls_and_get_copy_plain_parquet(tmp_path, db_target):
    duckdb = pytest.importorskip("duckdb")
    db, _ = imported(tmp_path, churn_log(2000), db_target)
    if is_postgres(db):
        r = nat64ho("seal", "--db", str(db), "--archive", str(tmp_path / "elsewhere"))
        assert r.returncode == 1 and "kept in the database" in one_error(r)
        seal(db, "--period", "7200")
    else:
        seal(db, "--period", "7200", "--archive", str(tmp_path / "elsewhere"))
    assert not (tmp_path / "archive").exists()
    ls = nat64ho("archive", "ls", "--db", str(db))
    assert ls.returncode == 0
    rows = db_rows(db, "SELECT n, events, bytes, sha256 FROM segment ORDER BY n")
    listed = ls.stdout.splitlines()[1:]
    assert len(listed) == len(rows)
    for line, (n, events, size, digest) in zip(listed, rows, strict=True):
        f = line.split()
        assert (int(f[0]), int(f[5]), int(f[6]), f[7]) == (n, events, size, digest.hex())
    out = tmp_path / "copy"
    r = nat64ho("archive", "get", str(out), "--db", str(db))
    assert r.returncode == 0, r.stderr
    (n,) = (
        duckdb.connect()
        .execute("SELECT count(*) FROM read_parquet(?) WHERE kind = 1", [str(out / "*.parquet")])
        .fetchone()
    )
    assert n == sum(r[0] for r in db_rows(db, "SELECT created FROM segment"))
    if is_postgres(db):
        return
    # Moving an archive that has segments is refused.
    r = nat64ho("seal", "--db", str(db), "--archive", str(tmp_path / "third"))
    assert r.returncode == 1 and "segments of this database are in" in one_error(r)


def log_holders(
    lines: list[str],
) -> dict[tuple[int, int], list[tuple[int, int | None, bytes, int]]]:
    """Per NAT port, its tenures from the log: (start, end or None, addr, aport)."""
    out: dict[tuple[int, int], list] = {}
    for line in lines:
        e = parse_line(line)
        if e.kind == EventKind.CREATED:
            out.setdefault((e.nat, e.port), []).append([e.ts, None, e.addr, e.aport])
        elif e.kind == EventKind.DELETED:
            out[(e.nat, e.port)][-1][1] = e.ts
    return {k: [tuple(t) for t in v] for k, v in out.items()}


@pytest.mark.slow
def test_a_server_sealing_every_two_seconds_under_churn(server_factory, tmp_path, db_target):
    segs = tmp_path / "segments"
    where = () if is_postgres(db_target) else ("--archive", str(segs))
    srv = server_factory(
        "--ports", "2000-2063", "--seal-every", "2", "--hello-rate", "0", *where, db=db_target
    )
    follower = Follower(srv.db)

    async def churn() -> None:
        client = await connect(srv)
        n = 0
        deadline = time.monotonic() + 7
        while time.monotonic() < deadline:
            client.send([wire.Map(v6(n + k), 4000 + k) for k in range(16)])
            await client.collect(16)
            n += 16
            await asyncio.sleep(0.01)
        client.close()

    asyncio.run(churn())
    wait_for(lambda: db_rows(srv.db, "SELECT count(*) FROM segment")[0][0] >= 3, timeout=10)
    assert srv.stop() == 0
    text = srv.log.read_text()
    lines = text.splitlines(keepends=True)
    assert sum(" Deleted " in x for x in lines) > 500  # a full table, churning
    assert export(srv.db) == text
    sealed = db_rows(srv.db, "SELECT sum(events) FROM segment")[0][0]
    assert sealed > len(lines) // 2
    files = {r[0] for r in db_rows(srv.db, "SELECT file FROM segment")}
    assert stored(srv.db, segs) == files and not (tmp_path / "archive").exists()
    # --follow, started before the first seal, saw every event once, in order.
    got = follower.take_until(len(lines))
    follower.proc.kill()
    assert [x["seq"] for x in got] == list(range(1, len(lines) + 1))
    assert export(srv.db, "--format", "jsonl") == "".join(json.dumps(x) + "\n" for x in got)

    holders = log_holders(lines)
    lo, hi = parse_line(lines[0]).ts, parse_line(lines[-1]).ts
    rnd = random.Random(5)
    conn = ops_conn(srv.db, readonly=True)
    nat = parse_line(lines[0]).nat
    for _ in range(200):
        port, at = 2000 + rnd.randrange(64), rnd.randint(lo, hi)
        # At an instant shared by a Deleted and a Created, the Created wins.
        want = [
            (a, ap)
            for s, e, a, ap in holders.get((nat, port), [])
            if s <= at and (e is None or at < e)
        ]
        h = queries.who_port(conn, nat, port, at)
        assert ((h.addr, h.aport) if h is not None else None) == (want[-1] if want else None)
    conn.close()
    r = check(srv.db)
    assert r.returncode == 0 and "segments" in r.stdout, r.stderr


def test_prune_drops_whole_segments_and_the_chain_still_verifies(tmp_path, db_target):
    lines = churn_log(3000)
    db, log = imported(tmp_path, lines, db_target)
    seal(db, "--period", "3600")
    head = check(db).stdout.split("chain head ")[1].split()[0]
    files = {r[0] for r in db_rows(db, "SELECT file FROM segment")}
    cut = START + 5 * HOUR + 1800_000_000
    r = nat64ho("prune", "--db", str(db), "--before", ts_str(cut), "--yes")
    assert r.returncode == 0, r.stderr
    gone = db_rows(db, "SELECT file, events, ts_hi FROM segment WHERE pruned IS NOT NULL")
    assert len(gone) == 5 and all(ts < cut for _, _, ts in gone)
    assert r.stdout.startswith(f"{sum(e for _, e, _ in gone)} history events")
    assert stored(db) == files - {f for f, _, _ in gone}
    # Whole segments only: the first one kept still has events before the cut.
    kept = export(db).splitlines(keepends=True)
    assert kept == lines[len(lines) - len(kept) :]
    assert parse_line(kept[0]).ts < cut
    ok = check(db, "--head", head)
    assert ok.returncode == 0, ok.stderr
    assert "5 pruned" in ok.stdout and f"chain head {head}" in ok.stdout
    listing = nat64ho("archive", "ls", "--db", str(db)).stdout
    assert listing.count("(pruned)") == 5


def test_import_into_an_archived_history_is_sealed_and_idempotent(tmp_path, db_target):
    first = churn_log(2000)
    db, log = imported(tmp_path, first, db_target)
    seal(db, "--period", "3600")
    segments = db_rows(db, "SELECT count(*) FROM segment")[0][0]
    r = nat64ho("import", str(log), "--db", str(db))
    assert r.returncode == 0 and f" 0 events added, {len(first)} already present" in r.stderr, (
        r.stderr
    )
    assert db_rows(db, "SELECT count(*) FROM segment")[0][0] == segments
    assert export(db) == log.read_text()
    # A log of another, earlier day goes straight into segments.
    older = churn_log(1000, seed=9, start=START - 86400_000_000)
    other = tmp_path / "older.log"
    other.write_text("".join(older))
    r = nat64ho("import", str(other), "--db", str(db))
    assert r.returncode == 0 and f" {len(older)} events added" in r.stderr, r.stderr
    assert db_rows(db, "SELECT count(*) FROM event") == [(0,)]
    assert db_rows(db, "SELECT count(*) FROM segment")[0][0] > segments
    assert export(db) == log.read_text() + other.read_text()
    again = nat64ho("import", str(other), str(log), "--db", str(db))
    assert f" 0 events added, {len(first) + len(older)} already present" in again.stderr, (
        again.stderr
    )
    assert check(db).returncode == 0


@pytest.mark.parametrize("hours", [6, 2], ids=["one-period", "three-periods"])
def test_a_seal_stopped_while_deleting_its_hot_events_hides_nothing_twice(
    tmp_path, monkeypatch, db_target, twin, hours
):
    from nat64ho.archive import catalog
    from nat64ho.archive import seal as sealing

    lines = churn_log(3000)
    db, log = imported(tmp_path, lines, db_target)
    before, _ = imported(tmp_path, lines, twin, name="before")
    # As if killed after the segments were recorded, before or while their
    # events left the hot tier: some batches done, the rest still there.
    conn = ops_conn(db)

    def killed(conn) -> int:
        if catalog.pending(conn):
            raise RuntimeError("killed")
        return 0

    monkeypatch.setattr(sealing, "finish_pending", killed)
    with pytest.raises(RuntimeError):
        sealing.seal(conn, before=START + 6 * HOUR, period_us=hours * HOUR)
    with schema_atomic(conn):  # the batches deleted before the kill
        conn.execute("DELETE FROM event WHERE id IN (SELECT id FROM event ORDER BY id LIMIT 100)")
    conn.close()
    # One pass: a segment per period, each with its own cut, all pending.
    pending = db_rows(db, "SELECT count(*) FROM segment WHERE pending = 1")[0][0]
    assert pending == db_rows(db, "SELECT count(*) FROM segment")[0][0]
    assert pending == 1 if hours == 6 else pending >= 3
    hot = db_rows(db, "SELECT count(*) FROM event")[0][0]
    assert hot + 100 == len(lines)  # every sealed event still hot but the 100
    assert export(db) == log.read_text()
    assert export(db, "--since", ts_str(START + HOUR)) == export(
        before, "--since", ts_str(START + HOUR)
    )
    r = check(db)
    assert r.returncode == 0, r.stderr
    a = ops_conn(before, readonly=True)
    b = ops_conn(db, readonly=True)
    rnd = random.Random(8)
    for _ in range(50):
        nat, port, at = rnd.choice(NATS), 1024 + rnd.randrange(300), START + rnd.randrange(8 * HOUR)
        assert queries.who_port(b, nat, port, at) == queries.who_port(a, nat, port, at)
    end = START + 8 * HOUR
    assert queries.stats(b, end, 300) == queries.stats(a, end, 300)
    a.close()
    b.close()
    # The next seal finishes the deletes first.
    seal(db, "--period", "3600", "--before", ts_str(START + 6 * HOUR))
    assert db_rows(db, "SELECT count(*) FROM segment WHERE pending = 1") == [(0,)]
    sealed = db_rows(db, "SELECT sum(events) FROM segment")[0][0]
    assert sealed + db_rows(db, "SELECT count(*) FROM event")[0][0] == len(lines)
    assert export(db) == log.read_text()


@pytest.mark.slow
def test_sigkill_of_a_sealing_server_loses_and_duplicates_nothing(server_factory, db_target):
    srv = server_factory(
        "--ports", "2000-2031", "--seal-every", "1", "--hello-rate", "0", db=db_target
    )
    rnd = random.Random(13)
    snapshots = []

    async def churn(seconds: float, base: int) -> None:
        client = await connect(srv)
        deadline = time.monotonic() + seconds
        n = 0
        while time.monotonic() < deadline:
            client.send([wire.Map(v6(base + n + k), 4000 + k) for k in range(8)])
            await client.collect(8)
            n += 8
            await asyncio.sleep(0.005)
        client.close()

    for kill in range(5):
        asyncio.run(churn(rnd.uniform(1.2, 2.5), kill * 1_000_000))
        srv.kill()  # SIGKILL, while the sealer may be at any step
        snapshots.append(export(srv.db))
        srv.start()
    asyncio.run(churn(1.5, 9_000_000))
    wait_for(lambda: db_rows(srv.db, "SELECT count(*) FROM segment WHERE pending = 1") == [(0,)])
    assert srv.stop() == 0
    final = export(srv.db)
    # Ids are never reused and every committed event stays exactly once:
    # what was there at each kill is still the start of the history.
    for snap in snapshots:
        assert final.startswith(snap)
    seqs = [json.loads(x)["seq"] for x in export(srv.db, "--format", "jsonl").splitlines()]
    assert seqs == sorted(set(seqs))
    assert db_rows(srv.db, "SELECT count(*) FROM segment")[0][0] >= 5
    r = check(srv.db)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("key_bits", [28, 6])
def test_endpoint_index_finds_every_event_of_an_endpoint(tmp_path, monkeypatch, key_bits):
    """A segment's endpoint index names every row group of an endpoint, and
    the lookup gives exactly the rows a scan finds, also where keys collide
    (6 bits: every lookup reads row groups of other endpoints too)."""
    from nat64ho.archive import segment

    monkeypatch.setattr(segment, "_KEY_BITS", key_bits)
    monkeypatch.setattr(segment, "ROW_GROUP", 256)
    monkeypatch.setattr(segment, "INDEX_BLOCK", 256)
    events = [parse_line(line) for line in churn_log(6000)]
    rows = [(i, e[0], int(e[1]), *e[2:]) for i, e in enumerate(events, 1)]  # kind as stored
    path = tmp_path / "s.parquet"
    segment.write(segment.table_from_rows(rows), path)
    reader = segment.Reader(path)
    assert reader.index is not None and reader.file.metadata.num_row_groups > 20
    whole = pq.read_table(path)
    endpoints = {(e.addr, e.aport) for e in events if e.addr is not None}
    for addr, aport in sorted(endpoints)[:150]:
        found = reader.endpoint_table(addr, aport)
        assert found is not None
        want = [r for r in whole.to_pylist() if (r["addr"], r["aport"]) == (addr, aport)]
        assert found.to_pylist() == want and want
    # An endpoint that never held a port: nothing; nor in a segment of only
    # Initialized events.
    assert reader.endpoint_table(b"\x20\x01\x0d\xb8" + bytes(12), 9).num_rows == 0
    segment.write(segment.table_from_rows([(1, START, 0, NATS[0], 0, None, None)]), path)
    assert segment.Reader(path).endpoint_table(b"\x20\x01\x0d\xb8" + bytes(12), 9) == (
        segment.SCHEMA.empty_table()
    )


def test_who_endpoint_with_a_port_over_the_index_gives_the_same_holdings(tmp_path, db_target, twin):
    lines = churn_log(3000)
    db, _ = imported(tmp_path, lines, db_target)
    before, _ = imported(tmp_path, lines, twin, name="before")
    seal(db, "--period", "7200")
    a = ops_conn(before, readonly=True)
    b = ops_conn(db, readonly=True)
    endpoints = db_rows(before, "SELECT DISTINCT addr, aport FROM event WHERE kind > 0")
    random.Random(4).shuffle(endpoints)
    held = 0
    for addr, aport in endpoints[:60] + [(bytes(addr), aport + 1) for addr, aport in endpoints[:5]]:
        net = ipaddress.IPv6Network(bytes(addr))
        got = list(queries.who_endpoint(b, net, aport))
        assert got == list(queries.who_endpoint(a, net, aport))
        held += len(got)
    assert held >= 60
    a.close()
    b.close()
