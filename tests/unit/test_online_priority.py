"""Batch lines yield to online requests: the limiter's reservation and preemption, the shared-memory board (across
real processes), and a dispatcher whose youngest batch request is cut short by an online one and sent again."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import pytest

from batchyard.execution.dispatcher import Dispatcher, StopSignal
from batchyard.store.base import UpstreamLoad
from batchyard.upstreams.http import HTTPUpstream
from batchyard.upstreams.limiter import Limiter, Signal
from batchyard.upstreams.online import (
    CELLS,
    Board,
    BoardWatcher,
    MachineShares,
    OnlineGate,
    cell,
    fair_level,
)
from batchyard.upstreams.pool import Member
from batchyard.upstreams.router import Router
from tests.support.fake_upstream import FakeUpstream


async def test_reservation_takes_slots_off_the_limit() -> None:
    lim = Limiter(3)
    lim.reserve(2)
    started = await lim.acquire()  # one slot left for batch lines
    waiter = asyncio.create_task(lim.acquire())
    await asyncio.sleep(0.01)
    assert not waiter.done()
    lim.reserve(1)  # an online request ended: its slot goes to the waiting line
    await asyncio.wait_for(waiter, 1)
    lim.release(started, Signal.OK)
    lim.release(waiter.result(), Signal.OK)
    assert lim.in_flight == 0


async def test_preempt_cuts_the_youngest_and_only_a_preemption_is_taken_back() -> None:
    lim = Limiter(3)
    outcomes: dict[int, str] = {}

    async def request(i: int) -> None:
        started = await lim.acquire()
        handle = lim.track()
        try:
            await asyncio.sleep(10)
            outcomes[i] = "done"
        except asyncio.CancelledError:
            if not handle.taken_back():
                outcomes[i] = "cancelled"
                raise
            outcomes[i] = "preempted"
        finally:
            lim.untrack(handle)
            lim.release(started, Signal.PREEMPTED)

    tasks = [asyncio.create_task(request(i)) for i in range(3)]
    await asyncio.sleep(0.01)
    lim.reserve(2)  # two online requests: the two youngest batch requests go
    await asyncio.sleep(0.01)
    assert outcomes == {1: "preempted", 2: "preempted"}
    tasks[0].cancel()  # a real cancel is not swallowed
    with pytest.raises(asyncio.CancelledError):
        await tasks[0]
    assert outcomes[0] == "cancelled"
    assert lim.in_flight == 0


async def test_preemption_and_a_real_cancel_together_still_cancel() -> None:
    lim = Limiter(1)
    seen: list[bool] = []

    async def request() -> None:
        started = await lim.acquire()
        handle = lim.track()
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            seen.append(handle.taken_back())
            raise
        finally:
            lim.untrack(handle)
            lim.release(started, Signal.PREEMPTED)

    task = asyncio.create_task(request())
    await asyncio.sleep(0.01)
    lim.reserve(1)
    task.cancel()  # the shard stops at the same moment
    with pytest.raises(asyncio.CancelledError):
        await task
    assert seen == [False]


def test_board_counts_across_processes_and_forgets_the_dead(tmp_path: Path) -> None:
    path = tmp_path / "board"
    board = Board(path)
    code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from batchyard.upstreams.online import Board\n"
        "b = Board(Path(sys.argv[1]))\n"
        "b.add('up-a', 1); b.add('up-a', 1); b.add('up-b', 1)\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        counts = board.counts()
        assert len(counts) == CELLS
        if cell("up-a") != cell("up-b"):
            assert counts[cell("up-a")] == 2 and counts[cell("up-b")] == 1
        board.add("up-a", 1)  # this process's own entry adds to it
        assert board.counts()[cell("up-a")] == 3
        gen = board.generation()
        board.add("up-a", -1)
        assert board.generation() != gen
    finally:
        child.kill()
        child.wait()
    assert board.counts()[cell("up-a")] == 2  # not checked yet: still counted
    assert board.counts(check_alive=True)[cell("up-a")] == 0  # its process is gone: cleared
    board.close()


def _rows(online: int, name: str = "up") -> list[tuple[bool, list[int]]]:
    row = [1] + [0] * (3 * CELLS)
    row[1 + cell(name)] = online
    return [(False, row)]


def test_watcher_modes(tmp_path: Path) -> None:
    board = Board(tmp_path / "board")
    lim = Limiter(4)
    member = Member(_NoUpstream("up"), lim)
    BoardWatcher(board, [member], "slots").apply(_rows(1), 100.0)
    assert lim.reserved == 1
    pause = BoardWatcher(board, [member], "pause", hold_s=0.1)
    pause.apply(_rows(1), 100.0)
    assert lim.reserved >= lim.limit
    pause.apply(_rows(0), 100.05)  # within the hold after the last online request
    assert lim.reserved >= lim.limit
    pause.apply(_rows(0), 100.2)
    assert lim.reserved == 0
    board.close()


def test_fair_level() -> None:
    assert fair_level([20, 20], 32) == 16
    assert fair_level([10, 10], 32) == float("inf")  # both met in full
    assert fair_level([2, 100], 32) == 30  # the small demand is met, the rest goes to the big one
    assert fair_level([1, 2], 32) == float("inf")
    assert fair_level([50, 50, 50], 30) == 10


async def test_two_processes_share_one_limit_fairly(tmp_path: Path) -> None:
    """Two workers' limiters on one board (two entries: as two processes): each gets half of a limit of 8 while
    both have lines waiting, and one alone gets all of it; the other's requests in flight are never exceeded."""
    path = tmp_path / "board"
    boards = [Board(path), Board(path)]
    limiters = [Limiter(8), Limiter(8)]
    watchers = [
        BoardWatcher(b, [Member(_NoUpstream("up"), lim)], "slots")
        for b, lim in zip(boards, limiters, strict=True)
    ]

    def step() -> None:
        for w in watchers:
            w.publish()
        for w in watchers:
            w.apply(w.board.rows(), 0.0)

    held_a = [await limiters[0].acquire() for _ in range(8)]  # A alone: the whole limit
    step()
    assert limiters[0].room is None  # nobody else wants any
    assert (
        limiters[1].room == 0
    )  # A uses the whole limit: B's first line waits for the next look at the board
    waiting_b = [asyncio.create_task(limiters[1].acquire()) for _ in range(8)]
    waiting_a = [asyncio.create_task(limiters[0].acquire()) for _ in range(8)]
    await asyncio.sleep(0)
    step()
    assert limiters[0].room == 4 and limiters[1].room == 0  # B's fair 4 waits for A's requests to end
    for started in held_a[:4]:
        limiters[0].release(started, Signal.OK)
    step()
    await asyncio.sleep(0)
    assert limiters[1].in_flight == 4 and limiters[0].in_flight == 4
    assert limiters[1].room == 4
    for tasks in (waiting_a, waiting_b):
        for t in tasks:
            t.cancel()
    await asyncio.gather(*waiting_a, *waiting_b, return_exceptions=True)
    for b in boards:
        b.close()


