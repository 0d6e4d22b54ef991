"""Send one request line to its upstream, with retries, and turn the outcome into an output or error line."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import orjson

from batchyard.domain import lines
from batchyard.domain.models import Usage
from batchyard.domain.retry import backoff_delay, is_retryable_status, parse_retry_after
from batchyard.upstreams.base import Upstream, UpstreamError
from batchyard.upstreams.router import Router


@dataclass(slots=True)
class Outcome:
    ok: bool  # True: goes to the output file
    line: bytes
    usage: Usage | None = None
    stopped: str | None = None  # batch_cancelled / batch_expired: the line was not executed to the end


class StopSignal:
    """Set when a shard must stop dispatching (batch cancelled or expired); carries the error code."""

    def __init__(self) -> None:
        self.code: str | None = None

    def set(self, code: str) -> None:
        if self.code is None:
            self.code = code


class Dispatcher:
    """Bounds lines in flight per upstream (a semaphore each) and applies the retry policy."""

    def __init__(
        self,
        router: Router,
        *,
        concurrency: int,
        attempt_timeout: float,
        max_retries: int,
    ) -> None:
        self.router = router
        self._concurrency = concurrency
        self._attempt_timeout = attempt_timeout
        self._max_retries = max_retries
        self._slots: dict[int, asyncio.Semaphore] = {}

    def _slot(self, upstream: Upstream) -> asyncio.Semaphore:
        sem = self._slots.get(id(upstream))
        if sem is None:
            sem = self._slots[id(upstream)] = asyncio.Semaphore(self._concurrency)
        return sem

    async def execute(self, endpoint: str, custom_id: str, body: dict[str, Any], stop: StopSignal) -> Outcome:
        model = body.get("model")
        upstream = self.router.resolve(model) if isinstance(model, str) else None
        if upstream is None:
            return Outcome(
                False, lines.error_line(custom_id, "model_not_found", f"No upstream serves {model!r}.")
            )
        payload = orjson.dumps(body)
        slot = self._slot(upstream)
        retries = 0
        while True:
            if stop.code is not None:
                return Outcome(False, lines.not_executed_line(custom_id, stop.code), stopped=stop.code)
            try:
                async with slot:
                    resp = await upstream.call(endpoint, payload, timeout=self._attempt_timeout)
            except UpstreamError as e:
                if e.retryable and retries < self._max_retries:
                    await asyncio.sleep(backoff_delay(retries, None))
                    retries += 1
                    continue
                return Outcome(False, lines.error_line(custom_id, f"upstream_{e.kind}", e.message))
            if 200 <= resp.status < 300:
                try:
                    parsed = orjson.loads(resp.body)
                except orjson.JSONDecodeError:
                    parsed = None
                if not isinstance(parsed, dict):
                    msg = f"The upstream answered {resp.status} with a body that is not a JSON object."
                    return Outcome(False, lines.error_line(custom_id, "invalid_upstream_response", msg))
                line = lines.response_line(custom_id, resp.status, resp.request_id or "", parsed, resp.body)
                return Outcome(True, line, lines.extract_usage(parsed))
            if is_retryable_status(resp.status) and retries < self._max_retries:
                delay = backoff_delay(retries, parse_retry_after(resp.headers, time.time()))
                await asyncio.sleep(delay)
                retries += 1
                continue
            return Outcome(
                False,
                lines.response_line(custom_id, resp.status, resp.request_id or "", _error_body(resp.body)),
            )


def _error_body(raw: bytes) -> dict[str, Any]:
    """The upstream's error body as an object: kept as is when it is JSON, wrapped when it is not."""
    try:
        parsed = orjson.loads(raw)
    except orjson.JSONDecodeError:
        parsed = None
    if isinstance(parsed, dict):
        return parsed
    text = raw[:4096].decode("utf-8", "replace")
    return {"error": {"message": text, "type": "upstream_error", "param": None, "code": None}}
