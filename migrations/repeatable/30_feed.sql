-- The global feed: the day index's helpers, the triggers' functions for rows written by plain
-- SQL, the store's identity, the rebase after a restore, and the citus mode's fence.
--
-- Repeatable: applied after the versioned migrations whenever a file in this folder changes
-- (docs/schema.md, "Migrations"); every statement is idempotent.

-- The bucket of a transaction id (an xid8: epoch and xid, far below 2^63).
CREATE OR REPLACE FUNCTION synap_feed_bucket(p_txid xid8)
RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT $1::text::bigint >> 16
$$;

-- Records the day of one row inserted by a statement other than the repository's, with the same
-- rules as the repository's statements (core/src/db/sql.rs, feed_days_ctes). Fired by the row
-- trigger events_v2_feed_record (migration 0005), whose WHEN skips the repository's own rows.
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

-- Subscribers are woken after the repository's writes commit, not inside them: a NOTIFY queued
-- inside a transaction makes its commit take PostgreSQL's database-wide notify lock through the
-- WAL flush (migration 0010). The repository's statements mark themselves (synap.feed_days =
-- their transaction id) and send one pg_notify after committing; inserts from elsewhere notify
-- here. Fired once per inserting statement by events_v2_notify (migration 0003), also by one
-- that inserted nothing; it also clears the mark, so that it covers exactly one statement. A
-- transaction that has written nothing (an append whose version guard did not pass) has no
-- transaction id yet: nothing to notify, and asking for its id would give it one, and with it a
-- commit record and the notify lock at its commit.
CREATE OR REPLACE FUNCTION synap_notify_events() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    IF pg_current_xact_id_if_assigned() IS NULL THEN
        PERFORM set_config('synap.feed_days', '', true);
        RETURN NULL;
    END IF;
    IF coalesce(current_setting('synap.feed_days', true), '') <> pg_current_xact_id()::text THEN
        PERFORM pg_notify('synap_events', '');
    END IF;
    PERFORM set_config('synap.feed_days', '', true);
    RETURN NULL;
END
$$;

-- The identity a checkpoint carries: this store, on the cluster whose transaction ids it holds,
-- since its last rebase.
--
-- SECURITY DEFINER, as is synap_feed_is_current: application roles read the feed but not
-- synap_settings. Both reveal nothing else. EXECUTE is granted to application roles.
CREATE OR REPLACE FUNCTION synap_feed_identity()
RETURNS bigint
LANGUAGE sql STABLE
SECURITY DEFINER
SET search_path = pg_catalog, :"store_schema", pg_temp
AS $$
    SELECT hashtextextended(
        (SELECT value FROM synap_settings WHERE key = 'store_id') || '@' ||
        (SELECT value FROM synap_settings WHERE key = 'cluster_id') || '#' ||
        (SELECT value FROM synap_settings WHERE key = 'feed_generation'), 0)
$$;

-- Whether the stored transaction ids are this cluster's (false after pg_dump and restore into
-- another cluster, or on a logical replica: readers then refuse with FEED_REBASE_REQUIRED).
CREATE OR REPLACE FUNCTION synap_feed_is_current()
RETURNS boolean
LANGUAGE sql STABLE
SECURITY DEFINER
SET search_path = pg_catalog, :"store_schema", pg_temp
AS $$
    SELECT (SELECT value FROM synap_settings WHERE key = 'cluster_id')
           = (SELECT system_identifier::text FROM pg_control_system())
$$;

-- Renumbers the stored transaction ids into this cluster's past, keeping their order: the n-th
-- distinct stored id becomes n, so every transaction from now on sorts after every restored
-- event. Named consumers' checkpoints move with them. Needs this cluster's next transaction id
-- to be above the number of distinct stored ids (the caller consumes ids until it is). Returns
-- the number of events renumbered. The owner's (rebase-feed).
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

-- The feed's fence, called by every reader of the global order right after it took its horizon
-- (in the same statement). It returns whether the store is distributed.
--
-- On one server every transaction below the horizon has ended and its rows are visible: a
-- constant, false. On Citus a transaction that wrote on two workers commits on the coordinator
-- first and then runs COMMIT PREPARED on each worker, so its rows can still be invisible there
-- when the horizon has passed it. There the fence waits until every prepared transaction the
-- workers hold at the moment of the call is resolved (one-phase commits reach the worker before
-- the coordinator commits). It asks the workers only when the coordinator has a record of a
-- two-phase transaction below the horizon: Citus writes a row in pg_dist_transaction (with the
-- coordinator's transaction id, outer_xid) in the transaction that prepares on the workers, and
-- its recovery deletes the row only once no worker holds that transaction prepared. Single
-- appends commit in one phase and leave no row.
--
-- SECURITY DEFINER on Citus: an application role may read the feed without the right to ask the
-- workers. EXECUTE is granted to application roles.
DO $fence$
DECLARE
    -- The Citus version's body, created below with its search_path.
    fence constant text := $f$
    DECLARE
        horizon constant xid8 := pg_snapshot_xmin(pg_current_snapshot());
        pending text[];
        failed  text;
        probe   constant text := $q$SELECT coalesce(string_agg(gid, ','), '') FROM pg_prepared_xacts WHERE gid LIKE 'citus\_%'$q$;
    BEGIN
        IF NOT EXISTS (SELECT 1 FROM pg_dist_transaction WHERE outer_xid IS NULL OR outer_xid < horizon) THEN
            RETURN true;
        END IF;
        LOOP
            SELECT string_agg(format('%s:%s: %s', nodename, nodeport, result), '; ') FILTER (WHERE NOT success),
                   array_agg(format('%s:%s/%s', nodename, nodeport, g)) FILTER (WHERE success AND g <> '')
              INTO failed, pending
              FROM (SELECT r.nodename, r.nodeport, r.success, r.result, g
                      FROM run_command_on_workers(probe) r
                      LEFT JOIN LATERAL unnest(string_to_array(CASE WHEN r.success THEN r.result END, ',')) g ON true) w
             WHERE pending IS NULL OR g IS NULL OR format('%s:%s/%s', nodename, nodeport, g) = ANY (pending);
            IF failed IS NOT NULL THEN
                RAISE EXCEPTION 'the feed cannot tell which transactions the workers still hold: %', failed;
            END IF;
            EXIT WHEN pending IS NULL;
            PERFORM pg_sleep(0.001);
        END LOOP;
        RETURN true;
    END
    $f$;
BEGIN
    IF (SELECT value FROM synap_settings WHERE key = 'storage_mode') <> 'citus' THEN
        CREATE OR REPLACE FUNCTION synap_feed_fence()
        RETURNS boolean
        LANGUAGE sql IMMUTABLE PARALLEL SAFE
        AS $f$
            SELECT false
        $f$;
        RETURN;
    END IF;
    -- The search_path in the definition itself, pg_catalog first and pg_temp last: the schema is
    -- not text the runner or psql can fill in inside this block, so the statement is made here.
    EXECUTE format('CREATE OR REPLACE FUNCTION synap_feed_fence() RETURNS boolean LANGUAGE plpgsql VOLATILE '
                   'SECURITY DEFINER SET search_path = pg_catalog, %I, pg_temp AS %L',
                   current_schema(), fence);
END
$fence$;
