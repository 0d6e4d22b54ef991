"""The SQL of webhook endpoints and of the delivery log that the SQLite and PostgreSQL stores share (`?`
placeholders; the PostgreSQL store runs `sql.numbered(...)` of each), and their rows -> records."""

from __future__ import annotations

from typing import Any

from batchyard.domain.webhooks import MAX_ATTEMPTS_SHOWN, DeliveryAttempt, WebhookEndpoint
from batchyard.store.rows import EVENT_FIELDS, prefixed

Row = Any  # sqlite3.Row or asyncpg.Record

ENDPOINT_FIELDS = (
    "id", "owner", "url", "secret", "created_at", "previous_secret", "previous_until", "disabled_at"
)  # fmt: skip
ATTEMPT_FIELDS = ("event_id", "endpoint_id", "attempted_at", "duration_ms", "status_code", "error")
ENDPOINT_COLS = ", ".join(ENDPOINT_FIELDS)
ATTEMPT_COLS = ", ".join(ATTEMPT_FIELDS)
EVENT_LOG_COLS = prefixed("e", EVENT_FIELDS)

INSERT_ENDPOINT = f"INSERT INTO webhook_endpoints ({ENDPOINT_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
GET_ENDPOINT = f"SELECT {ENDPOINT_COLS} FROM webhook_endpoints WHERE id = ?"
# The current secret becomes the previous one (signing too until `previous_until`); only a live endpoint rotates.
ROTATE_SECRET = (
    "UPDATE webhook_endpoints SET previous_secret = secret, previous_until = ?, secret = ? "
    "WHERE id = ? AND disabled_at IS NULL"
)
DISABLE_ENDPOINT = "UPDATE webhook_endpoints SET disabled_at = COALESCE(disabled_at, ?) WHERE id = ?"
# The live endpoints of an owner that existed when its event was made: the event's targets besides --webhook-url.
TARGET_ENDPOINTS = (
    f"SELECT {ENDPOINT_COLS} FROM webhook_endpoints "
    "WHERE owner = ? AND disabled_at IS NULL AND created_at <= ? ORDER BY seq"
)
# The targets that took an event: one of their attempts got a 2xx (and no error, such as an answer past the cap).
TOOK_IT = (
    "SELECT DISTINCT endpoint_id FROM webhook_deliveries "
    "WHERE event_id = ? AND status_code >= 200 AND status_code < 300 AND error IS NULL"
)
INSERT_ATTEMPT = f"INSERT INTO webhook_deliveries ({ATTEMPT_COLS}) VALUES (?, ?, ?, ?, ?, ?)"
ATTEMPTS_OF = f"SELECT {ATTEMPT_COLS} FROM webhook_deliveries WHERE event_id = ? ORDER BY seq LIMIT {MAX_ATTEMPTS_SHOWN}"
GET_EVENT = f"SELECT {EVENT_LOG_COLS} FROM webhook_events e WHERE e.id = ? AND e.owner = ?"


def list_endpoints(owner: bool, include_disabled: bool) -> str:
    """Endpoints in creation order: of one owner (its id the first argument) when asked."""
    where = []
    if owner:
        where.append("owner = ?")
    if not include_disabled:
        where.append("disabled_at IS NULL")
    clause = f" WHERE {' AND '.join(where)}" if where else ""
    return f"SELECT {ENDPOINT_COLS} FROM webhook_endpoints{clause} ORDER BY seq"


def list_events(after: bool) -> str:
    """An owner's events, newest first (arguments: owner, [the id to page after, owner,] limit). An `after` that
    is not one of the owner's events gives an empty page."""
    where = "e.owner = ?"
    if after:
        where += " AND e.seq < (SELECT seq FROM webhook_events WHERE id = ? AND owner = ?)"
    return f"SELECT {EVENT_LOG_COLS} FROM webhook_events e WHERE {where} ORDER BY e.seq DESC LIMIT ?"


def endpoint_values(e: WebhookEndpoint) -> tuple[Any, ...]:
    return tuple(getattr(e, f) for f in ENDPOINT_FIELDS)


def attempt_values(a: DeliveryAttempt) -> tuple[Any, ...]:
    return tuple(getattr(a, f) for f in ATTEMPT_FIELDS)


def endpoint_from_row(row: Row) -> WebhookEndpoint:
    return WebhookEndpoint(
        id=row["id"],
        owner=row["owner"],
        url=row["url"],
        secret=row["secret"],
        created_at=int(row["created_at"]),
        previous_secret=row["previous_secret"],
        previous_until=_opt_int(row["previous_until"]),
        disabled_at=_opt_int(row["disabled_at"]),
    )


def attempt_from_row(row: Row) -> DeliveryAttempt:
    return DeliveryAttempt(**{f: row[f] for f in ATTEMPT_FIELDS})


def _opt_int(v: Any) -> int | None:
    return None if v is None else int(v)
