"""Running workers beside the process that needs them: child processes restarted when they die (with their leases
given back at once), and the in-process worker thread of `serve --worker-in-process`.

What a worker runs is not decided here: the composition root (runtime.py) hands in the coroutine (`WorkerEntry`
for a child process, a coroutine function for the thread)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import multiprocessing.process
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Any

from batchyard import eventloop, logs, metrics
from batchyard.config import Settings
from batchyard.ids import worker_id

log = logging.getLogger("batchyard")

# run one worker until SIGTERM: (its settings, the read end of its wake pipe, its name) -> exit status
WorkerEntry = Callable[[Settings, int | None, str | None], Coroutine[Any, Any, int]]
Release = Callable[[str], Awaitable[int]]  # give back the leases a dead worker held; returns how many


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


def _child_main(entry: WorkerEntry, settings: Settings, wake: Any, parent: int, name: str) -> None:
    """Entry point of a worker child process (spawned: `entry` travels by reference)."""
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(
                1, signal.SIGKILL
            )  # PR_SET_PDEATHSIG: die with the parent
    if os.getppid() != parent:
        return  # the parent died before we could ask to die with it
    # Started with SIGINT ignored (`_spawn`): a Ctrl-C while this process starts is not a KeyboardInterrupt in
    # the middle of an import (the parent stops it with SIGTERM). It stays ignored until the worker sets its
    # own handler, which stops it cleanly.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logs.setup(settings.log_level, settings.log_format)
    sys.exit(eventloop.run(entry(settings, wake.fileno(), name)))


@contextlib.contextmanager
def _child_ignores_sigint() -> Iterator[None]:
    """Start a child with SIGINT ignored (an ignored signal stays ignored across exec, and Python then installs
    no KeyboardInterrupt handler), so a Ctrl-C during its imports prints no traceback. Meanwhile SIGINT is
    blocked here: one that comes waits (Linux keeps a blocked signal pending even while it is ignored) and
    reaches this process's own handler once it is back."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    handler = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, handler if handler is not None else signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


class WorkerProcess:
    """A worker in a child process: it shares no interpreter lock with the API, so a busy batch neither slows the
    API down nor is slowed down by it. It dies with its parent (even on SIGKILL).

    If it dies (a crash, the OOM killer, kill -9), a new one is started after a short pause while the parent goes
    on, and the dead one's leases are given back (`release`). A process that dies again and again
    (`RestartBudget`) is not restarted: `on_death` is called and the parent exits non-zero."""

    def __init__(
        self,
        settings: Settings,
        entry: WorkerEntry,
        on_death: Callable[[], None],
        release: Release | None = None,
    ) -> None:
        """`release(worker name)`: give back the leases a dead child held (e.g. `MetadataStore.release_worker`),
        so that its shards are taken over at once rather than when their leases expire."""
        self.settings = settings
        self.entry = entry
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
            target=_child_main,
            args=(self.entry, self.settings, r, os.getpid(), self.name),
            name="batchyard-worker",
        )
        with _child_ignores_sigint():
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
        metrics.process_ended(self._proc.pid if self._proc else None)  # its gauges no longer count
        if self.release is not None:
            task = self._loop.create_task(self._release_leases(self.release, self.name))
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

    @staticmethod
    async def _release_leases(release: Release, name: str) -> None:
        try:
            n = await release(name)
        except Exception:  # the leases then expire as for any dead worker
            log.exception("could not give back the leases of dead worker %s", name)
            return
        log.info("gave back %d shard lease(s) of dead worker %s", n, name)

    def wake(self) -> None:
        if self._wake_conn is not None:
            with contextlib.suppress(BlockingIOError, BrokenPipeError):
                os.write(self._wake_conn.fileno(), b"!")

    def stopping(self) -> None:
        """This process is shutting down: the worker's exit from now on is expected (a Ctrl-C reaches it too) and
        it is not restarted. Only sets a flag, so a signal handler may call it."""
        self._stopping = True

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
    """`n` worker processes that claim shards from the same store, each with its share of the per-upstream limits
    (`Settings.share`; the concurrency limits shared on this machine's board, upstreams/online.py). Python runs one line of bytecode at a time per process, and against a fast upstream the
    per-request HTTP work is CPU-bound, so a node with several cores runs several workers. A child that dies is
    started again (`WorkerProcess`); one that keeps dying calls `on_death` (the parent exits and its supervisor
    restarts it)."""

    def __init__(
        self,
        settings: Settings,
        n: int,
        entry: WorkerEntry,
        on_death: Callable[[], None],
        release: Release | None = None,
    ) -> None:
        share = settings.share(n)
        self.workers = [WorkerProcess(share, entry, on_death, release=release) for _ in range(n)]

    def start(self) -> None:
        for w in self.workers:
            w.start()

    def wake(self) -> None:
        for w in self.workers:  # each polls the store; the claim decides who gets the work
            w.wake()

    def stopping(self) -> None:
        """Shutting down: expect every worker to exit, restart none (safe in a signal handler)."""
        for w in self.workers:
            w.stopping()

    def terminate(self) -> None:
        """Ask every worker to stop, and restart none (call on the event loop's thread, before `stop`)."""
        for w in self.workers:
            w.terminate()

    def stop(self, timeout: float = 60.0) -> None:
        for w in self.workers:
            w.terminate()  # all at once: each hands its leases back in parallel
        for w in self.workers:
            w.stop(timeout)

    async def aclose(self) -> None:
        """Stop every worker and wait for them (off the event loop: each may take a while to hand back)."""
        self.terminate()
        await asyncio.to_thread(self.stop)


class WorkerThread:
    """A worker on a dedicated thread of this process with its own event loop (`serve --worker-in-process`):
    `main` builds and runs it there. `on_death` is called (from that thread) if it fails."""

    def __init__(self, main: Callable[[], Coroutine[Any, Any, None]], on_death: Callable[[], None]) -> None:
        self.main = main
        self.on_death = on_death
        self._thread = threading.Thread(target=self._run, name="batchyard-worker", daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._ready = threading.Event()

    def start(self) -> None:
        self._thread.start()
        self._ready.wait(30)

    def _run(self) -> None:
        eventloop.run(self._supervised())

    async def _supervised(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        self._ready.set()
        try:
            await self.main()
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("worker stopped")
            self.on_death()

    def stop(self, timeout: float = 60.0) -> None:
        loop, task = self._loop, self._task
        if loop is not None and task is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(task.cancel)
        self._thread.join(timeout)
