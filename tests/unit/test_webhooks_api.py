"""The webhook routes in process (the FastAPI app over the in-memory store, through httpx's ASGI transport): the
project's delivery log (paging, ownership) and its endpoints in the admin API (allowed hosts, limits, rotation,
deletion), each error in OpenAI's envelope."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from batchyard.api.app import create_app
from batchyard.api.auth import owner_of
from batchyard.api.services import Services
from batchyard.blobs.memory import MemoryBlobStore
from batchyard.config import Settings
from batchyard.domain import webhooks as wh
from batchyard.domain.models import BatchRecord, FileRecord
from batchyard.domain.states import BatchStatus
from batchyard.domain.tenancy import ProjectRecord
from batchyard.store.memory import MemoryStore
from batchyard.upstreams.router import Router
from tests.support.envelope import assert_envelope

ADMIN, K1, K2 = "sk-admin", "k1", "k2"


def auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


@pytest.fixture
async def store() -> AsyncIterator[MemoryStore]:
    s = MemoryStore()
    await s.open()
    yield s
    await s.close()


@pytest.fixture
async def http(store: MemoryStore) -> AsyncIterator[httpx.AsyncClient]:
    settings = Settings(api_keys=[K1, K2], admin_api_keys=[ADMIN], webhook_allowed_hosts=["*.example.com"])
    svc = Services(store, MemoryBlobStore(), Router([]), settings)
    transport = httpx.ASGITransport(app=create_app(svc))
    async with httpx.AsyncClient(transport=transport, base_url="http://api", timeout=30) as client:
        yield client


_n = {"n": 0}


async def failed_batch(store: MemoryStore, owner: str) -> str:
    """A batch of `owner` that failed validation (its event id is returned)."""
    _n["n"] += 1
    n, now = _n["n"], int(time.time())
    f = FileRecord(f"file-{n}", owner, 1, now, "in.jsonl", "batch", f"files/{n}")
    b = BatchRecord(
        f"batch_{n}", owner, "/v1/chat/completions", f.id, "24h", BatchStatus.VALIDATING, now, now + 60
    )
    await store.insert_file(f)
    await store.insert_batch(b)
    assert await store.claim_validation("v", 10.0) is not None
    assert await store.fail_batch(b.id, "v", [{"code": "x", "message": "y"}])
    page = await store.list_webhook_events(owner, limit=1, after=None)
    return str(page.items[0].id)


async def test_the_delivery_log_pages_newest_first_and_is_per_owner(
    http: httpx.AsyncClient, store: MemoryStore
) -> None:
    mine = [await failed_batch(store, owner_of(K1)) for _ in range(3)]
    theirs = await failed_batch(store, owner_of(K2))
    first = (await http.get("/v1/webhook_events?limit=2", headers=auth(K1))).json()
    assert [e["id"] for e in first["data"]] == mine[:0:-1] and first["has_more"] is True
    assert first["data"][0]["status"] == "pending" and first["data"][0]["object"] == "event"
    rest = (await http.get(f"/v1/webhook_events?limit=2&after={first['last_id']}", headers=auth(K1))).json()
    assert [e["id"] for e in rest["data"]] == [mine[0]] and rest["has_more"] is False
    for after in ("not-an-id", theirs):
        page = (await http.get(f"/v1/webhook_events?after={after}", headers=auth(K1))).json()
        assert page["data"] == [] and page["has_more"] is False
    assert_envelope(await http.get("/v1/webhook_events?limit=0", headers=auth(K1)), 400, "limit")
    detail = (await http.get(f"/v1/webhook_events/{mine[0]}", headers=auth(K1))).json()
    assert detail["targets"] == [] and detail["delivery_attempts"] == []
    for key, event in ((K2, mine[0]), (K1, "evt_nope"), (K1, "x" * 500)):
        resp = await http.get(f"/v1/webhook_events/{event}", headers=auth(key))
        assert_envelope(resp, 404, "event_id", "webhook_event_not_found")
    assert_envelope(await http.get("/v1/webhook_events", headers=auth("wrong")), 401)


async def test_endpoints_in_the_admin_api(http: httpx.AsyncClient, store: MemoryStore) -> None:
    now = int(time.time())
    await store.insert_project(ProjectRecord("proj_a", "a", now))
    await store.insert_project(ProjectRecord("proj_b", "b", now))
    await store.insert_project(ProjectRecord("proj_old", "old", now, archived_at=now))
    hooks = "/v1/organization/projects/proj_a/webhooks"

    assert_envelope(await http.get(hooks, headers=auth(K1)), 403, code="insufficient_permissions")
    assert_envelope(await http.post(hooks, json={"url": "https://h.example.com/x"}, headers=auth(K1)), 403)
    err = assert_envelope(
        await http.post(hooks, json={"url": "https://internal.corp/x"}, headers=auth(ADMIN)),
        400,
        "url",
        "invalid_url",
    )
    assert "webhook_allowed_hosts" in err["message"]
    assert_envelope(await http.post(hooks, json={"url": 7}, headers=auth(ADMIN)), 400, "url", "invalid_type")
    assert_envelope(await http.post(hooks, content=b"[", headers=auth(ADMIN)), 400, code="invalid_json")
    old = "/v1/organization/projects/proj_old/webhooks"
    assert_envelope(
        await http.post(old, json={"url": "https://h.example.com/x"}, headers=auth(ADMIN)),
        400,
        code="project_archived",
    )
    assert_envelope(await http.get("/v1/organization/projects/proj_zz/webhooks", headers=auth(ADMIN)), 404)

    made = await http.post(hooks, json={"url": "https://h.example.com/x"}, headers=auth(ADMIN))
    assert made.status_code == 200, made.text
    body: dict[str, Any] = made.json()
    assert (
        body["id"].startswith("wh_")
        and body["secret"].startswith("whsec_")
        and body["project_id"] == "proj_a"
    )
    assert (await store.get_webhook_endpoint(body["id"])) is not None
    listed = (await http.get(hooks, headers=auth(ADMIN))).json()["data"]
    assert [e["id"] for e in listed] == [body["id"]] and "secret" not in listed[0]

    rotated = (await http.post(f"{hooks}/{body['id']}/rotate", headers=auth(ADMIN))).json()
    assert rotated["secret"] != body["secret"]
    assert abs(rotated["previous_secret_valid_until"] - (time.time() + wh.DEFAULT_GRACE_S)) < 5
    stored = await store.get_webhook_endpoint(body["id"])
    assert stored is not None and stored.secrets_at(time.time()) == [rotated["secret"], body["secret"]]

    other = f"/v1/organization/projects/proj_b/webhooks/{body['id']}"  # proj_b's path, proj_a's endpoint
    assert_envelope(
        await http.get(other, headers=auth(ADMIN)), 404, "webhook_id", "webhook_endpoint_not_found"
    )
    assert_envelope(await http.post(other + "/rotate", headers=auth(ADMIN)), 404)
    assert_envelope(await http.delete(other, headers=auth(ADMIN)), 404)

    deleted = (await http.delete(f"{hooks}/{body['id']}", headers=auth(ADMIN))).json()
    assert deleted == {"object": "webhook_endpoint.deleted", "id": body["id"], "deleted": True}
    assert_envelope(await http.get(f"{hooks}/{body['id']}", headers=auth(ADMIN)), 404)
    assert (await http.get(hooks, headers=auth(ADMIN))).json()["data"] == []
    with_removed = (await http.get(hooks + "?include_disabled=true", headers=auth(ADMIN))).json()["data"]
    assert [e["id"] for e in with_removed] == [body["id"]] and with_removed[0]["disabled_at"] is not None

    for i in range(wh.MAX_ENDPOINTS):
        ok = await http.post(hooks, json={"url": f"https://h.example.com/{i}"}, headers=auth(ADMIN))
        assert ok.status_code == 200
    full = await http.post(hooks, json={"url": "https://h.example.com/more"}, headers=auth(ADMIN))
    assert_envelope(full, 400, "url", "webhook_endpoint_limit_reached")
