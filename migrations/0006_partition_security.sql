-- Row-level security on every partition and chunk of events_v2, and one call that grants an
-- application role what the repository needs.
--
-- The policies of 0003 apply to queries on events_v2. A partition or chunk named directly is a
-- table of its own, with its own privileges and policies: TimescaleDB copies the hypertable's
-- GRANTs to every chunk it creates but not its policies, so a role allowed to read events_v2
-- could read every user's rows from _timescaledb_internal._hyper_1_1_chunk (and a native
-- partition after a GRANT ... ON ALL TABLES IN SCHEMA). From here on every child of events_v2
-- carries the same policy: the ones that exist now, each native partition as it is created, and
-- each chunk as the first statement that writes into it records its day in the feed index
-- (events_v2_feed_days), in the same transaction that created the chunk. Queries on events_v2
-- itself are unchanged: PostgreSQL applies the parent's policies there, not the children's.

-- Enables row-level security with the events_v2 policy on every child that lacks it. Runs with
-- the owner's rights (only the owner may alter the children), whoever wrote the row that called
-- it; search_path is fixed to the schema it was created in.
CREATE OR REPLACE FUNCTION synap_secure_partitions()
RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path FROM CURRENT
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
        EXECUTE format(
            'CREATE POLICY events_v2_user_isolation ON %s
                 USING (user_id = current_setting(''app.current_user_id'', true))
                 WITH CHECK (user_id = current_setting(''app.current_user_id'', true))', part);
        secured := secured + 1;
    END LOOP;
    RETURN secured;
END
$$;
REVOKE ALL ON FUNCTION synap_secure_partitions() FROM PUBLIC;

SELECT synap_secure_partitions();

-- A new row in the feed index means a statement wrote into a (bucket, day) for the first time:
-- the only moment a chunk can have been created. Rare (a day's first write in each 65,536
-- transaction ids), so the scan of events_v2's children costs nothing on the common path.
CREATE OR REPLACE FUNCTION synap_feed_days_secure()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path FROM CURRENT
AS $$
BEGIN
    IF (SELECT value FROM synap_settings WHERE key = 'storage_mode') = 'timescaledb' THEN
        PERFORM synap_secure_partitions();
    END IF;
    RETURN NULL;
END
$$;
-- Deferred to the end of the transaction: a chunk cannot be altered while the statement that
-- created it is still writing into it. It still runs before the commit that makes the chunk
-- visible to anyone else.
CREATE CONSTRAINT TRIGGER events_v2_feed_days_secure
    AFTER INSERT ON events_v2_feed_days
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION synap_feed_days_secure();

-- Native partitions get the policy as they are created. The bounds are also written
-- independently of the session now: they were rendered through the session's DateStyle and
-- TimeZone ('2026-11-23 03:30:00+00' from a DMY session in Asia/Kolkata), so a partition could
-- hold the wrong hours and retention could drop events after its cut-off.
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

-- What an application role needs, in one call (run by the tables' owner in their schema):
--   SELECT synap_grant_application_role('app');
-- Roles granted this way are remembered, and later migrations extend their grants to new tables.
CREATE TABLE IF NOT EXISTS synap_application_roles (
    role_name  name        PRIMARY KEY,
    granted_at timestamptz NOT NULL DEFAULT now()
);

CREATE OR REPLACE FUNCTION synap_grant_application_role(p_role name)
RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
    EXECUTE format('GRANT USAGE ON SCHEMA %I TO %I', current_schema(), p_role);
    EXECUTE format('GRANT SELECT, INSERT ON events_v2, events_daily_dirty, events_v2_feed_days TO %I', p_role);
    EXECUTE format('GRANT SELECT, INSERT, UPDATE ON event_streams, event_consumers TO %I', p_role);
    EXECUTE format('GRANT USAGE ON SEQUENCE events_v2_position_seq TO %I', p_role);
    INSERT INTO synap_application_roles (role_name) VALUES (p_role) ON CONFLICT DO NOTHING;
END
$$;
