"""The embedded engine behind the `Upstream` interface: no network, models loaded on first use.

Model names (exact): `smollm2-135m-instruct` answers /v1/chat/completions and /v1/completions,
`multilingual-e5-small` answers /v1/embeddings. Bad requests get an OpenAI error body with a 4xx status, as an HTTP
upstream would answer them; `UpstreamError` is raised only when there is no answer at all: the attempt's deadline
passed ("timeout": the engine stops a chat or text completion at its next token, `LLMEngine._run_all`, and finishes a
JSON-constrained one in the background) or a model could not be loaded or was closed
("connect").

Online requests (the front door) get the same answers. Asked for as a stream, a one-choice chat completion is
streamed as the engine makes it (`LLMEngine.stream_chat`: a client that goes away stops the engine); other requests
are made whole and then sent as events.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson

from batchyard.embedded.embeddings import EmbeddingEngine
from batchyard.embedded.llm import LLMEngine, default_threads
from batchyard.embedded.models import ModelError, Progress, ensure_smollm2, local_gguf
from batchyard.errors import APIError, InvalidRequest, NotFound
from batchyard.upstreams.base import Upstream, UpstreamError, UpstreamResponse, UpstreamStream
from batchyard.upstreams.streamed import streamable

CHAT_MODEL = "smollm2-135m-instruct"
EMBEDDING_MODEL = "multilingual-e5-small"
CHAT_ENDPOINTS = ("/v1/chat/completions", "/v1/completions")
EMBEDDING_ENDPOINTS = ("/v1/embeddings",)

Json = dict[str, Any]


class EmbeddedUpstream(Upstream):
    def __init__(
        self,
        *,
        model_path: str | Path | None = None,
        cache_dir: Path | None = None,
        slots: int = 4,
        context_size: int = 2048,
        threads: int | None = None,
        chat: bool = True,
        embeddings: bool = True,
        progress: Progress | None = None,
        chat_model: str = CHAT_MODEL,
    ) -> None:
        """`model_path`: a local GGUF to serve as the chat model instead of the downloaded SmolLM2.
        `slots`: requests generated at once (continuous batching); `context_size`: tokens per request.
        `threads`: CPU threads of both engines (None: `default_threads()`, half the cores).
        `progress(done, total)` is called from a worker thread while the model downloads."""
        if slots < 1 or context_size < 64:
            raise ValueError("slots must be at least 1 and context_size at least 64")
        self.name = "embedded"
        self.chat_model = chat_model
        self._model_path = model_path
        self._cache_dir = cache_dir
        self._progress = progress
        self._llm: LLMEngine | None = None
        threads = threads if threads is not None else default_threads()
        self._embedder = EmbeddingEngine(name=EMBEDDING_MODEL, threads=threads) if embeddings else None
        self._slots = slots
        self._context_size = context_size
        self._threads = threads
        self._chat = chat
        self._loads: dict[str, asyncio.Future[None]] = {}
        self._closed = False

    @property
    def model_names(self) -> list[str]:
        return [m for m, on in ((self.chat_model, self._chat), (EMBEDDING_MODEL, self._embedder)) if on]

    async def start(self) -> None:
        """Load every enabled model now (downloading the chat model if needed) instead of on the first call."""
        for model in self.model_names:
            await self._ensure_loaded(model)

    async def close(self) -> None:
        self._closed = True
        for load in self._loads.values():  # a load in progress runs in a thread; let it finish, then free it
            await asyncio.gather(load, return_exceptions=True)
        for engine in (self._llm, self._embedder):
            if engine is not None:
                await asyncio.to_thread(engine.close)

    async def call(self, endpoint: str, body: bytes, *, timeout: float) -> UpstreamResponse:
        rid = f"req_{secrets.token_hex(12)}"
        try:
            async with asyncio.timeout(timeout):
                payload = await self._answer(endpoint, body)
            return _response(200, orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY), rid)
        except APIError as e:
            return self._refusal(e, rid)
        except TimeoutError as e:
            raise _timed_out(timeout) from e
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if self._closed and task is not None and not task.cancelling():
                raise UpstreamError("connect", "the embedded engine was closed") from None
            raise

    async def stream(self, endpoint: str, body: bytes, *, timeout: float) -> UpstreamStream:
        """Online requests. One asking for a stream of a chat or text completion is generated whole, then handed
        over as server-sent events in OpenAI's chunk shapes (the text in one chunk, the finish reason in the next,
        the usage last when `stream_options.include_usage` asks, then `[DONE]`): the SDK's streaming works, the
        text just arrives at once (xllamacpp streams only through its own HTTP listener, which stays closed)."""
        asked = _stream_request(body)
        if asked is None:
            return await super().stream(endpoint, body, timeout=timeout)
        plain, include_usage = asked
        if endpoint not in CHAT_ENDPOINTS:
            error = InvalidRequest(
                f"Streaming is not supported for {endpoint}: send the request without 'stream'.",
                param="stream",
                code="streaming_unsupported",
            )
            rid = f"req_{secrets.token_hex(12)}"
            return await _whole(_response(error.status_code, orjson.dumps(error.to_dict()), rid))
        if endpoint == "/v1/chat/completions":
            live = await self._live_chat(plain, include_usage, timeout)
            if live is not None:
                return live
        resp = await self.call(endpoint, plain, timeout=timeout)
        if resp.status != 200:
            return await _whole(resp)
        events = _as_events(orjson.loads(resp.body), include_usage)
        headers = {**resp.headers, "content-type": "text/event-stream"}
        return UpstreamStream(200, headers, _sse(events))

    async def _answer(self, endpoint: str, raw: bytes) -> Json:
        body = await self._prepare(endpoint, raw)
        if endpoint == "/v1/embeddings":
            assert self._embedder is not None
            return await self._embedder.embed(body)
        assert self._llm is not None
        if endpoint == "/v1/chat/completions":
            return await self._llm.chat(body)
        return await self._llm.complete(body)

    async def _prepare(self, endpoint: str, raw: bytes) -> Json:
        """The request, read, for a model this engine serves at this endpoint, once that model is loaded."""
        body = _parse(raw)
        model = body.get("model")
        if not isinstance(model, str) or model not in self.model_names:
            raise NotFound(
                f"The model `{model}` does not exist in the embedded engine "
                f"(it serves {', '.join(self.model_names) or 'no models'})",
                param="model",
                code="model_not_found",
            )
        allowed = CHAT_ENDPOINTS if model == self.chat_model else EMBEDDING_ENDPOINTS
        if endpoint not in allowed:
            raise InvalidRequest(
                f"model `{model}` does not support {endpoint} (it supports {', '.join(allowed)})",
                param="model",
            )
        await self._ensure_loaded(model)
        return body

    async def _live_chat(self, raw: bytes, include_usage: bool, timeout: float) -> UpstreamStream | None:
        """A one-choice chat completion streamed as the engine makes it (None for one that is not: `n` > 1, a JSON
        constraint; those are made whole, then sent as events). The first chunk is awaited here, so that a refused
        request is answered with its status and error body, as whole; closing the stream stops the engine."""
        rid = f"req_{secrets.token_hex(12)}"
        try:
            async with asyncio.timeout(timeout):
                body = await self._prepare("/v1/chat/completions", raw)
                if not streamable("/v1/chat/completions", body):
                    return None
                assert self._llm is not None
                chunks = self._llm.stream_chat(body, include_usage)
                try:
                    first = await anext(chunks)
                except BaseException:
                    await chunks.aclose()
                    raise
        except APIError as e:
            return await _whole(self._refusal(e, rid))
        except TimeoutError as e:
            raise _timed_out(timeout) from e
        except StopAsyncIteration:
            first = None

        async def sse() -> AsyncIterator[bytes]:
            try:
                if first is not None:
                    yield b"data: " + orjson.dumps(first) + b"\n\n"
                    async for chunk in chunks:
                        yield b"data: " + orjson.dumps(chunk) + b"\n\n"
                yield b"data: [DONE]\n\n"
            finally:
                await chunks.aclose()

        return UpstreamStream(200, {"content-type": "text/event-stream", "x-request-id": rid}, sse())

    def _refusal(self, e: APIError, rid: str) -> UpstreamResponse:
        """The engine's refusal as its answer; once the engine is closed, no answer (a request `close` stopped, a
        worker shutting down: a batch line is then sent again elsewhere, as after a lost connection)."""
        if self._closed:
            raise UpstreamError("connect", "the embedded engine was closed") from None
        return _response(e.status_code, orjson.dumps(e.to_dict()), rid)

    async def _ensure_loaded(self, model: str) -> None:
        if self._closed:
            raise UpstreamError("connect", "the embedded engine was closed")
        load = self._loads.get(model)
        if load is None or (load.done() and (load.cancelled() or load.exception() is not None)):
            loader = self._load_chat if model == self.chat_model else self._load_embeddings
            load = self._loads[model] = asyncio.ensure_future(loader())
        try:
            await asyncio.shield(load)  # a caller's deadline must not cancel a load others wait for
        except (ModelError, RuntimeError, OSError) as e:
            raise UpstreamError("connect", f"embedded model {model} could not be loaded: {e}") from e

    async def _load_chat(self) -> None:
        if self._llm is None:
            path = await asyncio.to_thread(self._resolve_model_path)
            self._llm = LLMEngine(
                path,
                name=self.chat_model,
                slots=self._slots,
                context_size=self._context_size,
                threads=self._threads,
            )
        await asyncio.to_thread(self._llm.load)

    async def _load_embeddings(self) -> None:
        assert self._embedder is not None
        await asyncio.to_thread(self._embedder.load)

    def _resolve_model_path(self) -> Path:
        if self._model_path is not None:
            return local_gguf(self._model_path)
        return ensure_smollm2(self._cache_dir, self._progress)


def embedded_routes(upstream: EmbeddedUpstream | None = None) -> list[tuple[str, Upstream]]:
    """Router entries (exact model names) for the embedded engine; a default one is made when none is given."""
    up = upstream if upstream is not None else EmbeddedUpstream()
    return [(name, up) for name in up.model_names]


def _timed_out(timeout: float) -> UpstreamError:
    return UpstreamError("timeout", f"embedded engine did not answer within {timeout:g}s")


def _stream_request(raw: bytes) -> tuple[bytes, bool] | None:
    """For a request asking for a stream: the same request without `stream` and `stream_options`, and whether the
    usage is asked for at the end; None for any other."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(body, dict) or body.get("stream") is not True:
        return None
    options = body.pop("stream_options", None)
    del body["stream"]
    include_usage = isinstance(options, dict) and options.get("include_usage") is True
    return orjson.dumps(body), include_usage


