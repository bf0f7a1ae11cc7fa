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
