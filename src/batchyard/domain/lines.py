"""Builders for the output and error file lines (BatchRequestOutput) and usage extraction."""

from __future__ import annotations

from typing import Any

import orjson

from batchyard.domain import wire
from batchyard.domain.models import Usage
from batchyard.ids import request_line_id

MAX_REQUEST_ID = 256  # an upstream's x-request-id is copied into every line: keep it bounded
MAX_TOKENS = 1 << 40  # a token count above this in one answer is not believed (sums must fit in 64 bits)

# id, custom_id, status, request_id, body
_RESPONSE_LINE = (
    b'{"id":"%s","custom_id":%s,"response":{"status_code":%d,"request_id":%s,"body":%s},"error":null}\n'
)

NOT_EXECUTED_MESSAGES = {
    "batch_expired": "This request could not be executed before the completion window expired.",
    "batch_cancelled": "This request was not executed because the batch was cancelled.",
}


def response_line(
    custom_id: str, status_code: int, request_id: str, body: Any, raw_body: bytes | None = None
) -> bytes:
    """A line carrying an upstream HTTP response (2xx goes to the output file, others to the error file).

    When the upstream's raw JSON bytes are given (the caller parsed them: they are valid JSON), they are spliced in
    verbatim, which keeps the upstream body byte-exact, saves re-serializing it, and never re-serializes a value
    nested deeper than a JSON writer allows; only its line breaks (whitespace in valid JSON) become spaces.
    """
    raw = wire.dumps(body) if raw_body is None else wire.compact_raw(raw_body)
    # one formatting operation (the line id is ASCII letters and digits: no escaping needed)
    return _RESPONSE_LINE % (
        request_line_id().encode(),
        orjson.dumps(custom_id),
        status_code,
        orjson.dumps(request_id[:MAX_REQUEST_ID]),
        raw,
    )


def error_line(custom_id: str, code: str, message: str) -> bytes:
    """A line for a request that got no HTTP response (never executed, or failed below HTTP)."""
    return (
        orjson.dumps(
            {
                "id": request_line_id(),
                "custom_id": custom_id,
                "response": None,
                "error": {"code": code, "message": message},
            }
        )
        + b"\n"
    )


def not_executed_line(custom_id: str, code: str) -> bytes:
    return error_line(custom_id, code, NOT_EXECUTED_MESSAGES[code])


def _int(v: object) -> int:
    """A token count from an upstream's usage: an integer in [0, MAX_TOKENS], else 0 (never trusted as is)."""
    return v if isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_TOKENS else 0


def extract_usage(body: object) -> Usage:
    """Token usage of one upstream response body: chat/completions/embeddings or responses style."""
    u = Usage()
    if not isinstance(body, dict):
        return u
    usage = body.get("usage")
    if not isinstance(usage, dict):
        return u
    if "input_tokens" in usage or "output_tokens" in usage:
        u.input_tokens = _int(usage.get("input_tokens"))
        u.output_tokens = _int(usage.get("output_tokens"))
        in_details = usage.get("input_tokens_details")
        out_details = usage.get("output_tokens_details")
    else:
        u.input_tokens = _int(usage.get("prompt_tokens"))
        u.output_tokens = _int(usage.get("completion_tokens"))
        in_details = usage.get("prompt_tokens_details")
        out_details = usage.get("completion_tokens_details")
    if isinstance(in_details, dict):
        u.cached_tokens = _int(in_details.get("cached_tokens"))
    if isinstance(out_details, dict):
        u.reasoning_tokens = _int(out_details.get("reasoning_tokens"))
    return u
