"""batchyard's extensions of the Batch API (docs/api.md "Extensions"), against `batchyard serve`: partial results
while a batch runs. Raw httpx for the extensions, the official SDK for the objects it parses."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from openai import OpenAI

from tests.conftest import Server
from tests.support.batches import chat_line, upload, wait_for
from tests.support.envelope import assert_envelope
from tests.support.fake_upstream import FakeUpstream

SLOW_S = 6.0


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    args = ["--shard-lines", "2", "--no-prefix-ordering", "--lease-seconds", "5", "--api-key", "sk-test"]
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
