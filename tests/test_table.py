"""The pure table logic of docs/protocol.md §5, with time passed in."""

from __future__ import annotations

import random

import pytest

from nat64ho.core import wire
from nat64ho.core.table import Bucket, NatTable, Row
from nat64ho.eventlog import EventKind
from tests.helpers import v6

NAT = 0xC0000209  # 192.0.2.9
S = 1_000_000  # one second in µs


def table(first=1028, last=1035, **kw) -> NatTable:
    t = NatTable(NAT, first, last, rng=random.Random(7), **kw)
    t.load([], 0)
    return t


def decode(unit: list[bytes]) -> list:
    return wire.parse(b"".join(unit), wire.Direction.TO_NAT64)


def mapped(t: NatTable, i: int, now: int, seq: int = 1):
    out = t.apply([wire.Map(v6(i), 1000 + i)], now, lambda: now, seq)
    [unit] = out.units
    return decode(unit), out


def test_new_endpoints_get_distinct_random_ports_in_range():
    t = table()
    ports = [mapped(t, i, S * i)[0][0].nat_port for i in range(8)]
    assert sorted(ports) == list(range(1028, 1036))
    assert ports != sorted(ports)  # not handed out in order (RFC 6056)
    other = NatTable(NAT, 1028, 1035, rng=random.Random(8))
    other.load([], 0)
    assert [mapped(other, i, S * i)[0][0].nat_port for i in range(8)] != ports


def test_load_skips_occupied_ports():
    t = NatTable(NAT, 1028, 1035, rng=random.Random(1))
    t.load([1028, 1030], 2)
    got = {mapped(t, i, S)[0][0].nat_port for i in range(6)}
    assert got == {1029, 1031, 1032, 1033, 1034, 1035}


def test_map_is_idempotent_and_refreshes():
    t = table()
    [first], out = mapped(t, 1, S)
    assert [e.kind for e in out.events] == [EventKind.CREATED]
    [again], out2 = mapped(t, 1, 5 * S)
    assert again == first and out2.events == [] and out2.created == []
    assert t.by_port[first.nat_port].last_use == 5 * S


def test_full_table_deletes_least_recently_used_first():
    t = table()
    ports = {}
    for i in range(8):
        ports[i] = mapped(t, i, S * (i + 1))[0][0].nat_port
    # Entry 0 is the oldest, but a LOOKUP and a TOUCH make 0 and 1 recent.
    t.apply([wire.Lookup(ports[0]), wire.Touch((ports[1],))], 20 * S, lambda: 20 * S, 1)
    msgs, out = mapped(t, 100, 21 * S)
    assert msgs == [wire.Deleted(ports[2], v6(2), 1002), wire.Mapping(ports[2], v6(100), 1100)]
    assert [(e.kind, e.port) for e in out.events] == [
        (EventKind.DELETED, ports[2]),
        (EventKind.CREATED, ports[2]),
    ]
    msgs, _ = mapped(t, 101, 22 * S)
    assert msgs[0] == wire.Deleted(ports[3], v6(3), 1003)
    assert t.total == 8
    assert (v6(2), 1002) not in t.by_endpoint


def test_min_idle_refuses_to_delete_a_recent_entry():
    t = table(min_idle=120 * S)
    for i in range(8):
        mapped(t, i, S * (i + 1))
    msgs, out = mapped(t, 50, 100 * S)
    assert msgs == [wire.Error(wire.ErrorCode.TABLE_FULL, wire.Kind.MAP)]
    assert out.created == [] and out.events == []
    msgs, _ = mapped(t, 50, 121 * S)  # entry 0 (last use 1 s) is now 120 s idle
    assert isinstance(msgs[0], wire.Deleted) and msgs[0].addr == v6(0)


def test_lookup_and_touch_answers():
    t = table()
    [m], _ = mapped(t, 1, S)
    free = next(p for p in range(1028, 1036) if p != m.nat_port)
    out = t.apply(
        [wire.Lookup(m.nat_port), wire.Lookup(free), wire.Touch((m.nat_port, free, 9))],
        2 * S,
        lambda: 2 * S,
        1,
    )
    assert [decode(u)[0] for u in out.units] == [
        m,
        wire.Unmapped(free),
        wire.Unmapped(free),
        wire.Unmapped(9),
    ]


def test_create_rate_limit():
    t = table(1028, 2000)
    bucket = Bucket(3, 0)
    answers = [
        decode(u)[0]
        for u in t.apply([wire.Map(v6(i), 1) for i in range(5)], 0, lambda: 0, 1, bucket).units
    ]
    assert [type(a) for a in answers] == [wire.Mapping] * 3 + [wire.Error] * 2
    assert answers[3].code == wire.ErrorCode.RATE_LIMITED
    out = t.apply([wire.Map(v6(9), 1)], S, lambda: S, 1, bucket)  # one second refills
    assert isinstance(decode(out.units[0])[0], wire.Mapping)


