"""batchyard's extensions of the Batch API (docs/api.md "Extensions"), against `batchyard serve`: partial results
while a batch runs, delete and retry, per-outcome counts, the dry run, output in input order. Raw httpx for the extensions, the official SDK for the objects it parses."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from tests.conftest import Server
from tests.support.batches import chat_line, read_lines, run_batch, upload, wait_for
from tests.support.envelope import assert_envelope
from tests.support.fake_upstream import FakeUpstream

SLOW_S = 6.0


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    args = ["--shard-lines", "2", "--no-prefix-ordering", "--lease-seconds", "5", "--concurrency", "4"]
    args += ["--api-key", "sk-test"]
    with (
        FakeUpstream() as up,
        Server(tmp_path_factory.mktemp("ext") / "data", ["--upstream", up.base_url, *args]) as s,
    ):
        yield s


@pytest.fixture(scope="module")
def http(srv: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=srv.root_url, timeout=30, headers={"Authorization": "Bearer sk-test"}) as c:
        yield c


def lines_of(resp: httpx.Response) -> list[dict[str, Any]]:
    assert resp.status_code == 200, resp.text
    return [json.loads(x) for x in resp.text.splitlines()]


def ids_of(lines: list[dict[str, Any]]) -> list[str]:
    return [x["custom_id"] for x in lines]


def results(http: httpx.Client, batch_id: str, **params: Any) -> httpx.Response:
    return http.get(f"/v1/batches/{batch_id}/results", params=params)


def follow(http: httpx.Client, batch_id: str, after: str | None, **params: Any) -> tuple[list[str], str]:
    """Every page from `after` until the current end; the custom ids read and the cursor to go on from."""
    got: list[str] = []
    while True:
        resp = results(http, batch_id, **params, **({} if after is None else {"after": after}))
        page = ids_of(lines_of(resp))
        got += page
        after = resp.headers["x-next-cursor"]
        if len(page) < int(params.get("limit", 1000)):
            return got, after


def mixed_lines() -> list[dict[str, Any]]:
    """req-0..3 answer at once (req-1 and req-3 with a 400), req-4..7 after SLOW_S."""
    fast = [chat_line(i, x_fake={"status": 400} if i % 2 else None) for i in range(4)]
    return fast + [chat_line(i, x_fake={"delay": SLOW_S}) for i in range(4, 8)]


@pytest.fixture(scope="module")
def running(oai: OpenAI, http: httpx.Client) -> dict[str, Any]:
    """A batch caught while its slow lines run: its id and the results read then (all pages of 1 line)."""
    fid = upload(oai, mixed_lines())
    b = oai.batches.create(input_file_id=fid, endpoint="/v1/chat/completions", completion_window="24h")
    deadline = time.monotonic() + SLOW_S - 1
    while True:
        got, cursor = follow(http, b.id, None, limit=1)
        if len(got) == 4 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    return {
        "id": b.id,
        "early": got,
        "cursor": cursor,
        "status": oai.batches.retrieve(b.id).status,
        "failed": ids_of(lines_of(results(http, b.id, status="failed"))),
        "more": results(http, b.id).headers["x-has-more"],
    }


def test_results_while_running_hold_the_committed_lines(running: dict[str, Any]) -> None:
    assert running["status"] == "in_progress"
    assert sorted(running["early"]) == ["req-0", "req-1", "req-2", "req-3"]
    assert sorted(running["failed"]) == ["req-1", "req-3"]
    assert running["more"] == "true"


def test_the_cursor_goes_on_after_the_batch_ends(
    oai: OpenAI, http: httpx.Client, running: dict[str, Any]
) -> None:
    b = wait_for(oai, running["id"], timeout=60)
    assert b.status == "completed"
    rest, _ = follow(http, b.id, running["cursor"], limit=3)
    assert sorted(rest) == ["req-4", "req-5", "req-6", "req-7"]  # every line once across the two phases
    end = results(http, b.id, after=running["cursor"], limit=10)
    assert end.headers["x-has-more"] == "false"


def test_filters_on_an_ended_batch(oai: OpenAI, http: httpx.Client, running: dict[str, Any]) -> None:
    b = wait_for(oai, running["id"], timeout=60)
    everything = lines_of(results(http, b.id))
    assert sorted(ids_of(everything)) == [f"req-{i}" for i in range(8)]
    assert sorted(ids_of(lines_of(results(http, b.id, status="failed")))) == ["req-1", "req-3"]
    ok = lines_of(results(http, b.id, status="completed"))
    assert sorted(ids_of(ok)) == ["req-0", "req-2", "req-4", "req-5", "req-6", "req-7"]
    assert all(x["response"]["status_code"] == 200 for x in ok)
    one = lines_of(results(http, b.id, custom_id="req-5"))
    assert ids_of(one) == ["req-5"]
    assert lines_of(results(http, b.id, custom_id="req-1", status="completed")) == []
    # paged by 3, the pages together are the whole
    paged, _ = follow(http, b.id, None, limit=3)
    assert sorted(paged) == sorted(ids_of(everything)) and len(paged) == 8


def test_results_refuse_a_bad_cursor_and_an_unknown_batch(
    http: httpx.Client, running: dict[str, Any]
) -> None:
    assert_envelope(
        results(http, running["id"], after="not-a-cursor"), 400, param="after", code="invalid_value"
    )
    assert_envelope(results(http, running["id"], status="x"), 400, param="status")
    assert_envelope(results(http, "batch_nope"), 404, code="batch_not_found")


# -- delete and retry -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ended(oai: OpenAI) -> str:
    """A completed batch: req-1 failed with a 400 upstream, req-3 with a 422, the rest succeeded."""
    status = {1: 400, 3: 422}
    lines = [chat_line(i, x_fake={"status": status[i]} if i in status else None) for i in range(6)]
    b = run_batch(oai, lines)
    assert b.status == "completed" and b.request_counts is not None and b.request_counts.failed == 2
    return b.id


def retry(http: httpx.Client, batch_id: str, body: dict[str, Any] | None = None) -> httpx.Response:
    return (
        http.post(f"/v1/batches/{batch_id}/retry", json=body)
        if body is not None
        else http.post(f"/v1/batches/{batch_id}/retry")
    )


def test_retry_makes_a_batch_of_the_failed_lines(oai: OpenAI, http: httpx.Client, ended: str) -> None:
    resp = retry(http, ended)
    assert resp.status_code == 200, resp.text
    new = oai.batches.retrieve(resp.json()["id"])  # the SDK parses it
    assert new.id != ended and new.endpoint == "/v1/chat/completions"
    assert sorted(ids_of(read_lines(oai, new.input_file_id))) == ["req-1", "req-3"]
    done = wait_for(oai, new.id)
    assert done.request_counts is not None and done.request_counts.total == 2


def test_retry_picks_lines_by_code(oai: OpenAI, http: httpx.Client, ended: str) -> None:
    resp = retry(http, ended, {"codes": ["422"]})
    assert resp.status_code == 200, resp.text
    assert ids_of(read_lines(oai, resp.json()["input_file_id"])) == ["req-3"]
    err = assert_envelope(retry(http, ended, {"codes": ["rate_limit_exceeded"]}), 400, code="no_failed_lines")
    assert ended in err["message"]
    assert_envelope(retry(http, ended, {"codes": "422"}), 400, param="codes", code="invalid_value")
    assert_envelope(retry(http, ended, {"x": 1}), 400, param="x", code="unknown_parameter")


def test_a_batch_with_no_failed_lines_has_nothing_to_retry(oai: OpenAI, http: httpx.Client) -> None:
    b = run_batch(oai, [chat_line(0)])
    assert_envelope(retry(http, b.id), 400, code="no_failed_lines")


def test_a_running_batch_is_neither_retried_nor_deleted(oai: OpenAI, http: httpx.Client) -> None:
    fid = upload(oai, [chat_line(0, x_fake={"delay": 3})])
    b = oai.batches.create(input_file_id=fid, endpoint="/v1/chat/completions", completion_window="24h")
    assert_envelope(retry(http, b.id), 409, code="batch_not_ended")
    assert_envelope(http.delete(f"/v1/batches/{b.id}"), 409, code="batch_not_ended")
    assert oai.batches.retrieve(b.id).status in ("validating", "in_progress")
    oai.batches.cancel(b.id)
    assert wait_for(oai, b.id).status == "cancelled"


def test_delete_an_ended_batch_keeps_its_files_unless_asked(oai: OpenAI, http: httpx.Client) -> None:
    lines = [chat_line(0), chat_line(1, x_fake={"status": 400})]
    kept, dropped = run_batch(oai, lines), run_batch(oai, lines)
    resp = http.delete(f"/v1/batches/{kept.id}")
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"id": kept.id, "object": "batch", "deleted": True, "deleted_file_ids": []}
    with pytest.raises(openai.NotFoundError):
        oai.batches.retrieve(kept.id)
    assert kept.id not in [b.id for b in oai.batches.list(limit=100)]
    assert (
        kept.output_file_id is not None and oai.files.retrieve(kept.output_file_id).id == kept.output_file_id
    )
    assert_envelope(http.delete(f"/v1/batches/{kept.id}"), 404, code="batch_not_found")

    resp = http.delete(f"/v1/batches/{dropped.id}", params={"files": "true"})
    assert resp.status_code == 200, resp.text
    assert set(resp.json()["deleted_file_ids"]) == {dropped.output_file_id, dropped.error_file_id}
    for fid in (dropped.output_file_id, dropped.error_file_id):
        assert fid is not None
        with pytest.raises(openai.NotFoundError):
            oai.files.retrieve(fid)
    assert oai.files.retrieve(dropped.input_file_id).id == dropped.input_file_id  # the input stays


# -- per-outcome counts -----------------------------------------------------------------------------------------


def test_request_counts_carry_per_outcome_counts_the_sdk_parses(oai: OpenAI, ended: str) -> None:
    counts = oai.batches.retrieve(ended).request_counts
    assert counts is not None
    assert (counts.total, counts.completed, counts.failed) == (6, 4, 2)
    extra = counts.model_extra or {}
    assert extra == {"succeeded": 4, "failed_upstream": 2, "expired": 0, "cancelled": 0, "errored": 0}
    listed = next(b for b in oai.batches.list(limit=100) if b.id == ended)
    assert listed.request_counts is not None and (listed.request_counts.model_extra or {}) == extra


def test_lines_stopped_by_an_expiry_count_as_expired(oai: OpenAI) -> None:
    # 20 slow lines, 4 at a time: most never start within the 2 s window
    fid = upload(oai, [chat_line(i, x_fake={"delay": 3}) for i in range(20)])
    b = oai.batches.create(input_file_id=fid, endpoint="/v1/chat/completions", completion_window="2s")  # type: ignore[arg-type]
    done = wait_for(oai, b.id, timeout=60)
    assert done.status == "expired" and done.request_counts is not None
    extra = done.request_counts.model_extra or {}
    assert extra["expired"] >= 10 and extra["expired"] + extra["succeeded"] == 20
    assert extra["expired"] == done.request_counts.failed and extra["errored"] == 0


# -- dry run ----------------------------------------------------------------------------------------------------


def validate(http: httpx.Client, **body: Any) -> httpx.Response:
    return http.post("/v1/batches/validate", json=body)


def test_a_dry_run_of_a_good_file_estimates_tokens_and_creates_nothing(
    oai: OpenAI, http: httpx.Client
) -> None:
    text = "x" * 400  # ~100 tokens
    line = {**chat_line(0), "body": {"model": "test-model", "messages": [{"role": "user", "content": text}]}}
    fid = upload(oai, [line, {**line, "custom_id": "b"}])
    before = [b.id for b in oai.batches.list(limit=100)]
    resp = validate(http, input_file_id=fid, endpoint="/v1/chat/completions")
    assert resp.status_code == 200, resp.text
    got = resp.json()
    assert got["valid"] is True and got["errors"] == {"object": "list", "data": []}
    assert got["total_lines"] == 2 and got["model"] == "test-model"
    assert got["estimated_input_tokens"] == 2 * (100 + 4)
    assert [b.id for b in oai.batches.list(limit=100)] == before


def test_a_dry_run_reports_the_errors_a_batch_would_fail_with(oai: OpenAI, http: httpx.Client) -> None:
    lines = [
        chat_line(0),
        {"custom_id": "x", "method": "POST", "url": "/v1/embeddings", "body": {"model": "m"}},
    ]
    fid = upload(oai, lines)
    dry = validate(http, input_file_id=fid, endpoint="/v1/chat/completions").json()
    assert dry["valid"] is False
    b = wait_for(
        oai,
        oai.batches.create(input_file_id=fid, endpoint="/v1/chat/completions", completion_window="24h").id,
    )
    assert b.status == "failed" and b.errors is not None
    assert dry["errors"]["data"] == [e.model_dump() for e in b.errors.data or []]


def test_a_dry_run_of_a_missing_file_and_bad_parameters(http: httpx.Client) -> None:
    dry = validate(http, input_file_id="file-nope", endpoint="/v1/chat/completions").json()
    assert dry["valid"] is False
    assert [(e["code"], e["param"], e["line"]) for e in dry["errors"]["data"]] == [
        ("invalid_request", "file_id", None)
    ]
    assert_envelope(validate(http, input_file_id="file-nope", endpoint="/v1/x"), 400, param="endpoint")
    assert_envelope(validate(http, endpoint="/v1/embeddings"), 400, code="missing_required_parameter")
    assert_envelope(
        validate(http, input_file_id="file-x", endpoint="/v1/embeddings", completion_window="24h"),
        400,
        code="unknown_parameter",
    )


# -- output in input order --------------------------------------------------------------------------------------


def test_output_order_input_writes_the_files_in_input_order(
    make_server: Callable[..., Server], upstream: FakeUpstream
) -> None:
    srv = make_server("--upstream", upstream.base_url, "--shard-lines", "6", "--output-order", "input")
    client = srv.client()
    # later lines answer first; every third fails
    lines = [
        chat_line(i, x_fake={"delay": round((17 - i) * 0.03, 2), **({"status": 400} if i % 3 == 0 else {})})
        for i in range(18)
    ]
    b = run_batch(client, lines)
    assert b.status == "completed"
    out = ids_of(read_lines(client, b.output_file_id))
    err = ids_of(read_lines(client, b.error_file_id))
    assert out == [f"req-{i}" for i in range(18) if i % 3]
    assert err == [f"req-{i}" for i in range(18) if i % 3 == 0]


def test_by_default_the_output_is_in_answer_order(oai: OpenAI) -> None:
    # the check above can fail: without the option, later lines that answer first come first
    lines = [chat_line(i, x_fake={"delay": round((5 - i) * 0.1, 2)}) for i in range(6)]
    b = run_batch(oai, lines)
    assert ids_of(read_lines(oai, b.output_file_id)) != [f"req-{i}" for i in range(6)]
