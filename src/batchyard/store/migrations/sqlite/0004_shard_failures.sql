-- A shard attempt that fails for a reason other than a lost lease is counted (failures) with its error
-- (last_error); one paused because a dependency is down (storage, database) is not claimed before retry_at.
ALTER TABLE shards ADD COLUMN failures INTEGER NOT NULL DEFAULT 0;
ALTER TABLE shards ADD COLUMN last_error TEXT;
ALTER TABLE shards ADD COLUMN retry_at REAL;
