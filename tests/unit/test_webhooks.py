"""Webhook signatures (checked by the official SDK's verifier) and the retry schedule."""

from __future__ import annotations

import base64
import random
import time

import pytest
from openai import OpenAI

from batchyard.domain.webhooks import MAX_RETRY_S, retry_delay, secret_key, signature


@pytest.mark.parametrize("secret", ["whsec_" + base64.b64encode(b"k" * 32).decode(), "plain-secret"])
def test_signature_is_what_openai_python_verifies(secret: str) -> None:
    body = b'{"id": "evt_1", "type": "batch.completed"}'
    ts = int(time.time())
    headers = {"webhook-id": "evt_1", "webhook-timestamp": str(ts)}
    headers["webhook-signature"] = signature(secret_key(secret), "evt_1", ts, body)
    OpenAI(api_key="x").webhooks.verify_signature(body, headers, secret=secret)  # raises if it does not match
    headers["webhook-signature"] = signature(secret_key(secret), "evt_2", ts, body)
    with pytest.raises(Exception, match="signature"):
        OpenAI(api_key="x").webhooks.verify_signature(body, headers, secret=secret)


def test_a_whsec_secret_must_be_base64() -> None:
    with pytest.raises(ValueError):
        secret_key("whsec_not*base64")


def test_retry_delay_doubles_from_five_seconds_up_to_an_hour() -> None:
    rng = random.Random(1)
    delays = [retry_delay(n, rng) for n in range(1, 12)]
    assert 4.0 <= delays[0] <= 6.0 and 8.0 <= delays[1] <= 12.0
    assert all(d <= MAX_RETRY_S * 1.2 for d in delays) and delays[-1] >= MAX_RETRY_S * 0.8
