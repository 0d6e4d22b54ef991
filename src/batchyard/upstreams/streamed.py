"""Batch lines sent as streams, for an engine that stops a stream whose client left but not a plain request.

llama.cpp's server finishes a non-streaming request after its client went away (its slot stays busy to the end:
3.3 s for a 400-token answer cut after 0.5 s), and stops a stream 29 ms after (`python bench/engine_abort.py`). To
cut a batch line short there (an online request needs the engine, a cancelled batch's grace ran out), the line is sent with
`"stream": true` and `stream_options.include_usage`, the events are gathered whole (no line is written before its
answer ended, as for any line), and they are assembled into the body the same request without streaming gets: one
`chat.completion` (or `text_completion`) with each choice's message, its log-probabilities and finish reason, and
the usage and llama.cpp's `timings` of the last event.

Only the requests whose stream is one answer in the same shape are sent so (`streamable`): `/v1/chat/completions`
and `/v1/completions` with no `stream` of their own, one choice (`n` 1), no JSON constraint (`response_format`,
llama.cpp's `grammar` and `json_schema`) and, for completions, one prompt string. Others go as they are (llama.cpp
streams several choices with a usage event each, several prompts in turn, and holds back a partial JSON answer).
Checked against llama.cpp's own answers, field by field but for `id`, `created` and `timings`:
tests/integration/test_streamed_lines.py.
An answer that is not an event stream (an error status, an engine that ignored `stream`) is passed on as it is.
"""

from __future__ import annotations

from typing import Any

from batchyard.domain import wire

STREAMABLE = frozenset(("/v1/chat/completions", "/v1/completions"))
_OBJECT = {"/v1/chat/completions": "chat.completion", "/v1/completions": "text_completion"}


class BrokenStream(ValueError):
    """The events do not make one answer (an event that is not JSON, none at all, or one the stream ended in)."""


def streamable(endpoint: str, body: dict[str, Any]) -> bool:
    """Whether this request, sent as a stream, comes back as one answer that `assemble` rebuilds whole."""
    if (
        endpoint not in STREAMABLE
        or body.get("stream") not in (None, False)
        or body.get("n") not in (None, 1)
        or _constrained(body)
    ):
        return False
    return endpoint == "/v1/chat/completions" or isinstance(body.get("prompt"), str)


def _constrained(body: dict[str, Any]) -> bool:
    """A JSON-constrained answer: when `max_tokens` cuts it short, llama.cpp's stream holds back the partial JSON
    (the whole answer is the three tokens of a code fence, its stream has no content at all): these go whole."""
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        return True
    return "grammar" in body or "json_schema" in body


def stream_body(body: dict[str, Any]) -> dict[str, Any]:
    """The request as a stream that ends with its usage."""
    return {**body, "stream": True, "stream_options": {"include_usage": True}}


def stream_payload(body: dict[str, Any]) -> bytes:
    """`stream_body`, written."""
    return wire.dumps(stream_body(body))


def _events(raw: bytes) -> list[Any]:
    """The `data:` payloads of a server-sent event stream, up to `[DONE]` (comments and other fields skipped)."""
    found: list[Any] = []
    for block in raw.replace(b"\r\n", b"\n").split(b"\n\n"):
        data = [line[5:].removeprefix(b" ") for line in block.split(b"\n") if line.startswith(b"data:")]
        if not data:
            continue
        payload = b"\n".join(data)
        if payload.strip() == b"[DONE]":
            break
        try:
            found.append(wire.loads(payload))  # exact, as a whole answer is read
        except ValueError as e:
            raise BrokenStream(f"an event of the stream is not JSON: {e}") from None
    return found


def is_event_stream(raw: bytes) -> bool:
    head = raw.lstrip()[:6]
    return head.startswith((b"data:", b":", b"event:", b"id:"))


def assemble(endpoint: str, raw: bytes) -> tuple[bytes, bool]:
    """The answer the request would have had without streaming, and whether it is an error: (the error event's
    own object, True) when the engine ended the stream with `{"error": ...}`."""
    answer, failed = assembled(endpoint, _events(raw))
    return wire.dumps(answer), failed


def assembled(endpoint: str, events: list[Any]) -> tuple[dict[str, Any], bool]:
    """`assemble` from the events' payloads, already parsed (the embedded engine hands them over as objects)."""
    top: dict[str, Any] = {}
    choices: dict[int, dict[str, Any]] = {}
    events = [e for e in events if e is not None]  # llama.cpp may open with `data: null`
    if not events:
        raise BrokenStream("the stream ended before any event")
    for event in events:
        if not isinstance(event, dict):
            raise BrokenStream("an event of the stream is not a JSON object")
        if "error" in event:
            return event, True
        for key, value in event.items():
            if key != "choices" and (value is not None or key not in top):
                top[key] = value
        for piece in event.get("choices") or ():
            if isinstance(piece, dict):
                index = piece.get("index", 0)
                choice = choices.setdefault(index if isinstance(index, int) else 0, {})
                _merge(choice, {("message" if k == "delta" else k): v for k, v in piece.items()})
    top["object"] = _OBJECT[endpoint]
    return {"choices": [_finish_choice(choices[i], endpoint, i) for i in sorted(choices)], **top}, False


# Kept from the last piece, never joined: what a stream repeats rather than splits.
_REPLACED = frozenset(("index", "type", "id", "role", "finish_reason"))


def _merge(into: dict[str, Any], part: dict[str, Any]) -> None:
    """Fold one piece of a streamed choice into what came before, by the rules of the openai SDK's own
    `accumulate_delta` (openai/lib/streaming/_deltas.py, private there, and it adds numbers): text is joined
    (content, reasoning, refusal, a tool call's name and arguments), objects are merged, the entries of a list that
    carry an `index` (tool calls) are merged by it and other lists (log probabilities) extended; a null never
    replaces a value. Total over any JSON: an engine's odd piece cannot make it raise."""
    for key, value in part.items():
        old = into.get(key)
        if value is None:
            into.setdefault(key, None)
        elif isinstance(value, dict):
            if not isinstance(old, dict):
                old = into[key] = {}
            _merge(old, value)
        elif isinstance(value, list):
            if not isinstance(old, list):
                old = into[key] = []
            for entry in value:
                if isinstance(entry, dict) and "index" in entry:
                    same = next(
                        (e for e in old if isinstance(e, dict) and e.get("index") == entry["index"]), None
                    )
                    if same is None:
                        same = {}
                        old.append(same)
                    _merge(same, entry)
                else:
                    old.append(entry)
        elif isinstance(value, str) and isinstance(old, str) and key not in _REPLACED:
            into[key] = old + value
        else:
            into[key] = value


def _finish_choice(choice: dict[str, Any], endpoint: str, index: int) -> dict[str, Any]:
    logprobs = choice.get("logprobs")
    if endpoint == "/v1/completions":
        text = choice.get("text")
        return {
            "text": text if isinstance(text, str) else "",
            "index": index,
            "logprobs": logprobs,
            "finish_reason": choice.get("finish_reason"),
        }
    message = choice.get("message")
    if not isinstance(message, dict):
        message = {}
    calls = message.get("tool_calls")
    for call in calls if isinstance(calls, list) else ():
        if isinstance(call, dict):
            call.pop("index", None)  # a stream's bookkeeping: a whole answer's tool calls have none
    if message.get("content") is None and not message.get("tool_calls"):
        message["content"] = ""
    out = {"finish_reason": choice.get("finish_reason"), "index": index, "message": message}
    if logprobs is not None:
        out["logprobs"] = logprobs
    return out
