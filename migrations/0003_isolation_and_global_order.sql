-- User isolation with row-level security, and a gap-free global order for projections.

-- Row-level security, keyed like the application's own policies on
-- current_setting('app.current_user_id', true). EventRepository::for_user (Node:
-- eventRepository.forUser) sets it with set_config(..., true), i.e. SET LOCAL, inside each
-- transaction, so a pooled connection never carries one user's setting into another's query.
-- Without the setting a role subject to RLS sees and writes nothing. The tables' owner bypasses
-- RLS (it is enabled, not forced): migrations, the unscoped repository as owner, the CLI.
ALTER TABLE events_v2 ENABLE ROW LEVEL SECURITY;
CREATE POLICY events_v2_user_isolation ON events_v2
    USING (user_id = current_setting('app.current_user_id', true))
    WITH CHECK (user_id = current_setting('app.current_user_id', true));

ALTER TABLE event_streams ENABLE ROW LEVEL SECURITY;
CREATE POLICY event_streams_user_isolation ON event_streams
    USING (user_id = current_setting('app.current_user_id', true))
    WITH CHECK (user_id = current_setting('app.current_user_id', true));

-- Global order. A position is drawn at insert but becomes visible at commit, so reading
-- "position > last" skips an event whose transaction commits after a later one. Each row now
-- records its writing transaction; readers take rows in (txid, position) order and only below
-- pg_snapshot_xmin(pg_current_snapshot()), the oldest transaction still running: every
-- transaction below it has ended, and every one that commits later sorts after what was read.
-- Rows written before this migration get txid 0 (they are all committed).
ALTER TABLE events_v2 ADD COLUMN IF NOT EXISTS txid xid8;
UPDATE events_v2 SET txid = '0'::xid8 WHERE txid IS NULL;
ALTER TABLE events_v2 ALTER COLUMN txid SET DEFAULT pg_current_xact_id();
ALTER TABLE events_v2 ALTER COLUMN txid SET NOT NULL;
CREATE INDEX IF NOT EXISTS events_v2_global_order_idx ON events_v2 (txid, position);

-- Named consumers (projections) keep their checkpoint here.
CREATE TABLE IF NOT EXISTS event_consumers (
    name       text        PRIMARY KEY,
    txid       xid8        NOT NULL,
    position   bigint      NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Subscribers LISTEN on synap_events; one notification per inserting statement (PostgreSQL folds
-- repeats within a transaction), delivered at commit. Polling covers a missed notification.
CREATE OR REPLACE FUNCTION synap_notify_events() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    PERFORM pg_notify('synap_events', '');
    RETURN NULL;
END
$$;
CREATE TRIGGER events_v2_notify
    AFTER INSERT ON events_v2
    FOR EACH STATEMENT EXECUTE FUNCTION synap_notify_events();
