"""MetadataStore contract, run against every backend (SQLite, PostgreSQL, the in-memory fake) with a fake clock (leases
expire when the test says so). The `store` fixture lives in conftest.py; this module widens its `backend` to all of
BACKENDS. Tests of what only a database gives (a reopened store finds its data, several stores share one database)
skip the fake with the reason."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from batchyard.domain.idempotency import TTL_S, IdempotencyKey
from batchyard.domain.models import (
    BatchRecord,
    FileRecord,
    ShardClaim,
    ShardResult,
    UploadPartRecord,
    UploadRecord,
    Usage,
)
from batchyard.domain.planning import ShardPlan, Span
from batchyard.domain.states import VALIDATABLE, BatchStatus, IllegalTransition, ShardStatus, UploadStatus
from batchyard.domain.tenancy import ProjectRecord
from batchyard.errors import StoreError
from batchyard.store.base import BatchJob, MetadataStore, OverEnqueued
from batchyard.store.sqlite import SQLiteStore, migrations
from tests.contract.conftest import BACKENDS, T0, Clock, StoreFactory

S = BatchStatus
LEASE = 10.0
ALICE, BOB = "key_alice", "key_bob"


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """Every MetadataStore, the in-memory fake included (conftest's `backend` has only the databases)."""
    return str(request.param)


def needs_a_database(backend: str, why: str) -> None:
    if backend == "memory":
        pytest.skip(f"memory: {why}")


# -- helpers --------------------------------------------------------------------------------------------------

_counter = {"n": 0}


def _next() -> int:
    _counter["n"] += 1
    return _counter["n"]


def file_rec(owner: str = ALICE, purpose: str = "batch", *, expires_at: int | None = None) -> FileRecord:
    n = _next()
    return FileRecord(
        id=f"file-{n:06d}",
        owner=owner,
        bytes=100 + n,
        created_at=int(T0) + n,
        filename=f"in{n}.jsonl",
        purpose=purpose,
        blob_key=f"files/file-{n:06d}",
        sha256=f"{n:064x}",
        expires_at=expires_at,
    )


def batch_rec(input_file_id: str, owner: str = ALICE, status: BatchStatus = S.VALIDATING) -> BatchRecord:
    n = _next()
    return BatchRecord(
        id=f"batch_{n:06d}",
        owner=owner,
        endpoint="/v1/chat/completions",
        input_file_id=input_file_id,
        completion_window="24h",
        status=status,
        created_at=int(T0),
        expires_at=int(T0) + 86_400,
        metadata={"run": str(n)},
        output_expires_after=3600,
    )


def plans(n: int, lines_each: int = 10) -> list[ShardPlan]:
    return [
        ShardPlan(
            index=i, start=i * 1000, end=(i + 1) * 1000, first_line=i * lines_each + 1, line_count=lines_each
        )
        for i in range(n)
    ]


async def new_batch(store: MetadataStore, owner: str = ALICE) -> tuple[FileRecord, BatchRecord]:
    f = file_rec(owner)
    await store.insert_file(f)
    b = batch_rec(f.id, owner)
    await store.insert_batch(b)
    return f, b


async def planned_batch(store: MetadataStore, shards: int = 3, owner: str = ALICE) -> BatchRecord:
    """A batch validated and planned into `shards` shards of 10 lines (in_progress)."""
    _, b = await new_batch(store, owner)
    job = await store.claim_validation("validator", LEASE)
    assert job is not None and job.batch.id == b.id
    assert await store.plan_batch(b.id, "validator", plans(shards), shards * 10, "test-model")
    got = await store.get_batch(None, b.id)
    assert got is not None
    return got


def result(completed: int, failed: int, usage: Usage | None = None, tag: str = "") -> ShardResult:
    return ShardResult(
        completed=completed,
        failed=failed,
        usage=usage or Usage(),
        out_key=f"parts/{tag}.out" if completed else None,
        err_key=f"parts/{tag}.err" if failed else None,
    )


async def claim(store: MetadataStore, worker: str) -> ShardClaim:
    c = await store.claim_shard(worker, LEASE)
    assert c is not None
    return c


async def run_all_shards(store: MetadataStore, batch: BatchRecord) -> None:
    while (c := await store.claim_shard("runner", LEASE)) is not None:
        assert c.shard.batch_id == batch.id
        assert await store.complete_shard(c, result(c.shard.line_count, 0, tag=str(c.shard.index)), 0)


# -- lifecycle ------------------------------------------------------------------------------------------------


async def test_now_is_the_store_clock(store: MetadataStore, clock: Clock) -> None:
    assert await store.now() == T0
    clock.advance(5)
    assert await store.now() == T0 + 5


async def test_without_a_clock_the_store_keeps_time_itself(make_store: StoreFactory) -> None:
    # SQLite: this machine's clock; PostgreSQL: the database server's (here on this machine too).
    s = make_store()
    await s.open()
    try:
        before = time.time()
        now = await s.now()
        assert before - 5 < now < time.time() + 5
        _, b = await new_batch(s)
        job = await s.claim_validation("w1", LEASE)
        assert job is not None and now <= job.db_now < now + 5
        assert await s.claim_validation("w2", LEASE) is None
        assert await s.plan_batch(b.id, "w1", plans(1), 10, "m")
        got = await s.get_batch(ALICE, b.id)
        assert got is not None and got.in_progress_at is not None
        assert int(now) <= got.in_progress_at <= int(time.time()) + 5
        # a lease that ended before it began is taken over at once; heartbeats report the store's time
        first = await s.claim_shard("w1", -1.0)
        assert first is not None and now <= first.db_now
        second = await claim(s, "w2")
        assert second.attempt == 2 and second.db_now >= first.db_now
        hb = await s.heartbeat_shard(second, LEASE, 1, 0, Usage())
        assert hb is not None and hb.db_now >= second.db_now
        assert await s.heartbeat_shard(first, LEASE, 1, 0, Usage()) is None
    finally:
        await s.close()


async def test_closed_store_raises_store_error(make_store: StoreFactory, clock: Clock) -> None:
    s = make_store(clock)
    with pytest.raises(StoreError):
        await s.get_file(None, "file-x")
    await s.open()
    await s.close()


async def test_migrations_applied_once(db_path: Path, clock: Clock) -> None:
    """SQLite only (the file's journal mode); both backends: tests/contract/test_migrations.py."""
    versions = [v for v, _ in migrations()]
    assert versions == sorted(set(versions))
    assert versions[0] == 1
    for _ in range(3):
        s = SQLiteStore(db_path, clock=clock)
        await s.open()
        await s.close()
    with sqlite3.connect(db_path) as db:
        rows = [r[0] for r in db.execute("SELECT version FROM schema_migrations ORDER BY version")]
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        journal = db.execute("PRAGMA journal_mode").fetchone()[0]
    assert rows == versions
    assert {"files", "batches", "shards", "schema_migrations"} <= tables
    assert journal == "wal"


async def test_reopen_finds_everything(backend: str, make_store: StoreFactory, clock: Clock) -> None:
    needs_a_database(backend, "nothing outlives the store object, a new one starts empty")
    s1 = make_store(clock)
    await s1.open()
    b = await planned_batch(s1, shards=2)
    f = await s1.get_file(ALICE, b.input_file_id)
    c = await claim(s1, "w1")
    assert await s1.complete_shard(c, result(10, 0, Usage(5, 1, 7, 2), tag="a"), 0)
    await s1.close()

    s2 = make_store(clock)
    await s2.open()
    try:
        assert await s2.get_file(ALICE, b.input_file_id) == f
        again = await s2.get_batch(ALICE, b.id)
        assert again is not None
        assert again.status == S.IN_PROGRESS
        assert again.metadata == b.metadata
        assert (again.total, again.completed, again.failed) == (20, 10, 0)
        assert again.usage == Usage(5, 1, 7, 2)
        done = await s2.done_shards(b.id)
        assert [(d.index, d.out_key) for d in done] == [(0, "parts/a.out")]
        # the unfinished shard is still claimable; the finished one is not redone
        c2 = await claim(s2, "w2")
        assert c2.shard.index == 1
        assert await s2.claim_shard("w3", LEASE) is None
    finally:
        await s2.close()


# -- files ----------------------------------------------------------------------------------------------------


async def test_insert_and_get_file(store: MetadataStore) -> None:
    f = file_rec(expires_at=int(T0) + 3600)
    await store.insert_file(f)
    assert await store.get_file(ALICE, f.id) == f
    assert await store.get_file(None, f.id) == f
    assert await store.get_file(BOB, f.id) is None
    assert await store.get_file(ALICE, "file-missing") is None


async def test_duplicate_file_id_is_a_store_error(store: MetadataStore) -> None:
    f = file_rec()
    await store.insert_file(f)
    with pytest.raises(StoreError):
        await store.insert_file(f)


# -- uploads ----------------------------------------------------------------------------------------------------


def upload_rec(owner: str = ALICE) -> UploadRecord:
    n = _next()
    return UploadRecord(
        id=f"upload_{n:06d}",
        owner=owner,
        filename=f"big{n}.jsonl",
        purpose="batch",
        bytes=1000 + n,
        mime_type="text/jsonl",
        created_at=int(T0),
        expires_at=int(T0) + 3600,
        file_expires_after=86_400,
    )


async def test_upload_insert_get_and_owner_isolation(store: MetadataStore) -> None:
    u = upload_rec()
    await store.insert_upload(u)
    assert await store.get_upload(ALICE, u.id) == u
    assert await store.get_upload(None, u.id) == u
    assert await store.get_upload(BOB, u.id) is None
    assert await store.get_upload(ALICE, "upload_missing") is None


async def test_upload_parts_are_kept_per_upload(store: MetadataStore) -> None:
    u, other = upload_rec(), upload_rec()
    await store.insert_upload(u)
    await store.insert_upload(other)
    parts = [
        UploadPartRecord(f"part_{u.id}_{i}", u.id, 10 * i, f"uploads/{u.id}/{i}", int(T0)) for i in range(3)
    ]
    for p in parts:
        await store.insert_upload_part(p)
    await store.insert_upload_part(UploadPartRecord("part_x", other.id, 5, "uploads/x", int(T0)))
    assert sorted(await store.get_upload_parts(u.id), key=lambda p: p.id) == parts
    assert [p.id for p in await store.get_upload_parts(other.id)] == ["part_x"]
    assert await store.get_upload_parts("upload_missing") == []


async def test_completing_an_upload_inserts_its_file_once(store: MetadataStore) -> None:
    u = upload_rec()
    await store.insert_upload(u)
    f = file_rec()
    assert await store.finish_upload(BOB, u.id, "completed", f) is False  # not Bob's
    assert await store.get_file(ALICE, f.id) is None
    assert await store.finish_upload(ALICE, u.id, "completed", f) is True
    done = await store.get_upload(ALICE, u.id)
    assert done is not None and (done.status, done.file_id) == ("completed", f.id)
    assert await store.get_file(ALICE, f.id) == f
    # a second completion or a cancel loses: the upload is no longer pending, and no second file appears
    assert await store.finish_upload(ALICE, u.id, "completed", file_rec()) is False
    assert await store.finish_upload(ALICE, u.id, "cancelled", None) is False
    assert (await store.list_files(ALICE, purpose=None, limit=100, order="asc", after=None)).items == [f]


async def test_expired_uploads(store: MetadataStore, clock: Clock) -> None:
    u, done = upload_rec(), upload_rec()
    await store.insert_upload(u)
    await store.insert_upload(done)
    assert await store.finish_upload(ALICE, done.id, "cancelled", None)
    assert await store.expired_uploads(10) == []
    clock.t = T0 + 3600  # expires_at reached
    assert [x.id for x in await store.expired_uploads(10)] == [u.id]  # only the pending one
    assert await store.finish_upload(ALICE, u.id, "expired", None)
    assert await store.expired_uploads(10) == []
    got = await store.get_upload(ALICE, u.id)
    assert got is not None and got.status == "expired"


async def test_cancelling_an_upload(store: MetadataStore) -> None:
    u = upload_rec()
    await store.insert_upload(u)
    assert await store.finish_upload(ALICE, u.id, "cancelled", None) is True
    got = await store.get_upload(ALICE, u.id)
    assert got is not None and (got.status, got.file_id) == ("cancelled", None)
    assert await store.finish_upload(ALICE, u.id, "completed", file_rec()) is False


@pytest.mark.parametrize("status", ["pending", "bogus"])
async def test_an_upload_ends_only_in_a_final_status(store: MetadataStore, status: str) -> None:
    """The domain decides which statuses end an upload; the store refuses any other and changes nothing."""
    u = upload_rec()
    await store.insert_upload(u)
    with pytest.raises(IllegalTransition):
        await store.finish_upload(ALICE, u.id, status, file_rec())
    got = await store.get_upload(ALICE, u.id)
    assert got is not None and (got.status, got.file_id) == (UploadStatus.PENDING, None)
    assert (await store.list_files(ALICE, purpose=None, limit=100, order="asc", after=None)).items == []


async def test_list_files_owner_isolation_and_order(store: MetadataStore) -> None:
    mine = [file_rec() for _ in range(3)]
    theirs = file_rec(BOB)
    for f in [mine[0], theirs, mine[1], mine[2]]:
        await store.insert_file(f)
    page = await store.list_files(ALICE, purpose=None, limit=10, order="desc", after=None)
    assert [f.id for f in page.items] == [f.id for f in reversed(mine)]
    assert page.has_more is False
    page = await store.list_files(ALICE, purpose=None, limit=10, order="asc", after=None)
    assert [f.id for f in page.items] == [f.id for f in mine]
    page = await store.list_files(BOB, purpose=None, limit=10, order="desc", after=None)
    assert [f.id for f in page.items] == [theirs.id]


async def test_list_files_purpose_filter(store: MetadataStore) -> None:
    a = file_rec(purpose="batch")
    b = file_rec(purpose="batch_output")
    c = file_rec(purpose="batch")
    for f in (a, b, c):
        await store.insert_file(f)
    page = await store.list_files(ALICE, purpose="batch", limit=10, order="asc", after=None)
    assert [f.id for f in page.items] == [a.id, c.id]
    page = await store.list_files(ALICE, purpose="batch_output", limit=10, order="asc", after=None)
    assert [f.id for f in page.items] == [b.id]
    page = await store.list_files(ALICE, purpose="fine-tune", limit=10, order="asc", after=None)
    assert page.items == []


@pytest.mark.parametrize("order", ["asc", "desc"])
async def test_list_files_pagination(store: MetadataStore, order: str) -> None:
    files = [file_rec() for _ in range(7)]
    for f in files:
        await store.insert_file(f)
    await store.insert_file(file_rec(BOB))
    expected = [f.id for f in (files if order == "asc" else list(reversed(files)))]
    seen: list[str] = []
    pages: list[bool] = []
    after: str | None = None
    while True:
        page = await store.list_files(ALICE, purpose=None, limit=3, order=order, after=after)
        seen += [f.id for f in page.items]
        pages.append(page.has_more)
        if not page.has_more:
            break
        after = page.items[-1].id
    assert seen == expected
    assert pages == [True, True, False]


async def test_list_files_exact_page_has_no_more(store: MetadataStore) -> None:
    for _ in range(3):
        await store.insert_file(file_rec())
    page = await store.list_files(ALICE, purpose=None, limit=3, order="asc", after=None)
    assert len(page.items) == 3
    assert page.has_more is False


async def test_list_files_after_foreign_or_unknown_cursor_is_empty(store: MetadataStore) -> None:
    theirs = file_rec(BOB)
    await store.insert_file(theirs)
    await store.insert_file(file_rec())
    for cursor in (theirs.id, "file-unknown"):
        page = await store.list_files(ALICE, purpose=None, limit=10, order="asc", after=cursor)
        assert (page.items, page.has_more) == ([], False)


async def test_delete_file(store: MetadataStore) -> None:
    f = file_rec()
    await store.insert_file(f)
    assert await store.delete_file(BOB, f.id) is None
    assert await store.get_file(ALICE, f.id) == f
    assert await store.delete_file(ALICE, f.id) == (f, True)
    assert await store.get_file(ALICE, f.id) is None
    assert await store.get_file(None, f.id) is None
    assert await store.delete_file(ALICE, f.id) is None
    page = await store.list_files(ALICE, purpose=None, limit=10, order="asc", after=None)
    assert page.items == []


async def test_deleted_cursor_still_paginates(store: MetadataStore) -> None:
    files = [file_rec() for _ in range(3)]
    for f in files:
        await store.insert_file(f)
    await store.delete_file(ALICE, files[1].id)
    page = await store.list_files(ALICE, purpose=None, limit=10, order="asc", after=files[1].id)
    assert [f.id for f in page.items] == [files[2].id]


@pytest.mark.parametrize(
    ("status", "removable"),
    [
        (S.VALIDATING, False),
        (S.IN_PROGRESS, False),
        (S.FINALIZING, False),
        (S.CANCELLING, False),
        (S.COMPLETED, True),
        (S.FAILED, True),
        (S.EXPIRED, True),
        (S.CANCELLED, True),
    ],
)
async def test_delete_file_used_by_a_batch(
    store: MetadataStore, status: BatchStatus, removable: bool
) -> None:
    f = file_rec()
    await store.insert_file(f)
    await store.insert_batch(batch_rec(f.id, status=status))
    assert await store.delete_file(ALICE, f.id) == (f, removable)


async def test_expired_files(store: MetadataStore, clock: Clock) -> None:
    soon = file_rec(expires_at=int(T0) + 60)
    later = file_rec(expires_at=int(T0) + 3600)
    never = file_rec()
    for f in (soon, later, never):
        await store.insert_file(f)
    assert await store.expired_files(10) == []
    clock.advance(60)
    assert [f.id for f in await store.expired_files(10)] == [soon.id]
    clock.advance(10_000)
    assert {f.id for f in await store.expired_files(10)} == {soon.id, later.id}
    assert len(await store.expired_files(1)) == 1
    await store.delete_file(ALICE, soon.id)
    assert [f.id for f in await store.expired_files(10)] == [later.id]


# -- batches --------------------------------------------------------------------------------------------------


async def test_insert_and_get_batch(store: MetadataStore) -> None:
    _, b = await new_batch(store)
    got = await store.get_batch(ALICE, b.id)
    assert got == b
    zero = {
        "succeeded": 0,
        "failed_upstream": 0,
        "expired": 0,
        "cancelled": 0,
        "errored": 0,
    }  # extension fields
    assert got is not None and got.to_wire()["request_counts"] == {
        "total": 0,
        "completed": 0,
        "failed": 0,
        **zero,
    }
    assert await store.get_batch(None, b.id) == b
    assert await store.get_batch(BOB, b.id) is None
    assert await store.get_batch(ALICE, "batch_missing") is None


async def test_batch_without_metadata(store: MetadataStore) -> None:
    f = file_rec()
    await store.insert_file(f)
    b = batch_rec(f.id)
    b.metadata = None
    b.output_expires_after = None
    await store.insert_batch(b)
    assert await store.get_batch(ALICE, b.id) == b


async def test_list_batches_newest_first_with_pagination(store: MetadataStore) -> None:
    mine = [(await new_batch(store))[1] for _ in range(5)]
    await new_batch(store, BOB)
    newest_first = [b.id for b in reversed(mine)]
    p1 = await store.list_batches(ALICE, limit=2, after=None)
    assert [b.id for b in p1.items] == newest_first[:2]
    assert p1.has_more
    p2 = await store.list_batches(ALICE, limit=2, after=p1.items[-1].id)
    assert [b.id for b in p2.items] == newest_first[2:4]
    assert p2.has_more
    p3 = await store.list_batches(ALICE, limit=2, after=p2.items[-1].id)
    assert [b.id for b in p3.items] == newest_first[4:]
    assert not p3.has_more
    everything = await store.list_batches(ALICE, limit=100, after=None)
    assert [b.id for b in everything.items] == newest_first
    assert not everything.has_more


async def test_list_batches_owner_isolation(store: MetadataStore) -> None:
    _, mine = await new_batch(store)
    _, theirs = await new_batch(store, BOB)
    assert [b.id for b in (await store.list_batches(BOB, limit=10, after=None)).items] == [theirs.id]
    page = await store.list_batches(BOB, limit=10, after=mine.id)
    assert (page.items, page.has_more) == ([], False)
    assert (await store.list_batches("key_nobody", limit=10, after=None)).items == []


@pytest.mark.parametrize("status", [S.VALIDATING, S.IN_PROGRESS])
async def test_request_cancel_moves_to_cancelling(
    store: MetadataStore, clock: Clock, status: BatchStatus
) -> None:
    f = file_rec()
    await store.insert_file(f)
    b = batch_rec(f.id, status=status)
    await store.insert_batch(b)
    clock.advance(42)
    got = await store.request_cancel(ALICE, b.id)
    assert got is not None
    assert got.status == S.CANCELLING
    assert got.cancelling_at == int(T0 + 42)
    assert await store.get_batch(ALICE, b.id) == got


async def test_postgres_ends_a_transaction_left_idle_so_its_row_locks_do_not_hold_a_cancel(
    backend: str, pg_dsn: str | None, clock: Clock
) -> None:
    # A worker stopped (or cut off) inside a transaction holds its rows' locks; the server ends its session after
    # the store's idle_tx_timeout, and the cancel waiting behind that lock goes through.
    if backend != "postgres":
        pytest.skip("a PostgreSQL session setting")
    from batchyard.store.postgres import PostgresStore

    assert pg_dsn is not None
    stuck, other = PostgresStore(pg_dsn, idle_tx_timeout=1.0), PostgresStore(pg_dsn, idle_tx_timeout=1.0)
    await stuck.open()
    await other.open()
    try:
        _, b = await new_batch(other)
        locked, release = asyncio.Event(), asyncio.Event()

        async def hold_the_row() -> None:
            async with stuck._tx() as conn:
                await conn.execute("SELECT 1 FROM batches WHERE id = $1 FOR UPDATE", b.id)
                locked.set()
                await release.wait()  # idle inside the transaction, as a stopped process is
                await conn.execute("SELECT 1")

        holder = asyncio.create_task(hold_the_row())
        try:
            await locked.wait()
            got = await asyncio.wait_for(other.request_cancel(ALICE, b.id), timeout=20)
            assert got is not None and got.status == S.CANCELLING
        finally:
            release.set()
        with pytest.raises(StoreError):  # the stuck session's transaction was ended: it cannot commit later
            await holder
    finally:
        await stuck.close()
        await other.close()


@pytest.mark.parametrize(
    "status", [S.CANCELLING, S.FINALIZING, S.COMPLETED, S.FAILED, S.EXPIRED, S.CANCELLED]
)
async def test_request_cancel_leaves_other_states(store: MetadataStore, status: BatchStatus) -> None:
    f = file_rec()
    await store.insert_file(f)
    b = batch_rec(f.id, status=status)
    await store.insert_batch(b)
    got = await store.request_cancel(ALICE, b.id)
    assert got == b
    assert got is not None and got.cancelling_at is None


async def test_request_cancel_twice_keeps_the_first_stamp(store: MetadataStore, clock: Clock) -> None:
    _, b = await new_batch(store)
    first = await store.request_cancel(ALICE, b.id)
    clock.advance(100)
    second = await store.request_cancel(ALICE, b.id)
    assert first is not None and second is not None
    assert second.status == S.CANCELLING
    assert second.cancelling_at == first.cancelling_at == int(T0)


async def test_request_cancel_other_owner_or_unknown(store: MetadataStore) -> None:
    _, b = await new_batch(store)
    assert await store.request_cancel(BOB, b.id) is None
    assert await store.request_cancel(ALICE, "batch_missing") is None
    got = await store.get_batch(ALICE, b.id)
    assert got is not None and got.status == S.VALIDATING


# -- validation jobs ------------------------------------------------------------------------------------------


async def test_claim_validation_returns_the_batch_and_its_file(store: MetadataStore) -> None:
    assert await store.claim_validation("w1", LEASE) is None
    f, b = await new_batch(store)
    job = await store.claim_validation("w1", LEASE)
    assert isinstance(job, BatchJob)
    assert job.batch == b
    assert job.input_file == f
    assert job.db_now == T0


async def test_claim_validation_oldest_first(store: MetadataStore) -> None:
    _, first = await new_batch(store)
    _, second = await new_batch(store, BOB)
    j1 = await store.claim_validation("w1", LEASE)
    j2 = await store.claim_validation("w2", LEASE)
    assert j1 is not None and j2 is not None
    assert (j1.batch.id, j2.batch.id) == (first.id, second.id)
    assert await store.claim_validation("w3", LEASE) is None


async def test_validation_lease(store: MetadataStore, clock: Clock) -> None:
    _, b = await new_batch(store)
    assert await store.claim_validation("w1", LEASE) is not None
    assert await store.claim_validation("w2", LEASE) is None
    clock.advance(LEASE)
    assert await store.claim_validation("w2", LEASE) is None  # the lease runs up to and including its end
    clock.advance(0.01)
    job = await store.claim_validation("w2", LEASE)
    assert job is not None and job.batch.id == b.id
    # the first worker is fenced out
    assert not await store.plan_batch(b.id, "w1", plans(1), 10, "m")
    assert not await store.fail_batch(b.id, "w1", [{"code": "x"}])
    assert not await store.extend_job(b.id, "w1", LEASE)
    got = await store.get_batch(ALICE, b.id)
    assert got is not None and got.status == S.VALIDATING
    assert await store.plan_batch(b.id, "w2", plans(1), 10, "m")


async def test_extend_job(store: MetadataStore, clock: Clock) -> None:
    _, b = await new_batch(store)
    assert await store.claim_validation("w1", LEASE) is not None
    clock.advance(LEASE - 1)
    assert await store.extend_job(b.id, "w1", LEASE)
    clock.advance(LEASE - 1)  # past the first lease, within the extended one
    assert await store.claim_validation("w2", LEASE) is None
    clock.advance(1.5)
    assert await store.claim_validation("w2", LEASE) is not None


async def test_plan_batch(store: MetadataStore, clock: Clock) -> None:
    f, b = await new_batch(store)
    assert await store.claim_validation("w1", LEASE) is not None
    assert not await store.plan_batch(b.id, "intruder", plans(3), 30, "m")
    assert await store.claim_shard("runner", LEASE) is None
    clock.advance(3)
    assert await store.plan_batch(b.id, "w1", plans(3), 30, "test-model")
    got = await store.get_batch(ALICE, b.id)
    assert got is not None
    assert got.status == S.IN_PROGRESS
    assert got.in_progress_at == int(T0 + 3)
    assert (got.total, got.completed, got.failed) == (30, 0, 0)
    assert got.model == "test-model"
    # planned: no longer offered for validation, even after the lease would have run out
    clock.advance(LEASE * 2)
    assert await store.claim_validation("w2", LEASE) is None
    assert not await store.plan_batch(b.id, "w1", plans(3), 30, "test-model")
    c = await claim(store, "runner")
    assert (c.shard.batch_id, c.shard.index) == (b.id, 0)
    assert c.input_blob_key == f.blob_key


async def test_plan_cancelling_batch_stays_cancelling(store: MetadataStore) -> None:
    _, b = await new_batch(store)
    assert await store.claim_validation("w1", LEASE) is not None
    cancelled = await store.request_cancel(ALICE, b.id)
    assert cancelled is not None and cancelled.status == S.CANCELLING
    assert await store.plan_batch(b.id, "w1", plans(2), 20, "m")
    got = await store.get_batch(ALICE, b.id)
    assert got is not None
    assert got.status == S.CANCELLING
    assert got.in_progress_at is None
    assert got.total == 20
    c = await claim(store, "runner")
    assert c.batch_status == S.CANCELLING


async def test_claim_validation_of_a_batch_cancelled_before_it_was_validated(store: MetadataStore) -> None:
    _, b = await new_batch(store)
    await store.request_cancel(ALICE, b.id)
    job = await store.claim_validation("w1", LEASE)
    assert job is not None
    assert job.batch.id == b.id
    assert job.batch.status == S.CANCELLING


@pytest.mark.parametrize("status", list(BatchStatus), ids=str)
async def test_claim_validation_only_of_batches_in_a_validatable_state(
    store: MetadataStore, status: BatchStatus
) -> None:
    f = file_rec()
    await store.insert_file(f)
    b = batch_rec(f.id, status=status)
    await store.insert_batch(b)
    job = await store.claim_validation("w1", LEASE)
    if status in VALIDATABLE:
        assert job is not None and (job.batch.id, job.batch.status) == (b.id, status)
    else:
        assert job is None


async def test_plan_then_fail_is_refused(store: MetadataStore) -> None:
    """Validation ends once: after the plan, a late failure report (the job lease is gone) changes nothing."""
    b = await planned_batch(store, shards=1)
    assert not await store.fail_batch(b.id, "validator", [{"code": "x", "message": "y"}])
    got = await store.get_batch(ALICE, b.id)
    assert got is not None and (got.status, got.failed_at, got.errors) == (S.IN_PROGRESS, None, None)


async def test_fail_batch(store: MetadataStore, clock: Clock) -> None:
    _, b = await new_batch(store)
    assert await store.claim_validation("w1", LEASE) is not None
    errors = [{"code": "invalid_json", "message": "bad line", "param": None, "line": 3}]
    assert not await store.fail_batch(b.id, "w2", errors)
    clock.advance(7)
    assert await store.fail_batch(b.id, "w1", errors)
    got = await store.get_batch(ALICE, b.id)
    assert got is not None
    assert got.status == S.FAILED
    assert got.failed_at == int(T0 + 7)
    assert got.errors == errors
    assert got.to_wire()["errors"] == {"object": "list", "data": errors}
    assert await store.claim_validation("w3", LEASE) is None
    assert await store.claim_finalization("w3", LEASE) is None
    assert not await store.fail_batch(b.id, "w1", errors)


async def test_fail_cancelling_batch_ends_cancelled(store: MetadataStore) -> None:
    _, b = await new_batch(store)
    assert await store.claim_validation("w1", LEASE) is not None
    await store.request_cancel(ALICE, b.id)
    assert await store.fail_batch(b.id, "w1", [{"code": "x", "message": "y"}])
    got = await store.get_batch(ALICE, b.id)
    assert got is not None
    assert got.status == S.CANCELLED
    assert got.cancelled_at == int(T0)


# -- shards ---------------------------------------------------------------------------------------------------


async def test_claim_shard_gives_each_pending_shard_once(store: MetadataStore) -> None:
    b = await planned_batch(store, shards=3)
    claims = [await claim(store, f"w{i}") for i in range(3)]
    assert await store.claim_shard("w9", LEASE) is None
    assert sorted(c.shard.index for c in claims) == [0, 1, 2]
    for c in claims:
        i = c.shard.index
        assert c.attempt == c.shard.attempt == 1
        assert c.shard.status == "running"
        assert (c.shard.start, c.shard.end, c.shard.first_line, c.shard.line_count) == (
            i * 1000,
            (i + 1) * 1000,
            i * 10 + 1,
            10,
        )
        assert c.batch_status == S.IN_PROGRESS
        assert c.endpoint == b.endpoint
        assert c.expires_at == b.expires_at
        assert c.db_now == T0


@contextlib.asynccontextmanager
async def several_stores(
    make_store: StoreFactory, clock: Clock, n: int
) -> AsyncIterator[list[MetadataStore]]:
    """`n` stores on one database, each with its own connections, as worker processes have."""
    stores = [make_store(clock) for _ in range(n)]
    for s in stores:
        await s.open()
    try:
        yield stores
    finally:
        for s in stores:
            await s.close()


async def test_concurrent_claims_never_share_a_shard(
    backend: str, make_store: StoreFactory, clock: Clock
) -> None:
    needs_a_database(backend, "several stores sharing one database; each MemoryStore has its own state")
    # Six stores, each with its own connections as worker processes have, claim from one batch at once.
    async with several_stores(make_store, clock, 6) as stores:
        await planned_batch(stores[0], shards=24)

        async def drain(s: MetadataStore, worker: str) -> list[tuple[int, int]]:
            got = []
            while (c := await s.claim_shard(worker, LEASE)) is not None:
                got.append((c.shard.index, c.attempt))
            return got

        per_worker = await asyncio.gather(*(drain(s, f"w{i}") for i, s in enumerate(stores)))
        assert sorted(x for got in per_worker for x in got) == [(i, 1) for i in range(24)]


async def test_a_shard_planned_from_spans_is_claimed_with_its_spans(store: MetadataStore) -> None:
    _, b = await new_batch(store)
    assert await store.claim_validation("v", LEASE) is not None
    spans = (Span(900, 1000, 40), Span(10, 20, 2), Span(2**40, 2**40 + 7, 2**33))
    plan = [
        ShardPlan(0, 10, 2**40 + 7, 2, 3, spans),
        ShardPlan(1, 0, 500, 1, 5),
    ]
    assert await store.plan_batch(b.id, "v", plan, 8, "m")
    got = {c.shard.index: c.shard for c in [await claim(store, "w1"), await claim(store, "w2")]}
    assert got[0].spans == spans and got[0].ranges() == spans
    assert got[1].spans == () and got[1].ranges() == (Span(0, 500, 1),)
    assert (got[0].start, got[0].end, got[0].first_line, got[0].line_count) == (10, 2**40 + 7, 2, 3)


async def test_unplanned_batch_has_no_shards_to_claim(store: MetadataStore) -> None:
    await new_batch(store)  # validating: no shards yet
    assert await store.claim_shard("w1", LEASE) is None


async def test_expired_shard_lease_is_taken_over(store: MetadataStore, clock: Clock) -> None:
    await planned_batch(store, shards=1)
    old = await claim(store, "w1")
    assert await store.claim_shard("w2", LEASE) is None
    clock.advance(LEASE)
    assert await store.claim_shard("w2", LEASE) is None
    clock.advance(0.01)
    new = await claim(store, "w2")
    assert new.shard.index == old.shard.index
    assert (old.attempt, new.attempt) == (1, 2)
    assert new.worker == "w2"
    clock.advance(LEASE + 0.01)
    third = await claim(store, "w3")
    assert third.attempt == 3


async def test_heartbeat_extends_the_lease(store: MetadataStore, clock: Clock) -> None:
    b = await planned_batch(store, shards=1)
    c = await claim(store, "w1")
    clock.advance(LEASE - 1)
    hb = await store.heartbeat_shard(c, LEASE, 0, 0, Usage())
    assert hb is not None
    assert (hb.batch_status, hb.expires_at, hb.db_now) == (S.IN_PROGRESS, b.expires_at, T0 + LEASE - 1)
    clock.advance(LEASE - 1)  # past the claim's lease, within the heartbeat's
    assert await store.claim_shard("w2", LEASE) is None
    clock.advance(1.5)
    assert await store.claim_shard("w2", LEASE) is not None


async def test_heartbeat_reports_cancellation(store: MetadataStore) -> None:
    b = await planned_batch(store, shards=1)
    c = await claim(store, "w1")
    await store.request_cancel(ALICE, b.id)
    hb = await store.heartbeat_shard(c, LEASE, 1, 0, Usage())
    assert hb is not None and hb.batch_status == S.CANCELLING


async def test_fencing_after_takeover(store: MetadataStore, clock: Clock) -> None:
    b = await planned_batch(store, shards=1)
    old = await claim(store, "w1")
    assert await store.heartbeat_shard(old, LEASE, 4, 1, Usage(40, 0, 4, 0)) is not None
    clock.advance(LEASE + 1)
    new = await claim(store, "w2")
    # the takeover starts from zero: the old attempt's progress is gone
    got = await store.get_batch(ALICE, b.id)
    assert got is not None and (got.completed, got.failed, got.usage) == (0, 0, Usage())

    assert await store.heartbeat_shard(old, LEASE, 9, 1, Usage(90, 0, 9, 0)) is None
    assert not await store.complete_shard(old, result(9, 1, Usage(90, 0, 9, 0), tag="old"), 0)
    got = await store.get_batch(ALICE, b.id)
    assert got is not None and (got.completed, got.failed) == (0, 0)
    assert await store.done_shards(b.id) == []

    assert await store.heartbeat_shard(new, LEASE, 2, 0, Usage(20, 0, 2, 0)) is not None
    assert await store.complete_shard(new, result(8, 2, Usage(100, 10, 8, 1), tag="new"), 0)
    done = await store.done_shards(b.id)
    assert len(done) == 1
    d = done[0]
    assert (d.status, d.attempt, d.completed, d.failed) == ("done", 2, 8, 2)
    assert (d.out_key, d.err_key) == ("parts/new.out", "parts/new.err")
    assert d.usage == Usage(100, 10, 8, 1)
    # a committed shard cannot be committed again, nor heartbeated, nor claimed
    assert not await store.complete_shard(new, result(1, 1, tag="again"), 0)
    assert await store.heartbeat_shard(new, LEASE, 0, 0, Usage()) is None
    clock.advance(LEASE * 10)
    assert await store.claim_shard("w3", LEASE) is None


async def test_old_attempt_fenced_even_when_the_same_worker_reclaims(
    store: MetadataStore, clock: Clock
) -> None:
    await planned_batch(store, shards=1)
    old = await claim(store, "w1")
    clock.advance(LEASE + 1)
    new = await claim(store, "w1")
    assert new.attempt == 2
    assert await store.heartbeat_shard(old, LEASE, 1, 0, Usage()) is None
    assert not await store.complete_shard(old, result(10, 0, tag="old"), 0)
    assert await store.complete_shard(new, result(10, 0, tag="new"), 0)


async def test_counts_and_usage_are_sums_over_shards(store: MetadataStore) -> None:
    b = await planned_batch(store, shards=3)
    c0, c1, c2 = [await claim(store, f"w{i}") for i in range(3)]
    # live progress from heartbeats, before any shard is done
    assert await store.heartbeat_shard(c0, LEASE, 3, 1, Usage(30, 3, 6, 1)) is not None
    assert await store.heartbeat_shard(c1, LEASE, 2, 0, Usage(20, 0, 4, 0)) is not None
    got = await store.get_batch(ALICE, b.id)
    assert got is not None
    assert (got.total, got.completed, got.failed) == (30, 5, 1)
    assert got.usage == Usage(50, 3, 10, 1)
    listed = (await store.list_batches(ALICE, limit=1, after=None)).items[0]
    assert (listed.completed, listed.failed, listed.usage) == (5, 1, Usage(50, 3, 10, 1))

    assert await store.complete_shard(c0, result(9, 1, Usage(90, 9, 18, 2), tag="0"), 0)
    assert await store.complete_shard(c1, result(10, 0, Usage(100, 0, 20, 0), tag="1"), 0)
    assert await store.complete_shard(c2, result(6, 4, Usage(60, 1, 12, 3), tag="2"), 0)
    got = await store.get_batch(ALICE, b.id)
    assert got is not None
    assert (got.total, got.completed, got.failed) == (30, 25, 5)
    assert got.usage == Usage(250, 10, 50, 5)
    assert got.to_wire()["usage"]["total_tokens"] == 300


async def test_counts_do_not_mix_batches(store: MetadataStore) -> None:
    b1 = await planned_batch(store, shards=1)
    b2 = await planned_batch(store, shards=1, owner=BOB)
    c1 = await claim(store, "w1")
    c2 = await claim(store, "w2")
    assert {c1.shard.batch_id, c2.shard.batch_id} == {b1.id, b2.id}
    by_batch = {c.shard.batch_id: c for c in (c1, c2)}
    assert await store.complete_shard(by_batch[b1.id], result(7, 3, tag="x"), 0)
    got1, got2 = await store.get_batch(ALICE, b1.id), await store.get_batch(BOB, b2.id)
    assert got1 is not None and got2 is not None
    assert (got1.completed, got1.failed) == (7, 3)
    assert (got2.completed, got2.failed) == (0, 0)


async def test_cancelling_batches_are_drained_first(store: MetadataStore) -> None:
    b1 = await planned_batch(store, shards=2)
    b2 = await planned_batch(store, shards=2)
    await store.request_cancel(ALICE, b2.id)
    c = await claim(store, "w1")
    assert c.shard.batch_id == b2.id
    assert c.batch_status == S.CANCELLING
    assert b1.id != b2.id


async def test_batch_expired_lines(store: MetadataStore) -> None:
    b = await planned_batch(store, shards=2)
    c0, c1 = await claim(store, "w1"), await claim(store, "w2")
    assert await store.batch_expired_lines(b.id) == 0
    assert await store.complete_shard(c0, result(4, 6, tag="0"), 6)
    assert await store.complete_shard(c1, result(0, 10, tag="1"), 10)
    assert await store.batch_expired_lines(b.id) == 16


# -- finalization ---------------------------------------------------------------------------------------------


async def test_claim_finalization_only_when_all_shards_are_done(store: MetadataStore) -> None:
    b = await planned_batch(store, shards=2)
    assert await store.claim_finalization("f1", LEASE) is None
    c0 = await claim(store, "w1")
    assert await store.complete_shard(c0, result(10, 0, tag="0"), 0)
    assert await store.claim_finalization("f1", LEASE) is None
    c1 = await claim(store, "w1")
    assert await store.claim_finalization("f1", LEASE) is None  # running is not done
    assert await store.complete_shard(c1, result(10, 0, tag="1"), 0)
    job = await store.claim_finalization("f1", LEASE)
    assert job is not None
    assert job.batch.id == b.id
    assert job.batch.completed == 20
    assert await store.claim_finalization("f2", LEASE) is None


async def test_finalization_lease_is_taken_over(store: MetadataStore, clock: Clock) -> None:
    b = await planned_batch(store, shards=1)
    await run_all_shards(store, b)
    assert await store.claim_finalization("f1", LEASE) is not None
    assert await store.begin_finalizing(b.id, "f1") is not None
    clock.advance(LEASE + 1)
    job = await store.claim_finalization("f2", LEASE)
    assert job is not None and job.batch.status == S.FINALIZING  # a dead finalizer's batch is resumed
    assert await store.begin_finalizing(b.id, "f1") is None
    assert not await store.finish_batch(b.id, "f1", S.COMPLETED, None, None)
    assert await store.finish_batch(b.id, "f2", S.COMPLETED, None, None)


async def test_begin_finalizing(store: MetadataStore, clock: Clock) -> None:
    b = await planned_batch(store, shards=1)
    await run_all_shards(store, b)
    assert await store.claim_finalization("f1", LEASE) is not None
    assert await store.begin_finalizing(b.id, "other") is None
    clock.advance(5)
    got = await store.begin_finalizing(b.id, "f1")
    assert got is not None
    assert got.status == S.FINALIZING
    assert got.finalizing_at == int(T0 + 5)
    assert got.completed == 10
    again = await store.begin_finalizing(b.id, "f1")  # idempotent for the holder
    assert again is not None and again.status == S.FINALIZING and again.finalizing_at == int(T0 + 5)


async def test_begin_finalizing_a_cancelling_batch_keeps_it_cancelling(store: MetadataStore) -> None:
    b = await planned_batch(store, shards=1)
    await store.request_cancel(ALICE, b.id)
    await run_all_shards(store, b)
    assert await store.claim_finalization("f1", LEASE) is not None
    got = await store.begin_finalizing(b.id, "f1")
    assert got is not None
    assert got.status == S.CANCELLING
    assert got.finalizing_at is None
    assert await store.finish_batch(b.id, "f1", S.CANCELLED, None, None)
    final = await store.get_batch(ALICE, b.id)
    assert final is not None and final.status == S.CANCELLED and final.cancelled_at == int(T0)


async def test_finish_batch(store: MetadataStore, clock: Clock) -> None:
    b = await planned_batch(store, shards=2)
    await run_all_shards(store, b)
    assert await store.claim_finalization("f1", LEASE) is not None
    assert await store.begin_finalizing(b.id, "f1") is not None
    out = FileRecord(
        id="file-out",
        owner=ALICE,
        bytes=1234,
        created_at=int(T0),
        filename=f"{b.id}_output.jsonl",
        purpose="batch_output",
        blob_key="files/file-out",
        sha256="ab" * 32,
        expires_at=int(T0) + 3600,
    )
    err = FileRecord(
        id="file-err",
        owner=ALICE,
        bytes=10,
        created_at=int(T0),
        filename=f"{b.id}_error.jsonl",
        purpose="batch_output",
        blob_key="files/file-err",
        sha256="cd" * 32,
    )
    assert not await store.finish_batch(b.id, "other", S.COMPLETED, out, err)
    assert await store.get_file(None, out.id) is None
    clock.advance(9)
    assert await store.finish_batch(b.id, "f1", S.COMPLETED, out, err)
    got = await store.get_batch(ALICE, b.id)
    assert got is not None
    assert got.status == S.COMPLETED
    assert got.completed_at == int(T0 + 9)
    assert (got.output_file_id, got.error_file_id) == ("file-out", "file-err")
    assert (got.total, got.completed, got.failed) == (20, 20, 0)
    assert await store.get_file(ALICE, "file-out") == out
    assert await store.get_file(ALICE, "file-err") == err
    page = await store.list_files(ALICE, purpose="batch_output", limit=10, order="asc", after=None)
    assert [f.id for f in page.items] == ["file-out", "file-err"]
    # finished: no more jobs, and the lease is released
    clock.advance(LEASE * 10)
    assert await store.claim_finalization("f2", LEASE) is None
    assert not await store.finish_batch(b.id, "f1", S.COMPLETED, out, err)


async def test_finish_batch_without_files(store: MetadataStore) -> None:
    b = await planned_batch(store, shards=1)
    await run_all_shards(store, b)
    assert await store.claim_finalization("f1", LEASE) is not None
    assert await store.begin_finalizing(b.id, "f1") is not None
    assert await store.finish_batch(b.id, "f1", S.EXPIRED, None, None)
    got = await store.get_batch(ALICE, b.id)
    assert got is not None
    assert (got.status, got.expired_at, got.output_file_id, got.error_file_id) == (
        S.EXPIRED,
        int(T0),
        None,
        None,
    )


async def test_finish_batch_checks_the_transition(store: MetadataStore) -> None:
    b = await planned_batch(store, shards=1)
    await run_all_shards(store, b)
    assert await store.claim_finalization("f1", LEASE) is not None
    # still in_progress: in_progress -> completed skips finalizing
    with pytest.raises(IllegalTransition):
        await store.finish_batch(b.id, "f1", S.COMPLETED, None, None)
    got = await store.get_batch(ALICE, b.id)
    assert got is not None and got.status == S.IN_PROGRESS


async def test_zero_shard_batch_goes_straight_to_finalization(store: MetadataStore) -> None:
    _, b = await new_batch(store)
    assert await store.claim_validation("w1", LEASE) is not None
    assert await store.plan_batch(b.id, "w1", [], 0, None)
    job = await store.claim_finalization("f1", LEASE)
    assert job is not None and job.batch.id == b.id and job.batch.total == 0


async def test_worker_sweep_ends_expired_uploads_and_removes_their_parts(
    store: MetadataStore, clock: Clock, tmp_path: Path
) -> None:
    """The worker's sweeper (every 30 s) marks pending uploads past their hour expired and deletes their parts."""
    from batchyard.blobs.local import LocalBlobStore
    from batchyard.config import Settings
    from batchyard.execution.worker import Worker
    from batchyard.upstreams.router import Router

    blobs = LocalBlobStore(tmp_path / "blobs")
    u, live = upload_rec(), upload_rec()
    live.expires_at += 7200
    for rec in (u, live):
        await store.insert_upload(rec)
        w = await blobs.open_writer(f"uploads/{rec.id}/p1")
        await w.write(b"part")
        await w.commit()
        await store.insert_upload_part(
            UploadPartRecord("p1" + rec.id, rec.id, 4, f"uploads/{rec.id}/p1", int(T0))
        )
    worker = Worker(store, blobs, Router([]), Settings(data_dir=tmp_path))
    await worker.sweep()
    assert (await blobs.exists(f"uploads/{u.id}/p1")) and (await blobs.exists(f"uploads/{live.id}/p1"))
    clock.t = T0 + 3600
    await worker.sweep()
    got = await store.get_upload(ALICE, u.id)
    assert got is not None and got.status == "expired" and got.to_wire(clock.t)["status"] == "expired"
    assert not await blobs.exists(f"uploads/{u.id}/p1")
    assert await blobs.exists(f"uploads/{live.id}/p1")  # not expired yet: untouched


async def test_release_worker_gives_back_a_dead_workers_leases_at_once(store: MetadataStore) -> None:
    b = await planned_batch(store, shards=3)
    dead = await claim(store, "w-dead")
    live = await claim(store, "w-live")
    assert await store.heartbeat_shard(dead, LEASE, 4, 1, Usage(input_tokens=9)) is not None
    _, other = await new_batch(store)
    job = await store.claim_validation("w-dead", LEASE)
    assert job is not None and job.batch.id == other.id
    assert await store.release_worker("w-dead") == 1
    # the dead worker's shard is claimable now (not after LEASE), with a new attempt; its progress is gone
    again = await store.claim_shard("w-new", LEASE)
    assert again is not None and again.shard.index == dead.shard.index and again.attempt > dead.attempt
    assert not await store.complete_shard(dead, result(5, 0), 0)  # the dead attempt is fenced off
    assert (
        await store.heartbeat_shard(live, LEASE, 1, 0, Usage()) is not None
    )  # the live worker keeps its lease
    job2 = await store.claim_validation("w-new", LEASE)  # the validation job is free again too
    assert job2 is not None and job2.batch.id == other.id
    assert await store.release_worker("w-nobody") == 0
    got = await store.get_batch(None, b.id)
    assert got is not None and (got.completed, got.failed) == (1, 0)  # the live worker's progress only


async def test_a_failed_attempt_counts_and_a_paused_shard_waits(store: MetadataStore, clock: Clock) -> None:
    await planned_batch(store, shards=1)
    first = await claim(store, "w1")
    assert first.shard.failures == 0 and first.shard.last_error is None
    await store.release_shard(first, failure="ValueError: boom")  # a failure, claimable again at once
    second = await claim(store, "w2")
    assert (second.shard.failures, second.shard.last_error) == (1, "ValueError: boom")
    await store.release_shard(second, retry_in=5.0)  # paused (storage down): not a failure, not claimable yet
    assert await store.claim_shard("w3", LEASE) is None
    clock.advance(5.1)
    third = await claim(store, "w3")
    assert (third.shard.failures, third.shard.last_error) == (1, "ValueError: boom")
    await store.release_shard(second, failure="stale attempt")  # fenced: an old attempt changes nothing
    assert await store.release_worker("w3") == 1  # a crashed worker: counts as a failure of its shard
    fourth = await claim(store, "w4")
    assert fourth.shard.failures == 2 and fourth.shard.last_error == "the worker process running it died"
    await store.release_shard(fourth)  # a graceful hand-back: no failure
    fifth = await claim(store, "w5")
    assert fifth.shard.failures == 2


async def test_listen_pushes_cancels_and_new_work_to_other_processes(
    backend: str, make_store: StoreFactory, clock: Clock
) -> None:
    if backend != "postgres":
        store = make_store(clock)
        await store.open()
        try:
            assert await store.listen(lambda what: None) is False  # no push: workers poll and heartbeat
        finally:
            await store.close()
        return
    api, worker = make_store(clock), make_store(clock)
    await api.open()
    await worker.open()
    heard: list[str] = []

    async def hear(n: int) -> None:
        for _ in range(500):
            if len(heard) >= n:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"heard only {heard}")

    listening = asyncio.create_task(worker.listen(heard.append))
    try:
        await hear(1)
        assert heard == ["work"]  # once when subscribed: what changed while nobody listened
        b = await planned_batch(api, shards=1)  # created, then planned: new work twice
        await hear(3)
        assert await api.request_cancel(ALICE, b.id) is not None
        await hear(4)
        assert heard == ["work", "work", "work", "cancel"]
        assert await api.request_cancel(ALICE, b.id) is not None  # already cancelling: nothing to tell
        await asyncio.sleep(0.3)
        assert heard[-1] == "cancel" and len(heard) == 4
    finally:
        listening.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await listening
        await api.close()
        await worker.close()


