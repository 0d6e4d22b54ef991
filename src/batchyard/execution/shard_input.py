"""Reading a shard's request lines from its input file: one ranged read for a contiguous shard; for a shard
planned from spans (`domain/planning.py`), nearby spans share a read and a few reads run at once."""

from __future__ import annotations

import asyncio

from batchyard.blobs.base import BlobStore
from batchyard.domain.planning import Span
from batchyard.domain.validation import iter_lines

__all__ = ["read_lines"]

GAP_BYTES = 32 * 1024  # spans this close are read together (the bytes between are read and dropped)
READ_BYTES = 1024 * 1024  # at most this much in one coalesced read
PARALLEL_READS = 8  # coalesced reads in flight at once (bounds memory to ~8 MiB beyond the shard's lines)


def coalesce(spans: tuple[Span, ...]) -> list[tuple[int, int, list[int]]]:
    """Reads to make: ``(start, end, indexes of the spans inside)``, in file order."""
    reads: list[tuple[int, int, list[int]]] = []
    for i in sorted(range(len(spans)), key=lambda k: spans[k].start):
        s = spans[i]
        if reads:
            start, end, inside = reads[-1]
            if s.start - end <= GAP_BYTES and max(end, s.end) - start <= READ_BYTES:
                reads[-1] = (start, max(end, s.end), [*inside, i])
                continue
        reads.append((s.start, s.end, [i]))
    return reads


async def read_lines(blobs: BlobStore, key: str, spans: tuple[Span, ...]) -> list[tuple[int, bytes]]:
    """The shard's ``(line_no, line)`` pairs, span after span (as `iter_lines` numbers them)."""
    if len(spans) == 1:
        s = spans[0]
        return list(iter_lines(await blobs.read_range(key, s.start, s.end), s.first_line))
    pieces: list[bytes] = [b""] * len(spans)
    gate = asyncio.Semaphore(PARALLEL_READS)

    async def read(start: int, end: int, inside: list[int]) -> None:
        async with gate:
            data = await blobs.read_range(key, start, end)
        for i in inside:
            pieces[i] = data[spans[i].start - start : spans[i].end - start]

    try:
        async with asyncio.TaskGroup() as tg:
            for start, end, inside in coalesce(spans):
                tg.create_task(read(start, end, inside))
    except BaseExceptionGroup as group:
        # The first failure itself (a BlobError is an outage to the shard runner, which pauses instead of counting
        # the attempt as failed: wrapped in a group it would count, and storage down would quarantine shards).
        raise group.exceptions[0] from None
    return [pair for s, data in zip(spans, pieces, strict=True) for pair in iter_lines(data, s.first_line)]
