"""Deterministic fake OpenAI-compatible inference upstream for tests.

Every answer is a pure function of the request body, so a response that ends up
attached to the wrong request is caught: :func:`expected_text` gives the text a
request must come back with, :func:`build_response` the whole 200 body.

Per-request behaviour is driven by an optional ``x_fake`` object in the request
body (the Batch server forwards bodies untouched)::

    {"model": "m", "messages": [...], "x_fake": {"status": 503, "fail_times": 2}}

Supported ``x_fake`` keys:

``delay`` (float s)      sleep before answering (on top of the server-wide delay)
``status`` (int)         answer this status with an OpenAI error body
``fail_times`` (int)     with ``status``: fail only the first N times this exact
                         body (x_fake included) is seen, then succeed
``retry_after`` (str)    ``Retry-After`` header on failures
``non_json`` (bool)      200 with a text/plain, non-JSON body
``drip`` (float s)       send the JSON body chunked, one byte every ``drip`` s
``reset`` (bool)         send headers and half the body, then abort the connection
``big`` (int bytes)      pad the 200 JSON body with ``x_fake_padding`` of that size
``redirect`` (bool)      307 to /v1/chat/completions on this server (followed once)

Misbehaving answers (a hostile or broken upstream; the normal 200 body is kept unless said otherwise):

``nested`` (int N)       add ``x_fake_nested``: N arrays nested in each other (``[[[...]]]``), written as text, so
                         N may exceed what any JSON library writes; with ``status`` the *error* body carries it
``huge_int`` (bool)      add ``x_fake_huge``: the integer literal 2**70 (beyond 64 bits)
``huge_usage`` (bool)    every ``usage`` count is the integer literal 2**70
``odd_unicode`` (bool)   add ``x_fake_odd``: a lone surrogate escape, raw U+2028/U+2029, ``\\u0000``, RTL marks
``pretty`` (bool)        the 200 body pretty-printed (raw newlines and indentation between tokens)
``retry_after_ms`` (str) ``retry-after-ms`` header on failures (any text: ``99999999999``)
``continue_100`` (bool)  an interim ``HTTP/1.1 100 Continue`` before the real answer
``many_headers`` (int N) N extra response headers ``x-fake-h<i>``
``header_bytes`` (int N) one extra response header ``x-fake-big`` whose value is N bytes
``bad_status_line``      (bool) the raw answer starts with an invalid status line, then the connection closes
``content_length``       (int D) declare ``Content-Length`` = real length + D, written raw: D > 0 sends the body
                         and closes early (truncated), D < 0 sends the whole body, more than declared, then closes

Streaming (the front door): a body with ``"stream": true`` posted to chat/completions, completions or responses is
answered with server-sent events (text/event-stream): the expected text in three pieces, as OpenAI streams them
(chunks ending with ``data: [DONE]``; typed ``response.*`` events for responses). ``x_fake`` keys for it:

``stream_gap`` (float s) sleep between events
``hold`` (bool)          after the first event, wait (30 s at most) until :meth:`FakeUpstream.release` /
                         ``POST /_release``; ``/_stats`` counts ``streams_open``, ``streams_done`` and
                         ``streams_cancelled`` (the client went away mid-stream); ``streams_cut``: any
                         request whose client went away before its answer (its handler cancelled)

``GET /_received`` / :meth:`FakeUpstream.received` give the raw request bodies, in arrival order (the last
``RECEIVED_KEEP``), so a test can check the exact bytes that reached the upstream (e.g. an integer beyond 64 bits).

Server-wide modes (constructor arguments / CLI flags): ``delay``, ``status_rate`` +
``status`` (a deterministic, hash-chosen fraction of bodies fails, see
:func:`selected_for_failure`), ``retry_after``, ``max_concurrency`` (429 with
``Retry-After: 0`` above N in-flight requests), ``slots`` (at most N requests are worked on at once, the rest
wait in a queue: an inference server at capacity, whose latency grows with its load) and ``api_key`` (Bearer auth,
401).

Run modes:

* in-process: ``with FakeUpstream() as up: ... up.base_url`` (background thread);
* subprocess: ``python -m tests.support.fake_upstream --port 0 [flags]`` prints
  ``READY http://127.0.0.1:PORT/v1`` once listening.

Test hooks: ``GET /_stats`` -> ``{"total", "by_key", "by_path", "in_flight",
"max_in_flight"}`` (``by_key`` is keyed by :func:`expected_text`), ``POST /_reset``
clears stats and ``fail_times`` counters, ``GET /health``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import json
import secrets
import signal
import socket
import struct
import sys
import threading
from collections.abc import Sequence
from types import TracebackType
from typing import Any

from aiohttp import web

__all__ = [
    "CREATED",
    "DEFAULT_MODELS",
    "EMBEDDING_DIM",
    "FAKE_KEY",
    "HUGE_INT",
    "ODD_UNICODE_JSON",
    "FakeUpstream",
    "build_app",
    "build_response",
    "canonical_json",
    "count_words",
    "expected_embedding",
    "expected_text",
    "main",
    "nested_json",
    "prompt_tokens",
    "selected_for_failure",
]

HOST = "127.0.0.1"
FAKE_KEY = "x_fake"
EMBEDDING_DIM = 8
COMPLETION_TOKENS = 3
CREATED = 1_700_000_000  # fixed so whole responses are deterministic
DEFAULT_MODELS: tuple[str, ...] = ("fake-model", "gpt-4o-mini", "text-embedding-3-small")
REDIRECT_MARKER = "x_fake_redirected"
INVALID_KEY = "<invalid-json>"
HUGE_INT = 2**70  # beyond 64 bits: a float would lose it
RECEIVED_KEEP = 10_000  # raw request bodies kept for received()
# odd Unicode, as JSON text: a lone surrogate escape, raw U+2028 and U+2029, a NUL escape, RLM and RLO marks
ODD_UNICODE_JSON = '"a\\ud800b \u2028 \u2029 \\u0000 \u200f\u202e \\udfff"'

ENDPOINTS: tuple[str, ...] = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
    "/v1/moderations",
)

MODERATION_CATEGORIES: tuple[str, ...] = (
    "harassment",
    "harassment/threatening",
    "hate",
    "hate/threatening",
    "illicit",
    "illicit/violent",
    "self-harm",
    "self-harm/instructions",
    "self-harm/intent",
    "sexual",
    "sexual/minors",
    "violence",
    "violence/graphic",
)

JSONDict = dict[str, Any]


# --------------------------------------------------------------------------- helpers


def _strip_fake(body: JSONDict) -> JSONDict:
    return {k: v for k, v in body.items() if k != FAKE_KEY}


def canonical_json(body: Any) -> str:
    """Canonical JSON text (sorted keys, no whitespace) used for all hashing."""
    return json.dumps(body, sort_keys=True, separators=(",", ":"))


def _digest(body: JSONDict) -> str:
    return hashlib.sha256(canonical_json(_strip_fake(body)).encode()).hexdigest()


def expected_text(body: JSONDict) -> str:
    """The text the fake answers ``body`` with (``x_fake`` is ignored)."""
    return "echo:" + _digest(body)[:16]


def selected_for_failure(body: JSONDict, rate: float) -> bool:
    """Whether the server-wide ``status_rate`` fails ``body`` (deterministic by hash).

    The choice depends only on the body without ``x_fake``, so a selected request
    fails on every attempt (retries included).
    """
    if rate <= 0:
        return False
    if rate >= 1:
        return True
    return int(_digest(body)[16:24], 16) / 2**32 < rate


def count_words(value: Any) -> int:
    """Whitespace-separated words in a str, a list of str / content parts, or a dict."""
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, list):
        if value and all(isinstance(v, int) for v in value):
            return len(value)  # a token array
        return sum(count_words(v) for v in value)
    if isinstance(value, dict):
        for key in ("text", "content", "input_text"):
            if key in value:
                return count_words(value[key])
    return 0


def prompt_tokens(path: str, body: JSONDict) -> int:
    """Fake prompt token count: number of whitespace-separated words of the prompt."""
    if path.endswith("/chat/completions"):
        messages = body.get("messages")
        if not isinstance(messages, list):
            return 0
        return sum(count_words(m.get("content")) for m in messages if isinstance(m, dict))
    if path.endswith("/completions"):
        return count_words(body.get("prompt"))
    if path.endswith("/responses"):
        return count_words(body.get("instructions")) + count_words(body.get("input"))
    return count_words(body.get("input"))


def _inputs(body: JSONDict) -> list[Any]:
    raw = body.get("input")
    if isinstance(raw, list) and raw and not all(isinstance(v, int) for v in raw):
        return list(raw)
    return [raw]


def expected_embedding(body: JSONDict, index: int = 0) -> list[float]:
    """The ``EMBEDDING_DIM``-dimensional embedding returned for input ``index``."""
    seed = hashlib.sha256(f"{_digest(body)}:{index}".encode()).digest()
    return [round(b / 127.5 - 1.0, 6) for b in seed[:EMBEDDING_DIM]]


def _id(prefix: str, body: JSONDict) -> str:
    return prefix + _digest(body)[:24]


def _usage_chat(path: str, body: JSONDict) -> JSONDict:
    prompt = prompt_tokens(path, body)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": COMPLETION_TOKENS,
        "total_tokens": prompt + COMPLETION_TOKENS,
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }


def build_response(path: str, body: JSONDict) -> JSONDict:
    """The exact 200 JSON body the fake returns for ``body`` posted to ``path``.

    ``path`` is the endpoint path, e.g. ``/v1/chat/completions`` (``big`` padding
    is not included).
    """
    model = body.get("model")
    text = expected_text(body)
    if path.endswith("/chat/completions"):
        return {
            "id": _id("chatcmpl-", body),
            "object": "chat.completion",
            "created": CREATED,
            "model": model,
            "system_fingerprint": "fp_fake",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text, "refusal": None},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": _usage_chat(path, body),
        }
    if path.endswith("/completions"):
        return {
            "id": _id("cmpl-", body),
            "object": "text_completion",
            "created": CREATED,
            "model": model,
            "system_fingerprint": "fp_fake",
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": "stop"}],
            "usage": _usage_chat(path, body),
        }
    if path.endswith("/responses"):
        prompt = prompt_tokens(path, body)
        return {
            "id": _id("resp_", body),
            "object": "response",
            "created_at": CREATED,
            "status": "completed",
            "error": None,
            "incomplete_details": None,
            "model": model,
            "output": [
                {
                    "type": "message",
                    "id": _id("msg_", body),
                    "status": "completed",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": text, "annotations": []}],
                }
            ],
            "usage": {
                "input_tokens": prompt,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": COMPLETION_TOKENS,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": prompt + COMPLETION_TOKENS,
            },
        }
    if path.endswith("/embeddings"):
        b64 = body.get("encoding_format") == "base64"
        data: list[JSONDict] = []
        for i in range(len(_inputs(body))):
            vec = expected_embedding(body, i)
            emb: Any = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode() if b64 else vec
            data.append({"object": "embedding", "index": i, "embedding": emb})
        prompt = prompt_tokens(path, body)
        return {
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": prompt, "total_tokens": prompt},
        }
    if path.endswith("/moderations"):
        results: list[JSONDict] = []
        for i in range(len(_inputs(body))):
            seed = hashlib.sha256(f"{_digest(body)}:mod:{i}".encode()).digest()
            scores = {c: round(seed[j] / 255 * 1e-3, 8) for j, c in enumerate(MODERATION_CATEGORIES)}
            results.append(
                {
                    "flagged": False,
                    "categories": dict.fromkeys(MODERATION_CATEGORIES, False),
                    "category_scores": scores,
                    "category_applied_input_types": {c: ["text"] for c in MODERATION_CATEGORIES},
                }
            )
        return {"id": _id("modr-", body), "model": model or "omni-moderation-latest", "results": results}
    raise ValueError(f"unknown endpoint {path!r}")


def _error_body(status: int, message: str, *, code: str | None = None, param: str | None = None) -> JSONDict:
    if status == 401:
        etype = "invalid_request_error"
        code = code or "invalid_api_key"
    elif status == 429:
        etype = "requests"
        code = code or "rate_limit_exceeded"
    elif status >= 500:
        etype = "server_error"
    else:
        etype = "invalid_request_error"
    return {"error": {"message": message, "type": etype, "param": param, "code": code}}


def _error(
    status: int,
    message: str,
    *,
    retry_after: str | None = None,
    retry_after_ms: str | None = None,
    code: str | None = None,
    param: str | None = None,
    nested: int = 0,
) -> web.Response:
    headers: dict[str, str] = {}
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    if retry_after_ms is not None:
        headers["retry-after-ms"] = str(retry_after_ms)
    body = _dumps(_error_body(status, message, code=code, param=param))
    if nested > 0:  # inside the error object, where a client that reads error.message looks
        body = body[:-2] + b',"x_fake_nested":' + nested_json(nested) + b"}}"
    return web.Response(status=status, body=body, content_type="application/json", headers=headers or None)


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def nested_json(depth: int) -> bytes:
    """``depth`` arrays nested in each other, as JSON text (built without recursion)."""
    return b"[" * depth + b"]" * depth


def _with_field(data: bytes, name: str, raw_value: bytes) -> bytes:
    """``data`` (a JSON object's text) with one more member whose value is the raw JSON text ``raw_value``."""
    return data[:-1] + b',"' + name.encode() + b'":' + raw_value + b"}"


def _huge_usage(payload: JSONDict) -> bytes:
    usage = payload.get("usage")
    marker = (
        1234567890123  # replaced by the literal text of HUGE_INT (json.dumps would write it too, but as int)
    )
    if isinstance(usage, dict):
        for k, v in usage.items():
            if isinstance(v, int):
                usage[k] = marker
    return _dumps(payload).replace(str(marker).encode(), str(HUGE_INT).encode())


def _odd_headers(fake: JSONDict) -> dict[str, str]:
    headers: dict[str, str] = {}
    for i in range(int(fake.get("many_headers", 0))):
        headers[f"x-fake-h{i}"] = str(i)
    big = int(fake.get("header_bytes", 0))
    if big > 0:
        headers["x-fake-big"] = "b" * big
    return headers


def _raw_answer(request: web.Request, raw: bytes) -> web.Response:
    """Write ``raw`` on the connection as the whole answer and close it (aiohttp then sends nothing)."""
    transport = request.transport
    if transport is not None:
        transport.write(raw)
        transport.close()
    return web.Response(status=200)


def _content_length_lie(request: web.Request, data: bytes, delta: int) -> web.Response:
    declared = max(0, len(data) + delta)
    head = (
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        f"Content-Length: {declared}\r\nx-request-id: req_{secrets.token_hex(16)}\r\n\r\n"
    )
    return _raw_answer(request, head.encode() + data)


# --------------------------------------------------------------------------- server state


class _State:
    """Counters shared by the handlers (server loop) and ``FakeUpstream.stats()``."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.total = 0
        self.by_key: dict[str, int] = {}
        self.by_path: dict[str, int] = {}
        self.in_flight = 0
        self.max_in_flight = 0
        self.seen: dict[str, int] = {}
        self.received: list[bytes] = []
        self.streams = {"open": 0, "done": 0, "cancelled": 0, "cut": 0}  # cut: a request whose client left
        self.released = asyncio.Event()  # `hold` streams go on once set (on the server's loop)

    def record(self, raw: bytes) -> None:
        with self.lock:
            self.received.append(raw)
            if len(self.received) > RECEIVED_KEEP:
                del self.received[: len(self.received) - RECEIVED_KEEP]

    def enter(self, path: str, key: str) -> int:
        with self.lock:
            self.total += 1
            self.by_key[key] = self.by_key.get(key, 0) + 1
            self.by_path[path] = self.by_path.get(path, 0) + 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            return self.in_flight

    def leave(self) -> None:
        with self.lock:
            self.in_flight -= 1

    def see(self, body: JSONDict) -> int:
        key = canonical_json(body)
        with self.lock:
            self.seen[key] = self.seen.get(key, 0) + 1
            return self.seen[key]

    def snapshot(self) -> JSONDict:
        with self.lock:
            return {
                "total": self.total,
                "by_key": dict(self.by_key),
                "by_path": dict(self.by_path),
                "in_flight": self.in_flight,
                "max_in_flight": self.max_in_flight,
                **{f"streams_{k}": v for k, v in self.streams.items()},
            }

    def stream_event(self, what: str, delta: int) -> None:
        with self.lock:
            self.streams[what] += delta

    def reset(self) -> None:
        with self.lock:
            self.total = 0
            self.by_key.clear()
            self.by_path.clear()
            self.seen.clear()
            self.received.clear()
            self.streams.update(done=0, cancelled=0, cut=0)
            self.released.clear()
            # in_flight reflects live requests and is kept; the peak restarts from it
            self.max_in_flight = self.in_flight


class _Config:
    def __init__(
        self,
        *,
        delay: float = 0.0,
        status_rate: float = 0.0,
        status: int = 500,
        retry_after: str | None = None,
        max_concurrency: int | None = None,
        slots: int | None = None,
        api_key: str | None = None,
        models: Sequence[str] = DEFAULT_MODELS,
    ) -> None:
        self.delay = delay
        # like an inference server at capacity: at most `slots` requests are worked on at once, the rest queue
        self.slots = asyncio.Semaphore(slots) if slots else None
        self.status_rate = status_rate
        self.status = status
        self.retry_after = retry_after
        self.max_concurrency = max_concurrency
        self.api_key = api_key
        self.models = tuple(models)


STATE_KEY = web.AppKey("fake_upstream_state", _State)
CONFIG_KEY = web.AppKey("fake_upstream_config", _Config)


def _check_auth(request: web.Request, cfg: _Config) -> web.Response | None:
    if cfg.api_key is None:
        return None
    if request.headers.get("Authorization", "") == f"Bearer {cfg.api_key}":
        return None
    return _error(401, "Incorrect API key provided.")


async def _inference(request: web.Request) -> web.StreamResponse:
    cfg = request.app[CONFIG_KEY]
    state = request.app[STATE_KEY]
    path = request.path
    raw = await request.read()
    state.record(raw)
    try:
        parsed: Any = json.loads(raw)
        key = expected_text(parsed) if isinstance(parsed, dict) else INVALID_KEY
    except (ValueError, RecursionError):  # nested deeper than Python's json reads: not parseable here
        parsed, key = None, INVALID_KEY
    body: JSONDict | None = parsed if isinstance(parsed, dict) else None
    in_flight = state.enter(path, key)
    try:
        denied = _check_auth(request, cfg)
        if denied is not None:
            return denied
        if cfg.max_concurrency is not None and in_flight > cfg.max_concurrency:
            return _error(429, "Too many concurrent requests.", retry_after="0")
        if body is None:
            return _error(400, "We could not parse the JSON body of your request.")
        fake = body.get(FAKE_KEY)
        if fake is not None and not isinstance(fake, dict):
            return _error(400, f"{FAKE_KEY} must be an object", param=FAKE_KEY)
        fake = fake or {}

        delay = cfg.delay + float(fake.get("delay", 0.0))
        if cfg.slots is not None:
            async with cfg.slots:
                await asyncio.sleep(delay)
        elif delay > 0:
            await asyncio.sleep(delay)

        retry_after = fake.get("retry_after", cfg.retry_after)
        retry_after_ms = fake.get("retry_after_ms")
        nested = int(fake.get("nested", 0))
        seen = state.see(body)
        status = fake.get("status")
        if status is not None:
            fail_times = fake.get("fail_times")
            if fail_times is None or seen <= int(fail_times):
                return _error(
                    int(status),
                    f"fake failure (status {status})",
                    retry_after=retry_after,
                    retry_after_ms=retry_after_ms,
                    nested=nested,
                )
        if selected_for_failure(body, cfg.status_rate):
            return _error(
                cfg.status,
                f"fake failure (status {cfg.status})",
                retry_after=retry_after,
                retry_after_ms=retry_after_ms,
            )
        if fake.get("continue_100") and request.transport is not None:
            request.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if fake.get("bad_status_line"):
            return _raw_answer(request, b"HTTP/1.1 2x0 NOT A STATUS\r\nContent-Length: 2\r\n\r\n{}")

        if fake.get("redirect") and REDIRECT_MARKER not in request.query:
            location = f"http://{request.host}/v1/chat/completions?{REDIRECT_MARKER}=1"
            return web.Response(status=307, headers={"Location": location})
        if fake.get("non_json"):
            return web.Response(text="this is not JSON <fake upstream>", content_type="text/plain")
        if "model" not in body and not path.endswith("/moderations"):
            return _error(400, "you must provide a model parameter", param="model")

        payload = build_response(path, body)
        if body.get("stream") is True and not path.endswith(("/embeddings", "/moderations")):
            return await _sse(request, path, payload, fake)
        big = int(fake.get("big", 0))
        if big > 0:
            payload["x_fake_padding"] = "x" * big
        data = _encode(payload, fake)
        if "content_length" in fake:
            return _content_length_lie(request, data, int(fake["content_length"]))

        if fake.get("reset"):
            resp = web.StreamResponse(status=200)
            resp.content_type = "application/json"
            resp.content_length = len(data)
            await resp.prepare(request)
            await resp.write(data[: max(1, len(data) // 2)])
            if request.transport is not None:
                request.transport.abort()
            return resp
        drip = float(fake.get("drip", 0.0))
        if drip > 0:
            resp = web.StreamResponse(status=200)
            resp.content_type = "application/json"
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            for i in range(len(data)):
                await resp.write(data[i : i + 1])
                await asyncio.sleep(drip)
            await resp.write_eof()
            return resp
        return web.Response(
            status=200, body=data, content_type="application/json", headers=_odd_headers(fake)
        )
    except asyncio.CancelledError:  # the client went away before the answer (its handler is cancelled)
        state.stream_event("cut", 1)
        raise
    finally:
        state.leave()


def _sse_events(path: str, payload: JSONDict) -> list[bytes]:
    """The server-sent events that stream `payload` (the whole answer) as OpenAI streams it."""
    if path.endswith("/responses"):
        message = payload["output"][0]
        text = message["content"][0]["text"]
        started = {**payload, "status": "in_progress", "output": [], "usage": None}
        events: list[JSONDict] = [{"type": "response.created", "response": started}]
        for piece in _pieces(text):
            events.append(
                {
                    "type": "response.output_text.delta",
                    "item_id": message["id"],
                    "output_index": 0,
                    "content_index": 0,
                    "delta": piece,
                    "logprobs": [],
                }
            )
        events.append({"type": "response.completed", "response": payload})
        out = []
        for i, event in enumerate(events):
            event["sequence_number"] = i
            out.append(b"event: " + event["type"].encode() + b"\ndata: " + _dumps(event) + b"\n\n")
        return out
    chat = path.endswith("/chat/completions")
    choice = payload["choices"][0]
    text = choice["message"]["content"] if chat else choice["text"]
    base = {k: payload[k] for k in ("id", "created", "model", "system_fingerprint")}
    base["object"] = "chat.completion.chunk" if chat else "text_completion"
    chunks = []
    for i, piece in enumerate([*_pieces(text), ""]):
        last = not piece
        if chat:
            delta: JSONDict = {} if last else {"content": piece}
            if i == 0:
                delta["role"] = "assistant"
            part: JSONDict = {"index": 0, "delta": delta, "logprobs": None}
        else:
            part = {"index": 0, "text": piece, "logprobs": None}
        part["finish_reason"] = "stop" if last else None
        chunks.append(b"data: " + _dumps({**base, "choices": [part]}) + b"\n\n")
    return [*chunks, b"data: [DONE]\n\n"]


def _pieces(text: str) -> list[str]:
    return [text[:5], text[5:13], text[13:]]


async def _sse(request: web.Request, path: str, payload: JSONDict, fake: JSONDict) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    resp = web.StreamResponse(status=200)
    resp.content_type = "text/event-stream"
    resp.headers["Cache-Control"] = "no-cache"
    await resp.prepare(request)
    gap = float(fake.get("stream_gap", 0.0))
    state.stream_event("open", 1)
    try:
        for i, event in enumerate(_sse_events(path, payload)):
            if i and gap > 0:
                await asyncio.sleep(gap)
            await resp.write(event)
            if i == 0 and fake.get("hold"):
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(state.released.wait(), 30)
        await resp.write_eof()
        state.stream_event("done", 1)
    except (asyncio.CancelledError, ConnectionResetError):
        state.stream_event("cancelled", 1)
        raise
    finally:
        state.stream_event("open", -1)
    return resp


def _encode(payload: JSONDict, fake: JSONDict) -> bytes:
    """The 200 body's bytes, with the misbehaving-answer directives of ``fake`` applied."""
    if fake.get("pretty"):
        data = json.dumps(payload, indent=2).encode()
    elif fake.get("huge_usage"):
        data = _huge_usage(payload)
    else:
        data = _dumps(payload)
    nested = int(fake.get("nested", 0))
    if nested > 0:
        data = _with_field(data, "x_fake_nested", nested_json(nested))
    if fake.get("huge_int"):
        data = _with_field(data, "x_fake_huge", str(HUGE_INT).encode())
    if fake.get("odd_unicode"):
        data = _with_field(data, "x_fake_odd", ODD_UNICODE_JSON.encode())
    return data


async def _models(request: web.Request) -> web.Response:
    cfg = request.app[CONFIG_KEY]
    denied = _check_auth(request, cfg)
    if denied is not None:
        return denied
    data = [{"id": m, "object": "model", "created": CREATED, "owned_by": "fake-upstream"} for m in cfg.models]
    return web.json_response({"object": "list", "data": data})


async def _stats(request: web.Request) -> web.Response:
    return web.json_response(request.app[STATE_KEY].snapshot())


async def _received(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    with state.lock:
        bodies = [b.decode("utf-8", "backslashreplace") for b in state.received]
    return web.json_response(bodies)


async def _release(request: web.Request) -> web.Response:
    request.app[STATE_KEY].released.set()
    return web.json_response({"ok": True})


async def _reset(request: web.Request) -> web.Response:
    request.app[STATE_KEY].reset()
    return web.json_response({"ok": True})


async def _health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _add_request_id(request: web.Request, response: web.StreamResponse) -> None:
    response.headers.setdefault("x-request-id", "req_" + secrets.token_hex(16))


def build_app(
    *,
    delay: float = 0.0,
    status_rate: float = 0.0,
    status: int = 500,
    retry_after: str | None = None,
    max_concurrency: int | None = None,
    slots: int | None = None,
    api_key: str | None = None,
    models: Sequence[str] = DEFAULT_MODELS,
) -> web.Application:
    """The aiohttp application (for callers that run it themselves)."""
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[CONFIG_KEY] = _Config(
        delay=delay,
        status_rate=status_rate,
        status=status,
        retry_after=retry_after,
        max_concurrency=max_concurrency,
        slots=slots,
        api_key=api_key,
        models=models,
    )
    app[STATE_KEY] = _State()
    for path in ENDPOINTS:
        app.router.add_post(path, _inference)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/_stats", _stats)
    app.router.add_get("/_received", _received)
    app.router.add_post("/_reset", _reset)
    app.router.add_post("/_release", _release)
    app.router.add_get("/health", _health)
    app.on_response_prepare.append(_add_request_id)
    return app


def _bind(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((HOST, port))
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


async def _start_site(app: web.Application, port: int) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=0.2)
    await runner.setup()
    sock = _bind(port)
    try:
        site = web.SockSite(runner, sock)
        await site.start()
    except BaseException:
        sock.close()
        await runner.cleanup()
        raise
    return runner, int(sock.getsockname()[1])


# --------------------------------------------------------------------------- thread mode


class FakeUpstream:
    """The fake upstream served from a background thread on 127.0.0.1.

    ``base_url`` (``http://127.0.0.1:PORT/v1``) is set by :meth:`start`.
    ``stats()`` / ``reset()`` read and clear the counters directly.
    """

    def __init__(
        self,
        delay: float = 0.0,
        *,
        status_rate: float = 0.0,
        status: int = 500,
        retry_after: str | None = None,
        max_concurrency: int | None = None,
        slots: int | None = None,
        api_key: str | None = None,
        models: Sequence[str] = DEFAULT_MODELS,
        port: int = 0,
    ) -> None:
        self._app_kwargs: JSONDict = {
            "delay": delay,
            "status_rate": status_rate,
            "status": status,
            "retry_after": retry_after,
            "max_concurrency": max_concurrency,
            "slots": slots,
            "api_key": api_key,
            "models": models,
        }
        self._requested_port = port
        self.port: int = 0
        self.base_url: str = ""
        self._state: _State | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._start_error: BaseException | None = None

    @property
    def root_url(self) -> str:
        """``http://127.0.0.1:PORT`` (without ``/v1``), for ``/_stats`` etc."""
        return f"http://{HOST}:{self.port}"

    def start(self) -> FakeUpstream:
        if self._thread is not None:
            raise RuntimeError("FakeUpstream already started")
        self._ready.clear()
        self._start_error = None
        self._thread = threading.Thread(target=self._run, name="fake-upstream", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._start_error is not None:
            self._thread.join()
            self._thread = None
            raise self._start_error
        return self

    def stop(self) -> None:
        thread, loop = self._thread, self._loop
        if thread is None:
            return
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(loop.stop)
        thread.join()
        self._thread = None
        self._loop = None

    def stats(self) -> JSONDict:
        if self._state is None:
            raise RuntimeError("FakeUpstream not started")
        return self._state.snapshot()

    def received(self) -> list[bytes]:
        """The raw request bodies received (the last ``RECEIVED_KEEP``), oldest first."""
        if self._state is None:
            raise RuntimeError("FakeUpstream not started")
        with self._state.lock:
            return list(self._state.received)

    def reset(self) -> None:
        if self._state is not None:
            self._state.reset()

    def release(self) -> None:
        """Let every stream held after its first event (``x_fake.hold``) go on."""
        if self._state is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(self._state.released.set)

    def __enter__(self) -> FakeUpstream:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        runner: web.AppRunner | None = None
        try:
            app = build_app(**self._app_kwargs)
            self._state = app[STATE_KEY]
            runner, self.port = loop.run_until_complete(_start_site(app, self._requested_port))
            self.base_url = f"http://{HOST}:{self.port}/v1"
        except BaseException as exc:
            self._start_error = exc
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            try:
                loop.run_until_complete(runner.cleanup())
                _cancel_all(loop)
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()


def _cancel_all(loop: asyncio.AbstractEventLoop) -> None:
    tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for task in tasks:
        task.cancel()
    if tasks:
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))


# --------------------------------------------------------------------------- subprocess mode


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m tests.support.fake_upstream",
        description="Deterministic fake OpenAI-compatible inference upstream.",
    )
    p.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0 picks a free one)")
    p.add_argument("--delay", type=float, default=0.0, help="seconds to wait before every answer")
    p.add_argument("--status-rate", type=float, default=0.0, help="fraction of bodies (by hash) that fail")
    p.add_argument("--status", type=int, default=500, help="status used with --status-rate")
    p.add_argument("--retry-after", default=None, help="Retry-After header on --status-rate failures")
    p.add_argument("--max-concurrency", type=int, default=None, help="429 above this many in flight")
    p.add_argument(
        "--slots",
        type=int,
        default=None,
        help="work on at most this many at once; the rest queue (a busy server)",
    )
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    p.add_argument("--model", action="append", dest="models", default=None, help="listed model (repeatable)")
    return p.parse_args(argv)


async def _serve(args: argparse.Namespace) -> None:
    app = build_app(
        delay=args.delay,
        status_rate=args.status_rate,
        status=args.status,
        retry_after=args.retry_after,
        max_concurrency=args.max_concurrency,
        slots=args.slots,
        api_key=args.api_key,
        models=args.models or DEFAULT_MODELS,
    )
    runner, port = await _start_site(app, args.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    print(f"READY http://{HOST}:{port}/v1", flush=True)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    asyncio.run(_serve(_parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
