-- Correctness fixes found by review and by running the store against real workloads.

-- 1. Event ids are unique. Neither a hypertable nor a partitioned table takes a unique index
--    without the time column, so ids are registered here, in the same statement as the event:
--    a second event with a stored id fails the statement, and nothing is written. The registry
--    also tells a retried append or batch (same id, same aggregate and version) from a clash.
CREATE TABLE IF NOT EXISTS events_v2_ids (
    id           uuid    PRIMARY KEY,
    aggregate_id uuid    NOT NULL,
    version      integer NOT NULL
);
-- Events already stored; where an id was stored twice (possible before), the first one stays
-- registered and the others are named.
INSERT INTO events_v2_ids (id, aggregate_id, version)
SELECT DISTINCT ON (id) id, aggregate_id, version FROM events_v2 ORDER BY id, "timestamp", position
ON CONFLICT DO NOTHING;
DO $$
DECLARE
    repeated bigint;
BEGIN
    SELECT count(*) INTO repeated FROM (SELECT id FROM events_v2 GROUP BY id HAVING count(*) > 1) r;
    IF repeated > 0 THEN
        RAISE NOTICE '% event ids are stored more than once (from before ids were unique): SELECT id FROM events_v2 GROUP BY id HAVING count(*) > 1', repeated;
    END IF;
END
$$;

-- 2. A user-scoped handle writing into another user's aggregate above version 1 could not see
--    the stream (row-level security) and answered CONCURRENCY_CONFLICT with version 0. Whether
--    an aggregate exists is answered here with the owner's rights; nothing else is revealed.
CREATE OR REPLACE FUNCTION synap_aggregate_exists(p_aggregate_id uuid)
RETURNS boolean
LANGUAGE sql STABLE
SECURITY DEFINER
SET search_path FROM CURRENT
AS $$
    SELECT EXISTS (SELECT 1 FROM event_streams WHERE aggregate_id = p_aggregate_id)
$$;

-- 3. The legacy table is identified by its schema-qualified name, whatever spelling a caller
--    used: `events` and `public.events` were two tables for the map, the pending filter, the
--    lock and dual-write, so rows dual-written under one were migrated again under the other.
CREATE OR REPLACE FUNCTION synap_legacy_table_key(p_table regclass)
RETURNS text
LANGUAGE sql STABLE
AS $$
    SELECT format('%I.%I', n.nspname, c.relname)
      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
     WHERE c.oid = p_table
$$;

DO $$
DECLARE
    spelling  text;
    canonical text;
BEGIN
    FOR spelling IN
        SELECT legacy_table FROM legacy_migration_map
        UNION SELECT legacy_table FROM legacy_migration_failures
        UNION SELECT legacy_table FROM legacy_migration_runs
    LOOP
        canonical := synap_legacy_table_key(to_regclass(spelling));
        CONTINUE WHEN canonical IS NULL OR canonical = spelling;
        -- Rows of a legacy row already recorded under the canonical name stay under their old
        -- spelling: that row was copied twice, which verify then shows.
        UPDATE legacy_migration_map m SET legacy_table = canonical
         WHERE m.legacy_table = spelling
           AND NOT EXISTS (SELECT 1 FROM legacy_migration_map o
                            WHERE o.legacy_table = canonical AND o.legacy_id = m.legacy_id);
        UPDATE legacy_migration_failures f SET legacy_table = canonical
         WHERE f.legacy_table = spelling
           AND NOT EXISTS (SELECT 1 FROM legacy_migration_failures o
                            WHERE o.legacy_table = canonical AND o.legacy_id = f.legacy_id);
        UPDATE legacy_migration_runs r SET legacy_table = canonical
         WHERE r.legacy_table = spelling
           AND NOT EXISTS (SELECT 1 FROM legacy_migration_runs o WHERE o.legacy_table = canonical);
        IF EXISTS (SELECT 1 FROM legacy_migration_map WHERE legacy_table = spelling) THEN
            RAISE NOTICE 'legacy rows recorded both as "%" and as "%" were copied twice; verify lists them', spelling, canonical;
        END IF;
    END LOOP;
END
$$;

-- 4. A legacy row that cannot be migrated may be accepted as lost, explicitly, before the legacy
--    table is dropped (drop-legacy --accept-lost lists them).
ALTER TABLE legacy_migration_failures ADD COLUMN IF NOT EXISTS accepted_at timestamptz;

-- 5. The design's helper breaks ties between events of one timestamp newest first, as
--    getUserStream does (position DESC); it broke them oldest first.
CREATE OR REPLACE FUNCTION get_user_event_stream(p_user_id text, p_days integer DEFAULT 7, p_limit integer DEFAULT 1000)
RETURNS SETOF events_v2
LANGUAGE sql STABLE
AS $$
    SELECT *
    FROM events_v2
    WHERE user_id = p_user_id
      AND "timestamp" >= now() - make_interval(days => p_days)
    ORDER BY "timestamp" DESC, position DESC
    LIMIT p_limit
$$;

-- 6. What an application role needs now includes the id registry; roles granted before are
--    granted it here.
CREATE OR REPLACE FUNCTION synap_grant_application_role(p_role name)
RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
    EXECUTE format('GRANT USAGE ON SCHEMA %I TO %I', current_schema(), p_role);
    EXECUTE format('GRANT SELECT, INSERT ON events_v2, events_daily_dirty, events_v2_feed_days, events_v2_ids TO %I', p_role);
    EXECUTE format('GRANT SELECT, INSERT, UPDATE ON event_streams, event_consumers TO %I', p_role);
    EXECUTE format('GRANT USAGE ON SEQUENCE events_v2_position_seq TO %I', p_role);
    INSERT INTO synap_application_roles (role_name) VALUES (p_role) ON CONFLICT DO NOTHING;
