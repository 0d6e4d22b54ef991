"""`Idempotency-Key` on POST /v1/files, /v1/uploads and /v1/batches, against `batchyard serve`: a retry with the same
key and parameters gets the same object, other parameters get 409, and requests racing with one key create one
object (threads sending at once)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from threading import Barrier
from typing import Any

import httpx
import pytest
from openai import OpenAI

from tests.conftest import Server
from tests.support.batches import chat_line, jsonl, upload
from tests.support.envelope import assert_envelope
from tests.support.fake_upstream import FakeUpstream

RACERS = 8


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    keys = ["--api-key", "sk-test", "--api-key", "sk-other"]
    with (
        FakeUpstream() as up,
        Server(tmp_path_factory.mktemp("idem") / "data", ["--upstream", up.base_url, *keys]) as s,
    ):
        yield s


@pytest.fixture(scope="module")
def http(srv: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=srv.root_url, timeout=30, headers={"Authorization": "Bearer sk-test"}) as c:
        yield c


def new_key() -> str:
    return f"key-{uuid.uuid4()}"


def file_blobs(srv: Server) -> set[Path]:
    root = srv.data_dir / "blobs" / "files"
    return {Path(d) / f for d, _, fs in os.walk(root) for f in fs if not f.startswith(".")}


def race(send: Callable[[], httpx.Response]) -> list[httpx.Response]:
    """`send` from RACERS threads released at the same moment."""
    start = Barrier(RACERS)

    def go() -> httpx.Response:
        start.wait()
        return send()

    with ThreadPoolExecutor(RACERS) as pool:
        return list(pool.map(lambda _: go(), range(RACERS)))


def batch_ids(http: httpx.Client) -> list[str]:
    return [b["id"] for b in http.get("/v1/batches", params={"limit": 100}).json()["data"]]


# -- /v1/batches ------------------------------------------------------------------------------------------------


def create_batch(http: httpx.Client, key: str | None, file_id: str, **over: Any) -> httpx.Response:
    body = {"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h", **over}
    headers = {} if key is None else {"Idempotency-Key": key}
    return http.post("/v1/batches", json=body, headers=headers)


def test_a_batch_retried_with_its_key_is_the_same_batch(http: httpx.Client, input_file: str) -> None:
    key = new_key()
    first = create_batch(http, key, input_file)
    assert first.status_code == 200 and "idempotent-replayed" not in first.headers
    again = create_batch(http, key, input_file)
    assert again.status_code == 200, again.text
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json()["id"] == first.json()["id"]
    assert batch_ids(http).count(first.json()["id"]) == 1


def test_the_sdk_sends_a_key_and_gets_the_same_batch(oai: OpenAI, input_file: str) -> None:
    key = new_key()

    def create() -> str:
        return oai.batches.create(
            input_file_id=input_file,
            endpoint="/v1/chat/completions",
            completion_window="24h",
            extra_headers={"Idempotency-Key": key},
        ).id

    assert create() == create()


def test_a_key_reused_with_other_parameters_is_409(http: httpx.Client, input_file: str) -> None:
    key = new_key()
    assert create_batch(http, key, input_file).status_code == 200
    before = batch_ids(http)
    resp = create_batch(http, key, input_file, metadata={"run": "2"})
    err = assert_envelope(resp, 409, param="Idempotency-Key", code="idempotency_key_reused")
    assert key in err["message"] and "same parameters" in err["message"]
    assert batch_ids(http) == before


def test_racing_creates_with_one_key_make_one_batch(http: httpx.Client, input_file: str) -> None:
    key = new_key()
    before = set(batch_ids(http))
    answers = race(lambda: create_batch(http, key, input_file))
    assert [a.status_code for a in answers] == [200] * RACERS, [a.text for a in answers]
    got = {a.json()["id"] for a in answers}
    assert len(got) == 1
    assert set(batch_ids(http)) - before == got
    assert sum(a.headers.get("idempotent-replayed") == "true" for a in answers) == RACERS - 1


def test_a_refused_create_does_not_use_up_its_key(http: httpx.Client, input_file: str) -> None:
    key = new_key()
    assert_envelope(create_batch(http, key, input_file, endpoint="/v1/x"), 400, code="invalid_value")
    ok = create_batch(http, key, input_file, metadata={"after": "refusal"})
    assert ok.status_code == 200 and "idempotent-replayed" not in ok.headers


def test_keys_are_per_owner(srv: Server, http: httpx.Client, input_file: str) -> None:
    key = new_key()
    mine = create_batch(http, key, input_file).json()["id"]
    other = srv.client(api_key="sk-other")
    theirs_file = upload(other, [chat_line(0)])
    with httpx.Client(base_url=srv.root_url, timeout=30, headers={"Authorization": "Bearer sk-other"}) as h:
        theirs = create_batch(h, key, theirs_file)
    assert theirs.status_code == 200 and theirs.json()["id"] != mine


def test_a_malformed_key_is_400(http: httpx.Client, input_file: str) -> None:
    assert_envelope(create_batch(http, "k" * 256, input_file), 400, code="invalid_idempotency_key")
    assert_envelope(create_batch(http, "", input_file), 400, code="invalid_idempotency_key")


def test_one_key_on_two_routes_is_409(http: httpx.Client, input_file: str) -> None:
    key = new_key()
    assert create_batch(http, key, input_file).status_code == 200
    resp = http.post(
        "/v1/uploads",
        json={"filename": "a.jsonl", "purpose": "batch", "bytes": 3, "mime_type": "text/jsonl"},
        headers={"Idempotency-Key": key},
    )
    assert_envelope(resp, 409, code="idempotency_key_reused")


# -- /v1/files --------------------------------------------------------------------------------------------------


def post_file(http: httpx.Client, key: str, data: bytes, name: str = "in.jsonl") -> httpx.Response:
    return http.post(
        "/v1/files",
        data={"purpose": "batch"},
        files={"file": (name, data, "application/jsonl")},
        headers={"Idempotency-Key": key},
    )


def test_a_file_retried_with_its_key_is_the_same_file_and_one_blob(srv: Server, http: httpx.Client) -> None:
    key, data = new_key(), jsonl([chat_line(1)])
    first = post_file(http, key, data)
    assert first.status_code == 200, first.text
    blobs = file_blobs(srv)
    again = post_file(http, key, data)
    assert again.status_code == 200 and again.headers["idempotent-replayed"] == "true"
    assert again.json() == first.json()
    assert file_blobs(srv) == blobs  # the duplicate's blob was removed


def test_a_file_key_with_other_bytes_or_name_is_409_and_leaves_no_blob(
    srv: Server, http: httpx.Client
) -> None:
    key = new_key()
    assert post_file(http, key, jsonl([chat_line(1)])).status_code == 200
    blobs = file_blobs(srv)
    assert_envelope(post_file(http, key, jsonl([chat_line(2)])), 409, code="idempotency_key_reused")
    assert_envelope(
        post_file(http, key, jsonl([chat_line(1)]), "other.jsonl"), 409, code="idempotency_key_reused"
    )
    assert file_blobs(srv) == blobs


def test_racing_file_uploads_with_one_key_make_one_file(srv: Server, http: httpx.Client) -> None:
    key, data = new_key(), jsonl([chat_line(i) for i in range(50)])
    blobs = file_blobs(srv)
    answers = race(lambda: post_file(http, key, data))
    assert [a.status_code for a in answers] == [200] * RACERS, [a.text for a in answers]
    assert len({a.json()["id"] for a in answers}) == 1
    assert len(file_blobs(srv) - blobs) == 1


def test_the_sdk_uploads_a_file_once_with_a_key(oai: OpenAI) -> None:
    key, data = new_key(), jsonl([chat_line(3)])

    def create() -> str:
        return oai.files.create(
            file=("x.jsonl", data), purpose="batch", extra_headers={"Idempotency-Key": key}
        ).id

    assert create() == create()


# -- /v1/uploads ------------------------------------------------------------------------------------------------


def post_upload(http: httpx.Client, key: str, size: int = 10) -> httpx.Response:
    body = {"filename": "in.jsonl", "purpose": "batch", "bytes": size, "mime_type": "text/jsonl"}
    return http.post("/v1/uploads", json=body, headers={"Idempotency-Key": key})


def test_an_upload_retried_with_its_key_is_the_same_upload(http: httpx.Client) -> None:
    key = new_key()
    first = post_upload(http, key)
    again = post_upload(http, key)
    assert first.status_code == again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["idempotent-replayed"] == "true"
    assert_envelope(post_upload(http, key, size=11), 409, code="idempotency_key_reused")


def test_racing_uploads_with_one_key_make_one_upload(http: httpx.Client) -> None:
    key = new_key()
    answers = race(lambda: post_upload(http, key))
    assert [a.status_code for a in answers] == [200] * RACERS
    assert len({a.json()["id"] for a in answers}) == 1
