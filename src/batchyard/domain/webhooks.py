"""Batch webhooks as OpenAI sends them: Standard Webhooks signatures and the retry schedule (pure functions).

The signature is HMAC-SHA256 over "<webhook-id>.<webhook-timestamp>.<body>", base64-encoded, sent as
`webhook-signature: v1,<signature>`; a secret written `whsec_<base64>` is the base64 of the key, any other string is
the key itself (what openai-python's `client.webhooks.unwrap` checks).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import random

MAX_AGE_S = 72 * 3600  # an event not delivered within three days is given up
FIRST_RETRY_S = 5.0
MAX_RETRY_S = 3600.0


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
