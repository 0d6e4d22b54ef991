"""Object identifiers: OpenAI-style prefixes with random, URL-safe suffixes."""

from __future__ import annotations

import itertools
import re
import secrets

_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _suffix(n: int = 24) -> str:
    return "".join(secrets.choice(_ALPHABET) for _ in range(n))


# The shapes of the ids clients send back. The suffix is `_suffix()`'s 24 characters (a derived output file id,
# `execution.jobs.derived_file_id`, is 24 hex digits: the same shape); up to 64 are accepted, so ids made by a
# later version with longer suffixes stay valid; '-' and '_' too (an id such as "file-nonexistent-xyz" is an id
# OpenAI takes and answers as a file it cannot find). Anything else (a NUL, a path, 1 MB of text) is not an id.
_SHAPES = {
    kind: re.compile(rf"{re.escape(prefix)}[0-9A-Za-z_-]{{1,64}}")
    for kind, prefix in (("file", "file-"), ("batch", "batch_"), ("upload", "upload_"), ("part", "part_"))
}
MAX_ID_CHARS = 70


def has_shape(kind: str, value: str) -> bool:
    """Whether `value` can be an id of `kind` ("file", "batch", "upload" or "part")."""
    return len(value) <= MAX_ID_CHARS and _SHAPES[kind].fullmatch(value) is not None


def file_id() -> str:
    return f"file-{_suffix()}"


def batch_id() -> str:
    return f"batch_{_suffix()}"


def upload_id() -> str:
    return f"upload_{_suffix()}"


def part_id() -> str:
    return f"part_{_suffix()}"


def event_id() -> str:
    return f"evt_{_suffix()}"


# Per-line ids are made on the hot path: a random per-process prefix and a counter are unique and cost no syscall.
_LINE_PREFIX = secrets.token_hex(6)
_line_counter = itertools.count(secrets.randbelow(1 << 32))


def request_line_id() -> str:
    return f"batch_req_{_LINE_PREFIX}{next(_line_counter) & 0xFFFFFFFFFFFF:012x}"


def request_id() -> str:
    """An id for an upstream response that carried no x-request-id."""
    return f"req_{_LINE_PREFIX}{next(_line_counter) & 0xFFFFFFFFFFFF:012x}"


def http_request_id() -> str:
    """The `x-request-id` of one API response: `req_` and 32 hex digits, as OpenAI's (a per-process random prefix and
    a counter: unique, and no syscall per request)."""
    return f"req_{_HTTP_PREFIX}{next(_line_counter) & 0xFFFFFFFFFFFFFFFF:016x}"


_HTTP_PREFIX = secrets.token_hex(8)


def worker_id() -> str:
    return f"worker_{secrets.token_hex(6)}"
