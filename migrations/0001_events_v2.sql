-- events_v2: the event store.
--
-- Plain SQL that applies with `psql -f` as well as through the built-in runner.
-- Storage mode comes from the custom setting `synap.storage_mode`
-- (auto | timescaledb | native | citus; unset means auto), e.g.
--   PGOPTIONS='-c synap.storage_mode=native' psql "$DATABASE_URL" -f migrations/0001_events_v2.sql
--
--   timescaledb: a hypertable on "timestamp" with 1-day chunks.
--   native:      declarative range partitioning by day, partitions created ahead by
--                synap_ensure_partitions(), plus a default partition so that an insert
--                never fails for lack of a partition.
--   citus:       native partitioning, distributed by aggregate over a Citus cluster's workers
--                (migration 0013 distributes the tables); needs the citus extension in this
--                database and at least one active worker.
--   auto:        citus when this database has the citus extension and active workers; otherwise
--                timescaledb when the database has the extension or it can be created (installed
--                and in shared_preload_libraries), otherwise native, with a NOTICE saying why.

CREATE TABLE IF NOT EXISTS synap_settings (
    key   text PRIMARY KEY,
    value text NOT NULL
);

CREATE SEQUENCE IF NOT EXISTS events_v2_position_seq AS bigint;

DO $storage$
DECLARE
    requested text := lower(coalesce(nullif(current_setting('synap.storage_mode', true), ''), 'auto'));
    chosen    text;
    ts_schema text;
    workers   bigint := 0;
    columns   text := $cols$
        id             uuid        NOT NULL DEFAULT gen_random_uuid(),
        "timestamp"    timestamptz NOT NULL DEFAULT now(),
        aggregate_id   uuid        NOT NULL,
        aggregate_type text        NOT NULL
            CONSTRAINT events_v2_aggregate_type_check
            CHECK (aggregate_type IN ('entity', 'relation', 'user', 'system')),
        event_type     text        NOT NULL,
        user_id        text        NOT NULL,
        data           jsonb       NOT NULL DEFAULT '{}'::jsonb,
        metadata       jsonb,
        version        integer     NOT NULL CONSTRAINT events_v2_version_check CHECK (version >= 1),
        causation_id   uuid,
        correlation_id uuid,
        source         text        NOT NULL DEFAULT 'api'
            CONSTRAINT events_v2_source_check
            CHECK (source IN ('api', 'automation', 'sync', 'migration', 'system')),
        position       bigint      NOT NULL DEFAULT nextval('events_v2_position_seq')
    $cols$;
