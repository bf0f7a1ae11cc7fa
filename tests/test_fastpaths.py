"""The hot paths' shortcuts give exactly what the general code gives: log
text, reply octets, datagram packing."""

from __future__ import annotations

import datetime as dt
import ipaddress

from hypothesis import given
from hypothesis import strategies as st

from nat64ho.core import wire
from nat64ho.eventlog import ipv6_str, ts_str

# Zero-heavy hextets, so that runs of zeros of every length and position
# (where RFC 5952 compression has its corner cases) are common.
hextet = st.sampled_from([0, 0, 0, 1, 0xFFFF]) | st.integers(0, 0xFFFF)
address = st.lists(hextet, min_size=8, max_size=8).map(
    lambda words: b"".join(w.to_bytes(2, "big") for w in words)
)


@given(address)
def test_ipv6_text_is_ipaddress_rfc5952(addr):
    ip = ipaddress.IPv6Address(addr)
    want = f"::ffff:{ip.ipv4_mapped}" if ip.ipv4_mapped is not None else ip.compressed
    assert ipv6_str(addr) == want


@given(st.integers(-(10**15), 10**17))
def test_time_stamp_text_is_datetime(ts):
    t = dt.datetime(1970, 1, 1, tzinfo=dt.UTC) + dt.timedelta(microseconds=ts)
    assert ts_str(ts) == t.strftime("%Y-%m-%d %H:%M:%S.%f")  # years 1938-5138: four digits


@given(st.integers(0, 65535), st.binary(min_size=16, max_size=16), st.integers(0, 65535))
def test_direct_replies_are_encode(port, addr, aport):
    assert wire.mapping(port, addr, aport) == wire.encode(wire.Mapping(port, addr, aport))
    assert wire.deleted(port, addr, aport) == wire.encode(wire.Deleted(port, addr, aport))


@given(
    st.lists(st.lists(st.binary(min_size=1, max_size=30), min_size=1, max_size=2), max_size=80),
    st.sampled_from([wire.MAX_DATAGRAM, 64, 30]),
)
def test_pack_keeps_units_whole_and_in_order(units, limit):
    out = wire.pack(units, limit)
    assert b"".join(out) == b"".join(b for u in units for b in u)
    if sum(len(b) for u in units for b in u) <= limit:
        assert len(out) == (1 if units else 0)
    biggest = max((sum(map(len, u)) for u in units), default=0)
    assert all(len(d) <= max(limit, biggest) for d in out)


@given(st.integers(0, 2**32 - 1))
def test_ipv4_text_is_ipaddress(nat):
    from nat64ho.eventlog import ipv4_str

    assert ipv4_str(nat) == str(ipaddress.IPv4Address(nat))


def test_remembered_sources_stay_bounded_and_still_tell_ipv4_apart(tmp_path):
    import asyncio

    from nat64ho.daemon import protocol
    from tests.test_server_inproc import start, stop

    lookup = wire.build([wire.Lookup(1)])  # no COOKIE: refused after the source check

    async def go():
        srv, _ = await start(tmp_path)
        for i in range(protocol.MAX_SOURCES + 100):  # forged sources, each new
            srv.datagram_received(lookup, (str(ipaddress.IPv4Address(0x0A000000 + i)), 9))
        assert 0 < len(srv._sources) <= protocol.MAX_SOURCES
        assert srv._sources["10.0.16.99"] == 0x0A001063  # the last one, remembered
        for _ in range(2):
            srv.datagram_received(lookup, ("2001:db8::1", 9, 0, 0))
        assert srv._sources["2001:db8::1"] is None
        drops = dict(srv.drops)
        await stop(srv)
        return drops

    drops = asyncio.run(go())
    assert drops == {"no_cookie": protocol.MAX_SOURCES + 100, "not_ipv4": 2}
