"""The session rules (docs/protocol.md §4, §7) without a network: HELLO
claims, confirmations, cookie epochs, the HELLO budget, the limit on NAT64s."""

from __future__ import annotations

import ipaddress
import random

import pytest

from nat64ho.core import session, wire
from nat64ho.core.session import Bucket, Confirmation, Opened, Refused, Sessions, Welcomed

SECRET = bytes(range(32))
NAT = int(ipaddress.IPv4Address("192.0.2.9"))
BOOT = bytes.fromhex("0102030405060708")
DAY_US = 86400 * 1_000_000
#: Any time on 2024-10-04 UTC: epoch 20000 of a one-day lifetime (§8).
WALL = 20000 * DAY_US + 12 * 3600 * 1_000_000
S = 1_000_000


def sessions(**kw) -> Sessions:
    kw.setdefault("first_port", 1028)
    kw.setdefault("last_port", 65535)
    kw.setdefault("rng", random.Random(7))
    return Sessions(SECRET, **kw)


def opened(s: Sessions, nat: int, value: bytes, wall: int = WALL, boot_id=None):
    """open(), and the confirmation it finds made to take effect, as the
    server does once the datagram parses."""
    verdict = s.open(nat, value, 10, wall, boot_id)
    if isinstance(verdict, Opened) and verdict.confirmation is not None:
        assert s.confirm(verdict.confirmation) == verdict.confirmation
    return verdict


def welcome_of(verdict) -> wire.Welcome:
    assert isinstance(verdict, Welcomed), verdict
    [w] = wire.parse(verdict.answer, wire.Direction.TO_NAT64)
    return w


def test_section_8_cookie_vectors():
    assert session.cookie(SECRET, NAT, BOOT, 20000).hex() == "8dcb0506d837aa41"
    assert session.cookie(SECRET, NAT, BOOT, 20001).hex() == "11f410b8d83569e6"


def test_section_8_welcome_vector():
    s = sessions()
    hello = wire.parse(bytes.fromhex("310c010001020304050607080000000000000000000000000000"))[0]
    verdict = s.hello(NAT, hello, 26, 0, WALL)
    assert verdict.answer.hex() == "320c01000404ffff8dcb0506d837aa4101020304050607080000"
    # The vector's COOKIE confirms that boot: a first boot, to be logged.
    cookie = wire.parse(bytes.fromhex("30048dcb0506d837aa41"))[0]
    assert opened(s, NAT, cookie.cookie) == Opened(Confirmation(NAT, BOOT, True, True))
    assert s.open(NAT, cookie.cookie, 10, WALL) == session.OPENED


def test_section_8_confirm_vector_needs_no_memory_of_the_claim():
    datagram = bytes.fromhex(
        "30048dcb0506d837aa41310c010001020304050607080000000000000000000000000000"
    )
    cookie, hello = wire.parse(datagram)
    assert (cookie, hello) == (wire.Cookie(bytes.fromhex("8dcb0506d837aa41")), wire.Hello(BOOT))
    s = sessions()  # never saw the HELLO: a restart, or its claim pushed out
    verdict = s.open(NAT, cookie.cookie, len(datagram), WALL, hello.boot_id)
    assert verdict == Opened(Confirmation(NAT, BOOT, True, True))
    assert s.boots == {}  # nothing happens until the server says so
    assert s.confirm(verdict.confirmation) == verdict.confirmation
    assert s.boots == {NAT: BOOT}
    # The same confirmation again (a retransmission) records nothing more.
    again = s.open(NAT, cookie.cookie, len(datagram), WALL, hello.boot_id)
    assert again == session.OPENED
    # The previous epoch's cookie confirms too; two epochs back does not.
    fresh = sessions()
    assert fresh.open(NAT, cookie.cookie, 36, WALL + DAY_US, BOOT).confirmation is not None
    assert fresh.open(NAT, cookie.cookie, 36, WALL + 2 * DAY_US, BOOT) == Refused(
        "bad_cookie", bytes((0x39, 1, 1, 0x30))
    )
    # The cookie must be that boot's: another boot id, or another address, fails.
    assert isinstance(fresh.open(NAT, cookie.cookie, 36, WALL, b"X" * 8), Refused)
    assert isinstance(fresh.open(NAT + 1, cookie.cookie, 36, WALL, BOOT), Refused)


