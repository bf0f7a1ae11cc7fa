"""Session rules of the handoff server (docs/protocol.md §4, §7): who may say
HELLO, which cookie opens a datagram, and each NAT64's share of the server.

Pure: no socket, no clock, no database. Every call takes the time (``now``,
the monotonic table clock, and ``wall``, UTC, both in µs) and returns a
verdict that the server carries out.

The strategy, in short. A HELLO proves nothing (its source can be forged), so
it only earns a WELCOME and a *claim* kept in memory, bounded. A NAT64 is
*confirmed* by the first datagram that carries a claimed boot's cookie: that
sender receives our datagrams at that address. A confirmation that carries
its HELLO after the COOKIE (v1.2) names its boot, so it needs no memory of
the claim, and no flood of forged claims can push it out. Only a
confirmation changes what is recorded (the boot id, an ``Initialized`` line)
and retires the cookie of the boot known before; until then that older
cookie keeps working, so no forged HELLO can cut a NAT64 off. Cookies change
with the epoch (⌊wall / lifetime⌋, never below the highest one issued); the
current and the previous epoch are accepted.

HELLOs are answered within a server-wide budget, dropped at random beyond
it, so that no forger can spend an allowance that belongs to one address; a
HELLO repeating a confirmed NAT64's recorded boot id, which an off-path
forger cannot know, has an allowance of its own.

Until a source has proven itself, nothing is sent to it longer than what it
sent (§7): a HELLO is as long as a WELCOME, and an ERROR (4 octets) goes only
to a datagram of at least 4 octets.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import random
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from typing import NamedTuple

from nat64ho.core import wire

#: NAT64 addresses whose unconfirmed HELLOs are remembered; the least
#: recently claimed are forgotten first. Each costs about 300 octets.
MAX_CLAIMS = 16384
#: Claimed boots remembered per address: a forger repeating HELLOs with new
#: boot ids must not push a real NAT64's fresh claim out before it confirms.
CLAIMS_PER_NAT = 4
#: HELLOs answered per second, all sources together, by default. Answering
#: one costs an HMAC and a WELCOME no longer than the HELLO: a few
#: milliseconds of CPU a second at this rate.
DEFAULT_HELLO_RATE = 2000.0
#: HELLOs per second (and burst) a confirmed NAT64 may send with its recorded
#: boot id: after a lost WELCOME, an expired cookie or a forged BAD_COOKIE.
REHELLO_RATE = 5.0
#: Cookie lifetime by default (docs/protocol.md §4.2): a day.
DEFAULT_COOKIE_LIFETIME = 86400

#: ERROR (4 octets) is the smallest answer; §7 sends none to a smaller datagram.
_ERROR_SIZE = 4


def cookie(secret: bytes, nat: int, boot_id: bytes, epoch: int) -> bytes:
    """docs/protocol.md §4.2: HMAC-SHA256(secret, NAT ‖ boot id ‖ epoch), 8 octets."""
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

    def ready(self, now: int) -> bool:
        """Whether a token is there, taking none: a datagram over its share
        is refused on this alone, before it is parsed (§2)."""
        if self.rate <= 0:
            return True
        self._refill(now)
        return self.tokens >= 1.0

    def spend(self, n: int, now: int) -> bool:
        """Take ``n`` tokens at once if at least one is there, going into debt
        for the rest: a datagram bigger than the burst is admitted whole
        (docs/protocol.md §2) and paid for by the ones after it."""
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


class HelloBudget:
    """The server-wide HELLO budget (§7): ``rate`` per second. While its
    bucket is at least half full every HELLO is answered; below that, with
    the probability of its fill, so beyond the budget HELLOs are dropped at
    random whatever their timing, and a NAT64 retrying among a flood gets
    through in proportion. ``rate`` 0 = unlimited."""

    __slots__ = ("bucket", "errors", "rng")

    def __init__(self, rate: float, now: int, rng: random.Random):
        self.bucket = Bucket(rate, now)
        #: ERROR RATE_LIMITED answers to refused HELLOs, at most as many.
        self.errors = Bucket(rate, now)
        self.rng = rng

    def admit(self, now: int) -> bool | None:
        """True: answer; False: refuse with ERROR; None: drop unanswered."""
        bucket = self.bucket
        if bucket.rate <= 0:
            return True
        bucket._refill(now)
        tokens = bucket.tokens
        half = bucket.burst / 2
        if tokens >= 1.0 and (tokens >= half or self.rng.random() * half < tokens):
            bucket.tokens = tokens - 1.0
            return True
        if tokens >= 1.0:
            return None  # lost the draw: silent, as the flood it is part of
        return False if self.errors.take(now) else None


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
    confirms a boot, which takes effect by :meth:`Sessions.confirm` once the
    datagram is known to be well-formed."""

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
    that opens every other datagram. ``epoch_floor``: the highest epoch
    issued before (kept with the table); ``on_epoch`` is told each time a
    higher one is first used, to keep it.
    """

    def __init__(
        self,
        secret: bytes,
        *,
        first_port: int,
        last_port: int,
        allow: Iterable[ipaddress.IPv4Network] = (),
        hello_rate: float = DEFAULT_HELLO_RATE,
        max_nats: int = 4096,
        cookie_lifetime: int = DEFAULT_COOKIE_LIFETIME,
        known: Mapping[int, bytes] | None = None,
        epoch_floor: int = 0,
        on_epoch: Callable[[int], None] | None = None,
        rng: random.Random | None = None,
        now: int = 0,
    ):
        if cookie_lifetime < 1:
            raise ValueError("cookie lifetime must be at least 1 s")
        self.secret = secret
        self.first_port = first_port
        self.last_port = last_port
        self.allow = [(int(n.network_address), int(n.netmask)) for n in allow]
        self.hello_budget = HelloBudget(hello_rate, now, rng or random.Random())
        self.max_nats = max_nats
        self.lifetime_us = cookie_lifetime * 1_000_000
        #: Confirmed NAT64 -> its boot id (recorded, or confirmed and about to be).
        self.boots: dict[int, bytes] = dict(known or {})
        #: Confirmed NAT64 -> (epoch, its cookie then, its cookie the epoch before).
        self._cookies: dict[int, tuple[int, bytes, bytes]] = {}
        #: Unconfirmed boots by NAT64, least recently claimed first.
        self.claims: OrderedDict[int, list[_Claim]] = OrderedDict()
        #: Confirmed NAT64 -> its allowance of HELLOs with the recorded boot id.
        self.rehellos: dict[int, Bucket] = {}
        self.epoch_hwm = epoch_floor
        self.on_epoch = on_epoch

    def epoch(self, wall: int) -> int:
        """The epoch of cookies issued and accepted now: never before the
        highest one issued (§4.6), so a wall clock stepping back keeps the
        cookies NAT64s hold valid."""
        epoch = wall // self.lifetime_us
        if epoch <= self.epoch_hwm:
            return self.epoch_hwm
        self.epoch_hwm = epoch
        if self.on_epoch is not None:
            self.on_epoch(epoch)
        return epoch

    # ------------------------------------------------------------ HELLO
    def hello(
        self, nat: int, hello: wire.Hello, size: int, now: int, wall: int
    ) -> Welcomed | Refused:
        """Answer a datagram holding exactly one HELLO, ``size`` octets long."""
        if not self.allowed(nat):
            return self._refuse("not_allowed", wire.ErrorCode.NOT_ALLOWED, size)
        if hello.version != wire.VERSION:
            return self._refuse("bad_version", wire.ErrorCode.BAD_VERSION, size)
        boot = self.boots.get(nat)
        if boot is not None and boot == hello.boot_id:
            # The boot already recorded (a lost WELCOME, an expired cookie, a
            # forged BAD_COOKIE): its own allowance, nothing to claim or log.
            bucket = self.rehellos.get(nat)
            if bucket is None:
                bucket = self.rehellos[nat] = Bucket(REHELLO_RATE, now)
            if not bucket.take(now):
                return self._refuse("hello_rate", wire.ErrorCode.RATE_LIMITED, size)
            value = self._current(nat, self.epoch(wall))[1]
        else:
            admitted = self.hello_budget.admit(now)
            if not admitted:
                if admitted is None:
                    return Refused("hello_rate", None)
                return self._refuse("hello_rate", wire.ErrorCode.RATE_LIMITED, size)
            if boot is None and len(self.boots) >= self.max_nats:
                return self._refuse("too_many_nats", wire.ErrorCode.NOT_ALLOWED, size)
            value = self._claim(nat, hello.boot_id, self.epoch(wall))
        return Welcomed(
            wire.encode(wire.Welcome(self.first_port, self.last_port, value, hello.boot_id))
        )

    def allowed(self, nat: int) -> bool:
        if not self.allow:
            return True
        return any(nat & mask == net for net, mask in self.allow)

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
    def open(
        self, nat: int, value: bytes, size: int, wall: int, boot_id: bytes | None = None
    ) -> Opened | Refused:
        """Check the COOKIE opening a datagram of ``size`` octets from
        ``nat``; ``boot_id``: that of the HELLO right after it (§4.5)."""
        epoch = self.epoch(wall)
        boot = self.boots.get(nat)
        if boot is not None and (boot_id is None or boot_id == boot):
            cached = self._cookies.get(nat)
            if cached is None or cached[0] != epoch:
                cached = self._current(nat, epoch)
            if hmac.compare_digest(cached[1], value) or hmac.compare_digest(cached[2], value):
                return OPENED
        elif boot_id is not None:
            # The HELLO names the boot: its cookie is computed, not looked up
            # among claims a forger may have pushed out.
            secret = self.secret
            if hmac.compare_digest(cookie(secret, nat, boot_id, epoch), value) or (
                hmac.compare_digest(cookie(secret, nat, boot_id, epoch - 1), value)
            ):
                return self._confirmable(nat, boot_id, size)
        if boot_id is not None:
            return self._refuse("bad_cookie", wire.ErrorCode.BAD_COOKIE, size, wire.Kind.COOKIE)
        claims = self.claims.get(nat)
        if claims:
            # A claim's cookie is the one its WELCOME carried, for the epoch
            # of its HELLO; it is valid while that epoch is current or last.
            for c in reversed(claims):
                if epoch - 1 <= c.epoch <= epoch and hmac.compare_digest(c.cookie, value):
                    return self._confirmable(nat, c.boot_id, size)
        return self._refuse("bad_cookie", wire.ErrorCode.BAD_COOKIE, size, wire.Kind.COOKIE)

    def _confirmable(self, nat: int, boot_id: bytes, size: int) -> Opened | Refused:
        old = self.boots.get(nat)
        if old is None and len(self.boots) >= self.max_nats:
            return self._refuse("too_many_nats", wire.ErrorCode.NOT_ALLOWED, size, wire.Kind.COOKIE)
        return Opened(Confirmation(nat, boot_id, initialized=old != boot_id, new_nat=old is None))

    def confirm(self, c: Confirmation) -> Confirmation | None:
        """Make a confirmation from :meth:`open` take effect: ``boot_id`` is
        recorded and the previous boot's cookie retires. Returns what to
        record, or None where that boot is recorded already."""
        nat, boot_id = c.nat, c.boot_id
        old = self.boots.get(nat)
        claims = self.claims.get(nat)
        if claims is not None:
            claims[:] = [k for k in claims if k.boot_id != boot_id]
            if not claims:
                del self.claims[nat]
        if old == boot_id:
            return None
        self.boots[nat] = boot_id
        self._cookies.pop(nat, None)
        return Confirmation(nat, boot_id, initialized=True, new_nat=old is None)

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
    """One confirmed NAT64's share of the server (docs/protocol.md §7): its
    rate of requests, counted as work (a TOUCH of n ports costs n), and its
    bounds on work waiting for reads and commits. The server keeps the
    counts; this says yes or no."""

    __slots__ = ("requests", "errors", "queued", "waiting", "backlog")

    def __init__(self, request_rate: float, now: int):
        self.requests = Bucket(request_rate, now)
        #: ERROR RATE_LIMITED answers are themselves bounded: beyond this the
        #: refused datagram is dropped without an answer.
        self.errors = Bucket(max(request_rate / 10, 10.0) if request_rate > 0 else 0.0, now)
        self.queued = 0  #: datagrams waiting for database reads
        self.waiting = 0  #: datagrams whose answers wait for a commit
        self.backlog = 0  #: rows of this NAT64 waiting to be committed
