"""Run one leased shard: dispatch its lines through a fixed pool of lanes, write result parts, commit fenced."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

import orjson

from batchyard.blobs.base import BlobStore, BlobWriter
from batchyard.config import Settings
from batchyard.domain import lines
from batchyard.domain.models import ShardClaim, ShardResult, Usage
from batchyard.domain.ordering import prefix_order
from batchyard.domain.states import BatchStatus
from batchyard.domain.validation import iter_lines
from batchyard.execution.dispatcher import Dispatcher, Outcome, StopSignal
from batchyard.store.base import Heartbeat, MetadataStore

log = logging.getLogger("batchyard.shard")


class LeaseLost(Exception):
    """Another attempt owns the shard now: this attempt's results must not be committed."""


def part_key(claim: ShardClaim, kind: str) -> str:
    return f"parts/{claim.shard.batch_id}/{claim.shard.index:06d}.{claim.attempt}.{kind}"


def stop_code(status: BatchStatus, expires_at: int, db_now: float) -> str | None:
    if status == BatchStatus.CANCELLING:
        return "batch_cancelled"
    if db_now >= expires_at:
        return "batch_expired"
    return None


class _Attempt:
    """The mutable state of one shard attempt."""

    def __init__(self, claim: ShardClaim, out: BlobWriter, err: BlobWriter) -> None:
        self.claim = claim
        self.out = out
        self.err = err
        self.completed = 0
        self.failed = 0
        self.expired = 0
        self.usage = Usage()
        self.stop = StopSignal()
        self.hard_stop = False
        self.lost = False
        self.lanes = 0  # live lanes
        self.executing: set[asyncio.Task[Any]] = set()  # lanes inside an upstream call
        self.untaken = 0  # lines no lane has taken yet
        self.unrecorded = 0  # lines without an output or error line yet

    async def record(self, outcome: Outcome) -> None:
        if outcome.ok:
            await self.out.write(outcome.line)
            self.completed += 1
        else:
            await self.err.write(outcome.line)
            self.failed += 1
            if outcome.stopped == "batch_expired":
                self.expired += 1
        if outcome.usage is not None:
            self.usage.add(outcome.usage)
        self.unrecorded -= 1


