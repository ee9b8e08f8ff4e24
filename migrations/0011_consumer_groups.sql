-- Consumer groups: several members share one projection of the global feed.
--
-- The feed is split into a fixed number of partitions by aggregate
-- (synap_group_partition), so that one member at a time holds each aggregate's events and hands
-- them out in order. Each partition row is a lease: its owner, the epoch that every takeover
-- increments (a member's writes name the epoch it holds, so a member whose lease was taken
-- writes nothing), when the lease ends, and the partition's checkpoint in the feed's
-- (txid, position) order. Leases are rows, not session advisory locks, so members work through
-- a transaction-mode connection pooler.
CREATE TABLE IF NOT EXISTS consumer_groups (
    name       text        PRIMARY KEY CHECK (length(name) BETWEEN 1 AND 200),
    partitions integer     NOT NULL CHECK (partitions BETWEEN 1 AND 1024),
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS consumer_group_partitions (
    group_name    text        NOT NULL REFERENCES consumer_groups (name) ON DELETE CASCADE,
    partition     integer     NOT NULL,
    owner         text,
    epoch         bigint      NOT NULL DEFAULT 0,
    lease_expires timestamptz,
    txid          xid8        NOT NULL DEFAULT '0',
    position      bigint      NOT NULL DEFAULT 0,
    updated_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (group_name, partition)
);

-- Live members: a member is counted while its row has not expired; the partitions are shared
-- out among the live ones.
CREATE TABLE IF NOT EXISTS consumer_group_members (
    group_name text        NOT NULL REFERENCES consumer_groups (name) ON DELETE CASCADE,
    member     text        NOT NULL,
    expires    timestamptz NOT NULL,
    joined_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (group_name, member)
);

-- Events a group could not handle ('failed', with the error), and the later events of the same
-- aggregate that wait behind them ('waiting'), in feed order. An aggregate with any row here
-- gets its new events queued here too; the partition's owner hands out an aggregate's rows in
-- order once it has no failed one.
CREATE TABLE IF NOT EXISTS consumer_group_parked (
    group_name   text        NOT NULL REFERENCES consumer_groups (name) ON DELETE CASCADE,
    event_id     uuid        NOT NULL,
    partition    integer     NOT NULL,
    aggregate_id uuid        NOT NULL,
    txid         xid8        NOT NULL,
    position     bigint      NOT NULL,
    state        text        NOT NULL CHECK (state IN ('failed', 'waiting')),
    attempts     integer     NOT NULL DEFAULT 0,
    error        text,
    parked_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (group_name, event_id)
);
CREATE INDEX IF NOT EXISTS consumer_group_parked_order_idx
    ON consumer_group_parked (group_name, partition, txid, position);

-- An aggregate's partition: PostgreSQL's hash of the uuid (the one hash partitioning uses, so it
-- does not change between releases), modulo the group's partition count.
CREATE OR REPLACE FUNCTION synap_group_partition(aggregate_id uuid, partitions integer) RETURNS integer
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
AS $$ SELECT (((uuid_hash_extended(aggregate_id, 0) % partitions) + partitions) % partitions)::integer $$;

-- Application roles (synap_grant_application_role, 0006) run consumer groups too.
CREATE OR REPLACE FUNCTION synap_grant_application_role(p_role name)
RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
    EXECUTE format('GRANT USAGE ON SCHEMA %I TO %I', current_schema(), p_role);
    EXECUTE format('GRANT SELECT, INSERT ON events_v2, events_daily_dirty, events_v2_feed_days, events_v2_ids, event_snapshots TO %I', p_role);
    EXECUTE format('GRANT SELECT, INSERT, UPDATE ON event_streams, event_consumers TO %I', p_role);
    EXECUTE format('GRANT USAGE ON SEQUENCE events_v2_position_seq TO %I', p_role);
    EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON consumer_groups, consumer_group_partitions, '
                   'consumer_group_members, consumer_group_parked TO %I', p_role);
    INSERT INTO synap_application_roles (role_name) VALUES (p_role) ON CONFLICT DO NOTHING;
END
$$;
SELECT synap_grant_application_role(role_name) FROM synap_application_roles;
