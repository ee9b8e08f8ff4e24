-- Erasure (docs/erasure.md): the bookkeeping of eraseUser and deleteStream. No table here is
-- distributed on Citus: they stay on the coordinator, beside events_v2_ids, whose trigger reads
-- them.

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

-- Streams removed by deleteStream({ hard: true }): an append with the id is refused
-- (STREAM_DELETED). The owner's id, so that erasing the owner removes the tombstone too.
CREATE TABLE IF NOT EXISTS event_stream_tombstones (
    aggregate_id uuid        PRIMARY KEY,
    user_id      text        NOT NULL,
    version      integer     NOT NULL,
    deleted_at   timestamptz NOT NULL DEFAULT now()
);

-- No policy: no role but the owner reads or writes them (as every table without a user's rows,
-- migration 0015).
ALTER TABLE synap_erasures ENABLE ROW LEVEL SECURITY;
ALTER TABLE synap_erasure_rewrites ENABLE ROW LEVEL SECURITY;
ALTER TABLE event_stream_tombstones ENABLE ROW LEVEL SECURITY;
