"""What batchyard's processes log and how: the formatters (text, or one JSON object a line), `setup` for each
process (the API's and every worker's), the request id of the API request being served, and the startup summary.

Nothing here logs a secret: URLs are shown without their user info's password (`redact_url`), API keys and
upstream keys only as counts, request bodies never. See docs/logging.md.
"""

from __future__ import annotations

import logging
import os
import time
from contextvars import ContextVar
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import orjson

from batchyard.config import Settings

if TYPE_CHECKING:
    from batchyard.upstreams.router import Router

log = logging.getLogger("batchyard")
ACCESS_LOGGER = "batchyard.access"
# the API request this code runs for (set by api/access.py); every line logged meanwhile carries it
request_id: ContextVar[str | None] = ContextVar("batchyard_request_id", default=None)
# what an access line adds to its record (`extra=`), and the JSON formatter writes out as fields
ACCESS_FIELDS = (
    "request_id",
    "method",
    "path",
    "status",
    "duration_ms",
    "client_request_id",
    "upstream_request_id",
)
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class TextFormatter(logging.Formatter):
    """`2026-01-01 12:00:00,000 INFO batchyard: message`, and `[req_...]` after the message of a line logged
    while serving an API request (an access line says its id itself)."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        text = super().formatMessage(record)
        rid = request_id.get()
        if rid is not None and record.name != ACCESS_LOGGER:
            text += f" [{rid}]"
        return text


class JSONFormatter(logging.Formatter):
    """One JSON object a line: ts (UTC, ISO 8601, milliseconds), level, logger, msg, pid; request_id while an API
    request is served; an access line's method, path, status, duration_ms (and client_request_id when the client
    sent one); exc (the traceback) when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": _iso(record.created),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            "pid": record.process,
        }
        rid = request_id.get()
        if rid is not None:
            out["request_id"] = rid
        for name in ACCESS_FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                out[name] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return orjson.dumps(out, default=str).decode()


def _iso(created: float) -> str:
    ms = int(created * 1000) % 1000
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{ms:03d}Z"


def setup(level: str, fmt: str = "text") -> None:
    """Log to stderr at `level` ("debug", "info", ...) as `fmt` ("text" or "json"), replacing what was set up
    before. Every process calls it: the API's (cli/main.py) and each worker's (supervisor.py)."""
    handler = logging.StreamHandler()
    handler.setFormatter(JSONFormatter() if fmt == "json" else TextFormatter())
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    logging.captureWarnings(True)  # a library's warning is a log line too (one JSON object in json format)


# -- the startup summary --


def redact_url(url: str, *, keep_user: bool = False) -> str:
    """`url` without its password (without any user info unless `keep_user`) and without its query string,
    which may hold one (`?password=`): what a log may show of a URL."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return "<a URL that does not parse>"
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if port is not None:
        netloc += f":{port}"
    if keep_user and parts.username:
        netloc = f"{parts.username}@{netloc}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", "")) + ("?..." if parts.query else "")


def describe_store(settings: Settings) -> str:
    url = settings.database_url
    if not url:
        return f"SQLite {settings.database_path.resolve()}"
    if url.startswith("sqlite:///"):
        return f"SQLite {Path(url.removeprefix('sqlite:///') or settings.database_path).resolve()}"
    if url.startswith(("postgresql://", "postgres://")):
        parts = urlsplit(url)
        try:
            where = f"{parts.hostname or 'the local socket'}" + (f":{parts.port}" if parts.port else "")
        except ValueError:
            where = "?"
        user = f"{parts.username}@" if parts.username else ""
        return f"PostgreSQL {user}{where}/{parts.path.lstrip('/')}"
    return redact_url(url)


def describe_storage(settings: Settings) -> str:
    url = settings.storage_url
    if not url:
        return f"local directory {settings.blob_root.resolve()}"
    if url.startswith("file://"):
        return f"local directory {Path(url.removeprefix('file://') or settings.blob_root).resolve()}"
    if url.startswith("s3://"):
        parts = urlsplit(url)
        prefix = parts.path.strip("/")
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        return (
            f"S3 bucket {parts.hostname}"
            + (f", prefix {prefix}/" if prefix else "")
            + f", endpoint {redact_url(endpoint) if endpoint else 'AWS (default)'}"
        )
    return redact_url(url)


def describe_workers(settings: Settings, mode: str) -> str:
    shards = f"{settings.max_shards} shards at once each"
    if not settings.run_worker:
        return "none (--no-worker: this process serves the API only)"
    if mode == "thread":
        return f"1 on a thread of the API process (--worker-in-process), {settings.max_shards} shards at once"
    n = settings.resolved_workers()
    if n == 1:
        return f"1 process, {settings.max_shards} shards at once"
    return f"{n} processes, {shards}, each with 1/{n} of every upstream limit"


def describe_upstreams(router: Router) -> list[str]:
    """A line for each upstream of `router`: where it is (no key, no user info), the models routed to it and its
    concurrency limit; the embedded engine's models on a line of their own."""
    from batchyard.upstreams.limiter import AdaptiveLimiter

    lines = []
    by_member: dict[int, list[str]] = {}
    members = {}
    for pattern, member in router.routes():
        by_member.setdefault(id(member), []).append(pattern)
        members[id(member)] = member
    for key, patterns in by_member.items():
        member = members[key]
        models = ", ".join(patterns)
        url = getattr(member.upstream, "base_url", None)
        if not isinstance(url, str):
            lines.append(f"embedded models: {models} (in process)")
            continue
        limiter = member.limiter
        if isinstance(limiter, AdaptiveLimiter):
            limit = f"auto (from {limiter.limit}, at most {limiter.max_limit})"
        else:
            limit = str(limiter.limit)
        where = redact_url(url)
        name = member.name
        label = where if name in (url, url.rstrip("/")) else f"{name} ({where})"
        rates = "".join(
            f", {what} {bucket.rate * 60:g}"
            for what, bucket in (("rpm", member.rpm), ("tpm", member.tpm))
            if bucket is not None
        )
        lines.append(f"upstream {label}: models {models}, concurrency {limit}{rates}")
    return lines


def version() -> str:
    try:
        return metadata.version("batchyard")
    except metadata.PackageNotFoundError:
        return "unknown"


def startup_lines(settings: Settings, url: str, router: Router, worker_mode: str) -> list[str]:
    """What `serve` says once it listens at `url` (http://HOST:PORT)."""
    auth = f"{len(settings.api_keys)} API key(s)" if settings.api_keys else "off (no --api-key)"
    upstreams = describe_upstreams(router) or [
        "upstreams: none (no --upstream and --no-embedded): every request line will fail with model_not_found"
    ]
    return [
        f"batchyard {version()} listening on {url} (dashboard /, API /v1, docs /docs)",
        f"store: {describe_store(settings)}",
        f"storage: {describe_storage(settings)}",
        f"workers: {describe_workers(settings, worker_mode)}",
        *upstreams,
        f"auth: {auth}",
    ]


def log_startup(settings: Settings, url: str, router: Router, worker_mode: str) -> None:
    for line in startup_lines(settings, url, router, worker_mode):
        log.log(logging.WARNING if line.startswith("upstreams: none") else logging.INFO, "%s", line)
