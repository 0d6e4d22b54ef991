"""Deliver batch webhooks from the store's outbox to the configured URLs, signed, with retries.

Every final batch status writes one event in the transaction that makes it final (the outbox); a worker with
`--webhook-url` leases due events, POSTs each to every URL, and settles it: delivered when every URL answered 2xx,
else due again after a growing delay (5 s doubling to an hour), and given up after three days. Delivery is at least
once: a receiver deduplicates by `webhook-id` (the event id), as OpenAI's documentation asks. The URLs come from the
operator's configuration only, never from a request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

import aiohttp
import orjson
from yarl import URL

from batchyard import metrics
from batchyard.domain.models import WebhookEvent
from batchyard.domain.webhooks import MAX_AGE_S, retry_delay, secret_key, signature
from batchyard.store.base import MetadataStore

log = logging.getLogger("batchyard.webhooks")

LEASE_S = 60.0
BATCH = 50
TIMEOUT_S = 15.0  # the whole POST, answer included
MAX_ANSWER_BYTES = (
    64 * 1024 * 1024
)  # a receiver's answer is read (and dropped) up to this size, then it failed
HEADERS = {"User-Agent": "batchyard", "Content-Type": "application/json"}


class WebhookSender:
    """POSTs events to the configured URLs with an HTTP client of its own (aiohttp), opened by `open` for the
    delivery loop and closed with it. A receiver's redirect is an answer like any other (not 2xx: failed), never
    followed; no proxy from the environment is used."""

    def __init__(self, urls: list[str], secret: str) -> None:
        self._targets = [(f"webhook {i + 1}", URL(url, encoded=True)) for i, url in enumerate(urls)]
        self._key = secret_key(secret)
        self._session: aiohttp.ClientSession | None = None

    @contextlib.asynccontextmanager
    async def open(self) -> AsyncIterator[WebhookSender]:
        """The client for the block's duration (call inside the event loop that delivers)."""
        timeout = aiohttp.ClientTimeout(total=TIMEOUT_S)
        async with aiohttp.ClientSession(timeout=timeout, headers=HEADERS, auto_decompress=False) as session:
            self._session = session
            try:
                yield self
            finally:
                self._session = None

    async def _post(self, name: str, url: URL, ev: WebhookEvent, body: bytes) -> str | None:
        """None when the receiver took it (2xx), else why not."""
        assert self._session is not None, "deliver inside `async with sender.open()`"
        ts = int(time.time())
        headers = {
            "webhook-id": ev.id,
            "webhook-timestamp": str(ts),
            "webhook-signature": signature(self._key, ev.id, ts, body),
        }
        try:
            async with self._session.post(url, data=body, headers=headers, allow_redirects=False) as resp:
                if not await _drain(resp):
                    return f"{name}: answer exceeded {MAX_ANSWER_BYTES} bytes"
                status = resp.status
        except TimeoutError:
            return f"{name}: did not answer within {TIMEOUT_S:g}s"
        except aiohttp.ClientError as e:
            return f"{name}: connection failed: {type(e).__name__}"
        if 200 <= status < 300:
            return None
        return f"{name}: HTTP {status}"

    async def deliver(self, store: MetadataStore, worker: str) -> int:
        """Deliver the events due now; returns how many were tried."""
        now = time.time()
        events = await store.claim_webhook_events(worker, LEASE_S, BATCH, int(now - MAX_AGE_S))
        await asyncio.gather(*(self._one(store, worker, ev) for ev in events))
        return len(events)

    async def _one(self, store: MetadataStore, worker: str, ev: WebhookEvent) -> None:
        body = orjson.dumps(ev.to_wire())
        posts = (self._post(name, url, ev, body) for name, url in self._targets)
        problems = [p for p in await asyncio.gather(*posts) if p]
        if not problems:
            await store.settle_webhook_event(ev.id, worker, "delivered", None, None)
            metrics.webhook_settled("delivered")
            log.info("webhook %s (%s %s) delivered", ev.id, ev.type, ev.batch_id)
            return
        error = "; ".join(problems)[:1000]
        attempts = ev.attempts + 1
        if time.time() - ev.created_at > MAX_AGE_S:
            await store.settle_webhook_event(ev.id, worker, "abandoned", None, error)
            metrics.webhook_settled("failed")
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
        metrics.webhook_settled("retried")
        log.warning("webhook %s (%s) attempt %d failed: %s", ev.id, ev.type, attempts, error)


async def _drain(resp: aiohttp.ClientResponse) -> bool:
    """Read the answer's body (so that the connection can be reused) without keeping it; False past the cap."""
    if resp.content_length is not None and resp.content_length > MAX_ANSWER_BYTES:
        return False
    size = 0
    async for chunk in resp.content.iter_any():
        size += len(chunk)
        if size > MAX_ANSWER_BYTES:
            return False
    return True