def test_a_hello_is_a_claim_and_the_known_cookie_keeps_working():
    old = b"O" * 8
    s = sessions(known={NAT: old})
    old_cookie = session.cookie(SECRET, NAT, old, 20000)
    forged = welcome_of(s.hello(NAT, wire.Hello(b"F" * 8), 26, 0, WALL))
    assert s.boots == {NAT: old}  # nothing recorded
    for _ in range(3):
        assert s.open(NAT, old_cookie, 10, WALL) == session.OPENED
    # Whoever receives at the address uses the new cookie: confirmed, and
    # the old boot's cookie retires.
    assert opened(s, NAT, forged.cookie) == Opened(Confirmation(NAT, b"F" * 8, True, False))
    assert s.boots == {NAT: b"F" * 8}
    assert isinstance(s.open(NAT, old_cookie, 10, WALL), Refused)


def test_the_same_boot_again_is_no_claim_and_logs_nothing():
    s = sessions(known={NAT: BOOT})
    w = welcome_of(s.hello(NAT, wire.Hello(BOOT), 26, 0, WALL))
    assert w.cookie == session.cookie(SECRET, NAT, BOOT, 20000)
    assert s.claims == {}
    assert s.open(NAT, w.cookie, 10, WALL) == session.OPENED


def test_a_real_reboot_survives_a_forger_repeating_claims():
    s = sessions(known={NAT: b"O" * 8})
    real = welcome_of(s.hello(NAT, wire.Hello(b"R" * 8), 26, 0, WALL))
    for i in range(session.CLAIMS_PER_NAT - 1):  # claims that arrive before its confirmation
        s.hello(NAT, wire.Hello(bytes([i]) * 8), 26, 0, WALL)
    verdict = s.open(NAT, real.cookie, 10, WALL)
    assert verdict.confirmation is not None and verdict.confirmation.boot_id == b"R" * 8


def test_a_confirmation_carrying_its_hello_survives_any_number_of_forged_claims():
    s = sessions(known={NAT: b"O" * 8})
    real = welcome_of(s.hello(NAT, wire.Hello(b"R" * 8), 26, 0, WALL))
    for i in range(100):  # more than the claims remembered for an address
        s.hello(NAT, wire.Hello(i.to_bytes(8, "big")), 26, 0, WALL)
    # The v1.1 form has lost its claim; the v1.2 form names its boot.
    assert isinstance(s.open(NAT, real.cookie, 10, WALL), Refused)
    verdict = opened(s, NAT, real.cookie, boot_id=b"R" * 8)
    assert verdict == Opened(Confirmation(NAT, b"R" * 8, True, False))
    assert s.boots[NAT] == b"R" * 8


def test_cookies_live_one_to_two_lifetimes():
    s = sessions(cookie_lifetime=86400)
    w = welcome_of(s.hello(NAT, wire.Hello(BOOT), 26, 0, WALL))
    assert opened(s, NAT, w.cookie).confirmation is not None
    assert s.open(NAT, w.cookie, 10, WALL + DAY_US) == session.OPENED  # previous epoch
    refused = s.open(NAT, w.cookie, 10, WALL + 2 * DAY_US)
    assert refused == Refused("bad_cookie", bytes((0x39, 1, 1, 0x30)))
    # HELLO again with the same boot id: a cookie of the new epoch, no claim.
    again = welcome_of(s.hello(NAT, wire.Hello(BOOT), 26, 0, WALL + 2 * DAY_US))
    assert again.cookie == session.cookie(SECRET, NAT, BOOT, 20002)
    assert s.open(NAT, again.cookie, 10, WALL + 2 * DAY_US) == session.OPENED


def test_an_unconfirmed_claim_expires_with_its_epoch():
    for later, valid in ((DAY_US, True), (2 * DAY_US, False)):
        s = sessions()
        w = welcome_of(s.hello(NAT, wire.Hello(BOOT), 26, 0, WALL))
        verdict = s.open(NAT, w.cookie, 10, WALL + later)
        assert isinstance(verdict, Opened) is valid


