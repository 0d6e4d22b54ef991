"""Send one request line to its upstream, with retries, and turn the outcome into an output or error line."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import orjson

from batchyard import metrics
from batchyard.domain import lines, wire
from batchyard.domain.models import Usage
from batchyard.domain.retry import backoff_delay, is_retryable_status, parse_retry_after
from batchyard.execution import failure_log
from batchyard.upstreams.base import UpstreamError, UpstreamResponse
from batchyard.upstreams.limiter import Limiter, Signal
from batchyard.upstreams.pool import Member, healthier_exists, pick
from batchyard.upstreams.router import Router


@dataclass(slots=True)
class Outcome:
    ok: bool  # True: goes to the output file
    line: bytes
    usage: Usage | None = None
    stopped: str | None = None  # batch_cancelled / batch_expired: the line was not executed to the end


class Preempted:
    """`_attempt`'s answer when an online request cut the attempt short: the line is sent again."""


PREEMPTED = Preempted()


class StopSignal:
    """Set when a shard must stop dispatching (batch cancelled or expired); carries the error code, and the
    batch's deadline (`time.monotonic()` seconds), past which no retry is made."""

    def __init__(self, deadline: float | None = None) -> None:
        self.code: str | None = None
        self.deadline = deadline

    def too_late(self, delay: float) -> bool:
        """Whether a retry after `delay` seconds would start past the batch's deadline."""
        return self.deadline is not None and time.monotonic() + delay >= self.deadline

    def set(self, code: str) -> None:
        if self.code is None:
            self.code = code


