"""The worker: supervised loops that validate, run shards, finalize and sweep.

No loop dies of its work (execution/containment.py): a dependency that is down makes the loop wait with a bounded
backoff, any other error is logged and the loop goes on. A loop that still ends (a bug in the loop itself) stops
the worker, whose supervisor restarts it."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
from collections.abc import Awaitable, Callable

from batchyard import metrics
from batchyard.blobs.base import BlobStore
from batchyard.config import Settings
from batchyard.execution import jobs
from batchyard.execution.containment import DEPENDENCY_ERRORS, Backoff, Paused
from batchyard.execution.dispatcher import Dispatcher
from batchyard.execution.shard_runner import ShardLoop, ShardRunner
from batchyard.execution.sweeper import Sweeper, SweepReport
from batchyard.execution.webhooks import WebhookSender
from batchyard.ids import worker_id
from batchyard.store.base import MetadataStore, UpstreamLoad
from batchyard.upstreams.online import Board, BoardWatcher, MachineShares
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
            attempt_timeout=settings.attempt_timeout,
            max_retries=settings.max_retries,
            limit_split=settings.limit_split,
        )
        self.runner = ShardRunner(store, blobs, self.dispatcher, settings)
        self.sweeper = Sweeper(store, blobs)
        # always: a project's own endpoints (in the store) need no --webhook-url
        self.webhooks = WebhookSender(settings.webhook_urls, settings.webhook_secret or "")
        self._wake = asyncio.Event()
        self._event_loop: asyncio.AbstractEventLoop | None = None

    def wake(self, *, nudge: bool = True) -> None:
        """Poll now, and with `nudge` make running shards look at their batch now (a cancel may be why). Safe to
        call from any thread (the API runs on another event loop than the worker)."""
        loop = self._event_loop
        if loop is None:
            return
        try:
            current: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            current = None
        if current is loop:
            self._woken(nudge)
        else:
            loop.call_soon_threadsafe(self._woken, nudge)

    def _woken(self, nudge: bool) -> None:
        self._wake.set()
        if nudge:
            self.runner.nudge()

    async def _idle(self) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.settings.poll_interval):
                await self._wake.wait()
        self._wake.clear()

    async def _loop(self, step: Callable[[], Awaitable[bool]], what: str) -> None:
        """Run `step` until cancelled: again at once while it finds work, after an idle wait when it does not, after
        a backoff when a dependency is down or it failed (never ending the loop)."""
        outage = Backoff(what, log)
        while True:
            try:
                busy = await step()
            except Paused as p:  # a shard was handed back: its storage or database is down
                await asyncio.sleep(p.delay)
                continue
            except DEPENDENCY_ERRORS as e:
                await asyncio.sleep(outage.failed(e))
                continue
            except Exception:
                log.exception("%s failed; going on", what)
                await asyncio.sleep(outage.failed(RuntimeError("unexpected error (logged above)")))
                continue
            outage.ok()
            if not busy:
                await self._idle()

    async def _listen(self) -> None:
        """Wake on the store's change notifications (PostgreSQL: a cancel or new work from another machine)."""
        outage = Backoff("listening for store changes", log)

        def changed(what: str) -> None:
            outage.ok()
            self.wake(nudge=what == "cancel")  # only a cancel makes running shards look at their batch now

        while True:
            try:
                if not await self.store.listen(changed):
                    return  # the store cannot push changes: polling and heartbeats suffice
            except DEPENDENCY_ERRORS as e:
                await asyncio.sleep(outage.failed(e))

    async def validate_once(self) -> bool:
        job = await self.store.claim_validation(self.id, self.settings.lease_seconds)
        if job is None:
            return False
        try:
            await jobs.validate(job, self.store, self.blobs, self.router, self.settings, self.id)
        except BaseException as e:
            if isinstance(e, Exception) and not isinstance(e, DEPENDENCY_ERRORS):
                # validation is pure: the same input fails the same way, so the batch fails (with the reason)
                log.exception("validating batch %s failed", job.batch.id)
                await jobs.fail_unexpectedly(job, self.store, self.id, e)
                return True
            with contextlib.suppress(Exception):  # cancelled, or a dependency is down: hand the job back
                await asyncio.shield(self.store.release_job(job.batch.id, self.id))
            raise
        self.wake(nudge=False)
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

    async def run_shard_once(self, loop: ShardLoop | None = None) -> bool:
        """Claim a shard and run it; False when none was found. `loop`: the calling loop, which claims again at
        once after a shard (the shard's share of the lanes waits for that claim: ShardRunner._ended); None for a
        single call."""
        follows = loop is not None and loop.ended is not None
        claim = None
        try:
            # Before a wait, the share kept for this claim goes back to the running shards.
            if follows and (
                self.runner.outage.failures
                or not self.runner.solo_done.is_set()
                or self.runner.active >= self.dispatcher.total_limit()
            ):
                assert loop is not None
                self.runner.handed_on(loop)
                self.runner.claimed_nothing()
                follows = False
            # storage was down: claim (and send lines) only once it takes a write
            if self.runner.outage.failures:
                try:
                    await self.blobs.probe()
                except DEPENDENCY_ERRORS as e:
                    raise Paused(self.runner.outage.failed(e), e) from e
                self.runner.outage.ok()  # it is back (with nothing left to run, no probe every poll for ever)
            # A shard that failed before runs alone (ShardRunner._run_alone): nothing new is claimed meanwhile.
            await self.runner.solo_done.wait()
            await self.runner.room_for_shard()  # no more shards than lanes the concurrency limit allows
            if not follows:  # a shard that starts meanwhile leaves it a lane (ShardRunner._fair_lanes)
                self.runner.claiming += 1
            try:
                claim = await self.store.claim_shard(self.id, self.settings.lease_seconds)
            finally:
                if not follows:
                    self.runner.claiming -= 1
        finally:
            if loop is not None:
                self.runner.handed_on(loop)
            if claim is None:  # nothing, or the claim failed: the others take the lanes left for it
                self.runner.claimed_nothing()
        if claim is None:
            return False
        metrics.shard_claimed()
        await self.runner.run(claim, loop)
        self.wake(nudge=False)
        return True

    async def run_guest_shard_once(self) -> bool:
        """Fair share without preemption: a worker full of some owners' shards takes, on top, one shard at a time
        of an owner that has none here, so a project that arrives while others fill the worker starts at once
        instead of after one of their shards (its lanes then share the slots by weight: domain/fairshare.py)."""
        await self.runner.solo_done.wait()
        if not self.runner.full() or self.runner.outage.failures:
            return False  # the regular loops claim (and probe the storage after an outage)
        claim = await self.store.claim_shard(
            self.id, self.settings.lease_seconds, not_owners=self.runner.owners()
        )
        if claim is None:
            return False
        metrics.shard_claimed()
        await self.runner.run(claim)
        self.wake(nudge=False)
        return True

    async def deliver_webhooks_once(self) -> bool:
        if not await self.webhooks.deliver(self.store, self.id):
            await asyncio.sleep(1.0)  # nothing due: look again in a second
        return True

    async def _deliver_webhooks(self) -> None:
        """The webhook loop, with its HTTP client open for as long as it runs."""
        async with self.webhooks.open():
            await self._loop(self.deliver_webhooks_once, "webhooks")

    async def sweep_files_once(self) -> bool:
        await self.sweep()
        await asyncio.sleep(30)
        return True

    async def sweep(self) -> SweepReport:
        """One pass of the sweeper: expired files and uploads, deleted files' blobs, orphans (execution/sweeper)."""
        return await self.sweeper.sweep()

    async def _watch_online(self) -> None:
        """Batch lines yield to the online requests of this machine's API processes, and share each upstream's
        limit with the other workers (upstreams/online.py). A failure here is logged and the watch starts again:
        meanwhile each limit is this worker's alone."""
        while True:
            try:
                await self._watch_board()
            except Exception:
                log.exception("watching the online board failed; again in 5 s")
            for m in self.router.members:  # as if alone until the board is read again
                m.limiter.reserve(0)
                m.limiter.share(None)
            await asyncio.sleep(5.0)

    async def _watch_board(self) -> None:
        try:
            board = Board(self.settings.online_board)
        except OSError as e:  # no shared memory here: batch lines do not see online requests
            log.warning(
                "online priority is off: the board %s cannot be opened (%s)", self.settings.online_board, e
            )
            await asyncio.Event().wait()  # for ever (until the worker stops)
            return
        shared = self.settings.limit_split == 1 and self.settings.shares_limits
        watcher = BoardWatcher(board, self.router.members, self.settings.online_priority, share=shared)

        async def exchange(loads: list[tuple[str, int, int]]) -> list[UpstreamLoad] | None:
            try:
                return await self.store.exchange_load(self.id, machine, loads, ttl_s=3.0)
            except DEPENDENCY_ERRORS:
                return None  # no word from the other machines: this one runs the whole limit meanwhile

        machine = f"{socket.gethostname()}|{self.settings.online_board}"
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(watcher.run())
                if shared:
                    tg.create_task(MachineShares(watcher, machine, exchange).run())
        finally:
            board.close()

    async def run(self) -> None:
        """Run every loop until cancelled; an exception in one loop cancels the others and propagates."""
        self._event_loop = asyncio.get_running_loop()
        log.info("worker %s started (pid %d)", self.id, os.getpid())
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._loop(self.validate_once, "validation"), name="validator")
            tg.create_task(self._loop(self.finalize_once, "finalization"), name="finalizer")
            tg.create_task(self._loop(self.sweep_files_once, "sweeping"), name="file-sweeper")
            tg.create_task(self._deliver_webhooks(), name="webhooks")
            tg.create_task(self._listen(), name="store-listener")
            if self.settings.online_priority != "off":
                tg.create_task(self._watch_online(), name="online-board")
            for i in range(self.settings.max_shards):
                step = functools.partial(self.run_shard_once, ShardLoop())
                tg.create_task(self._loop(step, "running shards"), name=f"shard-runner-{i}")
            tg.create_task(self._loop(self.run_guest_shard_once, "running shards"), name="guest-shard-runner")
