-- The global feed's day index, so that a page of readAll reads a few partitions or chunks.
--
-- readAll pages through events_v2 in (txid, position) order. The table is partitioned by event
-- time, which says nothing about transaction ids, so without help every page opens an index scan
-- on every partition or chunk (hundreds after a year). events_v2_feed_days records, for each
-- bucket of 65,536 transaction ids, the UTC days its events were written into. A reader looks up
-- the days of the buckets after its checkpoint and reads only those partitions or chunks.
--
-- Every write path of the repository (append, appendBatch, the legacy migration) adds its rows in
-- the same statement as the events, so they commit together. An insert into events_v2 that does
-- not (plain SQL, a bulk load) makes the statement trigger record its bucket with the day
-- 'infinity', which means "any day": readers then scan every partition for that bucket, slower
-- but never missing an event.
-- Not unique: writers add a row only when they see none, so that no writer ever waits for
-- another's uncommitted row (as INSERT ... ON CONFLICT would); two that race both add one.
CREATE TABLE IF NOT EXISTS events_v2_feed_days (
    bucket bigint NOT NULL,
    day    date   NOT NULL
);
CREATE INDEX IF NOT EXISTS events_v2_feed_days_idx ON events_v2_feed_days (bucket, day);

-- The bucket of a transaction id (an xid8: epoch and xid, far below 2^63).
CREATE OR REPLACE FUNCTION synap_feed_bucket(p_txid xid8)
RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT $1::text::bigint >> 16
$$;

-- Events already stored.
INSERT INTO events_v2_feed_days (bucket, day)
SELECT DISTINCT synap_feed_bucket(txid), ("timestamp" AT TIME ZONE 'UTC')::date FROM events_v2;

-- The repository's statements set synap.feed_days to their transaction id after recording their
-- days; any other inserting statement records its bucket as "any day". The setting is cleared
-- here, so it covers exactly one statement.
CREATE OR REPLACE FUNCTION synap_notify_events() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    IF coalesce(current_setting('synap.feed_days', true), '') <> pg_current_xact_id()::text THEN
        INSERT INTO events_v2_feed_days (bucket, day)
        SELECT synap_feed_bucket(pg_current_xact_id()), 'infinity'
         WHERE NOT EXISTS (SELECT 1 FROM events_v2_feed_days
                            WHERE bucket = synap_feed_bucket(pg_current_xact_id()) AND day = 'infinity');
    END IF;
    PERFORM set_config('synap.feed_days', '', true);
    PERFORM pg_notify('synap_events', '');
    RETURN NULL;
END
$$;

-- Checkpoints stored before this migration come from pages that were sorted by the text of the
-- transaction id, which skipped events whenever ids crossed a power of ten ('1000' before
-- '999'). Such a consumer may have passed over events for good: it must be repaired (its events
-- delivered again) or its checkpoint accepted as it is before it reads on; see
-- EventRepository::repair_consumer. Below 10 no id had crossed one yet.
ALTER TABLE event_consumers ADD COLUMN IF NOT EXISTS needs_repair boolean NOT NULL DEFAULT false;
UPDATE event_consumers SET needs_repair = true WHERE txid >= '10'::xid8;