def test_max_nats_counts_confirmed_nat64s_only():
    s = sessions(max_nats=2)
    for i in range(100):  # claims take no place
        welcome_of(s.hello(NAT + i, wire.Hello(BOOT), 26, 0, WALL))
    w = [session.cookie(SECRET, NAT + i, BOOT, 20000) for i in range(3)]
    assert opened(s, NAT, w[0]).confirmation.new_nat
    assert opened(s, NAT + 1, w[1]).confirmation.new_nat
    assert s.open(NAT + 2, w[2], 10, WALL) == Refused("too_many_nats", bytes((0x39, 1, 3, 0x30)))
    assert s.hello(NAT + 3, wire.Hello(BOOT), 26, 0, WALL) == Refused(
        "too_many_nats", bytes((0x39, 1, 3, 0x31))
    )
    # Known ones go on.
    assert isinstance(s.hello(NAT, wire.Hello(b"N" * 8), 26, 0, WALL), Welcomed)


def test_claims_are_bounded_least_recently_claimed_forgotten(monkeypatch):
    monkeypatch.setattr(session, "MAX_CLAIMS", 10)
    s = sessions()
    for i in range(25):
        s.hello(NAT + i, wire.Hello(BOOT), 26, 0, WALL)
    assert list(s.claims) == [NAT + i for i in range(15, 25)]


def test_allow_list_version_and_the_size_rule():
    s = sessions(allow=[ipaddress.IPv4Network("192.0.2.0/24")])
    other = int(ipaddress.IPv4Address("198.51.100.1"))
    assert s.hello(other, wire.Hello(BOOT), 26, 0, WALL) == Refused(
        "not_allowed", bytes((0x39, 1, 3, 0x31))
    )
    assert s.hello(NAT, wire.Hello(BOOT, version=2), 26, 0, WALL) == Refused(
        "bad_version", bytes((0x39, 1, 2, 0x31))
    )
    # §7: nothing longer than what came; an ERROR is 4 octets.
    assert s.open(NAT, bytes(8), 3, WALL) == Refused("bad_cookie", None)
    assert s.no_cookie(0x35, 3) == Refused("no_cookie", None)
    assert s.no_cookie(0x35, 4) == Refused("no_cookie", bytes((0x39, 1, 1, 0x35)))


def test_hello_budget_is_server_wide_and_exact_below_it():
    s = sessions(hello_rate=2)
    # Two HELLOs from two addresses spend the budget of both: no address has
    # an allowance of its own that a forger could spend.
    assert isinstance(s.hello(NAT, wire.Hello(BOOT), 26, 0, WALL), Welcomed)
    assert isinstance(s.hello(NAT + 1, wire.Hello(BOOT), 26, 0, WALL), Welcomed)
    refused = s.hello(NAT + 2, wire.Hello(BOOT), 26, 0, WALL)
    assert refused == Refused("hello_rate", bytes((0x39, 1, 4, 0x31)))
    assert isinstance(s.hello(NAT + 2, wire.Hello(BOOT), 26, 3 * S, WALL), Welcomed)  # refilled


