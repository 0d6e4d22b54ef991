"""`MetadataStore.admission_load` on every store: the backlog, the lines of shards done lately and when they started
(admission control's measured throughput, domain/admission.py)."""

from __future__ import annotations

import pytest

from batchyard.domain.admission import AdmissionLoad
from batchyard.store.base import MetadataStore
from tests.contract.conftest import BACKENDS, T0, Clock
from tests.contract.test_claim_order import A, B, batch, project
from tests.contract.test_store_contract import claim, result

WINDOW = 600.0


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def test_a_fresh_store_has_no_figure(store: MetadataStore) -> None:
    assert await store.admission_load(WINDOW) == AdmissionLoad(T0, 0, 0, None, 0, 0)


async def test_lines_done_lately_and_the_backlog(store: MetadataStore, clock: Clock) -> None:
    a = await batch(store, A, 3)  # 3 shards of 10 lines
    b = await batch(store, B, 1)
    first = await claim(store, "w1")
    clock.advance(5)
    second = await claim(store, "w2")
    clock.advance(5)
    assert await store.complete_shard(first, result(8, 2), 0)
    # expired lines were not executed: they are no throughput
    assert await store.complete_shard(second, result(0, 10), 4)
    load = await store.admission_load(WINDOW)
    assert load.now == T0 + 10
    assert load.backlog_lines == 20  # the two shards not done yet
    assert load.done_lines == 10 + 6
    assert load.first_started == T0
    files = {f.id: f.bytes for f in [await store.get_file(None, x.input_file_id) for x in (a, b)] if f}
    assert (load.input_bytes, load.input_lines) == (sum(files.values()), 40)
    clock.advance(WINDOW + 1)  # those shards are out of the window now
    later = await store.admission_load(WINDOW)
    assert (later.done_lines, later.first_started) == (0, None)
    assert later.backlog_lines == 20


async def test_a_reclaimed_shard_counts_from_its_last_start(store: MetadataStore, clock: Clock) -> None:
    await batch(store, A, 1)
    assert await store.claim_shard("w1", -1.0) is not None  # its lease ran out at once
    clock.advance(30)
    again = await claim(store, "w2")
    clock.advance(10)
    assert await store.complete_shard(again, result(10, 0), 0)
    load = await store.admission_load(WINDOW)
    assert (load.done_lines, load.first_started, load.backlog_lines) == (10, T0 + 30, 0)


async def test_the_backlog_by_owner_with_its_weight(store: MetadataStore) -> None:
    """Review 14: what admission control needs to count only the share of another owner's backlog that fair share
    serves before a new batch (domain/admission.py: `ahead`)."""
    await project(store, A, 2.5)
    await batch(store, A, 3)
    await batch(store, B, 1)  # an owner that is no project weighs 1
    load = await store.admission_load(WINDOW)
    assert load.waiting == ((A, 30, 2.5), (B, 10, 1.0)) and load.backlog_lines == 40
    done = await claim(store, "w1")
    assert await store.complete_shard(done, result(8, 2), 0)
    after = await store.admission_load(WINDOW)
    assert after.backlog_lines == 30 and sum(n for _, n, _ in after.waiting) == 30
    assert {o for o, _, _ in after.waiting} <= {A, B} and all(n > 0 for _, n, _ in after.waiting)
