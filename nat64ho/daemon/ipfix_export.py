"""The sending side of ``serve --ipfix``: one UDP socket per collector, fed
the messages :mod:`nat64ho.ipfix` encodes from each commit's events.

Best effort by nature: a send never blocks and never raises into the server.
A full socket buffer, an ICMP error reported on the socket (a collector not
listening) or anything else the kernel refuses is counted per collector and
logged once until a send succeeds again; the history stays the record.
"""

from __future__ import annotations

import errno
import logging
import socket
import time
from collections.abc import Callable, Iterable

from nat64ho import ipfix
from nat64ho.eventlog import Event

log = logging.getLogger("nat64ho")

#: Send buffer asked for: a commit of a full table's churn (tens of
#: thousands of events) leaves as a burst of datagrams at once.
SNDBUF = 4 * 1024 * 1024

#: errno -> the reason label of a failed send.
_REASONS = {
    errno.EAGAIN: "buffer_full",
    errno.ENOBUFS: "buffer_full",
    errno.ECONNREFUSED: "refused",
    errno.EHOSTUNREACH: "unreachable",
    errno.ENETUNREACH: "unreachable",
}


class Collector:
    """One ``--ipfix HOST:PORT``: its socket and what was sent to it."""

    def __init__(self, host: str, port: int):
        self.host = host
        self.port = port
        self.name = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.messages = 0
        self.records = 0
        #: Failed sends by reason (see _REASONS; "other" for the rest).
        self.failures: dict[str, int] = {}
        self._sock: socket.socket | None = None
        self._connected = False
        self._failing = False

    def open(self) -> None:
        sock = socket.socket(
            socket.AF_INET6 if ":" in self.host else socket.AF_INET, socket.SOCK_DGRAM
        )
        sock.setblocking(False)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SNDBUF)
        except OSError:
            pass
        self._sock = sock

    def send(self, message: ipfix.Message) -> None:
        sock = self._sock
        if sock is None:
            raise RuntimeError(f"IPFIX collector {self.name}: send before open()")
        try:
            if not self._connected:
                # Connected, so that the kernel reports ICMP errors (nobody
                # listening) on the socket; tried again on each send while
                # there is no route.
                sock.connect((self.host, self.port))
                self._connected = True
            sock.send(message.octets)
        except OSError as exc:
            self._failed(exc)
            return
        self.messages += 1
        self.records += message.records
        if self._failing:
            self._failing = False
            log.info("IPFIX collector %s: sending again", self.name)

    def _failed(self, exc: OSError) -> None:
        reason = _REASONS.get(exc.errno or 0, "other")
        self.failures[reason] = self.failures.get(reason, 0) + 1
        if not self._failing:
            self._failing = True
            log.warning(
                "IPFIX collector %s: send failed: %s (counted until sends succeed "
                "again; the history keeps every event)",
                self.name,
                exc.strerror or exc,
            )

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class Exporter:
    """Every collector, the one encoder they share, and the clock."""

    def __init__(
        self,
        collectors: list[tuple[str, int]],
        domain: int = 0,
        clock: Callable[[], float] = time.time,
    ):
        self.encoder = ipfix.Encoder(domain)
        self.collectors = [Collector(host, port) for host, port in collectors]
        self.clock = clock
        #: Commits whose export raised (a bug): their events were not sent.
        self.errors = 0

    def start(self) -> None:
        """Open the sockets and send the template (RFC 7011 §8.4: at start).
        Raises OSError when a socket cannot be made."""
        try:
            for c in self.collectors:
                c.open()
        except OSError:
            self.close()
            raise
        self._send([self.encoder.template(self.clock())])

    def export(self, events: Iterable[Event]) -> None:
        """Send the Created and Deleted ``events`` to every collector. Never
        raises: the commit that calls this has already happened."""
        try:
            self._send(self.encoder.encode(events, self.clock()))
        except Exception:
            self.errors += 1
            if self.errors == 1:
                log.exception(
                    "bug: IPFIX export failed (counted as nat64ho_ipfix_errors_total from now on)"
                )

    def _send(self, messages: list[ipfix.Message]) -> None:
        for c in self.collectors:
            for m in messages:
                c.send(m)

    def close(self) -> None:
        for c in self.collectors:
            c.close()
