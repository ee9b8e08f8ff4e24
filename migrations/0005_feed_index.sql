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
-- the same statement as the events, so they commit together. Any other insert into events_v2
-- (plain SQL, a bulk load) is recorded row by row by a trigger, in its transaction too: slower
-- for those writers, but no event is ever missing from the feed.
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

-- Records the day of one row inserted by a statement other than the repository's, with the same
-- rules as the repository's statements (sql.rs, feed_days_ctes).
CREATE OR REPLACE FUNCTION synap_feed_record_row() RETURNS trigger
LANGUAGE plpgsql
AS $$
DECLARE
    b bigint := synap_feed_bucket(pg_current_xact_id());
    d date := (NEW."timestamp" AT TIME ZONE 'UTC')::date;
    t xid8 := CASE WHEN abs(d - (now() AT TIME ZONE 'UTC')::date) > 1 THEN pg_current_xact_id() END;
BEGIN
    INSERT INTO events_v2_feed_days (bucket, day, txid)
    SELECT b, d, t
     WHERE NOT EXISTS (SELECT 1 FROM events_v2_feed_days f
                        WHERE f.bucket = b AND f.day = d AND (f.txid = t OR (t IS NULL AND f.txid IS NULL)));
    RETURN NULL;
END
$$;

-- The repository's statements set synap.feed_days to their transaction id before their first
-- row goes in, having recorded their days themselves, so the row trigger's WHEN is false for
-- their rows and costs them nothing more. The statement trigger clears the setting, so that it
-- covers exactly one statement.
CREATE TRIGGER events_v2_feed_record
    AFTER INSERT ON events_v2
    FOR EACH ROW
    WHEN (coalesce(current_setting('synap.feed_days', true), '') <> pg_current_xact_id()::text)
    EXECUTE FUNCTION synap_feed_record_row();

CREATE OR REPLACE FUNCTION synap_notify_events() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
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
