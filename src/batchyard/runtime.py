"""Assemble the components for one process: store, blobs, router, worker, API."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI

from batchyard.api.app import create_app
from batchyard.api.services import Services
from batchyard.blobs.base import BlobStore
from batchyard.blobs.local import LocalBlobStore
from batchyard.config import Settings
from batchyard.execution.limiter import Limiter
from batchyard.execution.worker import Worker
from batchyard.store.base import MetadataStore
from batchyard.store.sqlite import SQLiteStore
from batchyard.upstreams.base import Upstream
from batchyard.upstreams.http import HTTPUpstream
from batchyard.upstreams.pool import Member, TokenBucket
from batchyard.upstreams.router import Router

log = logging.getLogger("batchyard")


def build_router(settings: Settings) -> Router:
    """Routes for --upstream, plus the embedded engine's exact model names when it is on."""
    by_url: dict[str, Upstream] = {}
    routes: list[tuple[str | None, Upstream | Member]] = []
    embedded = (
        settings.embedded
        if settings.embedded is not None
        else not (settings.upstreams or settings.upstream_specs)
    )
    if embedded:
        from batchyard.upstreams.embedded import CHAT_MODEL, EmbeddedUpstream, embedded_routes

        engine = EmbeddedUpstream(
            model_path=settings.model_path,
            slots=settings.embedded_slots,
            chat_model=Path(settings.model_path).stem if settings.model_path else CHAT_MODEL,
        )
        routes.extend(embedded_routes(engine))
    for spec in settings.upstream_specs:
        key = os.environ.get(spec.api_key_env) if spec.api_key_env else settings.upstream_api_key
        member = Member(
            HTTPUpstream(spec.base_url, api_key=key, name=spec.name, max_body=settings.max_response_bytes),
            weight=spec.weight,
            limiter=Limiter(spec.max_concurrency) if spec.max_concurrency is not None else None,
            timeout=spec.timeout,
            rpm=TokenBucket(spec.rpm) if spec.rpm else None,
            tpm=TokenBucket(spec.tpm) if spec.tpm else None,
            priority=spec.priority,
        )
        routes.extend((pattern, member) for pattern in spec.models)
    for pattern, url in settings.upstreams:
        http = by_url.get(url)
        if http is None:
            http = by_url[url] = HTTPUpstream(
                url, api_key=settings.upstream_api_key, max_body=settings.max_response_bytes
            )
        routes.append((pattern, http))
    return Router(routes)


class WorkerThread:
    """A worker running on a dedicated thread with its own event loop (uvloop where available)."""

    def __init__(self, worker: Worker, router: Router, on_death: Callable[[], None]) -> None:
        self.worker = worker
        self.router = router
        self.on_death = on_death
        self._thread = threading.Thread(target=self._main, name="batchyard-worker", daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._ready = threading.Event()

    def start(self) -> None:
        self._thread.start()
        self._ready.wait(30)

    def _main(self) -> None:
        try:
            import uvloop

            uvloop.run(self._run())
        except ImportError:  # pragma: no cover - platforms without uvloop
            asyncio.run(self._run())

    async def _run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        self._ready.set()
        try:
            for up in self.router.upstreams:
                await up.start()
            await self.worker.run()
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("worker stopped")
            self.on_death()
        finally:
            for up in self.router.upstreams:
                await up.close()
            await self.worker.blobs.aclose()

    def stop(self, timeout: float = 60.0) -> None:
        loop, task = self._loop, self._task
        if loop is not None and task is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(task.cancel)
        self._thread.join(timeout)


def open_store(settings: Settings) -> MetadataStore:
    """The metadata store named by --database-url (SQLite in the data dir by default)."""
    url = settings.database_url
    if not url:
        return SQLiteStore(settings.database_path)
    if url.startswith("sqlite:///"):
        return SQLiteStore(url.removeprefix("sqlite:///") or settings.database_path)
    if url.startswith(("postgresql://", "postgres://")):
        from batchyard.store.postgres import PostgresStore

        return PostgresStore(url)
    raise ValueError(f"unsupported --database-url {url!r}: use sqlite:///PATH or postgresql://...")


def open_blobs(settings: Settings) -> BlobStore:
    """The blob store named by --storage-url (a local directory in the data dir by default)."""
    url = settings.storage_url
    if not url:
        return LocalBlobStore(settings.blob_root)
    if url.startswith("file://"):
        return LocalBlobStore(url.removeprefix("file://") or settings.blob_root)
    if url.startswith("s3://"):
        from batchyard.blobs.s3 import S3BlobStore

        return S3BlobStore.from_url(url)
    raise ValueError(f"unsupported --storage-url {url!r}: use file:///PATH or s3://BUCKET/PREFIX")


@dataclass
class Runtime:
    settings: Settings
    store: MetadataStore
    blobs: BlobStore
    router: Router
    worker: Worker | None

    @classmethod
    def create(cls, settings: Settings) -> Runtime:
        store = open_store(settings)
        blobs = open_blobs(settings)
        router = build_router(settings)
        worker = Worker(store, blobs, router, settings) if settings.run_worker else None
        return cls(settings, store, blobs, router, worker)

    def services(self) -> Services:
        notify = self.worker.wake if self.worker is not None else (lambda: None)
        return Services(self.store, self.blobs, self.router, self.settings, notify)

    @contextlib.asynccontextmanager
    async def running(self, on_worker_death: Callable[[], None] | None = None) -> AsyncIterator[None]:
        """Open the store; run the worker (if any) on its own thread and event loop until the block exits.

        The worker gets its own loop so that a busy batch never delays the API: GET /v1/batches/{id} stays fast
        while thousands of lines are in flight.
        """
        await self.store.open()
        thread: WorkerThread | None = None
        if self.worker is not None:
            api_loop = asyncio.get_running_loop()

            def died() -> None:
                if on_worker_death is not None:
                    api_loop.call_soon_threadsafe(on_worker_death)

            thread = WorkerThread(self.worker, self.router, died)
            thread.start()
        try:
            yield
        finally:
            if thread is not None:
                await asyncio.to_thread(thread.stop)
            await self.blobs.aclose()
            await self.store.close()

    def app(self, on_worker_death: Callable[[], None] | None = None) -> FastAPI:
        app = create_app(self.services())

        @contextlib.asynccontextmanager
        async def lifespan(_: FastAPI) -> AsyncIterator[None]:
            async with self.running(on_worker_death):
                yield

        app.router.lifespan_context = lifespan
        return app
