"""The clocks a running server reads; tests pass their own to the server."""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    """What the server reads the time from."""

    def now(self) -> int:
        """The table clock, µs: never goes back."""

    def wall(self) -> int:
        """UTC, µs."""

    def monotonic(self) -> float:
        """Seconds, for intervals."""


def wall_us() -> int:
    # Rounded, not truncated: a clock that computes ns from a float (as
    # freezegun does) is otherwise one µs early.
    return (time.time_ns() + 500) // 1000


class SystemClock:
    """The table clock, in µs: monotonic, and never behind any last use
    already saved, so recency stays ordered across wall-clock steps and
    restarts; close to UTC so stored times read naturally."""

    def __init__(self, floor: int = 0):
        self._base = max(wall_us(), floor + 1)
        self._mono = time.monotonic_ns()

    def now(self) -> int:
        return self._base + (time.monotonic_ns() - self._mono) // 1000

    def wall(self) -> int:
        """UTC, in µs: event times and cookie epochs."""
        return wall_us()

    def monotonic(self) -> float:
        """Seconds, for rate-limiting the server's own log messages."""
        return time.monotonic()
