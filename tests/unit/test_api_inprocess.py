"""The API in process: the FastAPI app over the in-memory metadata store and blob store, through httpx's ASGI transport.

For what a `batchyard serve` subprocess adds nothing to: the error envelope, auth, id shapes, pagination, the file
round trip. No worker runs here, so a batch stays `validating`; what a batch does when it runs is tested in e2e/ and
integration/.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any, cast

import httpx
import openai
import pytest
from openai import AsyncOpenAI

from batchyard import ids
from batchyard.api.app import create_app
from batchyard.api.auth import owner_of
from batchyard.api.services import Services
from batchyard.blobs.memory import MemoryBlobStore
from batchyard.config import Settings
from batchyard.store.memory import MemoryStore
from batchyard.upstreams.router import Router
from tests.support.batches import chat_line, jsonl
from tests.support.envelope import assert_envelope

CHAT = "/v1/chat/completions"
KEYS = ["k1", "k2"]


class App:
    def __init__(self, store: MemoryStore, blobs: MemoryBlobStore, http: httpx.AsyncClient) -> None:
        self.store = store
        self.blobs = blobs
        self.http = http

    def sdk(self, key: str = "k1") -> AsyncOpenAI:
        # openai 3 types `http_client` as an httpx2 client and takes an httpx one as well
        client = cast(Any, self.http)
        return AsyncOpenAI(base_url="http://api/v1", api_key=key, max_retries=0, http_client=client)

    async def upload(self, key: str = "k1", lines: int = 1) -> str:
        resp = await self.http.post(
            "/v1/files",
            headers=auth(key),
            data={"purpose": "batch"},
            files={"file": ("in.jsonl", jsonl([chat_line(i) for i in range(lines)]))},
        )
        assert resp.status_code == 200, resp.text
        return str(resp.json()["id"])

    async def create_batch(self, file_id: str, key: str = "k1") -> dict[str, Any]:
        resp = await self.http.post(
            "/v1/batches",
            headers=auth(key),
            json={"input_file_id": file_id, "endpoint": CHAT, "completion_window": "24h"},
        )
        assert resp.status_code == 200, resp.text
        body: dict[str, Any] = resp.json()
        return body

    async def stored(self, key: str = "k1") -> tuple[list[str], list[str]]:
        """The ids of the files and batches `key` owns in the store."""
        owner = owner_of(key)
        files = await self.store.list_files(owner, purpose=None, limit=100, order="desc", after=None)
        batches = await self.store.list_batches(owner, limit=100, after=None)
        return [f.id for f in files.items], [b.id for b in batches.items]


def auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


@pytest.fixture
async def app() -> AsyncIterator[App]:
    store, blobs = MemoryStore(), MemoryBlobStore()
    await store.open()
    svc = Services(store, blobs, Router([]), Settings(api_keys=KEYS))
    transport = httpx.ASGITransport(app=create_app(svc))
    async with httpx.AsyncClient(transport=transport, base_url="http://api", timeout=30) as http:
        yield App(store, blobs, http)
    await store.close()


# -- auth and the error envelope -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/v1/files"), ("POST", "/v1/files"), ("GET", "/v1/batches"), ("POST", "/v1/batches")],
)
@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"authorization": "Bearer wrong"},
        {"authorization": "k1"},
        {"authorization": "Basic azE6"},
        {"authorization": "Bearer"},
        {"authorization": "Bearer k1k2"},
    ],
    ids=["none", "wrong", "no-scheme", "basic", "empty", "concatenated"],
)
async def test_unauthenticated_is_401(app: App, method: str, path: str, headers: dict[str, str]) -> None:
    resp = await app.http.request(method, path, headers=headers)
    err = assert_envelope(resp, 401)
    assert err["type"] == "invalid_request_error"
    assert err["code"] in ("missing_api_key", "invalid_api_key")
    assert "k1" not in err["message"] and "k2" not in err["message"]
    assert await app.stored() == ([], []) and app.blobs.keys == []


async def test_health_is_open(app: App) -> None:
    resp = await app.http.get("/health")
    assert (resp.status_code, resp.json()) == (200, {"status": "ok"})


async def test_unknown_route_is_an_envelope(app: App) -> None:
    assert_envelope(await app.http.get("/v1/nothing-here", headers=auth("k1")), 404)


@pytest.mark.parametrize("body", [b"", b"{", b"[]", b"null", b'"x"', b"\xff\xfe"])
async def test_a_bad_json_body_is_400(app: App, body: bytes) -> None:
    resp = await app.http.post(
        "/v1/batches", content=body, headers={**auth("k1"), "content-type": "application/json"}
    )
    assert_envelope(resp, 400)


# -- ids -----------------------------------------------------------------------------------------------------


async def test_ids_have_their_shapes(app: App) -> None:
    fid = await app.upload()
    batch = await app.create_batch(fid)
    assert ids.has_shape("file", fid) and fid.startswith("file-")
    assert ids.has_shape("batch", batch["id"]) and batch["id"].startswith("batch_")
    assert (batch["object"], batch["status"], batch["input_file_id"]) == ("batch", "validating", fid)
    rec = await app.store.get_file(owner_of("k1"), fid)
    assert rec is not None and app.blobs.keys == [rec.blob_key]
    assert await app.stored() == ([fid], [batch["id"]])


@pytest.mark.parametrize(
    "bad", ["batch_", "batch_%00", "batch_%2E%2E", "batch_" + "a" * 65, "file-abc", "x" * 10_000]
)
async def test_ids_of_the_wrong_shape_are_unknown_batches(app: App, bad: str) -> None:
    err = assert_envelope(await app.http.get(f"/v1/batches/{bad}", headers=auth("k1")), 404)
    assert err["code"] == "batch_not_found"
    assert len(err["message"]) < 300  # an id that is not one is not echoed whole
    assert_envelope(await app.http.post(f"/v1/batches/{bad}/cancel", headers=auth("k1")), 404)


@pytest.mark.parametrize("bad", ["file-", "file-%00", "file-%2E%2E", "batch_abc", "f" * 10_000])
async def test_ids_of_the_wrong_shape_are_unknown_files(app: App, bad: str) -> None:
    for method, path in [
        ("GET", f"/v1/files/{bad}"),
        ("GET", f"/v1/files/{bad}/content"),
        ("DELETE", f"/v1/files/{bad}"),
    ]:
        assert_envelope(await app.http.request(method, path, headers=auth("k1")), 404)


async def test_a_batch_on_a_file_id_of_the_wrong_shape_is_400(app: App) -> None:
    resp = await app.http.post(
        "/v1/batches",
        headers=auth("k1"),
        json={"input_file_id": "not-a-file", "endpoint": CHAT, "completion_window": "24h"},
    )
    assert_envelope(resp, 400, param="input_file_id", code="invalid_value")
    assert (await app.stored())[1] == []


# -- files ---------------------------------------------------------------------------------------------------


async def test_a_file_round_trips_and_deletes(app: App) -> None:
    data = jsonl([chat_line(i) for i in range(3)])
    before = int(time.time())
    made = await app.sdk().files.create(file=("input.jsonl", data), purpose="batch")
    assert (made.bytes, made.filename, made.purpose, made.status) == (
        len(data),
        "input.jsonl",
        "batch",
        "processed",
    )
    assert before - 5 <= made.created_at <= int(time.time()) + 5
    content = await app.http.get(f"/v1/files/{made.id}/content", headers=auth("k1"))
    assert content.status_code == 200 and content.content == data
    deleted = await app.http.delete(f"/v1/files/{made.id}", headers=auth("k1"))
    assert deleted.json() == {"id": made.id, "object": "file", "deleted": True}
    assert app.blobs.keys == []
    assert_envelope(await app.http.get(f"/v1/files/{made.id}", headers=auth("k1")), 404)
    assert_envelope(await app.http.get(f"/v1/files/{made.id}/content", headers=auth("k1")), 404)


async def test_owners_are_isolated(app: App) -> None:
    fid = await app.upload("k1")
    batch = await app.create_batch(fid, "k1")
    k2 = app.sdk("k2")
    with pytest.raises(openai.NotFoundError):
        await k2.files.retrieve(fid)
    with pytest.raises(openai.NotFoundError):
        await k2.files.content(fid)
    with pytest.raises(openai.NotFoundError):
        await k2.files.delete(fid)
    with pytest.raises(openai.NotFoundError):
        await k2.batches.retrieve(batch["id"])
    with pytest.raises(openai.NotFoundError):
        await k2.batches.cancel(batch["id"])
    assert (await k2.files.list()).data == [] and (await k2.batches.list()).data == []
    assert (await k2.batches.list(after=batch["id"])).data == []  # a cursor of k1's leaks nothing
    assert (await k2.files.list(after=fid)).data == []
    assert (await app.sdk("k1").files.retrieve(fid)).id == fid  # k2's delete did nothing


# -- pagination (moved from e2e/test_batches_api.py: a server subprocess added nothing to it) -----------------


async def test_list_pagination_and_limits(app: App) -> None:
    fid = await app.upload()
    made = [(await app.create_batch(fid))["id"] for _ in range(25)]
    newest_first = list(reversed(made))
    http = app.http
    default = (await http.get("/v1/batches", headers=auth("k1"))).json()
    assert default["object"] == "list"
    assert [b["id"] for b in default["data"]] == newest_first[:20]
    assert default["has_more"] is True
    assert default["first_id"] == newest_first[0] and default["last_id"] == newest_first[19]

    for limit in (1, 7, 25, 100):
        body = (await http.get("/v1/batches", params={"limit": limit}, headers=auth("k1"))).json()
        assert [b["id"] for b in body["data"]] == newest_first[:limit]
        assert body["has_more"] is (limit < 25)

    for bad in ("0", "101", "-5", "x", "", "1e2"):
        assert_envelope(
            await http.get("/v1/batches", params={"limit": bad}, headers=auth("k1")), 400, param="limit"
        )

    # manual cursor
    seen: list[str] = []
    after: str | None = None
    while True:
        params: dict[str, Any] = {"limit": 10}
        if after:
            params["after"] = after
        body = (await http.get("/v1/batches", params=params, headers=auth("k1"))).json()
        got = [b["id"] for b in body["data"]]
        assert body["first_id"] == got[0] and body["last_id"] == got[-1]
        seen += got
        if not body["has_more"]:
            break
        after = body["last_id"]
    assert seen == newest_first

    tail = (await http.get("/v1/batches", params={"after": newest_first[-1]}, headers=auth("k1"))).json()
    assert tail["data"] == [] and tail["has_more"] is False

    # the SDK's auto-paging iterator
    oai = app.sdk()
    assert [b.id async for b in oai.batches.list(limit=7)] == newest_first
    assert [b.id async for b in oai.batches.list()] == newest_first
    first = await oai.batches.list(limit=7)
    assert first.has_next_page()
    assert [b.id for b in (await first.get_next_page()).data] == newest_first[7:14]