async def test_a_job_on_a_deleted_input_file_has_no_input_file(store: MetadataStore) -> None:
    f, b = await new_batch(store)
    assert await store.delete_file(ALICE, f.id) is not None
    job = await store.claim_validation("v", LEASE)
    assert job is not None and job.batch.id == b.id and job.input_file is None  # validation fails the batch


# -- webhooks ---------------------------------------------------------------------------------------------------


async def finished(store: MetadataStore, status: BatchStatus = S.COMPLETED) -> BatchRecord:
    b = await planned_batch(store, shards=1)
    await run_all_shards(store, b)
    if status == S.CANCELLED:
        await store.request_cancel(ALICE, b.id)
    assert await store.claim_finalization("fin", LEASE) is not None
    if status != S.CANCELLED:
        assert await store.begin_finalizing(b.id, "fin") is not None
    assert await store.finish_batch(b.id, "fin", status, None, None)
    return b


async def test_a_final_status_writes_one_webhook_event(store: MetadataStore, clock: Clock) -> None:
    assert await store.claim_webhook_events("d1", LEASE, 10, 0) == []
    b = await finished(store)
    (ev,) = await store.claim_webhook_events("d1", LEASE, 10, 0)
    assert (ev.batch_id, ev.owner, ev.type, ev.created_at, ev.attempts) == (
        b.id,
        ALICE,
        "batch.completed",
        int(T0),
        0,
    )
    assert ev.id.startswith("evt_")
    assert ev.to_wire() == {
        "id": ev.id,
        "object": "event",
        "type": "batch.completed",
        "created_at": int(T0),
        "data": {"id": b.id},
    }
    assert await store.claim_webhook_events("d2", LEASE, 10, 0) == []  # leased to d1
    assert not await store.settle_webhook_event(ev.id, "d2", "delivered", None, None)  # not d2's
    assert await store.settle_webhook_event(ev.id, "d1", "delivered", None, None)
    clock.t += 2 * LEASE
    assert await store.claim_webhook_events("d2", LEASE, 10, 0) == []  # delivered: never again


