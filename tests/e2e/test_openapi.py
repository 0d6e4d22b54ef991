"""/openapi.json (what /docs shows): every route of OpenAI's batches/files/uploads spec is served, and carries the
spec's request and response bodies; every schema reference resolves."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from batchyard.api.openapi import reference
from tests.conftest import Server


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with Server(tmp_path_factory.mktemp("openapi") / "data", ["--upstream", "http://127.0.0.1:9/v1"]) as s:
        yield s


@pytest.fixture(scope="module")
def doc(srv: Server) -> dict[str, Any]:
    resp = httpx.get(srv.root_url + "/openapi.json", timeout=30)
    assert resp.status_code == 200
    return dict(resp.json())


def refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "$ref" and isinstance(v, str):
                yield v
            else:
                yield from refs(v)
    elif isinstance(node, list):
        for v in node:
            yield from refs(v)


def test_every_route_of_the_spec_is_served(doc: dict[str, Any]) -> None:
    missing = [
        f"{method.upper()} /v1{path}"
        for path, ops in reference()["paths"].items()
        for method in ops
        if method not in doc["paths"].get("/v1" + path, {})
    ]
    assert missing == []


def test_bodies_come_from_the_spec(doc: dict[str, Any]) -> None:
    create = doc["paths"]["/v1/batches"]["post"]
    assert create["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/CreateBatchRequest"
    }
    assert create["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Batch"
    }
    part = doc["paths"]["/v1/uploads/{upload_id}/parts"]["post"]
    assert part["requestBody"]["content"]["multipart/form-data"]["schema"] == {
        "$ref": "#/components/schemas/AddUploadPartRequest"
    }
    names = {p["name"] for p in doc["paths"]["/v1/files"]["get"]["parameters"]}
    assert {"purpose", "limit", "order", "after"} <= names
    assert {"batch_completed", "batch_failed", "batch_expired", "batch_cancelled"} <= set(doc["webhooks"])


def test_every_reference_resolves(doc: dict[str, Any]) -> None:
    schemas = doc["components"]["schemas"]
    unresolved = {
        r for r in refs(doc) if not (r.startswith("#/components/schemas/") and r.split("/")[-1] in schemas)
    }
    assert unresolved == set()
    json.dumps(doc)  # plain JSON throughout
