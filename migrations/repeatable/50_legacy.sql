-- The legacy migration's helpers (docs/migration.md).
--
-- Repeatable: applied after the versioned migrations whenever a file in this folder changes
-- (docs/schema.md, "Migrations"); every statement is idempotent.

-- The legacy table's key in the migration's bookkeeping: its schema-qualified name, whatever
-- spelling a caller used (`events` and `public.events` are one table).
CREATE OR REPLACE FUNCTION synap_legacy_table_key(p_table regclass)
RETURNS text
LANGUAGE sql STABLE
AS $$
    SELECT format('%I.%I', n.nspname, c.relname)
      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
     WHERE c.oid = p_table
$$;