class _NoUpstream(HTTPUpstream):
    def __init__(self, name: str) -> None:
        super().__init__("http://127.0.0.1:9/v1", name=name)


async def test_an_online_request_cuts_the_youngest_batch_request_which_is_sent_again(tmp_path: Path) -> None:
    """Two slots, two batch lines in flight on a slow upstream; an online request arrives on the board: the
    younger batch request is cut (its connection closed), the online one gets its slot, and the line is sent again
    and answered (no error, no retry counted)."""
    with FakeUpstream(delay=0.6) as fake:
        upstream = HTTPUpstream(fake.base_url, name="slow")
        member = Member(upstream, Limiter(2))
        router = Router([(None, member)])
        await router.start()
        board_path = tmp_path / "board"
        gate = OnlineGate(board_path)
        watcher_board = Board(board_path)
        watcher = asyncio.create_task(BoardWatcher(watcher_board, [member], "slots").run())
        dispatcher = Dispatcher(router, attempt_timeout=30, max_retries=0)
        try:
            body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
            first = asyncio.create_task(dispatcher.execute("/v1/chat/completions", "a", body, StopSignal()))
            await asyncio.sleep(0.05)
            second = asyncio.create_task(
                dispatcher.execute(
                    "/v1/chat/completions",
                    "b",
                    {**body, "messages": [{"role": "user", "content": "there"}]},
                    StopSignal(),
                )
            )
            await asyncio.sleep(0.1)
            assert member.limiter.in_flight == 2
            t0 = time.monotonic()
            async with gate.hold(member):
                for _ in range(100):
                    if member.limiter.in_flight < 2:
                        break
                    await asyncio.sleep(0.005)
                cut_after = time.monotonic() - t0
                assert member.limiter.in_flight == 1  # the younger one was cut: a slot is free
                assert cut_after < 0.2
            a, b = await asyncio.wait_for(asyncio.gather(first, second), 10)
            assert a.ok and b.ok
            stats = fake.stats()
            assert stats["total"] >= 3  # b was received twice (cut once, then answered)
        finally:
            watcher.cancel()
            with pytest.raises(asyncio.CancelledError):
                await watcher
            watcher_board.close()
            gate.close()
            await router.aclose()


