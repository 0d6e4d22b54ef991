"""BlobStore contract, run against the local-directory store."""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from batchyard.blobs.base import BlobInfo, BlobStore
from batchyard.blobs.local import LocalBlobStore, SizeExceeded
from batchyard.errors import BlobError, BlobNotFound, BlobStorageFull

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


# -- faults: every OSError is a BlobError; a failed writer leaves nothing ------------------------------------


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs (we run as root in CI); skipped where mounting is not allowed."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {made.stderr.decode(errors='replace').strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


async def test_disk_full_while_writing_is_storage_full_and_leaves_nothing(tiny_disk: Path) -> None:
    blobs = LocalBlobStore(tiny_disk / "blobs")
    w = await blobs.open_writer("parts/b/000000.1.out")
    with pytest.raises(BlobStorageFull) as caught:
        for _ in range(4):
            await w.write(pattern(MIB, 5))  # each MiB is flushed to the (1 MiB) disk
        await w.commit()
    assert caught.value.errno == errno.ENOSPC
    assert isinstance(caught.value, BlobError)
    assert files_under(tiny_disk) == []  # the writer removed its temp file itself
    await w.abort()  # and a second abort is harmless
    with pytest.raises(BlobError):
        await w.write(b"more")


async def test_disk_full_at_commit_is_storage_full_and_keeps_the_earlier_blob(tiny_disk: Path) -> None:
    blobs = LocalBlobStore(tiny_disk / "blobs")
    await put(blobs, "files/f", b"old")
    w = await blobs.open_writer("files/f")
    await w.write(pattern(MIB - 1, 6))  # stays in the writer's buffer until commit
    with pytest.raises(BlobStorageFull):
        await w.commit()
    assert files_under(tiny_disk / "blobs") == ["files/f"]
    assert await read_all(blobs, "files/f") == b"old"
    # the disk is usable again once the failed write is gone
    assert (await put(blobs, "files/g", b"fits")).size == 4


async def test_disk_full_during_compose_leaves_nothing(tiny_disk: Path) -> None:
    blobs = LocalBlobStore(tiny_disk / "blobs")
    await put(blobs, "a", pattern(400_000, 7))
    await put(blobs, "b", pattern(400_000, 8))
    with pytest.raises(BlobStorageFull):
        await blobs.compose("out", ["a", "b"])
    assert files_under(tiny_disk / "blobs") == ["a", "b"]


async def test_a_writer_that_cannot_be_opened_is_a_blob_error(blobs: BlobStore, root: Path) -> None:
    await put(blobs, "dir/x", b"1")
    with pytest.raises(BlobError) as caught:
        await blobs.open_writer("dir/x/y")  # "dir/x" is a blob, not a folder: mkdir fails with an OSError
    assert not isinstance(caught.value, BlobNotFound)
    assert files_under(root) == ["dir/x"]


async def test_abort_removes_the_temp_file_even_when_close_fails(blobs: BlobStore, root: Path) -> None:
    w = await blobs.open_writer("files/c")
    await w.write(b"buffered")
    fh = w._fh  # type: ignore[attr-defined]

    def failing_close() -> None:
        raise OSError(errno.EIO, "injected: close failed")

    original = fh.close
    fh.close = failing_close
    try:
        await w.abort()
    finally:
        original()
    assert files_under(root) == []


async def test_reading_a_folder_is_a_blob_error(blobs: BlobStore, root: Path) -> None:
    await put(blobs, "dir/x", b"1")
    with pytest.raises(BlobError) as caught:
        await blobs.read_range("dir", 0, 1)
    assert not isinstance(caught.value, BlobNotFound)
    with pytest.raises(BlobError):
        await collect(blobs.stream("dir"))


async def test_commit_fsyncs_the_file_and_its_folder(
    blobs: BlobStore, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    await put(blobs, "parts/b9/000001.1.out", b"data")
    blob_dir = str(root / "parts" / "b9")
    # the temp file, then the folder holding the renamed blob; the new folders' parents when they were made
    assert synced[-1] == blob_dir
    assert any(s.endswith(".tmp") for s in synced)
    assert str(root / "parts") in synced and str(root) in synced
    synced.clear()
    await blobs.compose("files/out", ["parts/b9/000001.1.out"])
    assert synced[-1] == str(root / "files")


# -- listing, abandoned writes --------------------------------------------------------------------------------


async def test_list_keys(blobs: BlobStore, root: Path) -> None:
    for key in ["parts/b1/0.1.out", "parts/b1/0.1.err", "parts/b2/0.1.out", "files/f1", "filesx", "top"]:
        await put(blobs, key, b"x")
    pending = await blobs.open_writer("parts/b1/1.1.out")  # never listed before its commit
    await pending.write(b"not yet")
    before = time.time()

    async def keys(prefix: str) -> list[str]:
        return sorted([k async for k, _ in blobs.list_keys(prefix)])

    assert await keys("parts/") == ["parts/b1/0.1.err", "parts/b1/0.1.out", "parts/b2/0.1.out"]
    assert await keys("parts/b1/") == ["parts/b1/0.1.err", "parts/b1/0.1.out"]
    assert await keys("files") == ["files/f1", "filesx"]
    assert await keys("") == sorted(
        ["parts/b1/0.1.out", "parts/b1/0.1.err", "parts/b2/0.1.out", "files/f1", "filesx", "top"]
    )
    assert await keys("nothing/") == []
    mtimes = [m async for _, m in blobs.list_keys("")]
    assert all(before - 60 < m <= before + 1 for m in mtimes)
    await pending.abort()


async def test_remove_abandoned_writes_takes_only_old_temp_files(blobs: BlobStore, root: Path) -> None:
    await put(blobs, "files/kept", b"k")
    old = await blobs.open_writer("parts/b/0.1.out")
    await old.write(pattern(2 * MIB, 1))  # on disk by now
    live = await blobs.open_writer("parts/b/1.1.out")
    await live.write(pattern(2 * MIB, 2))
    stale = [root / n for n in files_under(root) if n.endswith(".tmp") and "0.1.out" in n]
    an_hour_ago = time.time() - 3600
    os.utime(stale[0], (an_hour_ago - 10, an_hour_ago - 10))  # as a writer that crashed an hour ago left it
    assert await blobs.remove_abandoned_writes(an_hour_ago) == 1
    left = files_under(root)
    assert "files/kept" in left and not any("0.1.out" in n for n in left)
    assert (await live.commit()).size == 2 * MIB
    assert await blobs.remove_abandoned_writes(time.time() + 1) == 0  # committed blobs are never touched
    assert files_under(root) == ["files/kept", "parts/b/1.1.out"]
