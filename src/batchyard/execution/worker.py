"""The worker: supervised loops that validate, run shards, finalize and sweep. One dying stops the worker."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from batchyard.blobs.base import BlobStore
from batchyard.config import Settings
from batchyard.execution import jobs
from batchyard.execution.dispatcher import Dispatcher
from batchyard.execution.shard_runner import ShardRunner
from batchyard.execution.webhooks import WebhookSender
from batchyard.ids import worker_id
from batchyard.store.base import MetadataStore
from batchyard.upstreams.router import Router

log = logging.getLogger("batchyard.worker")


class Worker:
    def __init__(
        self,
        store: MetadataStore,
        blobs: BlobStore,
        router: Router,
        settings: Settings,
        *,
        name: str | None = None,
    ) -> None:
        self.store = store
        self.blobs = blobs
        self.router = router
        self.settings = settings
        self.id = name or worker_id()
        self.dispatcher = Dispatcher(
            router,
            concurrency=settings.concurrency,
            max_concurrency=settings.max_concurrency,
            initial_concurrency=settings.initial_concurrency,
            attempt_timeout=settings.attempt_timeout,
            max_retries=settings.max_retries,
        )
        self.runner = ShardRunner(store, blobs, self.dispatcher, settings)
        self.webhooks = (
            WebhookSender(settings.webhook_urls, settings.webhook_secret or "")
            if settings.webhook_urls
            else None
        )
        self._wake = asyncio.Event()
        self._event_loop: asyncio.AbstractEventLoop | None = None

    def wake(self) -> None:
        """Poll now. Safe to call from any thread (the API runs on another event loop than the worker)."""
        loop = self._event_loop
        if loop is None:
            return
        try:
            current: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            current = None
        if current is loop:
            self._wake.set()
        else:
            loop.call_soon_threadsafe(self._wake.set)

    async def _idle(self) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.settings.poll_interval):
                await self._wake.wait()
        self._wake.clear()

    async def _loop(self, step: Callable[[], Awaitable[bool]]) -> None:
        while True:
            if not await step():
                await self._idle()

    async def validate_once(self) -> bool:
        job = await self.store.claim_validation(self.id, self.settings.lease_seconds)
        if job is None:
            return False
        try:
            await jobs.validate(job, self.store, self.blobs, self.router, self.settings, self.id)
        except BaseException:
            with contextlib.suppress(Exception):
                await asyncio.shield(self.store.release_job(job.batch.id, self.id))
            raise
        self.wake()
        return True

    async def finalize_once(self) -> bool:
        job = await self.store.claim_finalization(self.id, self.settings.lease_seconds)
        if job is None:
            return False
        try:
            await jobs.finalize(job, self.store, self.blobs, self.settings, self.id)
        except BaseException:
            with contextlib.suppress(Exception):
                await asyncio.shield(self.store.release_job(job.batch.id, self.id))
            raise
        return True

    async def run_shard_once(self) -> bool:
        claim = await self.store.claim_shard(self.id, self.settings.lease_seconds)
        if claim is None:
            return False
        await self.runner.run(claim)
        self.wake()
        return True

    async def deliver_webhooks_once(self) -> bool:
        assert self.webhooks is not None
        if not await self.webhooks.deliver(self.store, self.id):
            await asyncio.sleep(1.0)  # nothing due: look again in a second
        return True

    async def sweep_files_once(self) -> bool:
        await self.sweep()
        await asyncio.sleep(30)
        return True

    async def sweep(self) -> None:
        """Delete expired files, and end expired uploads (removing the blobs of their parts)."""
        for f in await self.store.expired_files(100):
            res = await self.store.delete_file(f.owner, f.id)
            if res is not None and res[1]:
                await self.blobs.delete(f.blob_key)
        for u in await self.store.expired_uploads(100):
            if await self.store.finish_upload(u.owner, u.id, "expired", None):
                await self.blobs.delete_quietly(p.blob_key for p in await self.store.get_upload_parts(u.id))

    async def run(self) -> None:
        """Run every loop until cancelled; an exception in one loop cancels the others and propagates."""
        self._event_loop = asyncio.get_running_loop()
        log.info("worker %s started", self.id)
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._loop(self.validate_once), name="validator")
                tg.create_task(self._loop(self.finalize_once), name="finalizer")
                tg.create_task(self._loop(self.sweep_files_once), name="file-sweeper")
                if self.webhooks is not None:
                    tg.create_task(self._loop(self.deliver_webhooks_once), name="webhooks")
                for i in range(self.settings.max_shards):
                    tg.create_task(self._loop(self.run_shard_once), name=f"shard-runner-{i}")
        finally:
            if self.webhooks is not None:
                await self.webhooks.close()
