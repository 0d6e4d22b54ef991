"""Chat and text completions on xllamacpp (llama.cpp's own server engine, in-process).

One `xllamacpp.Server` holds the model and `slots` parallel sequences with continuous batching; its handle_* methods
are thread-safe, block, and release the GIL, so each request runs on a thread of a pool sized to the slot count.
A request whose stream is one answer runs as a stream (the handle_* callback form, the same events as llama.cpp's
HTTP server) assembled into the whole answer (`upstreams/streamed.py`), so that it stops at its next token once its
caller goes away: llama.cpp runs a whole request to its end.

What we change on the way out, so that answers look like OpenAI's:
- `timings` dropped, `model` set to the requested name, completion ids start with `cmpl-`;
- `n > 1` and lists of prompts are split into single requests and merged here (xllamacpp caps `n` at the slot
  count and counts only the first choice in `usage`); prompt tokens count once per prompt;
- completions logprobs converted from the chat shape to the legacy one (tokens, token_logprobs, top_logprobs,
  text_offset); the token ids xllamacpp adds to chat logprobs removed;
- engine errors (error dicts, and the ValueError/RuntimeError it raises for unparsable requests) become
  `APIError`s carrying an OpenAI error body.

Every xllamacpp server also opens an HTTP listener that cannot be switched off; we bind it to a Unix socket in a
private temporary directory (127.0.0.1 where there are no Unix sockets) and give it a random API key nobody holds.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import tempfile
import threading
from collections import deque
from collections.abc import AsyncGenerator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from batchyard.embedded import params
from batchyard.errors import APIError, InvalidRequest
from batchyard.upstreams.streamed import BrokenStream, assembled, stream_body, streamable

MAX_N = 128
MAX_PARTS = 2048  # prompts × n in one request
PROMPT_CACHE_MIB = 256  # llama.cpp keeps finished prompts' KV state in RAM for reuse (its default is 8 GiB)

Json = dict[str, Any]


def default_threads() -> int:
    """The engine's threads when none are asked for: half the CPU cores this process may use, at least one. On a
    2-core machine shared with other work, 1 thread gave 20.7 tokens/s and 2 threads 2.7 (docs/embedded.md,
    bench/embedded_threads.py): a llama.cpp thread waiting for a busy core stalls every step of the others."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // 2)


