"""Admission control at create (docs/scheduling.md): with a measured throughput, a batch that the backlog ahead would
keep from finishing within its completion window is accepted with an `x-batchyard-warning` header (`--admission
warn`), or also failed at validation with `token_limit_exceeded` (`--admission reject`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from openai import OpenAI

from tests.conftest import Server
from tests.support.batches import chat_line, run_batch, upload, wait_for
from tests.support.fake_upstream import FakeUpstream

SLOW = {"delay": 0.2}  # one slot of 200 ms: ~5 lines/s


def create(client: OpenAI, lines: list[dict[str, Any]], window: str) -> tuple[str, str | None]:
    fid = upload(client, lines)
    raw = client.batches.with_raw_response.create(
        input_file_id=fid,
        endpoint="/v1/chat/completions",
        completion_window=window,  # type: ignore[arg-type]
    )
    return raw.parse().id, raw.headers.get("x-batchyard-warning")


@pytest.mark.parametrize("mode", ["warn", "reject"])
def test_a_batch_the_backlog_keeps_from_its_window(
    make_server: Callable[..., Server], upstream: FakeUpstream, mode: str
) -> None:
    srv = make_server(
        "--upstream", upstream.base_url, "--concurrency", "1", "--shard-lines", "10", "--admission", mode
    )  # fmt: skip
    client = srv.client()
    # no throughput measured yet: everything is admitted, even what could never fit
    first, warned = create(client, [chat_line(i, x_fake=SLOW) for i in range(10)], "90s")
    assert warned is None
    assert wait_for(client, first).status == "completed"  # ~2 s: the throughput is ~5 lines/s now
    backlog, _ = create(client, [chat_line(i, x_fake=SLOW) for i in range(1000)], "24h")  # ~200 s of work
    wait_for(client, backlog, {"in_progress"})

    late, warned = create(client, [chat_line(i, x_fake=SLOW) for i in range(10)], "90s")
    assert warned is not None and "queue is full" in warned and "90 seconds completion window" in warned
    b = wait_for(client, late, {"in_progress", "failed"})
    if mode == "warn":
        assert b.status == "in_progress"
    else:
        assert b.status == "failed" and b.errors is not None and b.errors.data is not None
        (err,) = b.errors.data
        assert err.code == "token_limit_exceeded" and err.message is not None
        assert "Please try again once some in_progress batches have been completed." in err.message
    # a window the backlog fits in is admitted without a word
    fits, warned = create(client, [chat_line(i) for i in range(3)], "3d")
    assert warned is None
    assert wait_for(client, fits, {"in_progress", "failed", "completed"}).status != "failed"
    for bid in (backlog, late, fits):
        if client.batches.retrieve(bid).status in ("validating", "in_progress"):
            client.batches.cancel(bid)


def test_admission_off_checks_nothing(make_server: Callable[..., Server], upstream: FakeUpstream) -> None:
    srv = make_server("--upstream", upstream.base_url, "--concurrency", "1", "--admission", "off")
    client = srv.client()
    assert run_batch(client, [chat_line(i, x_fake=SLOW) for i in range(5)]).status == "completed"
    _, warned = create(client, [chat_line(i) for i in range(2000)], "90s")
    assert warned is None
