-- The PostgreSQL twin of migrations/sqlite/0002_uploads.sql: /v1/uploads and their parts.
CREATE TABLE uploads (
    seq                 BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id                  TEXT NOT NULL UNIQUE,
    owner               TEXT NOT NULL,
    filename            TEXT NOT NULL,
    purpose             TEXT NOT NULL,
    bytes               BIGINT NOT NULL,
    mime_type           TEXT NOT NULL,
    status              TEXT NOT NULL,
    created_at          BIGINT NOT NULL,
    expires_at          BIGINT NOT NULL,
    file_expires_after  BIGINT,
    file_id             TEXT
);

CREATE TABLE upload_parts (
    id          TEXT NOT NULL PRIMARY KEY,
    upload_id   TEXT NOT NULL,
    bytes       BIGINT NOT NULL,
    blob_key    TEXT NOT NULL,
    created_at  BIGINT NOT NULL
);
CREATE INDEX upload_parts_upload ON upload_parts (upload_id);
