"""The composition root: build one process's components from the settings and own their lifetime.

`serve`   `Runtime.create(settings).app()`: the API on the store, blobs and router, and its worker(s): child
          processes (`supervisor.WorkerPool`), or with --worker-in-process one worker on a thread of this process.
`worker`  `run_workers(settings)`: one worker in this process (`run_worker`), or a pool of child processes.

Every resource is entered into an `AsyncExitStack` as it is opened, so it is closed (in reverse order) however the
process ends. The factories live beside what they build: `store.factory.open_store`, `blobs.factory.open_blobs`,
`upstreams.factory.build_router`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from fastapi import FastAPI

from batchyard import logs, metrics
from batchyard.api.app import create_app
from batchyard.api.services import Services
from batchyard.blobs.base import BlobStore
from batchyard.blobs.factory import open_blobs
from batchyard.config import Settings
from batchyard.execution.worker import Worker
from batchyard.store.base import MetadataStore
from batchyard.store.factory import open_store
from batchyard.supervisor import WorkerPool, WorkerThread
from batchyard.upstreams.factory import build_router
from batchyard.upstreams.online import OnlineGate
from batchyard.upstreams.router import Router

log = logging.getLogger("batchyard")


async def _enter(
    stack: contextlib.AsyncExitStack, store: MetadataStore, blobs: BlobStore, router: Router | None = None
) -> None:
    """Open the store, and have the stack close the store, the blobs and the router's upstreams."""
    await store.open()
    stack.push_async_callback(store.close)
    stack.push_async_callback(blobs.aclose)
    if router is not None:
        stack.push_async_callback(router.aclose)


@dataclass
class Runtime:
    """What the API process of `serve` runs: the API's components and, unless --no-worker, its worker(s)."""

    settings: Settings
    store: MetadataStore
    blobs: BlobStore
    router: Router
    worker_mode: str  # "thread" (a worker on a thread of this process) or "process" (child processes)
    worker: Worker | None = None  # the in-process worker, once its thread has built it
    worker_pool: WorkerPool | None = None
    _online: OnlineGate | None = None

    @classmethod
    def create(cls, settings: Settings, worker_mode: str | None = None) -> Runtime:
        """`worker_mode`: "thread", "process", or None for settings.worker_mode. No worker runs when
        settings.run_worker is false."""
        return cls(
            settings,
            open_store(settings),
            open_blobs(settings),
            build_router(settings),
            worker_mode or settings.worker_mode,
        )

    def services(self) -> Services:
        return Services(
            self.store, self.blobs, self.router, self.settings, self._notify, online=self.online_gate()
        )

    def online_gate(self) -> OnlineGate:
        """The gate online requests pass (upstreams/online.py): on the board this machine's workers watch."""
        if self._online is None:
            off = self.settings.online_priority == "off"
            self._online = OnlineGate(None if off else self.settings.online_board)
        return self._online

    def announce(self, url: str) -> None:
        """Log what this process serves, once it listens at `url`: the startup summary (logs.py)."""
        logs.log_startup(self.settings, url, self.router, self.worker_mode)

    def stopping(self) -> None:
        """A signal asked this process to stop: its worker processes (which a Ctrl-C reaches as well) are expected
        to exit now and are not restarted. Safe to call from a signal handler."""
        if self.worker_pool is not None:
            self.worker_pool.stopping()

    def _notify(self) -> None:
        if self.worker is not None:
            self.worker.wake()
        elif self.worker_pool is not None:
            self.worker_pool.wake()

    @contextlib.asynccontextmanager
    async def running(self, on_worker_death: Callable[[], None] | None = None) -> AsyncIterator[None]:
        """Open the store and run the worker(s), if any, until the block exits; either way a busy batch does not
        delay this process's event loop. `on_worker_death`: called (on this loop) when the workers gave up."""
        async with contextlib.AsyncExitStack() as stack:
            children = self.settings.run_worker and self.worker_mode == "process"
            if children or metrics.multiprocess_dir():  # before any child or count exists
                stack.enter_context(metrics.shared_across_processes())
            await _enter(stack, self.store, self.blobs, self.router)
            if self._online is not None:
                stack.callback(self._online.close)
            if self.settings.run_worker:
                await self._start_workers(stack, on_worker_death or (lambda: None))
            yield

    async def _start_workers(self, stack: contextlib.AsyncExitStack, on_death: Callable[[], None]) -> None:
        if self.worker_mode == "process":
            self.worker_pool = WorkerPool(
                self.settings,
                self.settings.resolved_workers(),
                run_worker,
                on_death,
                release=self.store.release_worker,
            )
            self.worker_pool.start()
            stack.push_async_callback(self.worker_pool.aclose)
            return
        loop = asyncio.get_running_loop()

        def died() -> None:  # called on the worker's thread
            loop.call_soon_threadsafe(on_death)

        thread = WorkerThread(self._run_thread_worker, died)
        thread.start()
        stack.push_async_callback(asyncio.to_thread, thread.stop)

    async def _run_thread_worker(self) -> None:
        """The in-process worker, on its own thread and loop: this process's store and blobs, and a router of its
        own (its upstreams' connections and limiters belong to the loop that uses them)."""
        router = build_router(self.settings)
        self.worker = Worker(self.store, self.blobs, router, self.settings)
        async with contextlib.AsyncExitStack() as stack:
            stack.push_async_callback(self.blobs.aclose)  # what the blobs opened on this loop
            stack.push_async_callback(router.aclose)
            await router.start()
            await self.worker.run()

    def app(self, on_worker_death: Callable[[], None] | None = None) -> FastAPI:
        app = create_app(self.services())

        @contextlib.asynccontextmanager
        async def lifespan(_: FastAPI) -> AsyncIterator[None]:
            async with self.running(on_worker_death):
                yield

        app.router.lifespan_context = lifespan
        return app


