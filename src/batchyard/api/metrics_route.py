"""`GET /metrics` (Prometheus text exposition) and the API's own request metrics.

Like vLLM's, the endpoint needs no API key by default (a scraper rarely holds one); with `metrics_require_key` it
takes a valid key like every other route. The batch and backlog gauges come from the metadata store at scrape time
(one aggregate query); everything else from the processes' own counters (batchyard/metrics.py).
"""

from __future__ import annotations

import asyncio
import time

from fastapi import FastAPI, Request, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from batchyard import metrics
from batchyard.api.auth import Authenticator
from batchyard.api.services import Services

UNMATCHED = "unmatched"  # the route label of a request no route matched (never its raw path)


class RequestMetrics:
    """ASGI middleware: count every HTTP request by method, route template and status, and time it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # unless the app answers

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = scope.get("route")  # set by the router once a route matched
            template = getattr(route, "path", None) or UNMATCHED
            metrics.http_request(scope["method"], template, status, time.perf_counter() - started)


def install(app: FastAPI, svc: Services, auth: Authenticator) -> None:
    app.add_middleware(RequestMetrics)

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics(request: Request) -> Response:
        if svc.settings.metrics_require_key:
            auth.owner(request)
        stats = await svc.store.batch_stats()
        body = await asyncio.to_thread(metrics.exposition, stats)  # reads every process's files
        return Response(body, media_type=metrics.CONTENT_TYPE)
