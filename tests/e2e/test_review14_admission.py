"""Review of admission control under fair share (docs/scheduling.md): one project's huge backlog must not refuse
another project's small batch that fair share serves beside it. A real `batchyard serve` with `--admission reject`,
two projects' stored keys, the official SDK."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from openai import OpenAI

from tests.conftest import Server
from tests.e2e.test_online import new_key
from tests.support.batches import chat_line, upload, wait_for
from tests.support.fake_upstream import FakeUpstream

SLOW = {"delay": 0.2}  # one slot of 200 ms: ~5 lines/s


def create(client: OpenAI, lines: list[dict[str, Any]], window: str) -> tuple[str, str | None]:
    raw = client.batches.with_raw_response.create(
        input_file_id=upload(client, lines),
        endpoint="/v1/chat/completions",
        completion_window=window,  # type: ignore[arg-type]
    )
    return raw.parse().id, raw.headers.get("x-batchyard-warning")


@dataclass
class Busy:
    """Project alpha's 1,000 slow lines in progress, at a measured ~5 lines/s; beta's clients."""

    alpha: OpenAI
    beta: OpenAI
    backlog: str


@pytest.fixture(scope="module")
def busy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Busy]:
    data = tmp_path_factory.mktemp("admission") / "data"
    alpha_key, beta_key = new_key(data, "alpha"), new_key(data, "beta")
    with FakeUpstream() as up:
        args = [
            "--upstream",
            up.base_url,
            "--concurrency",
            "1",
            "--shard-lines",
            "10",
            "--admission",
            "reject",
        ]
        with Server(data, args) as srv:
            alpha, beta = srv.client(alpha_key), srv.client(beta_key)
            first, _ = create(alpha, [chat_line(i, x_fake=SLOW) for i in range(10)], "90s")
            assert wait_for(alpha, first).status == "completed"  # ~2 s: a throughput of ~5 lines/s
            backlog, _ = create(alpha, [chat_line(i, x_fake=SLOW) for i in range(1000)], "24h")  # ~200 s
            wait_for(alpha, backlog, {"in_progress"})
            yield Busy(alpha, beta, backlog)
            for client in (alpha, beta):
                for b in client.batches.list():
                    if b.status in ("validating", "in_progress"):
                        client.batches.cancel(b.id)


def test_another_projects_backlog_does_not_warn_at_create(busy: Busy) -> None:
    """beta's 10 lines get their share beside alpha's 1,000 (fair share): ~4 s, well within 90 s. Before, the whole
    backlog counted as ahead of them (~200 s) and the create answer warned that the queue was full."""
    _, warned = create(busy.beta, [chat_line(i, x_fake=SLOW) for i in range(10)], "90s")
    assert warned is None
    # alpha's own new batch does wait behind alpha's backlog
    mine, warned = create(busy.alpha, [chat_line(i, x_fake=SLOW) for i in range(10)], "90s")
    assert warned is not None and "queue is full" in warned
    assert wait_for(busy.alpha, mine, {"in_progress", "failed"}).status == "failed"


def test_another_projects_backlog_does_not_fail_the_batch_at_validation(busy: Busy) -> None:
    small, _ = create(busy.beta, [chat_line(i, x_fake=SLOW) for i in range(10)], "90s")
    assert wait_for(busy.beta, small, {"in_progress", "completed", "failed"}).status != "failed"
