-- Bookkeeping of the switch-over from the legacy `events` table to events_v2.
--
-- legacy_migration_map: one row per legacy row that has an event in events_v2, written in the
-- same transaction as that event, so a re-run or a resume after a crash never copies a row twice.
-- origin 'migration' rows were copied by migrate-events (a new event id); origin 'dual_write' rows
-- were written by a repository with dual-write on (the same id in both tables).
CREATE TABLE IF NOT EXISTS legacy_migration_map (
    legacy_table text        NOT NULL,
    legacy_id    uuid        NOT NULL,
    event_id     uuid        NOT NULL,
    aggregate_id uuid        NOT NULL,
    version      integer     NOT NULL,
    origin       text        NOT NULL CHECK (origin IN ('migration', 'dual_write')),
    recorded_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (legacy_table, legacy_id)
);

-- Legacy rows that could not be migrated, with why. A resume does not retry them; verify lists them.
CREATE TABLE IF NOT EXISTS legacy_migration_failures (
    legacy_table text        NOT NULL,
    legacy_id    uuid        NOT NULL,
    reason_code  text        NOT NULL,
    reason       text        NOT NULL,
    failed_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (legacy_table, legacy_id)
);

-- One row per legacy table: totals and the last row reached, updated by every batch's transaction.
CREATE TABLE IF NOT EXISTS legacy_migration_runs (
    legacy_table   text        PRIMARY KEY,
    started_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    finished_at    timestamptz,
    migrated       bigint      NOT NULL DEFAULT 0,
    failed         bigint      NOT NULL DEFAULT 0,
    last_timestamp timestamptz,
    last_id        uuid
);
