"""Batch webhooks as OpenAI sends them: Standard Webhooks signatures and the retry schedule (pure functions).

The signature is HMAC-SHA256 over "<webhook-id>.<webhook-timestamp>.<body>", base64-encoded, sent as
`webhook-signature: v1,<signature>`; a secret written `whsec_<base64>` is the base64 of the key, any other string is
the key itself (what openai-python's `client.webhooks.unwrap` checks). During a rotation's grace the header carries
two signatures, `v1,<new> v1,<old>` (Standard Webhooks' space-separated list, which the SDK accepts).

Events go to the `--webhook-url`s (signed with `--webhook-secret`) and to the endpoints of the event's project
(`WebhookEndpoint`, each with its own secret); every attempt is kept (`DeliveryAttempt`), and an event is settled when
every target took it.
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
import hashlib
import hmac
import random
import re
import secrets
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

MAX_AGE_S = 72 * 3600  # an event not delivered within three days is given up
FIRST_RETRY_S = 5.0
MAX_RETRY_S = 3600.0
_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def secret_key(secret: str) -> bytes:
    """The HMAC key of a webhook secret; raises ValueError for a `whsec_` secret that is not base64."""
    if secret.startswith("whsec_"):
        try:
            return base64.b64decode(secret[6:], validate=True)
        except binascii.Error as e:
            raise ValueError("a webhook secret written whsec_... must be base64 after the prefix") from e
    return secret.encode()


def signature(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def retry_delay(attempts: int, rng: random.Random | None = None) -> float:
    """Seconds before the next try after `attempts` failed ones: 5 s doubling up to an hour, with jitter."""
    delay = min(FIRST_RETRY_S * 2.0 ** max(0, attempts - 1), MAX_RETRY_S)
    return delay * (0.8 + 0.4 * (rng or random).random())


# -- endpoints per project: who receives a project's events, signed with whose secret -----------------------------

ENDPOINT_ID = re.compile(r"wh_[0-9A-Za-z]{1,64}")
EVENT_ID = re.compile(r"evt_[0-9A-Za-z]{1,64}")
MAX_URL_CHARS = 2048
MAX_ENDPOINTS = 20  # live endpoints of one project
DEFAULT_GRACE_S = 24 * 3600  # how long a rotated-out secret still signs (`webhook_rotation_grace`)
MAX_ATTEMPTS_SHOWN = 1000  # attempts of one event in `GET /v1/webhook_events/{id}` (3 days of retries is ~80)


@dataclass(slots=True)
class WebhookEndpoint:
    """Where a project's events go (`owner`: the project id), and the secret each delivery is signed with. After a
    rotation the previous secret signs too (a second `v1,` signature) until `previous_until`."""

    id: str
    owner: str
    url: str
    secret: str
    created_at: int
    previous_secret: str | None = None
    previous_until: int | None = None
    disabled_at: int | None = None

    def secrets_at(self, now: float) -> list[str]:
        """The secrets that sign a delivery made at `now`: the current one, and the previous one in its grace."""
        out = [self.secret]
        if self.previous_secret is not None and self.previous_until is not None and now < self.previous_until:
            out.append(self.previous_secret)
        return out

    def to_wire(self, now: float) -> dict[str, Any]:
        """The endpoint as the admin API shows it: never a secret (shown once, when made or rotated)."""
        grace = self.previous_until if len(self.secrets_at(now)) > 1 else None
        return {
            "id": self.id,
            "object": "webhook_endpoint",
            "project_id": self.owner,
            "url": self.url,
            "created_at": self.created_at,
            "previous_secret_valid_until": grace,
            "disabled_at": self.disabled_at,
        }


@dataclass(slots=True)
class DeliveryAttempt:
    """One POST of an event to one target: a stored endpoint (`wh_...`) or a `--webhook-url` (`global_...`)."""

    event_id: str
    endpoint_id: str
    attempted_at: float
    duration_ms: int
    status_code: int | None  # None: no answer (see `error`)
    error: str | None = None

    @property
    def took_it(self) -> bool:
        """A 2xx, read whole (an answer past the cap is an error even with a 2xx status)."""
        return self.status_code is not None and 200 <= self.status_code < 300 and self.error is None

    def to_wire(self) -> dict[str, Any]:
        return {
            "object": "webhook_event.delivery_attempt",
            "endpoint_id": self.endpoint_id,
            "attempted_at": int(self.attempted_at),
            "duration_ms": self.duration_ms,
            "status_code": self.status_code,
            "error": self.error,
        }


def endpoint_id() -> str:
    return "wh_" + "".join(secrets.choice(_ALPHABET) for _ in range(24))


def new_secret() -> str:
    """A signing secret as OpenAI writes them: `whsec_` and the base64 of 32 random bytes."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def global_target_id(url: str) -> str:
    """The name a `--webhook-url` has in the delivery log: derived from the URL (stable across restarts and
    reorderings of the list), not the URL itself, which the project must not see."""
    return "global_" + hashlib.sha256(url.encode()).hexdigest()[:16]


def signature_header(keys: list[bytes], msg_id: str, timestamp: int, body: bytes) -> str:
    """`webhook-signature`: one `v1,<sig>` per key, space-separated (Standard Webhooks; the SDK accepts any)."""
    return " ".join(signature(k, msg_id, timestamp, body) for k in keys)


def url_problem(url: str, allowed_hosts: list[str] | None) -> str | None:
    """Why `url` cannot be a webhook endpoint, or None. http/https with a host only; with `allowed_hosts` (the
    admin API's case: the URL comes from a request body) its host must match one of those globs."""
    if len(url) > MAX_URL_CHARS:
        return f"the URL is longer than {MAX_URL_CHARS} characters"
    if "\\" in url:  # urlsplit keeps it in the host part, a browser reads it as "/": two parsers, two hosts
        return "the URL contains a backslash"
    try:
        parts = urlsplit(url)
        host = parts.hostname
        port = parts.port  # raises ValueError for a port that is not a number in range
    except ValueError:
        return "the URL cannot be parsed"
    if parts.scheme not in ("http", "https") or not host:
        return "the URL must be http:// or https:// with a host"
    if any(c.isspace() or ord(c) < 32 for c in url):
        return "the URL contains spaces or control characters"
    if "@" in parts.netloc:  # every list of endpoints would show them; the secret signs each delivery instead
        return "the URL must not hold a user name or password"
    if port == 0:
        return "the URL's port 0 cannot be sent to"
    try:
        # what the HTTP client does with it: an empty label, or one of 64+ characters, fails; so does an xn-- label
        # that is no punycode
        host.encode("idna").decode("idna")
    except UnicodeError:
        return f"the host '{host}' is not a valid host name"
    if allowed_hosts is None:
        return None
    if not allowed_hosts:
        return "no host is allowed: the operator's setting webhook_allowed_hosts (--webhook-allowed-hosts) is empty"
    if not any(fnmatch.fnmatchcase(host.lower(), p.lower()) for p in allowed_hosts):
        return f"the host '{host}' is not in the operator's setting webhook_allowed_hosts"
    return None