async def test_a_failed_delivery_is_due_again_later_and_a_lost_lease_is_taken_over(
    store: MetadataStore, clock: Clock
) -> None:
    await finished(store)
    (ev,) = await store.claim_webhook_events("d1", LEASE, 10, 0)
    assert await store.settle_webhook_event(ev.id, "d1", "pending", clock.t + 30, "HTTP 500")
    assert await store.claim_webhook_events("d1", LEASE, 10, 0) == []  # not due yet
    clock.t += 30
    (again,) = await store.claim_webhook_events("d1", LEASE, 10, 0)
    assert (again.id, again.attempts) == (ev.id, 1)
    clock.t += LEASE + 1  # d1 died holding it
    (taken,) = await store.claim_webhook_events("d2", LEASE, 10, 0)
    assert taken.id == ev.id
    assert not await store.settle_webhook_event(ev.id, "d1", "delivered", None, None)  # d1's lease is gone
    assert await store.settle_webhook_event(ev.id, "d2", "abandoned", None, "gave up")
    clock.t += 3600
    assert await store.claim_webhook_events("d3", LEASE, 10, 0) == []


@pytest.mark.parametrize("status", ["bogus", "completed"])
async def test_a_webhook_event_settles_only_in_a_webhook_status(store: MetadataStore, status: str) -> None:
    await finished(store)
    (ev,) = await store.claim_webhook_events("d1", LEASE, 10, 0)
    with pytest.raises(IllegalTransition):
        await store.settle_webhook_event(ev.id, "d1", status, None, None)
    assert await store.settle_webhook_event(ev.id, "d1", "delivered", None, None)  # still pending, still d1's


