"""A planned shard's lines read back from its spans (execution/shard_input.py) over a real local blob store."""

from __future__ import annotations

import random
from pathlib import Path

import orjson
import pytest

from batchyard.blobs.local import LocalBlobStore
from batchyard.domain.planning import Span
from batchyard.domain.validation import BatchValidator, iter_lines
from batchyard.errors import BlobUnavailable
from batchyard.execution import shard_input
from batchyard.execution.containment import is_outage
from batchyard.execution.shard_input import coalesce, read_lines


class CountingStore(LocalBlobStore):
    reads = 0

    async def read_range(self, key: str, start: int, end: int) -> bytes:
        self.reads += 1
        return await super().read_range(key, start, end)


async def put(store: LocalBlobStore, key: str, data: bytes) -> None:
    w = await store.open_writer(key)
    await w.write(data)
    await w.commit()


def line(i: int, system: str, pad: int) -> bytes:
    body = {
        "model": "m",
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": "x" * pad}],
    }
    return orjson.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions", "body": body})


async def test_every_planned_shard_reads_back_its_lines_with_their_numbers(tmp_path: Path) -> None:
    rng = random.Random(3)
    # lines of 0.1-60 KB: some spans sit close (one read), some far apart (their own read)
    rows = [line(i, f"S{rng.randrange(3)}", rng.choice([100, 2000, 60000])) for i in range(300)]
    data = b"\n".join(rows) + b"\n"
    store = CountingStore(tmp_path)
    await put(store, "in", data)
    v = BatchValidator("/v1/chat/completions", lambda m: True, shard_lines=50, prefix_planning=True)
    v.feed(data)
    shards = v.finish().shards
    assert any(len(s.spans) > 1 for s in shards)
    got = []
    for s in shards:
        before = store.reads
        pairs = await read_lines(store, "in", s.ranges())
        assert len(pairs) == s.line_count
        assert store.reads - before == len(coalesce(s.ranges())) <= len(s.ranges())
        got += pairs
    assert sorted(got) == list(iter_lines(data, 1))


class DownStore(LocalBlobStore):
    async def read_range(self, key: str, start: int, end: int) -> bytes:
        raise BlobUnavailable("storage is down")


async def test_storage_down_raises_the_blob_error_itself_not_a_group(tmp_path: Path) -> None:
    # the shard runner tells an outage (pause, not counted) from a failure (counted, quarantined after 3) by type
    spans = (Span(0, 10, 1), Span(10 * 1024 * 1024, 10 * 1024 * 1024 + 10, 9))  # two reads
    with pytest.raises(BlobUnavailable):
        await read_lines(DownStore(tmp_path), "in", spans)
    assert is_outage(BlobUnavailable("x"))


def test_coalescing_joins_near_spans_and_bounds_each_read() -> None:
    gap, cap = shard_input.GAP_BYTES, shard_input.READ_BYTES
    spans = (Span(0, 10, 1), Span(10 + gap, 20 + gap, 5), Span(40 + 2 * gap + 1, 50 + 2 * gap + 1, 9))
    assert [(a, b, i) for a, b, i in coalesce(spans)] == [
        (0, 20 + gap, [0, 1]),
        (40 + 2 * gap + 1, 50 + 2 * gap + 1, [2]),
    ]
    big = (Span(0, cap - 10, 1), Span(cap - 5, cap + 5, 2))
    assert len(coalesce(big)) == 2  # one read would pass READ_BYTES
    unsorted = (Span(100, 110, 7), Span(0, 10, 1))
    assert coalesce(unsorted) == [(0, 110, [1, 0])]
