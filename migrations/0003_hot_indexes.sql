-- The hot tier holds at most the open period and the one just closed (the
-- rest is sealed into segments), so a question by client address scans it
-- rather than paying a random-order index on every event written and on
-- every event a seal deletes. DROP INDEX only frees pages: quick on a big
-- table. Kept: event_nat_port_ts (who by NAT port; an event logged twice is
-- stored once) and event_ts (export --since, sealing, prune, the server's
-- start), both written in time order at the end of their trees.
DROP INDEX event_addr_ts;
