"""The server's dispatch and log, in-process with a recording transport and
a clock the test sets, on a real SQLite file."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress

import pytest

from nat64ho.core import wire
from nat64ho.daemon.config import Config
from nat64ho.daemon.logfile import LogFile
from nat64ho.daemon.protocol import Server
from nat64ho.eventlog import Event, EventKind, format_event, parse_line, ts_from_datetime
from nat64ho.peer import Peer
from nat64ho.storage.sqlite import Store
from tests.helpers import Recorder, committed

NAT = ("192.0.2.7", 40000)
V17 = ipaddress.IPv6Address("2001:db8::17").packed


class SetClock:
    """The server's clocks, standing still until the test moves them."""

    def __init__(self, when: str):
        self.set(when)

    def set(self, when: str) -> None:
        self.us = ts_from_datetime(dt.datetime.fromisoformat(when + "+00:00"))

    def now(self) -> int:
        return self.us

    def wall(self) -> int:
        return self.us

    def monotonic(self) -> float:
        return self.us / 1e6


async def start(tmp_path, clock=None, **kw):
    config = Config(db=tmp_path / "t.db", log_file=str(tmp_path / "events.log"), **kw)
    store = await Store.open(config.db, sync="normal")
    srv = Server(config, store, LogFile(config.log_file), clock)
    rec = Recorder()
    srv.connection_made(rec)
    return srv, rec


async def settle(srv: Server):
    """Until every datagram is decided and every answer waiting for a
    commit has left."""
    while srv.tasks or srv.waiting:
        if srv.tasks:
            await asyncio.gather(*list(srv.tasks))
        await committed(srv.store)


async def stop(srv: Server):
    await settle(srv)
    await srv.store.close()
    srv.logfile.close()


def replies(rec: Recorder, peer: Peer | None = None) -> list:
    out = []
    for data, _ in rec.sent:
        out += peer.receive(data) if peer else wire.parse(data, wire.Direction.TO_NAT64)
    rec.sent.clear()
    return out


def test_log_lines_are_utc_microseconds_in_protocol_format(tmp_path):
    async def go():
        clock = SetClock("2019-03-18 10:06:28.436754")
        srv, rec = await start(tmp_path, clock)
        peer = Peer(bytes(8))
        srv.datagram_received(peer.hello(), NAT)
        await settle(srv)
        [welcome] = replies(rec, peer)
        assert isinstance(welcome, wire.Welcome)
        srv.datagram_received(peer.confirm(), NAT)  # Initialized is logged now
        await settle(srv)
        clock.set("2019-03-18 10:06:28.491727")
        srv.datagram_received(peer.request([wire.Map(V17, 53186)]), NAT)
        await settle(srv)
        [mapping] = replies(rec, peer)
        await stop(srv)
        return mapping

    mapping = asyncio.run(go())
    text = (tmp_path / "events.log").read_text()
    assert text == (
        "2019-03-18 10:06:28.436754 Initialized 192.0.2.7\n"
        f"2019-03-18 10:06:28.491727 Created 192.0.2.7:{mapping.nat_port} "
        "[2001:db8::17]:53186\n"
    )


def test_protocol_example_lines_round_trip():
    lines = [
        "2019-03-18 10:06:28.436754 Initialized 192.0.2.7",
        "2019-03-18 10:06:28.491727 Created 192.0.2.7:3719 [2001:db8::17]:53186",
        "2019-03-18 15:22:02.062254 Deleted 192.0.2.9:47102 [2001:db8::75]:33131",
        "2019-03-18 15:22:02.062478 Created 192.0.2.9:47102 [2001:db8::55]:34643",
    ]
    for line in lines:
        assert format_event(parse_line(line + "\n")) == line
    assert parse_line(lines[2]) == Event(
        1552922522062254,
        EventKind.DELETED,
        0xC0000209,
        47102,
        ipaddress.IPv6Address("2001:db8::75").packed,
        33131,
    )


