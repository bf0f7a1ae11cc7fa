-- The sealed tier of the history: one row per segment, an immutable Parquet
-- file of the hot events that had ts < cut_ts and id <= cut_id when it was
-- sealed. Those are deleted from table event after its row is committed, in
-- small transactions while pending is 1; readers skip them meanwhile.
-- n counts from 1 without gaps; chain = SHA-256(chain of n-1 || sha256 ||
-- period || counts) (nat64ho/archive/chain.py). A pruned segment keeps its
-- row (pruned set, file gone), so the chain still verifies after retention.
CREATE TABLE segment (
    n           INTEGER PRIMARY KEY,
    file        TEXT    NOT NULL,
    first_id    INTEGER NOT NULL,
    last_id     INTEGER NOT NULL,
    ts_lo       INTEGER NOT NULL,
    ts_hi       INTEGER NOT NULL,
    events      INTEGER NOT NULL,
    initialized INTEGER NOT NULL,
    created     INTEGER NOT NULL,
    deleted     INTEGER NOT NULL,
    bytes       INTEGER NOT NULL,
    sha256      BLOB    NOT NULL,
    chain       BLOB    NOT NULL,
    sealed      INTEGER NOT NULL,
    pruned      INTEGER,
    cut_ts      INTEGER NOT NULL,
    cut_id      INTEGER NOT NULL,
    pending     INTEGER NOT NULL DEFAULT 1
);

-- Sealing empties the top of the id range when the hot tier has nothing
-- newer; without AUTOINCREMENT the next event would take a sealed event's
-- id again, and ids are the log order export and --follow --after rely on.
CREATE TABLE event_next (
    id    INTEGER PRIMARY KEY AUTOINCREMENT,
    ts    INTEGER NOT NULL,
    kind  INTEGER NOT NULL CHECK (kind IN (0, 1, 2)),
    nat   INTEGER NOT NULL,
    port  INTEGER NOT NULL,
    addr  BLOB,
    aport INTEGER
);
INSERT INTO event_next (id, ts, kind, nat, port, addr, aport)
    SELECT id, ts, kind, nat, port, addr, aport FROM event ORDER BY id;
DROP TABLE event;
ALTER TABLE event_next RENAME TO event;
CREATE UNIQUE INDEX event_nat_port_ts ON event (nat, port, ts, kind);
CREATE INDEX event_addr_ts ON event (addr, aport, ts) WHERE addr IS NOT NULL;
CREATE INDEX event_ts ON event (ts);
