"""The online front door: `POST /v1/chat/completions`, `/v1/completions`, `/v1/embeddings` and `/v1/responses`,
passed through to the upstreams that serve batch lines (the same router, groups and members).

A request is authenticated like every route, counted against its owner's online rate (`--project-online-rpm`),
read with the request-line cap (`domain/validation.MAX_LINE_BYTES`) and checked for a JSON object with a routable
`model` (only `model` is read); then its bytes go to one member of the model's group as they came (never
re-serialized: no `priority` hint is added, an integer past 64 bits stays exact), and the upstream's status, body,
content type and `x-request-id` come back as they were. An answer of server-sent events (`"stream": true`) is
relayed event by event as the upstream sends them; a client that goes away closes the upstream request. Every
upstream call is held in `Services.online.hold(member)` for its whole duration (a stream to its end): that is how
batch lines yield to it.

No answer from the upstream: a connection failure is tried once more on another member of the group when there is
one (ejected members come last, as for batch lines); then 502 `upstream_connect`, 504 `request_timeout` (no head,
or no whole answer, within the member's timeout or `--attempt-timeout`: a stream's too, and no chunk of a stream
within it of the one before), 502 `upstream_too_large`. An answer that is not
one: 502 `upstream_bad_status` (a 1xx, or a status HTTP has not); 502 `upstream_auth` for its 401 or 407 (it
refused batchyard's key, not the client's: the SDK must not take it for its own); an error status whose body is no OpenAI error
object (an HTML page) keeps its status, its body becomes one (`upstream_error`). A stream that breaks off after
its head, or ends in the middle of an event, ends with an `error` event (the openai SDK raises it); half an event
is never passed on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import orjson
from fastapi import APIRouter, Request
from starlette.requests import ClientDisconnect
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from batchyard import metrics
from batchyard.api.deps import required_str, shown
from batchyard.api.quotas import CreateRates
from batchyard.api.services import Services
from batchyard.domain.validation import MAX_LINE_BYTES
from batchyard.errors import (
    APIError,
    BadGateway,
    GatewayTimeout,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    StoreError,
)
from batchyard.execution import failure_log
from batchyard.upstreams.base import UpstreamError, UpstreamResponse, UpstreamStream
from batchyard.upstreams.pool import Member, pick

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses")
MAX_BODY = MAX_LINE_BYTES  # the largest request line a batch may hold
PASSED_HEADERS = ("x-request-id", "retry-after", "retry-after-ms")  # besides content-type
OwnerOf = Callable[[Request], str]

# In /openapi.json: the body is any JSON object with a `model` (its schema is the upstream's business).
_OPENAPI = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["model"],
                    "properties": {"model": {"type": "string"}, "stream": {"type": "boolean"}},
                    "additionalProperties": True,
                }
            }
        },
    },
}


def router(svc: Services, owner_of: OwnerOf) -> APIRouter:
    r = APIRouter()
    door = FrontDoor(svc, owner_of)
    for endpoint in ENDPOINTS:
        r.add_api_route(
            endpoint,
            door.route(endpoint),
            methods=["POST"],
            response_model=None,
            summary=f"Online {endpoint[4:]} (passed through to the model's upstream)",
            openapi_extra=_OPENAPI,
        )
    return r


class FrontDoor:
    def __init__(self, svc: Services, owner_of: OwnerOf) -> None:
        self._svc = svc
        self._owner_of = owner_of
        self._rates = CreateRates(what="online requests")
        self._in_flight: dict[str, int] = {}  # owner -> online requests in flight (this process)

    def route(self, endpoint: str) -> Callable[[Request], Awaitable[Response]]:
        async def online(request: Request) -> Response:
            return await self.handle(endpoint, request)

        online.__name__ = "online_" + endpoint[4:].replace("/", "_")
        return online

    async def handle(self, endpoint: str, request: Request) -> Response:
        started = time.perf_counter()
        try:
            owner = self._owner_of(request)
            self._rates.admit(owner, self._svc.settings.project_online_rpm)
            release = self._take_slot(owner)
        except (APIError, StoreError) as e:  # a stored key that could not be read: the handler answers 503
            status = e.status_code if isinstance(e, APIError) else 503
            metrics.online_request(endpoint, status, time.perf_counter() - started)
            raise
        try:
            response = await self._handle(endpoint, request, started)
        except BaseException:
            release()
            raise
        if isinstance(response, _Relay):
            response.ended.append(release)  # the stream holds its slot to its end
        else:
            release()
        return response

    def _take_slot(self, owner: str) -> Callable[[], None]:
        """Count one online request of `owner` in flight (429 past `--project-online-concurrency`); returns what
        ends it (once)."""
        cap = self._svc.settings.project_online_concurrency
        held = self._in_flight.get(owner, 0)
        if cap and held >= cap:
            raise RateLimited(
                f"Too many online requests in flight at once for this project: the limit is {cap}. Wait for "
                "one to end and try again.",
                retry_after=1,
            )
        self._in_flight[owner] = held + 1
        done = False

        def release() -> None:
            nonlocal done
            if done:
                return
            done = True
            left = self._in_flight[owner] - 1
            if left:
                self._in_flight[owner] = left
            else:
                del self._in_flight[owner]

        return release

    async def _handle(self, endpoint: str, request: Request, started: float) -> Response:
        status = 500
        try:
            try:
                raw = await read_body(request)
            except ClientDisconnect:  # it left while sending its body: nobody reads an answer
                status = CLIENT_GONE
                return Response(status_code=CLIENT_GONE)
            model = inspect(raw)
            group = self._svc.router.group(model)
            if group is None:
                raise NotFound(
                    f"The model '{shown(model)}' does not exist or you do not have access to it.",
                    param="model",
                    code="model_not_found",
                )
            response = await _unless_gone(request, self._forward(endpoint, group, raw, started))
            status = _RELAYED if isinstance(response, _Relay) else response.status_code
            return response
        except APIError as e:
            status = e.status_code
            raise
        except StoreError:  # a stored key could not be read: the error handler answers 503
            status = 503
            raise
        finally:
            if status != _RELAYED:
                metrics.online_request(endpoint, status, time.perf_counter() - started)

    async def _forward(self, endpoint: str, group: list[Member], raw: bytes, started: float) -> Response:
        member = pick(group)
        try:
            return await self._attempt(member, endpoint, raw, started)
        except UpstreamError as e:
            others = [m for m in group if m is not member]
            if e.kind != "connect" or not others:
                raise _api_error(e) from None
        try:
            return await self._attempt(pick(others), endpoint, raw, started)
        except UpstreamError as e:
            raise _api_error(e) from None

    async def _attempt(self, member: Member, endpoint: str, raw: bytes, started: float) -> Response:
        call = await _Call.open(self._svc, member)
        try:
            up = await member.upstream.stream(endpoint, raw, timeout=call.timeout)
        except UpstreamError as e:
            await call.failed(e)
            raise
        except BaseException:
            await call.finish(None, True)
            raise
        if not 200 <= up.status <= 599:  # a 1xx as the answer (101), or a number HTTP has not
            await up.aclose()
            await call.finish(str(up.status), False)
            raise BadGateway(
                f"The upstream serving this model answered with status {up.status}, which is not a final HTTP "
                "status.",
                code="upstream_bad_status",
            )
        content_type = _header(up.headers.get("content-type")) or "application/json"
        headers = {k: v for k in PASSED_HEADERS if (v := _header(up.headers.get(k))) is not None}
        # an event stream is relayed whatever the request's `stream` said (`"true"`, which engines coerce)
        if 200 <= up.status < 300 and content_type.lower().startswith("text/event-stream"):
            headers["cache-control"] = "no-cache"
            return _Relay(up, call, endpoint, started, headers, content_type)
        try:
            body = await _whole(up, call.deadline)
        except UpstreamError as e:
            await up.aclose()
            await call.failed(e)
            raise
        except BaseException:
            await up.aclose()
            await call.finish(None, True)
            raise
        await up.aclose()
        if up.status >= 400:
            failure_log.answered(member, UpstreamResponse(up.status, up.headers, body, None))
            if up.status in (401, 407):  # batchyard's key for it, not the client's: the operator's to fix
                await call.finish(str(up.status), _healthy(up.status))
                raise BadGateway(
                    f"The upstream serving this model refused batchyard's credentials for it (HTTP {up.status}).",
                    code="upstream_auth",
                )
            if not _is_error_object(body):  # an HTML page, a plain text: every error is OpenAI-shaped
                body, content_type = _wrapped_error(up.status, content_type, body), "application/json"
        await call.finish(str(up.status), _healthy(up.status))
        metrics.online_first_byte(endpoint, time.perf_counter() - started)
        return Response(body, status_code=up.status, headers=headers, media_type=content_type)


_RELAYED = -1  # the status `handle` leaves for a relayed stream, whose end counts it
CLIENT_GONE = 499  # the status counted when the client left before the answer's head (nginx's number for it)


async def _unless_gone(request: Request, work: Coroutine[Any, Any, Response]) -> Response:
    """`work`'s response, unless the client goes away first: then `work` is cancelled (which ends its upstream
    request) and the answer is a bare 499 that nobody reads."""
    forward = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request.receive))
    try:
        await asyncio.wait((forward, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (forward, gone):
            task.cancel()
        await asyncio.gather(forward, gone, return_exceptions=True)
    if forward.cancelled():
        return Response(status_code=CLIENT_GONE)
    return forward.result()


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class _Call:
    """One upstream call of an online request: held in the online gate, measured, and its member's health told
    once it ends (`finish`, once)."""

    def __init__(self, member: Member, stack: contextlib.AsyncExitStack, timeout: float) -> None:
        self.member = member
        self.timeout = timeout
        self.deadline = asyncio.get_running_loop().time() + timeout  # the whole answer's, a stream's too
        self._stack = stack
        self._meter = metrics.upstream(member.name)
        self._sent_at = self._meter.sent()
        self._open = True
        member.health.on_attempt(time.monotonic())

    @classmethod
    async def open(cls, svc: Services, member: Member) -> _Call:
        stack = contextlib.AsyncExitStack()
        await stack.enter_async_context(svc.online.hold(member))
        return cls(member, stack, member.timeout or svc.settings.attempt_timeout)

    async def failed(self, error: UpstreamError) -> None:
        failure_log.failed(self.member, error)
        # a timeout says the upstream is busy, not broken (as for batch lines)
        await self.finish(
            metrics.upstream_error_status(error.kind), None if error.kind == "timeout" else False
        )

    async def finish(self, status: str | None, healthy: bool | None) -> None:
        """`status`: the metric's label, None when the client cut the call short; `healthy`: None says nothing."""
        if not self._open:
            return
        self._open = False
        try:
            if healthy is not None and status is not None:
                self.member.health.on_result(healthy, time.monotonic())
            self._meter.answered(self._sent_at, status)
        finally:
            await self._stack.aclose()