def test_initialized_only_for_a_new_boot_id(tmp_path):
    async def go():
        srv, rec = await start(tmp_path)
        a, b, c = Peer(b"A" * 8), Peer(b"B" * 8), Peer(b"C" * 8)
        for peer in (a, a, b, b, a):
            srv.datagram_received(peer.hello(), NAT)
            await settle(srv)
            assert isinstance(replies(rec, peer)[0], wire.Welcome)
            srv.datagram_received(peer.confirm(), NAT)
            await settle(srv)
        # A HELLO nobody confirms is a claim only: nothing logged.
        srv.datagram_received(c.hello(), NAT)
        await settle(srv)
        await stop(srv)

    asyncio.run(go())
    kinds = [line.split()[2] for line in (tmp_path / "events.log").read_text().splitlines()]
    assert kinds == ["Initialized"] * 3  # a, b, then a again: three boots


def test_session_errors_and_amplification(tmp_path):
    async def go():
        srv, rec = await start(tmp_path, allow=[ipaddress.IPv4Network("192.0.2.0/24")])
        peer = Peer()
        # No session yet: a MAP without COOKIE gets BAD_COOKIE naming its first octet.
        srv.datagram_received(wire.encode(wire.Map(V17, 1)), NAT)
        assert replies(rec) == [wire.Error(wire.ErrorCode.BAD_COOKIE, 0x33)]
        # A datagram shorter than an ERROR earns nothing (docs/protocol.md §7).
        srv.datagram_received(b"\x3a\x00", NAT)
        assert rec.sent == []
        # Outside the allow-list.
        srv.datagram_received(peer.hello(), ("198.51.100.1", 1))
        assert replies(rec) == [wire.Error(wire.ErrorCode.NOT_ALLOWED, 0x31)]
        # Wrong version.
        srv.datagram_received(wire.encode(wire.Hello(bytes(8), version=2)), NAT)
        assert replies(rec) == [wire.Error(wire.ErrorCode.BAD_VERSION, 0x31)]
        # A forged cookie.
        srv.datagram_received(wire.encode(wire.Cookie(bytes(8))) + wire.encode(wire.Lookup(1)), NAT)
        assert replies(rec) == [wire.Error(wire.ErrorCode.BAD_COOKIE, 0x30)]
        # A HELLO with company is malformed: dropped, unanswered.
        srv.datagram_received(peer.hello() + wire.encode(wire.Lookup(1)), NAT)
        assert rec.sent == []
        assert srv.drops["hello_not_alone"] == 1
        await stop(srv)

    asyncio.run(go())


def test_hello_rate_limit(tmp_path):
    async def go():
        srv, rec = await start(tmp_path, hello_rate=2)
        peer = Peer()
        for _ in range(4):
            srv.datagram_received(peer.hello(), NAT)
            await settle(srv)
        got = replies(rec)
        assert [type(m) for m in got] == [wire.Welcome, wire.Welcome, wire.Error, wire.Error]
        assert got[2] == wire.Error(wire.ErrorCode.RATE_LIMITED, 0x31)
        await stop(srv)

    asyncio.run(go())


@pytest.mark.parametrize("junk", [b"\x00", b"\xff" * 40, b"\x30\x04" + bytes(7), b"\x45\x00"])
def test_malformed_is_counted_not_answered(tmp_path, junk):
    async def go():
        srv, rec = await start(tmp_path)
        srv.datagram_received(junk, NAT)
        assert rec.sent == []
        assert sum(srv.drops.values()) == 1
        await stop(srv)

    asyncio.run(go())


def test_hellos_write_nothing_and_one_confirmation_logs_one_initialized(tmp_path):
    async def go():
        srv, rec = await start(tmp_path)
        peer = Peer()
        for _ in range(3):  # retransmitted: each is a claim, answered
            srv.datagram_received(peer.hello(), NAT)
        await settle(srv)
        assert [type(m) for m in replies(rec, peer)] == [wire.Welcome] * 3
        assert srv.store.stats["commits"] == 0  # a claim writes nothing
        assert (tmp_path / "events.log").read_text() == ""
        for _ in range(2):  # the first confirms; the second is a plain datagram
            srv.datagram_received(peer.confirm(), NAT)
        await settle(srv)
        await stop(srv)

    asyncio.run(go())
    assert (tmp_path / "events.log").read_text().count("Initialized") == 1


