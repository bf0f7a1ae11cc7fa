-- The sealed tier on PostgreSQL: migrations/0002_archive.sql's segment
-- table, and each segment's Parquet octets in segment_data, so that a
-- standby that replicates the database has the whole history. One
-- transaction records a segment's row (pending) and its data; its events
-- then leave table event in small transactions. A pruned segment keeps its
-- row (pruned set) and loses its data, so the chain still verifies.
CREATE TABLE segment (
    n           bigint   PRIMARY KEY,
    file        text     NOT NULL,
    first_id    bigint   NOT NULL,
    last_id     bigint   NOT NULL,
    ts_lo       bigint   NOT NULL,
    ts_hi       bigint   NOT NULL,
    events      bigint   NOT NULL,
    initialized bigint   NOT NULL,
    created     bigint   NOT NULL,
    deleted     bigint   NOT NULL,
    bytes       bigint   NOT NULL,
    sha256      bytea    NOT NULL,
    chain       bytea    NOT NULL,
    sealed      bigint   NOT NULL,
    pruned      bigint,
    cut_ts      bigint   NOT NULL,
    cut_id      bigint   NOT NULL,
    pending     smallint NOT NULL DEFAULT 1
);

CREATE TABLE segment_data (
    n    bigint PRIMARY KEY,
    data bytea  NOT NULL
);
-- zstd already: compressing it again in TOAST would only cost CPU.
ALTER TABLE segment_data ALTER COLUMN data SET STORAGE EXTERNAL;