class _Relay(StreamingResponse):
    """A stream of server-sent events relayed as it arrives; the upstream call ends with it, whichever way it
    ends (its last event, a break, the client going away)."""

    def __init__(
        self,
        up: UpstreamStream,
        call: _Call,
        endpoint: str,
        started: float,
        headers: dict[str, str],
        content_type: str,
    ) -> None:
        super().__init__(up.chunks, status_code=up.status, headers=headers, media_type=content_type)
        self._up = up
        self._call = call
        self._endpoint = endpoint
        self._started = started
        self.ended: list[Callable[[], None]] = []  # called once the stream ended, whichever way

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        relay = asyncio.ensure_future(self._relay(send))
        gone = asyncio.ensure_future(_disconnected(receive))
        status: str | None = None  # stays None when the client went away first
        healthy: bool | None = None
        try:
            await asyncio.wait((relay, gone), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (relay, gone):
                task.cancel()
            await asyncio.gather(relay, gone, return_exceptions=True)
            failure = None if relay.cancelled() else relay.exception()
            if not relay.cancelled() and failure is None:
                status, healthy = relay.result()
            for end in self.ended:
                end()
            await self._up.aclose()
            await self._call.finish(status, healthy)
            counted = self._up.status if status is not None else CLIENT_GONE  # the client left mid-stream
            metrics.online_request(self._endpoint, counted, time.perf_counter() - self._started)
        if failure is not None and not isinstance(failure, OSError):  # OSError: the client left as we wrote
            raise failure

    async def _relay(self, send: Send) -> tuple[str, bool | None]:
        """Pass on each whole event as it arrives; the bytes of an event not ended yet wait for its end, so that a
        stream that breaks off mid-event ends with the error event alone, never with half an event (which the
        SDK would fail to parse instead of raising the error)."""
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        first, pending = True, b""  # pending: the start of an event not ended yet
        try:
            async with asyncio.timeout_at(self._call.deadline):  # the whole stream, as a batch line's answer
                async for chunk in self._up.chunks:
                    data = pending + chunk if pending else chunk
                    cut = _events_end(data)
                    pending = data[cut:]
                    if not cut:
                        continue
                    if first:
                        metrics.online_first_byte(self._endpoint, time.perf_counter() - self._started)
                        first = False
                    await send({"type": "http.response.body", "body": data[:cut], "more_body": True})
            if pending.strip(b"\r\n"):  # the stream ended without the blank line after its last event
                if not pending.endswith((b"\n", b"\r")):  # in the middle of a line: cut short
                    raise UpstreamError("connect", "upstream stream ended in the middle of an event")
                # its lines are whole (`data: [DONE]\n`, as some engines end): the blank line makes it an event
                await send({"type": "http.response.body", "body": pending + pending[-1:], "more_body": True})
        except TimeoutError:
            e = UpstreamError("timeout", f"upstream stream did not end within {self._call.timeout:g}s")
            failure_log.failed(self._call.member, e)
            await send({"type": "http.response.body", "body": _error_event(e), "more_body": False})
            return metrics.upstream_error_status(e.kind), None
        except UpstreamError as e:
            failure_log.failed(self._call.member, e)
            await send({"type": "http.response.body", "body": _error_event(e), "more_body": False})
            return metrics.upstream_error_status(e.kind), None if e.kind == "timeout" else False
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return str(self.status_code), True


def _events_end(data: bytes) -> int:
    """Where the last whole event of `data` ends (after its blank line: LF LF, CRLF CRLF or CR CR); 0: none."""
    ends = (data.rfind(sep) for sep in _BLANK_LINES)
    return max((at + len(sep) for at, sep in zip(ends, _BLANK_LINES, strict=True) if at >= 0), default=0)


_BLANK_LINES = (b"\n\n", b"\r\n\r\n", b"\r\r")


def _error_event(e: UpstreamError) -> bytes:
    err = _api_error(e)
    return b"event: error\ndata: " + orjson.dumps(err.to_dict()) + b"\n\n"


async def _whole(up: UpstreamStream, deadline: float) -> bytes:
    """An answer that is not relayed, read whole by `deadline` (the loop's clock): the call's timeout bounds the
    whole answer, as a batch line's, not each chunk (an upstream that drips would hold the request for ever)."""
    try:
        async with asyncio.timeout_at(deadline):
            return b"".join([chunk async for chunk in up.chunks])
    except TimeoutError:
        raise UpstreamError("timeout", "upstream did not send its whole answer in time") from None


def _is_error_object(body: bytes) -> bool:
    """Whether an upstream's error body is OpenAI's envelope: a JSON object with an `error` object."""
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    return isinstance(parsed, dict) and isinstance(parsed.get("error"), dict)


def _wrapped_error(status: int, content_type: str, body: bytes) -> bytes:
    """An upstream's error answer that is no OpenAI error object, as one (its status is kept), with the upstream's
    own words when it has some (vLLM's `{"object": "error", "message": ...}`, TGI's and Ollama's `{"error": "..."}`,
    FastAPI's `{"detail": "..."}`)."""
    words = _upstream_words(body)
    kind = content_type.split(";")[0].strip()[:100] or "no content type"
    message = (
        f"The upstream serving this model answered {status}: {shown(words, 2000)}"
        if words
        else f"The upstream serving this model answered {status} without an OpenAI error object ({kind}, "
        f"{len(body)} bytes)."
    )
    err = (BadGateway if status >= 500 else InvalidRequest)(message, code="upstream_error")
    return orjson.dumps(err.to_dict())


def _upstream_words(body: bytes) -> str | None:
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(parsed, dict):
        return None
    for name in ("message", "error", "detail"):
        value = parsed.get(name)
        if isinstance(value, str) and value:
            return value
    return None


def _header(value: str | None) -> str | None:
    """An upstream's header value as passed on: printable ASCII of at most 1 KiB (anything else is dropped)."""
    if value is None or len(value) > 1024 or not value.isascii() or not value.isprintable():
        return None
    return value


def _healthy(status: int) -> bool | None:
    """What an answer says of its upstream's health, as for batch lines: 429 and 503 only that it is busy."""
    if status in (429, 503):
        return None
    return status < 500


def _api_error(e: UpstreamError) -> APIError:
    if e.kind == "timeout":
        return GatewayTimeout(
            f"The upstream serving this model timed out: {e.message}.", code="request_timeout"
        )
    if e.kind == "too_large":
        return BadGateway(
            f"The upstream serving this model answered too much: {e.message}.", code="upstream_too_large"
        )
    return BadGateway(
        f"The upstream serving this model could not be reached: {e.message}.", code="upstream_connect"
    )


def _too_large() -> PayloadTooLarge:
    return PayloadTooLarge(
        f"The request body is too large: the limit is {MAX_BODY} bytes.", code="request_too_large"
    )


async def read_body(request: Request) -> bytes:
    """The request's body, at most MAX_BODY bytes (413 past it: at once when Content-Length says so)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY:
        raise _too_large()
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_BODY:
            raise _too_large()
    return bytes(raw)


def inspect(raw: bytes) -> str:
    """The request's `model`; 400 unless the body is a JSON object with a model. Only `model` is read (the bytes
    go on as they came), so numbers are not kept: orjson reads integers past 64 bits as floats and no number past
    a double's range, which the standard library then reads (a valid body is the upstream's to judge)."""
    try:
        body: Any = orjson.loads(raw)
    except orjson.JSONDecodeError:
        body = _loads_any_number(raw)
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_json")
    model = required_str(body, "model")
    try:
        model.encode()
    except UnicodeEncodeError:  # a lone surrogate escape: valid JSON, no Unicode (and no model)
        raise InvalidRequest(
            "Invalid 'model': the string is not valid Unicode.", param="model", code="invalid_value"
        ) from None
    return model


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _loads_any_number(raw: bytes) -> Any:
    try:
        return json.loads(raw, parse_int=len, parse_float=len, parse_constant=_no_constant)
    except (ValueError, RecursionError):  # invalid UTF-8 is a UnicodeDecodeError, a ValueError
        raise InvalidRequest(
            "We could not parse the JSON body of your request. The body must be a JSON object.",
            code="invalid_json",
        ) from None
