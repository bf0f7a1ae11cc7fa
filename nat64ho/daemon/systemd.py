"""Speaking to systemd (Type=notify): readiness, status, and the watchdog's
keep-alives, which stop when commits stop returning."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable

from nat64ho.storage.base import Storage

log = logging.getLogger("nat64ho")

#: The least time a commit may go unanswered before the server stops
#: sending systemd's WATCHDOG=1 (see :func:`stall_bound`).
MIN_COMMIT_STALL = 1.0


def notify(message: str) -> None:
    """Tell systemd (Type=notify) about our state; a no-op outside systemd."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(path)
            s.sendall(message.encode())
    except OSError as exc:
        log.warning("cannot notify systemd: %s", exc)


def stall_bound(watchdog_usec: int) -> float:
    """How long a commit may go unanswered before the keep-alives stop: half
    the watchdog's timeout (15 s with WatchdogSec=30s in
    contrib/nat64ho.service), far above any commit's time (a group fsynced
    on a slow disk, a WAL checkpoint: seconds). systemd then restarts a
    server whose writer hangs within 1.5 WatchdogSec. A commit that fails
    (disk full) returns, and is retried: not a stall."""
    return max(watchdog_usec / 2e6, MIN_COMMIT_STALL)


class Heartbeat:
    """Whether this server's commits still return: what the watchdog hears
    (:func:`watchdog`, and with workers the parent, by :meth:`beat`)."""

    def __init__(self, store: Storage, where: str, bound: float):
        self.store = store
        self.where = where
        self.bound = bound
        self.stalled = False

    def alive(self) -> bool:
        """False while a commit has run longer than ``bound``; says so once
        when it starts and once when it ends."""
        running = self.store.commit_running_for()
        if running > self.bound:
            if not self.stalled:
                self.stalled = True
                log.error(
                    "a commit to %s has not returned for %.0f s (writer process stopped, "
                    "or the disk hung): no more watchdog keep-alives, so that systemd "
                    "restarts the server",
                    self.where,
                    running,
                )
            return False
        if self.stalled:
            self.stalled = False
            log.warning("commits to %s return again: watchdog keep-alives resume", self.where)
        return True


async def watchdog(interval: float, heart: Heartbeat, keep_alive: Callable[[bool], None]) -> None:
    # From the event loop, so a hung loop stops the keep-alives too.
    while True:
        keep_alive(heart.alive())
        await asyncio.sleep(interval)


def keep_alive(alive: bool) -> None:
    if alive:
        notify("WATCHDOG=1")