def test_spoofed_hello_does_not_cut_off_the_real_nat64(tmp_path):
    async def go():
        srv, rec = await start(tmp_path)
        real, spoofer = Peer(b"R" * 8), Peer(b"S" * 8)
        srv.datagram_received(real.hello(), NAT)
        await settle(srv)
        replies(rec, real)
        # Someone forging the NAT64's address says HELLO with another boot id;
        # the WELCOME goes to the real address, so the forger learns nothing.
        srv.datagram_received(spoofer.hello(), NAT)
        await settle(srv)
        [welcome] = replies(rec, spoofer)  # what reached the real address
        srv.datagram_received(real.request([wire.Map(V17, 1)]), NAT)
        await settle(srv)
        [m] = replies(rec, real)
        assert isinstance(m, wire.Mapping)
        # Whoever receives at the address (here: a real reboot) confirms the
        # new boot by using its cookie; the old one retires then.
        assert spoofer.cookie == welcome.cookie
        srv.datagram_received(spoofer.request([wire.Lookup(m.nat_port)]), NAT)
        await settle(srv)
        assert replies(rec) == [m]
        srv.datagram_received(real.request([wire.Lookup(m.nat_port)]), NAT)
        assert replies(rec) == [wire.Error(wire.ErrorCode.BAD_COOKIE, 0x30)]
        await stop(srv)

    asyncio.run(go())


@pytest.mark.parametrize("fault, said", [("refused", "inconsistent"), ("bug", "simulated bug")])
def test_a_commit_that_cannot_succeed_stops_the_store_rather_than_retry_or_fall_silent(
    tmp_path, monkeypatch, fault, said
):
    from nat64ho.core.records import Row
    from nat64ho.errors import DatabaseDamaged

    async def go():
        srv, rec = await start(tmp_path)
        if fault == "refused":
            # Two entries for one endpoint on one NAT64: the endpoint index says no.
            rows = [Row(1028, V17, 1, 0, 0), Row(1029, V17, 1, 0, 0)]
        else:

            async def broken(*args, **kw):
                raise RuntimeError("simulated bug")

            monkeypatch.setattr(srv.store, "_commit_group", broken)
            rows = [Row(1028, V17, 1, 0, 0)]
        srv.store.add(1, rows, [])
        with pytest.raises(DatabaseDamaged):
            await committed(srv.store, 1)
        assert srv.store.damage_found.is_set() and said in srv.store.damaged
        with contextlib.suppress(RuntimeError):  # the bug, raised again by the flusher
            await srv.store.close()
        srv.logfile.close()

    asyncio.run(go())


def test_answers_leave_after_their_commit_even_when_the_log_write_raises(tmp_path, monkeypatch):
    async def go():
        srv, rec = await start(tmp_path)
        peer = Peer()
        srv.datagram_received(peer.hello(), NAT)
        await settle(srv)
        replies(rec, peer)

        def broken(*args, **kw):
            raise RuntimeError("simulated bug")

        monkeypatch.setattr(srv.logfile, "write", broken)
        srv.datagram_received(peer.request([wire.Map(V17, 40000)]), NAT)
        await settle(srv)
        assert [type(m) for m in replies(rec, peer)] == [wire.Mapping]
        assert srv.waiting == 0
        await stop(srv)

    asyncio.run(go())


def test_unexpected_errors_are_counted_and_logged_sparingly(tmp_path, caplog, monkeypatch):
    async def go():
        srv, rec = await start(tmp_path)
        peer = Peer()
        srv.datagram_received(peer.hello(), NAT)
        await settle(srv)
        replies(rec, peer)
        srv.datagram_received(peer.request([wire.Lookup(1028)]), NAT)  # loads the table
        await settle(srv)
        replies(rec, peer)

        def broken(*args, **kw):
            raise RuntimeError("simulated bug")

        monkeypatch.setattr(srv, "_decide", broken)
        for _ in range(100):
            srv.datagram_received(peer.request([wire.Lookup(1028)]), NAT)
        await settle(srv)
        assert srv.drops["internal_error"] == 100
        await stop(srv)

    with caplog.at_level("ERROR", logger="nat64ho"):
        asyncio.run(go())
    bugs = [r for r in caplog.records if r.getMessage().startswith("bug:")]
    assert len(bugs) == 1 and "simulated bug" in caplog.text


