"""Run one leased shard: dispatch its lines through a fixed pool of lanes, write result parts, commit fenced."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import re
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import orjson

from batchyard import metrics
from batchyard.blobs.base import BlobStore, BlobWriter
from batchyard.config import Settings
from batchyard.domain import lines, wire
from batchyard.domain.fairshare import lane_shares
from batchyard.domain.models import ShardClaim, ShardResult, Usage
from batchyard.domain.ordering import WAIT, FileOrder, Prefixes, PrefixScheduler, Scheduler, prefix_order
from batchyard.domain.states import BatchStatus
from batchyard.execution.containment import (
    DEPENDENCY_ERRORS,
    QUARANTINE_AFTER,
    Backoff,
    Paused,
    describe,
    failure_delay,
    is_outage,
)
from batchyard.execution.dispatcher import Dispatcher, Outcome, StopSignal
from batchyard.execution.shard_input import read_lines
from batchyard.store.base import Heartbeat, MetadataStore

PROGRESS_INTERVAL = 1.0  # a running shard publishes its progress and reads its batch's status this often
MIN_BEAT_GAP = 0.05  # seconds between two heartbeats of one shard, however often it is nudged
_CUSTOM_ID = re.compile(rb'"custom_id"\s*:\s*("(?:[^"\\]|\\.){1,4096}")')

log = logging.getLogger("batchyard.shard")


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
        self.errors: Counter[str] = Counter()  # error lines by code, counted in the metrics once committed
        self.stop = StopSignal()
        self.hard_stop = False
        self.lost = False
        self.lanes = 0  # live lanes
        self.spawn: Callable[[], None] | None = None  # adds a lane (set while its lines execute)
        self.executing: set[asyncio.Task[Any]] = set()  # lanes inside an upstream call
        self.untaken = 0  # lines no lane has taken yet
        self.unrecorded = 0  # lines without an output or error line yet
        self._waiters: list[asyncio.Future[None]] = []  # lanes waiting for a prefix group to open

    async def record(self, outcome: Outcome) -> None:
        if outcome.ok:
            await self.out.write(outcome.line)
            self.completed += 1
        else:
            await self.err.write(outcome.line)
            self.failed += 1
            self.errors[metrics.line_error_code(outcome.line, outcome.stopped)] += 1
            if outcome.stopped == "batch_expired":
                self.expired += 1
        if outcome.usage is not None:
            self.usage.add(outcome.usage)
        self.unrecorded -= 1

    async def abort(self) -> None:
        await _abort(self.out)
        await _abort(self.err)

    async def changed(self) -> None:
        """Wait for `notify` (a prefix group opened, or the batch stopped)."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        await waiter

    def notify(self) -> None:
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)


async def _abort(writer: BlobWriter) -> None:
    """Drop a part being written; when even that fails (storage down), the sweeper removes what is left."""
    with contextlib.suppress(Exception):
        await writer.abort()


def parse_line(raw: bytes, line_no: int) -> dict[str, Any]:
    """A request line of a validated shard, read exactly (`wire.loads`). Validation read it before, so this does
    not fail; if it does anyway, the line is still answered: its custom_id is dug out of the bytes and it carries a
    `problem` that the lane turns into its error line."""
    try:
        req = wire.loads(raw)
        if (
            isinstance(req, dict)
            and isinstance(req.get("custom_id"), str)
            and isinstance(req.get("body"), dict)
        ):
            return req
        problem = "The request line is not an object with a string custom_id and an object body."
    except Exception as e:
        problem = f"The request line could not be read ({describe(e, 200)})."
    m = _CUSTOM_ID.search(raw)
    custom_id = f"line-{line_no}"
    if m is not None:
        with contextlib.suppress(Exception):
            custom_id = str(orjson.loads(m.group(1)))
    return {"custom_id": custom_id, "body": None, "problem": problem}


