-- The global feed's day index, so that a page of readAll reads a few partitions or chunks.
--
-- readAll pages through events_v2 in (txid, position) order. The table is partitioned by event
-- time, which says nothing about transaction ids, so without help every page opens an index scan
-- on every partition or chunk (hundreds after a year). events_v2_feed_days records which UTC days
-- the events of which transaction ids were written into; a reader looks up the days after its
-- checkpoint and reads only those partitions or chunks.
--
-- Two kinds of rows:
--   * (bucket, day, NULL): some transaction of the bucket (65,536 ids) wrote into this day. Live
--     writes, whose events fall within a day of now, record these: one row per day and bucket.
--   * (bucket, day, txid): this transaction wrote into this day. Writes into other days (backfills,
--     the legacy migration, backdated appends) record these, so that a reader can tell the days
--     of a backfill's transactions apart instead of reading all of them for every page.
-- Every write path of the repository (append, appendBatch, the legacy migration) adds its rows in
-- the same statement as the events, so they commit together. An insert into events_v2 that does
-- not (plain SQL, a bulk load) makes the statement trigger record its bucket with the day
-- 'infinity', which means "any day": readers then read every partition for that bucket, slower
-- but never missing an event.
-- Not unique: writers add a row only when they see none, so that no writer ever waits for
-- another's uncommitted row (as INSERT ... ON CONFLICT would); two that race both add one.
CREATE TABLE IF NOT EXISTS events_v2_feed_days (
    bucket bigint NOT NULL,
    day    date   NOT NULL,
    txid   xid8
);
CREATE INDEX IF NOT EXISTS events_v2_feed_days_idx ON events_v2_feed_days (bucket, txid NULLS FIRST, day);

-- The bucket of a transaction id (an xid8: epoch and xid, far below 2^63).
CREATE OR REPLACE FUNCTION synap_feed_bucket(p_txid xid8)
RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT $1::text::bigint >> 16
$$;

-- Events already stored: by bucket where a bucket's events lie on a few days, by transaction
-- where they are spread out.
WITH days AS (
    SELECT DISTINCT synap_feed_bucket(txid) AS bucket, txid, ("timestamp" AT TIME ZONE 'UTC')::date AS day
      FROM events_v2
), spread AS (
    SELECT bucket, count(DISTINCT day) > 3 AS by_txid FROM days GROUP BY bucket
)
INSERT INTO events_v2_feed_days (bucket, day, txid)
SELECT DISTINCT d.bucket, d.day, CASE WHEN s.by_txid THEN d.txid END
  FROM days d JOIN spread s USING (bucket);

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
                            WHERE bucket = synap_feed_bucket(pg_current_xact_id()) AND txid IS NULL
                              AND day = 'infinity');
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
