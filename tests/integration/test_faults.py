"""An upstream that misbehaves on purpose: for each fault, no line is lost, the right error line, bounded time."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from tests.conftest import Server
from tests.support.batches import chat_line, read_lines, run_batch
from tests.support.fake_upstream import FakeUpstream, expected_text


@pytest.fixture
def faulty(make_server: Callable[..., Server], upstream: FakeUpstream) -> Server:
    return make_server(
        "--upstream",
        upstream.base_url,
        "--attempt-timeout",
        "1.5",
        "--max-retries",
        "1",
        "--max-response-bytes",
        "100000",
        "--lease-seconds",
        "2",
    )


@pytest.mark.parametrize(
    ("fault", "expect"),
    [
        ({"status": 500, "retry_after": "0.01"}, ("status", 500)),
        ({"status": 429, "retry_after": "0.01"}, ("status", 429)),
        ({"status": 422}, ("status", 422)),
        ({"reset": True}, ("code", "upstream_connect")),
        ({"drip": 0.5}, ("code", "request_timeout")),
        ({"delay": 5}, ("code", "request_timeout")),
        ({"non_json": True}, ("code", "invalid_upstream_response")),
        ({"big": 500_000}, ("code", "upstream_too_large")),
        ({"redirect": True}, ("status", 307)),
    ],
    ids=["500", "429", "422", "reset", "slow-drip", "slow", "non-json", "oversized", "redirect"],
)
def test_fault_becomes_the_right_error_line(
    faulty: Server, upstream: FakeUpstream, fault: dict[str, Any], expect: tuple[str, Any]
) -> None:
    client = faulty.client()
    reqs = [chat_line(0, x_fake=fault), chat_line(1), chat_line(2)]
    t0 = time.monotonic()
    b = run_batch(client, reqs, timeout=30)
    assert time.monotonic() - t0 < 20
    assert b.status == "completed"
    out = read_lines(client, b.output_file_id)
    errs = read_lines(client, b.error_file_id)
    assert Counter(x["custom_id"] for x in out + errs) == Counter(r["custom_id"] for r in reqs)
    assert sorted(x["custom_id"] for x in out) == ["req-1", "req-2"]
    for line in out:
        assert line["response"]["body"]["choices"][0]["message"]["content"] == expected_text(
            reqs[int(line["custom_id"].split("-")[1])]["body"]
        )
    (err,) = errs
    kind, value = expect
    if kind == "status":
        assert err["response"]["status_code"] == value
        assert err["error"] is None
    else:
        assert err["response"] is None
        assert err["error"]["code"] == value
    retryable = fault.get("status") in (500, 429) or "reset" in fault or "drip" in fault or "delay" in fault
    tries = upstream.stats()["by_key"].get(expected_text(reqs[0]["body"]), 0)
    assert tries == (2 if retryable else 1)
