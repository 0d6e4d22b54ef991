"""Helpers the blob store tests share."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator

from batchyard.blobs.base import BlobInfo, BlobStore


def pattern(n: int, seed: int) -> bytes:
    """n bytes that differ from one offset to the next and from one seed to the next."""
    block = hashlib.sha256(seed.to_bytes(4, "big")).digest() * 4096
    return (block * (n // len(block) + 1))[:n]


async def put(blobs: BlobStore, key: str, data: bytes, chunk: int = 65536) -> BlobInfo:
    w = await blobs.open_writer(key)
    for i in range(0, len(data), chunk):
        await w.write(data[i : i + chunk])
    return await w.commit()


async def collect(it: AsyncIterator[bytes]) -> list[bytes]:
    return [c async for c in it]


async def read_all(blobs: BlobStore, key: str) -> bytes:
    return b"".join(await collect(blobs.stream(key)))
