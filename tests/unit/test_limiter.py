"""Concurrency limiters: fixed bound, FIFO, cancellation safety, and the adaptive limit's reactions."""

from __future__ import annotations

import asyncio

import pytest

from batchyard.execution.limiter import AdaptiveLimiter, Limiter, Signal


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


async def test_adaptive_grows_while_in_use_and_shrinks_on_overload() -> None:
    lim = AdaptiveLimiter(initial=4, max_limit=64)
    for _ in range(200):  # every slot in use, all fine: about +1 per round of `limit` successes
        started = [await lim.acquire() for _ in range(lim.limit)]
        for s in started:
            lim.release(s, Signal.OK)
    grown = lim.limit
    assert grown > 20
    s = await lim.acquire()
    lim.release(s, Signal.OVERLOAD)
    assert int(grown * 0.9) - 1 <= lim.limit <= int(grown * 0.9) + 1 < grown
    # a burst of overloads within one round trip counts once
    before = lim.limit
    for _ in range(10):
        s = await lim.acquire()
        lim.release(s, Signal.OVERLOAD)
    assert lim.limit == before


async def test_adaptive_does_not_grow_when_idle() -> None:
    lim = AdaptiveLimiter(initial=16)
    for _ in range(500):  # one request at a time: the limit is not in use, so it must not creep up
        s = await lim.acquire()
        lim.release(s, Signal.OK)
    assert lim.limit == 16


def test_adaptive_yields_when_latency_rises() -> None:
    lim = AdaptiveLimiter(initial=32, tolerance=2.0)
    for _ in range(300):
        lim.observe(0.05, Signal.OK)
    before = lim.limit
    lim._last_decrease = 0.0
    for _ in range(40):
        lim.observe(0.5, Signal.OK)  # the upstream starts queueing (shared with interactive traffic)
    assert lim.limit < before


def test_errors_teach_nothing() -> None:
    lim = AdaptiveLimiter(initial=8)
    for _ in range(50):
        lim.observe(0.01, Signal.ERROR)
    assert lim.limit == 8