class ShardLoop:
    """One of the worker's loops that claim and run shards one at a time (`Worker.run_shard_once`)."""

    def __init__(self) -> None:
        self.ended: ShardClaim | None = None  # its last shard, while it claims the next (ShardRunner._ended)


class ShardRunner:
    def __init__(
        self, store: MetadataStore, blobs: BlobStore, dispatcher: Dispatcher, settings: Settings
    ) -> None:
        self.store = store
        self.blobs = blobs
        self.dispatcher = dispatcher
        self.settings = settings
        # The storage or database is down: retried every few seconds at most (a probe first: see Worker), so that
        # work resumes soon after the outage ends.
        self.outage = Backoff("running shards", log, cap=5.0)
        self._beats = Backoff("shard heartbeats", log)  # only for its rate-limited log
        self._nudge = asyncio.Event()  # set by `nudge`: every running shard looks at its batch at once
        self._suspects = 0  # of those, shards that failed before and wait to run alone (`_run_alone`)
        self.solo_done = asyncio.Event()  # clear while a suspect shard waits or runs: claim nothing new
        self.solo_done.set()
        self._idle = asyncio.Event()  # set when a shard ends (a suspect may be waiting for that)
        self._lane_ids = itertools.count()
        # prefix groups this process's shards prefill: a group in several running shards is prefilled once
        self.prefixes = Prefixes()
        # attempts executing lines, in the order they started (lane shares; woken when a group opens in any)
        self._executing: list[_Attempt] = []
        # the shards this runner holds (claimed and not yet done, whatever they are doing), in the order claimed
        self._claims: list[ShardClaim] = []
        self.claiming = 0  # the worker's shard loops waiting on a claim now (but those in `_ended`)
        # shards that ended here and whose loop claims its next shard at once (`ShardLoop`): each keeps its share
        # until that claim is answered, so the others do not grow into lanes the next shard takes back at once
        self._ended: list[ShardClaim] = []
        # counts the changes of `_claims` and `_executing`: a lane looks at its share again after one
        self._shares_epoch = 0

    @property
    def active(self) -> int:
        """How many shards this runner holds."""
        return len(self._claims)

    @property
    def running(self) -> int:
        """Shards this runner is executing now."""
        return len(self._executing)

    def _wake_all(self) -> None:
        for a in self._executing:
            a.notify()

    def nudge(self) -> None:
        """Make every running shard heartbeat now (a batch was cancelled here: stop its lines at once)."""
        self._nudge.set()

    async def run(self, claim: ShardClaim, loop: ShardLoop | None = None) -> bool:
        """Run the shard to the end; True when this attempt's results were committed. `loop`: the worker's loop
        that claimed it, when it claims its next shard at once after this one (its share waits for that claim).

        Whatever happens, the worker goes on: a dependency that is down hands the shard back to be retried later
        (`Paused` is raised for the caller to back off), any other failure hands it back counted (and logged), and a
        shard that failed QUARANTINE_AFTER times ends its lines as error lines instead of running them again."""
        suspect = 0 < claim.shard.failures < QUARANTINE_AFTER
        if suspect and self._suspects:  # one suspect at a time here: this one is taken up later, or elsewhere
            await self._release(claim, retry_in=1.0)
            return False
        self._claims.append(claim)
        self._shares_changed()
        goes_on = False  # the shard ends without raising: its loop claims the next
        try:
            if claim.shard.failures >= QUARANTINE_AFTER:
                result = await self._quarantine(claim)
            elif suspect:
                result = await self._run_alone(claim)
            else:
                result = await self._run(claim)
        except asyncio.CancelledError:
            await self._release(claim)  # shutting down: hand the shard back now rather than at lease expiry
            raise
        except Exception as e:
            if is_outage(
                e
            ):  # storage or database down: hand back, not counted, and tell the loop to back off
                delay = self.outage.failed(e)
                await self._release(claim, retry_in=delay)
                raise Paused(delay, e) from e
            log.exception(
                "shard %s/%d attempt %d failed (failure %d of %d before quarantine)",
                claim.shard.batch_id,
                claim.shard.index,
                claim.attempt,
                claim.shard.failures + 1,
                QUARANTINE_AFTER,
            )
            # Not claimable again at once: a shard that fails every time (even in quarantine) never spins.
            await self._release(claim, retry_in=failure_delay(claim.shard.failures), failure=describe(e))
            goes_on = True
            return False
        else:
            goes_on = True
        finally:
            self._claims.remove(claim)
            if loop is not None and goes_on:  # its loop claims the next shard now
                loop.ended = claim
                self._ended.append(claim)
            self._idle.set()
            self._shares_changed()
        self.outage.ok()
        return result

    def handed_on(self, loop: ShardLoop) -> None:
        """The claim that follows the loop's last shard was answered, or is not made now: that shard's share goes
        to the next one, or (`claimed_nothing`) to the others."""
        if loop.ended is not None:
            self._ended.remove(loop.ended)
            loop.ended = None

    async def _run_alone(self, claim: ShardClaim) -> bool:
        """Run a shard that failed before with nothing else running in this process.

        When a worker process dies, every shard it was running is counted as failed (`release_worker`): which one
        killed it cannot be known. Run alone afterwards, an innocent shard succeeds and a poison one is the only
        one blamed for the next death, so one tenant's poison shard does not get another tenant's quarantined.
        While it waits for the others to finish it keeps its lease; no new shard is claimed here meanwhile."""
        self._suspects += 1
        self.solo_done.clear()
        try:
            while self.active > 1:  # the others finish; the worker's loops claim nothing new meanwhile
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(self.settings.heartbeat_seconds, PROGRESS_INTERVAL)):
                        await self._idle.wait()
                self._idle.clear()
                if (
                    self.active > 1
                    and await self.store.heartbeat_shard(claim, self.settings.lease_seconds, 0, 0, Usage())
                    is None
                ):
                    return False  # the lease went elsewhere while we waited
            return await self._run(claim)
        finally:
            self._suspects -= 1
            if self._suspects == 0:
                self.solo_done.set()

    async def _release(self, claim: ShardClaim, *, retry_in: float = 0.0, failure: str | None = None) -> None:
        """Hand the shard back (best effort: when the store is down too, the lease runs out instead)."""
        with contextlib.suppress(Exception):
            await asyncio.shield(self.store.release_shard(claim, retry_in=retry_in, failure=failure))

    async def _open(self, claim: ShardClaim) -> tuple[_Attempt, list[dict[str, Any]]]:
        shard = claim.shard
        lines = await read_lines(self.blobs, claim.input_blob_key, shard.ranges())
        requests = [parse_line(raw, n) for n, raw in lines]
        del lines
        out = await self.blobs.open_writer(part_key(claim, "out"))
        try:
            err = await self.blobs.open_writer(part_key(claim, "err"))
        except BaseException:
            await _abort(out)
            raise
        att = _Attempt(claim, out, err)
        att.stop.deadline = time.monotonic() + (claim.expires_at - claim.db_now)  # on the database's clock
        code = stop_code(claim.batch_status, claim.expires_at, claim.db_now)
        if code is not None:
            att.stop.set(code)
        return att, requests

    async def _run(self, claim: ShardClaim) -> bool:
        att, requests = await self._open(claim)
        try:
            sched: Scheduler = FileOrder(requests)
            if self.settings.prefix_ordering:
                try:
                    sched = PrefixScheduler(prefix_order(requests), self.prefixes)
                except Exception:  # an ordering is an optimisation: never a reason to fail the lines
                    log.exception(
                        "prefix ordering failed for shard %s/%d", claim.shard.batch_id, claim.shard.index
                    )
            try:
                await self._execute(att, sched)
            finally:
                sched.close()
                self._wake_all()  # a group whose first line this attempt gave up is cold again elsewhere
            if att.lost:
                await att.abort()
                metrics.lease_lost()
                log.warning(
                    "shard %s/%d attempt %d lost its lease",
                    claim.shard.batch_id,
                    claim.shard.index,
                    claim.attempt,
                )
                return False
            return await self._commit(att)
        except BaseException:
            await att.abort()  # nothing half-written stays behind
            raise

    async def _quarantine(self, claim: ShardClaim) -> bool:
        """Every line of a shard that keeps failing ends as an error line, without being sent again."""
        att, requests = await self._open(claim)
        metrics.shard_quarantined()
        log.error(
            "shard %s/%d quarantined after %d failed attempts (last: %s): its %d lines end as error lines",
            claim.shard.batch_id,
            claim.shard.index,
            claim.shard.failures,
            claim.shard.last_error,
            len(requests),
        )
        message = (
            f"This request was not executed: the part of the batch holding it failed {claim.shard.failures} times "
            f"(last error: {claim.shard.last_error or 'unknown'}), so it was quarantined."
        )
        try:
            for req in requests:
                cid = req["custom_id"]
                if att.stop.code is not None:
                    line = lines.not_executed_line(cid, att.stop.code)
                    await att.record(Outcome(False, line, stopped=att.stop.code))
                else:
                    await att.record(Outcome(False, lines.error_line(cid, "shard_quarantined", message)))
            return await self._commit(att)
        except BaseException:
            await att.abort()
            raise

    def claimed_nothing(self) -> None:
        """A claim found no shard: the shards that left a lane for it take it now."""
        self._shares_changed()

    def _shares_changed(self) -> None:
        """A shard was claimed, started or ended here, or a claim found nothing: each lane over its new share
        retires after its line (`_lane`), and each shard under its share gets its lanes now (waiting for a line
        to finish would leave them idle for as long as the engine takes to answer one)."""
        self._shares_epoch += 1
        for a in self._executing:
            if a.spawn is None or a.lost:
                continue
            fair = self._fair_lanes(a)
            added = 0  # its lanes are busy with the lines they took: each new one takes a line no lane has
            while a.lanes < fair and a.untaken > added:
                a.spawn()
                added += 1

    def _fair_lanes(self, att: _Attempt, starting: bool = False) -> int:
        """Lanes for one shard: its share of the upstreams' concurrency among the shards running here, by owner
        and weight (`fairshare.lane_shares`): one owner's many shards do not crowd out another owner's few.

        Lanes beyond the concurrency limit would only queue on the limiter, and every line they carry would pay
        for a wake-up; lanes are therefore added and retired as the limit and the number of shards change. The
        shares add up to the limit exactly (the shards that started first get the remainder): a lane that waits on
        the limiter takes the next free engine slot from another lane, which with prefix ordering sends another
        group's prompt to the slot that held this group's (an engine without a RAM prompt cache then prefills it
        again). Only an owner with more shards here than its share makes the lanes outnumber the slots; the
        limiter's fair queue then serves the owners by weight."""
        total = self.dispatcher.total_limit()
        running = [(a.claim.owner, a.claim.weight) for a in self._executing]
        # The shards claimed here and not yet running (their input is being read) count too, after the running
        # ones: a worker claims its shards one after another, and had the first to start taken every lane, they
        # would all serve its first prefix group while the next shards start theirs; on an engine without a RAM
        # prompt cache each of those slots prefills that group's prompt, then another one's
        # (`bench/slot_engine.py --shard-lines 20`: 45 prefills for 8 prompt groups, 8 with this: the least).
        # A shard that starts also leaves room for the claims in flight (`starting`): they are likely of its batch.
        # It takes that room back as soon as they found nothing (`claimed_nothing` -> `_shares_changed`).
        started = {id(a.claim) for a in self._executing}
        opening = [(c.owner, c.weight) for c in self._claims if id(c) not in started and c is not att.claim]
        # A shard that ended here keeps its share while its loop claims the next (`_ended`): on a loaded machine
        # the shards do not end together, and the others' new lanes would each prefill their group on the slot it
        # left (15 prefills for 8 groups once in CI), to retire when the next shard starts a moment later.
        opening += [(c.owner, c.weight) for c in self._ended]
        if starting:
            opening += [(att.claim.owner, att.claim.weight)] * self.claiming
        if att not in self._executing:
            return lane_shares(total, [*running, (att.claim.owner, att.claim.weight), *opening])[len(running)]
        return lane_shares(total, running + opening)[self._executing.index(att)]

    def owners(self) -> frozenset[str]:
        """The owners of the shards this runner holds."""
        return frozenset(c.owner for c in self._claims)

    def full(self) -> bool:
        """Whether the regular shard loops can claim nothing more here (every loop busy, or no lane left)."""
        return self.active >= min(self.settings.max_shards, self.dispatcher.total_limit())

    async def room_for_shard(self) -> None:
        """Wait until this process runs fewer shards than the concurrency limit (each shard needs a lane)."""
        while self.active >= self.dispatcher.total_limit():
            self._idle.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.5):  # the limit may grow meanwhile
                    await self._idle.wait()

    async def _execute(self, att: _Attempt, sched: Scheduler) -> None:
        lanes: set[asyncio.Task[None]] = (
            set()
        )  # for cancellation; att.lanes counts the live ones synchronously
        finished = asyncio.Event()
        failures: list[BaseException] = []
        att.untaken = att.unrecorded = att.claim.shard.line_count

        async def lane() -> None:
            try:
                await self._lane(att, sched, spawn)
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

        self._executing.append(att)
        self._shares_epoch += 1  # the others' lanes over their share retire after their line
        beat = asyncio.create_task(self._heartbeat(att, lanes), name="shard-heartbeat")
        try:
            for _ in range(max(1, min(self._fair_lanes(att, starting=True), att.untaken))):
                spawn()
            att.spawn = spawn
            await finished.wait()
        finally:
            att.spawn = None
            self._executing.remove(att)  # the ranks after it close up
            for t in list(lanes):
                t.cancel()
            if lanes:
                await asyncio.gather(*lanes, return_exceptions=True)
            beat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beat
            self._shares_changed()  # the others grow into its lanes, once its own are gone
        if att.lost:
            return
        if failures:
            raise failures[0]
        if att.unrecorded:
            raise RuntimeError(f"shard ended with {att.unrecorded} lines unrecorded")

    async def _lane(self, att: _Attempt, sched: Scheduler, spawn: Callable[[], None]) -> None:
        lane = next(self._lane_ids)
        task = asyncio.current_task()  # once a lane, not once a line
        assert task is not None
        done = 0
        epoch = self._shares_epoch
        try:
            while not att.lost:
                if att.stop.code is not None:
                    sched.drain()  # stopped: no line is held back any more, every one is only recorded
                req = sched.take(lane)
                if req is None:
                    return
                if req is WAIT:  # every line left waits on a group's first line in flight
                    # (woken when it comes back; a look every second in case another shard's stalled)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(att.changed(), 1.0)
                    continue
                att.untaken -= 1
                await att.record(await self._outcome(att, req, task))
                if sched.done(lane, req):
                    self._wake_all()  # a group's prefix is cached now: lanes waiting for it go on
                done += 1
                if done % 8 and att.lanes > 1 and epoch == self._shares_epoch:
                    # the fair share changes slowly: look at it every 8 lines (at once for a lone lane, and at
                    # once when a shard started or ended here: a lane over its share retires after its line)
                    continue
                epoch = self._shares_epoch
                fair = self._fair_lanes(att)
                if att.lanes > fair:
                    return  # retire: the shard has more lanes than its share
                if att.lanes < fair and att.untaken > att.lanes:
                    spawn()  # grow toward the share (one more lane per finished line)
        finally:
            sched.leave(lane)

    async def _outcome(self, att: _Attempt, req: dict[str, Any], task: asyncio.Task[Any]) -> Outcome:
        """One line's outcome: executed, or not (the batch stopped, the line could not be read); never raises but
        for a cancellation that is not a hard stop. `task`: the lane's own."""
        custom_id: str = req["custom_id"]
        if att.stop.code is not None:
            return Outcome(False, lines.not_executed_line(custom_id, att.stop.code), stopped=att.stop.code)
        problem = req.get("problem")
        if problem is not None:  # the line could not be read back (validation read it: not expected)
            return Outcome(False, lines.error_line(custom_id, "invalid_request", problem))
        att.executing.add(task)
        try:
            claim = att.claim
            return await self.dispatcher.execute(
                claim.endpoint, custom_id, req["body"], att.stop, key=claim.owner, weight=claim.weight
            )
        except Exception as e:  # a line fails alone, whatever went wrong while sending or parsing it
            log.exception("line %r of batch %s failed", custom_id[:64], att.claim.shard.batch_id)
            msg = f"batchyard could not process this request ({describe(e, 200)})."
            return Outcome(False, lines.error_line(custom_id, "internal_error", msg))
        except asyncio.CancelledError:
            # Cancelled by the heartbeat: either the lease is gone (give up) or the grace period for in-flight
            # lines of a cancelled/expired batch ran out (the line is recorded as not executed).
            if att.lost or not att.hard_stop or att.stop.code is None:
                raise
            task.uncancel()
            return Outcome(False, lines.not_executed_line(custom_id, att.stop.code), stopped=att.stop.code)
        finally:
            att.executing.discard(task)

    async def _heartbeat(self, att: _Attempt, lanes: set[asyncio.Task[None]]) -> None:
        s = self.settings
        grace_deadline: float | None = None
        loop = asyncio.get_running_loop()
        period = min(s.heartbeat_seconds, PROGRESS_INTERVAL)
        last = loop.time()
        while True:
            # Every second (or when nudged): publish progress, extend the lease, see a cancel or an expiry.
            wake = last + period if grace_deadline is None else min(last + period, grace_deadline)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, wake - loop.time())):  # the grace's end comes on time
                    await self._nudge.wait()
            self._nudge.clear()
            # Nudges come from API requests (every cancel call wakes the workers): at most MIN_BEAT_GAP apart,
            # so that a client calling cancel in a loop cannot turn heartbeats into a write storm.
            await asyncio.sleep(max(0.0, last + MIN_BEAT_GAP - loop.time()))
            last = loop.time()
            try:
                hb: Heartbeat | None = await self.store.heartbeat_shard(
                    att.claim, s.lease_seconds, att.completed, att.failed, att.usage
                )
            except (
                DEPENDENCY_ERRORS
            ) as e:  # the store is down: keep working; the lease is lost if it stays down
                self._beats.failed(e)  # logged once per interval, not once a second per shard
                continue
            self._beats.ok()
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
                att.notify()  # lanes holding back for a prefix group go on: they only record lines now
                if grace_deadline is None:
                    grace_deadline = loop.time() + s.cancel_grace
                if loop.time() >= grace_deadline and not att.hard_stop:  # a grace of 0: at once
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
        result = ShardResult(
            att.completed,
            att.failed,
            att.usage,
            out_key,
            err_key,
            cancelled=att.errors["batch_cancelled"],
            upstream_failed=sum(n for code, n in att.errors.items() if code.startswith("http_")),
        )
        ok = await self.store.complete_shard(claim, result, att.expired)
        if ok:
            metrics.lines_committed(claim.endpoint, att.completed, att.errors, att.usage)
        else:
            metrics.lease_lost()
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
