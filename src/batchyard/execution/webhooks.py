"""Deliver batch webhooks from the store's outbox to the configured URLs, signed, with retries.

Every final batch status writes one event in the transaction that makes it final (the outbox); a worker with
`--webhook-url` leases due events, POSTs each to every URL, and settles it: delivered when every URL answered 2xx,
else due again after a growing delay (5 s doubling to an hour), and given up after three days. Delivery is at least
once: a receiver deduplicates by `webhook-id` (the event id), as OpenAI's documentation asks. The URLs come from the
operator's configuration only, never from a request.
"""

from __future__ import annotations

import asyncio
import logging
import time

import orjson

from batchyard.domain.models import WebhookEvent
from batchyard.domain.webhooks import MAX_AGE_S, retry_delay, secret_key, signature
from batchyard.store.base import MetadataStore
from batchyard.upstreams.base import UpstreamError
from batchyard.upstreams.http import HTTPUpstream

log = logging.getLogger("batchyard.webhooks")

LEASE_S = 60.0
BATCH = 50
TIMEOUT_S = 15.0


class WebhookSender:
    def __init__(self, urls: list[str], secret: str) -> None:
        self._targets = [HTTPUpstream(url, name=f"webhook {i + 1}") for i, url in enumerate(urls)]
        self._key = secret_key(secret)

    async def close(self) -> None:
        for t in self._targets:
            await t.close()

    async def _post(self, target: HTTPUpstream, ev: WebhookEvent, body: bytes) -> str | None:
        """None when the receiver took it (2xx), else why not."""
        ts = int(time.time())
        headers = {
            "webhook-id": ev.id,
            "webhook-timestamp": str(ts),
            "webhook-signature": signature(self._key, ev.id, ts, body),
        }
        try:
            resp = await target.call("", body, timeout=TIMEOUT_S, headers=headers)
        except UpstreamError as e:
            return f"{target.name}: {e.message}"
        if 200 <= resp.status < 300:
            return None
        return f"{target.name}: HTTP {resp.status}"

    async def deliver(self, store: MetadataStore, worker: str) -> int:
        """Deliver the events due now; returns how many were tried."""
        now = time.time()
        events = await store.claim_webhook_events(worker, LEASE_S, BATCH, int(now - MAX_AGE_S))
        await asyncio.gather(*(self._one(store, worker, ev) for ev in events))
        return len(events)

    async def _one(self, store: MetadataStore, worker: str, ev: WebhookEvent) -> None:
        body = orjson.dumps(ev.to_wire())
        problems = [p for p in await asyncio.gather(*(self._post(t, ev, body) for t in self._targets)) if p]
        if not problems:
            await store.settle_webhook_event(ev.id, worker, "delivered", None, None)
            log.info("webhook %s (%s %s) delivered", ev.id, ev.type, ev.batch_id)
            return
        error = "; ".join(problems)[:1000]
        attempts = ev.attempts + 1
        if time.time() - ev.created_at > MAX_AGE_S:
            await store.settle_webhook_event(ev.id, worker, "abandoned", None, error)
            log.error(
                "webhook %s (%s %s) given up after %d attempts: %s",
                ev.id,
                ev.type,
                ev.batch_id,
                attempts,
                error,
            )
            return
        next_at = time.time() + retry_delay(attempts)
        await store.settle_webhook_event(ev.id, worker, "pending", next_at, error)
        log.warning("webhook %s (%s) attempt %d failed: %s", ev.id, ev.type, attempts, error)
