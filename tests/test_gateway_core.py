"""The gateway's flows and sessions, sans-I/O: packets in, packets out, the
server's side played by hand with nat64ho.core.wire."""

from __future__ import annotations

import pytest

from nat64ho.core import wire
from nat64ho.gateway import core
from nat64ho.gateway import translate as t
from tests.test_gateway_translate import (
    CLIENT,
    CPORT,
    HOST,
    HOST6,
    POOL,
    PREFIX,
    ip4,
    ip6,
    tcp,
    udp,
)

BOOT = bytes(range(1, 9))
COOKIE = b"C" * 8
SERVER_PORT = 6464


def make(now: float = 0.0, **kw) -> core.Gateway:
    return core.Gateway(PREFIX, POOL, [(HOST, SERVER_PORT)], boot_id=BOOT, now=now, **kw)


def split(out: list[bytes]) -> tuple[list[list], list[bytes]]:
    """(handoff datagrams as message lists, other packets)."""
    handoff, other = [], []
    for pkt in out:
        if (
            pkt[0] == 0x45
            and pkt[9] == 17
            and pkt[12:16] == POOL
            and int.from_bytes(pkt[20:22], "big") == core.HANDOFF_PORT
        ):
            assert pkt[16:20] == HOST and int.from_bytes(pkt[22:24], "big") == SERVER_PORT
            handoff.append(wire.parse(pkt[28:], wire.Direction.TO_SERVER))
        else:
            other.append(pkt)
    return handoff, other


def reply(messages: list) -> bytes:
    return t.udp4(HOST, SERVER_PORT, POOL, core.HANDOFF_PORT, wire.build(messages))


def welcomed(now: float = 0.0, **kw) -> core.Gateway:
    gw = make(now, **kw)
    gw.flush(now)
    gw.packet(reply([wire.Welcome(1028, 65535, COOKIE, BOOT)]), now)
    handoff, _ = split(gw.flush(now))
    assert handoff == [[wire.Cookie(COOKIE), wire.Hello(BOOT)]]
    return gw


def syn(port: int = CPORT, client: bytes = CLIENT) -> bytes:
    return ip6(client, HOST6, 6, tcp(port, 80, client, HOST6))


def test_hello_at_start_retransmitted_with_the_same_boot_id():
    gw = make()
    handoff, _ = split(gw.flush(0.0))
    assert handoff == [[wire.Hello(BOOT)]]
    assert split(gw.flush(0.3))[0] == []
    assert split(gw.flush(0.6))[0] == [[wire.Hello(BOOT)]]
    assert split(gw.flush(1.0))[0] == []  # backoff doubled
    assert split(gw.flush(1.7))[0] == [[wire.Hello(BOOT)]]


def test_welcome_is_confirmed_by_a_datagram_holding_the_cookie_then_the_hello():
    welcomed()


def test_packets_of_one_flow_wait_for_one_map_and_leave_in_order():
    gw = welcomed()
    first = [syn(), ip6(CLIENT, HOST6, 6, tcp(CPORT, 80, CLIENT, HOST6, b"second"))]
    for pkt in first:
        gw.packet(pkt, 0.1)
    handoff, other = split(gw.flush(0.1))
    assert handoff == [[wire.Cookie(COOKIE), wire.Map(CLIENT, CPORT)]] and other == []
    gw.packet(syn(), 0.2)  # a SYN retransmitted meanwhile asks nothing more
    assert split(gw.flush(0.2)) == ([], [])
    gw.packet(reply([wire.Mapping(40000, CLIENT, CPORT)]), 0.2)
    handoff, other = split(gw.flush(0.2))
    assert handoff == [] and len(other) == 3
    assert [p[40:] for p in other] == [b"hello", b"second", b"hello"]
    for p in other:
        assert p[12:16] == POOL and int.from_bytes(p[20:22], "big") == 40000
    gw.packet(syn(), 0.3)  # cached now
    assert len(split(gw.flush(0.3))[1]) == 1


def test_inbound_miss_asks_lookup_and_unmapped_is_a_counted_drop():
    gw = welcomed()
    gw.packet(ip4(HOST, POOL, 17, udp(7007, 5555, HOST, POOL)), 0.1)
    handoff, _ = split(gw.flush(0.1))
    assert handoff == [[wire.Cookie(COOKIE), wire.Lookup(5555)]]
    gw.packet(reply([wire.Unmapped(5555)]), 0.2)
    assert split(gw.flush(0.2)) == ([], [])
    assert gw.counts["drop_unmapped"] == 1 and gw.pending() == 0


def test_lookup_answer_releases_inbound_packets_to_the_client():
    gw = welcomed()
    gw.packet(ip4(HOST, POOL, 17, udp(7007, 5555, HOST, POOL, b"back")), 0.1)
    gw.flush(0.1)
    gw.packet(reply([wire.Mapping(5555, CLIENT, CPORT)]), 0.2)
    _, other = split(gw.flush(0.2))
    assert len(other) == 1
    assert other[0][24:40] == CLIENT and int.from_bytes(other[0][42:44], "big") == CPORT


def test_requests_are_retransmitted_then_given_up():
    gw = welcomed()
    gw.packet(syn(), 0.0)
    sent = [now for now in [i * 0.05 for i in range(200)] if split(gw.flush(now))[0]]
    assert len(sent) == core.REQUEST_TRIES
    assert sent[0] == 0.0 and sent[1] == pytest.approx(core.REQUEST_RTO)
    assert gw.counts["drop_request_timeout"] == 1 and gw.pending() == 0


