-- The citus storage mode: events_v2 and its companions distributed by aggregate over the workers
-- of a Citus cluster (docs/scale-out.md). A no-op in the other modes, apart from the feed's fence
-- below, which is a constant there.
--
-- Distributed by aggregate_id and co-located, so that one aggregate's guard row, events and
-- snapshots live in one shard: event_streams, events_v2 (a partitioned table: each daily
-- partition becomes a set of shards) and event_snapshots. Every other table stays on the
-- coordinator: events_v2_ids (ids stay unique across aggregates), the feed's day index, the
-- analytics tables, the consumers and groups and the legacy migration's bookkeeping. The
-- repository's statements run as they are; Citus plans them on the coordinator and sends each
-- shard its part, in the coordinator's transaction (two-phase commit when it writes on more
-- than one worker).
--
-- The shard count is Citus's `citus.shard_count` when this file runs (32 unless set).

-- Daily partitions as in 0006, now also for the citus mode (whose partitions are native; a
-- partition attached to a distributed table is distributed with it).
CREATE OR REPLACE FUNCTION synap_ensure_partitions(p_from date, p_to date)
RETURNS integer
LANGUAGE plpgsql
AS $$
DECLARE
    day     date;
    part    text;
    lower   text;
    upper   text;
    created integer := 0;
    moved   bigint;
BEGIN
    IF (SELECT value FROM synap_settings WHERE key = 'storage_mode') NOT IN ('native', 'citus') THEN
        RETURN 0;
    END IF;
    -- One creator at a time: two concurrent calls would both see a day missing and race on
    -- CREATE TABLE.
    PERFORM pg_advisory_xact_lock(hashtext(current_schema() || '.synap_partitions'));
    IF p_to - p_from > 3660 THEN
        RAISE EXCEPTION 'synap_ensure_partitions: at most 3660 days at once (asked for %)', p_to - p_from;
    END IF;
    day := p_from;
    WHILE day <= p_to LOOP
        part := 'events_v2_p' || to_char(day, 'YYYYMMDD');
        IF to_regclass(quote_ident(part)) IS NULL THEN
            -- UTC midnights as ISO 8601 text with an explicit offset: read the same way under
            -- every DateStyle and TimeZone.
            lower := to_char(day, 'YYYY-MM-DD') || ' 00:00:00+00';
            upper := to_char(day + 1, 'YYYY-MM-DD') || ' 00:00:00+00';
            -- Inserts wait while the day's rows move out of the default partition; without the
            -- lock, one landing there between the move and ATTACH would make ATTACH fail.
            LOCK TABLE events_v2 IN SHARE ROW EXCLUSIVE MODE;
            EXECUTE format('CREATE TABLE %I (LIKE events_v2 INCLUDING DEFAULTS INCLUDING CONSTRAINTS)', part);
            EXECUTE format(
                'WITH moved AS (DELETE FROM events_v2_default WHERE "timestamp" >= %L::timestamptz AND "timestamp" < %L::timestamptz RETURNING *)
                 INSERT INTO %I SELECT * FROM moved',
                lower, upper, part);
            GET DIAGNOSTICS moved = ROW_COUNT;
            EXECUTE format('ALTER TABLE events_v2 ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)',
                part, lower, upper);
            IF moved > 0 THEN
                RAISE NOTICE 'moved % rows from events_v2_default into %', moved, part;
            END IF;
            created := created + 1;
        END IF;
        day := day + 1;
    END LOOP;
    IF created > 0 THEN
        PERFORM synap_secure_partitions();
    END IF;
    RETURN created;
END
$$;

-- The feed's fence, called by every reader of the global order right after it took its horizon
-- (in the same statement). On one server every transaction below the horizon has ended and its
-- rows are visible. On Citus a transaction that wrote on two workers commits on the coordinator
-- first and then runs COMMIT PREPARED on each worker, so its rows can still be invisible there
-- when the horizon has passed it. This waits until every prepared transaction the workers hold
-- at the moment of the call is resolved (one-phase commits reach the worker before the
-- coordinator commits). It returns whether the store is distributed: false, a constant, in the
-- other modes.
CREATE OR REPLACE FUNCTION synap_feed_fence()
RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT false
$$;

