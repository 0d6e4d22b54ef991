"""The claim order of shards (domain/fairshare.py, store/sql.py `claim_order`), on every MetadataStore: weighted fair
share across owners whichever worker claims, then within an owner the batch with the fewest running shards, the
earliest deadline, the oldest."""

from __future__ import annotations

from collections import Counter

import pytest

from batchyard.domain.models import BatchRecord, ShardClaim
from batchyard.domain.tenancy import ProjectRecord, project_id
from batchyard.store.base import MetadataStore
from tests.contract.conftest import BACKENDS, T0, Clock
from tests.contract.test_store_contract import LEASE, batch_rec, claim, file_rec, plans

A, B = "proj_a", "proj_b"


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def batch(store: MetadataStore, owner: str, shards: int, *, expires_in: int = 86_400) -> BatchRecord:
    """A planned (in_progress) batch of `owner` with `shards` shards, due `expires_in` seconds after T0."""
    f = file_rec(owner)
    await store.insert_file(f)
    b = batch_rec(f.id, owner)
    b.expires_at = int(T0) + expires_in
    await store.insert_batch(b)
    job = await store.claim_validation("validator", LEASE)
    assert job is not None and job.batch.id == b.id
    assert await store.plan_batch(b.id, "validator", plans(shards), shards * 10, "m")
    return b


async def project(store: MetadataStore, pid: str, weight: float | None = None) -> None:
    assert await store.insert_project(ProjectRecord(pid, pid, int(T0)))
    if weight is not None:
        assert await store.set_project_weight(pid, weight) is not None


async def claims(store: MetadataStore, n: int) -> list[ShardClaim]:
    """`n` claims, each by another worker (the order is the store's, not a worker's)."""
    return [await claim(store, f"w{i}") for i in range(n)]


async def test_owners_take_turns_whatever_their_batch_sizes(store: MetadataStore) -> None:
    big = await batch(store, A, 50)
    other_big = await batch(store, A, 50)
    small = await batch(store, B, 2)
    got = await claims(store, 6)
    assert [c.shard.batch_id for c in got] == [big.id, small.id, other_big.id, small.id, big.id, other_big.id]
    assert [c.owner for c in got] == [A, B, A, B, A, A]  # B has nothing left after two shards
    assert {c.weight for c in got} == {1.0}  # owners that are no project weigh 1


async def test_a_project_of_weight_3_gets_three_shards_for_every_one(store: MetadataStore) -> None:
    await project(store, A)
    await project(store, B, 3.0)
    a = await batch(store, A, 20)
    b = await batch(store, B, 20)
    got = await claims(store, 8)
    assert [c.shard.batch_id == b.id for c in got] == [False, True, True, True, False, True, True, True]
    assert Counter(c.owner for c in got) == {A: 2, B: 6}
    assert {(c.owner, c.weight) for c in got} == {(A, 1.0), (B, 3.0)}
    assert a.id != b.id


async def test_within_an_owner_the_earliest_deadline_first(store: MetadataStore) -> None:
    late = await batch(store, A, 3, expires_in=86_400)
    soon = await batch(store, A, 3, expires_in=3_600)  # made later, due sooner
    got = await claims(store, 4)
    # the soonest due first; then the batch with no running shard; then, at one each, the soonest again
    assert [c.shard.batch_id for c in got] == [soon.id, late.id, soon.id, late.id]
    assert [c.shard.index for c in got] == [0, 0, 1, 1]


async def test_only_live_leases_count_as_an_owners_load(store: MetadataStore, clock: Clock) -> None:
    a = await batch(store, A, 5)
    b = await batch(store, B, 5)
    assert (await store.claim_shard("w1", -1.0)) is not None  # A's first shard, its lease already run out
    first = await claim(store, "w2")
    # A's lapsed lease is not load: A (0 running) and B (0) tie, and A's batch is due first
    assert first.shard.batch_id == a.id and first.shard.index == 0  # the lapsed shard is taken over
    assert (await claim(store, "w3")).shard.batch_id == b.id


async def test_cancelling_batches_still_come_first(store: MetadataStore) -> None:
    a = await batch(store, A, 4)
    await claims(store, 2)  # A runs two shards
    b = await batch(store, B, 4)
    assert await store.request_cancel(A, a.id) is not None
    got = await claim(store, "w9")
    assert got.shard.batch_id == a.id  # draining a cancel beats B's fair share
    assert b.id != a.id


async def test_a_projects_weight_is_set_and_read_back(store: MetadataStore) -> None:
    pid = project_id()
    assert await store.insert_project(ProjectRecord(pid, "weighted", int(T0)))
    assert (await store.get_project(pid)) == ProjectRecord(pid, "weighted", int(T0), None, 1.0)
    got = await store.set_project_weight(pid, 2.5)
    assert got is not None and got.weight == 2.5
    assert (await store.project_by_name("weighted")) == got
    assert await store.set_project_weight("proj_unknown", 2.0) is None


async def test_a_claim_may_skip_owners(store: MetadataStore) -> None:
    a = await batch(store, A, 3)
    b = await batch(store, B, 1)
    got = await store.claim_shard("w1", LEASE, not_owners=[A])
    assert got is not None and got.shard.batch_id == b.id
    assert await store.claim_shard("w1", LEASE, not_owners={A, B}) is None
    assert await store.claim_shard("w1", LEASE, not_owners=[B]) is not None
    assert (await claim(store, "w2")).shard.batch_id == a.id  # nothing skipped: A's, the only ones left
