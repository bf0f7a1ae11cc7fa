"""The event log file (docs/protocol.md §6), with its catch-up from the history
when it could not be written."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from nat64ho.core.records import Event, EventKind
from nat64ho.eventlog import format_event
from nat64ho.storage.base import Storage

log = logging.getLogger("nat64ho")


class LogFile:
    """The event log (docs/protocol.md §6). Lines reach the OS before the answers
    they describe are sent; SIGHUP reopens the file for logrotate.

    When a write fails (disk full) the file is cut back to its last whole
    line and later lines are not written directly: every CATCH_UP_RETRY a
    task copies them from the history (the event table, in id order) until
    the file has caught up, so it ends equal to ``nat64ho export``.
    """

    #: Seconds between tries to write a failing log file again.
    CATCH_UP_RETRY = 1.0
    #: History rows read per catch-up step.
    CATCH_UP_ROWS = 2000
    #: Seconds between tries to reopen the log file after a SIGHUP's reopen
    #: failed (descriptors ran out, the directory went): one open() each.
    REOPEN_RETRY = 1.0

    def __init__(
        self,
        path: str,
        store: Storage | None = None,
        owns: Callable[[int], bool] | None = None,
    ):
        self.path = path
        self._fd = -1
        self._good = 0  # size of the file after the last whole write
        #: Lines committed to the database but not yet in the file.
        self.waiting = 0
        self.store = store  #: where catch-up reads the history
        #: Whether this process wrote the events of a NAT64 (with workers,
        #: each catches up its own lines of the shared file); None: all.
        self.owns = owns
        self._behind: tuple[object, ...] | None = (
            None  # key of the first missing event, while behind
        )
        self._after = -1  # id of the last event copied by the catch-up (-1: not known yet)
        self._last: tuple[object, ...] | None = None  # key of the last event committed while behind
        self._task: asyncio.Task[None] | None = None
        self._retry: asyncio.TimerHandle | None = None  # the next try to reopen, while failing
        self._reopen_failed = False  # said once until a reopen works
        self.open()

    def open(self) -> None:
        if self.path == "-":
            return
        Path(self.path).parent.mkdir(mode=0o750, parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        self._good = os.fstat(self._fd).st_size

    def reopen(self) -> None:
        """Open the file at ``path`` again (SIGHUP, after logrotate moved
        it). When that fails, lines keep going to the file open until then,
        with one line said, and it is tried again every REOPEN_RETRY s (and
        at each SIGHUP) until it works."""
        if self.path == "-":
            return
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        old = self._fd
        try:
            self.open()
        except OSError as exc:
            if self._fd != old:  # opened, then failed (fstat): not half switched
                os.close(self._fd)
                self._fd = old
            if not self._reopen_failed:
                self._reopen_failed = True
                log.error(
                    "cannot reopen log file %s: %s; still writing to the file open "
                    "before, and trying again every %g s",
                    self.path,
                    exc,
                    self.REOPEN_RETRY,
                )
            self._retry = asyncio.get_running_loop().call_later(self.REOPEN_RETRY, self.reopen)
            return
        self._reopen_failed = False
        os.close(old)
        log.info("reopened log file %s", self.path)

    def _emit(self, data: str) -> None:
        if self.path == "-":
            sys.stdout.write(data)
            sys.stdout.flush()
            return
        raw = data.encode("ascii")
        view = memoryview(raw)
        try:
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError:
            # A part of a line must not stay: the catch-up rewrites it whole.
            try:
                os.ftruncate(self._fd, self._good)
            except OSError:
                pass
            raise
        self._good += len(raw)

    def write(self, events: list[Event]) -> None:
        """Write the lines of ``events``, just committed."""
        if self._behind is not None:
            # Catching up: the order comes from the history, not from here.
            self.waiting += len(events)
            self._last = _event_key(events[-1])
            return
        try:
            self._emit("".join([format_event(e) + "\n" for e in events]))
        except OSError as exc:
            self.waiting += len(events)
            self._behind = _event_key(events[0])
            self._after = -1
            self._last = _event_key(events[-1])
            log.error(
                "cannot write log file %s: %s; its lines wait in the database and are "
                "copied in order once it can be written",
                self.path,
                exc,
            )
            if self.store is not None and self._task is None:
                self._task = asyncio.ensure_future(self._catch_up())

    async def _catch_up(self) -> None:
        store = self.store
        assert store is not None  # catch-up starts only once the server set it
        copied = 0
        told = False
        while True:
            await asyncio.sleep(self.CATCH_UP_RETRY)
            try:
                if self._after < 0:
                    if self._behind is None:
                        continue  # caught up meanwhile
                    first = await store.event_id(self._behind)
                    if first is None:
                        continue  # not found yet: ask again next time
                    self._after = first - 1
                while True:
                    rows = await store.read_events(self._after, self.CATCH_UP_ROWS)
                    lines = []
                    done = False
                    last_id = self._after
                    for row in rows:
                        last_id = row[0]
                        if self.owns is None or self.owns(row[3]):
                            lines.append(
                                format_event(Event(row[1], EventKind(row[2]), *row[3:])) + "\n"
                            )
                        if _event_key(row[1:]) == self._last:
                            done = True  # later rows come with their own commit
                            break
                    self._emit("".join(lines))
                    copied += len(lines)
                    self.waiting = max(0, self.waiting - len(lines))
                    self._after = last_id
                    if done or not rows:
                        break
            except OSError:
                continue  # still failing: the error was said once
            except Exception as exc:
                # A row that does not decode, or the database's error.
                if store.classify(exc) is None and not isinstance(exc, ValueError | TypeError):
                    raise
                if not told:
                    log.error("cannot read the history to catch up log file %s: %s", self.path, exc)
                    told = True
                continue
            # No await since the last row: nothing committed in between.
            self._behind = self._last = None
            self.waiting = 0
            self._task = None
            log.warning(
                "log file %s written again: %d lines caught up from the database", self.path, copied
            )
            return

    def close(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
        if self._task is not None:
            self._task.cancel()
            log.error(
                "log file %s stops %d lines short (they are in the database: "
                "'nat64ho export' has them)",
                self.path,
                self.waiting,
            )
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _event_key(e: Sequence[Any]) -> tuple[object, ...]:
    """What identifies an event in the history (its unique index)."""
    return (e[0], int(e[1]), e[2], e[3])