-- The streams of a multi-aggregate write (the legacy migration's batches), locked in a fixed
-- order and returned. On Citus a query with FOR UPDATE must stay on one shard: there the rows are
-- locked shard by shard (in shard order, by aggregate within a shard).
CREATE OR REPLACE FUNCTION synap_lock_streams(p_ids uuid[])
RETURNS TABLE (aggregate_id uuid, version integer, aggregate_type text, last_timestamp timestamptz)
LANGUAGE sql VOLATILE
AS $$
    SELECT s.aggregate_id, s.version, s.aggregate_type, s.last_timestamp FROM event_streams s
     WHERE s.aggregate_id = ANY (p_ids) ORDER BY s.aggregate_id FOR UPDATE
$$;

DO $citus$
BEGIN
    IF (SELECT value FROM synap_settings WHERE key = 'storage_mode') <> 'citus' THEN
        RETURN;
    END IF;
    -- One connection per worker for the whole file: the functions below are created after the
    -- tables are distributed, in the same transaction (also when psql applies every file in one).
    PERFORM set_config('citus.multi_shard_modify_mode', 'sequential', true);

    -- Partitions first: distributing the whole partitioned table at once is much faster than
    -- distributing each day as it is attached.
    PERFORM synap_ensure_partitions(((now() AT TIME ZONE 'UTC')::date - 7), ((now() AT TIME ZONE 'UTC')::date + 30));

    -- Citus refuses triggers on a distributed table. The repository's statements record the
    -- feed's days themselves (0005) and wake subscribers after commit (0010); rows inserted into
    -- events_v2 by other means are not recorded in the feed's day index in this mode.
    DROP TRIGGER IF EXISTS events_v2_feed_record ON events_v2;
    DROP TRIGGER IF EXISTS events_v2_notify ON events_v2;

    PERFORM create_distributed_table('event_streams', 'aggregate_id');
    PERFORM create_distributed_table('events_v2', 'aggregate_id', colocate_with => 'event_streams');
    PERFORM create_distributed_table('event_snapshots', 'aggregate_id', colocate_with => 'event_streams');

    -- SQL functions over distributed tables cannot be called with parameters on Citus
    -- ("parameterized queries for SQL functions referencing distributed tables are not
    -- supported"): the same functions in PL/pgSQL.
    CREATE OR REPLACE FUNCTION get_aggregate_version(p_aggregate_id uuid)
    RETURNS integer
    LANGUAGE plpgsql STABLE
    AS $f$
    BEGIN
        RETURN coalesce((SELECT version FROM event_streams WHERE aggregate_id = p_aggregate_id), 0);
    END
    $f$;

    CREATE OR REPLACE FUNCTION get_aggregate_stream(p_aggregate_id uuid, p_from_version integer DEFAULT 0)
    RETURNS SETOF events_v2
    LANGUAGE plpgsql STABLE
    AS $f$
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
    $f$;

    CREATE OR REPLACE FUNCTION get_user_event_stream(p_user_id text, p_days integer DEFAULT 7, p_limit integer DEFAULT 1000)
    RETURNS SETOF events_v2
    LANGUAGE plpgsql STABLE
    AS $f$
    BEGIN
        RETURN QUERY
            SELECT * FROM events_v2
             WHERE user_id = p_user_id
               AND "timestamp" >= now() - make_interval(days => p_days)
             ORDER BY "timestamp" DESC, position DESC
             LIMIT p_limit;
    END
    $f$;

    -- Citus refuses to read, as the owner, a shard that this transaction already wrote as the
    -- application's role ("cannot perform query on placements that were modified in this
    -- transaction by a different user": a scoped append's guard, then this check). Then the
    -- shard is asked on a connection of its own.
    CREATE OR REPLACE FUNCTION synap_aggregate_exists(p_aggregate_id uuid)
    RETURNS boolean
    LANGUAGE plpgsql STABLE
    SECURITY DEFINER
    SET search_path FROM CURRENT
    AS $f$
    DECLARE
        shard_table text;
        answer      boolean;
    BEGIN
        BEGIN
            RETURN EXISTS (SELECT 1 FROM event_streams WHERE aggregate_id = p_aggregate_id);
        EXCEPTION WHEN active_sql_transaction THEN
            shard_table := format('%I.%I', current_schema(),
                'event_streams_' || get_shard_id_for_distribution_column('event_streams', p_aggregate_id));
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
    $f$;

    CREATE OR REPLACE FUNCTION synap_lock_streams(p_ids uuid[])
    RETURNS TABLE (aggregate_id uuid, version integer, aggregate_type text, last_timestamp timestamptz)
    LANGUAGE plpgsql VOLATILE
    AS $f$
    DECLARE
        shard uuid[];
    BEGIN
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
    $f$;

    -- With the owner's rights: an application role may read the feed without the right to ask
    -- the workers.
    CREATE OR REPLACE FUNCTION synap_feed_fence()
    RETURNS boolean
    LANGUAGE plpgsql VOLATILE
    SECURITY DEFINER
    SET search_path FROM CURRENT
    AS $f$
    DECLARE
        pending text[];
        failed  text;
        probe   constant text := $q$SELECT coalesce(string_agg(gid, ','), '') FROM pg_prepared_xacts WHERE gid LIKE 'citus\_%'$q$;
    BEGIN
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
END
$citus$;
