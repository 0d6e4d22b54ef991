-- Webhook endpoints per project (domain/webhooks.py): a project's events go to its live endpoints (and to the
-- --webhook-urls), each delivery signed with the endpoint's secret (kept as given: it must sign), and for a while
-- after a rotation with the previous one too (until `previous_until`). Every attempt to deliver an event to one
-- target is a row of webhook_deliveries (target: an endpoint id, or `global_...` for a --webhook-url); a target took
-- the event when one of its attempts got a 2xx.
CREATE TABLE webhook_endpoints (
    seq              INTEGER PRIMARY KEY AUTOINCREMENT,
    id               TEXT NOT NULL UNIQUE,
    owner            TEXT NOT NULL,
    url              TEXT NOT NULL,
    secret           TEXT NOT NULL,
    previous_secret  TEXT,
    previous_until   INTEGER,
    created_at       INTEGER NOT NULL,
    disabled_at      INTEGER
);
CREATE INDEX webhook_endpoints_owner ON webhook_endpoints (owner, seq);
CREATE TABLE webhook_deliveries (
    seq           INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id      TEXT NOT NULL,
    endpoint_id   TEXT NOT NULL,
    attempted_at  REAL NOT NULL,
    duration_ms   INTEGER NOT NULL,
    status_code   INTEGER,
    error         TEXT
);
CREATE INDEX webhook_deliveries_event ON webhook_deliveries (event_id, seq);
CREATE INDEX webhook_events_owner ON webhook_events (owner, seq);
