"""`POST /v1/batches/validate` (a batchyard extension): validate an input file for an endpoint as the worker would,
and estimate its input tokens, creating nothing. The file is read once, streamed, in a thread (the validator is
pure and CPU-bound: the event loop keeps answering)."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson

from batchyard.api.services import Services
from batchyard.domain import estimate
from batchyard.domain.validation import BatchValidator
from batchyard.errors import BlobNotFound


class _Tokens:
    """Input-token estimate of the lines of a stream fed in chunks."""

    def __init__(self) -> None:
        self.total = 0
        self._rest = b""

    def feed(self, chunk: bytes) -> None:
        *lines, self._rest = (self._rest + chunk).split(b"\n")
        for line in lines:
            self._line(line)

    def finish(self) -> None:
        self._line(self._rest)

    def _line(self, raw: bytes) -> None:
        try:
            line = orjson.loads(raw.removeprefix(b"\xef\xbb\xbf"))
        except orjson.JSONDecodeError:
            return
        body = line.get("body") if isinstance(line, dict) else None
        if isinstance(body, dict):
            self.total += estimate.input_tokens(body)


def _file_error(message: str) -> dict[str, Any]:
    return {"code": "invalid_request", "message": message, "param": "file_id", "line": None}


def _answer(errors: list[dict[str, Any]], lines: int, tokens: int, model: str | None) -> dict[str, Any]:
    return {
        "object": "batch.validation",
        "valid": not errors,
        "errors": {"object": "list", "data": errors},
        "total_lines": lines,
        "model": model,
        "estimated_input_tokens": tokens,
    }


async def validate(svc: Services, owner: str, input_file_id: str, endpoint: str) -> dict[str, Any]:
    """The answer to a dry run: the errors a batch of this file would fail with (as its `errors.data`)."""
    f = await svc.store.get_file(owner, input_file_id)
    if f is None:  # OpenAI's words, as the batch would get them
        missing = f"Cannot find file {input_file_id}, or organization {owner} does not have access to it."
        return _answer([_file_error(missing)], 0, 0, None)
    if f.purpose != "batch":
        return _answer(
            [_file_error(f"The input file {f.id} must be uploaded with purpose 'batch', not '{f.purpose}'.")],
            0,
            0,
            None,
        )
    s = svc.settings
    v = BatchValidator(
        endpoint,
        svc.router.is_routable,
        max_lines=s.max_lines,
        max_bytes=s.max_batch_file_bytes,
        shard_lines=s.shard_lines,
        shard_bytes=s.shard_bytes,
    )
    tokens = _Tokens()

    def feed(chunk: bytes) -> None:
        v.feed(chunk)
        tokens.feed(chunk)

    try:
        async for chunk in svc.blobs.stream(f.blob_key):
            await asyncio.to_thread(feed, chunk)
    except BlobNotFound:
        return _answer([_file_error(f"The input file {f.id} has no content.")], 0, 0, None)
    result = await asyncio.to_thread(v.finish)
    tokens.finish()
    errors = [{"code": e.code, "message": e.message, "param": e.param, "line": e.line} for e in result.errors]
    return _answer(errors, result.total_lines, tokens.total, result.model)
