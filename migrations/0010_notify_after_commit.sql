-- Subscribers are woken after the repository's writes commit, not inside them.
--
-- A NOTIFY queued inside a transaction makes its commit take PostgreSQL's database-wide notify
-- lock and hold it through the commit, WAL flush included, so concurrent appends committed one
-- at a time (16 clients appending at once on TimescaleDB with fsync on: 171 ms with the NOTIFY in
-- the trigger, 86 ms without it). The repository's statements mark themselves
-- (synap.feed_days = their transaction id, see 0005) and, once committed, send one pg_notify
-- shared by every commit in flight (EventRepository::wake_subscribers). Inserts from elsewhere
-- still notify here. A notification that never comes (a process that dies between its commit and
-- the pg_notify) costs a subscriber one polling interval, never an event.
CREATE OR REPLACE FUNCTION synap_notify_events() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    IF coalesce(current_setting('synap.feed_days', true), '') <> pg_current_xact_id()::text THEN
        PERFORM pg_notify('synap_events', '');
    END IF;
    PERFORM set_config('synap.feed_days', '', true);
    RETURN NULL;
END
$$;
