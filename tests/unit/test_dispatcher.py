"""Dispatcher.execute against a scripted in-test upstream: outcomes, retries, routing, stop signals."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any, TypeAlias

import pytest

from batchyard.domain import retry
from batchyard.domain.lines import NOT_EXECUTED_MESSAGES
from batchyard.domain.models import Usage
from batchyard.execution import dispatcher as dispatcher_mod
from batchyard.execution.dispatcher import Dispatcher, Outcome, StopSignal
from batchyard.upstreams.base import Upstream, UpstreamError, UpstreamResponse
from batchyard.upstreams.limiter import Limiter
from batchyard.upstreams.router import Router

ENDPOINT = "/v1/chat/completions"
BODY: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
NO_WAIT = {"retry-after-ms": "0"}

Step: TypeAlias = UpstreamResponse | UpstreamError | Callable[[], UpstreamResponse]


CHAT_BODY: dict[str, Any] = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello"}}],
    "usage": {
        "prompt_tokens": 12,
        "completion_tokens": 5,
        "prompt_tokens_details": {"cached_tokens": 2},
        "completion_tokens_details": {"reasoning_tokens": 1},
    },
}


def ok(request_id: str | None = "req_up_1") -> UpstreamResponse:
    raw = json.dumps(CHAT_BODY).encode()
    return UpstreamResponse(200, {"content-type": "application/json"}, raw, request_id)


def status(
    code: int, body: bytes = b'{"error": {"message": "nope"}}', headers: dict[str, str] | None = None
) -> UpstreamResponse:
    return UpstreamResponse(code, headers if headers is not None else dict(NO_WAIT), body, f"req_{code}")


class Scripted(Upstream):
    """Answers each call with the next step of its script; the last step repeats forever."""

    def __init__(self, *script: Step, name: str = "scripted") -> None:
        assert script
        self.name = name
        self.script = list(script)
        self.calls: list[tuple[str, bytes, float]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.gate: asyncio.Event | None = None

    async def call(self, endpoint: str, body: bytes, *, timeout: float) -> UpstreamResponse:
        self.calls.append((endpoint, body, timeout))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.gate is not None:
                await self.gate.wait()
            step = self.script[min(len(self.calls) - 1, len(self.script) - 1)]
            if isinstance(step, UpstreamError):
                raise step
            return step() if callable(step) else step
        finally:
            self.in_flight -= 1


@pytest.fixture
def delays(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The delays the dispatcher computes (with the real policy), while it actually waits none of them."""
    seen: list[float] = []
    real = retry.backoff_delay  # the policy the dispatcher calls (patched where it looks it up)

    def record(retries_done: int, retry_after: float | None, **kw: Any) -> float:
        seen.append(real(retries_done, retry_after, **kw))
        return 0.0

    monkeypatch.setattr(dispatcher_mod, "backoff_delay", record)
    return seen


def make(
    upstream: Upstream, *, max_retries: int = 3, concurrency: int = 4, timeout: float = 7.5
) -> Dispatcher:
    return Dispatcher(
        Router([(None, upstream)], limiter=lambda: Limiter(concurrency)),
        attempt_timeout=timeout,
        max_retries=max_retries,
    )


async def run(d: Dispatcher, body: dict[str, Any] | None = None, stop: StopSignal | None = None) -> Outcome:
    return await d.execute(ENDPOINT, "req-1", BODY if body is None else body, stop or StopSignal())


def parsed(outcome: Outcome) -> dict[str, Any]:
    assert outcome.line.endswith(b"\n") and outcome.line.count(b"\n") == 1
    obj: dict[str, Any] = json.loads(outcome.line)
    assert obj["custom_id"] == "req-1"
    assert obj["id"].startswith("batch_req_")
    return obj


# -- one call -------------------------------------------------------------------------------------------------


async def test_success_goes_to_output_with_usage() -> None:
    up = Scripted(ok())
    out = await run(make(up))
    assert out.ok and out.stopped is None
    assert out.usage == Usage(input_tokens=12, cached_tokens=2, output_tokens=5, reasoning_tokens=1)
    obj = parsed(out)
    assert obj["error"] is None
    assert obj["response"]["status_code"] == 200
    assert obj["response"]["request_id"] == "req_up_1"
    assert obj["response"]["body"]["choices"][0]["message"]["content"] == "hello"
    assert len(up.calls) == 1


async def test_the_request_is_sent_as_given() -> None:
    up = Scripted(ok())
    await run(make(up, timeout=7.5))
    endpoint, payload, timeout = up.calls[0]
    assert endpoint == ENDPOINT
    assert json.loads(payload) == BODY
    assert timeout == 7.5


