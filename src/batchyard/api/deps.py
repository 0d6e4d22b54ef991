"""Request-scoped helpers shared by the routes."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import orjson
from fastapi import Request

from batchyard import ids
from batchyard.api.multipart import MultipartError, PartTooLarge
from batchyard.blobs.base import BlobStore, BlobWriter
from batchyard.domain import limits
from batchyard.errors import InvalidRequest, PayloadTooLarge

MAX_JSON_BODY = 1024 * 1024


def query_int(request: Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InvalidRequest(
            f"Invalid '{name}': expected an integer, got {raw!r}.", param=name, code="invalid_value"
        ) from None
    if not lo <= value <= hi:
        raise InvalidRequest(
            f"Invalid '{name}': must be between {lo} and {hi}.", param=name, code="invalid_value"
        )
    return value


def query_choice(request: Request, name: str, default: str, choices: tuple[str, ...]) -> str:
    value = request.query_params.get(name, default)
    if value not in choices:
        raise InvalidRequest(
            f"Invalid '{name}': must be one of {', '.join(choices)}.", param=name, code="invalid_value"
        )
    return value


def shown(value: str, most: int = ids.MAX_ID_CHARS) -> str:
    """A client's value as echoed in an error message: bounded, control characters escaped."""
    text = value if len(value) <= most else value[:most] + "..."
    return text.encode("unicode_escape").decode("ascii") if limits.has_control(text) else text


def bad_cursor(request: Request, kind: str) -> bool:
    """Whether the `after` cursor of a listing cannot be an id of `kind`: it names no object, so the page after it
    is empty, as after an unknown id (the route answers without asking the store)."""
    after = request.query_params.get("after")
    return after is not None and not ids.has_shape(kind, after)


def bounded_str(body: dict[str, Any], name: str, most: int, *, controls: bool = False) -> str:
    """A required string of at most `most` characters, without control characters unless `controls` (the caller
    replaces them)."""
    value = required_str(body, name)
    if len(value) > most:
        raise InvalidRequest(
            f"Invalid '{name}': string too long. Expected a string with maximum length {most}, but got a string "
            f"with length {len(value)} instead.",
            param=name,
            code="string_above_max_length",
        )
    if not controls and limits.has_control(value):
        raise InvalidRequest(
            f"Invalid '{name}': control characters are not allowed.", param=name, code="invalid_value"
        )
    return value


def list_body(items: list[dict[str, object]], has_more: bool) -> dict[str, object]:
    return {
        "object": "list",
        "data": items,
        "first_id": items[0]["id"] if items else None,
        "last_id": items[-1]["id"] if items else None,
        "has_more": has_more,
    }


def required_str(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if value is None:
        raise InvalidRequest(
            f"Missing required parameter: '{name}'.", param=name, code="missing_required_parameter"
        )
    if not isinstance(value, str) or not value:
        raise InvalidRequest(
            f"Invalid type for '{name}': expected a non-empty string.", param=name, code="invalid_type"
        )
    return value


def expires_after(value: object, param: str) -> int | None:
    """Seconds of an `{"anchor": "created_at", "seconds": N}` object (None when absent)."""
    if value is None:
        return None
    if not isinstance(value, dict) or value.get("anchor") != "created_at":
        raise InvalidRequest(
            f"{param}.anchor must be 'created_at'.",
            param=f"{param}.anchor",
            code="invalid_value",
        )
    seconds = value.get("seconds")
    if (
        not isinstance(seconds, int)
        or isinstance(seconds, bool)
        or not limits.FILE_EXPIRY_MIN <= seconds <= limits.FILE_EXPIRY_MAX
    ):
        raise InvalidRequest(
            f"{param}.seconds must be an integer between {limits.FILE_EXPIRY_MIN} and {limits.FILE_EXPIRY_MAX}.",
            param=f"{param}.seconds",
            code="invalid_value",
        )
    return seconds


async def json_body(request: Request) -> dict[str, Any]:
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_JSON_BODY:
            raise InvalidRequest("The request body is too large.", code="invalid_request")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidRequest(
            "We could not parse the JSON body of your request. The body must be a JSON object.",
            code="invalid_json",
        ) from None
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_json")
    return body


class BlobSink:
    """Where the file part of a multipart request streams: a blob writer opened when the part begins (`open`)."""

    def __init__(self, blobs: BlobStore, key: str) -> None:
        self._blobs = blobs
        self._key = key
        self.writer: BlobWriter | None = None

    async def open(self) -> BlobWriter:
        self.writer = await self._blobs.open_writer(self._key)
        return self.writer

    async def abort(self) -> None:
        if self.writer is not None:
            await self.writer.abort()


@contextlib.asynccontextmanager
async def receiving(
    blobs: BlobStore, key: str, *, field: str, cap: int, too_large_code: str, what: str = "file"
) -> AsyncIterator[BlobSink]:
    """A BlobSink for one request: on any failure inside the block the partial blob is removed, and the multipart
    parser's errors become OpenAI-shaped ones (413 past `cap`, 400 for a malformed body)."""
    sink = BlobSink(blobs, key)
    try:
        yield sink
    except PartTooLarge as e:
        await sink.abort()
        raise PayloadTooLarge(
            f"The {what} is too large: the limit is {min(cap, e.limit)} bytes.",
            param=field,
            code=too_large_code,
        ) from None
    except MultipartError as e:
        await sink.abort()
        raise InvalidRequest(e.message, param=e.param, code="invalid_request") from None
    except BaseException:
        await sink.abort()
        raise
