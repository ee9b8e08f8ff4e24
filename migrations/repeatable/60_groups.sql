-- Consumer groups (docs/reliability.md, "Consumer groups").
--
-- Repeatable: applied after the versioned migrations whenever a file in this folder changes
-- (docs/schema.md, "Migrations"); every statement is idempotent.

-- An aggregate's partition: PostgreSQL's hash of the uuid (the one hash partitioning uses, so it
-- does not change between releases), modulo the group's partition count.
CREATE OR REPLACE FUNCTION synap_group_partition(aggregate_id uuid, partitions integer) RETURNS integer
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
AS $$ SELECT (((uuid_hash_extended(aggregate_id, 0) % partitions) + partitions) % partitions)::integer $$;
