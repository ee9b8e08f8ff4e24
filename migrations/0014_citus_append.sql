-- The citus storage mode's single-shard append, and a feed fence that asks the workers only when a
-- two-phase transaction may be pending (docs/scale-out.md). A no-op in the other modes.
--
-- The repository's append statement (one statement with data-modifying CTEs) runs on Citus as
-- is, but Citus splits it into subplans: the guard goes to every shard and the transaction
-- commits with two-phase commit. This function runs the same steps as separate statements, each
-- routed by the aggregate's id: the guard and the event's insert reach the one shard that holds
-- the aggregate, on one worker, which commits in one phase. The id index and the analytics'
-- dirty day stay on the coordinator. The row's txid and position come from the coordinator
-- (Citus evaluates the columns' defaults there), so the feed's global (txid, position) order is
-- kept.
--
-- It returns the stored event's timestamp and position, or no row when the guard did not pass
-- (the aggregate is at another version or of another type, or row-level security hides it): the
-- repository then tells which, as it does after the statement. It runs with the caller's rights,
-- so the row-level security policies apply as they do to the statement. The feed's day index is
-- not written: on Citus the feed reads every partition (0013).
DO $citus$
BEGIN
    IF (SELECT value FROM synap_settings WHERE key = 'storage_mode') <> 'citus' THEN
        RETURN;
    END IF;

    CREATE OR REPLACE FUNCTION synap_append_routed(
        p_id uuid, p_timestamp timestamptz, p_aggregate_id uuid, p_aggregate_type text, p_event_type text,
        p_user_id text, p_data jsonb, p_metadata jsonb, p_version integer, p_causation_id uuid,
        p_correlation_id uuid, p_source text)
    RETURNS TABLE ("timestamp" timestamptz, "position" bigint)
    LANGUAGE plpgsql VOLATILE
    AS $f$
    DECLARE
        ts     timestamptz := coalesce(p_timestamp, now());
        passed integer;
    BEGIN
        IF p_version = 1 THEN
            INSERT INTO event_streams (aggregate_id, aggregate_type, user_id, version, first_timestamp, last_timestamp)
            VALUES (p_aggregate_id, p_aggregate_type, p_user_id, 1, ts, ts)
            ON CONFLICT (aggregate_id) DO NOTHING;
        ELSE
            UPDATE event_streams s
               SET version = p_version,
                   first_timestamp = least(s.first_timestamp, ts),
                   last_timestamp = greatest(s.last_timestamp, ts)
             WHERE s.aggregate_id = p_aggregate_id
               AND s.version = p_version - 1
               AND s.aggregate_type = p_aggregate_type;
        END IF;
        GET DIAGNOSTICS passed = ROW_COUNT;
        IF passed = 0 THEN
            RETURN;
        END IF;
        INSERT INTO events_v2_ids (id, aggregate_id, version) VALUES (p_id, p_aggregate_id, p_version);
        INSERT INTO events_v2 AS e (id, "timestamp", aggregate_id, aggregate_type, event_type, user_id, data,
                                    metadata, version, causation_id, correlation_id, source)
        VALUES (p_id, ts, p_aggregate_id, p_aggregate_type, p_event_type, p_user_id, p_data,
                p_metadata, p_version, p_causation_id, p_correlation_id, p_source)
        RETURNING e."timestamp", e.position INTO "timestamp", "position";
        INSERT INTO events_daily_dirty (day) VALUES ((ts AT TIME ZONE 'UTC')::date) ON CONFLICT (day) DO NOTHING;
        RETURN NEXT;
    END
    $f$;

    -- The feed's fence (0013) asks every worker for its pending prepared transactions, on new
    -- connections: about 23 ms a call here. It need not when the coordinator has no record of a
    -- two-phase transaction below the horizon: Citus writes a row in pg_dist_transaction (with
    -- the coordinator's transaction id, outer_xid) in the transaction that prepares on the
    -- workers, and its recovery deletes the row only once no worker holds that transaction
    -- prepared. Single appends commit in one phase and leave no row.
    CREATE OR REPLACE FUNCTION synap_feed_fence()
    RETURNS boolean
    LANGUAGE plpgsql VOLATILE
    SECURITY DEFINER
    SET search_path FROM CURRENT
    AS $f$
    DECLARE
        horizon constant xid8 := pg_snapshot_xmin(pg_current_snapshot());
        pending text[];
        failed  text;
        probe   constant text := $q$SELECT coalesce(string_agg(gid, ','), '') FROM pg_prepared_xacts WHERE gid LIKE 'citus\_%'$q$;
    BEGIN
        IF NOT EXISTS (SELECT 1 FROM pg_dist_transaction WHERE outer_xid IS NULL OR outer_xid < horizon) THEN
            RETURN true;
        END IF;
        LOOP
            SELECT string_agg(format('%s:%s: %s', nodename, nodeport, result), '; ') FILTER (WHERE NOT success),
                   array_agg(format('%s:%s/%s', nodename, nodeport, g)) FILTER (WHERE success AND g <> '')
              INTO failed, pending
              FROM (SELECT r.nodename, r.nodeport, r.success, r.result, g
                      FROM run_command_on_workers(probe) r
                      LEFT JOIN LATERAL unnest(string_to_array(CASE WHEN r.success THEN r.result END, ',')) g ON true) w
             WHERE pending IS NULL OR g IS NULL OR format('%s:%s/%s', nodename, nodeport, g) = ANY (pending);
            IF failed IS NOT NULL THEN
                RAISE EXCEPTION 'the feed cannot tell which transactions the workers still hold: %', failed;
            END IF;
            EXIT WHEN pending IS NULL;
            PERFORM pg_sleep(0.001);
        END LOOP;
        RETURN true;
    END
    $f$;
END
$citus$;