def test_answers_wait_for_the_batch_that_holds_the_entry():
    t = table()
    _, out = mapped(t, 1, S, seq=4)
    assert out.wait_seq == 4
    [m], out = mapped(t, 1, 2 * S, seq=5)  # retransmitted MAP: still batch 4
    assert out.wait_seq == 4
    out = t.apply([wire.Lookup(1), wire.Touch((m.nat_port,))], 3 * S, lambda: 3 * S, 6)
    assert out.wait_seq == 0


def test_create_refused_when_storage_is_behind():
    t = table()
    out = t.apply([wire.Map(v6(1), 1)], S, lambda: S, 1, create_ok=False)
    assert out.units == [] and out.created == [] and out.counts["deferred"] == 1
    # Over this NAT64's share: refused and said so (docs/protocol.md §7).
    out = t.apply([wire.Map(v6(1), 1), wire.Lookup(1)], S, lambda: S, 1, share_ok=False)
    assert [decode(u) for u in out.units] == [
        [wire.Error(wire.ErrorCode.RATE_LIMITED, wire.Kind.MAP)],
        [wire.Unmapped(1)],
    ]
    assert out.created == [] and out.events == [] and out.counts["limited_backlog"] == 1


def test_entries_only_in_the_database_are_read_first():
    t = NatTable(NAT, 1028, 1029, rng=random.Random(1))
    t.load([1028, 1029], 2)
    rows = [Row(1028, v6(1), 1, 10, 10), Row(1029, v6(2), 2, 20, 20)]
    msgs = [wire.Map(v6(2), 2), wire.Lookup(1028), wire.Map(v6(3), 3)]
    needs = t.needs(msgs)
    assert needs.endpoints == [(v6(2), 2), (v6(3), 3)]
    assert needs.ports == [1028]
    assert needs.victims >= 1
    # The database holds endpoint 2 and port 1028; victims come oldest first.
    t.feed([rows[1], rows[0]], [rows[0], rows[1]])
    assert t.needs(msgs, absent={(v6(3), 3)}) is None
    out = t.apply(msgs, 100, lambda: 100, 1)
    answers = [decode(u) for u in out.units]
    assert answers[0] == [wire.Mapping(1029, v6(2), 2)]
    assert answers[1] == [wire.Mapping(1028, v6(1), 1)]
    # Memory now holds every entry, so the victim is the head of its LRU
    # order: 1029 was used before 1028 within this datagram.
    assert answers[2] == [wire.Deleted(1029, v6(2), 2), wire.Mapping(1029, v6(3), 3)]


def test_victim_from_database_when_memory_holds_only_recent_entries():
    t = NatTable(NAT, 1028, 1030, rng=random.Random(1))
    t.load([1028, 1029, 1030], 3)
    msgs = [wire.Map(v6(9), 9)]
    needs = t.needs(msgs)
    assert needs.victims > 0
    # A stale row for a port memory holds is ignored.
    t.feed([Row(1030, v6(3), 3, 5, 5)])
    t.apply([wire.Lookup(1030)], 50, lambda: 50, 1)
    t.feed([], [Row(1030, v6(3), 3, 5, 5), Row(1029, v6(2), 2, 7, 7), Row(1028, v6(1), 1, 8, 8)])
    out = t.apply(msgs, 60, lambda: 60, 1)
    assert decode(out.units[0]) == [wire.Deleted(1029, v6(2), 2), wire.Mapping(1029, v6(9), 9)]
    assert t.total == 3


def test_bucket_unlimited_and_refill():
    assert all(Bucket(0, 0).take(0) for _ in range(1000))
    b = Bucket(2, 0)
    assert b.take(0) and b.take(0) and not b.take(0)
    assert b.take(S // 2) and not b.take(S // 2)


def test_every_port_of_a_full_range_is_handed_out_once():
    t = table(1028, 65535)
    out = t.apply([wire.Map(v6(i), 1) for i in range(64508)], S, lambda: S, 1)
    ports = [decode(u)[0].nat_port for u in out.units]
    assert sorted(ports) == list(range(1028, 65536))
    assert t.nfree == 0
    [m] = decode(t.apply([wire.Map(v6(10**6), 1)], 2 * S, lambda: 2 * S, 1).units[0])[:1]
    assert isinstance(m, wire.Deleted)


@pytest.mark.parametrize(
    "last,free,trials",
    [
        # 4 free of 40: random probes find them.
        (1067, (1030, 1041, 1052, 1067), 2000),
        # 2 free of 4000: probes mostly miss, so the walk over the bitmap decides.
        (5027, (1500, 4001), 400),
    ],
)
def test_free_ports_are_drawn_uniformly_even_when_nearly_full(last, free, trials):
    counts = {p: 0 for p in free}
    for seed in range(trials):
        t = NatTable(NAT, 1028, last, rng=random.Random(seed))
        t.load([p for p in range(1028, last + 1) if p not in counts], last - 1027 - len(free))
        [m] = decode(t.apply([wire.Map(v6(1), 1)], S, lambda: S, 1).units[0])
        counts[m.nat_port] += 1
    expected = trials / len(free)
    assert all(0.75 * expected < n < 1.25 * expected for n in counts.values()), counts
