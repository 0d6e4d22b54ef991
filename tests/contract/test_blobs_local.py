"""The local-directory BlobStore's own behaviours (test_blob_contract.py has what every BlobStore does)."""

from __future__ import annotations

import errno
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from batchyard.blobs.base import BlobStore
from batchyard.blobs.local import LocalBlobStore
from batchyard.errors import BlobError, BlobNotFound, BlobStorageFull
from tests.support.blobs import collect, pattern, put, read_all

MIB = 1 << 20


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "blobs"


@pytest.fixture
def blobs(root: Path) -> BlobStore:
    return LocalBlobStore(root)


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir())


# -- delete, exists, keys -------------------------------------------------------------------------------------


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
    await old.abort()  # closes the file whose temp was removed under it
