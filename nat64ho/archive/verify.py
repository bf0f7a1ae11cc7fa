"""Verifying the sealed tier: every live file against its SHA-256, the chain
from the first segment to the head, and no event of a sealed period left
or added in the hot tier."""

from __future__ import annotations

from dataclasses import dataclass, field

from nat64ho.archive import catalog, chain, segment
from nat64ho.eventlog import ts_str
from nat64ho.ops.db import Conn


@dataclass
class Verdict:
    problems: list[str] = field(default_factory=list)
    facts: dict[str, str] = field(default_factory=dict)
    head: bytes = chain.GENESIS


def verify(conn: Conn, head: bytes | None = None) -> Verdict:
    """Check every segment of ``conn``'s database. ``head``: a chain value
    published earlier, which must be one of the chain's links. A hot event
    as old as sealed ones counts as added to a sealed period: a seal takes
    every event before its period's end."""
    out = Verdict()
    segs = catalog.segments(conn)
    digests = _digests(conn) if catalog.in_database(conn) else None
    directory = None if digests is not None else catalog.archive_dir(conn)
    links = {}
    previous = chain.GENESIS
    broken = False
    for i, s in enumerate(segs, start=1):
        name = f"segment {s.n} ({s.file})"
        if s.n != i:
            out.problems.append(f"segment {i} is missing from the segment table (next is {s.n})")
            broken = True
        link = s.link(previous)
        if link != s.chain:
            out.problems.append(
                f"{name}: its chain value does not follow from the segment before it "
                "(the segment table was changed, or segments were removed or reordered)"
            )
            broken = True
        previous = s.chain
        if not broken:
            links[s.chain] = s.n
        if s.pruned is not None:
            continue
        if digests is not None:
            digest = digests.get(s.n)
            if digest is None:
                out.problems.append(f"{name}: its data is missing from table segment_data")
                continue
        else:
            assert directory is not None
            try:
                digest = segment.file_digest(directory / s.file)
            except FileNotFoundError:
                out.problems.append(f"{name}: the file is missing from {directory}")
                continue
            except OSError as exc:
                out.problems.append(f"{name}: cannot be read ({exc.strerror or exc})")
                continue
        if digest != s.sha256:
            out.problems.append(
                f"{name}: its SHA-256 differs from the recorded one (the "
                f"{'data' if digests is not None else 'file'} was changed or replaced)"
            )
    live = [s for s in segs if s.pruned is None]
    if live:
        last = max(s.ts_hi for s in live)
        # Not the events a pending segment is still deleting from the hot tier.
        cuts = catalog.pending(conn)
        args: list[int] = [last]
        skip = f" AND NOT ({catalog.pending_held(args, cuts)})" if cuts else ""
        for eid, ts in conn.execute(
            f"SELECT id, ts FROM {conn.sql.event_by_ts} WHERE ts <= $1{skip} ORDER BY ts LIMIT 5",
            args,
        ).fetchall():
            s = next((s for s in live if s.ts_lo <= ts <= s.ts_hi), live[-1])
            out.problems.append(
                f"segment {s.n} ({s.file}): an event of its sealed period is in the hot tier "
                f"(id {eid} at {ts_str(ts)})"
            )
    out.head = previous
    if head is not None:
        n = links.get(head)
        if n is None:
            out.problems.append(
                f"chain head {head.hex()} is not a link of this archive's chain: the sealed "
                "history up to it has changed (or it is another database's)"
            )
        else:
            out.facts["unchanged up to segment"] = str(n)
    if not segs and head is None:
        return out  # nothing sealed: nothing to add to check's line
    pruned = sum(s.pruned is not None for s in segs)
    out.facts["segments"] = f"{len(segs)}" + (f" ({pruned} pruned)" if pruned else "")
    out.facts["sealed events"] = str(sum(s.events for s in live))
    out.facts["chain head"] = previous.hex()
    return out


def _digests(conn: Conn) -> dict[int, bytes]:
    """n -> SHA-256 of each segment's octets kept in the database, computed
    there (PostgreSQL's sha256), so that a check reads no segment."""
    return {int(n): bytes(d) for n, d in conn.execute("SELECT n, sha256(data) FROM segment_data")}