class Dispatcher:
    """Sends each line through its upstream's limiter (made with the router's members) and applies the retry policy."""

    def __init__(
        self, router: Router, *, attempt_timeout: float, max_retries: int, limit_split: int = 1
    ) -> None:
        """`limit_split`: this process has 1/n of each limit (`Settings.share`); its gauge shows the whole."""
        self.router = router
        self._attempt_timeout = attempt_timeout
        self._max_retries = max_retries
        self._split = limit_split
        for m in router.members:  # every upstream's gauges exist before its first request
            metrics.upstream(m.name).state(m.limiter.limit * limit_split, True)

    def total_limit(self) -> int:
        """The sum of the current concurrency limits of every upstream this dispatcher routes to."""
        return sum(m.limiter.limit for m in self.router.members) or 1

    async def _attempt(
        self,
        group: list[Member],
        endpoint: str,
        body: dict[str, Any],
        payload: bytes,
        stop: StopSignal,
        key: str | None,
        weight: float,
    ) -> UpstreamResponse | UpstreamError | Preempted | None:
        """One try on the best member of the group: its rate limits, concurrency limit (waiting in turn with
        other owners' lines: `key`, `weight`) and health. None if the batch stopped before the request was sent;
        PREEMPTED if an online request cut it short."""
        while True:
            member = pick(group)
            limiter = member.limiter
            started = await limiter.acquire(key, weight)
            if len(group) > 1 and healthier_exists(member, group):
                limiter.release(started, Signal.ERROR)  # ejected while we waited: choose again
                continue
            sent, sent_body = payload, body
            if member.priority is not None and "priority" not in body:  # the request's own priority wins
                sent_body = {**body, "priority": member.priority}
                sent = wire.dumps(sent_body)
            return await self._send(member, limiter, started, endpoint, sent_body, sent, stop)

    async def _send(
        self,
        member: Member,
        limiter: Limiter,
        started: float,
        endpoint: str,
        body: dict[str, Any],
        payload: bytes,
        stop: StopSignal,
    ) -> UpstreamResponse | UpstreamError | Preempted | None:
        signal = Signal.ERROR
        meter, sent_at, status = metrics.upstream(member.name), None, None  # status: None while unanswered
        handle = None
        try:
            if member.rpm is not None:
                await member.rpm.take(1)
            if member.tpm is not None:
                await member.tpm.take(_estimated_tokens(payload, body))  # only for upstreams with a TPM limit
            if stop.code is not None:
                return None
            member.health.on_attempt(time.monotonic())
            sent_at = meter.sent()
            upstream, timeout = member.upstream, member.timeout or self._attempt_timeout
            streams = upstream.streams(endpoint, body)  # then a cut stops the engine (upstreams/streamed.py)
            if upstream.preemptible or (streams and upstream.preemptible_streams):
                handle = limiter.track()
            try:
                if streams:
                    resp = await upstream.call_streamed(endpoint, body, timeout=timeout)
                else:
                    resp = await upstream.call(endpoint, payload, timeout=timeout)
            except asyncio.CancelledError:
                if handle is None or not handle.taken_back():
                    raise
                signal, status = Signal.PREEMPTED, "preempted"
                return PREEMPTED
            signal, status = _signal_of(resp.status), str(resp.status)
            if resp.status >= 400:
                failure_log.answered(member, resp)
            return resp
        except UpstreamError as e:
            signal = Signal.OVERLOAD if e.kind == "timeout" else Signal.ERROR
            status = metrics.upstream_error_status(e.kind)
            failure_log.failed(member, e)
            return e
        finally:
            if handle is not None:
                limiter.untrack(handle)
            limiter.release(started, signal)
            if signal is Signal.PREEMPTED:  # says nothing of its health (a probe that was cut may go again)
                member.health.probing = False
            elif signal is not Signal.OVERLOAD:  # overload is about capacity, not health
                member.health.on_result(signal is Signal.OK, time.monotonic())
            if sent_at is not None:
                meter.answered(sent_at, status)
                meter.state(limiter.limit * self._split, member.health.available(time.monotonic()))

    async def execute(
        self,
        endpoint: str,
        custom_id: str,
        body: dict[str, Any],
        stop: StopSignal,
        *,
        key: str | None = None,
        weight: float = 1.0,
    ) -> Outcome:
        """The line's outcome. `key` and `weight`: its batch's owner and the owner's weight in the fair share of
        the upstream's slots. A retry whose wait would end past `stop.deadline` is not made: the line fails with
        its last error."""
        model = body.get("model")
        group = self.router.group(model) if isinstance(model, str) else None
        if group is None:
            return Outcome(
                False, lines.error_line(custom_id, "model_not_found", f"No upstream serves {model!r}.")
            )
        payload = wire.dumps(body)  # exact: integers past 64 bits are sent as they were written
        retries = 0
        while True:
            if stop.code is not None:
                return Outcome(False, lines.not_executed_line(custom_id, stop.code), stopped=stop.code)
            resp = await self._attempt(group, endpoint, body, payload, stop, key, weight)
            if resp is None:  # stopped while waiting for a slot: never sent
                return Outcome(False, lines.not_executed_line(custom_id, stop.code or ""), stopped=stop.code)
            if isinstance(
                resp, Preempted
            ):  # an online request took its slot: the line goes again (no retry counted)
                continue
            if isinstance(resp, UpstreamError):
                if resp.retryable and retries < self._max_retries:
                    delay = backoff_delay(retries, None)
                    if not stop.too_late(delay):
                        metrics.retried(resp.kind)
                        await asyncio.sleep(delay)
                        retries += 1
                        continue
                return Outcome(False, lines.error_line(custom_id, _line_code(resp.kind), resp.message))
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
                if not stop.too_late(delay):
                    metrics.retried(resp.status)
                    await asyncio.sleep(delay)
                    retries += 1
                    continue
            body_obj, raw = _error_body(resp.body)
            return Outcome(
                False, lines.response_line(custom_id, resp.status, resp.request_id or "", body_obj, raw)
            )


def _estimated_tokens(payload: bytes, body: dict[str, Any]) -> float:
    """A rough token cost for TPM limits: ~4 bytes a prompt token plus the completion budget."""
    budget = (
        body.get("max_completion_tokens") or body.get("max_tokens") or body.get("max_output_tokens") or 256
    )
    return len(payload) / 4 + (budget if isinstance(budget, int) else 256)


def _signal_of(status: int) -> Signal:
    if status in (429, 503):
        return Signal.OVERLOAD
    return Signal.ERROR if status >= 500 else Signal.OK


def _error_body(raw: bytes) -> tuple[dict[str, Any], bytes | None]:
    """The upstream's error body as an object and the bytes to splice into the line: kept as is (its raw bytes,
    never re-serialized) when it is a JSON object, wrapped when it is not."""
    try:
        parsed = orjson.loads(raw)
    except orjson.JSONDecodeError:
        parsed = None
    if isinstance(parsed, dict):
        return parsed, raw
    text = raw[:4096].decode("utf-8", "replace")
    return {"error": {"message": text, "type": "upstream_error", "param": None, "code": None}}, None


def _line_code(kind: str) -> str:
    """The error line's code for an upstream that gave no answer: OpenAI's `request_timeout` for a timeout, and
    batchyard's `upstream_connect` / `upstream_too_large` for what OpenAI has no code for."""
    return "request_timeout" if kind == "timeout" else f"upstream_{kind}"