async def test_success_body_is_kept_byte_exact() -> None:
    raw = b'{"id":"x",  "value": 1.50, "usage": {"prompt_tokens": 3}}'
    up = Scripted(UpstreamResponse(200, {}, raw, "r"))
    out = await run(make(up))
    assert out.ok
    assert b'"body":' + raw + b"}" in out.line
    assert out.usage == Usage(input_tokens=3)


async def test_missing_request_id_is_empty() -> None:
    out = await run(make(Scripted(ok(request_id=None))))
    assert parsed(out)["response"]["request_id"] == ""


async def test_client_error_goes_to_error_file_with_body(delays: list[float]) -> None:
    body = {
        "error": {"message": "bad param", "type": "invalid_request_error", "param": "messages", "code": None}
    }
    up = Scripted(status(400, json.dumps(body).encode()))
    out = await run(make(up))
    assert not out.ok and out.stopped is None
    assert out.usage is None
    obj = parsed(out)
    assert obj["response"] == {"status_code": 400, "request_id": "req_400", "body": body}
    assert obj["error"] is None
    assert len(up.calls) == 1
    assert delays == []


async def test_non_json_error_body_is_wrapped() -> None:
    up = Scripted(status(404, b"<html>Not Found</html>"))
    obj = parsed(await run(make(up)))
    assert obj["response"]["status_code"] == 404
    assert obj["response"]["body"] == {
        "error": {"message": "<html>Not Found</html>", "type": "upstream_error", "param": None, "code": None}
    }


@pytest.mark.parametrize("raw", [b"not json at all", b"", b"[1, 2]", b'"text"', b"null"])
async def test_success_without_a_json_object_is_an_error(raw: bytes) -> None:
    up = Scripted(UpstreamResponse(200, {}, raw, "r"))
    out = await run(make(up))
    assert not out.ok
    assert out.usage is None
    obj = parsed(out)
    assert obj["response"] is None
    assert obj["error"]["code"] == "invalid_upstream_response"
    assert "200" in obj["error"]["message"]
    assert len(up.calls) == 1


# -- retries --------------------------------------------------------------------------------------------------


async def test_429_then_success(delays: list[float]) -> None:
    up = Scripted(status(429, headers={"retry-after-ms": "0"}), ok())
    out = await run(make(up))
    assert out.ok
    assert len(up.calls) == 2
    assert len(delays) == 1 and 0.037 <= delays[0] <= 0.05  # "retry now" still backs off a little (jitter)
    assert parsed(out)["response"]["status_code"] == 200


async def test_retry_after_is_honoured(delays: list[float]) -> None:
    up = Scripted(
        status(503, headers={"retry-after": "2"}), status(429, headers={"retry-after-ms": "250"}), ok()
    )
    out = await run(make(up))
    assert out.ok
    assert delays == [2.0, 0.25]


@pytest.mark.parametrize("code", [408, 409, 429, 500, 502, 503])
async def test_retryable_status_forever_ends_as_error_line(delays: list[float], code: int) -> None:
    up = Scripted(status(code, b'{"error": {"message": "overloaded"}}'))
    out = await run(make(up, max_retries=3))
    assert not out.ok and out.stopped is None
    assert len(up.calls) == 4  # max_retries + 1
    assert len(delays) == 3
    obj = parsed(out)
    assert obj["response"]["status_code"] == code
    assert obj["response"]["body"] == {"error": {"message": "overloaded"}}


async def test_no_retries_when_max_retries_is_zero(delays: list[float]) -> None:
    up = Scripted(status(500), ok())
    out = await run(make(up, max_retries=0))
    assert not out.ok
    assert len(up.calls) == 1
    assert delays == []


async def test_backoff_grows_without_retry_after(delays: list[float]) -> None:
    up = Scripted(status(500, headers={}))
    await run(make(up, max_retries=4))
    assert len(delays) == 4
    for i, d in enumerate(delays):
        assert 0.5 * 2**i * 0.75 < d <= 0.5 * 2**i


async def test_connect_error_is_retried(delays: list[float]) -> None:
    up = Scripted(UpstreamError("connect", "connection refused"), UpstreamError("timeout", "deadline"), ok())
    out = await run(make(up))
    assert out.ok
    assert len(up.calls) == 3
    assert len(delays) == 2
    assert 0.375 < delays[0] <= 0.5
    assert 0.75 < delays[1] <= 1.0


@pytest.mark.parametrize(("kind", "code"), [("connect", "upstream_connect"), ("timeout", "request_timeout")])
async def test_connect_error_forever_ends_as_error_line(delays: list[float], kind: str, code: str) -> None:
    up = Scripted(UpstreamError(kind, f"{kind} failed"))
    out = await run(make(up, max_retries=2))
    assert not out.ok
    assert len(up.calls) == 3
    obj = parsed(out)
    assert obj["response"] is None
    assert obj["error"] == {"code": code, "message": f"{kind} failed"}  # a timeout: OpenAI's request_timeout


