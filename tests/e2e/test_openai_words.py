"""OpenAI's exact words (issue 12): the messages, params and codes OpenAI answers, as recorded by public suites run
against the real API (Llama Stack's tests/integration/batches/test_batches_errors.py keeps them in comments), checked
through a real `batchyard serve` with the official SDK and raw HTTP."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Final

import httpx
import openai
import pytest
from openai import OpenAI

from tests.conftest import Server
from tests.support.batches import chat_line, upload, wait_for
from tests.support.fake_upstream import FakeUpstream

CHAT: Final = "/v1/chat/completions"


@pytest.fixture(scope="module")
def up() -> Iterator[FakeUpstream]:
    with FakeUpstream() as u:
        yield u


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory, up: FakeUpstream) -> Iterator[Server]:
    # one exact model route, so that an unknown model is unknown
    s = Server(tmp_path_factory.mktemp("words") / "data", ["--upstream", f"test-model={up.base_url}"]).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def strict(tmp_path_factory: pytest.TempPathFactory, up: FakeUpstream) -> Iterator[Server]:
    args = ["--upstream", up.base_url, "--completion-windows", "openai"]
    s = Server(tmp_path_factory.mktemp("strict") / "data", args).start()
    yield s
    s.stop()


def error_of(resp: httpx.Response, status: int) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    err: dict[str, Any] = resp.json()["error"]
    return err


def test_an_unknown_endpoint(oai: OpenAI, http: httpx.Client, input_file: str) -> None:
    body = {"input_file_id": input_file, "endpoint": "/v1/invalid/endpoint", "completion_window": "24h"}
    assert error_of(http.post("/v1/batches", json=body), 400) == {
        "message": "Invalid value: '/v1/invalid/endpoint'. Supported values are: '/v1/responses', "
        "'/v1/chat/completions', '/v1/embeddings', '/v1/completions', and '/v1/moderations'.",
        "type": "invalid_request_error",
        "param": "endpoint",
        "code": "invalid_value",
    }


def test_a_missing_input_file_fails_the_batch_as_openai_does(oai: OpenAI) -> None:
    b = oai.batches.create(input_file_id="file-nonexistent-xyz", endpoint=CHAT, completion_window="24h")
    b = wait_for(oai, b.id)
    assert b.status == "failed" and b.errors is not None and b.errors.data is not None
    (err,) = b.errors.data
    assert (err.code, err.param, err.line) == ("invalid_request", "file_id", None)
    assert err.message is not None
    assert err.message.startswith("Cannot find file file-nonexistent-xyz, or organization ")
    assert err.message.endswith(" does not have access to it.")


def test_line_errors_in_openais_words(oai: OpenAI) -> None:
    lines = [
        {
            "custom_id": "a",
            "method": "POST",
            "url": CHAT,
            "body": {"model": "nonexistent-model-xyz", "messages": []},
        },
        {
            "custom_id": "b",
            "method": "POST",
            "url": CHAT,
            "body": {"model": "test-model", "messages": [], "stream": True},
        },
        {
            "custom_id": "c",
            "method": "POST",
            "url": "/v1/embeddings",
            "body": {"model": "test-model", "input": "x"},
        },
        {"custom_id": "d", "method": "POST", "url": CHAT, "body": {"messages": []}},
        {"custom_id": "e", "method": "POST", "url": CHAT, "body": {"model": "test-model"}},
        {"method": "POST", "url": CHAT, "body": {"model": "test-model", "messages": []}},
    ]
    b = oai.batches.create(input_file_id=upload(oai, lines), endpoint=CHAT, completion_window="24h")
    b = wait_for(oai, b.id)
    assert b.status == "failed" and b.errors is not None and b.errors.data is not None
    got = [(e.line, e.code, e.param, e.message) for e in b.errors.data]
    assert got == [
        (
            1,
            "model_not_found",
            "body.model",
            "The provided model 'nonexistent-model-xyz' is not supported by the Batch API.",
        ),
        (
            2,
            "streaming_unsupported",
            "body.stream",
            "Chat Completions: Streaming is not supported in the Batch API.",
        ),
        (3, "invalid_url", "url", "The URL provided for this request does not match the batch endpoint."),
        (4, "invalid_request", "body.model", "Model parameter is required."),
        (5, "invalid_request", "body.messages", "Messages parameter is required."),
        (6, "missing_required_parameter", "custom_id", "Missing required parameter: 'custom_id'."),
    ]


def test_an_unknown_field_is_refused_as_openais_validation_does(http: httpx.Client, input_file: str) -> None:
    body = {"input_file_id": input_file, "endpoint": CHAT, "completion_window": "24h", "priority": "high"}
    assert error_of(http.post("/v1/batches", json=body), 400) == {
        "message": "Unknown parameter: 'priority'.",
        "type": "invalid_request_error",
        "param": "priority",
        "code": "unknown_parameter",
    }


def test_cancelling_a_completed_batch(oai: OpenAI, http: httpx.Client) -> None:
    b = oai.batches.create(input_file_id=upload(oai, [chat_line(0)]), endpoint=CHAT, completion_window="24h")
    assert wait_for(oai, b.id).status == "completed"
    assert error_of(http.post(f"/v1/batches/{b.id}/cancel"), 409)["message"] == (
        "Cannot cancel a batch with status 'completed'."
    )


def test_durations_are_batchyards_extension_and_openai_mode_takes_only_24h(
    oai: OpenAI, http: httpx.Client, input_file: str, strict: Server
) -> None:
    body = {"input_file_id": input_file, "endpoint": CHAT, "completion_window": "2h"}
    assert http.post("/v1/batches", json=body).status_code == 200  # the default: durations up to 7 days
    with httpx.Client(base_url=strict.root_url, timeout=30) as h:
        fid = upload(strict.client(), [chat_line(0)])
        for window in ("2h", "1h", "48h", "invalid", ""):
            err = error_of(
                h.post("/v1/batches", json={**body, "input_file_id": fid, "completion_window": window}), 400
            )
            assert err["param"] == "completion_window"
            if window:  # (an empty string is refused as a missing value)
                assert err["code"] == "invalid_value"
                assert err["message"] == f"Invalid value: '{window}'. Supported values are: '24h'."
        assert (
            h.post("/v1/batches", json={**body, "input_file_id": fid, "completion_window": "24h"}).status_code
            == 200
        )


def test_user_data_content_is_not_served(oai: OpenAI) -> None:
    f = oai.files.create(file=("notes.txt", b"private"), purpose="user_data")
    with pytest.raises(openai.BadRequestError) as e:
        oai.files.content(f.id)
    assert e.value.status_code == 400
    assert e.value.body == {
        "message": "Not allowed to download files of purpose: user_data",
        "type": "invalid_request_error",
        "param": None,
        "code": None,
    }
