-- Streams: the design's helper functions, the existence check behind row-level security, the
-- stream locks of multi-aggregate writes, and the citus mode's routed append.
--
-- Repeatable: applied after the versioned migrations whenever a file in this folder changes
-- (docs/schema.md, "Migrations"); every statement is idempotent.
--
-- PL/pgSQL rather than SQL functions: on Citus an SQL function over distributed tables cannot be
-- called with parameters ("parameterized queries for SQL functions referencing distributed tables
-- are not supported"), and one definition serves every storage mode.

-- The design's helper functions, same signatures. They run with the caller's rights: under
-- row-level security a role sees its user's streams only.
CREATE OR REPLACE FUNCTION get_aggregate_version(p_aggregate_id uuid)
RETURNS integer
LANGUAGE plpgsql STABLE
AS $$
BEGIN
    RETURN coalesce((SELECT version FROM event_streams WHERE aggregate_id = p_aggregate_id), 0);
END
$$;

CREATE OR REPLACE FUNCTION get_aggregate_stream(p_aggregate_id uuid, p_from_version integer DEFAULT 0)
RETURNS SETOF events_v2
LANGUAGE plpgsql STABLE
AS $$
DECLARE
    s event_streams;
BEGIN
    SELECT * INTO s FROM event_streams WHERE aggregate_id = p_aggregate_id;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    RETURN QUERY
        SELECT e.* FROM events_v2 e
         WHERE e.aggregate_id = p_aggregate_id
           AND e."timestamp" BETWEEN s.first_timestamp AND s.last_timestamp
           AND e.version > p_from_version
         ORDER BY e.version;
END
$$;

-- Ties between events of one timestamp are broken newest first, as getUserStream does.
CREATE OR REPLACE FUNCTION get_user_event_stream(p_user_id text, p_days integer DEFAULT 7, p_limit integer DEFAULT 1000)
RETURNS SETOF events_v2
LANGUAGE plpgsql STABLE
AS $$
BEGIN
    RETURN QUERY
        SELECT * FROM events_v2
         WHERE user_id = p_user_id
           AND "timestamp" >= now() - make_interval(days => p_days)
         ORDER BY "timestamp" DESC, position DESC
         LIMIT p_limit;
END
$$;

-- Whether an aggregate exists, whoever it belongs to: a user-scoped append whose guard failed
-- tells another user's aggregate (PERMISSION_DENIED) from a version conflict. Reveals nothing
-- else.
--
-- SECURITY DEFINER: row-level security hides other users' streams from the caller. EXECUTE is
-- granted to application roles (synap_grant_application_role). STABLE: it sees the snapshot of
-- the statement that calls it.
--
-- On Citus, the owner may not read a shard that this transaction already wrote as the
-- application's role ("cannot perform query on placements that were modified in this
-- transaction by a different user": a scoped append's guard, then this check). Then the shard
-- is asked on a connection of its own.
CREATE OR REPLACE FUNCTION synap_aggregate_exists(p_aggregate_id uuid)
RETURNS boolean
LANGUAGE plpgsql STABLE
SECURITY DEFINER
SET search_path = pg_catalog, :"store_schema", pg_temp
AS $$
DECLARE
    shard_table text;
    answer      boolean;
BEGIN
    BEGIN
        RETURN EXISTS (SELECT 1 FROM event_streams WHERE aggregate_id = p_aggregate_id);
    EXCEPTION WHEN active_sql_transaction THEN
        SELECT format('%I.%I', n.nspname,
                      'event_streams_' || get_shard_id_for_distribution_column('event_streams', p_aggregate_id))
          INTO shard_table
          FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE c.oid = 'event_streams'::regclass;
        SELECT bool_or(result::boolean) INTO answer
          FROM run_command_on_workers(format(
                   'SELECT EXISTS (SELECT 1 FROM %s WHERE aggregate_id = %L)', shard_table, p_aggregate_id))
         WHERE success;
        IF answer IS NULL THEN
            RAISE EXCEPTION 'no worker answered for the shard of aggregate %', p_aggregate_id;
        END IF;
        RETURN answer;
    END;
END
$$;

-- The streams of a multi-aggregate write (the legacy migration's batches), locked in a fixed
-- order and returned. On Citus a query with FOR UPDATE must stay on one shard: there the rows are
-- locked shard by shard (in shard order, by aggregate within a shard).
CREATE OR REPLACE FUNCTION synap_lock_streams(p_ids uuid[])
RETURNS TABLE (aggregate_id uuid, version integer, aggregate_type text, last_timestamp timestamptz)
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    shard uuid[];
BEGIN
    IF (SELECT value FROM synap_settings WHERE key = 'storage_mode') <> 'citus' THEN
        RETURN QUERY
            SELECT s.aggregate_id, s.version, s.aggregate_type, s.last_timestamp FROM event_streams s
             WHERE s.aggregate_id = ANY (p_ids) ORDER BY s.aggregate_id FOR UPDATE;
        RETURN;
    END IF;
    FOR shard IN
        SELECT array_agg(u.id) FROM (
            SELECT id, get_shard_id_for_distribution_column('event_streams', id) AS shard_id
              FROM unnest(p_ids) id) u
         GROUP BY u.shard_id ORDER BY u.shard_id
    LOOP
        RETURN QUERY
            SELECT s.aggregate_id, s.version, s.aggregate_type, s.last_timestamp FROM event_streams s
             WHERE s.aggregate_id = ANY (shard) ORDER BY s.aggregate_id FOR UPDATE;
    END LOOP;
END
$$;

-- The append statement of a repository behind a transaction-mode pooler (docs/api.md,
-- "Connection poolers"): the repository's single-append statement (`APPEND_SQL` in
-- core/src/db/repository.rs, word for word; a test keeps the two alike), run by a PL/pgSQL
-- function because the server keeps a function's plans for as long as its connection lives,
-- while a statement sent through a pooler cannot stay prepared and is planned afresh on every
-- call. Directly connected, the repository prepares the statement itself. It runs with the
-- caller's rights: row-level security applies as to the statement.
CREATE OR REPLACE FUNCTION synap_append(
    p_id uuid, p_timestamp timestamptz, p_aggregate_id uuid, p_aggregate_type text, p_event_type text,
    p_user_id text, p_data jsonb, p_metadata jsonb, p_version integer, p_causation_id uuid,
    p_correlation_id uuid, p_source text, p_schema_version integer)
RETURNS TABLE (out_timestamp timestamptz, out_position bigint)
LANGUAGE plpgsql VOLATILE
AS $$
#variable_conflict use_column
BEGIN
RETURN QUERY
WITH ev AS (
    SELECT $1::uuid AS id, coalesce($2::timestamptz, now()) AS ts, $3::uuid AS aggregate_id,
           $4::text AS aggregate_type, $5::text AS event_type, $6::text AS user_id, $7::jsonb AS data,
           $8::jsonb AS metadata, $9::integer AS version, $10::uuid AS causation_id,
           $11::uuid AS correlation_id, $12::text AS source, $13::integer AS schema_version
), created AS (
    INSERT INTO event_streams (aggregate_id, aggregate_type, user_id, version, first_timestamp, last_timestamp)
    SELECT aggregate_id, aggregate_type, user_id, version, ts, ts FROM ev WHERE version = 1
    ON CONFLICT (aggregate_id) DO NOTHING
    RETURNING aggregate_id
), advanced AS (
    UPDATE event_streams s
       SET version = ev.version,
           first_timestamp = least(s.first_timestamp, ev.ts),
           last_timestamp = greatest(s.last_timestamp, ev.ts)
      FROM ev
     WHERE s.aggregate_id = ev.aggregate_id
       AND ev.version > 1
       AND s.version = ev.version - 1
       AND s.aggregate_type = ev.aggregate_type
    RETURNING s.aggregate_id
), inserted AS (
    INSERT INTO events_v2 (id, "timestamp", aggregate_id, aggregate_type, event_type, user_id, data, metadata,
                           version, causation_id, correlation_id, source, schema_version)
    SELECT id, ts, aggregate_id, aggregate_type, event_type, user_id, data, metadata,
           version, causation_id, correlation_id, source, schema_version
      FROM ev
     WHERE EXISTS (SELECT 1 FROM created UNION ALL SELECT 1 FROM advanced)
       AND (SELECT set_config('synap.feed_days', pg_current_xact_id()::text, true)) IS NOT NULL
    RETURNING "timestamp", position
), ids AS (
    INSERT INTO events_v2_ids (id, aggregate_id, version, user_id)
    SELECT id, aggregate_id, version, user_id FROM ev WHERE EXISTS (SELECT 1 FROM created UNION ALL SELECT 1 FROM advanced)
), dirty AS (
    INSERT INTO events_daily_dirty (day)
    SELECT ("timestamp" AT TIME ZONE 'UTC')::date FROM inserted
    ON CONFLICT (day) DO NOTHING
), feed_days AS (
    INSERT INTO events_v2_feed_days (bucket, day, txid)
    SELECT d.bucket, d.day, d.txid
      FROM (SELECT DISTINCT synap_feed_bucket(pg_current_xact_id()) AS bucket, w.day,
                   CASE WHEN abs(w.day - (now() AT TIME ZONE 'UTC')::date) > 1 THEN pg_current_xact_id() END AS txid
              FROM (SELECT DISTINCT ("timestamp" AT TIME ZONE 'UTC')::date AS day FROM inserted) w) d
     WHERE NOT EXISTS (SELECT 1 FROM events_v2_feed_days f
                        WHERE f.bucket = d.bucket AND f.day = d.day
                          AND (f.txid = d.txid OR (d.txid IS NULL AND f.txid IS NULL)))
)
SELECT "timestamp", position FROM inserted;
END
$$;

-- The citus mode's single-shard append (docs/scale-out.md). The repository's append statement
-- (one statement with data-modifying CTEs) runs on Citus as is, but Citus splits it into
-- subplans: the guard goes to every shard and the transaction commits with two-phase commit.
-- This function runs the same steps as separate statements, each routed by the aggregate's id:
-- the guard and the event's insert reach the one shard that holds the aggregate, on one worker,
-- which commits in one phase. The id registry and the analytics' dirty day stay on the
-- coordinator. The row's txid and position come from the coordinator (Citus evaluates the
-- columns' defaults there), so the feed's global (txid, position) order is kept.
--
-- It returns the stored event's timestamp and position, or no row when the guard did not pass
-- (the aggregate is at another version or of another type, or row-level security hides it): the
-- repository then tells which, as it does after the statement. It runs with the caller's rights,
-- so the row-level security policies apply as they do to the statement. The feed's day index is
-- not written: on Citus the feed reads every partition. Only the citus mode has it: the
-- repository appends through it where it exists.
DO $citus$
BEGIN
    IF (SELECT value FROM synap_settings WHERE key = 'storage_mode') <> 'citus' THEN
        RETURN;
    END IF;
    CREATE OR REPLACE FUNCTION synap_append_routed(
        p_id uuid, p_timestamp timestamptz, p_aggregate_id uuid, p_aggregate_type text, p_event_type text,
        p_user_id text, p_data jsonb, p_metadata jsonb, p_version integer, p_causation_id uuid,
        p_correlation_id uuid, p_source text, p_schema_version integer)
    RETURNS TABLE ("timestamp" timestamptz, "position" bigint)
    LANGUAGE plpgsql VOLATILE
    AS $f$
    DECLARE
        ts     timestamptz := coalesce(p_timestamp, now());
        passed integer;
    BEGIN
        IF p_version = 1 THEN
            INSERT INTO event_streams (aggregate_id, aggregate_type, user_id, version, first_timestamp, last_timestamp)
            VALUES (p_aggregate_id, p_aggregate_type, p_user_id, 1, ts, ts)
            ON CONFLICT (aggregate_id) DO NOTHING;
        ELSE
            UPDATE event_streams s
               SET version = p_version,
                   first_timestamp = least(s.first_timestamp, ts),
                   last_timestamp = greatest(s.last_timestamp, ts)
             WHERE s.aggregate_id = p_aggregate_id
               AND s.version = p_version - 1
               AND s.aggregate_type = p_aggregate_type;
        END IF;
        GET DIAGNOSTICS passed = ROW_COUNT;
        IF passed = 0 THEN
            RETURN;
        END IF;
        INSERT INTO events_v2_ids (id, aggregate_id, version, user_id) VALUES (p_id, p_aggregate_id, p_version, p_user_id);
        INSERT INTO events_v2 AS e (id, "timestamp", aggregate_id, aggregate_type, event_type, user_id, data,
                                    metadata, version, causation_id, correlation_id, source, schema_version)
        VALUES (p_id, ts, p_aggregate_id, p_aggregate_type, p_event_type, p_user_id, p_data,
                p_metadata, p_version, p_causation_id, p_correlation_id, p_source, p_schema_version)
        RETURNING e."timestamp", e.position INTO "timestamp", "position";
        INSERT INTO events_daily_dirty (day) VALUES ((ts AT TIME ZONE 'UTC')::date) ON CONFLICT (day) DO NOTHING;
        RETURN NEXT;
    END
    $f$;
END
$citus$;