class LLMEngine:
    def __init__(
        self,
        model_path: Path,
        *,
        name: str,
        slots: int = 4,
        context_size: int = 2048,
        threads: int | None = None,
    ) -> None:
        if slots < 1 or context_size < 64:
            raise ValueError("slots must be >= 1 and context_size >= 64")
        self.model_path = model_path
        self.name = name
        self.slots = slots
        self.context_size = context_size  # per slot, prompt + completion
        self.threads = threads
        self._server: Any = None
        self._pool: ThreadPoolExecutor | None = None
        self._socket_dir: str | None = None
        self._lock = threading.Lock()
        # Run what streams as one answer as a stream (`_run_all`); False: whole, as before.
        self.streamed = True
        # The events each of the last requests stopped early had made when the engine was told to stop.
        self.cuts: deque[int] = deque(maxlen=64)
        self._stops: set[threading.Event] = set()  # of the requests running or waiting for a thread

    @property
    def loaded(self) -> bool:
        return self._server is not None

    def load(self) -> None:
        """Load the model (blocking, ~0.5 s for SmolLM2-135M). Idempotent."""
        with self._lock:
            if self._server is not None:
                return
            import xllamacpp

            params = xllamacpp.CommonParams()
            params.model.path = str(self.model_path)
            params.n_parallel = self.slots
            params.n_ctx = self.context_size * self.slots  # llama.cpp splits n_ctx evenly between the slots
            params.cache_ram_mib = PROMPT_CACHE_MIB
            params.verbosity = 0
            if self.threads:
                params.cpuparams.n_threads = self.threads
                params.cpuparams_batch.n_threads = self.threads
            self._lock_down_http(params)
            try:
                server = xllamacpp.Server(params)
            except RuntimeError as e:
                self._remove_socket_dir()
                raise RuntimeError(f"xllamacpp could not load {self.model_path}: {e}") from e
            # One request through the engine's loop before anyone may close it: xllamacpp's Server tells its
            # constructor it is ready just before its loop starts, and the loop's start clears a stop asked
            # before it, so a server closed at once (a model loaded for one bad request) could wait for ever in
            # its destructor (seen under load: `~Server` joining its loop thread). Once this answer came back,
            # the loop runs and a stop reaches it.
            server.handle_completions({"prompt": "a", "max_tokens": 1, "temperature": 0})
            self._server = server
            self._pool = ThreadPoolExecutor(max_workers=self.slots, thread_name_prefix="batchyard-llm")

    def _lock_down_http(self, params: Any) -> None:
        params.ui = False
        params.endpoint_slots = False
        params.endpoint_metrics = False
        params.endpoint_props = False
        params.api_keys = [secrets.token_urlsafe(32)]
        if os.name == "posix":
            self._socket_dir = tempfile.mkdtemp(prefix="batchyard-llm-")  # mode 0700
            params.hostnames = [os.path.join(self._socket_dir, "llm.sock")]
        else:
            params.hostnames = ["127.0.0.1"]
            params.port = 0

    def close(self) -> None:
        """Stop the running requests (those run as streams, at their next token; the others run to their end),
        then free the model and its KV cache (blocking)."""
        for stop in list(self._stops):
            stop.set()
        with self._lock:
            if self._pool is not None:
                self._pool.shutdown(wait=True, cancel_futures=True)
                self._pool = None
            self._server = None  # the last reference: the C++ server stops and frees everything
            self._remove_socket_dir()

    def _remove_socket_dir(self) -> None:
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)  # a leftover empty temp dir harms nothing
            self._socket_dir = None

    # -- requests -----------------------------------------------------------------------------------------------

    async def chat(self, body: Json) -> Json:
        """An OpenAI chat.completion for `body` (already parsed); raises APIError for bad requests."""
        _check_chat(body)
        n = _choice_count(body)
        results = await self._run_all(
            self._server_method("handle_chat_completions"),
            _copies(body, n) if n > 1 else [body],
            "/v1/chat/completions",
        )
        return _merge(results, n, _model_name(body, self.name), _chat_choice)

    async def complete(self, body: Json) -> Json:
        """An OpenAI text_completion for `body` (already parsed); raises APIError for bad requests."""
        prompts = _split_prompts(body.get("prompt"))
        _reject_streaming(body)
        if body.get("echo") is True:
            raise InvalidRequest("'echo' is not supported by the embedded engine", param="echo")
        params.check_completion(body)
        n = _choice_count(body)
        if len(prompts) * n > MAX_PARTS:
            raise InvalidRequest(f"at most {MAX_PARTS} prompts × n per request", param="prompt")
        parts = [part for p in prompts for part in _copies({**body, "prompt": p}, n)]
        results = await self._run_all(self._server_method("handle_completions"), parts, "/v1/completions")
        merged = _merge(results, n, _model_name(body, self.name), _completion_choice_converter(prompts, n))
        merged["id"] = "cmpl-" + str(merged.get("id", "")).removeprefix("chatcmpl-")
        return merged

    async def stream_chat(self, body: Json, include_usage: bool) -> AsyncGenerator[Json, None]:
        """The chunks (`chat.completion.chunk`) of a one-choice chat completion as the engine makes them, in
        OpenAI's shape; the usage comes in a last chunk with no choices when `include_usage`. Raises APIError
        before the first chunk for a request the engine refuses. Closing the iterator (the client went away, the
        deadline passed) stops the engine at its next token."""
        _check_chat(body)
        pool = self._pool
        if pool is None:
            raise APIError("the embedded chat engine is not loaded")
        method = self._server_method("handle_chat_completions")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        stop = self._new_stop()
        made = 0

        def on_event(event: Any) -> bool:  # on the engine's thread
            nonlocal made
            made += 1
            try:
                loop.call_soon_threadsafe(queue.put_nowait, event)
            except RuntimeError:  # the event loop is gone
                stop.set()
            return self._stopping(stop, made)

        done = loop.run_in_executor(pool, _call, method, stream_body(body), on_event)
        done.add_done_callback(lambda _: queue.put_nowait(_END))  # after the events: both come by call_soon
        model, first = _model_name(body, self.name), True
        try:
            while (event := await queue.get()) is not _END:
                if first and isinstance(event, dict) and "error" in event:
                    raise _engine_error(event["error"])
                first = False
                chunk = _chat_chunk(event, model, include_usage)
                if chunk is not None:
                    yield chunk
            done.result()  # a request the engine could not read: InvalidRequest, before any chunk
        finally:
            stop.set()  # a stream closed early: the engine stops at its next token
            done.cancel()  # or never starts, if it still waits for a thread
            self._stops.discard(stop)

    def _stopping(self, stop: threading.Event, made: int) -> bool:
        """A stream's callback answer to the engine (on its thread): True ends the generation at this event."""
        if stop.is_set():
            self.cuts.append(made)  # once per stopped request, unless the engine went on regardless
            return True
        return False

    def _server_method(self, name: str) -> Any:
        if self._server is None:
            raise APIError("the embedded chat engine is not loaded")
        return getattr(self._server, name)

    async def _run_all(self, method: Any, parts: list[Json], endpoint: str) -> list[Json]:
        """Each part on a thread of the pool. Parts whose stream is one answer (`streamed.streamable`) are run
        as streams and assembled, so that a caller that goes away (a cancel, a deadline) stops them at their next
        token; the others run to their end in the background."""
        pool = self._pool
        if pool is None:
            raise APIError("the embedded chat engine is not loaded")
        loop = asyncio.get_running_loop()
        stop = self._new_stop()
        futures = [
            loop.run_in_executor(
                pool,
                self._run_part,
                method,
                part,
                endpoint if self.streamed and streamable(endpoint, part) else None,
                stop,
            )
            for part in parts
        ]
        try:
            return list(await asyncio.gather(*futures))
        except BaseException:
            stop.set()
            for f in futures:  # requests not started yet never start
                f.cancel()
            raise
        finally:
            self._stops.discard(stop)

    def _new_stop(self) -> threading.Event:
        """A request's stop, which `close` sets too."""
        stop = threading.Event()
        self._stops.add(stop)
        return stop

    def _run_part(self, method: Any, part: Json, endpoint: str | None, stop: threading.Event) -> Json:
        """One request on this thread; `endpoint` set: as a stream, stopped once `stop` is set."""
        if endpoint is None:
            return _call(method, part)
        events: list[Any] = []

        def on_event(event: Any) -> bool:
            events.append(event)
            return self._stopping(stop, len(events))

        _call(method, stream_body(part), on_event)
        if stop.is_set():  # nobody waits for this answer any more
            raise APIError("the request was stopped")
        try:  # an error event is the answer, as a whole request's error is
            answer, _ = assembled(endpoint, events)
        except BrokenStream as e:
            raise APIError(f"the embedded chat engine's stream could not be read: {e}") from e
        return _checked(answer)


