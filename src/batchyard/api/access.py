"""The access log and the `x-request-id` of every API response, as a pure ASGI middleware around the whole app.

Pure ASGI (not Starlette's BaseHTTPMiddleware, which runs the app in a task of its own and copies every body
chunk through a stream) and outside the app's own error middleware, so a 500 gets its id too. Per request: one id,
one header added to the response start, one context variable set (every line logged while the request is served
carries the id: `logs.request_id`), and one log line after the response's last byte:

    GET /v1/batches/batch_abc 200 3.1ms req_0123...

`req_` + 32 hex digits like OpenAI's. The id is always batchyard's own: like OpenAI, a client's `x-request-id` is
not echoed (a client could otherwise make two requests share an id in the logs); a client's
`x-client-request-id` (the header OpenAI documents for that) or `x-request-id` is logged beside it as
`client_request_id` when it is a short token. An online request's answer (api/online.py) keeps its upstream's
`x-request-id` when the upstream sent one (the id its engine logged); the access line names it beside batchyard's.
/health and /metrics are logged at DEBUG only (probes and scrapes).
Bodies, query strings and headers (Authorization) are never logged; the path is logged as the client sent it
(percent-escapes kept, so a `%0a` cannot start a forged line).
"""

from __future__ import annotations

import logging
import re
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from batchyard import logs
from batchyard.ids import http_request_id

log = logging.getLogger(logs.ACCESS_LOGGER)
QUIET_PATHS = frozenset({"/health", "/metrics"})  # logged at DEBUG
MAX_PATH_CHARS = 300
CLIENT_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}")
CLIENT_HEADERS = (b"x-client-request-id", b"x-request-id")


class AccessLog:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = http_request_id()
        header = (b"x-request-id", rid.encode("ascii"))
        status = 0  # stays 0 when no response was sent (the client went away first)
        upstream_id: str | None = None

        async def send_with_id(message: Message) -> None:
            nonlocal status, upstream_id
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", ()))
                theirs = next((v for k, v in headers if k == b"x-request-id"), None)
                if theirs is None:
                    message = {**message, "headers": [*headers, header]}
                elif CLIENT_ID.fullmatch(theirs):
                    upstream_id = theirs.decode("ascii")
            await send(message)

        token = logs.request_id.set(rid)
        started = time.perf_counter()
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            logs.request_id.reset(token)
            _log(scope, status, time.perf_counter() - started, rid, upstream_id)


def _log(scope: Scope, status: int, seconds: float, rid: str, upstream_id: str | None = None) -> None:
    level = logging.DEBUG if scope["path"] in QUIET_PATHS else logging.INFO
    if not log.isEnabledFor(level):
        return
    raw = scope.get("raw_path")
    path = raw.decode("latin-1") if isinstance(raw, bytes) else str(scope["path"])
    if len(path) > MAX_PATH_CHARS or not path.isprintable():
        path = path[:MAX_PATH_CHARS].encode("unicode_escape").decode("ascii")
    method = str(scope["method"])
    ms = round(seconds * 1000, 3)
    client = _client_id(scope)
    log.log(
        level,
        "%s %s %s %.1fms %s%s%s",
        method,
        path,
        status or "-",
        ms,
        rid,
        f" (client id {client})" if client else "",
        f" (upstream id {upstream_id})" if upstream_id else "",
        extra={
            "request_id": rid,
            "method": method,
            "path": path,
            "status": status,
            "duration_ms": ms,
            "client_request_id": client,
            "upstream_request_id": upstream_id,
        },
    )


def _client_id(scope: Scope) -> str | None:
    """The client's own id for this request: its x-client-request-id, else an x-request-id (from a proxy)."""
    found: dict[bytes, bytes] = {}
    for name, value in scope["headers"]:
        if name in CLIENT_HEADERS and CLIENT_ID.fullmatch(value):
            found.setdefault(name, value)
    for name in CLIENT_HEADERS:
        if name in found:
            return found[name].decode("ascii")
    return None
