"""ShardRunner on the in-memory store and a real local blob directory, with faults injected into the layers below:
a line fails alone, a dependency outage pauses the shard, a shard that keeps failing is quarantined, a cancel is
seen at once."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from batchyard.blobs.local import LocalBlobStore
from batchyard.config import Settings
from batchyard.domain.models import BatchRecord, FileRecord, ShardClaim
from batchyard.domain.states import BatchStatus
from batchyard.domain.validation import BatchValidator
from batchyard.errors import BlobError, BlobNotFound
from batchyard.execution.containment import QUARANTINE_AFTER, Paused
from batchyard.execution.dispatcher import Dispatcher
from batchyard.execution.shard_runner import MIN_BEAT_GAP, ShardLoop, ShardRunner
from batchyard.execution.worker import Worker
from batchyard.store.memory import MemoryStore
from batchyard.upstreams.base import Upstream, UpstreamResponse
from batchyard.upstreams.limiter import Limiter
from batchyard.upstreams.router import Router

CHAT = "/v1/chat/completions"
OWNER = "key-a"


class Clock:
    def __init__(self) -> None:
        self.t = 1_800_000_000.0

    def __call__(self) -> float:
        return self.t


class Echo(Upstream):
    """Answers every request with its own body; `poison` bodies raise; `gate` holds every call until set."""

    def __init__(self, poison: str | None = None) -> None:
        self.name = "echo"
        self.poison = poison
        self.sent: list[dict[str, Any]] = []
        self.gate: asyncio.Event | None = None

    async def call(self, endpoint: str, body: bytes, *, timeout: float) -> UpstreamResponse:
        req = json.loads(body)
        self.sent.append(req)
        if self.gate is not None:
            await self.gate.wait()
        if self.poison is not None and self.poison in body.decode():
            raise ZeroDivisionError("a bug met this line")
        return UpstreamResponse(200, {}, json.dumps({"echo": req}).encode(), "req_1")


class FaultyBlobs(LocalBlobStore):
    """A real local blob directory whose next `fail_reads` reads raise `read_error`, and whose writers raise
    `write_error` while it is set."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.fail_reads = 0
        self.read_error: Exception = ValueError("cannot read this shard")
        self.write_error: Exception | None = None

    async def read_range(self, key: str, start: int, end: int) -> bytes:
        if self.fail_reads and key.startswith("files/"):
            self.fail_reads -= 1
            raise self.read_error
        return await super().read_range(key, start, end)

    async def open_writer(self, key: str, *, max_bytes: int | None = None):  # type: ignore[no-untyped-def]
        if self.write_error is not None:
            raise self.write_error
        return await super().open_writer(key, max_bytes=max_bytes)


def lines(n: int) -> bytes:
    return b"".join(
        json.dumps(
            {
                "custom_id": f"r{i}",
                "method": "POST",
                "url": CHAT,
                "body": {"model": "m", "messages": [{"role": "user", "content": f"line {i}"}]},
            }
        ).encode()
        + b"\n"
        for i in range(n)
    )


