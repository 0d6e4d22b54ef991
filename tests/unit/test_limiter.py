"""Concurrency limiters: fixed bound, FIFO, cancellation safety, and the adaptive limit's reactions."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from batchyard.upstreams.limiter import AdaptiveLimiter, Limiter, Signal


async def test_fixed_limit_bounds_in_flight_and_is_fifo() -> None:
    lim = Limiter(2)
    order: list[int] = []
    peak = 0

    async def job(i: int) -> None:
        nonlocal peak
        started = await lim.acquire()
        order.append(i)
        peak = max(peak, lim.in_flight)
        await asyncio.sleep(0.01)
        lim.release(started, Signal.OK)

    await asyncio.gather(*(job(i) for i in range(8)))
    assert peak == 2
    assert order == list(range(8))
    assert lim.in_flight == 0


async def test_cancelled_waiter_does_not_leak_a_slot() -> None:
    lim = Limiter(1)
    held = await lim.acquire()
    waiter = asyncio.ensure_future(lim.acquire())
    await asyncio.sleep(0)
    waiter.cancel()
    lim.release(held, Signal.OK)  # hands the slot to the cancelled waiter, which must pass it on
    with pytest.raises(asyncio.CancelledError):
        await waiter
    got = await asyncio.wait_for(lim.acquire(), 1)
    assert lim.in_flight == 1
    lim.release(got, Signal.OK)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _busy_round(lim: AdaptiveLimiter, clock: Clock, rtt: float = 0.05) -> None:
    """One round trip with every slot in use: `limit` successes observed at full occupancy within `rtt`."""
    n = lim.limit
    for _ in range(n):
        clock.t += rtt / n
        lim.in_flight = lim.limit - 1
        lim.observe(rtt, Signal.OK)
    lim.in_flight = 0


def test_adaptive_slow_start_then_overload_then_additive_increase() -> None:
    clock = Clock()
    lim = AdaptiveLimiter(initial=4, max_limit=64, clock=clock)
    _busy_round(lim, clock)
    assert lim.limit == 8  # slow start doubles per round trip
    _busy_round(lim, clock)
    _busy_round(lim, clock)
    assert lim.limit == 32
    clock.t += 1.0
    lim.observe(0.05, Signal.OVERLOAD)
    # the first overload ends slow start: back to half (the overshoot), then the multiplicative decrease
    assert lim.limit == int(32 / 2 * 0.9)
    before = lim._limit
    for _ in range(10):  # a burst of overloads within one round trip counts once
        lim.observe(0.05, Signal.OVERLOAD)
    assert lim._limit == before
    for _ in range(5):  # then about +1 per round trip
        _busy_round(lim, clock)
    assert before + 4 <= lim._limit <= before + 6
    clock.t += 1.0
    grown = lim._limit
    lim.observe(0.05, Signal.OVERLOAD)
    assert abs(lim._limit - grown * 0.9) < 1e-9
    for _ in range(100):
        _busy_round(lim, clock)
    assert lim.limit == 64  # capped


def test_small_latency_jitter_is_not_queueing() -> None:
    clock = Clock()
    lim = AdaptiveLimiter(initial=32, clock=clock)
    for _ in range(300):
        clock.t += 0.1
        lim.observe(0.001, Signal.OK)
    for _ in range(40):
        clock.t += 0.1
        lim.observe(0.003, Signal.OK)  # 3x, but only 2 ms: scheduling noise on a fast upstream
    assert lim.limit == 32


async def test_adaptive_does_not_grow_when_idle() -> None:
    lim = AdaptiveLimiter(initial=16)
    for _ in range(500):  # one request at a time: the limit is not in use, so it must not creep up
        s = await lim.acquire()
        lim.release(s, Signal.OK)
    assert lim.limit == 16


def test_adaptive_yields_when_latency_rises() -> None:
    clock = Clock()
    lim = AdaptiveLimiter(initial=32, tolerance=2.0, clock=clock)
    for _ in range(600):  # a minute of 50 ms round trips, 10 a second
        clock.t += 0.1
        lim.observe(0.05, Signal.OK)
    before = lim.limit
    for _ in range(20):  # two seconds later the upstream queues (shared with interactive traffic)
        clock.t += 0.1
        lim.observe(0.5, Signal.OK)
    assert lim.limit < before


def test_averages_are_time_based_not_per_sample() -> None:
    clock = Clock()
    lim = AdaptiveLimiter(initial=32, clock=clock)
    for _ in range(300):
        clock.t += 0.1
        lim.observe(0.01, Signal.OK)
    before = lim.limit
    for _ in range(5000):  # a burst of fast samples within 50 ms must not move the averages much
        clock.t += 0.00001
        lim.observe(0.02, Signal.OK)
    assert lim.limit == before
    assert lim._long is not None and lim._long < 0.0101


def test_errors_teach_nothing() -> None:
    lim = AdaptiveLimiter(initial=8)
    for _ in range(50):
        lim.observe(0.01, Signal.ERROR)
    assert lim.limit == 8


def test_slow_start_ends_when_the_rate_stops_growing() -> None:
    clock = Clock()
    lim = AdaptiveLimiter(initial=8, max_limit=4096, clock=clock)
    # the upstream (or this process) saturates at 400 completions a second: beyond 20 in flight, round trips
    # only get longer
    for _ in range(12):
        n = lim.limit
        _busy_round(lim, clock, rtt=max(0.05, n / 400))
    assert not lim._slow_start
    assert lim.limit < 100  # back near the knee instead of doubling on to 4096


def _simulate(
    lim: AdaptiveLimiter, clock: Clock, model: Callable[[int], tuple[float, float]], seconds: float
) -> None:
    end = clock.t + seconds
    while clock.t < end:
        n = lim.limit
        rate, rtt = model(n)
        clock.t += 1 / rate
        lim.in_flight = n - 1
        lim.observe(rtt, Signal.OK)


def test_latency_probe_stops_the_limit_creeping_past_the_knee() -> None:
    """A saturated process: 6,000 completions a second whatever the concurrency, 2 ms unloaded. Without probing,
    the baseline latency rises with our own queue and the limit creeps up; with it, the limit comes back down."""
    clock = Clock()
    lim = AdaptiveLimiter(initial=64, max_limit=512, clock=clock)
    _simulate(lim, clock, lambda n: (6000.0, max(0.002, n / 6000)), 60)
    assert lim.limit < 100  # the knee is ~12; 2x latency tolerance + 5 ms allows ~40-70


def test_latency_bound_upstream_is_not_held_back() -> None:
    clock = Clock()
    lim = AdaptiveLimiter(initial=16, max_limit=512, clock=clock)
    _simulate(lim, clock, lambda n: (n / 0.2, 0.2), 20)  # capacity grows with concurrency: keep growing
    assert lim.limit == 512


def test_a_saturated_process_holds_its_limit_and_sheds_its_own_queue() -> None:
    """When this process's event loop never idles (its CPU demand keeps pace with the wall clock), more
    concurrency cannot help: the limit stops growing, and a smaller latency rise (1.25x, not 2x) shrinks it."""
    clock = Clock()
    busy = {"on": True}
    cpu = {"t": 0.0}
    last = {"t": 0.0}

    def cpu_clock() -> float:
        if busy["on"]:
            cpu["t"] += clock.t - last["t"]
        last["t"] = clock.t
        return cpu["t"]

    lim = AdaptiveLimiter(initial=16, max_limit=512, clock=clock, cpu_clock=cpu_clock)
    for _ in range(60):  # 3 s: slow start ends, and the first latency probe confirms the 50 ms baseline
        _busy_round(lim, clock, rtt=0.05)
    # slow start would have reached 512; it grows only until the first CPU reading (25 ms = 8 responses here)
    assert lim.limit <= 16 + 9
    for _ in range(40):  # the round trip rises 1.6x for 3.2 s: a queue on our own loop
        _busy_round(lim, clock, rtt=0.08)
    assert lim.limit < 16
    shrunk = lim.limit
    busy["on"] = False  # CPU to spare again: the limit grows
    for _ in range(40):
        _busy_round(lim, clock, rtt=0.08)
    assert lim.limit > shrunk + 5
