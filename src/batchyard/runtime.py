"""Assemble the components for one process: store, blobs, router, worker, API."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import FastAPI

from batchyard.api.app import create_app
from batchyard.api.services import Services
from batchyard.blobs.local import LocalBlobStore
from batchyard.config import Settings
from batchyard.execution.worker import Worker
from batchyard.store.sqlite import SQLiteStore
from batchyard.upstreams.base import Upstream
from batchyard.upstreams.http import HTTPUpstream
from batchyard.upstreams.router import Router

log = logging.getLogger("batchyard")


def build_router(settings: Settings) -> Router:
    by_url: dict[str, Upstream] = {}
    routes: list[tuple[str | None, Upstream]] = []
    for pattern, url in settings.upstreams:
        up = by_url.get(url)
        if up is None:
            up = by_url[url] = HTTPUpstream(
                url, api_key=settings.upstream_api_key, max_body=settings.max_response_bytes
            )
        routes.append((pattern, up))
    return Router(routes)


@dataclass
class Runtime:
    settings: Settings
    store: SQLiteStore
    blobs: LocalBlobStore
    router: Router
    worker: Worker | None

    @classmethod
    def create(cls, settings: Settings) -> Runtime:
        store = SQLiteStore(settings.database_path)
        blobs = LocalBlobStore(settings.blob_root)
        router = build_router(settings)
        worker = Worker(store, blobs, router, settings) if settings.run_worker else None
        return cls(settings, store, blobs, router, worker)

    def services(self) -> Services:
        notify = self.worker.wake if self.worker is not None else (lambda: None)
        return Services(self.store, self.blobs, self.router, self.settings, notify)

    @contextlib.asynccontextmanager
    async def running(self, on_worker_death: asyncio.Event | None = None) -> AsyncIterator[None]:
        await self.store.open()
        for up in self.router.upstreams:
            await up.start()
        task: asyncio.Task[None] | None = None
        if self.worker is not None:
            task = asyncio.create_task(self.worker.run(), name="worker")

            def died(t: asyncio.Task[None]) -> None:
                if not t.cancelled() and t.exception() is not None:
                    log.error("worker stopped", exc_info=t.exception())
                    if on_worker_death is not None:
                        on_worker_death.set()

            task.add_done_callback(died)
        try:
            yield
        finally:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            for up in self.router.upstreams:
                await up.close()
            await self.store.close()

    def app(self, on_worker_death: asyncio.Event | None = None) -> FastAPI:
        app = create_app(self.services())

        @contextlib.asynccontextmanager
        async def lifespan(_: FastAPI) -> AsyncIterator[None]:
            async with self.running(on_worker_death):
                yield

        app.router.lifespan_context = lifespan
        return app