def _as_events(done: Json, include_usage: bool) -> list[Json]:
    """A whole chat.completion or text_completion as the chunks a stream of it would have carried."""
    chat = done.get("object") == "chat.completion"
    head = {
        "id": done.get("id"),
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": done.get("created"),
        "model": done.get("model"),
    }
    if "system_fingerprint" in done:
        head["system_fingerprint"] = done["system_fingerprint"]
    choices = [c for c in done.get("choices") or [] if isinstance(c, dict)]
    events: list[Json] = []
    for c in choices:
        index = c.get("index", 0)
        if chat:
            message = c.get("message") or {}
            delta = {"role": message.get("role", "assistant"), "content": message.get("content") or ""}
            events.append({**head, "choices": [{"index": index, "delta": delta, "finish_reason": None}]})
            last = {"index": index, "delta": {}, "finish_reason": c.get("finish_reason")}
        else:
            first = {"index": index, "text": c.get("text") or "", "logprobs": None, "finish_reason": None}
            events.append({**head, "choices": [first]})
            last = {"index": index, "text": "", "logprobs": None, "finish_reason": c.get("finish_reason")}
        events.append({**head, "choices": [last]})
    if include_usage and "usage" in done:
        events.append({**head, "choices": [], "usage": done["usage"]})
    return events


async def _sse(events: list[Json]) -> AsyncIterator[bytes]:
    for event in events:
        yield b"data: " + orjson.dumps(event) + b"\n\n"
    yield b"data: [DONE]\n\n"


async def _whole(resp: UpstreamResponse) -> UpstreamStream:
    async def chunks() -> AsyncIterator[bytes]:
        yield resp.body

    return UpstreamStream(resp.status, resp.headers, chunks())


def _parse(raw: bytes) -> Json:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise InvalidRequest(f"the request body is not valid JSON: {e}") from e
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    return body


def _response(status: int, body: bytes, rid: str) -> UpstreamResponse:
    headers = {"content-type": "application/json", "x-request-id": rid}
    return UpstreamResponse(status, headers, body, rid)
