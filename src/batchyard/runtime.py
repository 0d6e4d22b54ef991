"""Assemble the components for one process: store, blobs, router, worker, API."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import multiprocessing.process
import os
import signal as signal_module
import sys
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from batchyard.api.app import create_app
from batchyard.api.services import Services
from batchyard.blobs.base import BlobStore
from batchyard.blobs.local import LocalBlobStore
from batchyard.config import Settings
from batchyard.execution.limiter import Limiter
from batchyard.execution.worker import Worker
from batchyard.ids import worker_id
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
    if settings.embedded_on:
        from batchyard.upstreams.embedded import CHAT_MODEL, EmbeddedUpstream, embedded_routes

        engine = EmbeddedUpstream(
            model_path=settings.model_path,
            slots=settings.embedded_slots,
            chat_model=Path(settings.model_path).stem if settings.model_path else CHAT_MODEL,
        )
        routes.extend(embedded_routes(engine))
    if settings.local_models:
        from batchyard.upstreams.embedded import EmbeddedUpstream

        for name, path in settings.local_models.items():
            local = EmbeddedUpstream(
                model_path=path, slots=settings.embedded_slots, chat_model=name, embeddings=False
            )
            routes.append((name, local))
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


async def run_worker(settings: Settings, wake_fd: int | None = None, name: str | None = None) -> int:
    """Run a worker (no API) until SIGTERM/SIGINT, which hand its leases back. `wake_fd`: a pipe whose bytes mean
    "poll now" (from the API process that started this one). Returns the exit status."""
    import signal

    rt = Runtime.create(settings, worker_mode="thread", worker_name=name)
    assert rt.worker is not None
    await rt.store.open()
    for up in rt.router.upstreams:
        await up.start()
    task = asyncio.create_task(rt.worker.run(), name="worker")
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    if wake_fd is not None:
        worker = rt.worker

        def woken() -> None:
            try:
                data = os.read(wake_fd, 4096)
            except BlockingIOError:
                return
            if not data:  # the API process is gone
                loop.remove_reader(wake_fd)
                task.cancel()
                return
            worker.wake()

        os.set_blocking(wake_fd, False)
        loop.add_reader(wake_fd, woken)
    code = 0
    try:
        await task
    except asyncio.CancelledError:
        pass
    except Exception:
        log.exception("worker stopped")
        code = 1
    finally:
        for up in rt.router.upstreams:
            await up.close()
        await rt.blobs.aclose()
        await rt.store.close()
    return code


async def run_workers(settings: Settings) -> int:
    """`batchyard worker`: one worker in this process, or with several (`--workers`), a pool of child processes
    supervised until SIGTERM/SIGINT (handed on to every child) or until a child keeps dying (exit status 1); a
    child that dies is restarted and its leases given back at once."""
    import signal

    n = settings.resolved_workers()
    if n == 1:
        return await run_worker(settings)
    died = asyncio.Event()
    asked = asyncio.Event()
    store = open_store(settings)
    await store.open()
    pool = WorkerPool(settings, n, died.set, release=store.release_worker)
    pool.start()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, asked.set)
    waits = [asyncio.create_task(died.wait()), asyncio.create_task(asked.wait())]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in waits:
            t.cancel()
        pool.terminate()
        await asyncio.to_thread(pool.stop)
        await store.close()
    return 1 if died.is_set() and not asked.is_set() else 0


def _worker_process_main(settings: Settings, wake: Any, parent: int, name: str) -> None:
    """Entry point of the worker subprocess that `serve` starts."""
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(
                1, signal_module.SIGKILL
            )  # PR_SET_PDEATHSIG: die with the API
    if os.getppid() != parent:
        return  # the API process died before we could ask to die with it
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        import uvloop

        code = uvloop.run(run_worker(settings, wake.fileno(), name))
    except ImportError:  # pragma: no cover
        code = asyncio.run(run_worker(settings, wake.fileno(), name))
    sys.exit(code)


class RestartBudget:
    """How often a crashed worker process is started again: at most `allowed` restarts within `window` seconds.
    Past that it keeps crashing (a broken configuration, a fault it meets every time) and the parent gives up."""

    def __init__(
        self, allowed: int = 5, window: float = 60.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.allowed = allowed
        self.window = window
        self._clock = clock
        self._times: deque[float] = deque()

    def spend(self) -> bool:
        now = self._clock()
        while self._times and now - self._times[0] > self.window:
            self._times.popleft()
        if len(self._times) >= self.allowed:
            return False
        self._times.append(now)
        return True

    @property
    def recent(self) -> int:
        return len(self._times)


class WorkerProcess:
    """The worker of `batchyard serve` in a child process: it shares no interpreter lock with the API, so a busy
    batch neither slows the API down nor is slowed down by it. It dies with the API process (even on SIGKILL).

    If it dies (a crash, the OOM killer, kill -9), a new one is started after a short pause while the API keeps
    serving, and the dead one's leases are given back (`release`). A process that dies again and again
    (`RestartBudget`) is not restarted: `on_death` is called and the API exits non-zero."""

    def __init__(
        self,
        settings: Settings,
        on_death: Callable[[], None],
        release: Callable[[str], Awaitable[int]] | None = None,
    ) -> None:
        """`release(worker name)`: give back the leases a dead child held (e.g. `MetadataStore.release_worker`),
        so that its shards are taken over at once rather than when their leases expire."""
        self.settings = settings
        self.on_death = on_death
        self.release = release
        self.name = ""
        self._releasing: set[asyncio.Task[None]] = set()
        self.budget = RestartBudget()
        self._proc: multiprocessing.process.BaseProcess | None = None
        self._wake_conn: Any = None  # the write end of the child's wake pipe
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._restart: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._spawn()

    def _spawn(self) -> None:
        self._restart = None
        if self._stopping or self._loop is None:
            return
        self._close_wake()
        ctx = multiprocessing.get_context("spawn")
        r, w = ctx.Pipe(duplex=False)  # a Connection is handed to a spawned child; a bare fd is not
        self.name = worker_id()
        self._proc = ctx.Process(
            target=_worker_process_main,
            args=(self.settings, r, os.getpid(), self.name),
            name="batchyard-worker",
        )
        self._proc.start()
        r.close()
        os.set_blocking(w.fileno(), False)
        self._wake_conn = w
        self._loop.add_reader(self._proc.sentinel, self._exited)  # readable once the child has ended

    def _exited(self) -> None:
        if self._loop is not None and self._proc is not None:
            self._loop.remove_reader(self._proc.sentinel)
        if self._stopping or self._loop is None:
            return
        if self._proc is not None:
            self._proc.join(timeout=1.0)  # reap it: the sentinel is readable before exitcode is set
        code = self._proc.exitcode if self._proc else None
        if self.release is not None:
            task = self._loop.create_task(self._release_leases(self.name))
            self._releasing.add(task)
            task.add_done_callback(self._releasing.discard)
        if not self.budget.spend():
            log.error(
                "the worker process exited with %s, the %d time within %.0f s: not restarting it",
                code,
                self.budget.allowed + 1,
                self.budget.window,
            )
            self.on_death()
            return
        delay = 0.5 * self.budget.recent
        log.error(
            "the worker process exited with %s; starting a new one in %.1f s (its leases are given back)",
            code,
            delay,
        )
        self._restart = self._loop.call_later(delay, self._spawn)

    async def _release_leases(self, name: str) -> None:
        assert self.release is not None
        try:
            n = await self.release(name)
        except Exception:  # the leases then expire as for any dead worker
            log.exception("could not give back the leases of dead worker %s", name)
            return
        log.info("gave back %d shard lease(s) of dead worker %s", n, name)

    def wake(self) -> None:
        if self._wake_conn is not None:
            with contextlib.suppress(BlockingIOError, BrokenPipeError):
                os.write(self._wake_conn.fileno(), b"!")

    def terminate(self) -> None:
        """Ask the worker to stop (SIGTERM: it hands its leases back); `stop` waits for it."""
        self._stopping = True
        if self._restart is not None:
            self._restart.cancel()
            self._restart = None
        if self._proc is not None and self._proc.is_alive():
            self._proc.terminate()

    def stop(self, timeout: float = 60.0) -> None:
        self.terminate()
        if self._proc is not None and self._proc.is_alive():
            self._proc.join(timeout)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join(5)
        self._close_wake()

    def _close_wake(self) -> None:
        if self._wake_conn is not None:
            self._wake_conn.close()
            self._wake_conn = None


class WorkerPool:
    """The worker processes of `serve` (or of a multi-process `batchyard worker`): `n` children that claim shards
    from the same store, each with its share of the per-upstream limits (`Settings.share`). Python runs one line
    of bytecode at a time per process, and against a fast upstream the per-request HTTP work is CPU-bound, so a
    node with several cores runs several workers. A child that dies is started again (`WorkerProcess`); one that
    keeps dying calls `on_death` (the parent exits and its supervisor restarts it)."""

    def __init__(
        self,
        settings: Settings,
        n: int,
        on_death: Callable[[], None],
        release: Callable[[str], Awaitable[int]] | None = None,
    ) -> None:
        share = settings.share(n)
        self.workers = [WorkerProcess(share, on_death, release=release) for _ in range(n)]

    def start(self) -> None:
        for w in self.workers:
            w.start()

    def wake(self) -> None:
        for w in self.workers:  # each polls the store; the claim decides who gets the work
            w.wake()

    def terminate(self) -> None:
        """Ask every worker to stop, and restart none (call on the event loop's thread, before `stop`)."""
        for w in self.workers:
            w.terminate()

    def stop(self, timeout: float = 60.0) -> None:
        for w in self.workers:
            w.terminate()  # all at once: each hands its leases back in parallel
        for w in self.workers:
            w.stop(timeout)


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
    worker: Worker | None  # a worker in this process ("thread" mode)
    worker_mode: str  # "thread" or "process" (a child process started by `running`)
    worker_pool: WorkerPool | None = None

    @classmethod
    def create(
        cls, settings: Settings, worker_mode: str | None = None, worker_name: str | None = None
    ) -> Runtime:
        """`worker_mode`: "thread" (a worker in this process, on its own thread and loop), "process" (a child
        process), or None for settings.worker_mode. Nothing runs a worker when settings.run_worker is false."""
        store = open_store(settings)
        blobs = open_blobs(settings)
        router = build_router(settings)
        mode = worker_mode or settings.worker_mode
        worker = (
            Worker(store, blobs, router, settings, name=worker_name)
            if settings.run_worker and mode == "thread"
            else None
        )
        return cls(settings, store, blobs, router, worker, mode)

    def services(self) -> Services:
        return Services(self.store, self.blobs, self.router, self.settings, self._notify)

    def _notify(self) -> None:
        if self.worker is not None:
            self.worker.wake()
        elif self.worker_pool is not None:
            self.worker_pool.wake()

    @contextlib.asynccontextmanager
    async def running(self, on_worker_death: Callable[[], None] | None = None) -> AsyncIterator[None]:
        """Open the store and run the worker (if any) until the block exits: a child process in "process" mode,
        else a thread with its own event loop. Either way a busy batch does not delay the API's event loop."""
        await self.store.open()
        thread: WorkerThread | None = None
        if self.settings.run_worker and self.worker_mode == "process":
            self.worker_pool = WorkerPool(
                self.settings,
                self.settings.resolved_workers(),
                on_worker_death or (lambda: None),
                release=self.store.release_worker,
            )
            self.worker_pool.start()
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
            if self.worker_pool is not None:
                self.worker_pool.terminate()
                await asyncio.to_thread(self.worker_pool.stop)
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
