"""MetadataStore contract for webhook endpoints per project and the delivery log, on every backend (SQLite,
PostgreSQL, the in-memory fake), with the fake clock of conftest.py."""

from __future__ import annotations

import pytest

from batchyard.domain.models import WebhookEvent
from batchyard.domain.states import WebhookStatus
from batchyard.domain.webhooks import DeliveryAttempt, WebhookEndpoint
from batchyard.store.base import MetadataStore
from tests.contract.conftest import BACKENDS, T0, Clock
from tests.contract.test_store_contract import LEASE, new_batch

ALICE, BOB = "proj_alice", "proj_bob"


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


_n = {"n": 0}


def endpoint(
    owner: str = ALICE, created_at: int = int(T0), url: str = "https://hooks.example/a"
) -> WebhookEndpoint:
    _n["n"] += 1
    return WebhookEndpoint(f"wh_{_n['n']:06d}", owner, url, f"whsec_secret{_n['n']}", created_at)


async def failed_event(store: MetadataStore, owner: str = ALICE) -> WebhookEvent:
    """A batch of `owner` that failed validation, and the event its final status wrote (claimed by "d1")."""
    _, b = await new_batch(store, owner)
    assert await store.claim_validation("v", LEASE) is not None
    assert await store.fail_batch(b.id, "v", [{"code": "x", "message": "y"}])
    (ev,) = [e for e in await store.claim_webhook_events("d1", LEASE, 50, 0) if e.batch_id == b.id]
    return ev


async def test_endpoints_are_kept_as_given_listed_per_owner_and_disabled_once(store: MetadataStore) -> None:
    a1, a2, b1 = endpoint(ALICE), endpoint(ALICE, url="http://127.0.0.1:9/h?x=1"), endpoint(BOB)
    for e in (a1, a2, b1):
        await store.insert_webhook_endpoint(e)
    assert await store.get_webhook_endpoint(a2.id) == a2  # the secret as given: it signs
    assert await store.get_webhook_endpoint("wh_nope") is None
    assert [e.id for e in await store.list_webhook_endpoints(ALICE, include_disabled=False)] == [a1.id, a2.id]
    assert [e.id for e in await store.list_webhook_endpoints(None, include_disabled=False)] == [
        a1.id,
        a2.id,
        b1.id,
    ]
    gone = await store.disable_webhook_endpoint(a1.id, int(T0) + 5)
    assert gone is not None and gone.disabled_at == int(T0) + 5
    again = await store.disable_webhook_endpoint(a1.id, int(T0) + 9)
    assert again is not None and again.disabled_at == int(T0) + 5  # stamped once
    assert await store.disable_webhook_endpoint("wh_nope", 1) is None
    assert [e.id for e in await store.list_webhook_endpoints(ALICE, include_disabled=False)] == [a2.id]
    assert [e.id for e in await store.list_webhook_endpoints(ALICE, include_disabled=True)] == [a1.id, a2.id]


async def test_rotation_keeps_the_previous_secret_until_its_deadline(store: MetadataStore) -> None:
    e = endpoint()
    await store.insert_webhook_endpoint(e)
    rotated = await store.rotate_webhook_secret(e.id, "whsec_new", int(T0) + 100)
    assert rotated is not None
    assert (rotated.secret, rotated.previous_secret, rotated.previous_until) == (
        "whsec_new",
        e.secret,
        int(T0) + 100,
    )
    assert rotated.secrets_at(T0 + 99) == ["whsec_new", e.secret]
    assert rotated.secrets_at(T0 + 100) == ["whsec_new"]
    twice = await store.rotate_webhook_secret(e.id, "whsec_newer", int(T0) + 200)
    assert twice is not None and (twice.secret, twice.previous_secret) == ("whsec_newer", "whsec_new")
    assert await store.get_webhook_endpoint(e.id) == twice
    assert await store.disable_webhook_endpoint(e.id, int(T0)) is not None
    assert await store.rotate_webhook_secret(e.id, "whsec_x", int(T0) + 300) is None  # disabled: no rotation
    assert await store.rotate_webhook_secret("wh_nope", "whsec_x", int(T0) + 300) is None


