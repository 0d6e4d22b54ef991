CREATE TABLE uploads (
    seq                 INTEGER PRIMARY KEY AUTOINCREMENT,
    id                  TEXT NOT NULL UNIQUE,
    owner               TEXT NOT NULL,
    filename            TEXT NOT NULL,
    purpose             TEXT NOT NULL,
    bytes               INTEGER NOT NULL,
    mime_type           TEXT NOT NULL,
    status              TEXT NOT NULL,
    created_at          INTEGER NOT NULL,
    expires_at          INTEGER NOT NULL,
    file_expires_after  INTEGER,
    file_id             TEXT
);

CREATE TABLE upload_parts (
    id          TEXT NOT NULL PRIMARY KEY,
    upload_id   TEXT NOT NULL,
    bytes       INTEGER NOT NULL,
    blob_key    TEXT NOT NULL,
    created_at  INTEGER NOT NULL
);
CREATE INDEX upload_parts_upload ON upload_parts (upload_id);
