"""The sweeper on real stores (SQLite + a local blob directory): what it removes, and what it never touches."""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from batchyard.blobs.local import LocalBlobStore
from batchyard.config import Settings
from batchyard.domain.models import BatchRecord, FileRecord, UploadPartRecord, UploadRecord
from batchyard.domain.states import BatchStatus
from batchyard.execution.sweeper import CONFIRM_AFTER, ORPHAN_AGE, ORPHAN_INTERVAL, Sweeper
from batchyard.execution.worker import Worker
from batchyard.store.sqlite import SQLiteStore
from batchyard.upstreams.router import Router

OWNER = "key_sweep"
LINE = b'{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "m", "messages": []}}\n'


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    s = SQLiteStore(tmp_path / "meta.sqlite3")
    await s.open()
    yield s
    await s.close()


@pytest.fixture
def blobs(tmp_path: Path) -> LocalBlobStore:
    return LocalBlobStore(tmp_path / "blobs")


async def put(blobs: LocalBlobStore, key: str, data: bytes = b"x\n") -> None:
    w = await blobs.open_writer(key)
    await w.write(data)
    await w.commit()


async def add_file(store: SQLiteStore, blobs: LocalBlobStore, fid: str) -> FileRecord:
    await put(blobs, f"files/{fid}", LINE)
    f = FileRecord(fid, OWNER, len(LINE), int(time.time()), "in.jsonl", "batch", f"files/{fid}")
    await store.insert_file(f)
    return f


async def add_batch(store: SQLiteStore, bid: str, fid: str) -> BatchRecord:
    now = int(time.time())
    b = BatchRecord(bid, OWNER, "/v1/chat/completions", fid, "24h", BatchStatus.VALIDATING, now, now + 86400)
    await store.insert_batch(b)
    return b


def worker(store: SQLiteStore, blobs: LocalBlobStore, tmp_path: Path) -> Worker:
    return Worker(store, blobs, Router([]), Settings(data_dir=tmp_path))


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


async def test_orphans_go_and_everything_referenced_stays(
    store: SQLiteStore, blobs: LocalBlobStore, tmp_path: Path
) -> None:
    kept = await add_file(store, blobs, "file-kept")
    await add_batch(store, "batch_live", kept.id)
    await add_batch(store, "batch_done", kept.id)
    job = await store.claim_validation("v", 30)
    assert job is not None and job.batch.id == "batch_live"
    await store.plan_batch("batch_live", "v", [], 0, None)  # in_progress: its parts are being written
    job = await store.claim_validation("v", 30)
    assert job is not None and job.batch.id == "batch_done"
    await store.fail_batch("batch_done", "v", [{"code": "x", "message": "m", "param": None, "line": None}])
    for key in (
        "parts/batch_live/000000.1.out",
        "parts/batch_done/000000.1.out",
        "parts/batch_gone/000003.2.err",
    ):
        await put(blobs, key)
    await put(blobs, "files/file-rowless")  # the crash came between the blob's commit and its row
    pending = UploadRecord("upload_p", OWNER, "f", "batch", 10, "text/plain", 0, int(time.time()) + 3600)
    ended = UploadRecord("upload_e", OWNER, "f", "batch", 10, "text/plain", 0, int(time.time()) + 3600)
    for u in (pending, ended):
        await store.insert_upload(u)
        await put(blobs, f"uploads/{u.id}/part_1")
        await store.insert_upload_part(
            UploadPartRecord(f"part_1{u.id}", u.id, 2, f"uploads/{u.id}/part_1", 0)
        )
    assert await store.finish_upload(
        OWNER, ended.id, "cancelled", None
    )  # its part's removal failed: left over
    crashed = await blobs.open_writer("parts/batch_done/000001.1.out")
    await crashed.write(b"y" * (2 << 20))  # on disk as a temp file, never committed
    everything = files_under(blobs.root)

    sweeper = Sweeper(store, blobs)
    now = time.time()
    young = await sweeper.sweep(now)  # nothing is an hour old yet
    assert young.removed == 0 and young.orphans_suspected == 0
    assert files_under(blobs.root) == everything

    later = now + ORPHAN_AGE + 60
    first = await sweeper.sweep(later)
    assert first.orphans == 0 and first.orphans_suspected == 4  # seen once: not yet removed
    assert first.abandoned_writes == 1
    second = await sweeper.sweep(later + max(CONFIRM_AFTER, ORPHAN_INTERVAL))
    assert second.orphans == 4
    assert files_under(blobs.root) == {
        "files/file-kept",  # a file row points to it
        "parts/batch_live/000000.1.out",  # its batch is not final
        "uploads/upload_p/part_1",  # its upload is pending
    }


