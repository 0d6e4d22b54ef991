"""Retries stop when the batch's deadline is near: a retry whose wait would end past `StopSignal.deadline` is not
made, and the line fails with its last error (the upstream's answer, or the connection error)."""

from __future__ import annotations

import json
import time

from batchyard.execution.dispatcher import StopSignal
from batchyard.upstreams.base import UpstreamError
from tests.unit.test_dispatcher import Scripted, make, ok, parsed, run, status


def due_in(seconds: float) -> StopSignal:
    return StopSignal(deadline=time.monotonic() + seconds)


async def test_a_retry_that_would_end_past_the_deadline_is_not_made() -> None:
    up = Scripted(status(503, headers={"retry-after": "5"}), ok())
    out = await run(make(up), stop=due_in(2.0))
    assert len(up.calls) == 1  # waiting 5 s would pass the deadline in 2 s
    assert not out.ok and out.stopped is None
    assert parsed(out)["response"]["status_code"] == 503  # the last answer is the line's error


async def test_a_retry_that_ends_before_the_deadline_is_made() -> None:
    up = Scripted(status(429, headers={"retry-after-ms": "10"}), ok())
    out = await run(make(up), stop=due_in(60.0))
    assert len(up.calls) == 2 and out.ok


async def test_an_upstream_error_near_the_deadline_fails_with_that_error() -> None:
    up = Scripted(UpstreamError("connect", "connection refused"), ok())
    out = await run(make(up), stop=due_in(0.05))  # the first backoff (~0.5 s and up) ends past it
    assert len(up.calls) == 1 and not out.ok
    err = json.loads(out.line)["error"]
    assert err["code"] == "upstream_connect" and "refused" in err["message"]


async def test_without_a_deadline_retries_are_as_before() -> None:
    up = Scripted(
        status(503, headers={"retry-after-ms": "0"}), status(503, headers={"retry-after-ms": "0"}), ok()
    )
    out = await run(make(up), stop=StopSignal())
    assert len(up.calls) == 3 and out.ok
