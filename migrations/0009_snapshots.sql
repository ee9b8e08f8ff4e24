-- Snapshots: an aggregate's folded state at a version, so that a replay folds only the events
-- after it, and so that retention can drop old partitions or chunks without losing a live
-- aggregate's state.

-- One row per aggregate, fold rules and version. `rules` names the fold rules that made the
-- state (the fold's version and its bookkeeping options); a replay with other rules never uses
-- it. `max_timestamp` is the latest timestamp among the events folded into it: a replay "as of"
-- a time may start from the snapshot only when that time is not before it.
CREATE TABLE IF NOT EXISTS event_snapshots (
    aggregate_id   uuid        NOT NULL,
    rules          text        NOT NULL,
    version        integer     NOT NULL CHECK (version >= 1),
    user_id        text        NOT NULL,
    state          jsonb       NOT NULL,
    deleted        boolean     NOT NULL,
    last_timestamp timestamptz NOT NULL,
    max_timestamp  timestamptz NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (aggregate_id, rules, version)
);

-- Snapshots hold the user's data: the same isolation as events_v2.
ALTER TABLE event_snapshots ENABLE ROW LEVEL SECURITY;
DROP POLICY IF EXISTS event_snapshots_user_isolation ON event_snapshots;
CREATE POLICY event_snapshots_user_isolation ON event_snapshots
    USING (user_id = current_setting('app.current_user_id', true))
    WITH CHECK (user_id = current_setting('app.current_user_id', true));

-- The first version still stored. Retention that drops an aggregate's oldest events keeps a
-- snapshot of the state they made and moves this past them; reads of the removed versions are
-- refused (HISTORY_REMOVED) instead of returning a stream with its start missing.
ALTER TABLE event_streams ADD COLUMN IF NOT EXISTS retained_from integer NOT NULL DEFAULT 1;

-- What an application role needs now includes the snapshots; roles granted before are granted
-- them here.
CREATE OR REPLACE FUNCTION synap_grant_application_role(p_role name)
RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
    EXECUTE format('GRANT USAGE ON SCHEMA %I TO %I', current_schema(), p_role);
    EXECUTE format('GRANT SELECT, INSERT ON events_v2, events_daily_dirty, events_v2_feed_days, events_v2_ids, event_snapshots TO %I', p_role);
    EXECUTE format('GRANT SELECT, INSERT, UPDATE ON event_streams, event_consumers TO %I', p_role);
    EXECUTE format('GRANT USAGE ON SEQUENCE events_v2_position_seq TO %I', p_role);
    INSERT INTO synap_application_roles (role_name) VALUES (p_role) ON CONFLICT DO NOTHING;
END
$$;
SELECT synap_grant_application_role(role_name) FROM synap_application_roles;