async def test_shard_statuses_read_back_as_the_enum(store: MetadataStore) -> None:
    b = await planned_batch(store, shards=2)
    c = await claim(store, "w1")
    assert c.shard.status is ShardStatus.RUNNING
    assert await store.complete_shard(c, result(10, 0, tag="0"), 0)
    (done,) = await store.done_shards(b.id)
    assert done.status == ShardStatus.DONE and isinstance(done.status, ShardStatus)


async def test_webhook_event_types_and_the_since_filter(store: MetadataStore, clock: Clock) -> None:
    _, failed = await new_batch(store)
    assert await store.claim_validation("v", LEASE) is not None
    assert await store.fail_batch(failed.id, "v", [{"code": "x", "message": "y"}])
    clock.t += 100
    cancelled = await finished(store, S.CANCELLED)
    events = await store.claim_webhook_events("d1", LEASE, 10, 0)
    assert [(e.batch_id, e.type) for e in events] == [
        (failed.id, "batch.failed"),
        (cancelled.id, "batch.cancelled"),
    ]
    for e in events:
        assert await store.settle_webhook_event(e.id, "d1", "pending", clock.t, None)
    late = await store.claim_webhook_events(
        "d1", LEASE, 10, int(T0) + 50
    )  # events older than `since` are skipped
    assert [e.batch_id for e in late] == [cancelled.id]


