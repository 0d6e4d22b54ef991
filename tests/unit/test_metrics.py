"""The label helpers of batchyard/metrics.py: what becomes a label is bounded and never carries a secret."""

from __future__ import annotations

import asyncio
import time

import pytest
from prometheus_client import REGISTRY

import batchyard.domain.lines as lines
import batchyard.metrics as metrics


@pytest.mark.parametrize(
    ("name", "label"),
    [
        ("http://127.0.0.1:8001/v1", "http://127.0.0.1:8001/v1"),
        ("https://user:sk-secret@api.example.com/v1", "https://api.example.com/v1"),
        ("https://sk-secret@api.example.com:8443/v1?api-key=sk-2#x", "https://api.example.com:8443/v1"),
        ("http://[::1]:9000/v1", "http://[::1]:9000/v1"),
        ("gpu-pool", "gpu-pool"),  # an [[upstreams]] name
        ("embedded", "embedded"),
    ],
)
def test_an_upstream_label_has_no_userinfo_query_or_fragment(name: str, label: str) -> None:
    assert metrics.upstream_label(name) == label


@pytest.mark.parametrize(
    ("line", "code"),
    [
        (lines.error_line("c1", "request_timeout", "m"), "request_timeout"),
        (lines.error_line("c1", "shard_quarantined", "m"), "shard_quarantined"),
        (lines.error_line("c1", "made_up_code", "m"), "other"),
        (
            lines.response_line("c1", 400, "req_1", {"error": {"code": "anything_the_upstream_says"}}),
            "http_400",
        ),
        (lines.response_line("c1", 503, "req_1", {"error": None}), "http_503"),
        # a custom_id that spells out another line's members is an escaped string: it cannot be matched
        (
            lines.error_line('x","response":null,"error":{"code":"internal_error', "model_not_found", "m"),
            "model_not_found",
        ),
        (lines.response_line('y","response":{"status_code":200', 404, "r", {}), "http_404"),
        (b"not a line at all\n", "other"),
    ],
)
def test_an_error_lines_code_is_read_from_the_line_itself(line: bytes, code: str) -> None:
    assert metrics.line_error_code(line) == code


def test_a_stopped_line_is_counted_by_its_stop_code() -> None:
    line = lines.not_executed_line("c", "batch_expired")
    assert metrics.line_error_code(line, "batch_expired") == "batch_expired"
    assert metrics.line_error_code(line) == "batch_expired"
    assert metrics.OUTCOME_OF_CODE["batch_expired"] == "expired"
    assert metrics.OUTCOME_OF_CODE["batch_cancelled"] == "cancelled"


def test_the_upstream_error_status_is_one_of_three_words() -> None:
    assert [metrics.upstream_error_status(k) for k in ("timeout", "connect", "too_large", "x")] == [
        "timeout",
        "connect",
        "error",
        "error",
    ]


def _sample(name: str, **labels: str) -> float:
    value = REGISTRY.get_sample_value(name, labels)
    return 0.0 if value is None else value


def test_a_meters_batched_durations_equal_what_histogram_observe_writes() -> None:
    """UpstreamMeter adds its durations to the histogram's buckets n at once (prometheus-client's own `_buckets`
    and `_sum`): the scrape shows what one `observe` a request would have shown."""
    meter = metrics.upstream("http://batched.test/v1")
    reference = metrics._metrics().upstream_duration.labels("reference.test")
    durations = [0.003, 0.004, 0.02, 0.7, 0.7, 45.0, 1000.0]
    now = time.perf_counter()
    for d in durations:
        meter.sent()
        meter.answered(now - d, "200")  # no event loop here: written at once
        reference.observe(d)
    name = "batchyard_upstream_request_duration_seconds"
    for le in [
        *(str(float(b)) for b in metrics.UPSTREAM_BUCKETS),
        "+Inf",
    ]:
        got = _sample(f"{name}_bucket", upstream="http://batched.test/v1", le=le)
        assert got == _sample(f"{name}_bucket", upstream="reference.test", le=le), le
    assert _sample(f"{name}_count", upstream="http://batched.test/v1") == len(durations)
    assert _sample(f"{name}_sum", upstream="http://batched.test/v1") == pytest.approx(
        sum(durations), abs=0.01
    )
    assert _sample("batchyard_upstream_requests_total", upstream="http://batched.test/v1", status="200") == 7
    assert _sample("batchyard_upstream_in_flight", upstream="http://batched.test/v1") == 0


async def test_a_meter_on_an_event_loop_writes_within_its_flush_interval() -> None:
    meter = metrics.upstream("http://timed.test/v1")
    started = [meter.sent() for _ in range(3)]
    meter.answered(started.pop(), "429")
    label = {"upstream": "http://timed.test/v1"}
    assert _sample("batchyard_upstream_in_flight", **label) == 0  # not written yet: counted in Python
    await asyncio.sleep(metrics.FLUSH_SECONDS * 2)
    assert _sample("batchyard_upstream_in_flight", **label) == 2
    assert _sample("batchyard_upstream_requests_total", status="429", **label) == 1
    for s in started:
        meter.answered(s, "200")
    metrics.flush_upstreams()  # a shard commit or a scrape writes at once
    assert _sample("batchyard_upstream_in_flight", **label) == 0
    assert _sample("batchyard_upstream_requests_total", status="200", **label) == 2


def test_a_flush_scheduled_on_a_loop_that_ended_does_not_stop_later_ones() -> None:
    meter = metrics.upstream("http://loops.test/v1")
    label = {"upstream": "http://loops.test/v1"}

    async def one_request(status: str) -> None:
        meter.answered(meter.sent(), status)  # a flush is scheduled on this loop, which ends before it runs

    asyncio.run(one_request("200"))
    assert _sample("batchyard_upstream_requests_total", status="200", **label) == 0

    async def another_and_wait() -> None:
        await one_request("500")
        await asyncio.sleep(metrics.FLUSH_SECONDS * 2)

    asyncio.run(another_and_wait())  # the next loop's flush writes both
    assert _sample("batchyard_upstream_requests_total", status="200", **label) == 1
    assert _sample("batchyard_upstream_requests_total", status="500", **label) == 1
