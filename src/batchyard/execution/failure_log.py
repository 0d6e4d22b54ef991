"""Upstream failures in the log, with what to check: the first failure of each (upstream, status or error kind) at
WARNING at once, then at most one line per 30 s with how many came meanwhile (`ThrottledLog`), per process.

    upstream http://gpu-1:8000/v1 answered 401 (invalid_api_key): check --upstream-api-key / api_key_env

Shown: the upstream's URL without user info or query (`logs.redact_url`), the status, the error body's `code` or
`type` when it is a short token, never its message (an upstream's 401 message can quote part of the key, a 400's
the tenant's prompt), and never the request.
"""

from __future__ import annotations

import functools
import logging
import re

import orjson

from batchyard.logs import redact_url
from batchyard.throttled_log import ThrottledLog
from batchyard.upstreams.base import UpstreamError, UpstreamResponse
from batchyard.upstreams.pool import Member

log = logging.getLogger("batchyard.upstreams")
_throttled = ThrottledLog(log)
_TOKEN = re.compile(r"[A-Za-z0-9_.-]{1,64}")

STATUS_HINTS = {
    400: "the upstream refused the request: see the lines' error bodies",
    401: "check --upstream-api-key / api_key_env",
    403: "check --upstream-api-key / api_key_env",
    404: "does the upstream URL end in /v1?",
    413: "the upstream refused a request this large",
    422: "the upstream refused the request: see the lines' error bodies",
    429: "rate limited: lower --concurrency or set rpm/tpm",
}
KIND_HINTS = {
    "connect": "is the server running at {url}?",
    "timeout": "raise --attempt-timeout?",
    "too_large": "raise --max-response-bytes?",
}


@functools.lru_cache(maxsize=256)
def _where(name: str, url: str | None) -> str:
    shown = redact_url(url) if url else name
    return shown if url is None or name in (url, url.rstrip("/")) else f"{name} ({shown})"


def _member_where(member: Member) -> tuple[str, str]:
    url = getattr(member.upstream, "base_url", None)
    url = url if isinstance(url, str) else None
    return _where(member.name, url), redact_url(url) if url else member.name


def answered(member: Member, resp: UpstreamResponse) -> None:
    """An answer of status >= 400 from `member`."""
    where, url = _member_where(member)
    code = _error_code(resp.body)
    hint = STATUS_HINTS.get(resp.status)
    if resp.status == 404 and code == "model_not_found":
        hint = "the upstream does not serve this model: check the routes (--upstream MODEL=URL)"
    elif hint is None and resp.status >= 500:
        hint = "the upstream failed (retried up to --max-retries times)"
    _throttled.log(
        logging.WARNING,
        f"{member.name}\0{resp.status}",
        "upstream %s answered %d%s%s",
        where,
        resp.status,
        f" ({code})" if code else "",
        f": {hint.format(url=url)}" if hint else "",
    )


def failed(member: Member, error: UpstreamError) -> None:
    """A request to `member` that got no answer (`error.kind`: connect, timeout, too_large)."""
    where, url = _member_where(member)
    hint = KIND_HINTS.get(error.kind)
    _throttled.log(
        logging.WARNING,
        f"{member.name}\0{error.kind}",
        "upstream %s failed (%s: %s)%s",
        where,
        error.kind,
        error.message[:200],
        f": {hint.format(url=url)}" if hint else "",
    )


def _error_code(body: bytes) -> str | None:
    """The `error.code` (or `error.type`, or vLLM's top-level `code`/`type`) of an error body, if a short token."""
    try:
        parsed = orjson.loads(body[:65536])
    except orjson.JSONDecodeError:
        return None
    if not isinstance(parsed, dict):
        return None
    err = parsed.get("error")
    where = err if isinstance(err, dict) else parsed
    for key in ("code", "type"):
        value = where.get(key)
        if isinstance(value, str) and _TOKEN.fullmatch(value):
            return value
    return None