def _call(method: Any, part: Json, *callback: Any) -> Json:
    """`method(part)`, or with `callback` given `method(part, callback)` (a stream: its answer is {})."""
    try:
        result = method(part, *callback)
    except (ValueError, RuntimeError) as e:  # xllamacpp's way of rejecting a request it cannot parse
        raise InvalidRequest(str(e)) from e
    return {} if callback else _checked(result)


def _checked(result: Any) -> Json:
    if not isinstance(result, dict):
        raise APIError(f"the embedded chat engine answered {type(result).__name__}")
    error = result.get("error")
    if error is not None:
        raise _engine_error(error)
    return result


def _engine_error(error: Any) -> APIError:
    if not isinstance(error, dict):
        return APIError(str(error))
    message = str(error.get("message") or "request failed")
    status = error.get("code")
    if error.get("type") == "exceed_context_size_error":
        return InvalidRequest(message, param="messages", code="context_length_exceeded")
    if isinstance(status, int) and 400 <= status < 500:
        exc = InvalidRequest(message)
        exc.status_code = status
        return exc
    return APIError(message)


_END = object()  # the stream's end, after its last event


def _check_chat(body: Json) -> None:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("'messages' must be a non-empty array", param="messages")
    _reject_streaming(body)
    params.check_chat(body)


