"""The evidence agrees with itself: over real UDP, on both backends, what
``query`` says of an entry is what the log says of it, also after the log is
imported into a new table; a report to the second of a change names both."""

from __future__ import annotations

import datetime as dt
import json

from nat64ho.core.records import EventKind
from nat64ho.eventlog import ipv6_str, parse_line, ts_from_datetime, ts_str
from nat64ho.storage.schema import is_postgres
from tests.helpers import connect, nat64ho, run, v6


def _created_lines(log) -> dict[tuple[int, int], int]:
    """(nat, port) -> time of the last Created line of the port."""
    out = {}
    for line in log.read_text().splitlines():
        e = parse_line(line)
        if e.kind == EventKind.CREATED:
            out[(e.nat, e.port)] = e.ts
    return out


def _queried(db) -> dict[tuple[str, int], int]:
    r = nat64ho("query", "--format", "json", "--db", str(db))
    assert r.returncode == 0, r.stderr
    return {
        (row["nat"], row["port"]): ts_from_datetime(dt.datetime.fromisoformat(row["created"]))
        for row in json.loads(r.stdout)
    }


def test_created_time_is_the_created_lines_time(server_factory, db_target, request, tmp_path):
    # Fewer ports than endpoints: some entries replace others, so Deleted
    # and Created share a datagram and their stamps follow each other.
    srv = server_factory("--ports", "1028-1067", db=db_target)

    async def go():
        c = await connect(srv)
        for i in range(50):
            await c.map(v6(i), 2000 + i)
        c.close()

    run(go())
    assert srv.stop() == 0
    lines = _created_lines(srv.log)
    assert len(lines) == 40
    expected = {("127.0.0.1", port): ts for (_, port), ts in lines.items()}
    assert _queried(db_target) == expected

    # A report to the second of a change of holder names both holders.
    events = [parse_line(line) for line in srv.log.read_text().splitlines()]
    i = next(i for i, e in enumerate(events) if e.kind == EventKind.DELETED)
    gone, came = events[i], events[i + 1]
    assert (came.kind, came.port) == (EventKind.CREATED, gone.port)
    second = ts_str(came.ts)[:19]
    r = nat64ho("who", f"127.0.0.1:{came.port}", "--at", second, "--db", str(db_target))
    assert r.returncode == 0, r.stderr
    assert "2 holders: AMBIGUOUS" in r.stdout.splitlines()[0]
    for e in (gone, came):
        assert f"[{ipv6_str(e.addr)}]:{e.aport}" in r.stdout

    if is_postgres(db_target):
        rebuilt = request.getfixturevalue("pg_cluster").url()
    else:
        rebuilt = str(tmp_path / "rebuilt.db")
    r = nat64ho("import", "--rebuild-table", str(srv.log), "--db", rebuilt)
    assert r.returncode == 0, r.stderr
    assert _queried(rebuilt) == expected