BEGIN
    IF requested NOT IN ('auto', 'timescaledb', 'native', 'citus') THEN
        RAISE EXCEPTION 'synap.storage_mode must be auto, timescaledb, native or citus, not "%"', requested;
    END IF;

    IF to_regclass('events_v2') IS NOT NULL THEN
        RAISE NOTICE 'events_v2 already exists; storage mode unchanged';
        RETURN;
    END IF;

    chosen := 'native';
    IF requested IN ('auto', 'citus') AND EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'citus') THEN
        EXECUTE 'SELECT count(*) FROM pg_dist_node WHERE isactive AND noderole = ''primary'' AND groupid <> 0'
           INTO workers;
    END IF;
    IF requested = 'citus' AND workers = 0 THEN
        RAISE EXCEPTION 'synap.storage_mode is citus but %', CASE
            WHEN EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'citus')
                THEN 'the cluster has no active worker: add one with citus_add_node()'
            ELSE 'the citus extension is not created in this database' END;
    END IF;
    IF workers > 0 THEN
        chosen := 'citus';
    ELSIF requested <> 'native' THEN
        -- Where the extension lives, when a database already has it (its functions are called
        -- qualified with that schema, whatever search_path says).
        SELECT extnamespace::regnamespace::text INTO ts_schema FROM pg_extension WHERE extname = 'timescaledb';
        IF ts_schema IS NULL AND EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb') THEN
            -- CREATE EXTENSION on a server that does not preload the library ends the session
            -- with FATAL, which no EXCEPTION block can catch: look before trying.
            IF 'timescaledb' <> ALL (string_to_array(
                    replace(replace(current_setting('shared_preload_libraries'), ' ', ''), '"', ''), ',')) THEN
                IF requested = 'timescaledb' THEN
                    RAISE EXCEPTION 'synap.storage_mode is timescaledb but the server does not preload it: add timescaledb to shared_preload_libraries and restart the server';
                END IF;
                RAISE NOTICE 'timescaledb is installed but not in shared_preload_libraries; using native partitioning';
            ELSE
                BEGIN
                    -- In public, where a database's extensions usually live, so that dropping one
                    -- application schema never drops the extension under the others.
                    IF to_regnamespace('public') IS NOT NULL THEN
                        CREATE EXTENSION IF NOT EXISTS timescaledb WITH SCHEMA public;
                    ELSE
                        CREATE EXTENSION IF NOT EXISTS timescaledb;
                    END IF;
                    SELECT extnamespace::regnamespace::text INTO ts_schema FROM pg_extension WHERE extname = 'timescaledb';
                EXCEPTION WHEN OTHERS THEN
                    IF requested = 'timescaledb' THEN
                        RAISE;
                    END IF;
                    RAISE NOTICE 'timescaledb is installed but could not be created (%); using native partitioning', SQLERRM;
                END;
            END IF;
        ELSIF ts_schema IS NULL AND requested = 'timescaledb' THEN
            RAISE EXCEPTION 'synap.storage_mode is timescaledb but the timescaledb extension is not available on this server';
        END IF;
        IF ts_schema IS NOT NULL THEN
            chosen := 'timescaledb';
        END IF;
    END IF;

    IF chosen = 'timescaledb' THEN
        EXECUTE format('CREATE TABLE events_v2 (%s)', columns);
        -- Default indexes are off: the indexes below are the ones our queries use.
        EXECUTE format('SELECT %I.create_hypertable(%L::regclass, %L, chunk_time_interval => INTERVAL %L, create_default_indexes => false)',
                       ts_schema, 'events_v2', 'timestamp', '1 day');
    ELSE
        EXECUTE format('CREATE TABLE events_v2 (%s) PARTITION BY RANGE ("timestamp")', columns);
        CREATE TABLE events_v2_default PARTITION OF events_v2 DEFAULT;
    END IF;

    ALTER SEQUENCE events_v2_position_seq OWNED BY events_v2.position;
    INSERT INTO synap_settings (key, value) VALUES ('storage_mode', chosen)
        ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value;
    RAISE NOTICE 'events_v2 storage mode: %', chosen;
END
$storage$;

-- Indexes. The design listed eight; each kept one serves a query of EventRepository:
--   aggregate stream  (aggregate_id, version)       getAggregateStream, idempotent-retry lookup
--   user + time       (user_id, timestamp DESC)     getUserStream, countEvents by user
--   type + time       (event_type, timestamp DESC)  getEventsByType, countEvents by type
--   correlation       (correlation_id, timestamp)   getCorrelatedEvents; partial, most rows have none
-- Dropped: source (no query filters on it); user + type (served by user + time, whose
-- time-bounded scan is already small per user); aggregate_type + time (four distinct values:
-- a scan of the time-pruned partitions is as fast and the index costs every insert); time alone
-- (partition pruning on "timestamp" already bounds time-range scans).
-- No unique (aggregate_id, version) index: neither a hypertable nor a partitioned table accepts a
-- unique index without the partitioning column. event_streams below is the version guard.
CREATE INDEX IF NOT EXISTS events_v2_aggregate_idx   ON events_v2 (aggregate_id, version);
CREATE INDEX IF NOT EXISTS events_v2_user_time_idx   ON events_v2 (user_id, "timestamp" DESC);
CREATE INDEX IF NOT EXISTS events_v2_type_time_idx   ON events_v2 (event_type, "timestamp" DESC);
CREATE INDEX IF NOT EXISTS events_v2_correlation_idx ON events_v2 (correlation_id, "timestamp")
    WHERE correlation_id IS NOT NULL;

