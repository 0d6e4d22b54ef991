"""Concurrency limits per upstream: fixed, or adaptive (AIMD with a latency gradient).

The adaptive limit finds an upstream's capacity without tuning: it doubles per round trip at first (slow start), then
grows by about one request per round trip while requests succeed with the limit in use, and shrinks multiplicatively on overload: a 429/503, a timeout, or short-term
latency rising well above its long-term average (the upstream queues: someone else is using it, or we push too hard).
Shrinking happens at most once per round trip, so one burst of 429s counts as one signal.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from enum import Enum

from batchyard.upstreams.fairqueue import FairQueue

log = logging.getLogger("batchyard.limiter")

SHORT_S = 1.0  # horizon of the recent-latency average, seconds
LONG_S = 30.0  # horizon of the baseline-latency average, seconds
PROBE_EVERY_S = 10.0  # at least this long between latency probes (and at least 20 round trips)
CPU_WINDOW_S = 0.025  # how often this process's own CPU use is sampled
KEEP_HOLD_S = 0.25  # after the last online request, batch lines keep to what the engine runs this long
BUSY_TOLERANCE = 1.25  # latency over its baseline that shrinks the limit while this process is saturated
CPU_BUSY = 0.9  # share of the time this thread runs or waits to run, at or above which it is the bottleneck


def cpu_demand() -> float:
    """Seconds this thread has run on a CPU or waited in the run queue for one. When the sum grows as fast as
    the wall clock, the event loop never idles: it is this process, not the upstream, that limits throughput.
    The run-queue wait counts too: a process crowded out by other busy processes is just as saturated."""
    try:
        with open("/proc/thread-self/schedstat", "rb") as fh:
            ran, waited, _ = fh.read().split()
        return (int(ran) + int(waited)) / 1e9
    except (OSError, ValueError):  # not Linux: CPU time alone
        return time.thread_time()


class Signal(Enum):
    OK = "ok"  # a response the upstream produced normally (2xx, or a 4xx about the request itself)
    OVERLOAD = "overload"  # 429, 503, a timeout: the upstream wants less
    ERROR = "error"  # other failures (5xx, connection errors): no information about capacity
    PREEMPTED = "preempted"  # cut short to make room for an online request: no information either


class Preemptible:
    """A batch request in flight that an online request may cut short (`Limiter.preempt`)."""

    __slots__ = ("preempted", "task")

    def __init__(self, task: asyncio.Task[object]) -> None:
        self.task = task
        self.preempted = False

    def taken_back(self) -> bool:
        """Called where the request's task caught its CancelledError: True when the cancel was a preemption
        only (the request is then sent again), False when the task itself is being cancelled."""
        if not self.preempted:
            return False
        return self.task.uncancel() == 0


class Limiter:
    """Bounds requests in flight; cancellation-safe. Waiters are served FIFO, or in weighted fair order by key
    when `acquire` is given one (upstreams/fairqueue.py: the owners of batch lines share the slots by weight).

    A *reservation* (`reserve`, from the online requests in flight on the same upstream: upstreams/online.py) takes
    slots off the limit for batch lines; `preempt` cuts the youngest requests in flight beyond what is left."""

    def __init__(self, limit: float) -> None:
        self._limit = float(limit)
        self.in_flight = 0
        self.reserved = 0  # slots online requests hold (upstreams/online.py): batch lines get the rest
        self.room: int | None = None  # this process's share of the limit with other processes (None: all)
        self._keep: int | None = None  # while online requests are in flight: batch requests kept (`reserve`)
        self._keep_until = 0.0  # and after the last one ended, until then
        self._seen: int | None = None  # the upstream's capacity as estimated when they started
        self._handed = 0  # slots given to waiters that have not resumed yet
        self._waiters = FairQueue()
        # requests in flight that may be cut short, oldest first (a dict: O(1) removal in any order)
        self._running: dict[Preemptible, None] = {}

    @property
    def pending(self) -> int:
        """Requests holding or waiting for a slot."""
        return self.in_flight + self._handed + len(self._waiters)

    @property
    def limit(self) -> int:
        return max(1, int(self._limit))

    async def acquire(self, key: str | None = None, weight: float = 1.0) -> float:
        """Wait for a slot (behind the waiters of `key`, in turn with other keys by `weight`); returns a start
        time to pass back to `release`."""
        if self.in_flight + self._handed >= self._cap() or self._waiters:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(fut, key, weight)
            try:
                await fut
            except BaseException:
                if fut.done() and not fut.cancelled():
                    self._handed -= 1
                    self._wake()  # we were handed a slot we will not use: pass it on
                elif fut in self._waiters:
                    self._waiters.remove(fut)
                raise
            self._handed -= 1
        self.in_flight += 1
        return time.monotonic()

    def release(self, started: float, signal: Signal) -> None:
        self.in_flight -= 1
        self.observe(time.monotonic() - started, signal)
        self._wake()

    def observe(self, rtt: float, signal: Signal) -> None:
        """Fixed limits learn nothing."""

    def _cap(self) -> int:
        """Requests this process may have in flight now: the limit, less the online reservation, within its share."""
        cap = max(0, self.limit - self.reserved)
        keep = self._keep
        if keep is not None and not self.reserved and time.monotonic() >= self._keep_until:
            keep = self._keep = self._seen = None  # online traffic stopped a while ago: the whole limit again
        if keep is not None and keep < cap:
            cap = keep
        room = self.room
        return cap if room is None or room >= cap else room

    def share(self, room: int | None) -> None:
        """Other processes use the same upstream: this one may have `room` requests in flight (None: no cap).
        Requests in flight beyond it are not cut: they end, and their slots go to the other processes."""
        if room == self.room:
            return
        grew = room is None or (self.room is not None and room > self.room)
        self.room = room
        if grew:
            self._wake()

    def reserve(self, slots: int) -> None:
        """Online requests hold `slots` of this upstream now: batch lines get the rest of the limit, and the
        youngest of theirs in flight beyond it are cut short."""
        if slots == self.reserved:
            return
        grew, self.reserved = slots > self.reserved, slots
        # An engine that queues what it cannot run yet serves an online request after every batch request sent
        # before it: what is kept is what the engine runs at once (`capacity`), less the online requests.
        if not slots:
            # between one online request and the next, batch lines do not fill the engine's queue again (the
            # next one would wait behind it): they keep to what it runs for KEEP_HOLD_S more
            if self._seen is not None:
                self._keep, self._keep_until = self._seen, time.monotonic() + KEEP_HOLD_S
        else:
            if self._seen is None:  # estimated when online requests start, before any batch request is cut
                self._seen = self.capacity()
            self._keep = max(0, self._seen - slots)
        if grew:
            self.preempt(
                self.in_flight - self._cap()
            )  # a share is not preempted (`room` only holds new ones)
        else:
            self._wake()

    def capacity(self) -> int:
        """How many requests the upstream runs at once, as far as this limiter can tell: its limit."""
        return self.limit

    def track(self) -> Preemptible:
        """The current task's request is in flight and may be cut short; `untrack` it when it ends."""
        task = asyncio.current_task()
        assert task is not None
        handle = Preemptible(task)
        self._running[handle] = None
        return handle

    def untrack(self, handle: Preemptible) -> None:
        self._running.pop(handle, None)

    def preempt(self, n: int) -> int:
        """Cut the `n` youngest requests in flight short (their tasks are cancelled: see `Preemptible`); returns
        how many were."""
        cut = 0
        for handle in reversed(self._running):
            if cut >= n:
                break
            if not handle.preempted:
                handle.preempted = True
                handle.task.cancel()
                cut += 1
        return cut

    def _wake(self) -> None:
        free = self._cap() - self.in_flight - self._handed
        while free > 0 and self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                self._handed += 1
                free -= 1


