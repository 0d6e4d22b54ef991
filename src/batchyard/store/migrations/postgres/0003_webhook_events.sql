-- The PostgreSQL twin of migrations/sqlite/0003_webhook_events.sql: the outbox of batch webhooks, one event per batch
-- that reached a final status, written in the transaction that made it final.
CREATE TABLE webhook_events (
    seq          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id           TEXT NOT NULL UNIQUE,
    batch_id     TEXT NOT NULL UNIQUE,
    owner        TEXT NOT NULL,
    type         TEXT NOT NULL,
    created_at   BIGINT NOT NULL,
    status       TEXT NOT NULL DEFAULT 'pending',
    attempts     INTEGER NOT NULL DEFAULT 0,
    next_at      DOUBLE PRECISION NOT NULL,
    lease_owner  TEXT,
    lease_until  DOUBLE PRECISION,
    last_error   TEXT
);
CREATE INDEX webhook_events_due ON webhook_events (status, next_at);