-- One row per aggregate: the optimistic-locking guard. An append advances "version" with a
-- conditional write (version = expected - 1) in the same statement or transaction as the event
-- insert, so two writers of the same version can never both succeed. first/last_timestamp bound
-- the aggregate's events in time, which lets stream reads prune chunks and partitions.
CREATE TABLE IF NOT EXISTS event_streams (
    aggregate_id    uuid        PRIMARY KEY,
    aggregate_type  text        NOT NULL
        CHECK (aggregate_type IN ('entity', 'relation', 'user', 'system')),
    user_id         text        NOT NULL,
    version         integer     NOT NULL CHECK (version >= 1),
    first_timestamp timestamptz NOT NULL,
    last_timestamp  timestamptz NOT NULL
);

-- Daily partitions for native mode: creates the missing ones in [p_from, p_to], moving any rows
-- that the default partition already holds for those days. Returns how many it created.
-- A no-op in timescaledb mode (chunks are created on insert).
CREATE OR REPLACE FUNCTION synap_ensure_partitions(p_from date, p_to date)
RETURNS integer
LANGUAGE plpgsql
AS $$
DECLARE
    day     date;
    part    text;
    created integer := 0;
    moved   bigint;
BEGIN
    IF (SELECT value FROM synap_settings WHERE key = 'storage_mode') <> 'native' THEN
        RETURN 0;
    END IF;
    IF p_to - p_from > 3660 THEN
        RAISE EXCEPTION 'synap_ensure_partitions: at most 3660 days at once (asked for %)', p_to - p_from;
    END IF;
    day := p_from;
    WHILE day <= p_to LOOP
        part := 'events_v2_p' || to_char(day, 'YYYYMMDD');
        IF to_regclass(quote_ident(part)) IS NULL THEN
            EXECUTE format('CREATE TABLE %I (LIKE events_v2 INCLUDING DEFAULTS INCLUDING CONSTRAINTS)', part);
            EXECUTE format(
                'WITH moved AS (DELETE FROM events_v2_default WHERE "timestamp" >= %L::timestamptz AND "timestamp" < %L::timestamptz RETURNING *)
                 INSERT INTO %I SELECT * FROM moved',
                day::timestamp AT TIME ZONE 'UTC', (day + 1)::timestamp AT TIME ZONE 'UTC', part);
            GET DIAGNOSTICS moved = ROW_COUNT;
            EXECUTE format('ALTER TABLE events_v2 ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)',
                part, day::timestamp AT TIME ZONE 'UTC', (day + 1)::timestamp AT TIME ZONE 'UTC');
            IF moved > 0 THEN
                RAISE NOTICE 'moved % rows from events_v2_default into %', moved, part;
            END IF;
            created := created + 1;
        END IF;
        day := day + 1;
    END LOOP;
    RETURN created;
END
$$;

