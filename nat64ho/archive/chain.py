"""The hash chain over segments: each link commits to the one before it, the
segment's SHA-256, its period and its counts, so that changing, dropping or
reordering any sealed history changes every later link."""

from __future__ import annotations

import hashlib
import struct

#: The link before the first segment.
GENESIS = bytes(32)


def link(
    previous: bytes,
    sha256: bytes,
    period: tuple[int, int, int, int],
    counts: tuple[int, int, int, int],
) -> bytes:
    """chain_n = SHA-256(chain_{n-1} ‖ digest_n ‖ period ‖ counts). ``period``:
    (first id, last id, first ts, last ts); ``counts``: (events, Initialized,
    Created, Deleted); each a big-endian signed 64-bit integer."""
    return hashlib.sha256(previous + sha256 + struct.pack(">8q", *period, *counts)).digest()
