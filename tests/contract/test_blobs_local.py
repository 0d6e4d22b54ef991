"""BlobStore contract, run against the local-directory store."""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from batchyard.blobs.base import BlobInfo, BlobStore
from batchyard.blobs.local import LocalBlobStore, SizeExceeded
from batchyard.errors import BlobError, BlobNotFound

MIB = 1 << 20


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "blobs"


@pytest.fixture
def blobs(root: Path) -> BlobStore:
    return LocalBlobStore(root)


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir())


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


# -- writing --------------------------------------------------------------------------------------------------


async def test_commit_makes_the_blob_visible(blobs: BlobStore, root: Path) -> None:
    w = await blobs.open_writer("files/a")
    await w.write(b"hello ")
    await w.write(b"world")
    assert w.size == 11
    assert not await blobs.exists("files/a")
    with pytest.raises(BlobNotFound):
        await blobs.read_range("files/a", 0, 5)
    assert files_under(root) != ["files/a"]
    info = await w.commit()
    assert info == BlobInfo("files/a", 11, hashlib.sha256(b"hello world").hexdigest())
    assert await blobs.exists("files/a")
    assert files_under(root) == ["files/a"]
    assert (root / "files" / "a").read_bytes() == b"hello world"


async def test_abort_leaves_nothing(blobs: BlobStore, root: Path) -> None:
    w = await blobs.open_writer("files/b")
    await w.write(pattern(3 * MIB, 1))  # past the flush threshold: bytes reached the disk
    await w.abort()
    assert not await blobs.exists("files/b")
    assert files_under(root) == []


async def test_abort_keeps_an_earlier_blob(blobs: BlobStore, root: Path) -> None:
    await put(blobs, "k", b"old")
    w = await blobs.open_writer("k")
    await w.write(b"new content")
    await w.abort()
    assert await read_all(blobs, "k") == b"old"
    assert files_under(root) == ["k"]


async def test_commit_replaces_an_earlier_blob(blobs: BlobStore) -> None:
    await put(blobs, "k", b"old old old")
    w = await blobs.open_writer("k")
    await w.write(b"new")
    assert await read_all(blobs, "k") == b"old old old"
    await w.commit()
    assert await read_all(blobs, "k") == b"new"


async def test_empty_blob(blobs: BlobStore) -> None:
    info = await (await blobs.open_writer("empty")).commit()
    assert info == BlobInfo("empty", 0, hashlib.sha256(b"").hexdigest())
    assert await blobs.exists("empty")
    assert await collect(blobs.stream("empty")) == []
    assert await blobs.read_range("empty", 0, 10) == b""


async def test_large_blob_sha_and_size(blobs: BlobStore) -> None:
    data = pattern(5 * MIB + 123, 2)
    info = await put(blobs, "big", data, chunk=300_001)
    assert info.size == len(data)
    assert info.sha256 == hashlib.sha256(data).hexdigest()
    assert await read_all(blobs, "big") == data


async def test_max_bytes(blobs: BlobStore, root: Path) -> None:
    w = await blobs.open_writer("capped", max_bytes=10)
    await w.write(b"12345")
    await w.write(b"67890")  # exactly the cap is fine
    with pytest.raises(SizeExceeded) as info:
        await w.write(b"x")
    assert info.value.limit == 10
    assert isinstance(info.value, BlobError)
    assert w.size == 10
    await w.abort()
    assert files_under(root) == []


async def test_max_bytes_not_exceeded_commits(blobs: BlobStore) -> None:
    w = await blobs.open_writer("capped", max_bytes=10)
    await w.write(b"0123456789")
    assert (await w.commit()).size == 10


async def test_max_bytes_single_large_write(blobs: BlobStore) -> None:
    w = await blobs.open_writer("capped", max_bytes=MIB)
    with pytest.raises(SizeExceeded):
        await w.write(b"x" * (MIB + 1))
    await w.abort()
    assert not await blobs.exists("capped")


# -- reading --------------------------------------------------------------------------------------------------


async def test_read_range(blobs: BlobStore) -> None:
    data = bytes(range(256)) * 10
    await put(blobs, "r", data)
    assert await blobs.read_range("r", 0, 10) == data[:10]
    assert await blobs.read_range("r", 100, 356) == data[100:356]
    assert await blobs.read_range("r", 2550, 2560) == data[2550:]
    assert await blobs.read_range("r", 2555, 9999) == data[2555:]
    assert await blobs.read_range("r", 7, 7) == b""


