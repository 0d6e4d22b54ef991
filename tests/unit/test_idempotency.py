"""The idempotency rule (domain/idempotency.py) and the API's claim/guard over the in-memory store."""

from __future__ import annotations

import asyncio

import pytest

from batchyard.api.idempotency import Idempotency
from batchyard.domain.idempotency import IdempotencyKey, Outcome, fingerprint, outcome
from batchyard.errors import Conflict
from batchyard.store.memory import MemoryStore


def row(object_id: str, fp: str = "a", route: str = "batches") -> IdempotencyKey:
    return IdempotencyKey("o", "k", route, fp, object_id, 0)


def test_outcome() -> None:
    assert outcome(row("x"), row("x")) == Outcome.CREATE
    assert outcome(row("x"), row("y")) == Outcome.REPLAY
    assert outcome(row("x", fp="b"), row("y")) == Outcome.REUSED
    assert outcome(row("x", route="files"), row("y")) == Outcome.REUSED


def test_fingerprint_ignores_key_order_but_not_values() -> None:
    assert fingerprint({"a": 1, "b": [1, 2]}) == fingerprint({"b": [1, 2], "a": 1})
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})


async def _nothing(_: str) -> bool:
    return False


async def test_a_failed_create_gives_its_key_back() -> None:
    store = MemoryStore()
    await store.open()
    idem = Idempotency(store, wait_s=0.2)
    assert await idem.claim("o", "k", "batches", "fp", "batch_1", _nothing) is None
    with pytest.raises(RuntimeError):
        async with idem.guard("o", "k", "batch_1"):
            raise RuntimeError("quota")
    assert await idem.claim("o", "k", "batches", "fp", "batch_2", _nothing) is None


async def test_a_waiter_gets_the_object_once_it_exists_or_409_in_time() -> None:
    store = MemoryStore()
    await store.open()
    idem = Idempotency(store, wait_s=0.3)
    assert await idem.claim("o", "k", "batches", "fp", "batch_1", _nothing) is None
    with pytest.raises(Conflict) as e:  # the holder never creates it
        await idem.claim("o", "k", "batches", "fp", "batch_2", _nothing)
    assert e.value.code == "idempotency_key_in_use"
    made: set[str] = set()

    async def exists(object_id: str) -> bool:
        return object_id in made

    waiter = asyncio.create_task(idem.claim("o", "k", "batches", "fp", "batch_3", exists))
    await asyncio.sleep(0.1)
    made.add("batch_1")
    assert await waiter == "batch_1"
