"""The worker's jobs and loops (execution/jobs.py, execution/worker.py) over the in-memory metadata store, the
in-memory blob store and an upstream object that answers in process: validation plans shards or fails the batch,
shards run, the finalizer composes the output and error files and removes the parts, and `Worker.run` takes a batch
from submitted to completed by itself."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from batchyard.blobs.memory import MemoryBlobStore
from batchyard.config import Settings
from batchyard.domain.models import BatchRecord, FileRecord
from batchyard.domain.states import BatchStatus
from batchyard.execution.jobs import derived_file_id
from batchyard.execution.worker import Worker
from batchyard.store.memory import MemoryStore
from batchyard.upstreams.base import Upstream, UpstreamResponse
from batchyard.upstreams.router import Router

CHAT = "/v1/chat/completions"
OWNER = "key-a"


class Echo(Upstream):
    """Answers every request with its own body, or 400 for a body that names `refuse`."""

    def __init__(self, refuse: str | None = None) -> None:
        self.name = "echo"
        self.refuse = refuse
        self.sent: list[dict[str, Any]] = []

    async def call(self, endpoint: str, body: bytes, *, timeout: float) -> UpstreamResponse:
        req = json.loads(body)
        self.sent.append(req)
        if self.refuse is not None and self.refuse in body.decode():
            return UpstreamResponse(
                400, {}, b'{"error": {"message": "refused", "type": "invalid_request_error"}}', "req_x"
            )
        return UpstreamResponse(200, {}, json.dumps({"echo": req}).encode(), "req_1")


def line(i: int, model: str = "m") -> dict[str, Any]:
    return {
        "custom_id": f"r{i}",
        "method": "POST",
        "url": CHAT,
        "body": {"model": model, "messages": [{"role": "user", "content": f"line {i}"}]},
    }


def jsonl(rows: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


class Rig:
    def __init__(
        self, upstream: Echo, *, routes: list[str | None] | None = None, shard_lines: int = 4
    ) -> None:
        self.store = MemoryStore()
        self.blobs = MemoryBlobStore()
        self.upstream = upstream
        self.settings = (
            Settings(  # priority off: no board (it lives beside a data directory this rig has not)
                shard_lines=shard_lines,
                lease_seconds=30.0,
                poll_interval=0.05,
                max_shards=2,
                online_priority="off",
            )
        )
        router = Router([(r, upstream) for r in (routes or [None])])
        self.worker = Worker(self.store, self.blobs, router, self.settings, name="w1")

    async def submit(self, data: bytes, *, purpose: str = "batch", blob: bool = True) -> str:
        key = "files/file-in"
        if blob:
            w = await self.blobs.open_writer(key)
            await w.write(data)
            await w.commit()
        now = int(await self.store.now())
        await self.store.insert_file(
            FileRecord("file-in", OWNER, len(data), now, "in.jsonl", purpose, key, "0" * 64)
        )
        batch = BatchRecord(
            id="batch_1",
            owner=OWNER,
            endpoint=CHAT,
            input_file_id="file-in",
            completion_window="24h",
            status=BatchStatus.VALIDATING,
            created_at=now,
            expires_at=now + 86400,
        )
        await self.store.insert_batch(batch)
        return batch.id

    async def batch(self) -> BatchRecord:
        b = await self.store.get_batch(None, "batch_1")
        assert b is not None
        return b

    async def file_lines(self, file_id: str | None) -> list[dict[str, Any]]:
        assert file_id is not None
        f = await self.store.get_file(OWNER, file_id)
        assert f is not None and f.purpose == "batch_output"
        data = b"".join([c async for c in self.blobs.stream(f.blob_key)])
        assert (f.bytes, f.blob_key) == (len(data), f"files/{file_id}")
        return [json.loads(x) for x in data.splitlines()]


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    r = Rig(Echo(refuse="line 5"))
    await r.store.open()
    yield r
    await r.store.close()


# -- validation ----------------------------------------------------------------------------------------------


async def test_validation_plans_shards(rig: Rig) -> None:
    await rig.submit(jsonl([line(i) for i in range(10)]))
    assert await rig.worker.validate_once()
    b = await rig.batch()
    assert b.status == BatchStatus.IN_PROGRESS
    claims = []
    while (c := await rig.store.claim_shard("w2", 30)) is not None:
        claims.append(c)
    assert [c.shard.index for c in claims] == [0, 1, 2]  # 4 + 4 + 2 lines
    assert not await rig.worker.validate_once()  # nothing left to validate
    assert rig.upstream.sent == []  # validation sends nothing


async def test_bad_lines_fail_the_batch_with_line_numbers(rig: Rig) -> None:
    await rig.submit(jsonl([line(0), line(1)]) + b"not json\n" + jsonl([line(1)]))
    assert await rig.worker.validate_once()
    b = await rig.batch()
    assert b.status == BatchStatus.FAILED and b.errors
    assert [e["line"] for e in b.errors] == [3, 4]
    assert await rig.store.claim_shard("w2", 30) is None


async def test_an_unroutable_model_fails_the_batch() -> None:
    r = Rig(Echo(), routes=["only-this"])
    await r.store.open()
    await r.submit(jsonl([line(0, model="only-this"), line(1, model="other")]))
    assert await r.worker.validate_once()
    b = await r.batch()
    await r.store.close()
    assert b.status == BatchStatus.FAILED and b.errors
    assert [(e["line"], e["param"]) for e in b.errors] == [(2, "body.model")]


@pytest.mark.parametrize(
    ("purpose", "blob", "says"), [("assistants", True, "purpose 'batch'"), ("batch", False, "has no content")]
)
async def test_an_unusable_input_file_fails_the_batch(rig: Rig, purpose: str, blob: bool, says: str) -> None:
    await rig.submit(jsonl([line(0)]), purpose=purpose, blob=blob)
    assert await rig.worker.validate_once()
    b = await rig.batch()
    assert b.status == BatchStatus.FAILED and b.errors
    (err,) = b.errors
    assert err["code"] == "invalid_request" and says in err["message"]


# -- shards and finalization, one step at a time ------------------------------------------------------------


async def test_steps_take_a_batch_to_completed(rig: Rig) -> None:
    await rig.submit(jsonl([line(i) for i in range(10)]))
    assert await rig.worker.validate_once()
    assert not await rig.worker.finalize_once()  # shards still to run
    for _ in range(3):
        assert await rig.worker.run_shard_once()
    assert not await rig.worker.run_shard_once()
    assert await rig.worker.finalize_once()
    b = await rig.batch()
    assert b.status == BatchStatus.COMPLETED
    assert (b.output_file_id, b.error_file_id) == (
        derived_file_id(b.id, "output"),
        derived_file_id(b.id, "error"),
    )
    out = await rig.file_lines(b.output_file_id)
    err = await rig.file_lines(b.error_file_id)
    assert [x["custom_id"] for x in out] == [f"r{i}" for i in range(10) if i != 5]  # in input order
    assert [x["response"]["body"]["echo"]["messages"][0]["content"] for x in out][:2] == ["line 0", "line 1"]
    ((bad),) = err
    assert bad["custom_id"] == "r5" and bad["response"]["status_code"] == 400
    # the parts are gone: what is left is the input and the two files
    assert rig.blobs.keys == sorted(
        ["files/file-in", f"files/{b.output_file_id}", f"files/{b.error_file_id}"]
    )
    assert rig.blobs.pending == []
    assert len(rig.upstream.sent) == 10


async def test_a_cancel_while_validating_ends_cancelled_with_nothing_sent(rig: Rig) -> None:
    await rig.submit(jsonl([line(i) for i in range(6)]))
    assert await rig.store.request_cancel(OWNER, "batch_1") is not None
    assert await rig.worker.validate_once()
    while await rig.worker.run_shard_once():
        pass
    while await rig.worker.finalize_once():
        pass
    b = await rig.batch()
    assert b.status == BatchStatus.CANCELLED
    assert rig.upstream.sent == []
    err = await rig.file_lines(b.error_file_id)
    assert sorted(x["custom_id"] for x in err) == [f"r{i}" for i in range(6)]
    assert {x["error"]["code"] for x in err} == {"batch_cancelled"}


# -- Worker.run: the loops together ---------------------------------------------------------------------------


async def test_the_worker_runs_a_batch_by_itself(rig: Rig) -> None:
    await rig.submit(jsonl([line(i) for i in range(10)]))
    task = asyncio.create_task(rig.worker.run())
    try:
        async with asyncio.timeout(20):
            while (await rig.batch()).status != BatchStatus.COMPLETED:  # noqa: ASYNC110 - polling the store, as a client does
                await asyncio.sleep(0.02)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    b = await rig.batch()
    assert len(await rig.file_lines(b.output_file_id)) == 9
    assert len(await rig.file_lines(b.error_file_id)) == 1
    assert rig.blobs.pending == []