async def test_two_machines_share_one_limit_through_the_store(tmp_path: Path) -> None:
    """Two machines (two boards), one store: each machine gets half of a limit of 8 while both want more, then the
    one left alone gets it all once the other's rows expire."""
    from batchyard.store.memory import MemoryStore

    clock = [1000.0]
    store = MemoryStore(clock=lambda: clock[0])
    await store.open()
    limiters = [Limiter(8), Limiter(8)]
    shares = []
    for i, lim in enumerate(limiters):
        board = Board(tmp_path / f"board-{i}")
        watcher = BoardWatcher(board, [Member(_NoUpstream("up"), lim)], "slots")

        async def exchange(loads: list[tuple[str, int, int]], i: int = i) -> list[UpstreamLoad] | None:
            return await store.exchange_load(f"w{i}", f"m{i}", loads, 3.0)

        shares.append(MachineShares(watcher, f"m{i}", exchange))

    async def step() -> None:
        for sh in shares:
            sh.watcher.publish()
            rows = await sh.exchange(
                [(m.name, m.limiter.pending, m.limiter.in_flight) for m in sh.watcher.members]
            )
            assert rows is not None
            sh.watcher.machine_caps = sh.caps(rows, sh.watcher.board.rows())
        for sh in shares:
            sh.watcher.apply(sh.watcher.board.rows(), 0.0)

    held = [await lim.acquire() for lim in limiters for _ in range(8)]  # before any word: both run it all
    waiting = [asyncio.create_task(lim.acquire()) for lim in limiters for _ in range(4)]
    await asyncio.sleep(0)
    await step()
    await step()  # the first machine to write saw nothing of the other's yet
    assert limiters[0].room == 0 and limiters[1].room == 0  # each sees the other using the whole limit
    for lim in limiters:  # their requests end
        for _ in range(8):
            lim.release(held.pop(), Signal.OK)
    await step()
    await step()
    await asyncio.sleep(0)
    assert limiters[0].room == 4 and limiters[1].room == 4  # half each: both want more than half
    assert limiters[0].in_flight == 4 and limiters[1].in_flight == 4
    for t in waiting:
        t.cancel()
    await asyncio.gather(*waiting, return_exceptions=True)
    for lim in limiters:
        while lim.in_flight:
            lim.release(0.0, Signal.OK)
    clock[0] += 10  # machine 1 is gone (its rows expired): machine 0 runs the whole limit
    rows = await shares[0].exchange([("up", 0, 0)])
    assert rows == []
    assert shares[0].caps(rows, shares[0].watcher.board.rows()) == [None]
    for sh in shares:
        sh.watcher.board.close()


def test_an_adaptive_limit_keeps_what_the_engine_runs_at_once_while_online_requests_run() -> None:
    """Latency twice its baseline with 64 in flight: the engine runs about 32 at once and queues the rest, so while
    an online request is in flight batch lines keep 31 (the online one is not queued behind the others)."""
    from batchyard.upstreams.limiter import AdaptiveLimiter

    lim = AdaptiveLimiter(initial=64)
    lim._short, lim._long = 0.1, 0.05
    lim.in_flight = 64
    assert lim.capacity() == 32
    lim.reserve(1)
    assert lim._cap() == 31
    lim.reserve(2)
    assert lim._cap() == 30  # from the estimate made when the online requests started
    lim.reserve(0)
    # between a user's requests the batch does not fill the engine's queue again (the next one would wait behind
    # it: p5_shared's users at 1.9x idle before this hold, 1.1x with it): it keeps what the engine runs...
    assert lim._cap() == 32
    lim.reserve(1)
    assert lim._cap() == 31  # ... and the next online request finds the same estimate
    lim.reserve(0)
    lim._keep_until = time.monotonic() - 0.001  # ... until KEEP_HOLD_S passed with no online request
    assert lim._cap() == 64
    lim._short = 0.055  # near the baseline: no queue, the limit is what it runs
    assert lim.capacity() == 64
    lim.in_flight = 0


def test_a_full_board_counts_nothing_more_and_fails_nothing(tmp_path: Path) -> None:
    from batchyard.upstreams.online import ENTRIES

    path = tmp_path / "board"
    boards = [Board(path) for _ in range(ENTRIES + 1)]
    for b in boards[:ENTRIES]:
        b.add("up", 1)
    boards[-1].add("up", 1)  # no entry left: not counted, no error
    boards[-1].publish({cell("up"): (5, 5)})
    assert boards[0].counts()[cell("up")] == ENTRIES
    boards[0].close()  # an entry frees up; the last board tries again only after 10 s
    boards[-1].add("up", 1)
    assert boards[1].counts()[cell("up")] == ENTRIES - 1
    for b in boards[1:]:
        b.close()
