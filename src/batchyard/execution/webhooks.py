"""Deliver batch webhooks from the store's outbox to the configured URLs and the project's endpoints, signed, with
retries.

Every final batch status writes one event in the transaction that makes it final (the outbox); every worker leases
due events, POSTs each to every target that has not taken it yet (the `--webhook-url`s, signed with
`--webhook-secret`, and the live endpoints of the event's project, each signed with its own secret, and with the
previous one too during a rotation's grace), records each attempt, and settles the event: delivered when every
target took it, else due again after a growing delay (5 s doubling to an hour), and given up after three days.
Delivery is at least once: a receiver deduplicates by `webhook-id` (the event id), as OpenAI's documentation asks.
The URLs come from the operator: the configuration, `batchyard webhooks add`, or the admin API, which takes only
hosts the operator's `webhook_allowed_hosts` admits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import orjson
from yarl import URL

from batchyard import metrics
from batchyard.domain.models import WebhookEvent
from batchyard.domain.webhooks import (
    MAX_AGE_S,
    DeliveryAttempt,
    global_target_id,
    retry_delay,
    secret_key,
    signature_header,
)
from batchyard.store.base import MetadataStore

log = logging.getLogger("batchyard.webhooks")

LEASE_S = 60.0
BATCH = 50
TIMEOUT_S = 15.0  # the whole POST, answer included
MAX_ANSWER_BYTES = (
    64 * 1024 * 1024
)  # a receiver's answer is read (and dropped) up to this size, then it failed
HEADERS = {"User-Agent": "batchyard", "Content-Type": "application/json"}


@dataclass(frozen=True, slots=True)
class _Target:
    """Where one delivery goes: `id` as the delivery log names it, `name` as the logs do, the signing keys."""

    id: str
    name: str
    url: URL | str
    keys: tuple[bytes, ...]


def _url(raw: str) -> URL | str:
    """An endpoint's URL as the client sends it; its text when yarl refuses it (a stored URL from before a rule that
    refuses it now), whose POST then fails alone: an attempt that says so, as for a URL the client cannot send to."""
    try:
        return URL(raw, encoded=True)
    except ValueError:
        return raw


class WebhookSender:
    """POSTs events to the configured URLs and to the endpoints of each event's project, with an HTTP client of
    its own (aiohttp), opened by `open` for the delivery loop and closed with it. A receiver's redirect is an answer
    like any other (not 2xx: failed), never followed; no proxy from the environment is used.

    Each attempt is recorded (`MetadataStore.record_webhook_attempts`); a retry goes only to the targets that have
    not taken the event yet, and the event is delivered once every target took it. An event with no target at all
    (no --webhook-url, no endpoint of its project) is settled `skipped` without a request."""

    def __init__(self, urls: list[str], secret: str) -> None:
        key = secret_key(secret) if urls else b""
        self._globals = [
            _Target(global_target_id(url), f"webhook {i + 1}", URL(url, encoded=True), (key,))
            for i, url in enumerate(urls)
        ]
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

    async def _post(self, target: _Target, ev: WebhookEvent, body: bytes) -> DeliveryAttempt:
        """One POST of `ev` to `target`, as the delivery log keeps it."""
        assert self._session is not None, "deliver inside `async with sender.open()`"
        now = time.time()
        ts = int(now)
        headers = {
            "webhook-id": ev.id,
            "webhook-timestamp": str(ts),
            "webhook-signature": signature_header(list(target.keys), ev.id, ts, body),
        }
        started = time.monotonic()
        status: int | None = None
        error: str | None = None
        try:
            async with self._session.post(
                target.url, data=body, headers=headers, allow_redirects=False
            ) as resp:
                status = resp.status
                if not await _drain(resp):
                    error = f"answer exceeded {MAX_ANSWER_BYTES} bytes"
        except TimeoutError:
            error = f"did not answer within {TIMEOUT_S:g}s"
        except aiohttp.ClientError as e:
            status, error = None, f"connection failed: {type(e).__name__}"
        except ValueError as e:  # a URL the client cannot send to (it fails alone, as a failed attempt)
            status, error = None, f"cannot send to this URL: {type(e).__name__}"
        duration_ms = int((time.monotonic() - started) * 1000)
        return DeliveryAttempt(ev.id, target.id, now, duration_ms, status, error)

    async def _targets(self, store: MetadataStore, ev: WebhookEvent) -> tuple[list[_Target], set[str]]:
        """Every target of `ev` (the configured URLs, then its project's live endpoints) and those that took it."""
        endpoints, took = await store.webhook_targets(ev)
        now = time.time()
        targets = list(self._globals)
        for e in endpoints:
            try:
                keys = tuple(secret_key(s) for s in e.secrets_at(now))
            except ValueError:
                log.error("webhook endpoint %s has a secret that is not whsec_<base64>: skipped", e.id)
                continue
            targets.append(_Target(e.id, e.id, _url(e.url), keys))
        return targets, took

    async def deliver(self, store: MetadataStore, worker: str) -> int:
        """Deliver the events due now; returns how many were tried."""
        now = time.time()
        events = await store.claim_webhook_events(worker, LEASE_S, BATCH, int(now - MAX_AGE_S))
        await asyncio.gather(*(self._one(store, worker, ev) for ev in events))
        return len(events)

    async def _one(self, store: MetadataStore, worker: str, ev: WebhookEvent) -> None:
        targets, took = await self._targets(store, ev)
        due = [t for t in targets if t.id not in took]
        if not targets and not took:
            await store.settle_webhook_event(ev.id, worker, "skipped", None, None)
            log.debug("webhook %s (%s %s): no endpoint, not sent", ev.id, ev.type, ev.batch_id)
            return
        body = orjson.dumps(ev.to_wire())
        attempts = list(await asyncio.gather(*(self._post(t, ev, body) for t in due)))
        await store.record_webhook_attempts(attempts)
        names = {t.id: t.name for t in due}
        problems = [f"{names[a.endpoint_id]}: {_why(a)}" for a in attempts if not a.took_it]
        if not problems:
            await store.settle_webhook_event(ev.id, worker, "delivered", None, None)
            metrics.webhook_settled("delivered")
            log.info("webhook %s (%s %s) delivered", ev.id, ev.type, ev.batch_id)
            return
        error = "; ".join(problems)[:1000]
        tries = ev.attempts + 1
        if time.time() - ev.created_at > MAX_AGE_S:
            await store.settle_webhook_event(ev.id, worker, "abandoned", None, error)
            metrics.webhook_settled("failed")
            log.error(
                "webhook %s (%s %s) given up after %d attempts: %s",
                ev.id,
                ev.type,
                ev.batch_id,
                tries,
                error,
            )
            return
        next_at = time.time() + retry_delay(tries)
        await store.settle_webhook_event(ev.id, worker, "pending", next_at, error)
        metrics.webhook_settled("retried")
        log.warning("webhook %s (%s) attempt %d failed: %s", ev.id, ev.type, tries, error)


def _why(a: DeliveryAttempt) -> str:
    """Why an attempt did not deliver, as the logs and `last_error` say it."""
    return a.error if a.error is not None else f"HTTP {a.status_code}"


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
