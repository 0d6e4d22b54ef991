"""Batches executed end to end: the openai SDK -> batchyard serve (subprocess) -> a fake upstream on loopback."""

from __future__ import annotations

import itertools
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from tests.conftest import Server
from tests.support.batches import chat_line, read_lines, run_batch, upload, wait_for
from tests.support.fake_upstream import FakeUpstream, build_response, expected_text, prompt_tokens


def _ids(lines: list[dict[str, Any]]) -> list[str]:
    return [x["custom_id"] for x in lines]


def test_chat_batch_outputs_match_each_request(server: Server, upstream: FakeUpstream) -> None:
    client = server.client()
    reqs = [chat_line(i) for i in range(57)]
    b = run_batch(client, reqs)
    assert b.status == "completed"
    assert b.request_counts is not None
    assert (b.request_counts.total, b.request_counts.completed, b.request_counts.failed) == (57, 57, 0)
    assert b.error_file_id is None and b.output_file_id is not None
    assert b.model == "test-model"
    assert b.in_progress_at and b.finalizing_at and b.completed_at
    out = read_lines(client, b.output_file_id)
    assert sorted(_ids(out)) == sorted(r["custom_id"] for r in reqs)
    by_id = {r["custom_id"]: r for r in reqs}
    for line in out:
        body = by_id[line["custom_id"]]["body"]
        assert line["id"].startswith("batch_req_")
        assert line["error"] is None
        assert line["response"]["status_code"] == 200
        assert line["response"]["request_id"].startswith("req_")
        assert line["response"]["body"] == build_response("/v1/chat/completions", body)
    assert b.usage is not None
    assert b.usage.input_tokens == sum(prompt_tokens("/v1/chat/completions", r["body"]) for r in reqs)
    assert b.usage.output_tokens == 3 * 57
    assert b.usage.total_tokens == b.usage.input_tokens + b.usage.output_tokens
    assert upstream.stats()["total"] == 57


@pytest.mark.parametrize(
    ("endpoint", "body"),
    [
        ("/v1/embeddings", {"model": "emb", "input": ["a b", "c"]}),
        ("/v1/completions", {"model": "m", "prompt": "once upon", "max_tokens": 4}),
        ("/v1/responses", {"model": "m", "input": "hello there"}),
        ("/v1/moderations", {"model": "omni-moderation-latest", "input": "hello"}),
    ],
)
def test_other_endpoints(server: Server, endpoint: str, body: dict[str, Any]) -> None:
    client = server.client()
    reqs: list[dict[str, Any]] = [
        {"custom_id": f"c{i}", "method": "POST", "url": endpoint, "body": {**body, "user": f"u{i}"}}
        for i in range(5)
    ]
    b = run_batch(client, reqs, endpoint=endpoint)
    assert b.status == "completed", b.errors
    out = {x["custom_id"]: x for x in read_lines(client, b.output_file_id)}
    assert set(out) == {r["custom_id"] for r in reqs}
    for r in reqs:
        assert out[r["custom_id"]]["response"]["body"] == build_response(endpoint, r["body"])
    if endpoint == "/v1/responses":
        assert b.usage is not None and b.usage.input_tokens > 0


def test_upstream_4xx_goes_to_error_file_and_all_failed_batch_has_no_output(server: Server) -> None:
    client = server.client()
    reqs = [chat_line(i, x_fake={"status": 400}) for i in range(6)]
    b = run_batch(client, reqs)
    assert b.status == "completed"
    assert b.output_file_id is None and b.error_file_id is not None
    assert b.request_counts is not None and (b.request_counts.completed, b.request_counts.failed) == (0, 6)
    errs = read_lines(client, b.error_file_id)
    assert sorted(_ids(errs)) == sorted(_ids(reqs))
    for e in errs:
        assert e["response"]["status_code"] == 400
        assert e["response"]["body"]["error"]["message"]
        assert e["error"] is None


def test_retries_honour_retry_after_then_succeed(server: Server, upstream: FakeUpstream) -> None:
    client = server.client()
    reqs = [
        chat_line(0, x_fake={"status": 429, "fail_times": 2, "retry_after": "0.01"}),
        chat_line(1, x_fake={"status": 503, "fail_times": 1, "retry_after": "0.01"}),
        chat_line(2),
    ]
    b = run_batch(client, reqs)
    assert b.status == "completed"
    assert b.request_counts is not None and b.request_counts.completed == 3
    assert upstream.stats()["total"] == 3 + 2 + 1


