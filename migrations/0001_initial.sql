-- Schema v1: the authoritative per-NAT64 tables and the append-only history.
-- Times are integer microseconds since the Unix epoch, UTC. IPv4 addresses
-- are unsigned 32-bit integers; IPv6 addresses are 16-octet blobs.

-- Server-wide values: 'secret' (cookie HMAC key, created once) and
-- 'clock_hwm' (highest last_use ever written, so recency stays monotonic
-- across restarts even if the wall clock steps back).
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value BLOB NOT NULL
) WITHOUT ROWID;

-- One row per NAT64 that ever said HELLO.
CREATE TABLE nat (
    nat         INTEGER PRIMARY KEY,
    boot_id     BLOB NOT NULL,
    first_hello INTEGER NOT NULL,
    last_hello  INTEGER NOT NULL
);

-- The current table: one row per occupied (NAT64, NAT port).
CREATE TABLE entry (
    nat      INTEGER NOT NULL,
    port     INTEGER NOT NULL,
    addr     BLOB    NOT NULL,
    aport    INTEGER NOT NULL,
    created  INTEGER NOT NULL,
    last_use INTEGER NOT NULL,
    PRIMARY KEY (nat, port)
) WITHOUT ROWID;
-- MAP looks an endpoint up; an endpoint holds at most one port per NAT64.
CREATE UNIQUE INDEX entry_endpoint ON entry (nat, addr, aport);
-- The LRU victim of a full table is the first row of this index for its NAT64.
CREATE INDEX entry_lru ON entry (nat, last_use, port);

-- History: append-only. kind 0 = Initialized (port 0, addr NULL),
-- 1 = Created, 2 = Deleted. id order is the order the server logged them.
CREATE TABLE event (
    id    INTEGER PRIMARY KEY,
    ts    INTEGER NOT NULL,
    kind  INTEGER NOT NULL CHECK (kind IN (0, 1, 2)),
    nat   INTEGER NOT NULL,
    port  INTEGER NOT NULL,
    addr  BLOB,
    aport INTEGER
);
-- "who held NAT:port at T" walks this index backwards from T; it also makes
-- importing the same log twice add nothing.
CREATE UNIQUE INDEX event_nat_port_ts ON event (nat, port, ts, kind);
-- "which NAT ports did this IPv6 endpoint or prefix hold".
CREATE INDEX event_addr_ts ON event (addr, aport, ts) WHERE addr IS NOT NULL;
-- export --since/--until and prune --before.
CREATE INDEX event_ts ON event (ts);
