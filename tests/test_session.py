"""The session rules (PROTOCOL.md §4, §7) without a network: HELLO claims,
confirmations, cookie epochs, HELLO buckets, the limit on NAT64s."""

from __future__ import annotations

import ipaddress

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
    return Sessions(SECRET, **kw)


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
    assert s.open(NAT, cookie.cookie, 10, WALL) == Opened(Confirmation(NAT, BOOT, True, True))
    assert s.open(NAT, cookie.cookie, 10, WALL) == session.OPENED


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
    assert s.open(NAT, forged.cookie, 10, WALL) == Opened(Confirmation(NAT, b"F" * 8, True, False))
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


def test_cookies_live_one_to_two_lifetimes():
    s = sessions(cookie_lifetime=86400)
    w = welcome_of(s.hello(NAT, wire.Hello(BOOT), 26, 0, WALL))
    assert s.open(NAT, w.cookie, 10, WALL).confirmation is not None
    assert s.open(NAT, w.cookie, 10, WALL + DAY_US) == session.OPENED  # previous epoch
    refused = s.open(NAT, w.cookie, 10, WALL + 2 * DAY_US)
    assert refused == Refused("bad_cookie", bytes((0x39, 1, 1, 0x30)))
    # HELLO again with the same boot id: a cookie of the new epoch, no claim.
    again = welcome_of(s.hello(NAT, wire.Hello(BOOT), 26, 0, WALL + 2 * DAY_US))
    assert again.cookie == session.cookie(SECRET, NAT, BOOT, 20002)
    assert s.open(NAT, again.cookie, 10, WALL + 2 * DAY_US) == session.OPENED


def test_an_unconfirmed_claim_expires_with_its_epoch():
    s = sessions()
    w = welcome_of(s.hello(NAT, wire.Hello(BOOT), 26, 0, WALL))
    assert isinstance(s.open(NAT, w.cookie, 10, WALL + 2 * DAY_US), Refused)
    assert s.open(NAT, w.cookie, 10, WALL + DAY_US).confirmation is not None


def test_max_nats_counts_confirmed_nat64s_only():
    s = sessions(max_nats=2)
    for i in range(100):  # claims take no place
        welcome_of(s.hello(NAT + i, wire.Hello(BOOT), 26, 0, WALL))
    w = [session.cookie(SECRET, NAT + i, BOOT, 20000) for i in range(3)]
    assert s.open(NAT, w[0], 10, WALL).confirmation.new_nat
    assert s.open(NAT + 1, w[1], 10, WALL).confirmation.new_nat
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


def test_hello_rate_per_source():
    s = sessions(hello_rate=2)
    verdicts = [s.hello(NAT, wire.Hello(BOOT), 26, 0, WALL) for _ in range(3)]
    assert [type(v) for v in verdicts] == [Welcomed, Welcomed, Refused]
    assert verdicts[2].reason == "hello_rate"
    assert isinstance(s.hello(NAT, wire.Hello(BOOT), 26, S // 2, WALL), Welcomed)  # refilled one


def test_hello_buckets_are_forgotten_only_when_full_again(monkeypatch):
    monkeypatch.setattr(session, "MAX_HELLO_SOURCES", 4)
    s = sessions(hello_rate=1)
    for i in range(4):  # four sources spend their only token
        assert isinstance(s.hello(NAT + i, wire.Hello(BOOT), 26, 0, WALL), Welcomed)
    # A fifth source may not push out a bucket that is still empty: that
    # would hand its source a fresh burst.
    assert s.hello(NAT + 4, wire.Hello(BOOT), 26, 0, WALL).reason == "hello_rate"
    assert isinstance(s.hello(NAT, wire.Hello(BOOT), 26, 0, WALL), Refused)
    # A second later the least recently used bucket is full again: forgetting
    # it changes nothing, so the newcomer takes its place.
    assert isinstance(s.hello(NAT + 4, wire.Hello(BOOT), 26, S, WALL), Welcomed)
    assert NAT + 1 not in s.hello_buckets and NAT in s.hello_buckets


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
