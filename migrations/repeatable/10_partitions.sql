-- Partitions and chunks of events_v2: created ahead (native and citus modes) and given the
-- user policy as they appear (every mode).
--
-- Repeatable: applied after the versioned migrations whenever a file in this folder changes
-- (docs/schema.md, "Migrations"); every statement is idempotent.

-- Daily partitions for the native and citus modes: creates the missing ones in [p_from, p_to],
-- moving any rows that the default partition already holds for those days, and secures them.
-- Returns how many it created. A no-op on TimescaleDB, whose chunks are created on insert.
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

-- Row-level security on every child of events_v2 (native partition or TimescaleDB chunk) that
-- lacks it, with no policy: a child named directly is a table of its own (TimescaleDB copies the
-- hypertable's GRANTs to its chunks), and with no policy no role but the owner reads or writes a
-- row of it, whatever it is granted. Reads and writes through events_v2 are held by events_v2's
-- own policies (PostgreSQL applies the parent's there). Returns how many it secured.
--
-- SECURITY DEFINER: a chunk is created by whichever role's insert needs it (the application
-- role's, usually), and only the owner may alter it. EXECUTE is the owner's alone; the trigger
-- below calls it for the application role. Like every definer function of the store, it sets its own
-- search_path: pg_catalog first, pg_temp last (see 90_security.sql).
CREATE OR REPLACE FUNCTION synap_secure_partitions()
RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, :"store_schema", pg_temp
AS $$
DECLARE
    part    regclass;
    secured integer := 0;
BEGIN
    FOR part IN
        SELECT i.inhrelid::regclass
          FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
         WHERE i.inhparent = 'events_v2'::regclass AND NOT c.relrowsecurity
    LOOP
        EXECUTE format('ALTER TABLE %s ENABLE ROW LEVEL SECURITY', part);
        secured := secured + 1;
    END LOOP;
    RETURN secured;
END
$$;

-- A new row in the feed index (events_v2_feed_days) means a statement wrote into a
-- (bucket, day) for the first time: the only moment a chunk can have been created. Rare (a
-- day's first write in each 65,536 transaction ids), so the scan of events_v2's children costs
-- nothing on the common path. Fired by the deferred constraint trigger events_v2_feed_days_secure
-- (migration 0006) at the end of the writing transaction, before its commit makes the chunk
-- visible to anyone else.
--
-- SECURITY DEFINER: see synap_secure_partitions.
CREATE OR REPLACE FUNCTION synap_feed_days_secure()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, :"store_schema", pg_temp
AS $$
BEGIN
    IF (SELECT value FROM synap_settings WHERE key = 'storage_mode') = 'timescaledb' THEN
        PERFORM synap_secure_partitions();
    END IF;
    RETURN NULL;
END
$$;