class AdaptiveLimiter(Limiter):
    def __init__(
        self,
        *,
        initial: int = 16,
        min_limit: int = 1,
        max_limit: int = 1024,
        backoff: float = 0.9,
        tolerance: float = 2.0,
        min_queueing: float = 0.005,
        clock: Callable[[], float] = time.monotonic,
        cpu_clock: Callable[[], float] = cpu_demand,
    ) -> None:
        super().__init__(initial)
        self.min_limit = min_limit
        self.max_limit = max_limit
        self.backoff = backoff
        self.tolerance = tolerance
        self.min_queueing = min_queueing  # seconds: below this, a rise in latency is jitter, not a queue
        self._clock = clock
        self._short: float | None = None  # round trips averaged over ~1 s
        self._long: float | None = None  # baseline: the recent average's low point, rising over ~30 s
        self._last_sample = 0.0
        self._last_decrease = 0.0
        self._slow_start = True  # double per round trip until the first overload, like TCP
        # Delivery-rate rounds (as BBR's startup): a round ends after `limit` completions; slow start also ends
        # when three rounds in a row failed to raise the rate by a tenth (more concurrency no longer helps:
        # the upstream, or this process, is saturated), going back to the limit that reached the best rate.
        self._round_start = 0.0
        self._round_done = 0
        self._best_rate = 0.0
        self._best_limit = float(initial)
        self._flat_rounds = 0
        # Probing the unloaded latency (as BBR's ProbeRTT): the baseline would otherwise rise with a queue we
        # cause ourselves and let the limit creep past the knee. Now and then the limit dips to a quarter until
        # requests sent during the dip come back; their latency resets the baseline.
        self._next_probe = 0.0
        self._probe_start: float | None = None
        self._probe_saved = 0.0
        self._probe_samples: list[float] = []
        # This process's own CPU: when it is saturated, requests wait for the event loop, not for the upstream,
        # and more concurrency only lengthens that queue (against a fast upstream the client is the bottleneck).
        # The limit then holds instead of growing.
        self._cpu_clock = cpu_clock
        self._cpu_stamp = clock()
        self._cpu_last = cpu_clock()
        self._cpu_busy = False

    def capacity(self) -> int:
        """How many requests the upstream runs at once without queueing: the limit while the recent latency is near
        its baseline; once it is well above, the requests in flight scaled by baseline/recent (Little's law: at the
        same rate, requests that did not wait would take the baseline)."""
        short, long = self._short, self._long
        if short is None or long is None or short <= 1.2 * long or not self.in_flight:
            return self.limit
        return max(1, min(self.limit, int(self.in_flight * long / short)))

    def hold_at_most(self, slots: int) -> None:
        """The engine runs at most `slots` requests at once (it said so): more in flight only queue inside it,
        which adds latency (to everyone's, online users' too) and no throughput. The limit stays at or below."""
        self.max_limit = max(self.min_limit, min(self.max_limit, slots))
        self._limit = min(self._limit, float(self.max_limit))
        self._wake()

    def observe(self, rtt: float, signal: Signal) -> None:
        now = self._clock()
        if signal is Signal.OVERLOAD:
            self._decrease(now)
            return
        if signal is Signal.ERROR or signal is Signal.PREEMPTED:
            return
        # Time-based averages (not per sample): at thousands of responses a second a per-sample average would
        # forget within milliseconds and follow a rising queue instead of revealing it.
        dt = now - self._last_sample if self._last_sample else 0.0
        self._last_sample = now
        if self._short is None or self._long is None:
            self._short = self._long = rtt
        else:
            self._short += min(1.0, dt / SHORT_S) * (rtt - self._short)
            # the baseline follows the recent average down at once and up slowly: a start-up burst (connections
            # being opened, everything queued at once) does not leave it too high to ever reveal a queue
            if self._short < self._long:
                self._long = self._short
            else:
                self._long += min(1.0, dt / LONG_S) * (rtt - self._long)
        if self._probe(now, rtt):
            return
        self._count_round(now)
        busy = self._cpu_saturated(now)
        # A saturated process queues requests on its own event loop: any queue there is waste, so a smaller rise
        # in latency is enough to shrink (the limit settles where this process just stays busy).
        tolerance, min_queueing = (BUSY_TOLERANCE, 0.001) if busy else (self.tolerance, self.min_queueing)
        if self._short > tolerance * self._long and self._short - self._long > min_queueing:
            # the recent average needs about half its horizon to show the effect of a decrease
            self._decrease(now, spacing=max(self._short, SHORT_S / 2))
        elif self.in_flight + 1 >= self._cap() * 0.8 and not busy:
            # while the limit is actually in use (this process's share of it, when it shares it with others; and
            # this process has CPU to spare): slow start doubles it per
            # round trip, then additive increase adds about one request per round trip
            step = 1.0 if self._slow_start else 1.0 / max(self._limit, 1.0)
            self._limit = min(float(self.max_limit), self._limit + step)

    def _cpu_saturated(self, now: float) -> bool:
        if now - self._cpu_stamp >= CPU_WINDOW_S:
            cpu = self._cpu_clock()
            self._cpu_busy = (cpu - self._cpu_last) >= CPU_BUSY * (now - self._cpu_stamp)
            self._cpu_stamp, self._cpu_last = now, cpu
        return self._cpu_busy

    def _probe(self, now: float, rtt: float) -> bool:
        """Run the latency probe; True while it is under way (the limit is then not adjusted otherwise)."""
        assert self._short is not None and self._long is not None
        if self._probe_start is None:
            if self._slow_start:
                return False
            if not self._next_probe:  # slow start just ended, its queue inflated the baseline: probe soon
                self._next_probe = now + max(1.0, 5 * self._short)
                return False
            if now < self._next_probe or self._limit < 4 * self.min_limit:
                return False
            self._probe_start, self._probe_saved, self._probe_samples = now, self._limit, []
            self._limit = max(float(self.min_limit), self._limit / 4)
            return True
        if now - rtt >= self._probe_start:  # sent during the dip: an unloaded round trip
            self._probe_samples.append(rtt)
        waited = now - self._probe_start
        if len(self._probe_samples) < max(4, self.limit) and waited < 4 * self._probe_saved_rtt():
            return True
        if self._probe_samples:
            unloaded = sorted(self._probe_samples)[len(self._probe_samples) // 2]
            log.debug("latency probe: unloaded %.4fs (baseline was %.4fs)", unloaded, self._long)
            self._long = min(self._long, unloaded) if self._long > unloaded else unloaded
        self._limit = self._probe_saved
        self._probe_start = None
        self._next_probe = now + max(PROBE_EVERY_S, 20 * self._short)
        return False

    def _probe_saved_rtt(self) -> float:
        return max(self._short or 0.05, 0.05)

    def _count_round(self, now: float) -> None:
        if not self._round_start:
            self._round_start = now
        self._round_done += 1
        elapsed = now - self._round_start
        if not self._slow_start or self._round_done < self.limit or elapsed <= 0:
            return
        rate = self._round_done / elapsed
        self._round_start, self._round_done = now, 0
        if rate > self._best_rate * 1.1:
            self._flat_rounds = 0
        else:
            self._flat_rounds += 1
        if rate > self._best_rate:
            self._best_rate, self._best_limit = rate, self._limit
        if self._slow_start and self._flat_rounds >= 3:
            self._slow_start = False
            log.debug(
                "slow start ends at %.1f: the rate stopped growing (best %.0f/s at limit %.1f)",
                self._limit,
                self._best_rate,
                self._best_limit,
            )
            self._limit = max(float(self.min_limit), self._best_limit)

    def _decrease(self, now: float, spacing: float | None = None) -> None:
        rtt = self._short or 0.05
        if now - self._last_decrease < (rtt if spacing is None else spacing):
            return
        self._last_decrease = now
        log.debug(
            "concurrency limit %.1f -> decrease (short %.4fs, long %s)",
            self._limit,
            rtt,
            None if self._long is None else round(self._long, 4),
        )
        if self._slow_start:
            self._slow_start = False
            self._limit = max(float(self.min_limit), self._limit / 2.0)  # it overshot by up to 2x
        self._limit = max(float(self.min_limit), self._limit * self.backoff)