async def test_read_range_missing(blobs: BlobStore) -> None:
    with pytest.raises(BlobNotFound):
        await blobs.read_range("nope", 0, 1)


async def test_stream_in_chunks(blobs: BlobStore) -> None:
    data = pattern(2 * MIB + 5, 3)
    await put(blobs, "s", data)
    chunks = await collect(blobs.stream("s"))
    assert [len(c) for c in chunks] == [MIB, MIB, 5]
    assert b"".join(chunks) == data
    small = await collect(blobs.stream("s", chunk_size=1000))
    assert all(len(c) == 1000 for c in small[:-1])
    assert b"".join(small) == data


async def test_stream_missing(blobs: BlobStore) -> None:
    with pytest.raises(BlobNotFound):
        await collect(blobs.stream("nope"))


# -- compose --------------------------------------------------------------------------------------------------


async def test_compose_in_order(blobs: BlobStore, root: Path) -> None:
    parts = [pattern(MIB + 17, 10), b"", pattern(2 * MIB + 3, 11), b"tail\n", pattern(700_000, 12)]
    keys = [f"parts/b1/{i}.out" for i in range(len(parts))]
    for key, data in zip(keys, parts, strict=True):
        await put(blobs, key, data)
    whole = b"".join(parts)
    info = await blobs.compose("files/out", keys)
    assert info == BlobInfo("files/out", len(whole), hashlib.sha256(whole).hexdigest())
    assert await read_all(blobs, "files/out") == whole
    # sources are left alone
    for key, data in zip(keys, parts, strict=True):
        assert await read_all(blobs, key) == data
    assert not [n for n in files_under(root) if n.endswith(".tmp")]


async def test_compose_reversed_order(blobs: BlobStore) -> None:
    await put(blobs, "a", b"A" * 10)
    await put(blobs, "b", b"B" * 3)
    await blobs.compose("ba", ["b", "a", "b"])
    assert await read_all(blobs, "ba") == b"BBB" + b"A" * 10 + b"BBB"


async def test_compose_nothing_is_empty(blobs: BlobStore) -> None:
    info = await blobs.compose("none", [])
    assert info.size == 0
    assert await blobs.exists("none")


async def test_compose_replaces(blobs: BlobStore) -> None:
    await put(blobs, "dst", b"previous contents")
    await put(blobs, "a", b"x")
    await blobs.compose("dst", ["a"])
    assert await read_all(blobs, "dst") == b"x"


async def test_compose_with_a_missing_source_leaves_nothing(blobs: BlobStore, root: Path) -> None:
    await put(blobs, "a", pattern(MIB + 1, 4))
    with pytest.raises(BlobNotFound):
        await blobs.compose("out", ["a", "missing"])
    assert not await blobs.exists("out")
    assert files_under(root) == ["a"]


# -- delete, exists, keys -------------------------------------------------------------------------------------


async def test_delete_is_idempotent(blobs: BlobStore, root: Path) -> None:
    await put(blobs, "d/x", b"1")
    await blobs.delete("d/x")
    assert not await blobs.exists("d/x")
    await blobs.delete("d/x")
    await blobs.delete("never/was")
    assert files_under(root) == []


async def test_nested_keys(blobs: BlobStore, root: Path) -> None:
    await put(blobs, "parts/batch_1/0.1.out", b"o")
    await put(blobs, "parts/batch_1/0.1.err", b"e")
    assert files_under(root) == ["parts/batch_1/0.1.err", "parts/batch_1/0.1.out"]


@pytest.mark.parametrize(
    "key", ["../x", "/abs", "a/../b", "a/..", "..", "with space", "tab\tkey", "", "uni\u00e9", "a\\b", "x;y"]
)
async def test_invalid_keys(blobs: BlobStore, root: Path, key: str) -> None:
    with pytest.raises(BlobError):
        await blobs.open_writer(key)
    with pytest.raises(BlobError):
        await blobs.read_range(key, 0, 1)
    with pytest.raises(BlobError):
        await collect(blobs.stream(key))
    with pytest.raises(BlobError):
        await blobs.delete(key)
    with pytest.raises(BlobError):
        await blobs.exists(key)
    with pytest.raises(BlobError):
        await blobs.compose(key, [])
    assert files_under(root.parent) == []


async def test_dot_key_is_invalid(blobs: BlobStore, root: Path) -> None:
    try:
        with pytest.raises(BlobError):
            w = await blobs.open_writer(".")
            await w.abort()
    finally:
        for stray in root.parent.glob(".*.tmp"):
            os.unlink(stray)