class ShardRunner:
    def __init__(
        self, store: MetadataStore, blobs: BlobStore, dispatcher: Dispatcher, settings: Settings
    ) -> None:
        self.store = store
        self.blobs = blobs
        self.dispatcher = dispatcher
        self.settings = settings
        self.running = 0  # shards this runner is executing now

    async def run(self, claim: ShardClaim) -> bool:
        """Run the shard to the end; True when this attempt's results were committed."""
        shard = claim.shard
        data = await self.blobs.read_range(claim.input_blob_key, shard.start, shard.end)
        out = await self.blobs.open_writer(part_key(claim, "out"))
        err = await self.blobs.open_writer(part_key(claim, "err"))
        att = _Attempt(claim, out, err)
        code = stop_code(claim.batch_status, claim.expires_at, claim.db_now)
        if code is not None:
            att.stop.set(code)
        requests = [orjson.loads(raw) for _, raw in iter_lines(data, shard.first_line)]
        del data
        if self.settings.prefix_ordering:
            requests = prefix_order(requests)
        todo = iter(requests)
        try:
            await self._execute(att, todo)
        except BaseException:
            await out.abort()
            await err.abort()
            # Shutting down or failing: hand the shard back now rather than at lease expiry.
            with contextlib.suppress(Exception):
                await asyncio.shield(self.store.release_shard(claim))
            raise
        if att.lost:
            await out.abort()
            await err.abort()
            log.warning("shard %s/%d attempt %d lost its lease", shard.batch_id, shard.index, claim.attempt)
            return False
        return await self._commit(att)

    def _fair_lanes(self) -> int:
        """Lanes for one shard: its share of the upstreams' concurrency among the shards running here.

        Lanes beyond the concurrency limit would only queue on the limiter, and every line they carry would pay
        for a wake-up; lanes are therefore added and retired as the limit and the number of shards change.
        """
        total = self.dispatcher.total_limit()
        return max(1, -(-total // max(1, self.running)))

    async def _execute(self, att: _Attempt, todo: Iterator[dict[str, Any]]) -> None:
        lanes: set[asyncio.Task[None]] = (
            set()
        )  # for cancellation; att.lanes counts the live ones synchronously
        finished = asyncio.Event()
        failures: list[BaseException] = []
        att.untaken = att.unrecorded = att.claim.shard.line_count

        async def lane() -> None:
            try:
                await self._lane(att, todo, spawn)
            except asyncio.CancelledError:
                raise
            except BaseException as e:
                failures.append(e)
            finally:
                att.lanes -= (
                    1  # in the same step as the lane's last decision: no two lanes retire on one count
                )
                if failures or att.lost or att.unrecorded == 0 or att.lanes == 0:
                    finished.set()

        def spawn() -> None:
            att.lanes += 1
            task = asyncio.create_task(lane(), name="lane")
            lanes.add(task)
            task.add_done_callback(lanes.discard)

        self.running += 1
        beat = asyncio.create_task(self._heartbeat(att, lanes), name="shard-heartbeat")
        try:
            for _ in range(max(1, min(self._fair_lanes(), att.untaken))):
                spawn()
            await finished.wait()
        finally:
            self.running -= 1
            for t in list(lanes):
                t.cancel()
            if lanes:
                await asyncio.gather(*lanes, return_exceptions=True)
            beat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beat
        if att.lost:
            return
        if failures:
            raise failures[0]
        if att.unrecorded:
            raise RuntimeError(f"shard ended with {att.unrecorded} lines unrecorded")

    async def _lane(self, att: _Attempt, todo: Iterator[dict[str, Any]], spawn: Callable[[], None]) -> None:
        endpoint = att.claim.endpoint
        done = 0
        for req in todo:
            att.untaken -= 1
            if att.lost:
                return
            custom_id: str = req["custom_id"]
            if att.stop.code is not None:
                await att.record(
                    Outcome(False, lines.not_executed_line(custom_id, att.stop.code), stopped=att.stop.code)
                )
                continue
            task = asyncio.current_task()
            att.executing.add(task)  # type: ignore[arg-type]
            try:
                outcome = await self.dispatcher.execute(endpoint, custom_id, req["body"], att.stop)
            except asyncio.CancelledError:
                # Cancelled by the heartbeat: either the lease is gone (give up) or the grace period for
                # in-flight lines of a cancelled/expired batch ran out (the line is recorded as not executed).
                if att.lost or not att.hard_stop or att.stop.code is None:
                    raise
                if task is not None:
                    task.uncancel()
                outcome = Outcome(
                    False, lines.not_executed_line(custom_id, att.stop.code), stopped=att.stop.code
                )
            finally:
                att.executing.discard(task)
            await att.record(outcome)
            done += 1
            if done % 8 and att.lanes > 1:
                continue  # the fair share changes slowly: look at it every 8 lines (at once for a lone lane)
            fair = self._fair_lanes()
            if att.lanes > fair:
                return  # retire: the shard has more lanes than its share
            if att.lanes < fair and att.untaken > att.lanes:
                spawn()  # grow toward the share (one more lane per finished line)

    async def _heartbeat(self, att: _Attempt, lanes: set[asyncio.Task[None]]) -> None:
        s = self.settings
        grace_deadline: float | None = None
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(min(s.heartbeat_seconds, 1.0) if att.stop.code else s.heartbeat_seconds)
            hb: Heartbeat | None = await self.store.heartbeat_shard(
                att.claim, s.lease_seconds, att.completed, att.failed, att.usage
            )
            log.debug(
                "shard %s/%d: %d done, %d lanes, concurrency limit %d",
                att.claim.shard.batch_id,
                att.claim.shard.index,
                att.completed + att.failed,
                att.lanes,
                self.dispatcher.total_limit(),
            )
            if hb is None:
                att.lost = True
                for t in list(lanes):
                    t.cancel()
                return
            code = stop_code(hb.batch_status, hb.expires_at, hb.db_now)
            if code is not None:
                att.stop.set(code)
                if grace_deadline is None:
                    grace_deadline = loop.time() + s.cancel_grace
                elif loop.time() >= grace_deadline and not att.hard_stop:
                    att.hard_stop = True
                    for t in list(att.executing):  # only lanes waiting on an upstream, never one writing
                        t.cancel()

    async def _commit(self, att: _Attempt) -> bool:
        claim = att.claim
        out_key = err_key = None
        if att.out.size:
            out_key = (await att.out.commit()).key
        else:
            await att.out.abort()
        if att.err.size:
            err_key = (await att.err.commit()).key
        else:
            await att.err.abort()
        result = ShardResult(att.completed, att.failed, att.usage, out_key, err_key)
        ok = await self.store.complete_shard(claim, result, att.expired)
        if not ok:
            log.warning(
                "shard %s/%d attempt %d was fenced off",
                claim.shard.batch_id,
                claim.shard.index,
                claim.attempt,
            )
            for key in (out_key, err_key):
                if key is not None:
                    await self.blobs.delete(key)
        return ok