# -- per-key usage (caps) ---------------------------------------------------------------------------------------


async def test_owner_usage_counts_live_files_pending_uploads_and_unfinished_batches(
    store: MetadataStore, clock: Clock
) -> None:
    from batchyard.store.base import OwnerUsage

    assert await store.owner_usage(ALICE) == OwnerUsage(0, 0, 0, 0)
    kept, gone, expiring = file_rec(), file_rec(), file_rec(expires_at=int(T0) + 60)
    for f in (kept, gone, expiring):
        await store.insert_file(f)
    await store.insert_file(file_rec(BOB))
    assert await store.delete_file(ALICE, gone.id) is not None
    up, done = upload_rec(), upload_rec()
    await store.insert_upload(up)
    await store.insert_upload(done)
    assert await store.finish_upload(ALICE, done.id, "cancelled", None)
    await store.insert_upload(upload_rec(BOB))
    running = batch_rec(kept.id)
    failed = batch_rec(kept.id)
    await store.insert_batch(running)
    await store.insert_batch(failed)
    await store.insert_batch(batch_rec(kept.id, BOB))
    # the oldest validating batch is claimed first: fail `running`'s sibling by claiming until it is ours
    while (job := await store.claim_validation("w1", LEASE)) is not None and job.batch.id != failed.id:
        pass
    assert job is not None
    assert await store.fail_batch(failed.id, "w1", [{"code": "x", "message": "m", "param": None, "line": 1}])

    usage = await store.owner_usage(ALICE)
    assert usage == OwnerUsage(
        files=2, stored_bytes=kept.bytes + expiring.bytes, pending_uploads=1, active_batches=1
    )
    clock.advance(3600)  # the file's expiry and the upload's hour have passed
    assert await store.owner_usage(ALICE) == OwnerUsage(1, kept.bytes, 0, 1)
    assert (await store.owner_usage(BOB)).files == 1