def test_bad_cookie_is_a_hint_hello_again_same_boot_keeping_the_cookie():
    gw = welcomed()
    gw.packet(syn(), 1.0)
    gw.flush(1.0)
    gw.packet(reply([wire.Error(wire.ErrorCode.BAD_COOKIE, wire.Kind.COOKIE)]), 1.1)
    handoff, _ = split(gw.flush(1.1))
    assert handoff == [[wire.Hello(BOOT)]]
    # A forged BAD_COOKIE looks the same: the cookie we hold keeps working,
    # and more of them do not make us HELLO faster.
    for _ in range(5):
        gw.packet(reply([wire.Error(wire.ErrorCode.BAD_COOKIE, wire.Kind.COOKIE)]), 1.15)
    gw.packet(syn(CPORT + 1), 1.15)
    handoff, _ = split(gw.flush(1.15))
    assert handoff == [[wire.Cookie(COOKIE), wire.Map(CLIENT, CPORT + 1)]]
    gw.packet(reply([wire.Welcome(1028, 65535, b"D" * 8, BOOT)]), 1.2)
    handoff, _ = split(gw.flush(1.2))
    assert handoff == [
        [wire.Cookie(b"D" * 8), wire.Hello(BOOT)],
        [wire.Cookie(b"D" * 8), wire.Map(CLIENT, CPORT), wire.Map(CLIENT, CPORT + 1)],
    ]
    # The next BAD_COOKIE is answered no sooner than HELLO_RTO after the last HELLO.
    gw.packet(reply([wire.Error(wire.ErrorCode.BAD_COOKIE, wire.Kind.COOKIE)]), 1.3)
    assert split(gw.flush(1.3))[0] == []
    assert split(gw.flush(1.1 + core.HELLO_RTO))[0] == [[wire.Hello(BOOT)]]


def test_deleted_entry_is_asked_for_again():
    gw = welcomed()
    gw.packet(syn(), 0.0)
    gw.flush(0.0)
    gw.packet(reply([wire.Mapping(40000, CLIENT, CPORT)]), 0.0)
    gw.flush(0.0)
    other_client = CLIENT[:15] + b"\x99"
    gw.packet(syn(1, other_client), 0.1)
    gw.flush(0.1)
    gw.packet(
        reply([wire.Deleted(40000, CLIENT, CPORT), wire.Mapping(40000, other_client, 1)]), 0.1
    )
    _, out = split(gw.flush(0.1))
    assert len(out) == 1 and int.from_bytes(out[0][20:22], "big") == 40000
    gw.packet(syn(), 0.2)
    handoff, out = split(gw.flush(0.2))
    assert handoff == [[wire.Cookie(COOKIE), wire.Map(CLIENT, CPORT)]] and out == []


def test_ports_in_use_are_touched_in_batches():
    gw = welcomed(touch_interval=1.0)
    for port in range(300):
        gw.packet(reply([wire.Mapping(2000 + port, CLIENT, port)]), 0.1)
        gw.packet(syn(port), 0.1)
    gw.flush(0.1)
    handoff, _ = split(gw.flush(1.0))
    touched = [p for msgs in handoff for m in msgs if isinstance(m, wire.Touch) for p in m.ports]
    assert sorted(touched) == list(range(2000, 2300))
    assert all(len(m.ports) <= 255 for msgs in handoff for m in msgs if isinstance(m, wire.Touch))
    assert split(gw.flush(2.0))[0] == []  # nothing used since


def test_destination_without_server_gets_icmp6_unreachable():
    gw = welcomed()
    other_host = PREFIX + bytes((192, 0, 2, 77))
    gw.packet(ip6(CLIENT, other_host, 6, tcp(CPORT, 80, CLIENT, other_host)), 0.1)
    handoff, out = split(gw.flush(0.1))
    assert handoff == [] and len(out) == 1
    assert out[0][6] == 58 and out[0][40:42] == bytes((1, 1)) and out[0][24:40] == CLIENT
    assert gw.counts["drop_no_server"] == 1 and gw.counts["icmp6_unreachable"] == 1


def test_garbage_from_the_tun_is_counted_never_raised():
    gw = welcomed()
    for junk in (b"", b"\x00", b"\x60" * 39, b"\x45" * 19, bytes(range(256))):
        gw.packet(junk, 0.1)
    gw.packet(t.udp4(HOST, SERVER_PORT, POOL, core.HANDOFF_PORT, b"\x00\x01"), 0.1)
    assert sum(v for k, v in gw.counts.items() if k.startswith(("drop_", "handoff_"))) == 6


def test_touch_answered_unmapped_makes_the_next_packet_map_again():
    gw = welcomed(touch_interval=1.0)
    gw.packet(reply([wire.Mapping(40000, CLIENT, CPORT)]), 0.0)
    gw.packet(syn(), 0.1)
    gw.flush(0.1)
    handoff, _ = split(gw.flush(1.0))
    assert handoff == [[wire.Cookie(COOKIE), wire.Touch((40000,))]]
    gw.packet(reply([wire.Unmapped(40000)]), 1.1)  # e.g. the server's table was reset
    gw.packet(syn(), 1.2)
    handoff, out = split(gw.flush(1.2))
    assert handoff == [[wire.Cookie(COOKIE), wire.Map(CLIENT, CPORT)]] and out == []


def test_touch_goes_before_new_maps_in_the_same_datagram():
    gw = welcomed(touch_interval=1.0)
    gw.packet(reply([wire.Mapping(40000, CLIENT, CPORT)]), 0.0)
    gw.packet(syn(), 0.5)
    gw.packet(syn(1), 1.0)  # a new flow in the same batch as the due TOUCH
    handoff, _ = split(gw.flush(1.0))
    assert handoff == [[wire.Cookie(COOKIE), wire.Touch((40000,)), wire.Map(CLIENT, 1)]]
