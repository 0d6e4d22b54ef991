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
from batchyard.upstreams.http import HTTPUpstream
from batchyard.upstreams.limiter import Limiter, Signal
from batchyard.upstreams.online import CELLS, Board, BoardWatcher, OnlineGate, cell
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


def test_watcher_modes(tmp_path: Path) -> None:
    board = Board(tmp_path / "board")
    lim = Limiter(4)
    member = Member(_NoUpstream("up"), lim)
    counts = [0] * CELLS
    counts[cell("up")] = 1
    BoardWatcher(board, [member], "slots").apply(counts, 100.0)
    assert lim.reserved == 1
    pause = BoardWatcher(board, [member], "pause", hold_s=0.1)
    pause.apply(counts, 100.0)
    assert lim.reserved >= lim.limit
    counts[cell("up")] = 0
    pause.apply(counts, 100.05)  # within the hold after the last online request
    assert lim.reserved >= lim.limit
    pause.apply(counts, 100.2)
    assert lim.reserved == 0
    board.close()


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
