-- Idempotency-Key on POST /v1/files, /v1/uploads, /v1/batches (domain/idempotency.py): one row per (owner, key),
-- inserted before the object is created (the unique key decides which of racing requests creates it), naming the
-- object and a hash of the request's parameters. A row older than 24 h is replaced by the next claim of its key.
-- Independent of 0007 (applied in any order).
CREATE TABLE idempotency_keys (
    owner        TEXT NOT NULL,
    key          TEXT NOT NULL,
    route        TEXT NOT NULL,
    fingerprint  TEXT NOT NULL,
    object_id    TEXT NOT NULL,
    created_at   BIGINT NOT NULL,
    PRIMARY KEY (owner, key)
);
CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at);
-- Per-outcome counts of a committed shard (request_counts' extension fields; `expired` is 0004's): lines that ended
-- `batch_cancelled`, and lines the upstream answered with a non-2xx status.
ALTER TABLE shards ADD COLUMN cancelled INTEGER NOT NULL DEFAULT 0;
ALTER TABLE shards ADD COLUMN upstream_failed INTEGER NOT NULL DEFAULT 0;
