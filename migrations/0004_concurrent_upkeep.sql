-- Fixes to two functions of 0001 (forward-only: 0001 stays as it was applied).
--   synap_ensure_partitions: an advisory lock so that two callers (two processes running
--     migrate() or maintain()) cannot race on CREATE TABLE, and a lock on events_v2 while a day's
--     rows move out of the default partition, so that a concurrent insert cannot land there
--     between the move and ATTACH (which then failed).
--   refresh_events_daily: SHARE ROW EXCLUSIVE instead of SHARE on events_daily_dirty, so that
--     two concurrent refreshes queue instead of deadlocking.

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
            -- Inserts wait while the day's rows move out of the default partition; without the
            -- lock, one landing there between the move and ATTACH would make ATTACH fail.
            LOCK TABLE events_v2 IN SHARE ROW EXCLUSIVE MODE;
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

CREATE OR REPLACE FUNCTION refresh_events_daily(p_full boolean DEFAULT false)
RETURNS integer
LANGUAGE plpgsql
AS $$
DECLARE
    days date[];
BEGIN
    -- Appends mark days with INSERT ... ON CONFLICT DO NOTHING, which holds ROW EXCLUSIVE
    -- on events_daily_dirty until the append commits. SHARE ROW EXCLUSIVE waits for those
    -- in-flight appends and holds new ones back until this refresh commits, so an event
    -- committed late can never fall between the recompute below and the removal of its day's
    -- mark; unlike SHARE it also excludes a second refresh, which would otherwise deadlock.
    LOCK TABLE events_daily_dirty IN SHARE ROW EXCLUSIVE MODE;
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
