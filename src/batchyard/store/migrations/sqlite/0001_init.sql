CREATE TABLE files (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    id          TEXT NOT NULL UNIQUE,
    owner       TEXT NOT NULL,
    bytes       INTEGER NOT NULL,
    created_at  INTEGER NOT NULL,
    expires_at  INTEGER,
    filename    TEXT NOT NULL,
    purpose     TEXT NOT NULL,
    status      TEXT NOT NULL,
    blob_key    TEXT NOT NULL,
    sha256      TEXT NOT NULL,
    deleted     INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX files_owner_seq ON files (owner, seq);

CREATE TABLE batches (
    seq                  INTEGER PRIMARY KEY AUTOINCREMENT,
    id                   TEXT NOT NULL UNIQUE,
    owner                TEXT NOT NULL,
    endpoint             TEXT NOT NULL,
    input_file_id        TEXT NOT NULL,
    completion_window    TEXT NOT NULL,
    status               TEXT NOT NULL,
    created_at           INTEGER NOT NULL,
    expires_at           INTEGER NOT NULL,
    metadata             TEXT,
    output_expires_after INTEGER,
    model                TEXT,
    output_file_id       TEXT,
    error_file_id        TEXT,
    in_progress_at       INTEGER,
    finalizing_at        INTEGER,
    completed_at         INTEGER,
    failed_at            INTEGER,
    expired_at           INTEGER,
    cancelling_at        INTEGER,
    cancelled_at         INTEGER,
    errors               TEXT,
    total                INTEGER NOT NULL DEFAULT 0,
    planned              INTEGER NOT NULL DEFAULT 0,
    job_owner            TEXT,
    job_lease_until      REAL
);
CREATE INDEX batches_owner_seq ON batches (owner, seq);
CREATE INDEX batches_status ON batches (status);

CREATE TABLE shards (
    batch_id          TEXT NOT NULL,
    idx               INTEGER NOT NULL,
    start_off         INTEGER NOT NULL,
    end_off           INTEGER NOT NULL,
    first_line        INTEGER NOT NULL,
    line_count        INTEGER NOT NULL,
    status            TEXT NOT NULL DEFAULT 'pending',
    attempt           INTEGER NOT NULL DEFAULT 0,
    lease_owner       TEXT,
    lease_until       REAL,
    completed         INTEGER NOT NULL DEFAULT 0,
    failed            INTEGER NOT NULL DEFAULT 0,
    expired           INTEGER NOT NULL DEFAULT 0,
    input_tokens      INTEGER NOT NULL DEFAULT 0,
    cached_tokens     INTEGER NOT NULL DEFAULT 0,
    output_tokens     INTEGER NOT NULL DEFAULT 0,
    reasoning_tokens  INTEGER NOT NULL DEFAULT 0,
    out_key           TEXT,
    err_key           TEXT,
    PRIMARY KEY (batch_id, idx)
);
CREATE INDEX shards_open ON shards (status, lease_until) WHERE status != 'done';
