-- The sealed tier of the history: one row per segment, an immutable Parquet
-- file of the events with ids first_id..last_id, removed from table event
-- in the transaction that inserted its row. n counts from 1 without gaps;
-- chain = SHA-256(chain of n-1 || sha256 || period || counts) (nat64ho/archive/chain.py).
-- A pruned segment keeps its row (pruned set, file gone), so the chain
-- still verifies after retention.
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
    pruned      INTEGER
);
