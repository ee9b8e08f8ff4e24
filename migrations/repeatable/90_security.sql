-- Who may do what (docs/reliability.md, "Threat model"): the user policy on every table that
-- holds a user's rows, the application role's grants, and the rights of every SECURITY DEFINER
-- function. Applied last: it hardens the functions the other files define.
--
-- Repeatable: applied after the versioned migrations whenever a file in this folder changes
-- (docs/schema.md, "Migrations"); every statement is idempotent.

-- Row-level security keyed on current_setting('app.current_user_id', true), which a user-scoped
-- handle (forUser) sets with SET LOCAL inside each transaction, so that a pooled connection never
-- carries one user's setting into another's query. Without the setting a role under row-level
-- security sees and writes no row. The tables' owner bypasses it (enabled, not forced).
--
-- Enables row-level security on a table and gives it the user policy for each command the
-- application role may run on it (SELECT, INSERT, UPDATE), one policy per command, named
-- <table>_user_<command>; a command without a policy is refused to every role but the owner,
-- whatever it is granted. A policy of that name that exists is left as it is: its text is written
-- here only, and a change to it needs a versioned migration that drops the policies first.
CREATE OR REPLACE FUNCTION synap_isolate_user_rows(p_table regclass, p_name text, p_commands text[])
RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
    command text;
    policy  text;
    mine    constant text := $e$user_id = current_setting('app.current_user_id', true)$e$;
BEGIN
    EXECUTE format('ALTER TABLE %s ENABLE ROW LEVEL SECURITY', p_table);
    FOREACH command IN ARRAY p_commands LOOP
        policy := p_name || '_user_' || lower(command);
        CONTINUE WHEN EXISTS (SELECT 1 FROM pg_policy WHERE polrelid = p_table AND polname = policy);
        EXECUTE format('CREATE POLICY %I ON %s FOR %s %s', policy, p_table, command,
            CASE command
                WHEN 'SELECT' THEN format('USING (%s)', mine)
                WHEN 'INSERT' THEN format('WITH CHECK (%s)', mine)
                WHEN 'UPDATE' THEN format('USING (%s) WITH CHECK (%s)', mine, mine)
            END);
    END LOOP;
END
$$;
REVOKE ALL ON FUNCTION synap_isolate_user_rows(regclass, text, text[]) FROM PUBLIC;

-- The tables with a user's rows: the application role reads its user's rows, appends events (with
-- their ids and streams) and advances its user's streams. Nothing else: it changes or removes no
-- event, and snapshots are the owner's to write. Every partition and chunk of events_v2 has
-- row-level security and no policy (synap_secure_partitions): it is reached through events_v2.
SELECT synap_isolate_user_rows('events_v2', 'events_v2', ARRAY['SELECT', 'INSERT']);
SELECT synap_isolate_user_rows('events_v2_ids', 'events_v2_ids', ARRAY['SELECT', 'INSERT']);
SELECT synap_isolate_user_rows('event_streams', 'event_streams', ARRAY['SELECT', 'INSERT', 'UPDATE']);
SELECT synap_isolate_user_rows('event_snapshots', 'event_snapshots', ARRAY['SELECT']);
SELECT synap_secure_partitions();

-- Two tables hold no user's data and are written by every append: the days that need an
-- analytics refresh (UTC days, which an append adds with ON CONFLICT DO NOTHING: that reads the
-- row it conflicts with) and the feed's day index (bucket, day, transaction id: read by every
-- writer, which adds a row only when it sees none). Every other table keeps row-level security
-- without a policy (migration 0015): no role but the owner reads or writes it, whatever it is
-- granted.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_policy WHERE polrelid = 'events_daily_dirty'::regclass
                                             AND polname = 'events_daily_dirty_read') THEN
        CREATE POLICY events_daily_dirty_read ON events_daily_dirty FOR SELECT USING (true);
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_policy WHERE polrelid = 'events_daily_dirty'::regclass
                                             AND polname = 'events_daily_dirty_mark') THEN
        CREATE POLICY events_daily_dirty_mark ON events_daily_dirty FOR INSERT WITH CHECK (true);
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_policy WHERE polrelid = 'events_v2_feed_days'::regclass
                                             AND polname = 'events_v2_feed_days_read') THEN
        CREATE POLICY events_v2_feed_days_read ON events_v2_feed_days FOR SELECT USING (true);
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_policy WHERE polrelid = 'events_v2_feed_days'::regclass
                                             AND polname = 'events_v2_feed_days_record') THEN
        CREATE POLICY events_v2_feed_days_record ON events_v2_feed_days FOR INSERT WITH CHECK (true);
    END IF;