class Rig:
    def __init__(self, tmp: Path, upstream: Echo, n: int = 10, shard_lines: int | None = None) -> None:
        self.clock = Clock()
        self.store = MemoryStore(clock=self.clock)
        self.blobs = FaultyBlobs(tmp / "blobs")
        self.upstream = upstream
        self.n = n
        self.shard_lines = shard_lines or n
        settings = Settings(data_dir=tmp, lease_seconds=30.0, shard_lines=n, cancel_grace=0.5)
        self.dispatcher = Dispatcher(
            Router([(None, upstream)], limiter=lambda: Limiter(4)), attempt_timeout=5.0, max_retries=0
        )
        self.runner = ShardRunner(self.store, self.blobs, self.dispatcher, settings)

    async def batch(self) -> BatchRecord:
        await self.store.open()
        data = lines(self.n)
        w = await self.blobs.open_writer("files/file-in")
        await w.write(data)
        info = await w.commit()
        now = int(self.clock())
        await self.store.insert_file(
            FileRecord(
                id="file-in",
                owner=OWNER,
                bytes=info.size,
                created_at=now,
                expires_at=None,
                filename="in.jsonl",
                purpose="batch",
                blob_key=info.key,
                sha256=info.sha256,
            )
        )
        b = BatchRecord(
            id="batch_1",
            owner=OWNER,
            endpoint=CHAT,
            input_file_id="file-in",
            completion_window="24h",
            status=BatchStatus.VALIDATING,
            created_at=now,
            expires_at=now + 86400,
        )
        await self.store.insert_batch(b)
        v = BatchValidator(CHAT, lambda m: True, shard_lines=self.shard_lines)
        v.feed(data)
        res = v.finish()
        assert res.ok
        assert await self.store.claim_validation("v", 30) is not None
        assert await self.store.plan_batch(b.id, "v", res.shards, res.total_lines, "m")
        return b

    async def claim(self, worker: str = "w") -> ShardClaim:
        c = await self.store.claim_shard(worker, 30)
        assert c is not None
        return c

    async def result_lines(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        (shard,) = await self.store.done_shards("batch_1")
        out = err = b""
        if shard.out_key:
            out = await self.blobs.read_range(shard.out_key, 0, 1 << 30)
        if shard.err_key:
            err = await self.blobs.read_range(shard.err_key, 0, 1 << 30)
        return [json.loads(x) for x in out.splitlines()], [json.loads(x) for x in err.splitlines()]


def count_beats(rig: Rig) -> list[int]:
    """Counts the store's shard heartbeats from now on, in the list's one item."""
    beats = [0]
    real = rig.store.heartbeat_shard

    async def counted(*args: Any, **kw: Any) -> Any:
        beats[0] += 1
        return await real(*args, **kw)

    rig.store.heartbeat_shard = counted  # type: ignore[method-assign]
    return beats


async def test_a_line_that_raises_fails_alone_and_the_shard_commits(tmp_path: Path) -> None:
    rig = Rig(tmp_path, Echo(poison="line 3"))
    await rig.batch()
    assert await rig.runner.run(await rig.claim())
    out, err = await rig.result_lines()
    assert sorted(x["custom_id"] for x in out) == [f"r{i}" for i in range(10) if i != 3]
    (bad,) = err
    assert bad["custom_id"] == "r3" and bad["response"] is None
    assert bad["error"]["code"] == "internal_error" and "ZeroDivisionError" in bad["error"]["message"]


@pytest.mark.parametrize(
    "error",
    [ValueError("cannot read this shard"), BlobNotFound("cannot read this shard")],
    ids=["a-bug", "input-blob-gone"],  # a blob missing for good is a failure, not an outage to wait out
)
async def test_a_shard_that_keeps_failing_is_quarantined_and_its_lines_end_as_error_lines(
    tmp_path: Path, error: Exception
) -> None:
    rig = Rig(tmp_path, Echo())
    await rig.batch()
    rig.blobs.fail_reads = QUARANTINE_AFTER
    rig.blobs.read_error = error
    for i in range(QUARANTINE_AFTER):
        claim = await rig.claim(f"w{i}")
        assert claim.shard.failures == i
        assert not await rig.runner.run(claim)  # handed back, counted: the worker goes on
        assert await rig.store.claim_shard("too-soon", 30) is None  # and not claimed again at once
        rig.clock.t += 60
    claim = await rig.claim("w-last")
    assert claim.shard.failures == QUARANTINE_AFTER and "cannot read this shard" in (
        claim.shard.last_error or ""
    )
    assert await rig.runner.run(claim)
    out, err = await rig.result_lines()
    assert out == [] and sorted(x["custom_id"] for x in err) == sorted(f"r{i}" for i in range(10))
    assert {x["error"]["code"] for x in err} == {"shard_quarantined"}
    assert "cannot read this shard" in err[0]["error"]["message"]
    assert rig.upstream.sent == []  # a quarantined shard is not sent again
    assert not list((tmp_path / "blobs").rglob("*.tmp"))


@pytest.mark.parametrize(
    "error",
    [BlobError("s3: connection refused"), OSError(28, "No space left on device")],
    ids=["blob", "enospc"],
)
async def test_a_storage_outage_pauses_the_shard_without_counting_a_failure(
    tmp_path: Path, error: Exception
) -> None:
    rig = Rig(tmp_path, Echo())
    await rig.batch()
    rig.blobs.write_error = error
    with pytest.raises(Paused) as paused:
        await rig.runner.run(await rig.claim())
    assert 0 < paused.value.delay <= 30
    assert await rig.store.claim_shard("w2", 30) is None  # paused: not claimed again before its retry time
    rig.clock.t += 60
    rig.blobs.write_error = None
    claim = await rig.claim("w2")
    assert claim.shard.failures == 0  # an outage is not the shard's fault
    assert await rig.runner.run(claim)
    out, err = await rig.result_lines()
    assert len(out) == 10 and err == []
    assert not list((tmp_path / "blobs").rglob("*.tmp"))


async def test_a_cancel_is_seen_at_once_when_the_worker_is_nudged(tmp_path: Path) -> None:
    up = Echo()
    up.gate = asyncio.Event()
    rig = Rig(tmp_path, up, n=40)
    await rig.batch()
    task = asyncio.create_task(rig.runner.run(await rig.claim()))
    for _ in range(500):  # until four lanes hold a line each, at the upstream
        if len(up.sent) >= 4:
            break
        await asyncio.sleep(0.01)
    assert await rig.store.request_cancel(OWNER, "batch_1") is not None
    rig.runner.nudge()  # what the API's cancel does through the worker's wake pipe
    await asyncio.sleep(0.1)
    up.gate.set()  # the four in-flight lines finish
    assert await asyncio.wait_for(task, 5)
    assert len(up.sent) == 4  # no line left after the cancel was seen
    out, err = await rig.result_lines()
    assert len(out) == 4 and len(err) == 36
    assert {x["error"]["code"] for x in err} == {"batch_cancelled"}


async def test_with_no_grace_the_lines_in_flight_are_cut_by_the_beat_that_sees_the_cancel(
    tmp_path: Path,
) -> None:
    """`--cancel-grace 0`: the heartbeat that sees the cancel cuts the lines in flight (it waited for the next one, a
    second later, before), and with a grace the cut comes when it ends, not at the next whole beat after it."""
    up = Echo()
    up.gate = asyncio.Event()  # never set: the lines in flight end only by being cut
    rig = Rig(tmp_path, up, n=8)
    rig.runner.settings = rig.runner.settings.replace(cancel_grace=0.0)
    await rig.batch()
    beats = count_beats(rig)
    task = asyncio.create_task(rig.runner.run(await rig.claim()))
    for _ in range(500):
        if len(up.sent) >= 4:
            break
        await asyncio.sleep(0.01)
    assert await rig.store.request_cancel(OWNER, "batch_1") is not None
    seen = beats[0]
    rig.runner.nudge()
    assert await asyncio.wait_for(task, 5)
    assert beats[0] == seen + 1  # one beat: it saw the cancel and cut the four lines
    out, err = await rig.result_lines()
    assert out == [] and len(err) == 8 and {x["error"]["code"] for x in err} == {"batch_cancelled"}


async def test_a_shard_that_failed_before_runs_alone(tmp_path: Path) -> None:
    """After a worker death every shard it ran is counted failed; run alone next, an innocent one succeeds and
    is never blamed for another shard's next crash."""
    up = Echo()
    up.gate = asyncio.Event()
    rig = Rig(tmp_path, up, n=10, shard_lines=5)  # two shards: r0-r4 and r5-r9
    await rig.batch()
    normal = asyncio.create_task(rig.runner.run(await rig.claim("w0")))  # shard 0 runs, held at the upstream
    for _ in range(100):
        if len(up.sent) >= 4:
            break
        await asyncio.sleep(0.01)
    counted = await rig.claim("w1")  # shard 1: as if a worker had died running it
    await rig.store.release_shard(counted, failure="the worker process running it died")
    suspect = await rig.claim("w1")
    assert suspect.shard.failures == 1
    alone = asyncio.create_task(rig.runner.run(suspect))
    await asyncio.sleep(0.3)
    sent = {r["messages"][0]["content"] for r in up.sent}
    assert all(int(c.split()[1]) < 5 for c in sent)  # it waits: none of shard 1's lines was sent
    assert not rig.runner.solo_done.is_set()  # and the worker claims nothing new meanwhile
    up.gate.set()  # shard 0 finishes; then shard 1 runs, alone
    assert await asyncio.wait_for(normal, 5) and await asyncio.wait_for(alone, 5)
    assert {int(r["messages"][0]["content"].split()[1]) for r in up.sent} == set(range(10))
    assert rig.runner.solo_done.is_set()


async def test_a_storm_of_nudges_does_not_become_a_storm_of_heartbeats(tmp_path: Path) -> None:
    """Every cancel call wakes the workers; a client cancelling in a loop must not turn that into writes."""
    up = Echo()
    up.gate = asyncio.Event()
    rig = Rig(tmp_path, up)
    await rig.batch()
    beats = count_beats(rig)
    task = asyncio.create_task(rig.runner.run(await rig.claim()))
    loop = asyncio.get_running_loop()
    started = loop.time()
    for _ in range(500):  # nudges, one a millisecond
        rig.runner.nudge()
        await asyncio.sleep(0.001)
    elapsed = loop.time() - started
    assert 1 <= beats[0] <= elapsed / MIN_BEAT_GAP + 2, (beats, elapsed)  # at most one per MIN_BEAT_GAP
    up.gate.set()
    assert await asyncio.wait_for(task, 5)


async def test_after_an_outage_the_probe_stops_once_storage_takes_a_write(tmp_path: Path) -> None:
    """A worker that met a storage outage probes before claiming; once a probe succeeds it stops probing, even when
    there is no shard left to run (before, it probed every poll for ever)."""
    rig = Rig(tmp_path, Echo())
    await rig.store.open()
    worker = Worker(rig.store, rig.blobs, rig.dispatcher.router, rig.runner.settings)
    probes = 0
    real = worker.blobs.probe

    async def counted() -> None:
        nonlocal probes
        probes += 1
        await real()

    worker.blobs.probe = counted  # type: ignore[method-assign]
    worker.runner.outage.failed(BlobError("s3 down"))
    assert not await worker.run_shard_once()  # probes (storage is back), finds no shard
    assert not await worker.run_shard_once()  # no probe any more
    assert probes == 1 and worker.runner.outage.failures == 0
    assert not [p for p in (tmp_path / "blobs").rglob("*") if p.is_file()]  # the probe left nothing


class HoldSome(Echo):
    """Answers lines 0-9 at once and holds the others until `gate` is set."""

    async def call(self, endpoint: str, body: bytes, *, timeout: float) -> UpstreamResponse:
        req = json.loads(body)
        if int(req["messages"][0]["content"].split()[1]) >= 10:
            assert self.gate is not None
            await self.gate.wait()
        return UpstreamResponse(200, {}, json.dumps({"echo": req}).encode(), "req_1")


async def test_a_shard_that_ended_keeps_its_share_of_lanes_while_its_loop_claims_the_next(
    tmp_path: Path,
) -> None:
    """Two shards split 4 slots 2 and 2. When one ends, its loop claims its next shard at once: the other keeps its
    2 lanes until that claim is answered (had it grown to 4, the new shard would take 2 back a moment later, and on
    an engine without a prompt cache each lane it grew would prefill its group on the slot the first one left);
    a claim that found nothing gives them to it at once."""
    up = HoldSome()
    up.gate = asyncio.Event()
    rig = Rig(tmp_path, up, n=20, shard_lines=10)
    await rig.batch()
    first, second = await rig.claim(), await rig.claim()
    loop = ShardLoop()
    ends = asyncio.create_task(rig.runner.run(first, loop))
    held = asyncio.create_task(rig.runner.run(second))
    assert await ends  # lines 0-9: answered at once
    (other,) = rig.runner._executing
    assert loop.ended is first and other.lanes == 2  # its share waits for the loop's next claim
    rig.runner.handed_on(loop)
    rig.runner.claimed_nothing()
    assert other.lanes == 4  # nothing came: the lanes are its own now
    up.gate.set()
    assert await held