END
$$;
SELECT synap_grant_application_role(role_name) FROM synap_application_roles;

-- 7. The global feed belongs to one cluster's transaction ids. After pg_dump and restore (or on a
--    logical replica) the stored txids come from another cluster: new events may get lower ids
--    than restored ones, and readers would skip them. The store records its identity and the
--    cluster whose ids it holds; readers refuse to read on a mismatch (FEED_REBASE_REQUIRED)
--    until synap_rebase_feed() renumbers the stored ids into this cluster's past, and
--    checkpoints carry the identity, so a checkpoint from another store is refused.
INSERT INTO synap_settings (key, value)
VALUES ('store_id', gen_random_uuid()::text),
       ('cluster_id', (SELECT system_identifier::text FROM pg_control_system())),
       ('feed_generation', '0')
ON CONFLICT (key) DO NOTHING;

-- The identity a checkpoint carries: this store, on the cluster whose ids it holds, since its
-- last rebase. Both functions read synap_settings with the owner's rights, for application
-- roles, and reveal nothing else.
CREATE OR REPLACE FUNCTION synap_feed_identity()
RETURNS bigint
LANGUAGE sql STABLE
SECURITY DEFINER
SET search_path FROM CURRENT
AS $$
    SELECT hashtextextended(
        (SELECT value FROM synap_settings WHERE key = 'store_id') || '@' ||
        (SELECT value FROM synap_settings WHERE key = 'cluster_id') || '#' ||
        (SELECT value FROM synap_settings WHERE key = 'feed_generation'), 0)
$$;

-- Whether the stored transaction ids are this cluster's.
CREATE OR REPLACE FUNCTION synap_feed_is_current()
RETURNS boolean
LANGUAGE sql STABLE
SECURITY DEFINER
SET search_path FROM CURRENT
AS $$
    SELECT (SELECT value FROM synap_settings WHERE key = 'cluster_id')
           = (SELECT system_identifier::text FROM pg_control_system())
$$;

-- Renumbers the stored transaction ids into this cluster's past, keeping their order: the n-th
-- distinct stored id becomes n, so every transaction from now on sorts after every restored
-- event. Named consumers' checkpoints move with them. Needs this cluster's next transaction id
-- to be above the number of distinct stored ids (the caller consumes ids until it is). Returns
-- the number of events renumbered.
CREATE OR REPLACE FUNCTION synap_rebase_feed()
RETURNS bigint
LANGUAGE plpgsql
AS $$
DECLARE
    distinct_ids bigint;
    renumbered   bigint;
BEGIN
    IF synap_feed_is_current() THEN
        RETURN 0;
    END IF;
    LOCK TABLE events_v2 IN SHARE ROW EXCLUSIVE MODE;
    LOCK TABLE event_consumers IN SHARE ROW EXCLUSIVE MODE;
    CREATE TEMP TABLE synap_txid_map ON COMMIT DROP AS
        SELECT txid AS old, row_number() OVER (ORDER BY txid) AS new
          FROM (SELECT DISTINCT txid FROM events_v2) t;
    SELECT count(*) INTO distinct_ids FROM synap_txid_map;
    IF distinct_ids + 1 >= pg_current_xact_id()::text::bigint THEN
        RAISE EXCEPTION 'synap_rebase_feed: this cluster''s next transaction id must be above % first', distinct_ids + 1;
    END IF;
    CREATE INDEX ON synap_txid_map (old);
    UPDATE events_v2 e SET txid = m.new::text::xid8 FROM synap_txid_map m WHERE e.txid = m.old;
    GET DIAGNOSTICS renumbered = ROW_COUNT;
    -- A checkpoint at a stored id keeps its position; one between ids (a horizon) goes to the
    -- start of the next id.
    UPDATE event_consumers c
       SET txid = coalesce(
               (SELECT m.new FROM synap_txid_map m WHERE m.old = c.txid),
               (SELECT max(m.new) + 1 FROM synap_txid_map m WHERE m.old < c.txid),
               1)::text::xid8,
           position = CASE WHEN EXISTS (SELECT 1 FROM synap_txid_map m WHERE m.old = c.txid)
                           THEN c.position ELSE 0 END,
           updated_at = now();
    -- The feed index again, as migration 0005 first built it: by transaction where a bucket's
    -- events are spread over many days.
    DELETE FROM events_v2_feed_days;
    WITH days AS (
        SELECT DISTINCT synap_feed_bucket(txid) AS bucket, txid, ("timestamp" AT TIME ZONE 'UTC')::date AS day
          FROM events_v2
    ), spread AS (
        SELECT bucket, count(DISTINCT day) > 3 AS by_txid FROM days GROUP BY bucket
    )
    INSERT INTO events_v2_feed_days (bucket, day, txid)
    SELECT DISTINCT d.bucket, d.day, CASE WHEN s.by_txid THEN d.txid END
      FROM days d JOIN spread s USING (bucket);
    UPDATE synap_settings SET value = (SELECT system_identifier::text FROM pg_control_system())
     WHERE key = 'cluster_id';
    UPDATE synap_settings SET value = (value::bigint + 1)::text WHERE key = 'feed_generation';
    RETURN renumbered;
END
$$;

-- 8. Versions stay in time order across the switch-over: dual-write appends wait until the
--    legacy history has been migrated once (history_migrated_at), and the migration refuses a
--    legacy row older than its aggregate's newest event (OUT_OF_ORDER) rather than number it
--    after events that happened later.
ALTER TABLE legacy_migration_runs ADD COLUMN IF NOT EXISTS history_migrated_at timestamptz;
UPDATE legacy_migration_runs SET history_migrated_at = finished_at
 WHERE history_migrated_at IS NULL AND finished_at IS NOT NULL;