async def test_too_large_is_not_retried(delays: list[float]) -> None:
    up = Scripted(UpstreamError("too_large", "response body over 64 MiB"), ok())
    out = await run(make(up))
    assert not out.ok
    assert len(up.calls) == 1
    assert delays == []
    assert parsed(out)["error"] == {"code": "upstream_too_large", "message": "response body over 64 MiB"}


# -- routing --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["unknown-model", None, 42])
async def test_model_not_routable(model: object) -> None:
    up = Scripted(ok())
    d = Dispatcher(Router([("m", up)], limiter=lambda: Limiter(1)), attempt_timeout=1.0, max_retries=0)
    body = {**BODY, "model": model}
    out = await d.execute(ENDPOINT, "req-1", body, StopSignal())
    assert not out.ok
    assert up.calls == []
    obj = parsed(out)
    assert obj["response"] is None
    assert obj["error"]["code"] == "model_not_found"
    assert repr(model) in obj["error"]["message"]


async def test_lines_go_to_their_model_upstream() -> None:
    a, b = Scripted(ok(), name="a"), Scripted(ok(), name="b")
    router = Router([("model-a", a), (None, b)], limiter=lambda: Limiter(1))
    d = Dispatcher(router, attempt_timeout=1.0, max_retries=0)
    await d.execute(ENDPOINT, "req-1", {**BODY, "model": "model-a"}, StopSignal())
    await d.execute(ENDPOINT, "req-1", {**BODY, "model": "other"}, StopSignal())
    await d.execute(ENDPOINT, "req-1", {**BODY, "model": "model-a"}, StopSignal())
    assert (len(a.calls), len(b.calls)) == (2, 1)


# -- stop signals ---------------------------------------------------------------------------------------------


def test_stop_signal_keeps_the_first_code() -> None:
    stop = StopSignal()
    assert stop.code is None
    stop.set("batch_expired")
    stop.set("batch_cancelled")
    assert stop.code == "batch_expired"


@pytest.mark.parametrize("code", ["batch_cancelled", "batch_expired"])
async def test_stopped_line_is_not_executed(code: str) -> None:
    up = Scripted(ok())
    stop = StopSignal()
    stop.set(code)
    out = await run(make(up), stop=stop)
    assert not out.ok
    assert out.stopped == code
    assert up.calls == []
    assert parsed(out)["error"] == {"code": code, "message": NOT_EXECUTED_MESSAGES[code]}


async def test_stop_between_retries_ends_the_line(delays: list[float]) -> None:
    stop = StopSignal()

    def fail_and_cancel() -> UpstreamResponse:
        stop.set("batch_cancelled")
        return status(503)

    up = Scripted(fail_and_cancel, ok())
    out = await run(make(up), stop=stop)
    assert not out.ok
    assert len(up.calls) == 1
    assert out.stopped == "batch_cancelled"  # sent once, then stopped before the retry
    assert parsed(out)["error"]["code"] == "batch_cancelled"


async def test_stop_does_not_touch_a_finished_line() -> None:
    stop = StopSignal()

    def succeed_and_cancel() -> UpstreamResponse:
        stop.set("batch_cancelled")
        return ok()

    out = await run(make(Scripted(succeed_and_cancel)), stop=stop)
    assert out.ok


# -- concurrency ----------------------------------------------------------------------------------------------


async def test_lines_in_flight_are_bounded_per_upstream() -> None:
    up = Scripted(ok())
    up.gate = asyncio.Event()
    d = make(up, concurrency=3)
    tasks = [asyncio.create_task(run(d)) for _ in range(10)]
    for _ in range(20):
        await asyncio.sleep(0)
    assert up.in_flight == 3
    up.gate.set()
    outs = await asyncio.gather(*tasks)
    assert all(o.ok for o in outs)
    assert up.max_in_flight == 3
    assert len(up.calls) == 10


async def test_each_upstream_has_its_own_slots() -> None:
    a, b = Scripted(ok(), name="a"), Scripted(ok(), name="b")
    a.gate = asyncio.Event()
    router = Router([("model-a", a), (None, b)], limiter=lambda: Limiter(1))
    d = Dispatcher(router, attempt_timeout=1.0, max_retries=0)
    blocked = asyncio.create_task(d.execute(ENDPOINT, "req-1", {**BODY, "model": "model-a"}, StopSignal()))
    for _ in range(5):
        await asyncio.sleep(0)
    assert a.in_flight == 1
    out = await asyncio.wait_for(d.execute(ENDPOINT, "req-1", {**BODY, "model": "b"}, StopSignal()), 5)
    assert out.ok
    a.gate.set()
    assert (await blocked).ok
