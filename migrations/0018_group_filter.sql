-- A consumer group's filter (docs/reliability.md, "Consumer groups"): the event types, type
-- prefixes and aggregate types its members are handed, as the options name them
-- (`{"eventTypes": [...]}`); `{}` hands out every event, as every group made before did. Every
-- member of a group reads with the group's filter: one joining with another is refused.
ALTER TABLE consumer_groups ADD COLUMN IF NOT EXISTS filter jsonb NOT NULL DEFAULT '{}'::jsonb;
