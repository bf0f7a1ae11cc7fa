"""Session rules of the handoff server (PROTOCOL.md §4, §7): who may say
HELLO, which cookie opens a datagram, and each NAT64's share of the server.

Pure: no socket, no clock, no database. Every call takes the time (``now``,
the monotonic table clock, and ``wall``, UTC, both in µs) and returns a
verdict that the server carries out.

The strategy, in short. A HELLO proves nothing (its source can be forged), so
it only earns a WELCOME and a *claim* kept in memory, bounded. A NAT64 is
*confirmed* by the first datagram that carries a claimed boot's cookie: that
sender receives our datagrams at that address. Only a confirmation changes
what is recorded (the boot id, an ``Initialized`` line) and retires the
cookie of the boot known before; until then that older cookie keeps working,
so no forged HELLO can cut a NAT64 off. Cookies change with the epoch
(⌊wall / lifetime⌋); the current and the previous epoch are accepted.

Until a source has proven itself, nothing is sent to it longer than what it
sent (§7): a HELLO is as long as a WELCOME, and an ERROR (4 octets) goes only
to a datagram of at least 4 octets.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import NamedTuple

from nat64ho.core import wire

#: NAT64 addresses whose unconfirmed HELLOs are remembered; the least
#: recently claimed are forgotten first. Each costs about 300 octets.
MAX_CLAIMS = 16384
#: Claimed boots remembered per address: a forger repeating HELLOs with new
#: boot ids must not push a real NAT64's fresh claim out before it confirms.
CLAIMS_PER_NAT = 4
#: Sources whose HELLO rate is tracked (each bucket about 150 octets).
MAX_HELLO_SOURCES = 65536
#: Cookie lifetime by default (PROTOCOL.md §4.2): a day.
DEFAULT_COOKIE_LIFETIME = 86400

#: ERROR (4 octets) is the smallest answer; §7 sends none to a smaller datagram.
_ERROR_SIZE = 4


def cookie(secret: bytes, nat: int, boot_id: bytes, epoch: int) -> bytes:
    """PROTOCOL.md §4.2: HMAC-SHA256(secret, NAT ‖ boot id ‖ epoch), 8 octets."""
    msg = nat.to_bytes(4, "big") + boot_id + epoch.to_bytes(4, "big")
    return hmac.new(secret, msg, hashlib.sha256).digest()[:8]


class Bucket:
    """Token bucket: ``rate`` per second, burst of ``rate``; rate 0 = unlimited."""

    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, now: int):
        self.rate = rate
        self.burst = max(rate, 1.0)
        self.tokens = self.burst
        self.stamp = now

    def _refill(self, now: int) -> None:
        if now > self.stamp:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate / 1e6)
            self.stamp = now

    def take(self, now: int) -> bool:
        if self.rate <= 0:
            return True
        self._refill(now)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def spend(self, n: int, now: int) -> bool:
        """Take ``n`` tokens at once if at least one is there, going into debt
        for the rest: a datagram bigger than the burst is admitted whole
        (PROTOCOL.md §2) and paid for by the ones after it."""
        if self.rate <= 0:
            return True
        self._refill(now)
        if self.tokens >= 1.0:
            self.tokens -= n
            return True
        return False

    def full(self, now: int) -> bool:
        """Whether forgetting this bucket changes nothing: a new one would
        start just as full."""
        if self.rate <= 0:
            return True
        return self.tokens + max(0, now - self.stamp) * self.rate / 1e6 >= self.burst


class Refused(NamedTuple):
    """Drop the datagram: ``reason`` is counted, ``answer`` (an ERROR, or
    None where §7 allows none) is sent."""

    reason: str
    answer: bytes | None


class Welcomed(NamedTuple):
    """A HELLO was answered: send ``answer`` (a WELCOME)."""

    answer: bytes


class Confirmation(NamedTuple):
    """The datagram confirmed a claimed boot: record ``boot_id`` for ``nat``
    in the same transaction as the rest of the datagram."""

    nat: int
    boot_id: bytes
    initialized: bool  #: log ``Initialized``: a first boot, or a new boot id
    new_nat: bool  #: the NAT64 holds no table yet


class Opened(NamedTuple):
    """The datagram's cookie is valid; ``confirmation`` is set when it
    confirmed a claim."""

    confirmation: Confirmation | None


OPENED = Opened(None)


class _Claim:
    __slots__ = ("boot_id", "epoch", "cookie")

    def __init__(self, boot_id: bytes, epoch: int, cookie_: bytes):
        self.boot_id = boot_id
        self.epoch = epoch
        self.cookie = cookie_


class Sessions:
    """The session state of every NAT64 the server knows.

    ``known`` maps each confirmed NAT64 (as recorded in the database) to its
    boot id. :meth:`hello` answers HELLOs, :meth:`open` checks the COOKIE
    that opens every other datagram.
    """

    def __init__(
        self,
        secret: bytes,
        *,
        first_port: int,
        last_port: int,
        allow: Iterable[ipaddress.IPv4Network] = (),
        hello_rate: float = 5.0,
        max_nats: int = 4096,
        cookie_lifetime: int = DEFAULT_COOKIE_LIFETIME,
        known: Mapping[int, bytes] | None = None,
    ):
        if cookie_lifetime < 1:
            raise ValueError("cookie lifetime must be at least 1 s")
        self.secret = secret
        self.first_port = first_port
        self.last_port = last_port
        self.allow = [(int(n.network_address), int(n.netmask)) for n in allow]
        self.hello_rate = hello_rate
        self.max_nats = max_nats
        self.lifetime_us = cookie_lifetime * 1_000_000
        #: Confirmed NAT64 -> its boot id (recorded, or confirmed and about to be).
        self.boots: dict[int, bytes] = dict(known or {})
        #: Confirmed NAT64 -> (epoch, its cookie then, its cookie the epoch before).
        self._cookies: dict[int, tuple[int, bytes, bytes]] = {}
        #: Unconfirmed boots by NAT64, least recently claimed first.
        self.claims: OrderedDict[int, list[_Claim]] = OrderedDict()
        #: HELLO rate buckets by source, least recently used first.
        self.hello_buckets: OrderedDict[int, Bucket] = OrderedDict()

    def epoch(self, wall: int) -> int:
        return wall // self.lifetime_us

    # ------------------------------------------------------------ HELLO
    def hello(
        self, nat: int, hello: wire.Hello, size: int, now: int, wall: int
    ) -> Welcomed | Refused:
        """Answer a datagram holding exactly one HELLO, ``size`` octets long."""
        if not self.allowed(nat):
            return self._refuse("not_allowed", wire.ErrorCode.NOT_ALLOWED, size)
        if self.hello_rate > 0:
            bucket = self._hello_bucket(nat, now)
            if bucket is None or not bucket.take(now):
                return self._refuse("hello_rate", wire.ErrorCode.RATE_LIMITED, size)
        if hello.version != wire.VERSION:
            return self._refuse("bad_version", wire.ErrorCode.BAD_VERSION, size)
        epoch = self.epoch(wall)
        boot = self.boots.get(nat)
        if boot is None and len(self.boots) >= self.max_nats:
            return self._refuse("too_many_nats", wire.ErrorCode.NOT_ALLOWED, size)
        if boot == hello.boot_id:
            # The boot already recorded (a lost WELCOME, an expired cookie):
            # nothing to claim, nothing to log.
            value = self._current(nat, epoch)[1]
        else:
            value = self._claim(nat, hello.boot_id, epoch)
        return Welcomed(
            wire.encode(wire.Welcome(self.first_port, self.last_port, value, hello.boot_id))
        )

    def allowed(self, nat: int) -> bool:
        if not self.allow:
            return True
        return any(nat & mask == net for net, mask in self.allow)

    def _hello_bucket(self, nat: int, now: int) -> Bucket | None:
        buckets = self.hello_buckets
        bucket = buckets.get(nat)
        if bucket is not None:
            buckets.move_to_end(nat)
            return bucket
        if len(buckets) >= MAX_HELLO_SOURCES:
            oldest = next(iter(buckets))
            if not buckets[oldest].full(now):
                # Forgetting a bucket that is not full would hand its source
                # a fresh burst; with every tracked source that busy, the
                # newcomer waits instead.
                return None
            del buckets[oldest]
        bucket = buckets[nat] = Bucket(self.hello_rate, now)
        return bucket

    def _claim(self, nat: int, boot_id: bytes, epoch: int) -> bytes:
        claims = self.claims.get(nat)
        if claims is None:
            if len(self.claims) >= MAX_CLAIMS:
                self.claims.popitem(last=False)
            claims = self.claims[nat] = []
        else:
            self.claims.move_to_end(nat)
        for c in claims:
            if c.boot_id == boot_id:
                claims.remove(c)
                break
        value = cookie(self.secret, nat, boot_id, epoch)
        claims.append(_Claim(boot_id, epoch, value))
        if len(claims) > CLAIMS_PER_NAT:
            del claims[0]
        return value

    # ------------------------------------------------------------ COOKIE
    def open(self, nat: int, value: bytes, size: int, wall: int) -> Opened | Refused:
        """Check the COOKIE opening a datagram of ``size`` octets from ``nat``."""
        epoch = wall // self.lifetime_us
        if nat in self.boots:
            cached = self._cookies.get(nat)
            if cached is None or cached[0] != epoch:
                cached = self._current(nat, epoch)
            if hmac.compare_digest(cached[1], value) or hmac.compare_digest(cached[2], value):
                return OPENED
        claims = self.claims.get(nat)
        if claims:
            # A claim's cookie is the one its WELCOME carried, for the epoch
            # of its HELLO; it is valid while that epoch is current or last.
            for c in reversed(claims):
                if epoch - 1 <= c.epoch <= epoch and hmac.compare_digest(c.cookie, value):
                    return self._confirm(nat, c.boot_id, size)
        return self._refuse("bad_cookie", wire.ErrorCode.BAD_COOKIE, size, wire.Kind.COOKIE)

    def _confirm(self, nat: int, boot_id: bytes, size: int) -> Opened | Refused:
        old = self.boots.get(nat)
        if old is None and len(self.boots) >= self.max_nats:
            return self._refuse("too_many_nats", wire.ErrorCode.NOT_ALLOWED, size, wire.Kind.COOKIE)
        claims = self.claims[nat]
        claims[:] = [c for c in claims if c.boot_id != boot_id]
        if not claims:
            del self.claims[nat]
        self.boots[nat] = boot_id
        self._cookies.pop(nat, None)  # the previous boot's cookie retires here
        return Opened(Confirmation(nat, boot_id, initialized=old != boot_id, new_nat=old is None))

    def _current(self, nat: int, epoch: int) -> tuple[int, bytes, bytes]:
        """The confirmed boot's cookies for ``epoch`` and the one before."""
        boot = self.boots[nat]
        cached = self._cookies.get(nat)
        if cached is not None and cached[0] == epoch:
            return cached
        if cached is not None and cached[0] == epoch - 1:
            prev = cached[1]
        else:
            prev = cookie(self.secret, nat, boot, epoch - 1)
        cached = self._cookies[nat] = (epoch, cookie(self.secret, nat, boot, epoch), prev)
        return cached

    # ------------------------------------------------------------ answers
    @staticmethod
    def _refuse(
        reason: str, code: wire.ErrorCode, size: int, offending: int = wire.Kind.HELLO
    ) -> Refused:
        answer = wire.error(code, offending) if size >= _ERROR_SIZE else None
        return Refused(reason, answer)

    def no_cookie(self, first_octet: int, size: int) -> Refused:
        """A datagram opened by neither HELLO nor COOKIE."""
        return self._refuse("no_cookie", wire.ErrorCode.BAD_COOKIE, size, first_octet)


class Share:
    """One confirmed NAT64's share of the server (PROTOCOL.md §7): its rate of
    request messages, and its bounds on work waiting for reads and commits.
    The server keeps the counts; this says yes or no."""

    __slots__ = ("requests", "errors", "queued", "waiting", "backlog")

    def __init__(self, request_rate: float, now: int):
        self.requests = Bucket(request_rate, now)
        #: ERROR RATE_LIMITED answers are themselves bounded: beyond this the
        #: refused datagram is dropped without an answer.
        self.errors = Bucket(max(request_rate / 10, 10.0) if request_rate > 0 else 0.0, now)
        self.queued = 0  #: datagrams waiting for database reads
        self.waiting = 0  #: datagrams whose answers wait for a commit
        self.backlog = 0  #: rows of this NAT64 waiting to be committed