async def test_a_rowless_blob_that_gets_its_row_before_the_second_look_stays(
    store: SQLiteStore, blobs: LocalBlobStore
) -> None:
    await put(blobs, "files/file-late")
    sweeper = Sweeper(store, blobs)
    later = time.time() + ORPHAN_AGE + 60
    assert (await sweeper.sweep(later)).orphans_suspected == 1
    await store.insert_file(FileRecord("file-late", OWNER, 2, 0, "f", "batch", "files/file-late"))
    assert (await sweeper.sweep(later + ORPHAN_INTERVAL)).orphans == 0
    assert await blobs.exists("files/file-late")


async def test_a_deleted_input_file_fails_new_batches_and_its_blob_goes_after_the_last_reader(
    store: SQLiteStore, blobs: LocalBlobStore, tmp_path: Path
) -> None:
    w = worker(store, blobs, tmp_path)
    f = await add_file(store, blobs, "file-in")
    await add_batch(store, "batch_reader", f.id)  # validating: it will read the file
    res = await store.delete_file(OWNER, f.id)
    assert res is not None and res[1] is False  # the DELETE route leaves the blob for the batch
    await add_batch(store, "batch_after", f.id)  # created after the delete: must fail, not read the blob

    assert await w.validate_once() and await w.validate_once()
    for bid in ("batch_reader", "batch_after"):
        b = await store.get_batch(OWNER, bid)
        assert b is not None and b.status == BatchStatus.FAILED
        assert b.errors is not None
        assert b.errors[0]["message"].startswith(f"Cannot find file {f.id}, or organization ")
        assert b.errors[0]["param"] == "file_id"
    report = await w.sweep()  # no live batch reads the deleted file now: its blob goes
    assert report.deleted_file_blobs == 1
    assert not await blobs.exists(f.blob_key)
    assert (await w.sweep()).deleted_file_blobs == 0


async def test_an_expired_file_in_use_keeps_its_blob_until_its_batch_is_final(
    store: SQLiteStore, blobs: LocalBlobStore, tmp_path: Path
) -> None:
    f = await add_file(store, blobs, "file-exp")
    await store.insert_file(
        FileRecord("file-exp2", OWNER, 1, 0, "g", "batch", "files/file-exp2", expires_at=1)
    )
    await put(blobs, "files/file-exp2")
    await add_batch(store, "batch_using", f.id)
    job = await store.claim_validation("v", 30)
    assert job is not None
    await store.plan_batch("batch_using", "v", [], 0, None)
    res = await store.delete_file(OWNER, f.id)  # as if it had expired
    assert res is not None
    sweeper = Sweeper(store, blobs)
    report = await sweeper.sweep()
    assert report.expired_files == 1 and not await blobs.exists("files/file-exp2")
    assert await blobs.exists(f.blob_key)  # batch_using is in progress
    os.utime(blobs.root / f.blob_key, (0, 0))  # an hour old and more: still needed, by a live batch
    assert (await sweeper.sweep(time.time() + 2 * ORPHAN_AGE)).orphans_suspected == 0
    assert await blobs.exists(f.blob_key)