def test_beyond_the_budget_hellos_are_dropped_at_random_and_a_retrying_nat64_gets_through():
    s = sessions(hello_rate=100)
    answered = tries = 0
    real_through = []
    for i in range(10_000):  # 1,000 HELLOs a second for 10 s from one address
        now = i * S // 1000
        verdict = s.hello(NAT, wire.Hello(i.to_bytes(8, "big")), 26, now, WALL)
        answered += isinstance(verdict, Welcomed)
        if i % 250 == 0:  # the real NAT64 retries every 250 ms
            tries += 1
            real_through.append(isinstance(s.hello(NAT, wire.Hello(BOOT), 26, now, WALL), Welcomed))
    # About the budget is answered in all, and the real NAT64 about as often
    # as a tenth of its tries: drops fall at random, not on whoever is late.
    assert 900 <= answered <= 1100
    assert 1 <= sum(real_through) <= tries // 2
    # Below the budget nothing is dropped.
    quiet = sessions(hello_rate=100)
    assert all(
        isinstance(quiet.hello(NAT, wire.Hello(BOOT), 26, i * S // 50, WALL), Welcomed)
        for i in range(500)
    )


def test_the_recorded_boot_id_has_its_own_allowance():
    s = sessions(hello_rate=1, known={NAT: BOOT})
    s.hello(NAT + 1, wire.Hello(b"F" * 8), 26, 0, WALL)  # the budget is spent
    assert isinstance(s.hello(NAT, wire.Hello(b"F" * 8), 26, 0, WALL), Refused)
    got = [
        s.hello(NAT, wire.Hello(BOOT), 26, 0, WALL) for _ in range(int(session.REHELLO_RATE) + 1)
    ]
    assert all(isinstance(v, Welcomed) for v in got[:-1])
    assert got[-1] == Refused("hello_rate", bytes((0x39, 1, 4, 0x31)))
    assert welcome_of(got[0]).cookie == session.cookie(SECRET, NAT, BOOT, 20000)


def test_the_epoch_never_goes_back():
    kept = []
    s = sessions(epoch_floor=20000, on_epoch=kept.append)
    w = welcome_of(s.hello(NAT, wire.Hello(BOOT), 26, 0, WALL))
    assert opened(s, NAT, w.cookie).confirmation is not None
    assert kept == []  # not above the floor
    # The wall clock steps back two days: cookies stay as of epoch 20000.
    assert s.open(NAT, w.cookie, 10, WALL - 2 * DAY_US) == session.OPENED
    again = welcome_of(s.hello(NAT, wire.Hello(BOOT), 26, 0, WALL - 2 * DAY_US))
    assert again.cookie == w.cookie
    # Forward: the new epoch is issued and told, once; then back again.
    assert s.open(NAT, w.cookie, 10, WALL + DAY_US) == session.OPENED
    assert kept == [20001]
    assert s.open(NAT, w.cookie, 10, WALL) == session.OPENED
    assert s.epoch(WALL - 5 * DAY_US) == 20001 and kept == [20001]
    # A server started with the clock behind its kept epoch goes on from it.
    later = sessions(epoch_floor=20001, known={NAT: BOOT})
    assert later.open(NAT, w.cookie, 10, WALL - 3 * DAY_US) == session.OPENED


def test_bucket_ready_takes_nothing():
    b = Bucket(1, 0)
    assert b.ready(0) and b.ready(0)
    assert b.take(0) and not b.ready(0)
    assert b.ready(S)


def test_bucket_spend_admits_a_big_datagram_whole_and_then_waits():
    b = Bucket(100, 0)
    assert b.spend(1000, 0)  # bigger than the burst: admitted, in debt
    assert not b.spend(1, S)  # 100 refilled of 900 owed
    assert b.spend(1, 10 * S)
    assert Bucket(0, 0).spend(10**6, 0)  # unlimited


@pytest.mark.parametrize("lifetime", [0, -5])
def test_cookie_lifetime_must_be_positive(lifetime):
    with pytest.raises(ValueError):
        sessions(cookie_lifetime=lifetime)


def test_the_nat64_side_keeps_its_cookie_on_bad_cookie_and_confirms_with_its_hello():
    from nat64ho.peer import Peer

    s = sessions()
    peer = Peer(BOOT)
    peer.receive(s.hello(NAT, wire.parse(peer.hello())[0], 26, 0, WALL).answer)
    [cookie, hello] = wire.parse(peer.confirm())
    assert (cookie, hello) == (wire.Cookie(peer.cookie), wire.Hello(BOOT))
    assert peer.confirm().hex() == (
        "30048dcb0506d837aa41310c010001020304050607080000000000000000000000000000"
    )  # the §8 CONFIRM vector
    # A BAD_COOKIE anyone could have caused changes nothing; a WELCOME for
    # another boot neither.
    peer.receive(wire.error(wire.ErrorCode.BAD_COOKIE, wire.Kind.COOKIE))
    peer.receive(wire.encode(wire.Welcome(1, 2, b"F" * 8, b"other-id")))
    assert peer.cookie == cookie.cookie