async def test_an_events_targets_are_its_owners_live_endpoints_made_before_it(
    store: MetadataStore, clock: Clock
) -> None:
    a1, b1, gone = endpoint(ALICE), endpoint(BOB), endpoint(ALICE)
    later = endpoint(ALICE, created_at=int(T0) + 60)
    for e in (a1, b1, gone, later):
        await store.insert_webhook_endpoint(e)
    assert await store.disable_webhook_endpoint(gone.id, int(T0)) is not None
    ev = await failed_event(store, ALICE)
    endpoints, took = await store.webhook_targets(ev)
    assert [e.id for e in endpoints] == [
        a1.id
    ] and took == set()  # not Bob's, not disabled, not made after it
    clock.t += 1
    await store.record_webhook_attempts(
        [
            DeliveryAttempt(ev.id, a1.id, clock.t, 12, 500, None),
            DeliveryAttempt(ev.id, "global_abc", clock.t, 3, 204, None),
            DeliveryAttempt(ev.id, b1.id, clock.t, 0, None, "connection failed"),
        ]
    )
    assert (await store.webhook_targets(ev))[1] == {"global_abc"}  # only a 2xx took it
    await store.record_webhook_attempts([DeliveryAttempt(ev.id, a1.id, clock.t + 5, 8, 200, None)])
    assert (await store.webhook_targets(ev))[1] == {"global_abc", a1.id}
    await store.record_webhook_attempts([])  # nothing to record is fine


async def test_the_delivery_log_is_per_owner_newest_first_with_every_attempt(
    store: MetadataStore, clock: Clock
) -> None:
    events = []
    for _ in range(3):
        events.append(await failed_event(store, ALICE))
        clock.t += 1
    bobs = await failed_event(store, BOB)
    first = events[0]
    tries = [
        DeliveryAttempt(first.id, "wh_x", T0 + 10.5, 1500, None, "did not answer within 15s"),
        DeliveryAttempt(first.id, "wh_x", T0 + 20.25, 7, 200, None),
    ]
    await store.record_webhook_attempts(tries)
    assert await store.settle_webhook_event(first.id, "d1", "delivered", None, None)
    page = await store.list_webhook_events(ALICE, limit=2, after=None)
    assert [e.id for e in page.items] == [events[2].id, events[1].id] and page.has_more
    rest = await store.list_webhook_events(ALICE, limit=2, after=page.items[-1].id)
    assert [e.id for e in rest.items] == [first.id] and not rest.has_more
    assert rest.items[0].status == WebhookStatus.DELIVERED and rest.items[0].attempts == 1
    assert isinstance(rest.items[0].status, WebhookStatus)
    assert page.items[0].status == WebhookStatus.PENDING
    assert (await store.list_webhook_events(ALICE, limit=5, after=bobs.id)).items == []  # not Alice's cursor
    assert (await store.list_webhook_events(ALICE, limit=5, after="evt_nope")).items == []
    assert [e.id for e in (await store.list_webhook_events(BOB, limit=5, after=None)).items] == [bobs.id]
    found = await store.get_webhook_event(ALICE, first.id)
    assert found is not None
    ev, attempts = found
    assert (ev.id, ev.batch_id, ev.type, ev.status) == (first.id, first.batch_id, "batch.failed", "delivered")
    assert attempts == tries  # oldest first, as recorded
    assert await store.get_webhook_event(BOB, first.id) is None  # another owner's: as unknown
    assert await store.get_webhook_event(ALICE, "evt_nope") is None


async def test_an_event_with_nowhere_to_go_is_skipped(store: MetadataStore) -> None:
    ev = await failed_event(store)
    assert await store.settle_webhook_event(ev.id, "d1", "skipped", None, None)
    found = await store.get_webhook_event(ALICE, ev.id)
    assert found is not None and found[0].status == WebhookStatus.SKIPPED and found[1] == []
    assert await store.claim_webhook_events("d2", LEASE, 10, 0) == []