-- Partitions from a week back to a month ahead. Run synap_ensure_partitions again (the
-- repository's maintain() does) to keep creating them ahead; until then inserts land in the
-- default partition and are moved when their day's partition is created.
SELECT synap_ensure_partitions(((now() AT TIME ZONE 'UTC')::date - 7), ((now() AT TIME ZONE 'UTC')::date + 30));

-- The design's helper functions, same signatures.
CREATE OR REPLACE FUNCTION get_aggregate_version(p_aggregate_id uuid)
RETURNS integer
LANGUAGE sql STABLE
AS $$
    SELECT coalesce((SELECT version FROM event_streams WHERE aggregate_id = p_aggregate_id), 0)
$$;

CREATE OR REPLACE FUNCTION get_aggregate_stream(p_aggregate_id uuid, p_from_version integer DEFAULT 0)
RETURNS SETOF events_v2
LANGUAGE sql STABLE
AS $$
    SELECT e.*
    FROM event_streams s
    JOIN events_v2 e
      ON e.aggregate_id = s.aggregate_id
     AND e."timestamp" BETWEEN s.first_timestamp AND s.last_timestamp
    WHERE s.aggregate_id = p_aggregate_id
      AND e.version > p_from_version
    ORDER BY e.version
$$;

CREATE OR REPLACE FUNCTION get_user_event_stream(p_user_id text, p_days integer DEFAULT 7, p_limit integer DEFAULT 1000)
RETURNS SETOF events_v2
LANGUAGE sql STABLE
AS $$
    SELECT *
    FROM events_v2
    WHERE user_id = p_user_id
      AND "timestamp" >= now() - make_interval(days => p_days)
    ORDER BY "timestamp" DESC
    LIMIT p_limit
$$;

-- Analytics. The Apache edition of TimescaleDB has no continuous aggregates, so events_daily is
-- a table kept current by refresh_events_daily(), which recomputes only the days listed in
-- events_daily_dirty. Every insert made through EventRepository marks its days there in the same
-- statement; after inserting rows by hand, call refresh_events_daily(true) for a full rebuild.
-- Days are UTC days.
CREATE TABLE IF NOT EXISTS events_daily (
    day               date   NOT NULL,
    user_id           text   NOT NULL,
    event_type        text   NOT NULL,
    aggregate_type    text   NOT NULL,
    event_count       bigint NOT NULL,
    unique_aggregates bigint NOT NULL,
    PRIMARY KEY (day, user_id, event_type, aggregate_type)
);
CREATE INDEX IF NOT EXISTS events_daily_day_idx      ON events_daily (day DESC);
CREATE INDEX IF NOT EXISTS events_daily_user_day_idx ON events_daily (user_id, day DESC);

CREATE TABLE IF NOT EXISTS events_daily_dirty (
    day date PRIMARY KEY
);

-- Returns the number of days recomputed.
CREATE OR REPLACE FUNCTION refresh_events_daily(p_full boolean DEFAULT false)
RETURNS integer
LANGUAGE plpgsql
AS $$
DECLARE
    days date[];
BEGIN
    -- Appends mark days with INSERT ... ON CONFLICT DO NOTHING, which holds ROW EXCLUSIVE
    -- on events_daily_dirty until the append commits. SHARE mode waits for those in-flight
    -- appends and holds new ones back until this refresh commits, so an event committed
    -- late can never fall between the recompute below and the removal of its day's mark.
    LOCK TABLE events_daily_dirty IN SHARE MODE;
    IF p_full THEN
        DELETE FROM events_daily_dirty;
        SELECT coalesce(array_agg(DISTINCT ("timestamp" AT TIME ZONE 'UTC')::date), '{}')
          INTO days FROM events_v2;
        DELETE FROM events_daily;
    ELSE
        WITH taken AS (DELETE FROM events_daily_dirty RETURNING day)
        SELECT coalesce(array_agg(day), '{}') INTO days FROM taken;
        DELETE FROM events_daily WHERE day = ANY (days);
    END IF;

    INSERT INTO events_daily (day, user_id, event_type, aggregate_type, event_count, unique_aggregates)
    SELECT ("timestamp" AT TIME ZONE 'UTC')::date, user_id, event_type, aggregate_type,
           count(*), count(DISTINCT aggregate_id)
    FROM events_v2 e
    JOIN unnest(days) AS d(day)
      ON e."timestamp" >= d.day::timestamp AT TIME ZONE 'UTC'
     AND e."timestamp" <  (d.day + 1)::timestamp AT TIME ZONE 'UTC'
    GROUP BY 1, 2, 3, 4;

    RETURN cardinality(days);
END
$$;