# -- blob lifecycle (sweeper) ---------------------------------------------------------------------------------


async def _fail_validation(store: MetadataStore, batch_id: str) -> None:
    job = await store.claim_validation("validator", LEASE)
    assert job is not None and job.batch.id == batch_id
    assert await store.fail_batch(batch_id, "validator", [{"code": "x", "message": "m", "param": None}])


async def test_a_deleted_files_blob_is_removable_once_no_live_batch_reads_it(store: MetadataStore) -> None:
    f, b = await new_batch(store)  # validating: it will read f
    kept = file_rec()
    await store.insert_file(kept)
    res = await store.delete_file(ALICE, f.id)
    assert res is not None and res[1] is False  # the route keeps the blob
    assert await store.removable_deleted_files(10) == []
    await _fail_validation(store, b.id)  # the batch is final: nothing reads f any more
    assert await store.removable_deleted_files(10) == [f]
    await store.forget_file_blob(f.id)
    assert await store.removable_deleted_files(10) == []  # not offered twice
    await store.forget_file_blob(kept.id)  # a file not deleted is never forgotten
    assert await store.needed_blob_keys([kept.blob_key]) == {kept.blob_key}


async def test_removable_deleted_files_honours_the_limit(store: MetadataStore) -> None:
    files = [file_rec() for _ in range(3)]
    for f in files:
        await store.insert_file(f)
        await store.delete_file(ALICE, f.id)
    assert await store.removable_deleted_files(2) == files[:2]


