-- As migrations/0003_hot_indexes.sql: the hot tier is at most two periods
-- of events, so a question by client address scans it rather than every
-- write and every seal paying a random-order index. Dropping an index is
-- quick whatever the table's size.
DROP INDEX event_addr_ts;
