-- Erasure (docs/erasure.md): the bookkeeping of eraseUser. Neither table is distributed on
-- Citus: both stay on the coordinator, beside events_v2_ids, whose trigger reads the first.

-- A user being erased. Appends of the user are refused from the moment the row commits
-- (events_v2_ids's trigger, migrations/repeatable/70_erasure.sql) until the erasure's own
-- transaction removes the row with the user's data. A row left by a run that was killed keeps
-- refusing until the next run of the same erasure completes it.
CREATE TABLE IF NOT EXISTS synap_erasures (
    user_id    text        PRIMARY KEY,
    started_at timestamptz NOT NULL DEFAULT now()
);

-- Relations an erasure deleted rows from and has not yet rewritten: their pages still hold the
-- deleted bytes until VACUUM (FULL) writes them anew. Names only, no user's data; the next
-- erasure rewrites what a killed one left.
CREATE TABLE IF NOT EXISTS synap_erasure_rewrites (
    relation  text        PRIMARY KEY,
    queued_at timestamptz NOT NULL DEFAULT now()
);

-- No policy: no role but the owner reads or writes them (as every table without a user's rows,
-- migration 0015).
ALTER TABLE synap_erasures ENABLE ROW LEVEL SECURITY;
ALTER TABLE synap_erasure_rewrites ENABLE ROW LEVEL SECURITY;