async def test_needed_blob_keys(store: MetadataStore) -> None:
    live, deleted, forgotten = file_rec(), file_rec(), file_rec()
    for f in (live, deleted, forgotten):
        await store.insert_file(f)
    await store.delete_file(ALICE, deleted.id)
    await store.delete_file(ALICE, forgotten.id)
    await store.forget_file_blob(forgotten.id)
    pending, done = upload_rec(), upload_rec()
    for u in (pending, done):
        await store.insert_upload(u)
        await store.insert_upload_part(
            UploadPartRecord(f"part_{u.id}", u.id, 4, f"uploads/{u.id}/p", int(T0))
        )
    assert await store.finish_upload(ALICE, done.id, "cancelled", None)
    keys = [f.blob_key for f in (live, deleted, forgotten)] + [f"uploads/{u.id}/p" for u in (pending, done)]
    assert await store.needed_blob_keys([*keys, "files/never-was"]) == {
        live.blob_key,
        deleted.blob_key,  # a deleted file's blob is the sweeper's, through removable_deleted_files
        f"uploads/{pending.id}/p",
    }
    assert await store.needed_blob_keys([]) == set()


async def test_batches_done_with(store: MetadataStore) -> None:
    live = await planned_batch(store)  # in_progress
    _, failed = await new_batch(store)
    await _fail_validation(store, failed.id)
    assert await store.batches_done_with([live.id, failed.id, "batch_unknown"]) == {
        failed.id,
        "batch_unknown",
    }
    assert await store.batches_done_with([]) == set()


# -- aggregates (metrics) -------------------------------------------------------------------------------------


async def test_batch_stats_count_batches_by_status_and_the_lines_not_yet_answered(
    store: MetadataStore,
) -> None:
    from batchyard.store.base import BatchStats

    assert await store.batch_stats() == BatchStats({}, 0)
    _, failed = await new_batch(store)
    await _fail_validation(store, failed.id)
    done = await planned_batch(store, shards=1)
    await run_all_shards(store, done)
    assert await store.claim_finalization("f1", LEASE) is not None
    assert await store.begin_finalizing(done.id, "f1") is not None
    assert await store.finish_batch(done.id, "f1", S.COMPLETED, None, None)
    running = await planned_batch(store, shards=3, owner=BOB)
    await new_batch(store)  # validating: its lines are not known yet
    c0, c1 = await claim(store, "w0"), await claim(store, "w1")
    assert {c0.shard.batch_id, c1.shard.batch_id} == {running.id}
    assert await store.heartbeat_shard(c0, LEASE, 3, 1, Usage()) is not None  # live progress counts
    assert await store.complete_shard(c1, result(8, 2, tag="1"), 0)
    stats = await store.batch_stats()
    assert stats.by_status == {S.FAILED: 1, S.COMPLETED: 1, S.IN_PROGRESS: 1, S.VALIDATING: 1}
    assert stats.lines_waiting == 30 - 4 - 10
    await store.release_shard(c0)  # its progress goes with it: those lines are run again
    assert (await store.batch_stats()).lines_waiting == 20
    await store.request_cancel(BOB, running.id)  # cancelling: still unanswered until drained
    stats = await store.batch_stats()
    assert stats.by_status[S.CANCELLING] == 1 and S.IN_PROGRESS not in stats.by_status
    assert stats.lines_waiting == 20


# -- projects and API keys ------------------------------------------------------------------------------------


def _project(name: str) -> ProjectRecord:
    from batchyard.domain.tenancy import project_id

    return ProjectRecord(project_id(), name, int(T0) + _next())


async def test_project_names_are_unique_and_projects_list_in_creation_order(store: MetadataStore) -> None:
    a, b = _project("alpha"), _project("beta")
    assert await store.insert_project(a) and await store.insert_project(b)
    assert not await store.insert_project(_project("alpha"))  # the name is taken: nothing inserted
    assert await store.get_project(a.id) == a
    assert await store.project_by_name("beta") == b
    assert await store.get_project("proj_unknown") is None and await store.project_by_name("nope") is None
    page = await store.list_projects(limit=1, after=None, include_archived=False)
    assert page.items == [a] and page.has_more
    page = await store.list_projects(limit=5, after=a.id, include_archived=False)
    assert page.items == [b] and not page.has_more
    assert (await store.list_projects(limit=5, after="proj_unknown", include_archived=True)).items == []


async def test_archiving_a_project_stamps_it_once_and_hides_it_from_the_default_list(
    store: MetadataStore,
) -> None:
    a, b = _project("alpha"), _project("beta")
    await store.insert_project(a)
    await store.insert_project(b)
    archived = await store.archive_project(a.id, 111)
    assert archived is not None and archived.archived_at == 111 and archived.archived
    again = await store.archive_project(a.id, 222)
    assert again is not None and again.archived_at == 111
    assert await store.archive_project("proj_unknown", 1) is None
    assert (await store.list_projects(limit=5, after=None, include_archived=False)).items == [b]
    listed = (await store.list_projects(limit=5, after=None, include_archived=True)).items
    assert [p.id for p in listed] == [a.id, b.id]


async def test_keys_are_found_by_hash_with_their_project_and_revoked_once(store: MetadataStore) -> None:
    from batchyard.domain.tenancy import key_hash, make_key

    a, b = _project("alpha"), _project("beta")
    await store.insert_project(a)
    await store.insert_project(b)
    assert not await store.has_api_keys()
    secret, k1 = make_key(a.id, "k1", admin=True, now=10)
    _, k2 = make_key(b.id, "k2", admin=False, now=11)
    _, k3 = make_key(a.id, "k3", admin=False, now=12)
    for k in (k1, k2, k3):
        await store.insert_api_key(k)
    assert await store.has_api_keys()
    holder = await store.key_holder(key_hash(secret))
    assert holder is not None and holder.key == k1 and holder.project == a and holder.active
    assert holder.key.admin is True
    assert await store.key_holder(key_hash(secret + "x")) is None
    assert (await store.list_api_keys(None, limit=10, after=None)).items == [k1, k2, k3]
    page = await store.list_api_keys(a.id, limit=1, after=None)
    assert page.items == [k1] and page.has_more
    assert (await store.list_api_keys(a.id, limit=5, after=k1.id)).items == [k3]
    revoked = await store.revoke_api_key(k1.id, 50)
    assert revoked is not None and revoked.revoked_at == 50
    again = await store.revoke_api_key(k1.id, 60)
    assert again is not None and again.revoked_at == 50
    assert await store.revoke_api_key("key_unknown", 1) is None
    holder = await store.key_holder(key_hash(secret))
    assert holder is not None and holder.key.revoked and not holder.active
    await store.archive_project(b.id, 70)
    holder2 = await store.key_holder(k2.key_hash)
    assert holder2 is not None and not holder2.key.revoked and not holder2.active


async def test_a_key_needs_an_existing_project(store: MetadataStore) -> None:
    from batchyard.domain.tenancy import make_key

    _, k = make_key("proj_missing", "k", admin=False, now=1)
    with pytest.raises(StoreError):
        await store.insert_api_key(k)


