-- Projects own objects (their id is the `owner` of every file, upload, batch and webhook event made with one of
-- their keys); API keys belong to a project and are stored only as the sha256 of the key, with a short prefix to
-- show (domain/tenancy.py).
CREATE TABLE projects (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    id           TEXT NOT NULL UNIQUE,
    name         TEXT NOT NULL UNIQUE,
    created_at   INTEGER NOT NULL,
    archived_at  INTEGER
);
CREATE TABLE api_keys (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    id           TEXT NOT NULL UNIQUE,
    project_id   TEXT NOT NULL REFERENCES projects (id),
    name         TEXT NOT NULL,
    key_hash     TEXT NOT NULL UNIQUE,
    prefix       TEXT NOT NULL,
    admin        INTEGER NOT NULL DEFAULT 0,
    created_at   INTEGER NOT NULL,
    revoked_at   INTEGER
);
CREATE INDEX api_keys_project ON api_keys (project_id, seq);
