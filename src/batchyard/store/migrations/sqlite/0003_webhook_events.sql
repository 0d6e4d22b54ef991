CREATE TABLE webhook_events (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    id           TEXT NOT NULL UNIQUE,
    batch_id     TEXT NOT NULL UNIQUE,
    owner        TEXT NOT NULL,
    type         TEXT NOT NULL,
    created_at   INTEGER NOT NULL,
    status       TEXT NOT NULL DEFAULT 'pending',
    attempts     INTEGER NOT NULL DEFAULT 0,
    next_at      REAL NOT NULL,
    lease_owner  TEXT,
    lease_until  REAL,
    last_error   TEXT
);
CREATE INDEX webhook_events_due ON webhook_events (status, next_at);