async def test_enqueued_input_bytes_count_an_owners_running_batches_of_one_model(
    store: MetadataStore,
) -> None:
    assert await store.enqueued_input_bytes(ALICE, "test-model") == 0
    one = await planned_batch(store, shards=1)
    await run_all_shards(store, one)  # its lines are answered, but it is in progress until finalized
    two = await planned_batch(store, shards=1)
    await planned_batch(store, shards=1, owner=BOB)
    await new_batch(store)  # validating: not enqueued yet
    sizes = {}
    for b in (one, two):
        f = await store.get_file(None, b.input_file_id)
        assert f is not None
        sizes[b.id] = f.bytes
    assert await store.enqueued_input_bytes(ALICE, "test-model") == sizes[one.id] + sizes[two.id]
    assert await store.enqueued_input_bytes(ALICE, "other-model") == 0
    await store.request_cancel(ALICE, two.id)  # cancelling still sends its in-flight lines
    assert await store.enqueued_input_bytes(ALICE, "test-model") == sizes[one.id] + sizes[two.id]
    assert await store.claim_finalization("f1", LEASE) is not None
    assert await store.begin_finalizing(one.id, "f1") is not None  # nothing left to send
    assert await store.enqueued_input_bytes(ALICE, "test-model") == sizes[two.id]


async def test_plan_batch_admits_against_what_is_enqueued_in_its_own_transaction(
    store: MetadataStore,
) -> None:
    one = await planned_batch(store, shards=1)
    f1 = await store.get_file(None, one.input_file_id)
    assert f1 is not None
    _, b = await new_batch(store)
    assert await store.claim_validation("v", LEASE) is not None
    seen: list[int] = []

    def refuse(enqueued: int) -> bool:
        seen.append(enqueued)
        return False

    with pytest.raises(OverEnqueued) as over:
        await store.plan_batch(b.id, "v", plans(2), 20, "test-model", admit=refuse)
    assert seen == [f1.bytes] and over.value.enqueued == f1.bytes  # the other planned batch, not this one
    got = await store.get_batch(ALICE, b.id)
    assert got is not None and got.status == S.VALIDATING and not await store.done_shards(b.id)
    assert await store.claim_shard("r", LEASE) is not None  # only the first batch's shard is there
    assert await store.claim_shard("r", LEASE) is None
    # no model: nothing to count, admit is not asked
    assert await store.plan_batch(b.id, "v", plans(2), 20, None, admit=refuse)
    assert seen == [f1.bytes]


async def test_batches_planned_at_once_are_admitted_in_turn(
    backend: str, make_store: StoreFactory, clock: Clock
) -> None:
    needs_a_database(backend, "several stores sharing one database; each MemoryStore has its own state")
    async with several_stores(make_store, clock, 6) as stores:
        batches = []
        for i, s in enumerate(stores):
            f, b = await new_batch(s)
            job = await s.claim_validation(f"v{i}", LEASE)
            assert job is not None and job.batch.id == b.id
            batches.append((s, f"v{i}", b, f.bytes))
        sizes = [n for *_, n in batches]
        most = max(sizes)
        assert 2 * min(sizes) > most  # so "at most one other batch enqueued" is "enqueued <= most"

        async def plan(s: MetadataStore, worker: str, b: BatchRecord) -> bool:
            try:
                # room for two: each admitted while at most one other is enqueued, whatever the interleaving
                return await s.plan_batch(
                    b.id, worker, plans(1), 10, "test-model", admit=lambda enqueued: enqueued <= most
                )
            except OverEnqueued:
                return False

        got = await asyncio.gather(*(plan(s, w, b) for s, w, b, _ in batches))
        assert sorted(got) == [False] * 4 + [True] * 2
        planned = [n for (*_, n), ok in zip(batches, got, strict=True) if ok]
        assert await stores[0].enqueued_input_bytes(ALICE, "test-model") == sum(planned)


# -- idempotency keys -----------------------------------------------------------------------------------------


def idem(
    object_id: str, *, owner: str = ALICE, key: str = "k1", fp: str = "fp", at: int = int(T0)
) -> IdempotencyKey:
    return IdempotencyKey(owner, key, "batches", fp, object_id, at)


async def test_an_idempotency_key_is_claimed_once(store: MetadataStore) -> None:
    live = int(T0) - TTL_S
    first = idem("batch_a")
    assert await store.claim_idempotency_key(first, live) == first
    # a second claim of the key (other parameters, other object) gets the first row back, unchanged
    assert await store.claim_idempotency_key(idem("batch_b", fp="other"), live) == first
    # keys are per owner
    bobs = idem("batch_c", owner=BOB)
    assert await store.claim_idempotency_key(bobs, live) == bobs
    assert await store.claim_idempotency_key(idem("batch_a", owner=ALICE), live) == first


async def test_an_idempotency_key_older_than_the_window_is_replaced(store: MetadataStore) -> None:
    old = idem("batch_old", at=int(T0) - TTL_S - 1)
    assert await store.claim_idempotency_key(old, int(T0) - 2 * TTL_S) == old
    new = idem("batch_new", fp="other")
    assert await store.claim_idempotency_key(new, int(T0) - TTL_S) == new
    assert await store.claim_idempotency_key(idem("batch_x"), int(T0) - TTL_S) == new


async def test_a_dropped_idempotency_key_may_be_claimed_again(store: MetadataStore) -> None:
    live = int(T0) - TTL_S
    await store.claim_idempotency_key(idem("batch_a"), live)
    await store.drop_idempotency_key(ALICE, "k1", "batch_other")  # names another object: kept
    assert (await store.claim_idempotency_key(idem("batch_b"), live)).object_id == "batch_a"
    await store.drop_idempotency_key(ALICE, "k1", "batch_a")
    assert (await store.claim_idempotency_key(idem("batch_b"), live)).object_id == "batch_b"


async def test_racing_claims_of_one_key_have_one_winner(
    backend: str, make_store: StoreFactory, clock: Clock
) -> None:
    needs_a_database(backend, "several stores sharing one database; each MemoryStore has its own state")
    async with several_stores(make_store, clock, 6) as stores:
        live = int(T0) - TTL_S
        got = await asyncio.gather(
            *(s.claim_idempotency_key(idem(f"batch_{i}"), live) for i, s in enumerate(stores))
        )
        assert len({g.object_id for g in got}) == 1
        winner = got[0].object_id
        assert sum(1 for i, g in enumerate(got) if g.object_id == f"batch_{i}") == 1
        assert winner.startswith("batch_")


# -- deleting an ended batch ----------------------------------------------------------------------------------


async def test_only_an_ended_batch_is_deleted(store: MetadataStore) -> None:
    live = await planned_batch(store)
    got = await store.delete_batch(ALICE, live.id)
    assert got is not None and got.status == S.IN_PROGRESS
    assert await store.get_batch(ALICE, live.id) is not None
    _, failed = await new_batch(store)
    await _fail_validation(store, failed.id)
    assert await store.delete_batch(BOB, failed.id) is None  # another owner's: as unknown
    got = await store.delete_batch(ALICE, failed.id)
    assert got is not None and got.status == S.FAILED
    assert await store.get_batch(ALICE, failed.id) is None
    assert await store.delete_batch(ALICE, failed.id) is None
    assert [b.id for b in (await store.list_batches(ALICE, limit=10, after=None)).items] == [live.id]


# -- per-outcome counts ---------------------------------------------------------------------------------------


async def test_per_outcome_counts_sum_the_committed_shards(store: MetadataStore) -> None:
    b = await planned_batch(store, shards=3)
    first = await claim(store, "w1")
    r = ShardResult(4, 6, Usage(), "o", "e", cancelled=2, upstream_failed=3)
    assert await store.complete_shard(first, r, 1)
    second = await claim(store, "w2")
    assert await store.complete_shard(second, ShardResult(9, 1, Usage(), None, "e2", upstream_failed=1), 0)
    third = await claim(store, "w3")  # running: its progress counts in `failed`, not in the outcomes
    assert await store.heartbeat_shard(third, LEASE, 2, 5, Usage()) is not None
    got = await store.get_batch(ALICE, b.id)
    assert got is not None and (got.completed, got.failed) == (15, 12)
    assert got.to_wire()["request_counts"] == {
        "total": got.total,
        "completed": 15,
        "failed": 12,
        "succeeded": 15,
        "failed_upstream": 4,
        "expired": 1,
        "cancelled": 2,
        "errored": 0,  # 7 committed error lines: 4 upstream, 1 expired, 2 cancelled
    }


async def test_claims_remove_forgotten_idempotency_keys(store: MetadataStore) -> None:
    old = [idem(f"batch_old{i}", key=f"old{i}", at=int(T0) - TTL_S - 10) for i in range(3)]
    for rec in old:
        assert await store.claim_idempotency_key(rec, int(T0) - 2 * TTL_S) == rec
    await store.claim_idempotency_key(idem("batch_new", key="new"), int(T0) - TTL_S)
    # the old rows are gone: a claim with an older window (which would keep them) gets its own row
    again = idem("batch_again", key="old0", at=int(T0) - TTL_S - 5)
    assert await store.claim_idempotency_key(again, int(T0) - 2 * TTL_S) == again


# -- upstream load across machines (migration 0011) --------------------------------------------------------------


async def test_exchange_load_shows_other_holders_live_rows(store: MetadataStore, clock: Clock) -> None:
    assert await store.exchange_load("w1", "m1", [("up-a", 10, 4), ("up-b", 1, 1)], 3.0) == []
    others = await store.exchange_load("w2", "m2", [("up-a", 7, 2)], 3.0)
    assert [(r.machine, r.upstream, r.demand, r.in_flight) for r in others] == [
        ("m1", "up-a", 10, 4),
        ("m1", "up-b", 1, 1),
    ]
    clock.advance(2.0)
    others = await store.exchange_load("w1", "m1", [("up-a", 12, 5)], 3.0)  # an update, not a second row
    assert [(r.machine, r.upstream, r.demand, r.in_flight) for r in others] == [("m2", "up-a", 7, 2)]
    clock.advance(2.0)  # w2's row is 4 s old: gone; w1's up-b too (not refreshed)
    others = await store.exchange_load("w3", "m3", [], 3.0)
    assert [(r.machine, r.upstream, r.demand) for r in others] == [("m1", "up-a", 12)]
