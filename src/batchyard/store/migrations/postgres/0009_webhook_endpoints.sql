-- The PostgreSQL twin of migrations/sqlite/0009_webhook_endpoints.sql: webhook endpoints per project (with the
-- previous secret during a rotation's grace) and every delivery attempt of every event.
CREATE TABLE webhook_endpoints (
    seq              BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id               TEXT NOT NULL UNIQUE,
    owner            TEXT NOT NULL,
    url              TEXT NOT NULL,
    secret           TEXT NOT NULL,
    previous_secret  TEXT,
    previous_until   BIGINT,
    created_at       BIGINT NOT NULL,
    disabled_at      BIGINT
);
CREATE INDEX webhook_endpoints_owner ON webhook_endpoints (owner, seq);
CREATE TABLE webhook_deliveries (
    seq           BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id      TEXT NOT NULL,
    endpoint_id   TEXT NOT NULL,
    attempted_at  DOUBLE PRECISION NOT NULL,
    duration_ms   INTEGER NOT NULL,
    status_code   INTEGER,
    error         TEXT
);
CREATE INDEX webhook_deliveries_event ON webhook_deliveries (event_id, seq);
CREATE INDEX webhook_events_owner ON webhook_events (owner, seq);
