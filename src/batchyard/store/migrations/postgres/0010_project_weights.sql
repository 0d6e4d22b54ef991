-- The PostgreSQL twin of migrations/sqlite/0010_project_weights.sql: a project's fair-share weight.
ALTER TABLE projects ADD COLUMN weight DOUBLE PRECISION NOT NULL DEFAULT 1.0;
-- When a shard's attempt started and when the shard was done (admission control's measured throughput).
ALTER TABLE shards ADD COLUMN started_at DOUBLE PRECISION;
ALTER TABLE shards ADD COLUMN done_at DOUBLE PRECISION;
CREATE INDEX shards_done ON shards (done_at);
