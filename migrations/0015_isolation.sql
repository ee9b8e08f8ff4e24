-- User isolation, completed (docs/reliability.md, "Threat model").
--
-- From here on, migrations in this folder change tables only. Functions, policies and grants are
-- defined once, in migrations/repeatable/, and re-applied whenever one of those files changes.

-- On Citus the changes to distributed tables come first, over one connection per worker, and
-- each runs as a statement of its own (inside DO blocks: Citus cannot pass a distributed table's
-- DDL on to the workers from a string of several commands, as the migration runner sends a file).
DO $$
BEGIN
    IF (SELECT value FROM synap_settings WHERE key = 'storage_mode') = 'citus' THEN
        PERFORM set_config('citus.multi_shard_modify_mode', 'sequential', true);
    END IF;
END
$$;

-- 1. Each stream row records the transaction that created it. A snapshot folded in one
--    transaction and stored in a later one is stored only if the stream it folded is still the
--    one with that id (retention may remove a deleted aggregate and another user may create the
--    same id again in between). Rows from before this migration have none; a stream created
--    later always has one, so the two are never taken for each other.
DO $$
BEGIN
    ALTER TABLE event_streams ADD COLUMN IF NOT EXISTS created_txid xid8;
    ALTER TABLE event_streams ALTER COLUMN created_txid SET DEFAULT pg_current_xact_id();
END
$$;

-- 2. A snapshot's user is the one user whose events it folded. A snapshot of a stream that holds
--    several users' events has none: only the owner reads it (unscoped replays, retention).
DO $$
BEGIN
    ALTER TABLE event_snapshots ALTER COLUMN user_id DROP NOT NULL;
END
$$;

-- 2b. A snapshot's state keeps its keys in the order the fold made them, as a replay from the
--     first version gives them (jsonb sorts keys: shorter first). States stored before keep
--     jsonb's order.
DO $$
BEGIN
    ALTER TABLE event_snapshots ALTER COLUMN state TYPE json USING state::json;
END
$$;

-- 3. The id registry names each event's user, so that the same policy as events_v2 can hold
--    it: an application role with no user set read every event's id, aggregate and version.
--    Rows of events still stored take their event's user; ids whose events are gone, their
--    stream's; the rest stay NULL, which no user's policy matches (only the owner sees them).
--    Every new row names its user (the CHECK holds for new rows; NOT VALID spares the rest).
ALTER TABLE events_v2_ids ADD COLUMN IF NOT EXISTS user_id text;
CREATE TEMP TABLE synap_id_users AS
    SELECT id, aggregate_id, version, user_id FROM events_v2;
UPDATE events_v2_ids i SET user_id = u.user_id
  FROM synap_id_users u
 WHERE i.user_id IS NULL AND u.id = i.id AND u.aggregate_id = i.aggregate_id AND u.version = i.version;
CREATE TEMP TABLE synap_stream_users AS
    SELECT aggregate_id, user_id FROM event_streams;
UPDATE events_v2_ids i SET user_id = s.user_id
  FROM synap_stream_users s
 WHERE i.user_id IS NULL AND s.aggregate_id = i.aggregate_id;
DROP TABLE synap_id_users, synap_stream_users;
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_constraint
                    WHERE conrelid = 'events_v2_ids'::regclass AND conname = 'events_v2_ids_user_check') THEN
        ALTER TABLE events_v2_ids ADD CONSTRAINT events_v2_ids_user_check CHECK (user_id IS NOT NULL) NOT VALID;
    END IF;
END
$$;

-- 4. One policy per command where there was one for all (migrations/repeatable/90_security.sql
--    creates them): an application role that is granted more than the README's grants still
--    changes and removes no event and writes no snapshot. Until they exist, those tables refuse
--    every row to every role but the owner. The partitions and chunks of events_v2 keep row-level
--    security with no policy at all: a role that names one directly reads and writes nothing
--    (through events_v2, events_v2's policies hold).
DO $$
DECLARE
    part regclass;
BEGIN
    DROP POLICY IF EXISTS events_v2_user_isolation ON events_v2;
    DROP POLICY IF EXISTS event_streams_user_isolation ON event_streams;
    DROP POLICY IF EXISTS event_snapshots_user_isolation ON event_snapshots;
    FOR part IN
        SELECT p.polrelid::regclass FROM pg_policy p JOIN pg_inherits i ON i.inhrelid = p.polrelid
         WHERE i.inhparent = 'events_v2'::regclass AND p.polname = 'events_v2_user_isolation'
    LOOP
        EXECUTE format('DROP POLICY events_v2_user_isolation ON %s', part);
    END LOOP;
END
$$;

-- 5. Row-level security on every table of the store. The tables the application role writes
--    get their policies in migrations/repeatable/90_security.sql; on the others it stays
--    without a policy, so a role that is granted them anyway (GRANT ... ON ALL TABLES IN SCHEMA)
--    still reads and writes nothing. The owner bypasses it (enabled, not forced).
DO $$
DECLARE
    t regclass;
BEGIN
    FOR t IN
        SELECT c.oid::regclass FROM pg_class c
         WHERE c.relnamespace = (SELECT oid FROM pg_namespace WHERE nspname = current_schema())
           AND c.relkind IN ('r', 'p')
           AND NOT c.relispartition
           AND c.relname IN ('synap_settings', 'events_v2_ids', 'events_daily', 'events_daily_dirty',
                             'events_v2_feed_days', 'event_consumers', 'event_snapshots',
                             'synap_application_roles', 'legacy_migration_map', 'legacy_migration_failures',
                             'legacy_migration_runs', 'consumer_groups', 'consumer_group_partitions',
                             'consumer_group_members', 'consumer_group_parked', 'synap_migrations')
    LOOP
        EXECUTE format('ALTER TABLE %s ENABLE ROW LEVEL SECURITY', t);
    END LOOP;
END
$$;