def test_persistent_5xx_and_bad_bodies_become_error_lines(
    make_server: Callable[..., Server], upstream: FakeUpstream
) -> None:
    srv = make_server("--upstream", upstream.base_url, "--max-retries", "1", "--lease-seconds", "2")
    client = srv.client()
    reqs = [
        chat_line(0, x_fake={"status": 500, "retry_after": "0.01"}),
        chat_line(1, x_fake={"non_json": True}),
        chat_line(2, x_fake={"redirect": True}),
        chat_line(3),
    ]
    b = run_batch(client, reqs)
    assert b.status == "completed"
    errs = {e["custom_id"]: e for e in read_lines(client, b.error_file_id)}
    out = {e["custom_id"]: e for e in read_lines(client, b.output_file_id)}
    assert set(out) == {"req-3"}
    assert errs["req-0"]["response"]["status_code"] == 500
    assert errs["req-1"]["response"] is None
    assert errs["req-1"]["error"]["code"] == "invalid_upstream_response"
    assert errs["req-2"]["response"]["status_code"] == 307  # redirects are never followed
    assert upstream.stats()["by_key"][expected_text(reqs[0]["body"])] == 2  # one try + --max-retries 1


def test_request_counts_grow_while_running(
    make_server: Callable[..., Server], upstream: FakeUpstream
) -> None:
    srv = make_server(
        "--upstream", upstream.base_url, "--concurrency", "2", "--shard-lines", "5", "--lease-seconds", "1"
    )
    client = srv.client()
    reqs = [chat_line(i, x_fake={"delay": 0.1}) for i in range(30)]
    fid = upload(client, reqs)
    b = client.batches.create(input_file_id=fid, endpoint="/v1/chat/completions", completion_window="24h")
    seen: set[int] = set()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        b = client.batches.retrieve(b.id)
        assert b.request_counts is not None
        seen.add(b.request_counts.completed)
        if b.status == "completed":
            break
        time.sleep(0.05)
    assert b.status == "completed"
    partial = {c for c in seen if 0 < c < 30}
    assert len(partial) >= 2, seen


def test_cancel_stops_dispatch_and_keeps_partial_results(
    make_server: Callable[..., Server], upstream: FakeUpstream
) -> None:
    srv = make_server(
        "--upstream", upstream.base_url, "--concurrency", "4", "--shard-lines", "10", "--lease-seconds", "1"
    )
    client = srv.client()
    reqs = [chat_line(i, x_fake={"delay": 0.2}) for i in range(200)]
    fid = upload(client, reqs)
    b = client.batches.create(input_file_id=fid, endpoint="/v1/chat/completions", completion_window="24h")
    b = wait_for(client, b.id, {"in_progress"})
    while (client.batches.retrieve(b.id).request_counts or b.request_counts).completed < 8:  # type: ignore[union-attr]
        time.sleep(0.05)
    c = client.batches.cancel(b.id)
    assert c.status == "cancelling" and c.cancelling_at is not None
    done = wait_for(client, b.id, timeout=40)
    assert done.status == "cancelled" and done.cancelled_at is not None
    sent_at_end = upstream.stats()["total"]
    out = read_lines(client, done.output_file_id)
    errs = read_lines(client, done.error_file_id)
    ids = _ids(out) + _ids(errs)
    assert Counter(ids) == Counter(r["custom_id"] for r in reqs)  # each exactly once
    assert 8 <= len(out) < 200
    assert all(e["error"]["code"] == "batch_cancelled" and e["response"] is None for e in errs)
    assert done.request_counts is not None
    assert (done.request_counts.completed, done.request_counts.failed) == (len(out), len(errs))
    time.sleep(0.5)
    assert upstream.stats()["total"] == sent_at_end  # nothing dispatched after the end
    assert sent_at_end < 200
    # cancelling again returns the cancelled batch as is; a finished batch is not cancellable
    assert client.batches.cancel(b.id).status == "cancelled"