def test_the_datagram_path_leaves_no_cyclic_garbage(tmp_path):
    """serve runs full garbage collections rarely (GC_FULL_EVERY): that is
    safe only while creating, answering and committing make no reference
    cycles, which only a full collection would free."""
    import gc
    import itertools

    from tests.helpers import v6

    async def go() -> int:
        srv, rec = await start(tmp_path, create_rate=0, request_rate=0)
        peer = Peer()
        addr = ("127.0.0.1", 5000)
        srv.datagram_received(peer.hello(), addr)
        replies(rec, peer)
        serial = itertools.count()
        gc.collect()
        gc.disable()
        try:
            for _ in range(40):
                for _ in range(25):
                    srv.datagram_received(peer.request([wire.Map(v6(next(serial)), 1)]), addr)
                for port in list(peer.cache)[:25]:
                    srv.datagram_received(peer.request([wire.Lookup(port)]), addr)
                await settle(srv)
                replies(rec, peer)
            assert srv.counts["created"] == 1000 and srv.store.stats["commits"] >= 40
            return gc.collect()
        finally:
            gc.enable()
            await stop(srv)

    assert asyncio.run(go()) == 0


def welcomed(srv: Server, rec: Recorder, peer: Peer, nat=NAT) -> None:
    srv.datagram_received(peer.hello(), nat)
    assert isinstance(replies(rec, peer)[0], wire.Welcome)


