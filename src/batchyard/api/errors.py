"""The OpenAI error envelope for every error the API answers, including the framework's own."""

from __future__ import annotations

import errno
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from batchyard.api.responses import JSONResponse
from batchyard.errors import (
    APIError,
    BlobError,
    BlobStorageFull,
    InsufficientStorage,
    RateLimited,
    StorageUnavailable,
    StoreError,
    TooManyRequests,
)
from batchyard.throttled_log import ThrottledLog

FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


def storage_full() -> JSONResponse:
    exc = InsufficientStorage(
        "The storage is full: the file could not be stored. Delete some files, or retry later.",
        code="storage_full",
    )
    return JSONResponse(exc.to_dict(), status_code=exc.status_code)


def storage_down() -> JSONResponse:
    exc = StorageUnavailable("The storage is unavailable; retry later.", code="storage_unavailable")
    return JSONResponse(exc.to_dict(), status_code=exc.status_code)


log = logging.getLogger("batchyard.api")
_outages = ThrottledLog(log)


def _outage(kind: str, exc: BaseException) -> None:
    """A failing dependency, logged once per interval (an outage fails every request)."""
    _outages.log(logging.ERROR, kind, "%s: %s: %s", kind, type(exc).__name__, str(exc)[:300])


def envelope(
    status: int, message: str, *, type_: str, param: str | None = None, code: str | None = None
) -> JSONResponse:
    return JSONResponse(
        {"error": {"message": message, "type": type_, "param": param, "code": code}}, status_code=status
    )


def install(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        resp = JSONResponse(exc.to_dict(), status_code=exc.status_code)
        if isinstance(exc, TooManyRequests):
            resp.headers["x-should-retry"] = (
                "false"  # a cap is not lifted by retrying (the openai SDK obeys this)
            )
        if isinstance(exc, RateLimited):
            resp.headers["retry-after"] = str(exc.retry_after)
        return resp

    @app.exception_handler(BlobError)
    async def blob_error(_: Request, exc: BlobError) -> JSONResponse:
        if isinstance(exc, BlobStorageFull):
            _outage("blob storage full", exc)
            return storage_full()
        _outage("blob storage failed", exc)
        return storage_down()

    @app.exception_handler(StoreError)
    async def store_error(_: Request, exc: StoreError) -> JSONResponse:
        _outage("metadata store failed", exc)
        return storage_down()

    @app.exception_handler(OSError)
    async def os_error(_: Request, exc: OSError) -> JSONResponse:
        if exc.errno in FULL:
            _outage("storage full", exc)
            return storage_full()
        _outage("I/O error", exc)
        return storage_down()

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        errs = exc.errors()
        first = errs[0] if errs else {}
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
        param = ".".join(loc) or None
        msg = f"Invalid value for '{param}': {first.get('msg', 'invalid')}." if param else "Invalid request."
        return envelope(400, msg, type_="invalid_request_error", param=param, code="invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:  # no route: OpenAI's answer to a path it does not serve
            path = request.url.path
            shown = path if len(path) <= 100 else path[:100] + "..."
            message = (
                f"Unknown request URL: {request.method} {shown}. Please check the URL for typos, or see the docs "
                "at https://platform.openai.com/docs/api-reference/."
            )
            return envelope(404, message, type_="invalid_request_error", code="unknown_url")
        if exc.status_code == 405:
            return envelope(
                405, "Method not allowed.", type_="invalid_request_error", code="method_not_allowed"
            )
        return envelope(exc.status_code, str(exc.detail), type_="invalid_request_error")

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error", exc_info=exc)
        return envelope(500, "The server had an error processing your request.", type_="server_error")
