"""End-to-end tests of /v1/batches (create, list, retrieve, cancel), input validation and auth.

`batchyard serve` runs as a real subprocess; the official openai SDK and raw httpx talk to it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Final

import httpx
import openai
import pytest
from openai import OpenAI

from tests.conftest import Server
from tests.support.batches import chat_line, jsonl, read_lines, upload, wait_for
from tests.support.envelope import assert_envelope
from tests.support.fake_upstream import FakeUpstream
from tests.support.processes import ROOT, free_port

CHAT: Final = "/v1/chat/completions"
NOW_SLACK = 10


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def up() -> Iterator[FakeUpstream]:
    with FakeUpstream() as u:
        yield u


def _module_server(factory: pytest.TempPathFactory, name: str, args: list[str]) -> Server:
    return Server(factory.mktemp(name) / "data", args).start()


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory, up: FakeUpstream) -> Iterator[Server]:
    """Every model routed to the fake upstream; fast leases; 10 lines per shard."""
    s = _module_server(
        tmp_path_factory,
        "batches",
        ["--upstream", up.base_url, "--lease-seconds", "2", "--shard-lines", "10"],
    )
    yield s
    s.stop()


@pytest.fixture(scope="module")
def vsrv(tmp_path_factory: pytest.TempPathFactory, up: FakeUpstream) -> Iterator[Server]:
    """Only the model `known-model` is routable."""
    s = _module_server(tmp_path_factory, "validation", ["--upstream", f"known-model={up.base_url}"])
    yield s
    s.stop()


@pytest.fixture(scope="module")
def voai(vsrv: Server) -> OpenAI:
    return vsrv.client()


@pytest.fixture(scope="module")
def asrv(tmp_path_factory: pytest.TempPathFactory, up: FakeUpstream) -> Iterator[Server]:
    """Two API keys, each its own owner."""
    s = _module_server(
        tmp_path_factory, "auth", ["--upstream", up.base_url, "--api-key", "k1", "--api-key", "k2"]
    )
    yield s
    s.stop()


def create_raw(http: httpx.Client, **body: Any) -> httpx.Response:
    return http.post("/v1/batches", json=body)


def valid_body(input_file: str, **over: Any) -> dict[str, Any]:
    return {"input_file_id": input_file, "endpoint": CHAT, "completion_window": "24h", **over}


# --------------------------------------------------------------------------- create


def test_create_returns_the_batch_object(oai: OpenAI, http: httpx.Client, input_file: str) -> None:
    before = int(time.time())
    resp = create_raw(http, **valid_body(input_file, metadata={"team": "search", "run": "1"}))
    assert resp.status_code == 200, resp.text
    b = resp.json()
    assert b["id"].startswith("batch_")
    assert b["object"] == "batch"
    assert b["endpoint"] == CHAT
    assert b["input_file_id"] == input_file
    assert b["completion_window"] == "24h"
    assert b["status"] == "validating"
    assert abs(b["created_at"] - before) <= NOW_SLACK
    assert b["expires_at"] == b["created_at"] + 24 * 3600
    assert b["metadata"] == {"team": "search", "run": "1"}
    assert b["errors"] is None
    assert b["output_file_id"] is None and b["error_file_id"] is None
    for k in (
        "in_progress_at",
        "finalizing_at",
        "completed_at",
        "failed_at",
        "expired_at",
        "cancelling_at",
        "cancelled_at",
    ):
        assert b[k] is None, k
    zero = {
        "succeeded": 0,
        "failed_upstream": 0,
        "expired": 0,
        "cancelled": 0,
        "errored": 0,
    }  # extension fields
    assert b["request_counts"] == {"total": 0, "completed": 0, "failed": 0, **zero}
    assert b["usage"]["total_tokens"] == 0
    assert "model" in b

    done = wait_for(oai, b["id"])
    assert done.status == "completed"
    assert done.metadata == {"team": "search", "run": "1"}
    assert done.request_counts is not None and done.request_counts.total == 3
    assert done.request_counts.completed == 3 and done.request_counts.failed == 0
    assert done.model == "test-model"
    assert (
        done.in_progress_at is not None and done.finalizing_at is not None and done.completed_at is not None
    )
    assert done.created_at <= done.in_progress_at <= done.finalizing_at <= done.completed_at
    out = read_lines(oai, done.output_file_id)
    assert sorted(x["custom_id"] for x in out) == ["req-0", "req-1", "req-2"]
    assert done.error_file_id is None
    # output files are batch_output files of the same owner
    f = oai.files.retrieve(done.output_file_id or "")
    assert f.purpose == "batch_output"


def test_create_through_the_sdk(oai: OpenAI, input_file: str) -> None:
    b = oai.batches.create(
        input_file_id=input_file, endpoint=CHAT, completion_window="24h", metadata={"a": "b"}
    )
    assert b.status == "validating"
    assert b.metadata == {"a": "b"}
    assert b.expires_at == b.created_at + 86400
    assert oai.batches.retrieve(b.id).id == b.id


@pytest.mark.parametrize(
    ("window", "seconds"),
    [("24h", 86400), ("90s", 90), ("2h", 7200), ("3d", 3 * 86400), ("30m", 1800), ("7d", 7 * 86400)],
)
def test_completion_windows(http: httpx.Client, input_file: str, window: str, seconds: int) -> None:
    resp = create_raw(http, **valid_body(input_file, completion_window=window))
    assert resp.status_code == 200, resp.text
    b = resp.json()
    assert b["completion_window"] == window
    assert b["expires_at"] == b["created_at"] + seconds


@pytest.mark.parametrize(
    "window", ["8d", "24x", "0h", "", "24", "h", "24H", "-1h", "1.5h", "169h", " 24h", 24, None]
)
def test_bad_completion_window_is_400(http: httpx.Client, input_file: str, window: Any) -> None:
    assert_envelope(
        create_raw(http, **valid_body(input_file, completion_window=window)), 400, param="completion_window"
    )


@pytest.mark.parametrize(
    "endpoint",
    [
        "/v1/foo",
        "/v1/chat/completions/",
        "v1/chat/completions",
        "/v1/images/edits",
        "https://api.openai.com/v1/chat/completions",
    ],
)
def test_bad_endpoint_is_400(http: httpx.Client, input_file: str, endpoint: str) -> None:
    assert_envelope(
        create_raw(http, **valid_body(input_file, endpoint=endpoint)),
        400,
        param="endpoint",
        code="invalid_value",
    )


def test_bad_endpoint_through_the_sdk(oai: OpenAI, input_file: str) -> None:
    with pytest.raises(openai.BadRequestError) as ei:
        oai.batches.create(input_file_id=input_file, endpoint="/v1/foo", completion_window="24h")  # type: ignore[arg-type]
    assert ei.value.param == "endpoint"
    assert ei.value.code == "invalid_value"


@pytest.mark.parametrize("missing", ["input_file_id", "endpoint", "completion_window"])
def test_missing_required_field_is_400(http: httpx.Client, input_file: str, missing: str) -> None:
    body = valid_body(input_file)
    del body[missing]
    assert_envelope(create_raw(http, **body), 400, param=missing, code="missing_required_parameter")


@pytest.mark.parametrize(
    "metadata",
    [
        {f"k{i}": "v" for i in range(17)},
        {"k" * 65: "v"},
        {"k": "v" * 513},
        {"k": 1},
        {"k": None},
        {"k": {"nested": "x"}},
        ["k", "v"],
        "k=v",
    ],
    ids=["17-pairs", "key-65", "value-513", "int-value", "null-value", "object-value", "list", "string"],
)
def test_bad_metadata_is_400(http: httpx.Client, input_file: str, metadata: Any) -> None:
    # a value of the wrong type or length names its key, as OpenAI does ("metadata.k")
    param = "metadata.k" if isinstance(metadata, dict) and "k" in metadata else "metadata"
    assert_envelope(create_raw(http, **valid_body(input_file, metadata=metadata)), 400, param=param)


def test_a_metadata_value_of_another_type_is_openais_invalid_type(
    http: httpx.Client, input_file: str
) -> None:
    r = create_raw(http, **valid_body(input_file, metadata={"tags": ["tag1", "tag2"]}))
    assert r.status_code == 400
    assert r.json()["error"] == {
        "message": "Invalid type for 'metadata.tags': expected a string, but got an array instead.",
        "type": "invalid_request_error",
        "param": "metadata.tags",
        "code": "invalid_type",
    }


def test_metadata_at_the_limits_is_accepted(http: httpx.Client, input_file: str) -> None:
    md = {f"{i:02d}" + "k" * 62: "v" * 512 for i in range(16)}
    resp = create_raw(http, **valid_body(input_file, metadata=md))
    assert resp.status_code == 200, resp.text
    assert resp.json()["metadata"] == md
    resp = create_raw(http, **valid_body(input_file, metadata=None))
    assert resp.status_code == 200 and resp.json()["metadata"] is None


@pytest.mark.parametrize(
    "body",
    [b"{not json", b"", b"[]", b"null", b"42", b'"a string"', b"\xff\xfe\x00", b'{"input_file_id": "f",'],
)
def test_invalid_json_body_is_400(http: httpx.Client, body: bytes) -> None:
    resp = http.post("/v1/batches", content=body, headers={"content-type": "application/json"})
    err = assert_envelope(resp, 400)
    assert err["type"] == "invalid_request_error"


def test_wrong_types_are_400(http: httpx.Client, input_file: str) -> None:
    assert_envelope(create_raw(http, **valid_body(123)), 400, param="input_file_id")  # type: ignore[arg-type]
    assert_envelope(
        create_raw(http, **valid_body(input_file, endpoint=["/v1/chat/completions"])), 400, param="endpoint"
    )
    assert_envelope(create_raw(http, **valid_body("")), 400, param="input_file_id")


# --------------------------------------------------------------------------- list


def test_list_newest_first(oai: OpenAI, input_file: str) -> None:
    made = [
        oai.batches.create(input_file_id=input_file, endpoint=CHAT, completion_window="24h").id
        for _ in range(3)
    ]
    page = oai.batches.list(limit=3)
    assert [b.id for b in page.data] == list(reversed(made))


# --------------------------------------------------------------------------- retrieve / cancel


def test_retrieve_unknown_is_404(oai: OpenAI, http: httpx.Client) -> None:
    assert_envelope(http.get("/v1/batches/batch_doesnotexist"), 404)
    with pytest.raises(openai.NotFoundError):
        oai.batches.retrieve("batch_doesnotexist")


def test_cancel_unknown_is_404(oai: OpenAI, http: httpx.Client) -> None:
    assert_envelope(http.post("/v1/batches/batch_doesnotexist/cancel"), 404)
    with pytest.raises(openai.NotFoundError):
        oai.batches.cancel("batch_doesnotexist")


def test_cancel_completed_batch_is_409(oai: OpenAI, http: httpx.Client, input_file: str) -> None:
    b = oai.batches.create(input_file_id=input_file, endpoint=CHAT, completion_window="24h")
    done = wait_for(oai, b.id)
    assert done.status == "completed"
    assert_envelope(http.post(f"/v1/batches/{b.id}/cancel"), 409)
    with pytest.raises(openai.ConflictError):
        oai.batches.cancel(b.id)
    assert oai.batches.retrieve(b.id).status == "completed"


def test_cancel_failed_batch_is_409(oai: OpenAI, http: httpx.Client) -> None:
    fid = upload(oai, b"this is not json\n")
    b = oai.batches.create(input_file_id=fid, endpoint=CHAT, completion_window="24h")
    assert wait_for(oai, b.id).status == "failed"
    assert_envelope(http.post(f"/v1/batches/{b.id}/cancel"), 409)


def test_cancel_in_progress_then_cancel_again_returns_it_unchanged(oai: OpenAI, http: httpx.Client) -> None:
    lines = [chat_line(i, x_fake={"delay": 1.0}) for i in range(12)]
    b = oai.batches.create(input_file_id=upload(oai, lines), endpoint=CHAT, completion_window="24h")
    wait_for(oai, b.id, {"in_progress"})
    c = oai.batches.cancel(b.id)
    assert c.status == "cancelling"
    assert c.cancelling_at is not None
    done = wait_for(oai, b.id)
    assert done.status == "cancelled"
    assert done.cancelled_at is not None and done.cancelled_at >= (done.cancelling_at or 0)
    snapshot = http.get(f"/v1/batches/{b.id}").json()
    again = http.post(f"/v1/batches/{b.id}/cancel")
    assert again.status_code == 200, again.text
    assert again.json() == snapshot
    assert http.get(f"/v1/batches/{b.id}").json() == snapshot
    # every line is accounted for exactly once
    out = read_lines(oai, done.output_file_id)
    err = read_lines(oai, done.error_file_id)
    ids = [x["custom_id"] for x in out + err]
    assert sorted(ids) == sorted(f"req-{i}" for i in range(12))
    for e in err:
        assert e["response"] is None
        assert e["error"]["code"] == "batch_cancelled"


def test_cancel_while_validating(make_server: Callable[..., Server]) -> None:
    s = make_server("--no-worker")
    oai = s.client()
    b = oai.batches.create(input_file_id=upload(oai, [chat_line(0)]), endpoint=CHAT, completion_window="24h")
    c = oai.batches.cancel(b.id)
    assert c.status == "cancelling"
    # cancelling a cancelling batch returns it as it is
    assert oai.batches.cancel(b.id) == oai.batches.retrieve(b.id)


# --------------------------------------------------------------------------- input file problems


def _assert_file_error(b: Any) -> dict[str, Any]:
    assert b.status == "failed"
    assert b.failed_at is not None
    assert b.errors is not None and b.errors.object == "list" and b.errors.data is not None
    assert len(b.errors.data) == 1
    e: dict[str, Any] = b.errors.data[0].model_dump()
    assert e["code"] == "invalid_request"
    assert e["line"] is None
    assert e["message"]
    return e


def test_unknown_input_file_fails_the_batch(oai: OpenAI) -> None:
    b = oai.batches.create(input_file_id="file-doesnotexist", endpoint=CHAT, completion_window="24h")
    assert b.status == "validating"
    done = wait_for(oai, b.id)
    e = _assert_file_error(done)
    assert e["param"] == "file_id"  # what OpenAI answers (reference/README.md)
    assert done.output_file_id is None and done.error_file_id is None


@pytest.mark.parametrize("purpose", ["user_data", "fine-tune"])
def test_input_file_with_other_purpose_fails_the_batch(oai: OpenAI, purpose: str) -> None:
    f = oai.files.create(file=("in.jsonl", jsonl([chat_line(0)])), purpose=purpose)  # type: ignore[arg-type]
    b = oai.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="24h")
    e = _assert_file_error(wait_for(oai, b.id))
    assert "batch" in e["message"]


def test_output_file_as_input_fails_the_batch(oai: OpenAI, input_file: str) -> None:
    b = oai.batches.create(input_file_id=input_file, endpoint=CHAT, completion_window="24h")
    done = wait_for(oai, b.id)
    assert done.output_file_id
    b2 = oai.batches.create(input_file_id=done.output_file_id, endpoint=CHAT, completion_window="24h")
    _assert_file_error(wait_for(oai, b2.id))


def test_deleted_input_file_fails_the_batch(oai: OpenAI) -> None:
    fid = upload(oai, [chat_line(0)])
    oai.files.delete(fid)
    b = oai.batches.create(input_file_id=fid, endpoint=CHAT, completion_window="24h")
    done = wait_for(oai, b.id)
    assert done.status == "failed"
    assert done.failed_at is not None


# --------------------------------------------------------------------------- validation (status validating)


def _good(i: int) -> dict[str, Any]:
    return chat_line(i, model="known-model")


def _line(i: int, **over: Any) -> dict[str, Any]:
    d = _good(i)
    for k, v in over.items():
        if k.startswith("body_"):
            key = k[5:]
            if v is ...:
                del d["body"][key]
            else:
                d["body"][key] = v
        elif v is ...:
            del d[k]
        else:
            d[k] = v
    return d


def _validate(voai: OpenAI, data: bytes, endpoint: str = CHAT) -> Any:
    fid = voai.files.create(file=("input.jsonl", data), purpose="batch").id
    b = voai.batches.create(input_file_id=fid, endpoint=endpoint, completion_window="24h")  # type: ignore[arg-type]
    done = wait_for(voai, b.id)
    assert done.status == "failed", done
    assert done.failed_at is not None
    assert done.in_progress_at is None
    assert done.output_file_id is None and done.error_file_id is None
    assert done.errors is not None and done.errors.object == "list" and done.errors.data is not None
    return [e.model_dump() for e in done.errors.data]


def _bad_line(line: dict[str, Any] | bytes) -> bytes:
    """A file whose line 2 is the bad one (line 1 and 3 are good)."""
    mid = line if isinstance(line, bytes) else json.dumps(line).encode()
    return json.dumps(_good(1)).encode() + b"\n" + mid + b"\n" + json.dumps(_good(3)).encode() + b"\n"


@pytest.mark.parametrize(
    ("line", "code", "param"),
    [
        (b"{not json", "invalid_json_line", None),
        (b"[1, 2, 3]", "invalid_json_line", None),
        (_line(2, custom_id=...), "missing_required_parameter", "custom_id"),
        (_line(2, method=...), "missing_required_parameter", "method"),
        (_line(2, url=...), "missing_required_parameter", "url"),
        (_line(2, body=...), "missing_required_parameter", "body"),
        (_line(2, url="/v1/embeddings"), "invalid_url", "url"),
        (_line(2, body_model="other-model"), "model_not_found", "body.model"),
        (_line(2, body_stream=True), "streaming_unsupported", "body.stream"),
        (_line(2, body_model=...), "invalid_request", "body.model"),
        (_line(2, body_messages=...), "invalid_request", "body.messages"),
    ],
    ids=[
        "invalid-json",
        "json-array",
        "no-custom_id",
        "no-method",
        "no-url",
        "no-body",
        "invalid-url",
        "model-not-found",
        "streaming",
        "no-model",
        "no-messages",
    ],
)
def test_line_errors(voai: OpenAI, line: dict[str, Any] | bytes, code: str, param: str | None) -> None:
    errors = _validate(voai, _bad_line(line))
    assert len(errors) == 1, errors
    e = errors[0]
    assert e["code"] == code
    assert e["line"] == 2
    assert e["param"] == param
    assert e["message"]
    if code == "invalid_json_line":
        assert e["message"] == "This line is not parseable as valid JSON."


def test_duplicate_custom_id(voai: OpenAI) -> None:
    data = jsonl([_good(1), _good(2), _good(1)])
    errors = _validate(voai, data)
    assert len(errors) == 1
    assert errors[0]["code"] == "duplicate_custom_id"
    assert errors[0]["line"] == 3
    assert errors[0]["message"].startswith("The custom_id for this request is a duplicate of another request")


def test_line_numbers_count_blank_lines(voai: OpenAI) -> None:
    data = (
        json.dumps(_good(1)).encode()
        + b"\n\n   \r\n"
        + b"oops\n"
        + json.dumps(_good(5)).encode()
        + b"\r\n"
        + json.dumps(_line(6, body_stream=True)).encode()  # last line, no newline
    )
    errors = _validate(voai, data)
    assert [(e["line"], e["code"]) for e in errors] == [
        (4, "invalid_json_line"),
        (6, "streaming_unsupported"),
    ]


def test_several_errors_are_reported_in_line_order(voai: OpenAI) -> None:
    data = jsonl(
        [_good(1), _line(2, url="/v1/completions"), _good(3), _line(4, method=...), _line(5, custom_id=...)]
    )
    errors = _validate(voai, data)
    assert [(e["line"], e["code"], e["param"]) for e in errors] == [
        (2, "invalid_url", "url"),
        (4, "missing_required_parameter", "method"),
        (5, "missing_required_parameter", "custom_id"),
    ]


@pytest.mark.parametrize("data", [b"", b"\n\n  \n"], ids=["zero-bytes", "blank-lines"])
def test_empty_file(voai: OpenAI, data: bytes) -> None:
    errors = _validate(voai, data)
    assert len(errors) == 1
    assert errors[0]["line"] is None
    assert errors[0]["code"] == "empty_file"


def test_more_than_100_errors_reports_exactly_100(voai: OpenAI) -> None:
    data = b"".join(b"bad line %d\n" % i for i in range(150))
    errors = _validate(voai, data)
    assert len(errors) == 100
    assert [e["line"] for e in errors] == list(range(1, 101))
    assert {e["code"] for e in errors} == {"invalid_json_line"}


def test_too_many_lines(make_server: Callable[..., Server], up: FakeUpstream) -> None:
    s = make_server("--upstream", up.base_url, "--max-lines", "5")
    oai = s.client()
    errors = _validate(oai, jsonl([chat_line(i) for i in range(6)]))
    assert len(errors) == 1
    assert errors[0]["line"] is None
    assert errors[0]["code"] == "too_many_lines"
    # exactly at the limit is fine
    b = oai.batches.create(
        input_file_id=upload(oai, [chat_line(i) for i in range(5)]), endpoint=CHAT, completion_window="24h"
    )
    assert wait_for(oai, b.id).status == "completed"


def test_valid_file_on_the_validation_server_runs(voai: OpenAI) -> None:
    fid = upload(voai, [_good(i) for i in range(4)])
    b = voai.batches.create(input_file_id=fid, endpoint=CHAT, completion_window="24h")
    done = wait_for(voai, b.id)
    assert done.status == "completed"
    assert done.request_counts is not None and done.request_counts.completed == 4


# --------------------------------------------------------------------------- auth

ROUTES: list[tuple[str, str]] = [
    ("GET", "/v1/files"),
    ("POST", "/v1/files"),
    ("GET", "/v1/files/file-x"),
    ("GET", "/v1/files/file-x/content"),
    ("DELETE", "/v1/files/file-x"),
    ("GET", "/v1/batches"),
    ("POST", "/v1/batches"),
    ("GET", "/v1/batches/batch_x"),
    ("POST", "/v1/batches/batch_x/cancel"),
    ("GET", "/v1/models"),
]


@pytest.mark.parametrize(("method", "path"), ROUTES)
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
def test_unauthenticated_is_401_everywhere(
    asrv: Server, method: str, path: str, headers: dict[str, str]
) -> None:
    with httpx.Client(base_url=asrv.root_url, timeout=30) as http:
        body: dict[str, Any] = {}
        if method == "POST" and path == "/v1/files":
            body = {"data": {"purpose": "batch"}, "files": {"file": ("a.jsonl", b"x\n")}}
        elif method == "POST" and path == "/v1/batches":
            body = {"json": {"input_file_id": "file-x", "endpoint": CHAT, "completion_window": "24h"}}
        resp = http.request(method, path, headers=headers, **body)
        err = assert_envelope(resp, 401)
        assert err["type"] == "invalid_request_error"
        assert err["code"] in ("missing_api_key", "invalid_api_key")
        assert "k1" not in err["message"] and "k2" not in err["message"]


def test_health_is_open_and_keys_work(asrv: Server) -> None:
    with httpx.Client(base_url=asrv.root_url, timeout=30) as http:
        assert http.get("/health").status_code == 200
        assert http.get("/v1/files", headers={"authorization": "Bearer k1"}).status_code == 200
        assert http.get("/v1/files", headers={"authorization": "bearer k2"}).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        asrv.client(api_key="nope").files.list()
    with pytest.raises(openai.AuthenticationError):
        asrv.client(api_key="nope").batches.list()


def test_owners_are_isolated(asrv: Server) -> None:
    k1, k2 = asrv.client(api_key="k1"), asrv.client(api_key="k2")
    f = k1.files.create(file=("in.jsonl", jsonl([chat_line(0)])), purpose="batch")
    b = k1.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="24h")
    done = wait_for(k1, b.id)
    assert done.status == "completed" and done.output_file_id

    for fid in (f.id, done.output_file_id):
        with pytest.raises(openai.NotFoundError):
            k2.files.retrieve(fid)
        with pytest.raises(openai.NotFoundError):
            k2.files.content(fid)
        with pytest.raises(openai.NotFoundError):
            k2.files.delete(fid)
    with pytest.raises(openai.NotFoundError):
        k2.batches.retrieve(b.id)
    with pytest.raises(openai.NotFoundError):
        k2.batches.cancel(b.id)
    assert f.id not in {x.id for x in k2.files.list()}
    assert b.id not in {x.id for x in k2.batches.list()}
    # a cursor from k1 leaks nothing to k2
    assert k2.batches.list(after=b.id).data == []
    assert k2.files.list(after=f.id).data == []

    # k1 still has everything (k2's delete did nothing)
    assert k1.files.retrieve(f.id).id == f.id
    assert k1.files.content(done.output_file_id).content
    assert b.id in {x.id for x in k1.batches.list()}

    # k2 cannot run a batch on k1's file
    b2 = k2.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="24h")
    failed = wait_for(k2, b2.id)
    assert failed.status == "failed"
    assert failed.errors is not None and failed.errors.data
    assert failed.errors.data[0].code == "invalid_request"
    with pytest.raises(openai.NotFoundError):
        k1.batches.retrieve(b2.id)


def _serve_cmd(tmp: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "batchyard.cli.main",
        "serve",
        "--port",
        str(free_port()),
        "--data-dir",
        str(tmp / "d"),
        *extra,
    ]


def test_refuses_to_bind_all_interfaces_without_keys(tmp_path: Path) -> None:
    proc = subprocess.run(
        _serve_cmd(tmp_path, "--host", "0.0.0.0"), cwd=ROOT, capture_output=True, timeout=60, text=True
    )
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "--api-key" in out
    assert "0.0.0.0" in out


def test_binds_all_interfaces_with_insecure_no_auth(make_server: Callable[..., Server]) -> None:
    s = make_server("--host", "0.0.0.0", "--insecure-no-auth", "--no-worker")
    with httpx.Client(base_url=s.root_url, timeout=30) as http:
        assert http.get("/health").status_code == 200
        assert http.get("/v1/files").status_code == 200
    s.stop()
    assert s.proc is not None and s.proc.returncode is not None


def test_binds_all_interfaces_with_a_key(make_server: Callable[..., Server]) -> None:
    s = make_server("--host", "0.0.0.0", "--api-key", "secret", "--no-worker")
    with httpx.Client(base_url=s.root_url, timeout=30) as http:
        assert http.get("/v1/files").status_code == 401
        assert http.get("/v1/files", headers={"authorization": "Bearer secret"}).status_code == 200
