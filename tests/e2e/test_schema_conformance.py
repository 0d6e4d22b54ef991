"""Our JSON responses and output/error lines validated against the reference OpenAI schemas.

Schemas come from /work/shared/reference (see tests/support/schema.py for the OpenAPI -> JSON Schema rules).
Also: nothing a client sends produces a 500; every error is an OpenAI `ErrorResponse`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any, Final

import httpx
import pytest
from openai import OpenAI

from tests.conftest import Server
from tests.support import schema
from tests.support.batches import chat_line, jsonl, upload, wait_for
from tests.support.fake_upstream import FakeUpstream

CHAT: Final = "/v1/chat/completions"


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with FakeUpstream() as up:
        args = [
            "--upstream",
            up.base_url,
            "--lease-seconds",
            "2",
            "--shard-lines",
            "10",
            "--max-retries",
            "0",
        ]
        with Server(tmp_path_factory.mktemp("schema") / "data", args) as s:
            yield s


def ok_json(resp: httpx.Response) -> Any:
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    return resp.json()


def assert_batch(body: dict[str, Any], status: str) -> None:
    schema.validate("Batch", body)
    assert body["status"] == status
    spec = schema.spec_properties("Batch")
    assert spec <= set(body), f"missing Batch properties: {sorted(spec - set(body))}"
    assert set(body) <= spec, f"properties not in the spec: {sorted(set(body) - spec)}"


def assert_error(resp: httpx.Response, status: int | None = None) -> dict[str, Any]:
    assert 400 <= resp.status_code < 500, (resp.status_code, resp.text)
    if status is not None:
        assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json"), resp.headers
    body: dict[str, Any] = resp.json()
    schema.validate("ErrorResponse", body)
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body


def poll(http: httpx.Client, batch_id: str, statuses: set[str], timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        body: dict[str, Any] = ok_json(http.get(f"/v1/batches/{batch_id}"))
        if body["status"] in statuses:
            return body
        assert time.monotonic() < deadline, f"batch still {body['status']}"
        time.sleep(0.05)


def file_lines(http: httpx.Client, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    resp = http.get(f"/v1/files/{file_id}/content")
    assert resp.status_code == 200
    return [json.loads(x) for x in resp.text.splitlines() if x.strip()]


def assert_lines(lines: list[dict[str, Any]]) -> None:
    for line in lines:
        schema.validate("BatchRequestOutput", line)
        assert set(line) == {"id", "custom_id", "response", "error"}, line
        assert isinstance(line["id"], str) and line["id"]
        assert (line["response"] is None) != (line["error"] is None), line


# --------------------------------------------------------------------------- the schemas themselves


def test_schemas_load_and_are_valid() -> None:
    for name in (
        "Batch",
        "OpenAIFile",
        "ListFilesResponse",
        "ListBatchesResponse",
        "DeleteFileResponse",
        "ErrorResponse",
        "BatchRequestOutput",
        "BatchRequestInput",
    ):
        schema.validator(name)  # check_schema runs inside


def test_converter_is_strict_where_the_spec_is() -> None:
    assert schema.errors("ErrorResponse", {"error": {"message": "m", "type": "t", "param": None}})
    assert schema.errors("Batch", {"id": "b", "object": "batch"})
    assert schema.errors(
        "OpenAIFile",
        {
            "id": "f",
            "object": "file",
            "bytes": "12",
            "created_at": 1,
            "filename": "a",
            "purpose": "batch",
            "status": "processed",
        },
    )
    assert schema.errors(
        "BatchRequestOutput", {"id": "x", "custom_id": "c", "response": {"status_code": "200"}, "error": None}
    )
    # optional properties accept null (what the OpenAI API answers for them)
    assert not schema.errors(
        "OpenAIFile",
        {
            "id": "f",
            "object": "file",
            "bytes": 1,
            "created_at": 1,
            "expires_at": None,
            "filename": "a",
            "purpose": "batch",
            "status": "processed",
            "status_details": None,
        },
    )


# --------------------------------------------------------------------------- files


@pytest.mark.parametrize("purpose", ["batch", "user_data", "assistants", "fine-tune", "vision"])
def test_file_object(http: httpx.Client, purpose: str) -> None:
    body = ok_json(http.post("/v1/files", data={"purpose": purpose}, files={"file": ("a.jsonl", b"{}\n")}))
    schema.validate("OpenAIFile", body)
    spec = schema.spec_properties("OpenAIFile")
    assert schema.spec_required("OpenAIFile") <= set(body)
    assert set(body) <= spec, sorted(set(body) - spec)
    schema.validate("OpenAIFile", ok_json(http.get(f"/v1/files/{body['id']}")))


def test_file_list(oai: OpenAI, http: httpx.Client) -> None:
    for i in range(3):
        oai.files.create(file=(f"l{i}.jsonl", b"x\n"), purpose="user_data")
    queries: list[dict[str, str | int]] = [
        {},
        {"purpose": "user_data"},
        {"limit": 2},
        {"order": "asc", "limit": 1},
    ]
    for params in queries:
        body = ok_json(http.get("/v1/files", params=params))
        assert body["data"]
        schema.validate("ListFilesResponse", body)
        assert body["object"] == "list"
    page = ok_json(http.get("/v1/files", params={"limit": 1}))
    nxt = ok_json(http.get("/v1/files", params={"limit": 1, "after": page["last_id"]}))
    schema.validate("ListFilesResponse", nxt)


def test_empty_file_list_shape(http: httpx.Client) -> None:
    # The spec types first_id/last_id as strings; like the OpenAI API we answer null on an empty page.
    body = ok_json(http.get("/v1/files", params={"purpose": "vision-nothing-here"}))
    assert body == {"object": "list", "data": [], "first_id": None, "last_id": None, "has_more": False}


def test_delete_response(oai: OpenAI, http: httpx.Client) -> None:
    f = oai.files.create(file=("d.jsonl", b"x\n"), purpose="user_data")
    body = ok_json(http.delete(f"/v1/files/{f.id}"))
    schema.validate("DeleteFileResponse", body)
    assert body == {"id": f.id, "object": "file", "deleted": True}


def test_batch_output_file_objects(oai: OpenAI, http: httpx.Client, input_file: str) -> None:
    b = oai.batches.create(input_file_id=input_file, endpoint=CHAT, completion_window="24h")
    done = wait_for(oai, b.id)
    assert done.output_file_id
    body = ok_json(http.get(f"/v1/files/{done.output_file_id}"))
    schema.validate("OpenAIFile", body)
    assert body["purpose"] == "batch_output"


# --------------------------------------------------------------------------- batches in every reachable status


def test_batch_validating_and_completed(http: httpx.Client, input_file: str) -> None:
    created = ok_json(
        http.post(
            "/v1/batches",
            json={
                "input_file_id": input_file,
                "endpoint": CHAT,
                "completion_window": "24h",
                "metadata": {"k": "v"},
            },
        )
    )
    assert_batch(created, "validating")
    done = poll(http, created["id"], {"completed", "failed", "cancelled", "expired"})
    assert_batch(done, "completed")
    assert_lines(file_lines(http, done["output_file_id"]))


def test_batch_in_progress_cancelling_cancelled(oai: OpenAI, http: httpx.Client) -> None:
    # 4 shards of 10 lines run at once; the other 6 shards are never started once the batch is cancelled
    lines = [chat_line(i, x_fake={"delay": 0.8}) for i in range(100)]
    fid = upload(oai, lines)
    created = ok_json(
        http.post("/v1/batches", json={"input_file_id": fid, "endpoint": CHAT, "completion_window": "24h"})
    )
    running = poll(http, created["id"], {"in_progress"})
    assert_batch(running, "in_progress")
    cancelling = ok_json(http.post(f"/v1/batches/{created['id']}/cancel"))
    assert_batch(cancelling, "cancelling")
    cancelled = poll(http, created["id"], {"cancelled"})
    assert_batch(cancelled, "cancelled")
    out = file_lines(http, cancelled["output_file_id"])
    err = file_lines(http, cancelled["error_file_id"])
    assert err, "unexecuted lines should be in the error file"
    assert_lines(out + err)
    assert {e["error"]["code"] for e in err if e["error"]} == {"batch_cancelled"}
    assert sorted(x["custom_id"] for x in out + err) == sorted(f"req-{i}" for i in range(100))
    # re-cancel answers the same, still conformant
    assert_batch(ok_json(http.post(f"/v1/batches/{created['id']}/cancel")), "cancelled")


@pytest.mark.parametrize(
    "data",
    [b"not json\n", jsonl([chat_line(1), {**chat_line(2), "url": "/v1/embeddings"}]), b""],
    ids=["invalid-json", "invalid-url", "empty"],
)
def test_batch_failed_validation(oai: OpenAI, http: httpx.Client, data: bytes) -> None:
    fid = upload(oai, data)
    created = ok_json(
        http.post("/v1/batches", json={"input_file_id": fid, "endpoint": CHAT, "completion_window": "24h"})
    )
    failed = poll(http, created["id"], {"failed"})
    assert_batch(failed, "failed")
    assert failed["errors"]["data"]


def test_batch_failed_unknown_file(http: httpx.Client) -> None:
    created = ok_json(
        http.post(
            "/v1/batches", json={"input_file_id": "file-nope", "endpoint": CHAT, "completion_window": "24h"}
        )
    )
    assert_batch(created, "validating")
    assert_batch(poll(http, created["id"], {"failed"}), "failed")


def test_output_and_error_lines(oai: OpenAI, http: httpx.Client) -> None:
    lines = [
        chat_line(0),
        chat_line(1, x_fake={"status": 400}),
        chat_line(2),
        chat_line(3, x_fake={"status": 404}),
        chat_line(4, x_fake={"status": 500}),
        chat_line(5, x_fake={"non_json": True}),
        chat_line(6, temperature=0.5, max_tokens=5),
    ]
    fid = upload(oai, lines)
    created = ok_json(
        http.post("/v1/batches", json={"input_file_id": fid, "endpoint": CHAT, "completion_window": "24h"})
    )
    done = poll(http, created["id"], {"completed", "failed", "cancelled", "expired"}, timeout=60)
    assert_batch(done, "completed")
    out = file_lines(http, done["output_file_id"])
    err = file_lines(http, done["error_file_id"])
    assert out and err
    assert_lines(out)
    assert_lines(err)
    assert sorted(x["custom_id"] for x in out + err) == sorted(f"req-{i}" for i in range(7))
    for x in out:
        assert x["response"]["status_code"] == 200
        assert isinstance(x["response"]["body"], dict)
    statuses = {x["custom_id"]: (x["response"] or {}).get("status_code") for x in err}
    assert statuses.get("req-1") == 400 and statuses.get("req-3") == 404


@pytest.mark.parametrize(
    ("endpoint", "body"),
    [
        ("/v1/embeddings", {"model": "text-embedding-3-small", "input": "hello world"}),
        ("/v1/completions", {"model": "m", "prompt": "say hi"}),
        ("/v1/responses", {"model": "m", "input": "say hi"}),
        ("/v1/moderations", {"model": "omni-moderation-latest", "input": "hi"}),
    ],
)
def test_output_lines_for_other_endpoints(
    oai: OpenAI, http: httpx.Client, endpoint: str, body: dict[str, Any]
) -> None:
    lines = [
        {"custom_id": f"c{i}", "method": "POST", "url": endpoint, "body": body | {"user": str(i)}}
        for i in range(3)
    ]
    fid = upload(oai, lines)
    created = ok_json(
        http.post(
            "/v1/batches", json={"input_file_id": fid, "endpoint": endpoint, "completion_window": "24h"}
        )
    )
    done = poll(http, created["id"], {"completed", "failed", "cancelled", "expired"})
    assert_batch(done, "completed")
    out = file_lines(http, done["output_file_id"])
    assert len(out) == 3
    assert_lines(out)


def test_batch_list(oai: OpenAI, http: httpx.Client, input_file: str) -> None:
    for _ in range(2):
        oai.batches.create(input_file_id=input_file, endpoint=CHAT, completion_window="24h")
    for params in ({}, {"limit": 1}, {"limit": 100}):
        body = ok_json(http.get("/v1/batches", params=params))
        assert body["data"]
        schema.validate("ListBatchesResponse", body)
        for b in body["data"]:
            assert schema.spec_properties("Batch") <= set(b)
    first = ok_json(http.get("/v1/batches", params={"limit": 1}))
    schema.validate(
        "ListBatchesResponse", ok_json(http.get("/v1/batches", params={"after": first["last_id"]}))
    )


# --------------------------------------------------------------------------- error responses


def test_error_responses(http: httpx.Client, input_file: str, make_server: Callable[..., Server]) -> None:
    assert_error(http.get("/v1/files/file-nope"), 404)
    assert_error(http.get("/v1/batches/batch_nope"), 404)
    assert_error(http.get("/v1/files", params={"limit": 0}), 400)
    assert_error(http.post("/v1/batches", json={"endpoint": CHAT}), 400)
    assert_error(http.post("/v1/files", content=b"{}", headers={"content-type": "application/json"}), 400)
    assert_error(http.put("/v1/batches"), 405)

    done = ok_json(
        http.post(
            "/v1/batches", json={"input_file_id": input_file, "endpoint": CHAT, "completion_window": "24h"}
        )
    )
    poll(http, done["id"], {"completed"})
    assert_error(http.post(f"/v1/batches/{done['id']}/cancel"), 409)

    s = make_server("--api-key", "k", "--no-worker", "--max-batch-file-bytes", "1000")
    with httpx.Client(base_url=s.root_url, timeout=30) as c:
        assert_error(c.get("/v1/batches"), 401)
        assert_error(c.get("/v1/batches", headers={"authorization": "Bearer bad"}), 401)
        big = c.post(
            "/v1/files",
            headers={"authorization": "Bearer k"},
            data={"purpose": "batch"},
            files={"file": ("big.jsonl", b"x" * 2000)},
        )
        assert_error(big, 413)


# --------------------------------------------------------------------------- nothing a client sends is a 500

LONG = "x" * 20_000
UNICODE_ID = "batch_ünïcødé-🙂-日本"

ODD_INPUTS: list[tuple[str, str, dict[str, Any]]] = [
    # wrong methods
    ("PUT", "/v1/batches", {}),
    ("DELETE", "/v1/batches", {}),
    ("PATCH", "/v1/files", {}),
    ("GET", "/v1/batches/batch_x/cancel", {}),
    ("DELETE", "/v1/batches/batch_x", {}),
    ("POST", "/v1/files/file-x", {}),
    ("PUT", "/v1/files/file-x/content", {}),
    # garbage ids
    ("GET", f"/v1/batches/{UNICODE_ID}", {}),
    ("POST", f"/v1/batches/{UNICODE_ID}/cancel", {}),
    ("GET", "/v1/files/%F0%9F%99%82", {}),
    ("GET", "/v1/files/%00", {}),
    ("GET", "/v1/files/%ED%A0%80", {}),  # an encoded lone surrogate: not UTF-8
    ("GET", "/v1/files/%FF%FE", {}),
    ("GET", "/v1/files/..%2F..%2Fetc%2Fpasswd/content", {}),
    ("DELETE", "/v1/files/" + "f" * 5000, {}),
    ("GET", "/v1/files/' OR 1=1 --", {}),
    ("GET", "/v1/batches/%25s%25n", {}),
    # query values
    ("GET", "/v1/files", {"params": {"limit": "9" * 400}}),
    ("GET", "/v1/files", {"params": {"limit": "-9" + "9" * 400}}),
    ("GET", "/v1/files", {"params": {"limit": "١٠"}}),  # Arabic-Indic digits
    ("GET", "/v1/files", {"params": {"limit": "1e3"}}),
    ("GET", "/v1/files", {"params": {"limit": "nan"}}),
    ("GET", "/v1/files", {"params": {"order": "🙂"}}),
    ("GET", "/v1/files", {"params": {"after": LONG}}),
    ("GET", "/v1/files", {"params": {"after": "\x00"}}),
    ("GET", "/v1/files", {"params": {"purpose": LONG}}),
    ("GET", "/v1/files?limit=1&limit=2&limit=x", {}),
    ("GET", "/v1/files?limit=%FF", {}),
    ("GET", "/v1/batches", {"params": {"limit": "9" * 400}}),
    ("GET", "/v1/batches", {"params": {"after": "🙂" * 1000}}),
    ("GET", "/v1/batches?after=%ED%A0%80", {}),
    # JSON bodies of the wrong shape
    ("POST", "/v1/batches", {"json": []}),
    ("POST", "/v1/batches", {"json": [{"input_file_id": "f"}]}),
    ("POST", "/v1/batches", {"json": None}),
    ("POST", "/v1/batches", {"json": 1e308}),
    ("POST", "/v1/batches", {"json": {}}),
    (
        "POST",
        "/v1/batches",
        {"json": {"input_file_id": {"$gt": ""}, "endpoint": CHAT, "completion_window": "24h"}},
    ),
    ("POST", "/v1/batches", {"json": {"input_file_id": "f", "endpoint": None, "completion_window": "24h"}}),
    (
        "POST",
        "/v1/batches",
        {"json": {"input_file_id": "f", "endpoint": CHAT, "completion_window": "9" * 5000 + "d"}},
    ),
    ("POST", "/v1/batches", {"json": {"input_file_id": "f", "endpoint": CHAT, "completion_window": True}}),
    (
        "POST",
        "/v1/batches",
        {
            "json": {
                "input_file_id": "f",
                "endpoint": CHAT,
                "completion_window": "24h",
                "metadata": {"k": ["v"]},
            }
        },
    ),
    (
        "POST",
        "/v1/batches",
        {
            "json": {
                "input_file_id": "f",
                "endpoint": CHAT,
                "completion_window": "24h",
                "output_expires_after": {"anchor": "created_at", "seconds": "3600"},
            }
        },
    ),
    (
        "POST",
        "/v1/batches",
        {
            "json": {
                "input_file_id": "f",
                "endpoint": CHAT,
                "completion_window": "24h",
                "output_expires_after": {"anchor": "created_at", "seconds": 10**30},
            }
        },
    ),
    (
        "POST",
        "/v1/batches",
        {
            "json": {
                "input_file_id": "f",
                "endpoint": CHAT,
                "completion_window": "24h",
                "output_expires_after": [],
            }
        },
    ),
    ("POST", "/v1/batches", {"content": b"{" * 100_000, "headers": {"content-type": "application/json"}}),
    (
        "POST",
        "/v1/batches",
        {
            "content": b'{"a": ' + b"[" * 5000 + b"]" * 5000 + b"}",
            "headers": {"content-type": "application/json"},
        },
    ),
    (
        "POST",
        "/v1/batches",
        {"content": b" " * (2 * 1024 * 1024), "headers": {"content-type": "application/json"}},
    ),
    (
        "POST",
        "/v1/batches",
        {"content": b'{"input_file_id": "\xff"}', "headers": {"content-type": "application/json"}},
    ),
    (
        "POST",
        "/v1/batches",
        {"content": b"input_file_id=f", "headers": {"content-type": "application/x-www-form-urlencoded"}},
    ),
    ("POST", "/v1/batches/batch_x/cancel", {"json": [1, 2]}),
    # uploads
    ("POST", "/v1/files", {"json": ["purpose", "batch"]}),
    (
        "POST",
        "/v1/files",
        {"content": b"", "headers": {"content-type": "multipart/form-data; boundary=" + "a" * 1000}},
    ),
    (
        "POST",
        "/v1/files",
        {"content": b"--b--\r\n", "headers": {"content-type": "multipart/form-data; boundary=b"}},
    ),
    ("POST", "/v1/files", {"content": b"x", "headers": {"content-type": "multipart/mixed; boundary=b"}}),
    ("POST", "/v1/files", {"data": {"purpose": "batch"}, "files": {"file": ("", b"x")}}),
    ("POST", "/v1/files", {"data": {"purpose": "batch"}, "files": {"file": ("a" * 5000, b"x")}}),
    ("POST", "/v1/files", {"data": {"purpose": "batch" * 1000}, "files": {"file": ("a.jsonl", b"x")}}),
    (
        "POST",
        "/v1/files",
        {"data": {"purpose": ["batch", "user_data"]}, "files": {"file": ("a.jsonl", b"x")}},
    ),
    (
        "POST",
        "/v1/files",
        {"data": {"purpose": "batch"}, "files": [("file", ("a.jsonl", b"x")), ("file", ("b.jsonl", b"y"))]},
    ),
    (
        "POST",
        "/v1/files",
        {
            "data": {
                "purpose": "user_data",
                "expires_after[seconds]": "9" * 500,
                "expires_after[anchor]": "created_at",
            },
            "files": {"file": ("a.jsonl", b"x")},
        },
    ),
    ("POST", "/v1/files", {"data": {"purpose": "batch\x00"}, "files": {"file": ("a.jsonl", b"x")}}),
    # unknown routes
    ("GET", "/v1/uploads", {}),
    ("POST", "/v1/uploads", {"json": {}}),
    ("GET", "/v1/" + "a/" * 500, {}),
]


def test_odd_inputs_never_500(srv: Server, http: httpx.Client) -> None:
    log_before = len(srv.log_path.read_bytes())
    failures: list[str] = []
    for method, path, kw in ODD_INPUTS:
        resp = http.request(method, path, **kw)
        label = f"{method} {path[:80]} {str(kw)[:80]}"
        if resp.status_code >= 500:
            failures.append(f"{label} -> {resp.status_code} {resp.text[:200]}")
            continue
        if resp.status_code >= 400:
            try:
                assert_error(resp)
            except AssertionError as e:
                failures.append(f"{label} -> {resp.status_code}: {e}")
    assert not failures, "\n".join(failures)
    assert http.get("/health").status_code == 200
    log = srv.log_path.read_bytes()[log_before:].decode(errors="replace")
    assert "unexpected error" not in log and "Traceback" not in log, log[-3000:]