END
$$;

-- Every SECURITY DEFINER function of the store sets a search_path of its own in its definition,
-- pg_catalog first and pg_temp last (`SET search_path = pg_catalog, :"store_schema", pg_temp`;
-- the migration runner writes the store's schema in for `:"store_schema"`), so that no object of
-- the caller's (a temporary table named pg_class or synap_settings, say) can stand in for the
-- catalog's or the store's: PostgreSQL otherwise searches the caller's temporary schema first
-- ("Writing SECURITY DEFINER Functions Safely"). The loop below is the net for one that forgets
-- (it gets the same setting), and takes EXECUTE from PUBLIC; synap_grant_application_role gives
-- application roles the ones they call. A test lists them from pg_proc (core/tests/isolation.rs).
-- Functions of an extension installed in the schema are its own, and left alone.
DO $$
DECLARE
    f regprocedure;
BEGIN
    FOR f IN
        SELECT p.oid::regprocedure FROM pg_proc p
         WHERE p.pronamespace = (SELECT oid FROM pg_namespace WHERE nspname = current_schema())
           AND p.prosecdef
           AND NOT EXISTS (SELECT 1 FROM pg_depend d
                            WHERE d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e')
         ORDER BY p.oid::regprocedure::text
    LOOP
        EXECUTE format('ALTER FUNCTION %s SET search_path = pg_catalog, %I, pg_temp', f, current_schema());
        EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', f);
    END LOOP;
END
$$;

-- What an application role needs for user-scoped handles, in one call (run by the tables'
-- owner, in their schema):
--   SELECT synap_grant_application_role('app');
-- The role's rights on the store's tables are first taken back, then given: running it again
-- (this file does, for every role recorded in synap_application_roles) brings a role granted by
-- an earlier release to exactly this set. Projections, consumer groups, upkeep, the legacy
-- migration and retention run as the owner.
CREATE OR REPLACE FUNCTION synap_grant_application_role(p_role name)
RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['synap_settings', 'synap_migrations', 'synap_repeatable_migrations',
                             'synap_application_roles', 'events_v2', 'events_v2_position_seq', 'event_streams',
                             'events_v2_ids', 'event_snapshots', 'events_daily', 'events_daily_dirty',
                             'events_v2_feed_days', 'event_consumers', 'legacy_migration_map',
                             'legacy_migration_failures', 'legacy_migration_runs', 'consumer_groups',
                             'consumer_group_partitions', 'consumer_group_members', 'consumer_group_parked',
                             'synap_erasures', 'synap_erasure_rewrites', 'event_stream_tombstones'] LOOP
        IF to_regclass(quote_ident(t)) IS NOT NULL THEN
            EXECUTE format('REVOKE ALL ON %I FROM %I', t, p_role);
        END IF;
    END LOOP;
    EXECUTE format('GRANT USAGE ON SCHEMA %I TO %I', current_schema(), p_role);
    -- Under the user policy.
    EXECUTE format('GRANT SELECT, INSERT ON events_v2, events_v2_ids TO %I', p_role);
    EXECUTE format('GRANT SELECT, INSERT, UPDATE ON event_streams TO %I', p_role);
    EXECUTE format('GRANT SELECT ON event_snapshots TO %I', p_role);
    -- No user's data (see the policies above).
    EXECUTE format('GRANT SELECT, INSERT ON events_daily_dirty, events_v2_feed_days TO %I', p_role);
    EXECUTE format('GRANT USAGE ON SEQUENCE events_v2_position_seq TO %I', p_role);
    -- The definer functions that scoped appends and feed reads call.
    EXECUTE format('GRANT EXECUTE ON FUNCTION synap_aggregate_exists(uuid), synap_stream_deleted(uuid), '
                   'synap_feed_identity(), synap_feed_is_current(), synap_feed_fence() TO %I', p_role);
    INSERT INTO synap_application_roles (role_name) VALUES (p_role) ON CONFLICT DO NOTHING;
END
$$;
SELECT synap_grant_application_role(role_name) FROM synap_application_roles
 WHERE EXISTS (SELECT 1 FROM pg_roles WHERE rolname = role_name)
 ORDER BY role_name;
