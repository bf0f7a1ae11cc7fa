"""The set of all NAT64 tables (round-robin reads, read cursors, the cache
budget), and the core's purity: no I/O or clock module is imported."""

from __future__ import annotations

import ast
import random
from pathlib import Path

from nat64ho.core import tables as core_tables
from nat64ho.core import wire
from nat64ho.core.records import Row
from nat64ho.core.tables import Tables
from tests.conftest import v6

S = 1_000_000
CORE = Path(core_tables.__file__).parent
FORBIDDEN = {"asyncio", "socket", "sqlite3", "aiosqlite", "time", "os", "selectors"}


def test_core_imports_no_io_and_no_clock():
    seen = {}
    for path in sorted(CORE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            for name in names:
                seen.setdefault(name, []).append(path.name)
    assert "wire.py" in seen["enum"]  # the walk does see imports
    assert {m: f for m, f in seen.items() if m.split(".")[0] in FORBIDDEN} == {}
    # Within the project, the core imports only itself.
    assert [m for m in seen if m.startswith("nat64ho") and not m.startswith("nat64ho.core")] == []


def tables(cache_size: int = 100, first: int = 1028, last: int = 1035) -> Tables:
    return Tables(
        first, last, create_rate=0.0, request_rate=0.0, cache_size=cache_size, rng=random.Random(3)
    )


def test_datagrams_of_nat64s_are_served_in_turn():
    t = tables()
    a, b = t.state(1, 0), t.state(2, 0)
    for i in range(3):
        t.enqueue(a, ([i], ("a", i), None))
    t.enqueue(b, ([9], ("b", 0), None))
    assert t.queued == 4 and a.share.queued == 3
    order = []
    while (turn := t.next_ready()) is not None:
        state, item = turn
        order.append(item[1])
        t.turn_done(state)
    assert order == [("a", 0), ("b", 0), ("a", 1), ("a", 2)]
    assert t.queued == 0 and not a.busy and not b.busy


def test_reading_asks_for_rows_then_pages_of_victims_after_the_last_one():
    t = tables(first=1028, last=1029)
    s = t.state(1, 0)
    s.table.load([1028, 1029], 2)  # full, all in the database
    body = [wire.Map(v6(7), 70)]
    reading = t.reading(s, body)
    assert s.table.readers == 1
    needs = reading.next()
    assert needs.endpoints == [(v6(7), 70)] and needs.victims > 0 and reading.after is None
    old = [Row(1028, v6(1), 10, 0, 5), Row(1029, v6(2), 20, 0, 6)]
    reading.fill([], old)
    assert reading.after == (6, 1029) and (v6(7), 70) in reading.absent
    assert reading.next() is None  # a victim is in hand, the endpoint is known absent
    reading.close()
    assert s.table.readers == 0
    out = t.decide(s, body, 10 * S, lambda: 1, 1, create_ok=True, share_ok=True)
    assert out.counts["deleted"] == 1 and out.created[0].port == 1028


def test_reading_gives_up_when_the_database_has_no_more_victims():
    t = tables(first=1028, last=1028)
    s = t.state(1, 0)
    s.table.load([1028], 1)
    reading = t.reading(s, [wire.Map(v6(7), 70)])
    assert reading.next() is not None
    reading.fill([], [])
    assert reading.next() is None
    reading.close()


def test_trim_keeps_uncommitted_and_busy_tables_and_forgets_the_oldest():
    t = tables(cache_size=2)
    a, b = t.state(1, 0), t.state(2, 0)
    for s in (a, b):
        s.table.load([], 0)
    for i, (s, now) in enumerate([(a, 1), (b, 2), (a, 3), (b, 4)]):
        t.decide(s, [wire.Map(v6(i), i)], now * S, lambda: 1, seq=1, create_ok=True, share_ok=True)
    t.committed({}, [])
    assert t.cached == 4 and t.excess == 2
    assert t.trim(committed_seq=0) is True  # nothing durable yet: all stay
    assert t.cached == 4
    b.table.readers = 1  # a read in flight pins b's entries
    assert t.trim(committed_seq=1) is False
    assert t.cached == 2 and len(a.table.by_port) == 0 and len(b.table.by_port) == 2
    b.table.readers = 0
    t.committed({}, [])
    assert t.excess == 0
