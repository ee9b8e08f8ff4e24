-- Event schema versions (docs/upcasting.md): the version of its type's shape an event's data
-- and metadata follow, as its writer gave it. Existing events are version 1. A constant default
-- adds the column without rewriting the table (PostgreSQL 11 and later), on plain partitions,
-- TimescaleDB chunks and Citus shards alike; the check reads the rows once.

-- The append functions take the schema version; the repeatable migrations create them again
-- with it. The earlier forms go, so that no caller reaches an append that drops it. (First: on
-- Citus a function command cannot follow the parallel DDL below in one transaction.)
DROP FUNCTION IF EXISTS synap_append(uuid, timestamptz, uuid, text, text, text, jsonb, jsonb, integer, uuid, uuid, text);
DROP FUNCTION IF EXISTS synap_append_routed(uuid, timestamptz, uuid, text, text, text, jsonb, jsonb, integer, uuid, uuid, text);

ALTER TABLE events_v2 ADD COLUMN IF NOT EXISTS schema_version integer NOT NULL DEFAULT 1;

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_constraint
                    WHERE conrelid = 'events_v2'::regclass AND conname = 'events_v2_schema_version_check') THEN
        ALTER TABLE events_v2 ADD CONSTRAINT events_v2_schema_version_check CHECK (schema_version >= 1);
    END IF;
END
$$;