async def run_worker(settings: Settings, wake_fd: int | None = None, name: str | None = None) -> int:
    """Run a worker (no API) until SIGTERM/SIGINT, which hand its leases back. `wake_fd`: a pipe whose bytes mean
    "poll now" (from the process that started this one; its end means that process is gone). Returns the exit
    status."""
    store, blobs, router = open_store(settings), open_blobs(settings), build_router(settings)
    worker = Worker(store, blobs, router, settings, name=name)
    async with contextlib.AsyncExitStack() as stack:
        await _enter(stack, store, blobs, router)
        await router.start()
        task = asyncio.create_task(worker.run(), name="worker")
        loop = asyncio.get_running_loop()

        def stop() -> None:
            # once: a second signal (Ctrl-C, then the parent's SIGTERM) must not cut the leases' hand-back
            if not task.cancelling():
                task.cancel()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop)
        if wake_fd is not None:
            _watch_wake_pipe(loop, wake_fd, worker, task)
        try:
            await task
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("worker stopped")
            return 1
    return 0


def _watch_wake_pipe(
    loop: asyncio.AbstractEventLoop, fd: int, worker: Worker, task: asyncio.Task[None]
) -> None:
    def woken() -> None:
        try:
            data = os.read(fd, 4096)
        except BlockingIOError:
            return
        if not data:  # the parent process is gone
            loop.remove_reader(fd)
            task.cancel()
            return
        worker.wake()

    os.set_blocking(fd, False)
    loop.add_reader(fd, woken)


async def run_workers(settings: Settings) -> int:
    """`batchyard worker`: one worker in this process, or with several (`--workers`), a pool of child processes
    supervised until SIGTERM/SIGINT (handed on to every child) or until a child keeps dying (exit status 1); a
    child that dies is restarted and its leases given back at once."""
    n = settings.resolved_workers()
    with contextlib.ExitStack() as metrics_stack:
        if settings.metrics_port:  # --metrics-port: this process serves every worker process's metrics
            if n > 1 or metrics.multiprocess_dir():
                metrics_stack.enter_context(metrics.shared_across_processes())
            metrics_stack.enter_context(metrics.serving(settings.metrics_host, settings.metrics_port))
        if n == 1:
            return await run_worker(settings)
        return await _run_pool(settings, n)


async def _run_pool(settings: Settings, n: int) -> int:
    died, asked = asyncio.Event(), asyncio.Event()
    store = open_store(settings)
    async with contextlib.AsyncExitStack() as stack:
        await store.open()
        stack.push_async_callback(store.close)
        pool = WorkerPool(settings, n, run_worker, died.set, release=store.release_worker)
        loop = asyncio.get_running_loop()

        def on_signal(_sig: int, _frame: object) -> None:
            # In the handler itself, before the loop sees a child's exit: a Ctrl-C stops the children too.
            pool.stopping()
            loop.call_soon_threadsafe(asked.set)

        for sig in (signal.SIGTERM, signal.SIGINT):
            previous = signal.signal(sig, on_signal)
            if previous is not None:
                stack.callback(signal.signal, sig, previous)
        pool.start()
        stack.push_async_callback(pool.aclose)
        await _first_of(died, asked)
    return 1 if died.is_set() and not asked.is_set() else 0


async def _first_of(*events: asyncio.Event) -> None:
    waits = [asyncio.create_task(e.wait()) for e in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in waits:
            t.cancel()
