"""A worker full of one owner's shards takes one shard of another owner on top (`Worker.run_guest_shard_once`): a
project arriving behind another starts at once, not after one of the other's shards ends (docs/scheduling.md)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from batchyard.blobs.memory import MemoryBlobStore
from batchyard.config import Settings
from batchyard.domain.models import BatchRecord, FileRecord
from batchyard.domain.states import BatchStatus
from batchyard.execution.worker import Worker
from batchyard.store.memory import MemoryStore
from batchyard.upstreams.base import UpstreamResponse
from batchyard.upstreams.router import Router
from tests.unit.test_worker_loops import CHAT, Echo, jsonl, line


class Held(Echo):
    """Echo, but a request whose body holds "hold" waits until `release` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()

    async def call(self, endpoint: str, body: bytes, *, timeout: float) -> UpstreamResponse:
        if b"hold" in body:
            await self.release.wait()
        return await super().call(endpoint, body, timeout=timeout)


@pytest.fixture
async def parts() -> AsyncIterator[tuple[MemoryStore, MemoryBlobStore, Held, Worker]]:
    store, blobs, up = MemoryStore(), MemoryBlobStore(), Held()
    settings = Settings(  # priority off: no board (it lives beside a data directory this rig has not)
        shard_lines=2, lease_seconds=30.0, poll_interval=0.05, max_shards=2, online_priority="off"
    )
    await store.open()
    yield store, blobs, up, Worker(store, blobs, Router([(None, up)]), settings, name="w1")
    up.release.set()
    await store.close()


async def submit(
    store: MemoryStore, blobs: MemoryBlobStore, worker: Worker, owner: str, text: str, n: int
) -> str:
    rows = [line(i) for i in range(n)]
    for r in rows:
        r["custom_id"] = f"{owner}-{r['custom_id']}"
        r["body"]["messages"][0]["content"] = f"{text} {r['custom_id']}"
    data = jsonl(rows)
    fid, bid = f"file-{owner}", f"batch_{owner}"
    w = await blobs.open_writer(f"files/{fid}")
    await w.write(data)
    await w.commit()
    now = int(await store.now())
    await store.insert_file(
        FileRecord(fid, owner, len(data), now, "in.jsonl", "batch", f"files/{fid}", "0" * 64)
    )
    await store.insert_batch(
        BatchRecord(bid, owner, CHAT, fid, "24h", BatchStatus.VALIDATING, now, now + 86400)
    )
    assert await worker.validate_once()
    return bid


async def test_a_full_worker_takes_one_shard_of_another_owner(
    parts: tuple[MemoryStore, MemoryBlobStore, Held, Worker],
) -> None:
    store, blobs, up, worker = parts
    await submit(store, blobs, worker, "proj_a", "hold", 8)  # 4 shards whose lines wait
    assert not await worker.run_guest_shard_once()  # not full: the regular loops claim
    held = [asyncio.create_task(worker.run_shard_once()) for _ in range(2)]
    while worker.runner.active < 2:  # noqa: ASYNC110 - the two loops claim A's shards
        await asyncio.sleep(0.01)
    assert worker.runner.full() and worker.runner.owners() == {"proj_a"}
    assert not await worker.run_guest_shard_once()  # only A has work: A's shards are not taken as guests
    b = await submit(store, blobs, worker, "proj_b", "go", 2)
    async with asyncio.timeout(10):
        assert await worker.run_guest_shard_once()  # B's shard ran beside A's two, which still wait
    assert all(not t.done() for t in held)
    assert sorted(r["messages"][0]["content"] for r in up.sent) == [
        "go proj_b-r0",
        "go proj_b-r1",
    ]
    assert (await store.get_batch(None, b)) is not None
    up.release.set()
    await asyncio.gather(*held)
