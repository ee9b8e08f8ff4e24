-- Erasure (docs/erasure.md): the refusal of appends of a user being erased, and of appends to a
-- stream that was deleted for good.
--
-- Repeatable: applied after the versioned migrations whenever a file in this folder changes
-- (docs/schema.md, "Migrations"); every statement is idempotent.

-- Refuses a statement that registers events of a user listed in synap_erasures (SQLSTATE SY001),
-- or of a stream with a tombstone (SY002). Every append
-- path registers its events' ids in events_v2_ids (single appends, batches, the legacy
-- migration's writers, the citus mode's routed append), and the table stays on the coordinator
-- on Citus, where a distributed table may have no trigger; so one trigger here covers every
-- path and every storage mode. Per statement, over the statement's new rows: an append pays one
-- look at a table that is empty unless an erasure is running.
--
-- VOLATILE (the default): each query sees what committed before it started, so an erasure's
-- row is seen by every append statement that starts after it commits. eraseUser waits for the
-- transactions already running then to end before it deletes anything: an append either ended
-- before the deletion (its events are erased) or is refused here.
--
-- SECURITY DEFINER: the application role may not read synap_erasures.
CREATE OR REPLACE FUNCTION synap_refuse_erased_users()
RETURNS trigger
LANGUAGE plpgsql VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, :"store_schema", pg_temp
AS $$
DECLARE
    erased text;
    deleted uuid;
BEGIN
    IF EXISTS (SELECT 1 FROM event_stream_tombstones) THEN
        SELECT t.aggregate_id INTO deleted
          FROM event_stream_tombstones t
         WHERE t.aggregate_id IN (SELECT n.aggregate_id FROM synap_new_ids n)
         LIMIT 1;
        IF FOUND THEN
            RAISE EXCEPTION 'stream % was deleted: its id cannot be used again', deleted
                  USING ERRCODE = 'SY002';
        END IF;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM synap_erasures) THEN
        RETURN NULL;
    END IF;
    SELECT e.user_id INTO erased
      FROM synap_erasures e
     WHERE e.user_id IN (SELECT n.user_id FROM synap_new_ids n)
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'user "%" is being erased: the store refuses the user''s appends until the erasure ends', erased
              USING ERRCODE = 'SY001';
    END IF;
    RETURN NULL;
END
$$;

CREATE OR REPLACE TRIGGER events_v2_ids_refuse_erased
    AFTER INSERT ON events_v2_ids
    REFERENCING NEW TABLE AS synap_new_ids
    FOR EACH STATEMENT EXECUTE FUNCTION synap_refuse_erased_users();

-- Whether a stream was deleted for good, whoever it belonged to: an append whose guard failed
-- on a stream it cannot see tells STREAM_DELETED from a conflict. Reveals nothing else.
-- SECURITY DEFINER: the application role may not read event_stream_tombstones.
CREATE OR REPLACE FUNCTION synap_stream_deleted(p_aggregate_id uuid)
RETURNS boolean
LANGUAGE plpgsql STABLE
SECURITY DEFINER
SET search_path = pg_catalog, :"store_schema", pg_temp
AS $$
BEGIN
    RETURN EXISTS (SELECT 1 FROM event_stream_tombstones WHERE aggregate_id = p_aggregate_id);
END
$$;
