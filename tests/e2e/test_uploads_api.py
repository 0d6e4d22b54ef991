"""End-to-end tests of /v1/uploads against `batchyard serve`: the official SDK (parts, completion, the chunked-upload
helper, a batch from an uploaded file) and raw httpx for the error cases."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from tests.conftest import Server
from tests.support.batches import chat_line, jsonl, read_lines, wait_for
from tests.support.envelope import assert_envelope
from tests.support.fake_upstream import FakeUpstream
from tests.support.schema import validate

DAY = 86400


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    keys = ["--api-key", "sk-test", "--api-key", "sk-other"]
    with (
        FakeUpstream() as up,
        Server(tmp_path_factory.mktemp("uploads") / "data", ["--upstream", up.base_url, *keys]) as s,
    ):
        yield s


@pytest.fixture(scope="module")
def http(srv: Server) -> Iterator[httpx.Client]:
    headers = {"Authorization": "Bearer sk-test"}
    with httpx.Client(base_url=srv.root_url, timeout=30, headers=headers) as c:
        yield c


def blobs_under(srv: Server, prefix: str) -> list[Path]:
    root = srv.data_dir / "blobs" / prefix
    return [Path(d) / f for d, _, fs in os.walk(root) for f in fs if not f.startswith(".")]


def create(http: httpx.Client, **over: Any) -> dict[str, Any]:
    body = {"filename": "in.jsonl", "purpose": "batch", "bytes": 10, "mime_type": "text/jsonl", **over}
    resp = http.post("/v1/uploads", json=body)
    assert resp.status_code == 200, resp.text
    return dict(resp.json())


def add_part(http: httpx.Client, upload_id: str, data: bytes) -> httpx.Response:
    return http.post(
        f"/v1/uploads/{upload_id}/parts", files={"data": ("blob", data, "application/octet-stream")}
    )


def test_upload_in_parts_with_the_sdk_then_run_a_batch_from_it(oai: OpenAI, srv: Server) -> None:
    content = jsonl([chat_line(i) for i in range(30)])
    third = len(content) // 3
    chunks = [content[:third], content[third : 2 * third], content[2 * third :]]
    up = oai.uploads.create(bytes=len(content), filename="big.jsonl", mime_type="text/jsonl", purpose="batch")
    assert (up.object, up.status, up.bytes, up.filename, up.purpose) == ("upload", "pending", len(content),
                                                                         "big.jsonl", "batch")  # fmt: skip
    assert up.file is None and up.expires_at == up.created_at + 3600
    validate("Upload", up.model_dump(mode="json"))
    parts = [oai.uploads.parts.create(up.id, data=c) for c in reversed(chunks)]  # sent out of order
    for p in parts:
        assert (p.object, p.upload_id) == ("upload.part", up.id)
        validate("UploadPart", p.model_dump(mode="json"))
    ordered = [p.id for p in reversed(parts)]  # the completion names the order
    done = oai.uploads.complete(up.id, part_ids=ordered, md5=hashlib.md5(content).hexdigest())
    assert done.status == "completed" and done.file is not None
    validate("Upload", done.model_dump(mode="json"))
    f = done.file
    assert (f.bytes, f.filename, f.purpose) == (len(content), "big.jsonl", "batch")
    assert f.expires_at == f.created_at + 30 * DAY  # the batch-purpose default
    assert oai.files.content(f.id).content == content
    assert oai.files.retrieve(f.id).id == f.id
    assert blobs_under(srv, f"uploads/{up.id}") == []  # the parts are gone once composed
    b = oai.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    b = wait_for(oai, b.id)
    assert b.status == "completed"
    assert sorted(line["custom_id"] for line in read_lines(oai, b.output_file_id)) == sorted(
        f"req-{i}" for i in range(30)
    )


def test_sdk_chunked_upload_helper(oai: OpenAI, tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    payload = os.urandom(300_000)
    path.write_bytes(payload)
    done = oai.uploads.upload_file_chunked(
        file=path, mime_type="application/octet-stream", purpose="vision", part_size=100_000
    )
    assert done.status == "completed" and done.file is not None
    assert done.file.expires_at is None  # no expiry unless asked, as /v1/files
    assert oai.files.content(done.file.id).content == payload


def test_expires_after_sets_the_file_expiry(http: httpx.Client) -> None:
    up = create(http, bytes=3, purpose="user_data", expires_after={"anchor": "created_at", "seconds": 7200})
    part = add_part(http, up["id"], b"abc").json()
    done = http.post(f"/v1/uploads/{up['id']}/complete", json={"part_ids": [part["id"]]}).json()
    assert done["file"]["expires_at"] == done["file"]["created_at"] + 7200


def test_cancel_drops_the_parts_and_ends_the_upload(http: httpx.Client, srv: Server) -> None:
    up = create(http, bytes=4)
    assert add_part(http, up["id"], b"ab").status_code == 200
    assert blobs_under(srv, f"uploads/{up['id']}")
    resp = http.post(f"/v1/uploads/{up['id']}/cancel")
    assert resp.status_code == 200 and resp.json()["status"] == "cancelled" and resp.json()["file"] is None
    assert blobs_under(srv, f"uploads/{up['id']}") == []
    assert_envelope(add_part(http, up["id"], b"cd"), 409, "upload_id", "invalid_upload_status")
    assert_envelope(http.post(f"/v1/uploads/{up['id']}/complete", json={"part_ids": []}), 409)
    assert_envelope(http.post(f"/v1/uploads/{up['id']}/cancel"), 409)


def test_completed_upload_takes_no_more_parts_and_cannot_complete_twice(http: httpx.Client) -> None:
    up = create(http, bytes=2)
    part = add_part(http, up["id"], b"ok").json()
    assert http.post(f"/v1/uploads/{up['id']}/complete", json={"part_ids": [part["id"]]}).status_code == 200
    assert_envelope(add_part(http, up["id"], b"more"), 409, "upload_id", "invalid_upload_status")
    assert_envelope(http.post(f"/v1/uploads/{up['id']}/complete", json={"part_ids": [part["id"]]}), 409)
    assert_envelope(http.post(f"/v1/uploads/{up['id']}/cancel"), 409)


def test_byte_count_must_match(http: httpx.Client) -> None:
    up = create(http, bytes=10)
    part = add_part(http, up["id"], b"short").json()
    err = assert_envelope(
        http.post(f"/v1/uploads/{up['id']}/complete", json={"part_ids": [part["id"]]}), 400, "part_ids"
    )
    assert "10" in err["message"] and "5" in err["message"]


def test_md5_mismatch_is_refused_and_the_upload_stays_pending(http: httpx.Client) -> None:
    up = create(http, bytes=3)
    part = add_part(http, up["id"], b"abc").json()
    resp = http.post(f"/v1/uploads/{up['id']}/complete", json={"part_ids": [part["id"]], "md5": "0" * 32})
    assert_envelope(resp, 400, "md5", "invalid_value")
    ok = http.post(f"/v1/uploads/{up['id']}/complete", json={"part_ids": [part["id"]]})
    assert ok.status_code == 200 and ok.json()["status"] == "completed"


@pytest.mark.parametrize(
    ("part_ids", "param"),
    [(None, "part_ids"), ("part_x", "part_ids"), (["part_unknown"], "part_ids"), ([1], "part_ids")],
)
def test_bad_part_ids(http: httpx.Client, part_ids: object, param: str) -> None:
    up = create(http, bytes=1)
    body = {} if part_ids is None else {"part_ids": part_ids}
    assert_envelope(http.post(f"/v1/uploads/{up['id']}/complete", json=body), 400, param)


def test_a_part_of_another_upload_cannot_be_used(http: httpx.Client) -> None:
    a, b = create(http, bytes=1), create(http, bytes=1)
    pa = add_part(http, a["id"], b"x").json()
    assert_envelope(
        http.post(f"/v1/uploads/{b['id']}/complete", json={"part_ids": [pa["id"]]}), 400, "part_ids"
    )


def test_duplicate_part_ids_are_refused(http: httpx.Client) -> None:
    up = create(http, bytes=2)
    p = add_part(http, up["id"], b"x").json()
    resp = http.post(f"/v1/uploads/{up['id']}/complete", json={"part_ids": [p["id"], p["id"]]})
    assert_envelope(resp, 400, "part_ids", "invalid_value")


@pytest.mark.parametrize(
    ("over", "param"),
    [
        ({"filename": None}, "filename"),
        ({"purpose": "nope"}, "purpose"),
        ({"mime_type": None}, "mime_type"),
        ({"bytes": None}, "bytes"),
        ({"bytes": -1}, "bytes"),
        ({"bytes": "10"}, "bytes"),
        ({"bytes": True}, "bytes"),
        ({"bytes": 300 * 1024 * 1024}, "bytes"),  # over the 200 MB batch-file limit
        ({"expires_after": {"anchor": "now", "seconds": 3600}}, "expires_after.anchor"),
        ({"expires_after": {"anchor": "created_at", "seconds": 10}}, "expires_after.seconds"),
    ],
)
def test_create_validation(http: httpx.Client, over: dict[str, Any], param: str) -> None:
    body = {"filename": "in.jsonl", "purpose": "batch", "bytes": 10, "mime_type": "text/jsonl"}
    for k, v in over.items():
        if v is None:
            body.pop(k)
        else:
            body[k] = v
    assert_envelope(http.post("/v1/uploads", json=body), 400, param)


def test_not_json_and_missing_data_part(http: httpx.Client) -> None:
    assert_envelope(http.post("/v1/uploads", content=b"{nope"), 400, code="invalid_json")
    up = create(http, bytes=1)
    resp = http.post(f"/v1/uploads/{up['id']}/parts", data={"other": "x"}, files={"dummy": (None, b"")})
    assert_envelope(resp, 400, "data")
    assert_envelope(http.post(f"/v1/uploads/{up['id']}/parts", content=b"raw"), 400)


def test_unknown_and_foreign_uploads_are_404(http: httpx.Client, srv: Server) -> None:
    assert_envelope(http.post("/v1/uploads/upload_missing/cancel"), 404, "upload_id")
    up = create(http, bytes=1)
    other = srv.client(api_key="sk-other")
    with pytest.raises(openai.NotFoundError):
        other.uploads.cancel(up["id"])
    with pytest.raises(openai.NotFoundError):
        other.uploads.parts.create(up["id"], data=b"x")


def test_a_part_over_64_mib_is_413_and_leaves_nothing(http: httpx.Client, srv: Server) -> None:
    up = create(http, purpose="user_data", bytes=100 * 1024 * 1024)
    err = assert_envelope(
        add_part(http, up["id"], b"x" * (64 * 1024 * 1024 + 1)), 413, "data", "part_too_large"
    )
    assert "part" in err["message"]
    assert blobs_under(srv, f"uploads/{up['id']}") == []
