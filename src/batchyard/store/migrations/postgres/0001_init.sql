-- The PostgreSQL twin of migrations/sqlite/0001_init.sql: the same tables, columns and indexes. Timestamps the API
-- shows are integer epoch seconds; leases are float epoch seconds on the database clock; metadata and errors are
-- `json` (kept as written: key order survives, unlike jsonb).
CREATE TABLE files (
    seq         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id          TEXT NOT NULL UNIQUE,
    owner       TEXT NOT NULL,
    bytes       BIGINT NOT NULL,
    created_at  BIGINT NOT NULL,
    expires_at  BIGINT,
    filename    TEXT NOT NULL,
    purpose     TEXT NOT NULL,
    status      TEXT NOT NULL,
    blob_key    TEXT NOT NULL,
    sha256      TEXT NOT NULL,
    deleted     BOOLEAN NOT NULL DEFAULT FALSE
);
CREATE INDEX files_owner_seq ON files (owner, seq);

CREATE TABLE batches (
    seq                  BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id                   TEXT NOT NULL UNIQUE,
    owner                TEXT NOT NULL,
    endpoint             TEXT NOT NULL,
    input_file_id        TEXT NOT NULL,
    completion_window    TEXT NOT NULL,
    status               TEXT NOT NULL,
    created_at           BIGINT NOT NULL,
    expires_at           BIGINT NOT NULL,
    metadata             JSON,
    output_expires_after BIGINT,
    model                TEXT,
    output_file_id       TEXT,
    error_file_id        TEXT,
    in_progress_at       BIGINT,
    finalizing_at        BIGINT,
    completed_at         BIGINT,
    failed_at            BIGINT,
    expired_at           BIGINT,
    cancelling_at        BIGINT,
    cancelled_at         BIGINT,
    errors               JSON,
    total                BIGINT NOT NULL DEFAULT 0,
    planned              BOOLEAN NOT NULL DEFAULT FALSE,
    job_owner            TEXT,
    job_lease_until      DOUBLE PRECISION
);
CREATE INDEX batches_owner_seq ON batches (owner, seq);
CREATE INDEX batches_status ON batches (status);

CREATE TABLE shards (
    batch_id          TEXT NOT NULL,
    idx               INTEGER NOT NULL,
    start_off         BIGINT NOT NULL,
    end_off           BIGINT NOT NULL,
    first_line        BIGINT NOT NULL,
    line_count        INTEGER NOT NULL,
    status            TEXT NOT NULL DEFAULT 'pending',
    attempt           INTEGER NOT NULL DEFAULT 0,
    lease_owner       TEXT,
    lease_until       DOUBLE PRECISION,
    completed         BIGINT NOT NULL DEFAULT 0,
    failed            BIGINT NOT NULL DEFAULT 0,
    expired           BIGINT NOT NULL DEFAULT 0,
    input_tokens      BIGINT NOT NULL DEFAULT 0,
    cached_tokens     BIGINT NOT NULL DEFAULT 0,
    output_tokens     BIGINT NOT NULL DEFAULT 0,
    reasoning_tokens  BIGINT NOT NULL DEFAULT 0,
    out_key           TEXT,
    err_key           TEXT,
    PRIMARY KEY (batch_id, idx)
);
CREATE INDEX shards_open ON shards (status, lease_until) WHERE status <> 'done';