def test_without_a_valid_cookie_only_the_first_message_is_looked_at(tmp_path, monkeypatch):
    async def go():
        srv, rec = await start(tmp_path)
        parsed = []
        real_parse = wire.parse
        monkeypatch.setattr(wire, "parse", lambda d, *a: parsed.append(len(d)) or real_parse(d, *a))
        biggest = 65507
        # A forged cookie, a first message that is no COOKIE, a HELLO with
        # company: each costs the same whatever follows, and nothing parses.
        srv.datagram_received(bytes.fromhex("3004") + bytes(8) + b"\x35\x01" * 32749, NAT)
        srv.datagram_received(b"\x35\x01\x00\x01" * (biggest // 4), NAT)
        srv.datagram_received(Peer().hello() + b"\x10" * (biggest - 26), NAT)
        assert parsed == []
        assert replies(rec) == [
            wire.Error(wire.ErrorCode.BAD_COOKIE, 0x30),
            wire.Error(wire.ErrorCode.BAD_COOKIE, 0x35),
        ]
        assert srv.drops == {"bad_cookie": 1, "no_cookie": 1, "hello_not_alone": 1}
        # A fault in the first message is still named.
        srv.datagram_received(b"\x33\x09" + bytes(10), NAT)
        assert srv.drops["truncated"] == 1 and rec.sent == []
        # A valid cookie: the datagram is parsed whole, and a fault after
        # the COOKIE drops it whole.
        peer = Peer()
        welcomed(srv, rec, peer)
        srv.datagram_received(peer.confirm(), NAT)
        srv.datagram_received(peer.request([wire.Lookup(1)]) + b"\x10", NAT)
        assert srv.drops["reserved_group"] == 1 and rec.sent == []
        await stop(srv)

    asyncio.run(go())


def test_over_its_share_a_datagram_is_refused_before_it_is_parsed(tmp_path, monkeypatch):
    async def go():
        clock = SetClock("2024-10-04 12:00:00")
        srv, rec = await start(tmp_path, clock, request_rate=100)
        peer = Peer()
        welcomed(srv, rec, peer)
        srv.datagram_received(peer.confirm(), NAT)
        await settle(srv)
        # A TOUCH of n ports costs n: two of 255 spend 510 of a share of 100.
        touch = peer.request([wire.Touch(tuple(range(2000, 2255)))])
        srv.datagram_received(touch, NAT)
        await settle(srv)
        assert len(replies(rec)) == 255  # UNMAPPED for each
        srv.datagram_received(touch, NAT)
        assert replies(rec) == [wire.Error(wire.ErrorCode.RATE_LIMITED, 0x37)]
        assert srv.drops["request_rate"] == 1
        # In debt now: refused for a look-up, unparsed once the error budget
        # (10 a second) is spent, and never parsed if bigger than a NAT64's
        # requests, however malformed.
        parsed = []
        real_parse = wire.parse
        monkeypatch.setattr(wire, "parse", lambda d, *a: parsed.append(len(d)) or real_parse(d, *a))
        for _ in range(20):
            srv.datagram_received(peer.request([wire.Lookup(1)]) + b"\x10" * 60000, NAT)
        assert parsed == [] and srv.drops["request_rate"] == 21
        for _ in range(20):
            srv.datagram_received(peer.request([wire.Lookup(1)]) + b"\x10", NAT)
        assert len(parsed) == 9 and srv.drops["reserved_group"] == 9  # the budget left
        assert srv.drops["request_rate"] == 32
        # Its HELLO after the COOKIE does not make it a reboot to let through.
        srv.datagram_received(peer.confirm() + b"\x10" * 60000, NAT)
        assert len(parsed) == 9 and srv.drops["request_rate"] == 33
        assert rec.sent == []
        # The debt is paid at the request rate: 155 owed, 2 s later it is open.
        clock.us += 2_000_000
        srv.datagram_received(peer.request([wire.Lookup(1)]), NAT)
        await settle(srv)
        assert replies(rec) == [wire.Unmapped(1)]
        await stop(srv)

    asyncio.run(go())


def test_a_confirmation_carrying_its_hello_needs_no_memory_of_the_claim(tmp_path):
    async def go():
        srv, rec = await start(tmp_path)
        peer = Peer()
        welcomed(srv, rec, peer)
        srv.sessions.claims.clear()  # forgotten (a restart, a flood of claims)
        # A malformed datagram confirms nothing.
        srv.datagram_received(peer.confirm() + b"\x10", NAT)
        assert srv.drops["reserved_group"] == 1 and srv.sessions.boots == {}
        srv.datagram_received(peer.confirm() + wire.encode(wire.Map(V17, 1)), NAT)
        await settle(srv)
        [m] = replies(rec)
        assert isinstance(m, wire.Mapping)
        assert srv.sessions.boots == {int(ipaddress.IPv4Address(NAT[0])): peer.boot_id}
        # Once confirmed, the same form is a plain datagram: nothing more logged.
        srv.datagram_received(peer.confirm(), NAT)
        # A HELLO after the COOKIE must name the boot the cookie is for.
        other = Peer(b"O" * 8)
        other.cookie = peer.cookie
        srv.datagram_received(other.confirm(), NAT)
        assert replies(rec) == [wire.Error(wire.ErrorCode.BAD_COOKIE, 0x30)]
        await stop(srv)

    asyncio.run(go())
    log = (tmp_path / "events.log").read_text()
    assert log.count("Initialized") == 1 and log.count("Created") == 1


def test_a_v1_1_confirmation_holding_only_the_cookie_still_works(tmp_path):
    async def go():
        srv, rec = await start(tmp_path)
        peer = Peer()
        welcomed(srv, rec, peer)
        srv.datagram_received(wire.encode(wire.Cookie(peer.cookie)), NAT)
        await settle(srv)
        assert srv.sessions.boots == {int(ipaddress.IPv4Address(NAT[0])): peer.boot_id}
        await stop(srv)

    asyncio.run(go())
    assert (tmp_path / "events.log").read_text().count("Initialized") == 1


def test_the_epoch_issued_is_kept_across_restarts_and_lifetime_changes(tmp_path):
    day = 86400

    async def serve(when: str, lifetime: int, hello: bool) -> int:
        clock = SetClock(when)
        srv, rec = await start(tmp_path, clock, cookie_lifetime=lifetime)
        if hello:
            welcomed(srv, rec, Peer())
            await srv._epoch_task
        epoch = srv.sessions.epoch(clock.wall())
        await stop(srv)
        return epoch

    async def go():
        # 2024-10-04 is day 20000; hours are 24 times that.
        assert await serve("2024-10-04 12:00:00", 3600, True) == 20000 * 24 + 12
        # Restarted a day behind: the hour issued still holds.
        assert await serve("2024-10-03 12:00:00", 3600, False) == 20000 * 24 + 12
        # A longer lifetime: the kept time falls in day 20000, not hour 480012.
        assert await serve("2024-10-03 12:00:00", day, False) == 20000
        assert await serve("2024-10-05 01:00:00", day, True) == 20001

    asyncio.run(go())
