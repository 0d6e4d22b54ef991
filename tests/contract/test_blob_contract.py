"""BlobStore contract: every test runs on the local directory, on S3 (SeaweedFS) and on the in-memory fake.

What one backend does its own way (fsync, a full disk, S3's multipart uploads and server-side copy, its faults) is in
test_blobs_local.py and test_blobs_s3.py. Each backend here also says what it holds, read past the store
(`Backend.residue`: committed keys, and `pending:<key>` for a writer's unfinished bytes that sit in the storage), so
that "nothing is left behind" is checked on the storage itself.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from batchyard.blobs import local
from batchyard.blobs import s3 as s3_module
from batchyard.blobs.base import BlobInfo, BlobStore, SizeExceeded
from batchyard.blobs.local import LocalBlobStore
from batchyard.blobs.memory import MemoryBlobStore
from batchyard.blobs.s3 import MIN_PART
from batchyard.errors import BlobError, BlobNotFound
from tests.contract.test_blobs_s3 import _store as s3_store
from tests.contract.test_blobs_s3 import listing, pending_uploads
from tests.support.blobs import collect, pattern, put, read_all

MIB = 1 << 20


@dataclass
class Backend:
    name: str
    store: BlobStore
    size_exceeded: type[BlobError]
    residue: Callable[
        [], Awaitable[list[str]]
    ]  # sorted: committed keys, `pending:<key>` for unfinished writes
    raw: Callable[[str], Awaitable[bytes]]  # the bytes stored under a key, read past the store


def _local(tmp_path: Path) -> Backend:
    root = tmp_path / "blobs"
    store = LocalBlobStore(root)

    def scan() -> list[str]:
        found = []
        for p in tmp_path.rglob("*"):  # the root's parent too: nothing may escape the root
            if p.is_dir():
                continue
            rel = (
                p.relative_to(root).as_posix() if root in p.parents else f"outside:{p.relative_to(tmp_path)}"
            )
            if local._is_tmp(p.name):
                rel = "pending:" + rel.rsplit("/", 1)[0] + "/" + p.name[1:].rsplit(".", 2)[0]
            found.append(rel)
        return sorted(found)

    async def residue() -> list[str]:
        return scan()

    async def raw(key: str) -> bytes:
        return (root / key).read_bytes()

    return Backend("local", store, SizeExceeded, residue, raw)


def _memory() -> Backend:
    store = MemoryBlobStore()

    async def residue() -> list[str]:
        return sorted([*store.keys, *(f"pending:{k}" for k in store.pending)])

    async def raw(key: str) -> bytes:
        return store._blobs[key][0]

    return Backend("memory", store, SizeExceeded, residue, raw)


def _s3(store: s3_module.S3BlobStore) -> Backend:
    async def residue() -> list[str]:
        return sorted([*await listing(store), *(f"pending:{k}" for k in await pending_uploads(store))])

    async def raw(key: str) -> bytes:
        s3 = await store.client()
        got = await s3.get_object(Bucket=store.bucket, Key=store.object_key(key))
        async with got["Body"] as body:
            return bytes(await body.read())

    return Backend("s3", store, SizeExceeded, residue, raw)


@pytest.fixture(params=["local", "s3", "memory"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    if request.param == "local":
        yield _local(tmp_path)
    elif request.param == "memory":
        yield _memory()
    else:
        async with s3_store(request.getfixturevalue("seaweed")) as s:
            yield _s3(s)


@pytest.fixture
def blobs(backend: Backend) -> BlobStore:
    return backend.store


def committed(residue: list[str]) -> list[str]:
    return [k for k in residue if not k.startswith("pending:")]


# -- writing --------------------------------------------------------------------------------------------------


async def test_commit_makes_the_blob_visible(backend: Backend, blobs: BlobStore) -> None:
    w = await blobs.open_writer("files/a")
    await w.write(b"hello ")
    await w.write(b"world")
    assert w.size == 11
    assert not await blobs.exists("files/a")
    with pytest.raises(BlobNotFound):
        await blobs.read_range("files/a", 0, 5)
    assert committed(await backend.residue()) == []
    info = await w.commit()
    assert info == BlobInfo("files/a", 11, hashlib.sha256(b"hello world").hexdigest())
    assert await blobs.exists("files/a")
    assert await backend.residue() == ["files/a"]
    assert await backend.raw("files/a") == b"hello world"


@pytest.mark.parametrize(
    "size", [100, 3 * MIB, MIN_PART + 2 * MIB]
)  # kept, flushed, a multipart upload begun
async def test_abort_leaves_nothing(backend: Backend, blobs: BlobStore, size: int) -> None:
    w = await blobs.open_writer("parts/b/0.1.out")
    await w.write(pattern(size, 1))
    await w.abort()
    await w.abort()  # idempotent
    assert not await blobs.exists("parts/b/0.1.out")
    assert await backend.residue() == []
    with pytest.raises(BlobError):
        await w.write(b"more")
    with pytest.raises(BlobError):
        await w.commit()


async def test_abort_keeps_an_earlier_blob(backend: Backend, blobs: BlobStore) -> None:
    await put(blobs, "k", b"old")
    w = await blobs.open_writer("k")
    await w.write(b"new content")
    await w.abort()
    assert await read_all(blobs, "k") == b"old"
    assert await backend.residue() == ["k"]


async def test_abort_after_commit_keeps_the_blob(blobs: BlobStore) -> None:
    w = await blobs.open_writer("k")
    await w.write(b"kept")
    await w.commit()
    await w.abort()
    assert await read_all(blobs, "k") == b"kept"


async def test_commit_replaces_an_earlier_blob(blobs: BlobStore) -> None:
    await put(blobs, "k", b"old old old")
    w = await blobs.open_writer("k")
    await w.write(b"new")
    assert await read_all(blobs, "k") == b"old old old"
    await w.commit()
    assert await read_all(blobs, "k") == b"new"


async def test_a_large_blob_replaced_by_a_small_one(blobs: BlobStore) -> None:
    await put(blobs, "k", pattern(MIN_PART + MIB, 1))
    await put(blobs, "k", b"second")
    assert await read_all(blobs, "k") == b"second"


async def test_empty_blob(blobs: BlobStore) -> None:
    info = await (await blobs.open_writer("empty")).commit()
    assert info == BlobInfo("empty", 0, hashlib.sha256(b"").hexdigest())
    assert await blobs.exists("empty")
    assert await collect(blobs.stream("empty")) == []
    assert await blobs.read_range("empty", 0, 10) == b""


async def test_large_blob_sha_and_size(blobs: BlobStore) -> None:
    data = pattern(11 * MIB + 123, 2)  # more than two S3 parts
    info = await put(blobs, "big", data, chunk=300_001)
    assert info.size == len(data)
    assert info.sha256 == hashlib.sha256(data).hexdigest()
    assert await read_all(blobs, "big") == data


async def test_max_bytes(backend: Backend, blobs: BlobStore) -> None:
    w = await blobs.open_writer("capped", max_bytes=10)
    await w.write(b"12345")
    await w.write(b"67890")  # exactly the cap is fine
    with pytest.raises(backend.size_exceeded) as info:
        await w.write(b"x")
    assert getattr(info.value, "limit", None) == 10
    assert isinstance(info.value, BlobError)
    assert w.size == 10
    await w.abort()
    assert await backend.residue() == []
    with pytest.raises(BlobError):
        await w.commit()


async def test_max_bytes_past_a_flushed_part(backend: Backend, blobs: BlobStore) -> None:
    w = await blobs.open_writer("files/capped", max_bytes=MIN_PART + MIB)
    await w.write(pattern(MIN_PART, 1))  # on the storage by now (flushed, or an S3 part uploaded)
    await w.write(pattern(MIB, 2))  # exactly at the cap: allowed
    with pytest.raises(backend.size_exceeded):
        await w.write(b"x")
    await w.abort()  # the caller's usual cleanup
    assert await backend.residue() == []


async def test_max_bytes_not_exceeded_commits(blobs: BlobStore) -> None:
    w = await blobs.open_writer("capped", max_bytes=10)
    await w.write(b"0123456789")
    assert (await w.commit()).size == 10


async def test_max_bytes_single_large_write(backend: Backend, blobs: BlobStore) -> None:
    w = await blobs.open_writer("capped", max_bytes=MIB)
    with pytest.raises(backend.size_exceeded):
        await w.write(b"x" * (MIB + 1))
    await w.abort()
    assert not await blobs.exists("capped")
    assert await backend.residue() == []


# -- reading --------------------------------------------------------------------------------------------------


async def test_read_range(blobs: BlobStore) -> None:
    data = bytes(range(256)) * 10
    await put(blobs, "r", data)
    assert await blobs.read_range("r", 0, 10) == data[:10]
    assert await blobs.read_range("r", 100, 356) == data[100:356]
    assert await blobs.read_range("r", 2550, 2560) == data[2550:]
    assert await blobs.read_range("r", 2555, 9999) == data[2555:]
    assert await blobs.read_range("r", 2560, 2565) == b""
    assert await blobs.read_range("r", 7, 7) == b""


async def test_read_range_across_parts(blobs: BlobStore) -> None:
    body = pattern(6 * MIB + 10, 5)
    await put(blobs, "in", body)
    assert await blobs.read_range("in", 5 * MIB - 3, 5 * MIB + 3) == body[5 * MIB - 3 : 5 * MIB + 3]
    assert await blobs.read_range("in", len(body) - 4, len(body) + 100) == body[-4:]


async def test_read_range_missing(blobs: BlobStore) -> None:
    with pytest.raises(BlobNotFound):
        await blobs.read_range("nope", 0, 1)
    with pytest.raises(BlobNotFound):
        await blobs.read_range("nope", 3, 3)


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


async def test_compose_in_order(backend: Backend, blobs: BlobStore) -> None:
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
    assert await backend.residue() == sorted([*keys, "files/out"])


async def test_compose_large_parts(backend: Backend, blobs: BlobStore) -> None:
    parts = [pattern(MIN_PART, 1), b"", pattern(MIN_PART + MIB + 1, 2), b"tail\n"]
    for i, p in enumerate(parts):
        await put(blobs, f"parts/{i}", p)
    info = await blobs.compose("files/out", [f"parts/{i}" for i in range(len(parts))])
    whole = b"".join(parts)
    assert (info.size, info.sha256) == (len(whole), hashlib.sha256(whole).hexdigest())
    assert await read_all(blobs, "files/out") == whole
    assert (
        await blobs.read_range("files/out", MIN_PART - 2, MIN_PART + 2) == whole[MIN_PART - 2 : MIN_PART + 2]
    )
    assert await backend.residue() == sorted([*(f"parts/{i}" for i in range(len(parts))), "files/out"])


async def test_compose_reversed_order(blobs: BlobStore) -> None:
    await put(blobs, "a", b"A" * 10)
    await put(blobs, "b", b"B" * 3)
    await blobs.compose("ba", ["b", "a", "b"])
    assert await read_all(blobs, "ba") == b"BBB" + b"A" * 10 + b"BBB"


async def test_compose_one_source_and_no_source(blobs: BlobStore) -> None:
    await put(blobs, "parts/0", b"only")
    assert (await blobs.compose("files/one", ["parts/0"])).sha256 == hashlib.sha256(b"only").hexdigest()
    assert await read_all(blobs, "files/one") == b"only"
    info = await blobs.compose("files/none", [])
    assert (info.size, info.sha256) == (0, hashlib.sha256(b"").hexdigest())
    assert await blobs.exists("files/none")
    assert await read_all(blobs, "files/none") == b""


async def test_compose_replaces(blobs: BlobStore) -> None:
    await put(blobs, "dst", b"previous contents")
    await put(blobs, "a", b"x")
    await blobs.compose("dst", ["a"])
    assert await read_all(blobs, "dst") == b"x"


@pytest.mark.parametrize("size", [1, MIB + 1, MIN_PART + MIB])
async def test_compose_with_a_missing_source_leaves_nothing(
    backend: Backend, blobs: BlobStore, size: int
) -> None:
    await put(blobs, "a", pattern(size, 4))
    with pytest.raises(BlobNotFound):
        await blobs.compose("out", ["a", "missing"])
    assert not await blobs.exists("out")
    assert await backend.residue() == ["a"]


# -- delete, exists, keys -------------------------------------------------------------------------------------


async def test_delete_is_idempotent(backend: Backend, blobs: BlobStore) -> None:
    await put(blobs, "d/x", b"1")
    assert await blobs.exists("d/x")
    await blobs.delete("d/x")
    assert not await blobs.exists("d/x")
    await blobs.delete("d/x")
    await blobs.delete("never/was")
    assert await backend.residue() == []


async def test_nested_keys(backend: Backend, blobs: BlobStore) -> None:
    await put(blobs, "parts/batch_1/0.1.out", b"o")
    await put(blobs, "parts/batch_1/0.1.err", b"e")
    assert await backend.residue() == ["parts/batch_1/0.1.err", "parts/batch_1/0.1.out"]


BAD_KEYS = [
    *["../x", "/abs", "a/../b", "a/..", "..", ".", "a/./b", "a//b", "trailing/", ""],
    *["with space", "tab\tkey", "a\nb", "uni\u00e9", "a\\b", "x;y"],
]


@pytest.mark.parametrize("key", BAD_KEYS)
async def test_invalid_keys(backend: Backend, blobs: BlobStore, key: str) -> None:
    await put(blobs, "good", b"x")
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
    with pytest.raises(BlobError):
        await blobs.compose(key, ["good"])
    with pytest.raises(BlobError):
        await blobs.compose("out", ["good", key])
    assert await backend.residue() == ["good"]


# -- listing, abandoned writes --------------------------------------------------------------------------------


async def test_list_keys(backend: Backend, blobs: BlobStore) -> None:
    keys = ["parts/b1/0.1.out", "parts/b1/0.1.err", "parts/b2/0.1.out", "files/f1", "filesx", "top"]
    before = time.time()
    for key in keys:
        await put(blobs, key, b"x")
    pending = await blobs.open_writer("parts/b1/1.1.out")  # never listed before its commit
    await pending.write(pattern(MIN_PART + 1, 1))

    async def keys_under(prefix: str) -> list[str]:
        return sorted([k async for k, _ in blobs.list_keys(prefix)])

    assert await keys_under("parts/") == ["parts/b1/0.1.err", "parts/b1/0.1.out", "parts/b2/0.1.out"]
    assert await keys_under("parts/b1/") == ["parts/b1/0.1.err", "parts/b1/0.1.out"]
    assert await keys_under("files") == ["files/f1", "filesx"]
    assert await keys_under("") == sorted(keys)
    assert await keys_under("nothing/") == []
    mtimes = [m async for _, m in blobs.list_keys("")]
    skew = 60 if backend.name == "s3" else 1  # the S3 server's clock, not ours
    assert all(before - 60 < m <= time.time() + skew for m in mtimes)
    await pending.abort()


async def test_remove_abandoned_writes_takes_only_unfinished_writes(
    backend: Backend, blobs: BlobStore
) -> None:
    await put(blobs, "files/kept", b"k")
    w = await blobs.open_writer("parts/b/0.1.out")
    await w.write(pattern(MIN_PART + 1, 1))  # on the storage by now
    assert await backend.residue() == ["files/kept", "pending:parts/b/0.1.out"]
    assert await blobs.remove_abandoned_writes(time.time() - 3600) == 0  # written just now: left alone
    assert await backend.residue() == ["files/kept", "pending:parts/b/0.1.out"]
    assert await blobs.remove_abandoned_writes(time.time() + 60) == 1  # as if an hour had passed
    assert await backend.residue() == ["files/kept"]
    assert await blobs.remove_abandoned_writes(time.time() + 60) == 0  # committed blobs are never touched
    assert await read_all(blobs, "files/kept") == b"k"
    await w.abort()  # its owner gives up too (in life it is gone: a crashed process)
    assert await backend.residue() == ["files/kept"]


async def test_probe(backend: Backend, blobs: BlobStore) -> None:
    await blobs.probe()
    assert await backend.residue() == []
