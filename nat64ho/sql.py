"""Statements that both the server's store and the operator commands run,
written once so that the two can never disagree on what a row is."""

INSERT_EVENT = (
    "INSERT OR IGNORE INTO event (ts, kind, nat, port, addr, aport) VALUES (?, ?, ?, ?, ?, ?)"
)

UPSERT_ENTRY = (
    "INSERT INTO entry (nat, port, addr, aport, created, last_use) VALUES (?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (nat, port) DO UPDATE SET addr = excluded.addr, aport = excluded.aport, "
    "created = excluded.created, last_use = excluded.last_use"
)

#: Deletes up to PRUNE_BATCH events older than a time, oldest first; args
#: (before µs, batch size). Run until it deletes fewer than a batch.
PRUNE_EVENTS = (
    "DELETE FROM event WHERE id IN (SELECT id FROM event WHERE ts < ? ORDER BY ts LIMIT ?)"
)

#: Events per prune transaction: a writer sharing the database (the server's
#: commits) waits for one batch at most.
PRUNE_BATCH = 20_000


def numbered(sql: str) -> str:
    """``sql`` with SQLite's ``?`` placeholders as PostgreSQL's ``$1, $2, …``
    (the statements here hold no ``?`` inside a string)."""
    parts = sql.split("?")
    return parts[0] + "".join(f"${i}{part}" for i, part in enumerate(parts[1:], 1))