def test_cancel_bounds_in_flight_lines(make_server: Callable[..., Server], upstream: FakeUpstream) -> None:
    srv = make_server("--upstream", upstream.base_url, "--cancel-grace", "1", "--lease-seconds", "1")
    client = srv.client()
    reqs = [chat_line(0, x_fake={"delay": 120}), chat_line(1)]
    fid = upload(client, reqs)
    b = client.batches.create(input_file_id=fid, endpoint="/v1/chat/completions", completion_window="24h")
    deadline = time.monotonic() + 20
    while upstream.stats()["total"] < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    t0 = time.monotonic()
    client.batches.cancel(b.id)
    done = wait_for(client, b.id, timeout=20)
    assert done.status == "cancelled"
    assert time.monotonic() - t0 < 15
    errs = {e["custom_id"]: e for e in read_lines(client, done.error_file_id)}
    assert errs["req-0"]["error"]["code"] == "batch_cancelled"
    assert _ids(read_lines(client, done.output_file_id)) == ["req-1"]


def test_expiry_ends_expired_with_partial_results(
    make_server: Callable[..., Server], upstream: FakeUpstream
) -> None:
    srv = make_server(
        "--upstream",
        upstream.base_url,
        "--concurrency",
        "2",
        "--shard-lines",
        "5",
        "--lease-seconds",
        "1",
        "--cancel-grace",
        "1",
    )
    client = srv.client()
    reqs = [chat_line(i, x_fake={"delay": 0.3}) for i in range(60)]
    b = run_batch(client, reqs, window="3s", timeout=40)
    assert b.status == "expired", b.status
    assert b.expired_at is not None and b.expires_at == b.created_at + 3
    out = read_lines(client, b.output_file_id)
    errs = read_lines(client, b.error_file_id)
    assert Counter(_ids(out) + _ids(errs)) == Counter(r["custom_id"] for r in reqs)
    assert 0 < len(out) < 60
    assert {e["error"]["code"] for e in errs} == {"batch_expired"}


@pytest.mark.parametrize("ordering", [True, False])
def test_prefix_ordering_groups_shared_system_prompts(
    make_server: Callable[..., Server], upstream: FakeUpstream, ordering: bool
) -> None:
    flag = "--prefix-ordering" if ordering else "--no-prefix-ordering"
    srv = make_server("--upstream", upstream.base_url, "--concurrency", "1", flag)
    client = srv.client()
    reqs = []
    for i in range(12):
        r = chat_line(i)
        r["body"]["messages"].insert(
            0, {"role": "system", "content": "You are terse." if i % 2 else "Be verbose."}
        )
        reqs.append(r)
    b = run_batch(client, reqs)
    assert b.status == "completed"
    arrival = list(upstream.stats()["by_key"])  # first-seen order = dispatch order with one request in flight
    systems = [
        next(r for r in reqs if expected_text(r["body"]) == k)["body"]["messages"][0]["content"]
        for k in arrival
    ]
    changes = sum(1 for a, b_ in itertools.pairwise(systems) if a != b_)
    assert changes == (1 if ordering else 11)


def test_small_batch_is_not_starved_behind_a_big_one(
    make_server: Callable[..., Server], upstream: FakeUpstream
) -> None:
    srv = make_server(
        "--upstream", upstream.base_url, "--concurrency", "4", "--max-shards", "2", "--shard-lines", "10"
    )
    client = srv.client()
    big = [chat_line(i, x_fake={"delay": 0.05}, user="big") for i in range(600)]
    big_id = client.batches.create(
        input_file_id=upload(client, big), endpoint="/v1/chat/completions", completion_window="24h"
    ).id
    wait_for(client, big_id, {"in_progress"})
    time.sleep(0.5)
    small = [chat_line(i, x_fake={"delay": 0.05}, user="small") for i in range(20)]
    t0 = time.monotonic()
    small_b = run_batch(client, small, timeout=60)
    small_s = time.monotonic() - t0
    assert small_b.status == "completed"
    assert client.batches.retrieve(big_id).status == "in_progress"  # the big one is far from done
    assert small_s < 6  # 20 lines at 0.05 s sharing 4 slots: ~1 s with a fair share, ~7 s if queued behind
    client.batches.cancel(big_id)