def _chat_chunk(event: Any, model: str, include_usage: bool) -> Json | None:
    """An engine's stream event as OpenAI's chunk: the requested model's name, no `timings`, no token ids in the
    log probabilities; the usage only when asked for (None: an event left out)."""
    if not isinstance(event, dict):
        return None
    event.pop("timings", None)
    if "model" in event:
        event["model"] = model
    if not include_usage:
        event.pop("usage", None)
        if not event.get("choices"):
            return None
    for choice in event.get("choices") or ():
        logprobs = choice.get("logprobs") if isinstance(choice, dict) else None
        if isinstance(logprobs, dict):
            _strip_token_ids(logprobs)
    return event


def _strip_token_ids(logprobs: Json) -> None:
    for entry in logprobs.get("content") or []:
        entry.pop("id", None)
        for top in entry.get("top_logprobs") or []:
            top.pop("id", None)
    logprobs.setdefault("refusal", None)


def _reject_streaming(body: Json) -> None:
    if body.get("stream") is True:
        raise InvalidRequest("'stream' is not supported by the embedded engine", param="stream")


def _choice_count(body: Json) -> int:
    return params.choice_count(body, MAX_N)


def _copies(body: Json, n: int) -> list[Json]:
    """n single-choice requests; with a seed, each copy gets its own so that samples differ."""
    seed = body.get("seed")
    if n == 1:
        return [{**body, "n": 1}]
    if isinstance(seed, int) and not isinstance(seed, bool):
        return [{**body, "n": 1, "seed": (seed + i) % 2**32} for i in range(n)]
    return [{**body, "n": 1} for _ in range(n)]


def _split_prompts(prompt: Any) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if all(_is_token(t) for t in prompt):
            return [prompt]
        if all(
            isinstance(p, str) or (isinstance(p, list) and p and all(_is_token(t) for t in p)) for p in prompt
        ):
            return list(prompt)
    raise InvalidRequest(
        "'prompt' must be a string, an array of strings, an array of tokens or an array of token arrays",
        param="prompt",
    )


def _is_token(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _model_name(body: Json, default: str) -> str:
    model = body.get("model")
    return model if isinstance(model, str) and model else default


def _merge(results: list[Json], n: int, model: str, convert: Any) -> Json:
    """One response from single-choice results; results[i] answers prompt i // n."""
    merged = {k: v for k, v in results[0].items() if k not in ("timings", "choices", "usage")}
    merged["model"] = model
    choices: list[Json] = []
    prompt_tokens = completion_tokens = cached_tokens = 0
    for i, result in enumerate(results):
        for choice in result.get("choices") or []:
            choice["index"] = len(choices)
            choices.append(convert(choice, i))
        usage = result.get("usage") or {}
        completion_tokens += int(usage.get("completion_tokens") or 0)
        if i % n == 0:  # the same prompt is counted once however many choices it gets
            prompt_tokens += int(usage.get("prompt_tokens") or 0)
            cached_tokens += int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
    merged["choices"] = choices
    merged["usage"] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }
    return merged


def _chat_choice(choice: Json, _part: int) -> Json:
    logprobs = choice.get("logprobs")
    if isinstance(logprobs, dict):
        _strip_token_ids(logprobs)
    else:
        choice["logprobs"] = None
    return choice


def _completion_choice_converter(prompts: list[str | list[int]], n: int) -> Any:
    def convert(choice: Json, part: int) -> Json:
        prompt = prompts[part // n]
        choice["logprobs"] = _legacy_logprobs(
            choice.get("logprobs"), len(prompt) if isinstance(prompt, str) else 0
        )
        return choice

    return convert


def _legacy_logprobs(logprobs: Any, offset: int) -> Json | None:
    """Chat-shaped logprobs ({"content": [...]}) to the completions API's legacy shape."""
    if not isinstance(logprobs, dict):
        return None
    content = logprobs.get("content")
    if not isinstance(content, list):
        return logprobs if "tokens" in logprobs else None
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float]] = []
    text_offset: list[int] = []
    for entry in content:
        token = str(entry.get("token", ""))
        tokens.append(token)
        token_logprobs.append(entry.get("logprob"))
        top_logprobs.append(
            {str(t.get("token", "")): t.get("logprob") for t in entry.get("top_logprobs") or []}
        )
        text_offset.append(offset)
        offset += len(token)
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top_logprobs,
        "text_offset": text_offset,
    }
