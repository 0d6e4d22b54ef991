"""Weighted fair share inside one worker: the limiter's waiter queue by owner (upstreams/fairqueue.py) and the lanes
of the shards running in one process (domain/fairshare.py `lane_shares`). Deterministic: no timing."""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter

import pytest

from batchyard.domain.fairshare import lane_shares, weight_problem
from batchyard.upstreams.fairqueue import FairQueue
from batchyard.upstreams.limiter import Limiter, Signal


def futures(n: int) -> list[asyncio.Future[None]]:
    loop = asyncio.get_running_loop()
    return [loop.create_future() for _ in range(n)]


async def test_keys_of_weights_1_and_3_are_served_1_to_3() -> None:
    q = FairQueue()
    owner: dict[asyncio.Future[None], str] = {}
    for key, weight, n in (("a", 1.0, 40), ("b", 3.0, 40)):
        for f in futures(n):
            q.append(f, key, weight)
            owner[f] = key
    served = [owner[q.popleft()] for _ in range(40)]
    assert served[:8] == ["a", "b", "b", "b", "a", "b", "b", "b"]
    assert Counter(served) == {"a": 10, "b": 30}


async def test_many_waiters_of_one_key_do_not_crowd_out_another() -> None:
    q = FairQueue()
    owner: dict[asyncio.Future[None], str] = {}
    for f in futures(100):  # a's 100 lanes queued first
        q.append(f, "a")
        owner[f] = "a"
    for f in futures(3):
        q.append(f, "b")
        owner[f] = "b"
    served = [owner[q.popleft()] for _ in range(6)]
    assert served == ["a", "b", "a", "b", "a", "b"]


async def test_three_keys_share_by_weight_and_waiters_within_a_key_are_fifo() -> None:
    q = FairQueue()
    fs = {k: futures(60) for k in "xyz"}
    for k, w in (("x", 1.0), ("y", 2.0), ("z", 3.0)):
        for f in fs[k]:
            q.append(f, k, w)
    got = [q.popleft() for _ in range(60)]
    counts = Counter(next(k for k in "xyz" if f in fs[k]) for f in got)
    assert counts == {"x": 10, "y": 20, "z": 30}
    for k in "xyz":  # each key's waiters come out in the order they came
        mine = [f for f in got if f in fs[k]]
        assert mine == fs[k][: len(mine)]


async def test_an_idle_key_saves_no_credit() -> None:
    q = FairQueue()
    (first,) = futures(1)
    q.append(first, "b")
    assert q.popleft() is first  # b served once, then idle
    a = futures(10)
    for f in a:
        q.append(f, "a")
    for _ in range(6):
        q.popleft()  # a alone: the virtual time moves on
    b = futures(5)
    for f in b:
        q.append(f, "b")
    served = ["b" if f in b else "a" for f in (q.popleft() for _ in range(6))]
    assert served in (["b", "a", "b", "a", "b", "a"], ["a", "b", "a", "b", "a", "b"])  # turns, no burst of b


async def test_removing_a_waiter_and_without_keys_it_is_a_fifo() -> None:
    q = FairQueue()
    fs = futures(5)
    for f in fs:
        q.append(f)
    assert len(q) == 5 and fs[2] in q
    q.remove(fs[2])
    assert fs[2] not in q and len(q) == 4
    assert [q.popleft() for _ in range(4)] == [fs[0], fs[1], fs[3], fs[4]]
    with pytest.raises(IndexError):
        q.popleft()
    with pytest.raises(ValueError):
        q.remove(fs[0])


async def test_the_limiter_hands_slots_to_owners_by_weight() -> None:
    lim = Limiter(1)
    held = await lim.acquire()
    order: list[str] = []

    async def lane(key: str, weight: float) -> None:
        started = await lim.acquire(key, weight)
        order.append(key)
        await asyncio.sleep(0)
        lim.release(started, Signal.OK)

    tasks = [asyncio.create_task(lane("a", 1.0)) for _ in range(20)]
    await asyncio.sleep(0)
    tasks += [asyncio.create_task(lane("b", 3.0)) for _ in range(20)]
    await asyncio.sleep(0)
    lim.release(held, Signal.OK)
    await asyncio.gather(*tasks)
    assert Counter(order[:16]) == {"a": 4, "b": 12}  # 1:3 while both wait
    assert lim.in_flight == 0 and lim.pending == 0


async def test_a_cancelled_keyed_waiter_passes_its_slot_on() -> None:
    lim = Limiter(1)
    held = await lim.acquire()
    doomed = asyncio.ensure_future(lim.acquire("a"))
    other = asyncio.ensure_future(lim.acquire("b", 2.0))
    await asyncio.sleep(0)
    doomed.cancel()
    lim.release(held, Signal.OK)
    with pytest.raises(asyncio.CancelledError):
        await doomed
    got = await asyncio.wait_for(other, 1)
    assert lim.in_flight == 1
    lim.release(got, Signal.OK)
    assert lim.pending == 0


def test_lanes_go_to_owners_by_weight_and_add_up_to_the_limit() -> None:
    four_of_a_one_of_b = [("a", 1.0)] * 4 + [("b", 1.0)]
    assert lane_shares(16, four_of_a_one_of_b) == [2, 2, 2, 2, 8]  # 8:8, not 4 shards to 1
    assert lane_shares(16, [("a", 1.0), ("a", 1.0), ("b", 3.0)]) == [2, 2, 12]
    assert lane_shares(17, [("a", 1.0), ("b", 1.0), ("a", 1.0)]) == [5, 8, 4]  # the remainder: first-started
    assert lane_shares(8, []) == []
    for total, n in itertools.product(range(1, 40), range(1, 9)):
        shards = [(f"o{i % 3}", 1.0 + i % 4) for i in range(n)]
        got = lane_shares(total, shards)
        assert min(got) >= 1 and sum(got) >= total
        if total >= 3 * n * 4:  # every owner's share covers its shards: exactly the limit
            assert sum(got) == total


def test_an_owner_with_more_shards_than_its_share_gets_one_lane_each() -> None:
    # 8 slots, 7 of a's shards and 1 of b's: b still gets its half (4 lanes); a's 7 lanes and b's 4 share the 8
    # slots through the limiter's fair queue
    assert lane_shares(8, [("a", 1.0)] * 7 + [("b", 1.0)]) == [1] * 7 + [4]
    assert lane_shares(3, [("a", 1.0)] * 5) == [1] * 5  # fewer slots than shards: one lane each
    assert lane_shares(4, [("a", 100.0), ("b", 1.0), ("b", 1.0), ("b", 1.0)]) == [4, 1, 1, 1]


def test_weights_are_bounded() -> None:
    assert weight_problem(1.0) is None and weight_problem(0.01) is None and weight_problem(1000) is None
    for bad in (0.0, -1.0, 1000.5, float("nan"), float("inf")):
        assert weight_problem(bad) is not None
